"""CPU time per value for the same variants and ratios as callgrind.py, measured so that the
ratios repeat between runs on a shared 2-core machine.

What made the older harness (bench.py) move by tens of percent: it took the minimum of each
variant and of its baseline over 5 rounds, from different rounds, and its 1 KiB baseline built
the input in the query (md5 + repeat, ~1-2 µs per row, several times the cost being measured),
so the net figure was a small difference of two large, independently noisy numbers. Here:
 * the inputs come from tables (callgrind.py's setup): the baseline is a scan, not a computation;
 * every variant and its baseline run back to back in the same round, and the net of a round is
   the difference of the two; a ratio is computed per round, from one round's nets;
 * every round runs in a new backend (a backend's memory layout alone moved one backend's
   figures by up to 20%), the rounds are spread over several server starts (default 3: where
   shared buffers put the tables moved a whole run by up to 10%), and the reported ratio is the
   median over the rounds (default 41: with 21, two runs of one build on this 2-vCPU machine
   differed by up to 7% on a ratio; with 41 they agree within 5% on every goal ratio, runs P
   and Q in docs/benchmarks.md), with the interquartile range.
CPU is the backend's own user+system time (getrusage via envelope_bench.backend_cpu_ns(); the
bench-floor build), so other processes on the machine do not count, only their effect on caches.

Run: scripts/bench.sh --ratios (callgrind and CPU), or with the bench build installed and the
`callgrind` instance set up: $PGE_STATE/py-venv/bin/python benches/sql/cpu_ratios.py
"""

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import callgrind as cg  # noqa: E402


def measure(c, sql, rows):
    cpu0 = c.execute("SELECT envelope_bench.backend_cpu_ns()").fetchone()[0]
    c.execute(sql).fetchall()
    cpu1 = c.execute("SELECT envelope_bench.backend_cpu_ns()").fetchone()[0]
    return (cpu1 - cpu0) / rows


def quartiles(xs):
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=500000)
    ap.add_argument("--rows-1k", type=int, default=50000)
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--restarts", type=int, default=3, help="server starts per run")
    ap.add_argument("--only", help="a regular expression over the ratio labels")
    ap.add_argument("--out-json", default=str(cg.ROOT / "target/cpu-ratios.json"))
    a = ap.parse_args()
    import re

    cg.cluster("start")
    vs = {**cg.variants("s"), **cg.variants("k")}
    # (Ratios over variants this build lacks are left out: the floors with the format's
    # associated data exist only in a `bench-floor-aad` build.)
    ratios = [r for r in cg.RATIOS if (not a.only or re.search(a.only, r[0])) and r[1] in vs and r[2] in vs]
    needed = {n for _, num, den, _ in ratios for n in (num, den)}
    needed |= {vs[n][2] for n in needed}
    order = [n for n in vs if n in needed]
    rows = lambda n: a.rows_1k if n.endswith("_k") else a.rows
    per_round = []
    for r in range(a.rounds):
        # A server restart every rounds/restarts rounds: where shared buffers put the tables'
        # pages moved whole runs by up to 10%; the median over several starts moves less.
        if r > 0 and a.restarts > 1 and r % max(1, a.rounds // a.restarts) == 0:
            cg.cluster("stop")
            cg.cluster("start")
        # A new backend every round: a backend's memory layout (where its keys, buffers and
        # results land) moved single-backend figures by up to 20% between runs; the median over
        # many backends does not move.
        with psycopg.connect(host=cg.SOCK, port=cg.PORT, dbname=cg.DB, user="postgres", autocommit=True) as c:
            c.execute("SET max_parallel_workers_per_gather = 0")
            c.execute("SET app.tenant_id = 'bench_t0'")
            # Warm: keys loaded and derived, pages cached, catalog reads planned.
            for n in order:
                expr, frm, _ = vs[n]
                c.execute(f"SELECT {expr} FROM {frm.format(n=min(rows(n), 2000))}").fetchall()
            k = r % len(order)
            cpu = {}
            # Each baseline right before the variants that use it; the order rotates per round.
            for n in order[k:] + order[:k]:
                expr, frm, base = vs[n]
                if base and base not in cpu:
                    bexpr, bfrm, _ = vs[base]
                    cpu[base] = measure(c, f"SELECT {bexpr} FROM {bfrm.format(n=rows(base))}", rows(base))
                if n not in cpu:
                    cpu[n] = measure(c, f"SELECT {expr} FROM {frm.format(n=rows(n))}", rows(n))
        net = {n: cpu[n] - cpu[vs[n][2]] for n in cpu if vs[n][2]}
        per_round.append({"cpu": cpu, "net": net,
                          "ratios": {label: net[num] / net[den] for label, num, den, _ in ratios}})
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{l.split(' (')[0][:22]} {v:.2f}" for l, v in list(per_round[-1]["ratios"].items())[:4]), file=sys.stderr, flush=True)
    cg.cluster("stop")
    model, flags = cg.cpu_flags()
    out = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": model,
           "flags": flags, "rounds": a.rounds, "rows": [a.rows, a.rows_1k], "per_round": per_round,
           "net_ns": {n: quartiles([p["net"][n] for p in per_round]) for n in per_round[0]["net"]},
           "ratios": [{"ratio": label, "quartiles": quartiles([p["ratios"][label] for p in per_round]), "goal": goal}
                      for label, num, den, goal in ratios]}
    Path(a.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out_json).write_text(json.dumps(out, indent=1))
    print(f"\nCPU: {model}; flags: " + " ".join(f for f, on in flags.items() if on))
    print(f"net CPU ns per value, median over {a.rounds} rounds [interquartile range]:")
    for n, (q1, m, q3) in out["net_ns"].items():
        print(f"  {n:28s} {m:8.1f}  [{q1:.1f} – {q3:.1f}]")
    print("ratios (per-round, median [IQR]):")
    for r in out["ratios"]:
        q1, m, q3 = r["quartiles"]
        goal = "" if r["goal"] is None else f"  goal <= {r['goal']}"
        print(f"  {r['ratio']:52s} {m:6.3f}  [{q1:.3f} – {q3:.3f}]{goal}")


if __name__ == "__main__":
    main()
