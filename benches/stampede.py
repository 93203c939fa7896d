#!/usr/bin/env python3
"""KMS stampede: hundreds of cold backends needing the same tenant at once (issue 16 item 4).

    /var/lib/pg_envelope-dev/py-venv/bin/python benches/stampede.py                  # 100/300/500, ~6 min
    /var/lib/pg_envelope-dev/py-venv/bin/python benches/stampede.py --sizes 100 --bounds 4,0

What runs (everything on 127.0.0.1, as root; the cluster runs as the postgres user):

* its own PostgreSQL 15 cluster: instance `pg15-stampede` on port 54343, started through
  scripts/cluster.sh (the project's shared_preload_libraries and envelope settings), with
  max_connections = 530 and `envelope.max_concurrent_provider_calls` / `envelope.kms_timeout` set
  per run by ALTER SYSTEM in that cluster's postgresql.auto.conf;
* its own OpenBao dev server on 127.0.0.1:8250 (plain http; dev mode also opens 8251) with a
  file audit device: OpenBao's own log is the measurement. Every `transit/decrypt` request entry
  is paired with its response entry by request id; "calls" is their number, "in flight" the most
  requests OpenBao had between request and response at one moment. By default the server is made
  a slower KMS (`--kms-latency-ms 5`: every storage operation takes 5 ms and caching is off, so a
  Transit decrypt spends ~5 ms reading its key inside OpenBao, one at a time per key): on a local
  OpenBao with its caches a decrypt takes ~0.1 ms inside the server and calls hardly ever
  overlap there, whatever PostgreSQL does (`--kms-latency-ms 0` shows that);
* the grid runs once per `--kms-timeouts` value (default 5s, the setting's default, and 20s);
* one tenant `st` on the vault_transit provider and one encrypted value.

Scenarios, for each N (--sizes) and each bound (--bounds; 0 = no bound), each after a server
restart (fresh counters, every backend new):

* `restart`: N connections are opened and set the tenant (nothing has touched a key yet); then
  one thread sends `SELECT v::text FROM st_values ...` on all N back to back (a few ms from the
  first to the last send: the barrier) and collects every answer;
* `ttl`: N connections set the tenant and `envelope.key_cache_ttl = 3s` (SUSET, per session),
  decrypt once each, one after the other (warm; the slot peak stays at 1), wait until the TTL has
  passed for every one of them, then all decrypt at once as above. A session whose refresh cannot
  get a slot within envelope.kms_timeout fails with 58000 (the provider busy: a slot wait never
  serves keys past their TTL), counted as an error; "degraded" counts sessions served from stale
  keys with a WARNING (outage mode, only when the KMS itself does not answer: expected 0 here).

Reported per run: provider calls seen by OpenBao, most in flight per OpenBao's log, OpenBao's own
time per call, status()->'provider_call_slots' (peak since the restart; waited, timed_out and
calls as differences over the burst), the decrypt statement's latency per session (send to
answer; p50/p95/max), errors by SQLSTATE, degraded serves, wrong values, wall time from the first
send to the last answer. Written to target/stampede.json (--json), a table on stdout. The cluster
and OpenBao are stopped at the end (--keep leaves them running).
"""

import argparse
import itertools
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pg_test" / "integration"))

import stampede_kit as kit  # noqa: E402

DB = "stampede"
TTL_S = 3


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100,300,500")
    p.add_argument("--bounds", default="16,4,0")
    p.add_argument("--scenarios", default="restart,ttl")
    p.add_argument("--kms-latency-ms", type=int, default=5)
    p.add_argument("--kms-timeouts", default="5s,20s",
                   help="envelope.kms_timeout values to run the grid with (5s is the default setting)")
    p.add_argument("--port", type=int, default=54343)
    p.add_argument("--bao-port", type=int, default=8250)
    p.add_argument("--instance", default="pg15-stampede")
    p.add_argument("--json", default=str(ROOT / "target" / "stampede.json"))
    p.add_argument("--keep", action="store_true", help="leave the cluster and OpenBao running")
    return p.parse_args()


