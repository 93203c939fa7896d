"""Turns benches/results/sql.json and Criterion's estimates into docs/benchmarks.md and the
README's summary table (between <!-- bench:start --> and <!-- bench:end -->)."""

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {
    "encrypt_field / pgcrypto encrypt()": 0.2,
    "decrypt_field / pgcrypto decrypt()": 0.2,
    "encrypt_field / floor": 1.3,
    "decrypt_field / floor": 1.3,
    "INSERT encrypted_text / plain bytea (CPU)": 1.6,
}


PROFILE = """
## Where the time goes (perf, encrypt_field on short text)

Profiled 2026-11-23 with `perf record -F 2000 -g -p <backend pid>` during
`SELECT count(envelope.encrypt_field(i::text)) FROM generate_series(1, 15000000) i` (normal
release build, envelope v2), self time by symbol:

| share | where |
|---:|---|
| ~25% | AES-256-GCM itself: AES rounds (counter blocks and the tag block) 12.9%, GHASH 9.3%, keystream 1.4% |
| 11.3% | `encrypt_to` with everything inlined into it: GCM per-message setup, header and nonce writes, AAD build, epoch/TTL/grant checks |
| ~6% | reading the tenant setting: PostgreSQL 15 binary-searches its GUC table with case-insensitive compares (3.6%), `GetConfigOption` 0.7%, `strlen` 2.6% (PostgreSQL 16+ uses a hash table) |
| 3.6% | the tenant cache lookup (`HashMap::get_mut` 2.6%, key compare 1%) |
| 2.2% | ChaCha20 refills for nonces (24 random bytes per value with XAES, 12 with the floor) |
| 1.0% | the cache clock (`CLOCK_MONOTONIC_COARSE`) |
| rest | PostgreSQL: generate_series' tuplestore, int4 → text, count, memory contexts, pgrx's error guard |

Already done for this run, with the gain measured on `encrypt_field` / `decrypt_field` net CPU:
envelope v2 leaves the public key commitment out of the GCM AAD (two GHASH blocks less per
value); the commitment is compared word-wise instead of through `subtle`'s per-byte barrier
(that alone was 9% of a short decryption); the cache clock moved from `Instant::now()` (6%) to
the coarse monotonic clock; a fresh tenant costs one hash lookup instead of two; the three
PostgreSQL calls on the per-value path that cannot raise an error (`GetUserId`,
`GetConfigOption` with `missing_ok`, `GetDatabaseEncoding`) are made without pgrx's
`sigsetjmp` guard (≈ 4% before); results are written straight into a palloc'd varlena.
Together, on the floor-relative ratios: encrypt 1.58x → 1.40x, decrypt 2.16x → 1.70x (short
values; absolute figures move ±10% between runs on this 2-core VM).

What still separates `encrypt_field` from the floor (≈ 70 ns short, ≈ 40 ns at 1 KiB), by
design: the tenant and context are authenticated (two GHASH blocks the floor does not pay),
the tenant is read from its setting (PostgreSQL 15 binary-searches the GUC table) and checked
against the cache, the grant, the TTL and the invalidation epoch on every call, and the nonce
is 192 bits. `decrypt_field` also checks the key commitment, looks up the derived key for the
nonce prefix (rows written by another backend) and validates the text. The remaining levers
are a faster GCM (ring is ~30% faster on short inputs here but does not zeroize its key
schedule) and caching the tenant setting's value between calls (unsafe in PostgreSQL 15: a GUC
can change between two rows of one statement and gives no change counter). The
0.2x-pgcrypto target cannot be met on this machine: pgcrypto's `encrypt()` costs about
760 ns here, so 0.2x is about 150 ns, below the bare AES-256-GCM floor itself (≈ 170–180 ns).

pgbench: the extension's own code is 1.5% of all CPU during the encrypted run (perf, whole
machine); the TPS difference comes from the larger rows (WAL, heap) and from pgbench sharing
the 2 cores with the server, and moves between 0.83x and 1.02x from run to run (each run now
starts from a truncated log table, a vacuumed table and a checkpoint).
"""


def crit(group, name, size=None):
    d = ROOT / "target/criterion" / group / name
    if size is not None:
        d = d / str(size)
    f = d / "new/estimates.json"
    if not f.exists():
        return None
    return json.loads(f.read_text())["median"]["point_estimate"]


def fmt(x, digits=0):
    return "n/a" if x is None else f"{x:,.{digits}f}"


