"""Audit overhead: decrypting N rows with envelope.audit off and on, in the same run. Not a test.

    $PGE_STATE/py-venv/bin/python benches/sql/audit_bench.py [--rows 1000000] [--rounds 7]

A table of N envelope.encrypted_text values (one tenant) in the maintenance worker's database
(`postgres`: the audit writer writes there). Each round runs `SELECT count(v::text) FROM t` once
with auditing off and once on (alternating which goes first), timing the backend's CPU (from
/proc/PID/stat, so other processes on the machine do not count) and the wall time. Reported:
the median of each and the on/off ratio. The goal (issue 13) is <= 1.03x.

Also `--statements S`: S short statements (one value each) per variant, the per-statement cost
of an audit record (one queue push per statement).
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
DB = "postgres"
TENANT = "audit_bench"
TICK = os.sysconf("SC_CLK_TCK")


def connect():
    return psycopg.connect(host=SOCK, port=PORT, dbname=DB, user="postgres", autocommit=True)


def cpu_s(pid):
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def set_audit(c, on):
    c.execute(f"ALTER SYSTEM SET envelope.audit = {'on' if on else 'off'}")
    c.execute("SELECT pg_reload_conf()")
    time.sleep(0.3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--statements", type=int, default=5000)
    a = ap.parse_args()
    admin = connect()
    had = admin.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_envelope'").fetchone() is not None
    admin.execute("CREATE EXTENSION IF NOT EXISTS pg_envelope")
    if not admin.execute("SELECT 1 FROM envelope.tenants WHERE name = %s", (TENANT,)).fetchone():
        admin.execute("SELECT envelope.create_tenant(%s)", (TENANT,))
    admin.execute("SELECT envelope.grant_tenant(%s, current_user)", (TENANT,))
    admin.execute("DROP TABLE IF EXISTS audit_bench")
    admin.execute("CREATE TABLE audit_bench (id int, v envelope.encrypted_text)")
    admin.execute("SELECT set_config('app.tenant_id', %s, false)", (TENANT,))
    admin.execute("INSERT INTO audit_bench SELECT g, ('value ' || g)::text FROM generate_series(1, %s) g", (a.rows,))
    admin.execute("CREATE INDEX ON audit_bench (id)")
    admin.execute("VACUUM ANALYZE audit_bench")
    s = connect()
    s.execute("SELECT set_config('app.tenant_id', %s, false)", (TENANT,))
    pid = s.execute("SELECT pg_backend_pid()").fetchone()[0]
    s.execute("SELECT count(v::text) FROM audit_bench")  # warm: keys cached, table in shared buffers
    res = {"off": {"cpu": [], "wall": []}, "on": {"cpu": [], "wall": []}}
    short = {"off": [], "on": []}
    try:
        for r in range(a.rounds):
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                set_audit(admin, on)
                c0, w0 = cpu_s(pid), time.perf_counter()
                assert s.execute("SELECT count(v::text) FROM audit_bench").fetchone()[0] == a.rows
                res["on" if on else "off"]["wall"].append(time.perf_counter() - w0)
                res["on" if on else "off"]["cpu"].append(cpu_s(pid) - c0)
                c0 = cpu_s(pid)
                for i in range(a.statements):
                    s.execute("SELECT v::text FROM audit_bench WHERE id = %s", (i % a.rows + 1,))
                short["on" if on else "off"].append(cpu_s(pid) - c0)
    finally:
        admin.execute("ALTER SYSTEM RESET envelope.audit")
        admin.execute("SELECT pg_reload_conf()")
        admin.execute("DROP TABLE IF EXISTS audit_bench")
        if not had:  # the project's tests need `postgres` without the extension
            admin.execute("DROP EXTENSION pg_envelope CASCADE")
    med = {k: {m: statistics.median(v[m]) for m in v} for k, v in res.items()}
    out = {
        "rows": a.rows,
        "rounds": a.rounds,
        "bulk_decrypt_cpu_s": {k: round(v["cpu"], 3) for k, v in med.items()},
        "bulk_decrypt_wall_s": {k: round(v["wall"], 3) for k, v in med.items()},
        "bulk_ratio_cpu": round(med["on"]["cpu"] / med["off"]["cpu"], 3),
        "bulk_ratio_wall": round(med["on"]["wall"] / med["off"]["wall"], 3),
        "short_statements": a.statements,
        "short_cpu_s": {k: round(statistics.median(v), 3) for k, v in short.items()},
        "short_ratio_cpu": round(statistics.median(short["on"]) / statistics.median(short["off"]), 3),
    }
    print(json.dumps(out, indent=2))
    (Path(__file__).resolve().parents[2] / "target").mkdir(exist_ok=True)
    (Path(__file__).resolve().parents[2] / "target/audit-bench.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
