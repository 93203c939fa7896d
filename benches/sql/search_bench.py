"""Blind-index benchmarks (issue 14), in one session, variants interleaved over rounds:

1. The net CPU cost of one term for a short value (an e-mail address) with
   `envelope.blind_index()` (purpose with normalisation `none`, and `nfkc_casefold`), against
   pgcrypto's `hmac(value, key, 'sha256')` and a bare pre-keyed HMAC-SHA-256 floor
   (`envelope_bench.hmac_floor`, the bench-only schema): backend CPU from getrusage, net of a
   baseline query that builds the same values, min and median over the rounds. Goals: <= 0.25x
   pgcrypto and <= 1.3x the floor.
2. A lookup by term in a table of `--lookup-rows` rows (default 1,000,000) against the
   decrypting full scan it replaces (`WHERE email::text = $1`), wall time per lookup.

Needs a build with `--features bench-floor` installed (scripts/bench.sh installs one; or run
scripts/bench.sh --search for this benchmark alone). Writes benches/results/search.json.

    $PGE_STATE/py-venv/bin/python benches/sql/search_bench.py [--rows 200000] [--rounds 7]
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import psycopg

STATE = Path(os.environ.get("PGE_STATE", "/var/lib/pg_envelope-dev"))
SOCK = str(STATE / "run")
PORT = int(os.environ.get("PGE_PORT", "54315"))
DB = "envelope_search_bench"
ROOT = Path(__file__).resolve().parents[2]


def connect(dbname=DB):
    return psycopg.connect(host=SOCK, port=PORT, dbname=dbname, user="postgres", autocommit=True)


def cpu_ns(c, q):
    c.execute("SELECT envelope_bench.backend_cpu_ns()")  # warm the function
    t0 = c.execute("SELECT envelope_bench.backend_cpu_ns()").fetchone()[0]
    c.execute(q)
    t1 = c.execute("SELECT envelope_bench.backend_cpu_ns()").fetchone()[0]
    return t1 - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--lookup-rows", type=int, default=1_000_000)
    ap.add_argument("--lookups", type=int, default=20)
    a = ap.parse_args()
    with connect("postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {DB}")
    out = {}
    try:
        with connect() as c:
            c.execute("CREATE EXTENSION pg_envelope")
            c.execute("CREATE EXTENSION pgcrypto")
            c.execute("SELECT envelope.create_tenant('sb'), envelope.grant_tenant('sb', 'postgres')")
            c.execute("SELECT envelope.declare_blind_index('sb.raw'), envelope.declare_blind_index('sb.fold', 'nfkc_casefold')")
            c.execute("SET app.tenant_id = 'sb'")
            val = "('user' || i || '@example.com')"
            gs = f"FROM generate_series(1, {a.rows}) i"
            variants = {
                "baseline": f"SELECT count(convert_to({val}, 'UTF8')) {gs}",
                "blind_index_none": f"SELECT count(envelope.blind_index('sb.raw', {val})) {gs}",
                "blind_index_nfkc_casefold": f"SELECT count(envelope.blind_index('sb.fold', {val})) {gs}",
                "pgcrypto_hmac": f"SELECT count(hmac(convert_to({val}, 'UTF8'), '\\x0909090909090909090909090909090909090909090909090909090909090909'::bytea, 'sha256')) {gs}",
                "floor_hmac": f"SELECT count(envelope_bench.hmac_floor(convert_to({val}, 'UTF8'))) {gs}",
            }
            for q in variants.values():  # warm caches and keys
                c.execute(q.replace(str(a.rows), "1000"))
            samples = {k: [] for k in variants}
            for r in range(a.rounds):
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                for k in order:
                    samples[k].append(cpu_ns(c, variants[k]) / a.rows)
            base_min, base_med = min(samples["baseline"]), statistics.median(samples["baseline"])
            net = {k: {"min_ns": min(v) - base_min, "median_ns": statistics.median(v) - base_med}
                   for k, v in samples.items() if k != "baseline"}
            out["per_value"] = {"rows": a.rows, "rounds": a.rounds, "baseline_min_ns": base_min, "net": net}
            for k, v in net.items():
                print(f"{k:28s} net {v['min_ns']:8.0f} ns/value (min)  {v['median_ns']:8.0f} ns/value (median)")
            for k in ("blind_index_none", "blind_index_nfkc_casefold"):
                for ref, goal in (("pgcrypto_hmac", 0.25), ("floor_hmac", 1.3)):
                    ratio_min = net[k]["min_ns"] / net[ref]["min_ns"]
                    ratio_med = net[k]["median_ns"] / net[ref]["median_ns"]
                    out.setdefault("ratios", {})[f"{k}/{ref}"] = {"min": ratio_min, "median": ratio_med, "goal": goal}
                    print(f"{k} / {ref}: {ratio_min:.2f}x (min), {ratio_med:.2f}x (median); goal <= {goal}x")

            # 2. Lookup by term vs the decrypting full scan.
            n = a.lookup_rows
            c.execute("CREATE TABLE users (id int PRIMARY KEY, email envelope.encrypted_text, email_idx envelope.blind_index)")
            t0 = time.monotonic()
            c.execute(f"INSERT INTO users SELECT i, {val}::text, envelope.blind_index('sb.fold', {val}) FROM generate_series(1, {n}) i")
            c.execute("CREATE INDEX ON users (email_idx)")
            c.execute("VACUUM ANALYZE users")
            load_s = time.monotonic() - t0
            probes = [f"user{(k * 7919) % n + 1}@example.com" for k in range(a.lookups)]
            scan, term = [], []
            for p in probes[:3]:  # the full scan is slow: three probes
                t = time.monotonic()
                got = c.execute("SELECT id FROM users WHERE email::text = %s", (p,)).fetchall()
                scan.append(time.monotonic() - t)
                assert len(got) == 1
            for p in probes:
                t = time.monotonic()
                got = c.execute("SELECT id FROM users WHERE email_idx = envelope.blind_index('sb.fold', %s)", (p.upper(),)).fetchall()
                term.append(time.monotonic() - t)
                assert len(got) == 1
            plan = "\n".join(r[0] for r in c.execute(
                "EXPLAIN (COSTS OFF) SELECT id FROM users WHERE email_idx = envelope.blind_index('sb.fold', 'user1@example.com')").fetchall())
            out["lookup"] = {"rows": n, "load_s": load_s, "full_scan_ms_median": statistics.median(scan) * 1e3,
                             "term_lookup_ms_median": statistics.median(term) * 1e3, "plan": plan}
            print(f"lookup in {n} rows: decrypting full scan {statistics.median(scan) * 1e3:.1f} ms, "
                  f"term lookup {statistics.median(term) * 1e3:.3f} ms (median of {len(term)}); {plan.splitlines()[0]}")
    finally:
        with connect("postgres") as c:
            c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    res = ROOT / "benches/results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "search.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
