"""The audit export's cost on a large trail: envelope.audit_export (a C function over heap scans,
since insider review 58) against the first, SQL, export (its body from git, created as a
temporary function), in the same run. Not a test.

    $PGE_STATE/py-venv/bin/python benches/sql/audit_export_bench.py [--records 200000] [--rounds 3]

In `postgres` (where the dev cluster's audit writer writes): a few hundred real records are
written with auditing on, then, inside a transaction that is rolled back, their blocks are
copied under far-away sequence numbers until the trail holds about --records records (the
copies do not chain: the export decodes them all the same, which is what is timed). Reported:
seconds per export (all lines fetched by the client, and count(*) on the server), min and median
over the rounds, and the ratio old / new.
"""

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

import psycopg

STATE = Path(os.environ.get("PGE_STATE", "/var/lib/pg_envelope-dev"))
SOCK = str(STATE / "run")
PORT = int(os.environ.get("PGE_PORT", "54315"))
DB = "postgres"
TENANT = "audit_export_bench"
ROOT = Path(__file__).resolve().parents[2]
OLD_COMMIT = "fedef4a"   # the last commit with the SQL export


def old_export_sql():
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:sql/audit.sql"], capture_output=True, text=True, check=True).stdout
    start = text.index("CREATE FUNCTION audit_export(")
    end = text.index("\n$$;", start) + 4
    return text[start:end].replace("@extschema@", "envelope").replace("CREATE FUNCTION audit_export(", "CREATE FUNCTION pg_temp.old_export(")


def wait_until(pred, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return pred()


def timed(c, sql, fetch):
    t = time.perf_counter()
    cur = c.execute(sql)
    n = len(cur.fetchall()) if fetch else cur.fetchone()[0]
    return time.perf_counter() - t, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with psycopg.connect(host=SOCK, port=PORT, dbname=DB, user="postgres", autocommit=True) as c:
        had = c.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_envelope'").fetchone() is not None
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_envelope")
        try:
            if not c.execute("SELECT 1 FROM envelope.tenants WHERE name = %s", (TENANT,)).fetchone():
                c.execute("SELECT envelope.create_tenant(%s)", (TENANT,))
            c.execute("SELECT envelope.grant_tenant(%s, current_user)", (TENANT,))
            c.execute("ALTER SYSTEM SET envelope.audit = on")
            c.execute("SELECT pg_reload_conf()")
            time.sleep(0.5)
            c.execute("SELECT set_config('app.tenant_id', %s, false)", (TENANT,))
            c.execute("CREATE TEMP TABLE v AS SELECT envelope.encrypt_field('x') AS e")
            for _ in range(400):
                c.execute("SELECT envelope.decrypt_field(e) FROM v")
            assert wait_until(lambda: c.execute("SELECT envelope.status()->'audit'->>'queued'").fetchone()[0] == "0")
            c.execute("BEGIN")
            real = c.execute("SELECT count(*), coalesce(sum(last_seq - first_seq + 1), 0), coalesce(max(last_seq), 0) FROM envelope.audit_blocks").fetchone()
            copies = max(0, args.records // max(1, real[1]) - 1)
            c.execute("""INSERT INTO envelope.audit_blocks
                           SELECT first_seq + g * 1000000000, last_seq + g * 1000000000, first_at, last_at, prev_hash, records, server_started_at, queue_pos
                             FROM envelope.audit_blocks, generate_series(1, %s) g WHERE first_seq <= %s""", (copies, real[2]))
            blocks, records = c.execute("SELECT count(*), sum(last_seq - first_seq + 1) FROM envelope.audit_blocks").fetchone()
            c.execute(old_export_sql())
            print(f"trail: {records} records in {blocks} blocks ({real[1]} real, copied {copies} times); rounds {args.rounds}")
            variants = {
                "new export, lines fetched": ("SELECT line FROM envelope.audit_export(1)", True),
                "old SQL export, lines fetched": ("SELECT line FROM pg_temp.old_export(1)", True),
                "new export, count(*)": ("SELECT count(*) FROM envelope.audit_export(1)", False),
                "old SQL export, count(*)": ("SELECT count(*) FROM pg_temp.old_export(1)", False),
            }
            times = {k: [] for k in variants}
            lines = {}
            for _ in range(args.rounds):
                for k, (sql, fetch) in variants.items():
                    s, n = timed(c, sql, fetch)
                    times[k].append(s)
                    lines[k] = n
            c.execute("ROLLBACK")
        finally:
            c.execute("ALTER SYSTEM RESET envelope.audit")
            c.execute("SELECT pg_reload_conf()")
            if not had:
                c.execute("DROP EXTENSION pg_envelope CASCADE")
    print(f"{'variant':50} {'rows':>9} {'min s':>8} {'median s':>9}")
    for k, ts in times.items():
        print(f"{k:50} {lines[k]:>9} {min(ts):>8.3f} {statistics.median(ts):>9.3f}")
    for what in ("lines fetched", "count(*)"):
        new, old = min(times[f"new export, {what}"]), min(times[f"old SQL export, {what}"])
        print(f"old / new ({what}): {old / new:.2f}x")


if __name__ == "__main__":
    main()
