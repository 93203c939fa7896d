"""The audit writer's CPU per record, measured on the writer alone. Not a test.

    $PGE_STATE/py-venv/bin/python benches/sql/audit_writer_bench.py [--rounds 10] [--records 8000]

Each round stalls the writer (a session holds `LOCK envelope.audit_log IN SHARE MODE`), queues
`--records` one-value statements from one session (each a record: a short `encrypt_field`),
then lets the writer go and takes its CPU time for the drain from `/proc/<pid>/schedstat`
(nanoseconds on CPU; no other process runs meanwhile, so the figure is the writer's own work:
parsing the queued records, the chain's SHA-256, heap and index inserts, WAL, the hourly
counts). Reported: µs of writer CPU per record, per round, and the median. The dense OLTP mix
(`audit_pgbench.py`) moves by ±10% between identical rounds on this shared machine; this
isolates the writer's share so that a change to it can be measured. Uses the dev cluster's
`postgres` database (where the writer writes) and leaves it as found.
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import psycopg

STATE = Path(os.environ.get("PGE_STATE", "/var/lib/pg_envelope-dev"))
SOCK = str(STATE / "run")
PORT = int(os.environ.get("PGE_PORT", "54315"))
DB = "postgres"
TENANT = "audit_writer_bench"


def connect():
    return psycopg.connect(host=SOCK, port=PORT, dbname=DB, user="postgres", autocommit=True)


def on_cpu_ns(pid):
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--records", type=int, default=8000)
    a = ap.parse_args()
    admin, blocker, filler = connect(), connect(), connect()
    had = admin.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_envelope'").fetchone() is not None
    admin.execute("CREATE EXTENSION IF NOT EXISTS pg_envelope")
    if not admin.execute("SELECT 1 FROM envelope.tenants WHERE name = %s", (TENANT,)).fetchone():
        admin.execute("SELECT envelope.create_tenant(%s)", (TENANT,))
    admin.execute("SELECT envelope.grant_tenant(%s, 'postgres')", (TENANT,))
    admin.execute("ALTER SYSTEM SET envelope.audit = on")
    admin.execute("ALTER SYSTEM SET envelope.audit_max_delay = 300")
    admin.execute("SELECT pg_reload_conf()")
    time.sleep(1)
    status = lambda: admin.execute("SELECT envelope.status()->'audit'").fetchone()[0]
    pid = admin.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_envelope maintenance'").fetchone()[0]
    filler.execute("SELECT set_config('app.tenant_id', %s, false)", (TENANT,))
    per_record = []
    try:
        for r in range(a.rounds + 1):
            blocker.execute("BEGIN")
            blocker.execute("LOCK TABLE envelope.audit_log IN SHARE MODE")
            for _ in range(a.records):
                filler.execute("SELECT envelope.encrypt_field('x'::text)", prepare=True)
            filler.execute("SELECT 1")
            queued = status()["queued"]
            written0 = status()["records_written"]
            t0 = on_cpu_ns(pid)
            blocker.execute("ROLLBACK")
            while status()["queued"] > 0:
                time.sleep(0.05)
            time.sleep(0.3)  # (the hourly counts and the batch's end)
            ns = on_cpu_ns(pid) - t0
            n = status()["records_written"] - written0
            if r == 0:
                continue  # warm-up: caches, the prepared upsert
            per_record.append(ns / n / 1000)
            print(f"round {r}: {n} records ({queued} queued), writer {ns / 1e6:.1f} ms on CPU, {per_record[-1]:.2f} us per record", flush=True)
        # What the trail takes on disk per record (the records' bytes, the table with its index
        # and TOAST, and the WAL of the rounds).
        row = admin.execute("SELECT sum(octet_length(records)), sum(last_seq - first_seq + 1), count(*), "
                            "pg_total_relation_size('envelope.audit_blocks') FROM envelope.audit_blocks").fetchone()
        if row[1]:
            print(f"stored: {row[0] / row[1]:.1f} bytes of block per record, {row[1] / row[2]:.1f} records per block, "
                  f"{row[3] / row[1]:.1f} bytes of table and index per record", flush=True)
    finally:
        blocker.execute("ROLLBACK")
        for k in ("audit", "audit_max_delay"):
            admin.execute(f"ALTER SYSTEM RESET envelope.{k}")
        admin.execute("SELECT pg_reload_conf()")
        time.sleep(1)
        if not had:
            admin.execute("DROP EXTENSION pg_envelope CASCADE")
    q = statistics.quantiles(per_record, n=4)
    print(f"writer CPU per record: median {statistics.median(per_record):.2f} us [IQR {q[0]:.2f} - {q[2]:.2f}] over {len(per_record)} rounds of {a.records}")


if __name__ == "__main__":
    main()
