"""SQL benchmarks for pg_envelope against pgcrypto and a bare AES-256-GCM floor, in one session.

Run through scripts/bench.sh (which installs a build with the bench-only `envelope_bench`
schema). Measures the backend's CPU time (getrusage in the backend, via
envelope_bench.backend_cpu_ns()) and wall time per query, interleaves the variants over several
rounds, and reports min and median ns per row net of each variant's baseline, and the ratios.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg

STATE = Path(os.environ.get("PGE_STATE", "/var/lib/pg_envelope-dev"))
SOCK = str(STATE / "run")
PORT = int(os.environ.get("PGE_PORT", "54315"))
DB = "envelope_bench"
KEY = "'\\x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f'::bytea"


def connect(dbname=DB):
    return psycopg.connect(host=SOCK, port=PORT, dbname=dbname, user="postgres", autocommit=True)


def setup(rows, rows_1k):
    with connect("postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {DB}")
    with connect() as c:
        c.execute("CREATE EXTENSION pg_envelope")
        c.execute("CREATE EXTENSION pgcrypto")
        c.execute(
            "SELECT envelope.create_tenant('bench_t' || i), envelope.grant_tenant('bench_t' || i, 'postgres') "
            "FROM generate_series(0, 99) i"
        )
        c.execute("SET app.tenant_id = 'bench_t0'")
        # Pre-built ciphertexts for the decryption variants.
        for name, n, val in (("s", rows, "i::text"), ("k", rows_1k, "repeat(md5(i::text), 32)")):
            c.execute(f"CREATE UNLOGGED TABLE dec_field_{name} AS SELECT envelope.encrypt_field({val}) AS v FROM generate_series(1, {n}) i")
            c.execute(f"CREATE UNLOGGED TABLE dec_pgc_{name} AS SELECT encrypt(convert_to({val}, 'UTF8'), {KEY}, 'aes') AS v FROM generate_series(1, {n}) i")
            c.execute(f"CREATE UNLOGGED TABLE dec_floor_{name} AS SELECT envelope_bench.aes_gcm_floor(convert_to({val}, 'UTF8')) AS v FROM generate_series(1, {n}) i")
        # Logged tables, like users' tables: the WAL for the larger rows is part of the cost.
        c.execute("CREATE TABLE ins_plain (v bytea)")
        c.execute("CREATE TABLE ins_pad (v bytea)")
        c.execute("CREATE TABLE ins_enc (v envelope.encrypted_text)")
        c.execute("VACUUM ANALYZE")


def variants(n, val, suffix):
    gs = f"FROM generate_series(1, {n}) i"
    tbl = "_s" if suffix == "" else "_k"
    b = f"convert_to({val}, 'UTF8')"
    v = {
        # name: (sql, baseline name)
        f"baseline_text{suffix}": (f"SELECT count({val}) {gs}", None),
        f"baseline_bytea{suffix}": (f"SELECT count({b}) {gs}", None),
        f"pgcrypto_encrypt{suffix}": (f"SELECT count(encrypt({b}, {KEY}, 'aes')) {gs}", f"baseline_bytea{suffix}"),
        f"pgcrypto_encrypt_iv{suffix}": (f"SELECT count(encrypt_iv({b}, {KEY}, gen_random_bytes(16), 'aes')) {gs}", f"baseline_bytea{suffix}"),
        f"pgp_sym_encrypt{suffix}": (f"SELECT count(pgp_sym_encrypt({val}, 'pw', 'cipher-algo=aes256, s2k-mode=0')) {gs}", f"baseline_text{suffix}"),
        f"floor_encrypt{suffix}": (f"SELECT count(envelope_bench.aes_gcm_floor({b})) {gs}", f"baseline_bytea{suffix}"),
        f"encrypt_field{suffix}": (f"SELECT count(envelope.encrypt_field({val})) {gs}", f"baseline_text{suffix}"),
        f"baseline_read{suffix}": (f"SELECT count(v) FROM dec_field{tbl}", None),
        f"pgcrypto_decrypt{suffix}": (f"SELECT count(decrypt(v, {KEY}, 'aes')) FROM dec_pgc{tbl}", f"baseline_read{suffix}"),
        f"floor_decrypt{suffix}": (f"SELECT count(envelope_bench.aes_gcm_floor_decrypt(v)) FROM dec_floor{tbl}", f"baseline_read{suffix}"),
        f"decrypt_field{suffix}": (f"SELECT count(envelope.decrypt_field(v)) FROM dec_field{tbl}", f"baseline_read{suffix}"),
    }
    return v


def measure(c, sql, rows):
    cpu0 = c.execute("SELECT envelope_bench.backend_cpu_ns()").fetchone()[0]
    t0 = time.perf_counter_ns()
    cur = c.execute(sql)
    if cur.description:
        cur.fetchall()
    t1 = time.perf_counter_ns()
    cpu1 = c.execute("SELECT envelope_bench.backend_cpu_ns()").fetchone()[0]
    return (cpu1 - cpu0) / rows, (t1 - t0) / rows


def run_interleaved(c, groups, rounds):
    """groups: list of (variants dict, rows). Returns {name: {"cpu": [...], "wall": [...], "base": ...}}."""
    results = {}
    for r in range(rounds):
        for vs, rows in groups:
            names = list(vs)
            k = r % len(names)
            for name in names[k:] + names[:k]:  # rotate the order each round
                sql, base = vs[name]
                cpu, wall = measure(c, sql, rows)
                e = results.setdefault(name, {"cpu": [], "wall": [], "base": base, "rows": rows})
                e["cpu"].append(cpu)
                e["wall"].append(wall)
    return results


def insert_bench(c, rows, rounds):
    """INSERT CPU: plain bytea, plain bytea padded to the envelope's size (the cost of the bigger
    row alone), and encrypted_text through the assignment cast."""
    pad = "x" * 82  # pg_envelope's per-value overhead, so ins_pad rows are as long as ins_enc rows
    cases = {
        "insert_plain_bytea": ("ins_plain", f"INSERT INTO ins_plain SELECT convert_to(i::text, 'UTF8') FROM generate_series(1, {rows}) i"),
        "insert_plain_bytea_same_size": ("ins_pad", f"INSERT INTO ins_pad SELECT convert_to(i::text || '{pad}', 'UTF8') FROM generate_series(1, {rows}) i"),
        "insert_encrypted_text": ("ins_enc", f"INSERT INTO ins_enc SELECT i::text FROM generate_series(1, {rows}) i"),
    }
    out = {k: [] for k in cases}
    sizes = {}
    names = list(cases)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            table, sql = cases[name]
            c.execute("TRUNCATE ins_plain, ins_pad, ins_enc")
            c.execute("CHECKPOINT")
            out[name].append(measure(c, sql, rows))
            sizes[name] = c.execute("SELECT pg_total_relation_size(%s::regclass)", (table,)).fetchone()[0]
    return out, {k: v / rows for k, v in sizes.items()}


def first_decrypts(tenant, env, samples=20):
    """Client-side µs for the first decrypt in a fresh backend (cold tenant) and the next one."""
    cold, warm = [], []
    for _ in range(samples):
        with connect() as c:
            c.execute("SELECT set_config('app.tenant_id', %s, false)", (tenant,))
            t0 = time.perf_counter_ns()
            c.execute("SELECT envelope.decrypt_field(%s::bytea)", (env,)).fetchone()
            t1 = time.perf_counter_ns()
            c.execute("SELECT envelope.decrypt_field(%s::bytea)", (env,)).fetchone()
            t2 = time.perf_counter_ns()
            cold.append((t1 - t0) / 1000)
            warm.append((t2 - t1) / 1000)
    return cold, warm


def kms_economy(rows):
    with connect() as c:
        before = c.execute("SELECT (envelope.status()->'backend'->>'root_unwraps')::bigint").fetchone()[0]
        c.execute(
            f"SELECT count(envelope.encrypt_field(i::text)) FROM generate_series(1, {rows}) i, "
            "LATERAL (SELECT set_config('app.tenant_id', 'bench_t' || (i % 100), true)) s"
        )
        after = c.execute("SELECT (envelope.status()->'backend'->>'root_unwraps')::bigint").fetchone()[0]
    # Cold tenant: a new backend's first decrypt (local provider) vs a warm one.
    with connect() as c:
        c.execute("SET app.tenant_id = 'bench_t0'")
        env = c.execute("SELECT v FROM dec_field_s LIMIT 1").fetchone()[0]
    cold, warm = first_decrypts("bench_t0", env)
    out = {"rows": rows, "tenants": 100, "root_unwraps": after - before,
           "cold_first_decrypt_us_median": statistics.median(cold), "warm_decrypt_us_median": statistics.median(warm)}
    # The same with the tenant key in OpenBao (Transit over TLS on loopback), if it is running.
    bao = STATE / "openbao"
    if (bao / "token").exists() and (bao / "ca.pem").exists():
        with connect() as c:
            c.execute("DELETE FROM envelope.key_providers WHERE name = 'bench_bao'")
            c.execute(
                "SELECT envelope.add_key_provider('bench_bao', 'vault_transit', %s)",
                (psycopg.types.json.Jsonb({"url": "https://127.0.0.1:8200", "key": "pg-root",
                                           "token_file": str(bao / "token"), "ca_file": str(bao / "ca.pem")}),),
            )
            c.execute("SELECT envelope.create_tenant('bench_bao_t', provider => 'bench_bao'), envelope.grant_tenant('bench_bao_t', 'postgres')")
            c.execute("SET app.tenant_id = 'bench_bao_t'")
            benv = c.execute("SELECT envelope.encrypt_field('x')").fetchone()[0]
        bcold, _ = first_decrypts("bench_bao_t", benv)
        out["openbao_cold_first_decrypt_us_median"] = statistics.median(bcold)
    return out


PGBENCH_ENC = """\\set id random(1, {n})
\\set t :id % 10
BEGIN;
SELECT set_config('app.tenant_id', 'bench_t' || :t, true);
SELECT email::text, ssn::text FROM oltp_enc WHERE id = :id;
UPDATE oltp_enc SET ssn = ('ssn-' || :id)::text WHERE id = :id;
INSERT INTO oltp_enc_log (tenant, email, ssn) VALUES ('bench_t' || :t, ('new-' || :id)::text, ('x-' || :id)::text);
COMMIT;
"""
PGBENCH_PLAIN = """\\set id random(1, {n})
\\set t :id % 10
BEGIN;
SELECT set_config('app.tenant_id', 'bench_t' || :t, true);
SELECT email, ssn FROM oltp_plain WHERE id = :id;
UPDATE oltp_plain SET ssn = 'ssn-' || :id WHERE id = :id;
INSERT INTO oltp_plain_log (tenant, email, ssn) VALUES ('bench_t' || :t, 'new-' || :id, 'x-' || :id);
COMMIT;
"""


def pgbench(n, clients, seconds, rounds, tmp):
    with connect() as c:
        for kind, typ in (("plain", "text"), ("enc", "envelope.encrypted_text")):
            c.execute(f"DROP TABLE IF EXISTS oltp_{kind}, oltp_{kind}_log")
            c.execute(f"CREATE TABLE oltp_{kind} (id int PRIMARY KEY, tenant text, email {typ}, ssn {typ})")
            c.execute(f"CREATE TABLE oltp_{kind}_log (id bigserial PRIMARY KEY, tenant text, email {typ}, ssn {typ})")
        c.execute(
            f"INSERT INTO oltp_plain SELECT i, 'bench_t' || (i % 10), 'user' || i || '@example.test', 'ssn-' || i FROM generate_series(1, {n}) i"
        )
        for t in range(10):
            with c.transaction():
                c.execute("SELECT set_config('app.tenant_id', %s, true)", (f"bench_t{t}",))
                c.execute(
                    f"INSERT INTO oltp_enc SELECT i, 'bench_t{t}', ('user' || i || '@example.test')::text, ('ssn-' || i)::text "
                    f"FROM generate_series(1, {n}) i WHERE i % 10 = {t}"
                )
        c.execute("VACUUM ANALYZE oltp_plain, oltp_enc")
    scripts = {}
    for kind, body in (("plain", PGBENCH_PLAIN), ("enc", PGBENCH_ENC)):
        p = Path(tmp) / f"oltp_{kind}.sql"
        p.write_text(body.format(n=n))
        scripts[kind] = str(p)
    tps = {"plain": [], "enc": []}
    for r in range(rounds):
        for kind in (("plain", "enc") if r % 2 == 0 else ("enc", "plain")):
            with connect() as c:
                # Every run starts from the same state: no log rows or dead tuples from earlier
                # runs, no checkpoint left over.
                c.execute(f"TRUNCATE oltp_{kind}_log")
                c.execute(f"VACUUM oltp_{kind}")
                c.execute("CHECKPOINT")
            out = subprocess.run(
                ["/usr/lib/postgresql/15/bin/pgbench", "-h", SOCK, "-p", str(PORT), "-U", "postgres", "-n",
                 "-c", str(clients), "-j", "2", "-T", str(seconds), "-M", "prepared", "-f", scripts[kind], DB],
                capture_output=True, text=True, check=True,
            ).stdout
            line = next(l for l in out.splitlines() if l.startswith("tps ="))
            tps[kind].append(float(line.split()[2]))
    return tps


def summarize(results):
    rows = {}
    for name, e in results.items():
        rows[name] = {
            "cpu_min": min(e["cpu"]), "cpu_median": statistics.median(e["cpu"]),
            "wall_min": min(e["wall"]), "wall_median": statistics.median(e["wall"]),
            "base": e["base"], "rows": e["rows"],
        }
    for name, r in rows.items():
        if r["base"]:
            b = rows[r["base"]]
            r["net_cpu_min"] = r["cpu_min"] - b["cpu_min"]
            r["net_cpu_median"] = r["cpu_median"] - b["cpu_median"]
    return rows


def machine():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with connect("postgres") as c:
        ver = c.execute("SHOW server_version").fetchone()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "postgres": ver,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rows-1k", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pgbench-seconds", type=int, default=15)
    ap.add_argument("--pgbench-rounds", type=int, default=4)
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--parts", default="sql,insert,kms,pgbench",
                    help="comma-separated subset, for quick iterations (report.py needs all four)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    setup(args.rows, args.rows_1k)
    with connect() as c:
        # One process does all the work: getrusage counts only this backend, so a parallel plan
        # (pgcrypto and the floor are PARALLEL SAFE) would hide its workers' CPU.
        c.execute("SET max_parallel_workers_per_gather = 0")
        c.execute("SET app.tenant_id = 'bench_t0'")
        c.execute("SELECT envelope.encrypt_field('warm'), envelope_bench.aes_gcm_floor('\\x00'::bytea)")
        short = variants(args.rows, "i::text", "")
        long = variants(args.rows_1k, "repeat(md5(i::text), 32)", "_1k")
        print(f"SQL variants: {len(short) + len(long)} x {args.rounds} rounds", file=sys.stderr)
        results = summarize(run_interleaved(c, [(short, args.rows), (long, args.rows_1k)], args.rounds)) if "sql" in parts else {}
        for name, r in results.items():
            if "net_cpu_min" in r:
                print(f"  {name:28} net CPU ns/row min {r['net_cpu_min']:7.0f}  median {r['net_cpu_median']:7.0f}", file=sys.stderr)
        ins, storage = {}, {}
        if "insert" in parts:
            print("INSERT comparison", file=sys.stderr)
            ins, storage = insert_bench(c, args.rows, args.rounds)
            for k, v in ins.items():
                print(f"  INSERT {k:21} CPU ns/row min {min(x[0] for x in v):7.0f}", file=sys.stderr)
    kms = {}
    if "kms" in parts:
        print("KMS economy", file=sys.stderr)
        kms = kms_economy(args.rows)
    tps = {}
    if "pgbench" in parts:
        print("pgbench", file=sys.stderr)
        tps = pgbench(100_000, 4, args.pgbench_seconds, args.pgbench_rounds, "/tmp")
    out = {
        "machine": machine(), "args": vars(args), "sql": results,
        "insert": {k: {"cpu_min": min(x[0] for x in v), "cpu_median": statistics.median(x[0] for x in v),
                       "wall_median": statistics.median(x[1] for x in v)} for k, v in ins.items()},
        "storage_bytes_per_row": storage, "kms": kms, "pgbench_tps": tps,
    }
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out_json}", file=sys.stderr)


if __name__ == "__main__":
    main()
