"""Instruction counts per value for pg_envelope's SQL functions, against the same floors as
bench.py: a measure that the noise of a shared 2-core machine cannot move.

How: a private cluster (instance `callgrind`) is set up once over its socket (tenants, the
ciphertext tables); then, with the cluster stopped, each variant runs in PostgreSQL's
single-user mode under `valgrind --tool=callgrind --toggle-collect=ExecutorRun`, twice, over N1
and N2 rows. The slope (I(N2) - I(N1)) / (N2 - N1) is the instructions per row with every
per-statement cost (parse, plan, the first key unwrap, the statement's audit record) cancelled;
the variant's baseline slope (the same query with only the input expression) is subtracted.
Callgrind counts the same instructions for the same binary and inputs whatever else the machine
does, so the ratios repeat exactly between runs (the random nonces and the key cache's hash
seeds do not change the instruction path).

Valgrind reports the CPU features it emulates (AES-NI, PCLMULQDQ, AVX2; no AVX-512, no VAES), so
the AES-GCM code measured is the AES-NI/CLMUL path, the one the machines of this class without
AVX-512 take.

Run: scripts/bench.sh --callgrind  (installs the bench-floor build first), or directly with the
bench build installed: $PGE_STATE/py-venv/bin/python benches/sql/callgrind.py [--profile]

Diagnostic: with a build made with `--features bench-floor-aad` installed, the floors are also
measured authenticating as much associated data as a v2 envelope does (23 bytes), which tells
the format's cryptographic cost from the code's. That build is not the benchmark's: a second
call site makes the compiler stop inlining aes-gcm's decryption into the plain floor (+32
instructions per value there).
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("PGE_STATE", "/var/lib/pg_envelope-dev"))
INSTANCE = "callgrind"
PORT = 54329  # a port no test uses
DATA = STATE / INSTANCE / "data"
SOCK = str(STATE / "run")
DB = "envelope_bench"
KEY = "'\\x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f'::bytea"

SHORT = "i::text"                       # 1..N as text: 1-6 bytes
KIB = "repeat(md5(i::text), 32)"        # 1,024 bytes


def cluster(cmd):
    env = dict(os.environ, PGE_INSTANCE=INSTANCE, PGE_PORT=str(PORT))
    subprocess.run(["bash", str(ROOT / "scripts/cluster.sh"), cmd], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def as_postgres(argv):
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + argv
    return ["sudo", "-u", "postgres", "-H", "--"] + argv


def pg_bindir():
    cfg = os.environ.get("PGE_PG15_CONFIG", "/usr/lib/postgresql/15/bin/pg_config")
    return subprocess.run([cfg, "--bindir"], check=True, capture_output=True, text=True).stdout.strip()


def has_aad_floor(c=None):
    """Whether the installed build has the diagnostic floors with the format's associated data
    (`--features bench-floor-aad`; not in scripts/bench.sh's build, see Cargo.toml): read from
    the extension's installed script, so it can be told with the cluster stopped."""
    cfg = os.environ.get("PGE_PG15_CONFIG", "/usr/lib/postgresql/15/bin/pg_config")
    share = subprocess.run([cfg, "--sharedir"], check=True, capture_output=True, text=True).stdout.strip()
    scripts = sorted(Path(share, "extension").glob("pg_envelope--[0-9]*.[0-9]*.[0-9]*.sql"))
    return any("aes_gcm_floor_aad" in p.read_text() for p in scripts if "--" not in p.name[len("pg_envelope--"):])


def setup(n_short, n_kib):
    """Tables of N2 rows each: inputs (text and bytea) and ciphertexts of every kind."""
    with psycopg.connect(host=SOCK, port=PORT, dbname="postgres", user="postgres", autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {DB}")
    with psycopg.connect(host=SOCK, port=PORT, dbname=DB, user="postgres", autocommit=True) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        c.execute("CREATE EXTENSION pgcrypto")
        c.execute("SELECT envelope.create_tenant('bench_t' || i), envelope.grant_tenant('bench_t' || i, 'postgres') "
                  "FROM generate_series(0, 9) i")
        c.execute("SELECT envelope.declare_blind_index('bench.plain', 'none'), "
                  "envelope.declare_blind_index('bench.fold', 'nfkc_casefold')")
        c.execute("SET app.tenant_id = 'bench_t0'")
        for s, n, val in (("s", n_short, SHORT), ("k", n_kib, KIB)):
            # Inputs in tables: the baselines then cost a scan, not an md5 per row.
            # STORAGE PLAIN: stored as they are. A 1 KiB text and a 1 KiB bytea make a row over
            # TOAST's 2 kB threshold, and PostgreSQL would compress the (very compressible) text:
            # every read would decompress it, ~1,500 instructions the bytea variant does not pay.
            c.execute(f"CREATE TABLE src_{s} (i int, t text, b bytea)")
            c.execute(f"ALTER TABLE src_{s} ALTER COLUMN t SET STORAGE PLAIN, ALTER COLUMN b SET STORAGE PLAIN")
            c.execute(f"INSERT INTO src_{s} SELECT i, {val}, convert_to({val}, 'UTF8') FROM generate_series(1, {n}) i")
            c.execute(f"CREATE TABLE dec_field_{s} AS SELECT envelope.encrypt_field(t) AS v FROM src_{s}")
            c.execute(f"CREATE TABLE dec_bytea_{s} AS SELECT envelope.encrypt_field(b) AS v FROM src_{s}")
            c.execute(f"CREATE TABLE dec_pgc_{s} AS SELECT encrypt(b, {KEY}, 'aes') AS v FROM src_{s}")
            c.execute(f"CREATE TABLE dec_floor_{s} AS SELECT envelope_bench.aes_gcm_floor(b) AS v FROM src_{s}")
            if has_aad_floor():
                c.execute(f"CREATE TABLE dec_floor_aad_{s} AS SELECT envelope_bench.aes_gcm_floor_aad(b) AS v FROM src_{s}")
            c.execute(f"CREATE TABLE dec_text_{s} AS SELECT t::envelope.encrypted_text AS v FROM src_{s}")
        n = n_short
        c.execute(f"CREATE TABLE dec_int8 AS SELECT (i::bigint)::envelope.encrypted_int8 AS v FROM generate_series(1, {n}) i")
        c.execute(f"CREATE TABLE dec_numeric AS SELECT (i::numeric)::envelope.encrypted_numeric AS v FROM generate_series(1, {n}) i")
        c.execute(f"CREATE TABLE dec_jsonb AS SELECT to_jsonb(i)::envelope.encrypted_jsonb AS v FROM generate_series(1, {n}) i")
        # decrypt_field over plaintexts as long as the jsonb cast's: to_jsonb(i) is stored in
        # PostgreSQL's internal form behind a 2-byte marker, 18 bytes for i < 10,000 (a root
        # scalar: header, entry, an 8-byte numeric) and 20 above (a second base-10,000 digit).
        c.execute(f"CREATE TABLE dec_field_j AS SELECT envelope.encrypt_field(lpad(i::text, CASE WHEN i < 10000 OR i % 10000 = 0 THEN 18 ELSE 20 END, '0')) AS v FROM generate_series(1, {n}) i")
        # A small object, what applications store: {"id": i, "name": "user<i>", "active": true}
        # (three keys, a numeric, a string, a boolean: 40 bytes of header, entries and keys, the
        # numeric's 8 or 10, the name's 5-10), and decrypt_field over text of the same lengths.
        c.execute(f"CREATE TABLE dec_jsonb_obj AS SELECT jsonb_build_object('id', i, 'name', 'user' || i, 'active', true)::envelope.encrypted_jsonb AS v FROM generate_series(1, {n}) i")
        c.execute(f"CREATE TABLE dec_field_jo AS SELECT envelope.encrypt_field(lpad(i::text, 42 + CASE WHEN i < 10000 OR i % 10000 = 0 THEN 8 ELSE 10 END + length('user' || i), '0')) AS v FROM generate_series(1, {n}) i")
        for a, b in (("dec_jsonb", "dec_field_j"), ("dec_jsonb_obj", "dec_field_jo")):
            # Envelopes of equal length hold plaintexts of equal length (the type is in the
            # associated data, not in the envelope).
            differ = c.execute(f"SELECT count(*) FROM (SELECT row_number() OVER () AS r, octet_length(envelope.encrypted_jsonb_send(v)) AS l FROM {a}) x"
                               f" JOIN (SELECT row_number() OVER () AS r, octet_length(v) AS l FROM {b}) y USING (r) WHERE x.l <> y.l").fetchone()[0]
            assert differ == 0, f"{a} and {b}: {differ} plaintexts of different lengths"
        c.execute(f"CREATE TABLE dec_ts AS SELECT ('2026-01-01'::timestamptz + i * interval '1 s')::envelope.encrypted_timestamptz AS v FROM generate_series(1, {n}) i")
    # Values written by many backends: each backend has its own nonce prefix, so decryption
    # looks up (or derives) one key per prefix. 50 backends (fewer prefixes than the 256 a data
    # key keeps derived keys for) and 1,000 (more), each writing its share of N rows.
    for writers in (50, 1000):
        with psycopg.connect(host=SOCK, port=PORT, dbname=DB, user="postgres", autocommit=True) as c:
            c.execute(f"CREATE TABLE dec_many_{writers} (v bytea)")
        per = max(1, n_short // writers)
        for b in range(writers):
            with psycopg.connect(host=SOCK, port=PORT, dbname=DB, user="postgres", autocommit=True) as c:
                c.execute("SET app.tenant_id = 'bench_t0'")
                c.execute(f"INSERT INTO dec_many_{writers} SELECT envelope.encrypt_field(i::text) "
                          f"FROM generate_series({b * per + 1}, {(b + 1) * per}) i")
    with psycopg.connect(host=SOCK, port=PORT, dbname=DB, user="postgres", autocommit=True) as c:
        # A random order, so consecutive rows rarely share a prefix (an index scan's pattern).
        for writers in (50, 1000):
            c.execute(f"CREATE TABLE dec_many_{writers}_r AS SELECT v FROM dec_many_{writers} ORDER BY md5(v::text)")
        c.execute("VACUUM FREEZE ANALYZE")


def lim(table):
    return f"(SELECT * FROM {table} LIMIT {{n}}) s"


AAD_FLOOR = has_aad_floor()


def variants(s):
    """name: (select expression, FROM clause with {n}, baseline name)."""
    src = lim(f"src_{s}")
    v = {
        f"base_src_{s}": ("count(t) + count(b)", src, None),
        f"floor_encrypt_{s}": ("count(t) + count(envelope_bench.aes_gcm_floor(b))", src, f"base_src_{s}"),
        f"encrypt_field_{s}": ("count(envelope.encrypt_field(t)) + count(b)", src, f"base_src_{s}"),
        f"encrypt_field_bytea_{s}": ("count(t) + count(envelope.encrypt_field(b))", src, f"base_src_{s}"),
        f"pgcrypto_encrypt_{s}": ("count(t) + count(encrypt(b, " + KEY + ", 'aes'))", src, f"base_src_{s}"),
        f"base_floor_{s}": ("count(v)", lim(f"dec_floor_{s}"), None),
        f"floor_decrypt_{s}": ("count(envelope_bench.aes_gcm_floor_decrypt(v))", lim(f"dec_floor_{s}"), f"base_floor_{s}"),
        f"base_field_{s}": ("count(v)", lim(f"dec_field_{s}"), None),
        f"decrypt_field_{s}": ("count(envelope.decrypt_field(v))", lim(f"dec_field_{s}"), f"base_field_{s}"),
        f"base_bytea_{s}": ("count(v)", lim(f"dec_bytea_{s}"), None),
        f"decrypt_field_bytea_{s}": ("count(envelope.decrypt_field_bytea(v))", lim(f"dec_bytea_{s}"), f"base_bytea_{s}"),
        f"base_pgc_{s}": ("count(v)", lim(f"dec_pgc_{s}"), None),
        f"pgcrypto_decrypt_{s}": ("count(decrypt(v, " + KEY + ", 'aes'))", lim(f"dec_pgc_{s}"), f"base_pgc_{s}"),
        f"base_text_{s}": ("count(v)", lim(f"dec_text_{s}"), None),
        f"cast_text_{s}": ("count(v::text)", lim(f"dec_text_{s}"), f"base_text_{s}"),
    }
    if AAD_FLOOR:
        v[f"floor_aad_encrypt_{s}"] = ("count(t) + count(envelope_bench.aes_gcm_floor_aad(b))", src, f"base_src_{s}")
        v[f"base_floor_aad_{s}"] = ("count(v)", lim(f"dec_floor_aad_{s}"), None)
        v[f"floor_aad_decrypt_{s}"] = ("count(envelope_bench.aes_gcm_floor_aad_decrypt(v))", lim(f"dec_floor_aad_{s}"), f"base_floor_aad_{s}")
    if s == "s":
        for t, ty in (("int8", "bigint"), ("numeric", "numeric"), ("jsonb", "jsonb"), ("ts", "timestamptz")):
            v[f"base_{t}"] = ("count(v)", lim(f"dec_{t}"), None)
            v[f"cast_{t}"] = (f"count(v::{ty})", lim(f"dec_{t}"), f"base_{t}")
        v["base_jsonb_obj"] = ("count(v)", lim("dec_jsonb_obj"), None)
        v["cast_jsonb_obj"] = ("count(v::jsonb)", lim("dec_jsonb_obj"), "base_jsonb_obj")
        v["base_field_jo"] = ("count(v)", lim("dec_field_jo"), None)
        v["decrypt_field_jo"] = ("count(envelope.decrypt_field(v))", lim("dec_field_jo"), "base_field_jo")
        v["base_field_j"] = ("count(v)", lim("dec_field_j"), None)
        v["decrypt_field_j"] = ("count(envelope.decrypt_field(v))", lim("dec_field_j"), "base_field_j")
        for w in (50, 1000):
            v[f"base_many_{w}"] = ("count(v)", lim(f"dec_many_{w}_r"), None)
            v[f"decrypt_field_{w}_writers"] = ("count(envelope.decrypt_field(v))", lim(f"dec_many_{w}_r"), f"base_many_{w}")
        v["hmac_floor"] = ("count(t) + count(envelope_bench.hmac_floor(b))", src, f"base_src_{s}")
        v["pgcrypto_hmac"] = ("count(t) + count(hmac(b, " + KEY + ", 'sha256'))", src, f"base_src_{s}")
        v["blind_index_none"] = ("count(envelope.blind_index('bench.plain', t)) + count(b)", src, f"base_src_{s}")
        v["blind_index_fold"] = ("count(envelope.blind_index('bench.fold', t)) + count(b)", src, f"base_src_{s}")
    return v


def run_one(bindir, sql, outfile, extra_conf=(), whole=False):
    """One single-user backend under callgrind; returns the instructions counted in ExecutorRun
    (`whole`: in the whole process, for per-statement costs outside the executor)."""
    stdin = "SET app.tenant_id = 'bench_t0'\n" + sql + "\n"
    argv = ["valgrind", "--tool=callgrind"] + ([] if whole else ["--toggle-collect=ExecutorRun"]) + [
            f"--callgrind-out-file={outfile}", "--quiet",
            f"{bindir}/postgres", "--single", "-D", str(DATA), "-c", "envelope.audit=off"]
    for kv in extra_conf:
        argv += ["-c", kv]
    argv.append(DB)
    p = subprocess.run(as_postgres(argv), input=stdin, capture_output=True, text=True)
    if p.returncode != 0 or "ERROR" in p.stdout or "ERROR" in p.stderr:
        raise RuntimeError(f"single-user run failed ({p.returncode}): {sql}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    text = Path(outfile).read_text()
    m = re.search(r"^totals:\s+(\d+)", text, re.M) or re.search(r"^summary:\s+(\d+)", text, re.M)
    return int(m.group(1))


def measure(bindir, tmp, vs, n1, n2, extra_conf=()):
    out = {}
    for name, (expr, frm, base) in vs.items():
        counts = []
        for n in (n1, n2):
            sql = f"SELECT {expr} FROM {frm.format(n=n)}"
            counts.append(run_one(bindir, sql, f"{tmp}/{name}.{n}.out", extra_conf))
        slope = (counts[1] - counts[0]) / (n2 - n1)
        out[name] = {"per_row": slope, "base": base, "counts": counts, "rows": [n1, n2]}
        print(f"  {name:28s} {slope:10.1f} instructions/row", flush=True)
    for name, e in out.items():
        if e["base"]:
            e["net"] = e["per_row"] - out[e["base"]]["per_row"]
    return out


def audit_per_statement(bindir, tmp, k1, k2):
    """The audit's cost per statement in the backend: K one-value statements (simple protocol,
    each its own transaction, as an OLTP client's), the whole process counted, audit off and on;
    the slope over K is the cost of one statement, and on minus off is what auditing adds to it
    (the aggregate, the record's names and encoding, the queue push, the once-per-statement
    check and hooks). The writer's share (the row, the chain) is not in it: in single-user mode
    there is no writer, the records wait in the queue (K2 stays under its 2,048 slots)."""
    statements = {
        "": "SELECT count(envelope.decrypt_field(v)) FROM (SELECT * FROM dec_field_s LIMIT 1) s",
        # A statement that uses no key: what the hooks cost every other statement of a transaction.
        "plain_": "SELECT 1",
    }
    out = {}
    for prefix, stmt in statements.items():
        for label, conf in (("off", ()), ("on", AUDIT_ON)):
            counts = []
            name = f"stmt_{prefix}{label}"
            for k in (k1, k2):
                counts.append(run_one(bindir, "\n".join([stmt] * k), f"{tmp}/{name}.{k}.out", conf, whole=True))
            out[prefix + label] = (counts[1] - counts[0]) / (k2 - k1)
            keep = ROOT / "target/callgrind"
            keep.mkdir(parents=True, exist_ok=True)
            for k in (k1, k2):  # for callgrind_annotate (diff the two sizes' profiles)
                subprocess.run(["cp", f"{tmp}/{name}.{k}.out", str(keep / f"{name}.{k}.callgrind")], check=True)
            print(f"  {'one-value' if not prefix else 'key-less'} statement, audit {label:3s} {out[prefix + label]:10.1f} instructions/statement", flush=True)
    return out


AUDIT_ON = ("envelope.audit=on", "envelope.audit_fail_closed=off", "envelope.database=" + DB)


def profile(bindir, outdir, name, expr, frm, n, top, extra_conf=()):
    """Instructions per row by function, inclusive and self, of one variant over n rows (the
    per-statement costs are spread over the rows: use a large n). The callgrind file is kept in
    target/callgrind/ for callgrind_annotate."""
    f = f"{outdir}/{name}.callgrind"
    run_one(bindir, f"SELECT {expr} FROM {frm.format(n=n)}", f, extra_conf)
    out = {}
    for kind, flag in (("inclusive", "--inclusive=yes"), ("self", "--inclusive=no")):
        p = subprocess.run(["callgrind_annotate", flag, "--threshold=100", f],
                           capture_output=True, text=True, check=True)
        rows = []
        for line in p.stdout.splitlines():
            m = re.match(r"^\s*([\d,]+)\s+\([\s\d.]+%\)\s+(.*)$", line)
            if m:
                fn = re.sub(r"\s*\[/usr/lib/postgresql/\d+/(lib|bin)/(pg_envelope.so|postgres)\]", "", m.group(2).strip())
                rows.append((round(int(m.group(1).replace(",", "")) / n, 1), fn.replace("???:", "")))
        out[kind] = rows[:top]
    return out


def cpu_flags():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                  if l.startswith("model name")), "?")
    wanted = ["aes", "vaes", "pclmulqdq", "vpclmulqdq", "avx", "avx2", "avx512f", "avx512vl", "sha_ni", "bmi2", "adx"]
    return model, {f: (f in flags) for f in wanted}


RATIOS = [
    ("encrypt_field / floor (short)", "encrypt_field_s", "floor_encrypt_s", 1.3),
    ("decrypt_field / floor (short)", "decrypt_field_s", "floor_decrypt_s", 1.3),
    ("encrypt_field / floor (1 KiB)", "encrypt_field_k", "floor_encrypt_k", 1.3),
    ("decrypt_field / floor (1 KiB)", "decrypt_field_k", "floor_decrypt_k", 1.3),
    # Diagnostics (no goal): the same floors authenticating as much associated data as the
    # envelope format does (23 bytes: 10 header bytes, the tenant name bench_t0, no context).
    ("floor with the format's AAD / floor, encrypt (short)", "floor_aad_encrypt_s", "floor_encrypt_s", None),
    ("floor with the format's AAD / floor, decrypt (short)", "floor_aad_decrypt_s", "floor_decrypt_s", None),
    ("encrypt_field / floor with the format's AAD (short)", "encrypt_field_s", "floor_aad_encrypt_s", None),
    ("decrypt_field / floor with the format's AAD (short)", "decrypt_field_s", "floor_aad_decrypt_s", None),
    ("decrypt_field / encrypt_field (short)", "decrypt_field_s", "encrypt_field_s", 1.1),
    ("decrypt_field / encrypt_field (1 KiB)", "decrypt_field_k", "encrypt_field_k", 1.1),
    ("decrypt_field_bytea / floor (short)", "decrypt_field_bytea_s", "floor_decrypt_s", 1.3),
    ("text cast / decrypt_field (short)", "cast_text_s", "decrypt_field_s", 1.1),
    ("text cast / decrypt_field (1 KiB)", "cast_text_k", "decrypt_field_k", 1.1),
    ("int8 cast / decrypt_field (short)", "cast_int8", "decrypt_field_s", 1.1),
    ("numeric cast / decrypt_field (short)", "cast_numeric", "decrypt_field_s", 1.1),
    # The jsonb cast's plaintext (PostgreSQL's internal form, 18-20 bytes for to_jsonb(i)) is
    # longer than the short text's (1-6 bytes): the goal ("for the same payload size") is
    # against decrypt_field over plaintexts of the same length; the short one is shown too.
    ("jsonb cast / decrypt_field (same plaintext length)", "cast_jsonb", "decrypt_field_j", 1.1),
    ("jsonb cast / decrypt_field (short)", "cast_jsonb", "decrypt_field_s", None),
    ("jsonb cast, small object / decrypt_field (same plaintext length)", "cast_jsonb_obj", "decrypt_field_jo", 1.1),
    ("timestamptz cast / decrypt_field (short)", "cast_ts", "decrypt_field_s", 1.1),
    ("decrypt, 50 writers in random order / one writer", "decrypt_field_50_writers", "decrypt_field_s", 1.1),
    ("decrypt, 1,000 writers in random order / one writer", "decrypt_field_1000_writers", "decrypt_field_s", 1.1),
    ("blind_index (none) / HMAC floor", "blind_index_none", "hmac_floor", 1.3),
    ("blind_index (nfkc_casefold) / HMAC floor", "blind_index_fold", "hmac_floor", None),
    ("blind_index (none) / pgcrypto hmac", "blind_index_none", "pgcrypto_hmac", 0.25),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs=2, default=[10000, 50000], metavar=("N1", "N2"))
    ap.add_argument("--rows-1k", type=int, nargs=2, default=[2000, 10000], metavar=("N1", "N2"))
    ap.add_argument("--only", help="a regular expression: run only the matching variants (and their baselines)")
    ap.add_argument("--profile", nargs="*", default=[], metavar="VARIANT",
                    help="also the per-function profile of these short-value variants (e.g. decrypt_field_s encrypt_field_s)")
    ap.add_argument("--audit", action="store_true", help="also decrypt_field with envelope.audit on vs off")
    ap.add_argument("--audit-statements", type=int, nargs=2, default=None, metavar=("K1", "K2"),
                    help="also the audit's cost per statement (K1 and K2 one-value statements, e.g. 200 1000)")
    ap.add_argument("--skip-setup", action="store_true")
    ap.add_argument("--setup-rows", type=int, nargs=2, default=[500000, 50000], metavar=("SHORT", "KIB"),
                    help="rows of the tables made at setup (the CPU benchmark, cpu_ratios.py, uses them whole)")
    ap.add_argument("--out-json", default=str(ROOT / "target/callgrind.json"))
    a = ap.parse_args()

    bindir = pg_bindir()
    if not a.skip_setup:
        cluster("start")
        setup(max(a.setup_rows[0], a.rows[1]), max(a.setup_rows[1], a.rows_1k[1]))
    cluster("stop")  # single-user mode needs the data directory to itself
    model, flags = cpu_flags()
    print(f"CPU: {model}; flags: " + " ".join(f for f, on in flags.items() if on), flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="pge-callgrind-") as tmp:
        os.chmod(tmp, 0o777)
        for s, (n1, n2) in (("s", a.rows), ("k", a.rows_1k)):
            vs = variants(s)
            if a.only:
                keep = {k for k in vs if re.search(a.only, k)}
                keep |= {vs[k][2] for k in keep if vs[k][2]}
                vs = {k: v for k, v in vs.items() if k in keep}
            results.update(measure(bindir, tmp, vs, n1, n2))
        extra = {}
        if a.audit and "decrypt_field_s" in results:
            vs = {k: v for k, v in variants("s").items() if k in ("base_field_s", "decrypt_field_s")}
            on = measure(bindir, tmp, vs, a.rows[0], a.rows[1], AUDIT_ON)
            extra["audit_on_decrypt_net"] = on["decrypt_field_s"]["net"]
        if a.audit_statements:
            st = audit_per_statement(bindir, tmp, *a.audit_statements)
            extra["audit_per_statement"] = st
        profiles = {}
        if a.profile:
            outdir = ROOT / "target/callgrind"
            outdir.mkdir(parents=True, exist_ok=True)
            os.chmod(outdir, 0o777)
            vs = {**variants("s"), **variants("k")}
            for name in a.profile:
                # NAME+audit: the variant with envelope.audit on.
                base_name, _, audit = name.partition("+")
                expr, frm, _ = vs[base_name]
                n = a.rows_1k[1] if base_name.endswith("_k") else a.rows[1]
                profiles[name] = profile(bindir, outdir, name, expr, frm, n, 60, AUDIT_ON if audit else ())
    ratios = []
    for label, num, den, goal in RATIOS:
        if num in results and den in results:
            r = results[num]["net"] / results[den]["net"]
            ratios.append({"ratio": label, "value": r, "goal": goal})
    doc = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "cpu": model, "flags": flags, "results": results, "ratios": ratios, "profiles": profiles, **extra}
    Path(a.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out_json).write_text(json.dumps(doc, indent=1))
    print("\nnet instructions per value (slope minus the baseline's slope):")
    for name, e in results.items():
        if "net" in e:
            print(f"  {name:28s} {e['net']:10.1f}")
    print("\nratios (instructions):")
    for r in ratios:
        goal = "" if r["goal"] is None else f"  goal <= {r['goal']}"
        print(f"  {r['ratio']:44s} {r['value']:6.3f}{goal}")
    if "audit_on_decrypt_net" in extra:
        off = results["decrypt_field_s"]["net"]
        print(f"\naudit on / off, decrypt_field net per value: {extra['audit_on_decrypt_net']:.1f} / {off:.1f} = {extra['audit_on_decrypt_net'] / off:.3f}")
    if "audit_per_statement" in extra:
        st = extra["audit_per_statement"]
        print(f"\naudit per one-value statement: on {st['on']:.0f}, off {st['off']:.0f} instructions: +{st['on'] - st['off']:.0f}")
        print(f"audit per key-less statement (SELECT 1): on {st['plain_on']:.0f}, off {st['plain_off']:.0f} instructions: +{st['plain_on'] - st['plain_off']:.0f}")
    for name, p in profiles.items():
        for kind in ("self", "inclusive"):
            print(f"\nprofile {name}: {kind} instructions per row")
            for ir, fn in p[kind][:40]:
                print(f"  {ir:10.1f}  {fn}")


if __name__ == "__main__":
    main()