def main(json_path, command):
    d = json.loads(Path(json_path).read_text())
    s = d["sql"]
    net = lambda k, stat="net_cpu_min": s[k][stat]
    ratios = {}
    for suffix, label in (("", "short text"), ("_1k", "1 KiB")):
        ratios[label] = {
            "encrypt_field / pgcrypto encrypt()": net(f"encrypt_field{suffix}") / net(f"pgcrypto_encrypt{suffix}"),
            "decrypt_field / pgcrypto decrypt()": net(f"decrypt_field{suffix}") / net(f"pgcrypto_decrypt{suffix}"),
            "encrypt_field / floor": net(f"encrypt_field{suffix}") / net(f"floor_encrypt{suffix}"),
            "decrypt_field / floor": net(f"decrypt_field{suffix}") / net(f"floor_decrypt{suffix}"),
        }
    ins = d["insert"]
    insert_ratio = ins["insert_encrypted_text"]["cpu_min"] / ins["insert_plain_bytea"]["cpu_min"]
    tps = d["pgbench_tps"]
    tps_ratio = statistics.median(tps["enc"]) / statistics.median(tps["plain"])
    m = d["machine"]

    lines = [
        "# Benchmarks",
        "",
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), Linux {m['kernel']}, PostgreSQL {m['postgres']}.",
        "All SQL variants ran in one session on the same cluster, interleaved over "
        f"{d['args']['rounds']} rounds; CPU is the backend's own user+system time (getrusage), "
        "reported as ns per row **net of the variant's baseline** (the same query with only the input expression).",
        "",
        "Re-run:",
        "",
        "```sh",
        command,
        "```",
        "",
        "## Ratios (CPU, min over rounds, net of baseline)",
        "",
        "| ratio | short text | 1 KiB | target | met (short) |",
        "|---|---:|---:|---:|:---:|",
    ]
    for k in ratios["short text"]:
        t = TARGETS[k]
        lines.append(
            f"| {k} | {ratios['short text'][k]:.2f} | {ratios['1 KiB'][k]:.2f} | ≤ {t} | {'yes' if ratios['short text'][k] <= t else '**no**'} |"
        )
    lines += [
        f"| INSERT encrypted_text / plain bytea (CPU) | {insert_ratio:.2f} | | ≤ 1.6 | {'yes' if insert_ratio <= 1.6 else '**no**'} |",
        f"| pgbench TPS, two encrypted columns / plain | {tps_ratio:.2f} | | ≥ 0.9 | {'yes' if tps_ratio >= 0.9 else '**no**'} |",
        "",
        f"## Per-row cost ({d['args']['rows']:,} rows of `i::text`; 1 KiB variant: {d['args']['rows_1k']:,} rows of `repeat(md5(i::text), 32)`)",
        "",
        "| variant | CPU ns/row min | CPU ns/row median | net CPU ns/row (min) | net (median) | wall ns/row median | 1 KiB net CPU ns/row (min) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ["baseline_text", "baseline_bytea", "pgcrypto_encrypt", "pgcrypto_encrypt_iv", "pgp_sym_encrypt",
                 "floor_encrypt", "encrypt_field", "baseline_read", "pgcrypto_decrypt", "floor_decrypt", "decrypt_field"]:
        r = s[name]
        k = s.get(name + "_1k", {})
        lines.append(
            f"| {name} | {fmt(r['cpu_min'])} | {fmt(r['cpu_median'])} | {fmt(r.get('net_cpu_min'))} | "
            f"{fmt(r.get('net_cpu_median'))} | {fmt(r['wall_median'])} | {fmt(k.get('net_cpu_min'))} |"
        )
    st = d["storage_bytes_per_row"]
    lines += [
        "",
        f"## INSERT of {d['args']['rows']:,} rows",
        "",
        "| table | CPU ns/row min | CPU ns/row median | wall ns/row median | bytes per row on disk |",
        "|---|---:|---:|---:|---:|",
        f"| plain `bytea` (`convert_to(i::text)`) | {fmt(ins['insert_plain_bytea']['cpu_min'])} | {fmt(ins['insert_plain_bytea']['cpu_median'])} | {fmt(ins['insert_plain_bytea']['wall_median'])} | {st['insert_plain_bytea']:.1f} |",
        f"| plain `bytea` padded to the envelope's length (`convert_to(i::text \\|\\| <82 bytes>)`) | {fmt(ins['insert_plain_bytea_same_size']['cpu_min'])} | {fmt(ins['insert_plain_bytea_same_size']['cpu_median'])} | {fmt(ins['insert_plain_bytea_same_size']['wall_median'])} | {st['insert_plain_bytea_same_size']:.1f} |",
        f"| `encrypted_text` (assignment cast) | {fmt(ins['insert_encrypted_text']['cpu_min'])} | {fmt(ins['insert_encrypted_text']['cpu_median'])} | {fmt(ins['insert_encrypted_text']['wall_median'])} | {st['insert_encrypted_text']:.1f} |",
        "",
        "Logged tables (the WAL is part of the cost), a CHECKPOINT before each INSERT, the three variants "
        "rotated over the rounds. Of the extra CPU per row, "
        f"{fmt(ins['insert_plain_bytea_same_size']['cpu_min'] - ins['insert_plain_bytea']['cpu_min'])} ns is the longer row alone "
        f"(padded plain / plain = {ins['insert_plain_bytea_same_size']['cpu_min'] / ins['insert_plain_bytea']['cpu_min']:.2f}) and "
        f"{fmt(ins['insert_encrypted_text']['cpu_min'] - ins['insert_plain_bytea_same_size']['cpu_min'])} ns the encryption "
        f"(encrypted / padded plain = {ins['insert_encrypted_text']['cpu_min'] / ins['insert_plain_bytea_same_size']['cpu_min']:.2f}).",
        "",
        "## pgbench (OLTP mix: select + update + insert per transaction, 4 clients, prepared)",
        "",
        f"| table | TPS per run | median |",
        "|---|---|---:|",
        f"| plain text columns | {', '.join(f'{x:,.0f}' for x in tps['plain'])} | {statistics.median(tps['plain']):,.0f} |",
        f"| two `encrypted_text` columns | {', '.join(f'{x:,.0f}' for x in tps['enc'])} | {statistics.median(tps['enc']):,.0f} |",
        "",
        "## KMS economy",
        "",
        f"- {d['kms']['rows']:,} rows spread over {d['kms']['tenants']} tenants in one session: "
        f"**{d['kms']['root_unwraps']} root-key unwraps** (expected: exactly one per tenant per TTL).",
        f"- First decrypt for a cold tenant in a new backend (local provider, includes the catalog read and the unwrap): "
        f"{d['kms']['cold_first_decrypt_us_median']:.0f} µs median; the next one: {d['kms']['warm_decrypt_us_median']:.0f} µs (round trip from the client).",
        (f"- With the tenant key in OpenBao (Transit over TLS on loopback): first decrypt for a cold tenant "
         f"{d['kms']['openbao_cold_first_decrypt_us_median']:.0f} µs median (catalog read, one Transit decrypt, DEK unwrap)."
         if "openbao_cold_first_decrypt_us_median" in d["kms"] else "- With OpenBao: not measured (start it with scripts/kms.sh start-openbao)."),
        "",
        "## Core (Criterion, median per operation)",
        "",
        "| size | envelope encrypt ns | floor AES-256-GCM ns | envelope decrypt ns |",
        "|---:|---:|---:|---:|",
    ]
    for size in [16, 64, 256, 1024, 4096, 16384, 65536]:
        lines.append(
            f"| {size} | {fmt(crit('encrypt', 'envelope', size))} | {fmt(crit('encrypt', 'floor_aes256gcm', size))} | {fmt(crit('decrypt', 'envelope', size))} |"
        )
    lines += [
        "",
        f"parse_envelope: {fmt(crit('parse_envelope', ''), 1)} ns; XAES prefix derivation: {fmt(crit('xaes_prefix_derivation', ''))} ns; "
        f"cache hit + 16 B encrypt among 100 tenants: {fmt(crit('cache_hit_encrypt_16B_100_tenants', ''))} ns; key unwrap: {fmt(crit('unwrap_key', ''))} ns.",
        "",
    ]
    lines += PROFILE.splitlines()
    (ROOT / "docs/benchmarks.md").write_text("\n".join(lines) + "\n")

    summary = [
        "<!-- bench:start -->",
        f"| measured {m['date']} ({m['cores']} cores) | short text | 1 KiB | target |",
        "|---|---:|---:|---:|",
    ]
    for k in ratios["short text"]:
        summary.append(f"| {k} | {ratios['short text'][k]:.2f} | {ratios['1 KiB'][k]:.2f} | ≤ {TARGETS[k]} |")
    summary += [
        f"| INSERT encrypted_text / plain bytea (CPU) | {insert_ratio:.2f} | | ≤ 1.6 |",
        f"| pgbench TPS encrypted / plain | {tps_ratio:.2f} | | ≥ 0.9 |",
        f"| root-key unwraps, {d['kms']['rows']:,} rows / 100 tenants | {d['kms']['root_unwraps']} | | 100 |",
        "<!-- bench:end -->",
    ]
    readme = (ROOT / "README.md").read_text()
    a, b = readme.index("<!-- bench:start -->"), readme.index("<!-- bench:end -->") + len("<!-- bench:end -->")
    (ROOT / "README.md").write_text(readme[:a] + "\n".join(summary) + readme[b:])
    print("wrote docs/benchmarks.md and the README summary")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