def ms(x):
    return None if x is None else round(x * 1000, 1)


def run_one(cl, bao, scenario, n, bound, kms_timeout):
    cl.set({"envelope.max_concurrent_provider_calls": bound, "envelope.kms_timeout": kms_timeout}, restart=True)
    setup = ["SET app.tenant_id = 'st'"]
    if scenario == "ttl":
        setup.append(f"SET envelope.key_cache_ttl = '{TTL_S}s'")
    t_open = time.monotonic()
    sessions = kit.open_sessions(cl, DB, n, setup)
    opened = time.monotonic() - t_open
    try:
        warm_s = None
        if scenario == "ttl":
            t0 = time.monotonic()
            for s in sessions:
                v = s.conn.execute(kit.DECRYPT).fetchone()[0]
                assert v == kit.PLAINTEXT, v
            warm_s = time.monotonic() - t0
            time.sleep(TTL_S + 0.5)  # past the TTL of the last one warmed
        before = cl.slots(DB)
        offset = bao.audit_offset()
        results, wall, spread = kit.fire(sessions, kit.DECRYPT)
        calls = bao.transit_calls(offset)
        after = cl.slots(DB)
        # Every session's backend must still be there (no crash).
        alive = sum(1 for s in sessions if s.conn.pgconn.status == kit.pq.ConnStatus.OK)
    finally:
        kit.close_sessions(sessions)
    lat = [r.latency for r in results if r.latency is not None]
    ok_lat = [r.latency for r in results if r.latency is not None and r.sqlstate is None]
    errors = Counter(r.sqlstate for r in results if r.sqlstate)
    messages = sorted({r.message.splitlines()[0] for r in results if r.sqlstate})[:3]
    degraded = sum(1 for r in results if any("served from keys cached" in m for m in r.notices))
    wrong = sum(1 for r in results if r.sqlstate is None and r.value != kit.PLAINTEXT)
    in_bao = [(b - a) / 1e6 for a, b, _ in calls if b is not None]
    row = {
        "scenario": scenario,
        "sessions": n,
        "bound": bound,
        "kms_timeout": kms_timeout,
        "kms_latency_ms": bao.latency_ms,
        "provider_calls": len(calls),
        "unanswered_calls": sum(1 for c in calls if c[1] is None),
        "max_in_flight": kit.max_in_flight(calls),
        "openbao_ms_p50": round(kit.percentile(in_bao, 50), 2) if in_bao else None,
        "openbao_ms_max": round(max(in_bao), 2) if in_bao else None,
        "slots_peak": after["peak"] if after else None,
        "slots_calls": (after["calls"] - before["calls"]) if after else None,
        "slots_waited": (after["waited"] - before["waited"]) if after else None,
        "slots_timed_out": (after["timed_out"] - before["timed_out"]) if after else None,
        "slots_in_use_after": after["in_use"] if after else None,
        "latency_ms_p50": ms(kit.percentile(lat, 50)),
        "latency_ms_p95": ms(kit.percentile(lat, 95)),
        "latency_ms_max": ms(max(lat) if lat else None),
        "latency_ok_ms_max": ms(max(ok_lat) if ok_lat else None),
        "errors": sum(errors.values()),
        "errors_by_sqlstate": dict(errors),
        "error_messages": messages,
        "degraded": degraded,
        "wrong_values": wrong,
        "sessions_alive": alive,
        "wall_s": round(wall, 3),
        "send_spread_ms": ms(spread),
        "open_s": round(opened, 1),
        "load_avg_1m": round(os.getloadavg()[0], 1),
        "warm_s": None if warm_s is None else round(warm_s, 1),
    }
    return row


HEAD = ("kms_timeout", "scenario", "N", "bound", "calls", "inflt", "peak", "waited", "t/out", "p50 ms", "p95 ms", "max ms",
        "errors", "degr", "wall s")


def table_row(r):
    return (r["kms_timeout"], r["scenario"], r["sessions"], r["bound"] or "off", r["provider_calls"], r["max_in_flight"],
            r["slots_peak"] if r["bound"] else "-", r["slots_waited"] if r["bound"] else "-",
            r["slots_timed_out"] if r["bound"] else "-", r["latency_ms_p50"], r["latency_ms_p95"], r["latency_ms_max"],
            (f"{r['errors']} {r['errors_by_sqlstate']}" if r["errors"] else 0), r["degraded"], r["wall_s"])


def print_table(rows):
    out = [HEAD] + [tuple(str(x) for x in table_row(r)) for r in rows]
    widths = [max(len(str(line[i])) for line in out) for i in range(len(HEAD))]
    for i, line in enumerate(out):
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main():
    a = parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (the cluster is managed through sudo -u postgres)")
    sizes = [int(x) for x in a.sizes.split(",")]
    bounds = [int(x) for x in a.bounds.split(",")]
    scenarios = a.scenarios.split(",")
    timeouts = a.kms_timeouts.split(",")
    if max(sizes) > 520:
        sys.exit("at most 520 sessions (max_connections = 530)")
    bao = kit.Bao(a.bao_port, latency_ms=a.kms_latency_ms)
    cl = kit.Cluster(a.instance, a.port)
    rows = []
    t_start = time.monotonic()
    log_from = cl.log.stat().st_size if cl.log.exists() else 0
    try:
        bao.start()
        cl.start({"max_connections": 530, "envelope.max_concurrent_provider_calls": 16, "envelope.kms_timeout": "5s"})
        kit.make_db(cl, bao, DB)
        for kms_timeout, n, scenario, bound in itertools.product(timeouts, sizes, scenarios, bounds):
            r = run_one(cl, bao, scenario, n, bound, kms_timeout)
            rows.append(r)
            print(f"kms_timeout={kms_timeout:4} {scenario:8} N={n:<4} bound={bound:<3} calls={r['provider_calls']} in_flight={r['max_in_flight']} "
                  f"peak={r['slots_peak']} waited={r['slots_waited']} timed_out={r['slots_timed_out']} "
                  f"p50/p95/max={r['latency_ms_p50']}/{r['latency_ms_p95']}/{r['latency_ms_max']} ms "
                  f"errors={r['errors_by_sqlstate'] or 0} degraded={r['degraded']} wall={r['wall_s']} s",
                  flush=True)
        # The server log must show no crash.
        with open(cl.log, "rb") as f:
            f.seek(log_from)
            log = f.read().decode(errors="replace")
        crashes = [line for line in log.splitlines() if "terminated by signal" in line or "PANIC" in line]
    finally:
        if not a.keep:
            try:
                cl.stop()
            finally:
                bao.stop()
    summary = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
        "kms": {"openbao_port": a.bao_port, "latency_ms": a.kms_latency_ms, "audit_log": str(bao.audit_log)},
        "cluster": {"instance": a.instance, "port": a.port, "max_connections": 530, "kms_timeouts": timeouts},
        "ttl_s": TTL_S,
        "total_s": round(time.monotonic() - t_start, 1),
        "server_crashes": crashes,
        "runs": rows,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(f"KMS: OpenBao with {a.kms_latency_ms} ms storage latency; envelope.kms_timeout = {a.kms_timeouts}; "
          f"{summary['total_s']} s in all; results in {a.json}")
    print_table(rows)
    erred = [r for r in rows if r["bound"] and (r["errors"] or r["degraded"])]
    if erred:
        print(f"\n{len(erred)} run(s) with the bound on had sessions not served fresh keys within envelope.kms_timeout "
              "(errors: 58000, no slot within kms_timeout; degraded: stale keys served in outage mode)")
    bad = [r for r in rows if r["wrong_values"] or r["sessions_alive"] != r["sessions"]
           or (r["bound"] and (r["max_in_flight"] > r["bound"] or r["slots_peak"] > r["bound"]))]
    if crashes or bad:
        print(f"\nFAILED: {len(bad)} run(s) broke the bound, gave a wrong value or lost a session; crashes: {crashes[:3]}")
        sys.exit(1)


if __name__ == "__main__":
    main()
