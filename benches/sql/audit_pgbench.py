"""Audit overhead under an OLTP mix: pgbench with two encrypted columns, envelope.audit off and
on, alternating, in the same run. Not a test.

    $PGE_STATE/py-venv/bin/python benches/sql/audit_pgbench.py [--mix dense|tpcb] [--clients 8] [--seconds 20] [--rounds 3]

Two mixes, both in `postgres` (where the audit writer writes), one tenant:

* `dense` (the default; the one the earlier figures in docs/benchmarks.md used): a mix built to
  stress the audit. accounts(id, balance, email envelope.encrypted_text, ssn
  envelope.encrypted_text), 10,000 rows. The transaction: read one account's two encrypted
  columns, update its balance and re-encrypt its email, read another account's email, insert a
  history row: three short statements out of four use keys, three records per transaction.
* `tpcb`: pgbench's own OLTP mix (its built-in "TPC-B (sort of)" script, scale 8 so that 8
  clients do not queue on one branch row) with two encrypted columns in pgbench_accounts: the
  balance (`abalance envelope.encrypted_int8`) and an e-mail address (`email
  envelope.encrypted_text`, in place of the blank filler). The transaction updates an account's
  balance (decrypt, add, encrypt), reads the balance and the e-mail, updates a teller and a
  branch and inserts a history row: three records per transaction (the update's decryption and
  encryption, the read). Reported: TPS per round and variant, the median on/off
ratio, and CPU per transaction (every server process, reaped backends included, plus pgbench),
whose off/on ratio is what TPS would show on a CPU-bound machine with no steal time or
frequency changes (this shared 2-core machine's TPS moves by 30% between identical rounds).
The goal (issue 13) is >= 0.95x.
"""

import argparse
import os
import re
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

STATE = Path(os.environ.get("PGE_STATE", "/var/lib/pg_envelope-dev"))
SOCK = str(STATE / "run")
PORT = int(os.environ.get("PGE_PORT", "54315"))
DB = "postgres"
TENANT = "audit_pgbench"
BIN = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip())

SCRIPTS = {}
SCRIPTS["dense"] = f"""\\set a random(1, 10000)
\\set b random(1, 10000)
BEGIN;
SELECT set_config('app.tenant_id', '{TENANT}', true);
SELECT email::text, ssn::text FROM bench_accounts WHERE id = :a;
UPDATE bench_accounts SET balance = balance + 1, email = ('user' || :a || '@example.com')::text WHERE id = :a;
SELECT email::text FROM bench_accounts WHERE id = :b;
INSERT INTO bench_history (account, at) VALUES (:a, now());
END;
"""
TPCB_SCALE = 8
SCRIPTS["tpcb"] = f"""\\set aid random(1, {100000 * TPCB_SCALE})
\\set bid random(1, {TPCB_SCALE})
\\set tid random(1, {10 * TPCB_SCALE})
\\set delta random(-5000, 5000)
BEGIN;
SELECT set_config('app.tenant_id', '{TENANT}', true);
UPDATE pgbench_accounts SET abalance = abalance::int8 + :delta WHERE aid = :aid;
SELECT abalance::int8, email::text FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
"""
TABLES = {"dense": "bench_accounts, bench_history",
          "tpcb": "pgbench_accounts, pgbench_tellers, pgbench_branches, pgbench_history"}


def setup(admin, mix, port=None):
    port = port or PORT
    admin.execute(f"DROP TABLE IF EXISTS {TABLES[mix]}")
    admin.execute("SELECT set_config('app.tenant_id', %s, false)", (TENANT,))
    if mix == "dense":
        admin.execute("CREATE TABLE bench_accounts (id int PRIMARY KEY, balance bigint, email envelope.encrypted_text, ssn envelope.encrypted_text)")
        admin.execute("CREATE TABLE bench_history (account int, at timestamptz)")
        admin.execute("INSERT INTO bench_accounts SELECT g, 0, ('user' || g || '@example.com')::text, lpad(g::text, 9, '0')::text FROM generate_series(1, 10000) g")
        admin.execute("VACUUM ANALYZE bench_accounts")
        return
    subprocess.run(["sudo", "-u", "postgres", str(BIN / "pgbench"), "-h", SOCK, "-p", str(port), "-i", "-q",
                    "-s", str(TPCB_SCALE), "-I", "dtg", DB], check=True, capture_output=True)
    # The two encrypted columns, written as the application would (one pass: a new table).
    admin.execute("""CREATE TABLE pgbench_accounts_e AS
        SELECT aid, bid, abalance::bigint::envelope.encrypted_int8 AS abalance,
               ('user' || aid || '@example.com')::text::envelope.encrypted_text AS email
          FROM pgbench_accounts""")
    admin.execute("DROP TABLE pgbench_accounts")
    admin.execute("ALTER TABLE pgbench_accounts_e RENAME TO pgbench_accounts")
    admin.execute("ALTER TABLE pgbench_accounts SET (fillfactor = 90)")
    for t, k in (("pgbench_branches", "bid"), ("pgbench_tellers", "tid"), ("pgbench_accounts", "aid")):
        admin.execute(f"ALTER TABLE {t} ADD PRIMARY KEY ({k})")
    admin.execute("VACUUM ANALYZE pgbench_accounts, pgbench_tellers, pgbench_branches, pgbench_history")


def connect(port=None):
    return psycopg.connect(host=SOCK, port=port or PORT, dbname=DB, user="postgres", autocommit=True)


def set_audit(c, on):
    c.execute(f"ALTER SYSTEM SET envelope.audit = {'on' if on else 'off'}")
    c.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)


def server_cpu(instance="pg15"):
    """CPU seconds (user + system) of the whole server so far, by process: {(pid, start): (title,
    s)} for the postmaster's live children (backends, the worker, the checkpointer...; keyed
    with their start time, as pids are reused) and `reaped` for the children it reaped (every
    backend or autovacuum worker that ended: their time accrues to the postmaster's
    cutime/cstime) plus the postmaster's own."""
    pm = int((STATE / instance / "data" / "postmaster.pid").read_text().split()[0])
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(f[1])
        if int(pid) == pm:
            out["reaped"] = ("reaped", sum(int(x) for x in f[11:15]) / hz)  # utime stime cutime cstime
        elif ppid == pm:
            out[(pid, f[19])] = (title, (int(f[11]) + int(f[12])) / hz)  # f[19]: starttime
    return out


def kind(title):
    if title == "reaped":
        return "reaped"
    if "pg_envelope" in title:
        return "writer"
    if "autovacuum" in title:
        return "autovacuum"
    if any(w in title for w in ("checkpointer", "background writer", "walwriter", "logical replication", "stats")):
        return "aux"
    return "backends"


def cpu_delta(c0, c1):
    """CPU seconds between two `server_cpu` readings, by kind of process. A child alive at the
    first reading and reaped by the second has all its time in the postmaster's cutime by then:
    what it had at the first reading is taken off `reaped`."""
    by = {}
    for key, (title, s) in c1.items():
        by[kind(title)] = by.get(kind(title), 0.0) + s - c0.get(key, (title, 0.0))[1]
    for key, (title, s) in c0.items():
        if key not in c1:
            by["reaped"] = by.get("reaped", 0.0) - s
    return by


def machine_ticks():
    """The machine's CPU time so far from /proc/stat (all CPUs, in ticks): (idle + iowait, steal,
    total). With audit on, a throughput lost to waiting (for a lock, for the WAL) shows as idle
    CPUs rather than as CPU per transaction."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return f[3] + f[4], f[7], sum(f)


def pgbench_argv(script, clients, seconds, port):
    return ["sudo", "-u", "postgres", str(BIN / "pgbench"), "-h", SOCK, "-p", str(port), "-n", "-M", "prepared",
            "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds), "-f", script, DB]


def pgbench_result(out):
    return float(re.search(r"tps = ([0-9.]+)", out).group(1)), int(re.search(r"number of transactions actually processed: ([0-9]+)", out).group(1))


def pgbench(script, clients, seconds):
    p = subprocess.run(pgbench_argv(script, clients, seconds, PORT), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"pgbench failed:\n{p.stderr[-2000:]}")
    return pgbench_result(p.stdout)


def prepare(admin, mix):
    had = admin.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_envelope'").fetchone() is not None
    admin.execute("CREATE EXTENSION IF NOT EXISTS pg_envelope")
    if not admin.execute("SELECT 1 FROM envelope.tenants WHERE name = %s", (TENANT,)).fetchone():
        admin.execute("SELECT envelope.create_tenant(%s)", (TENANT,))
    admin.execute("SELECT envelope.grant_tenant(%s, 'postgres')", (TENANT,))
    return had


def cleanup(admin, mix, had):
    set_audit(admin, False)
    admin.execute("ALTER SYSTEM RESET envelope.audit")
    admin.execute("SELECT pg_reload_conf()")
    admin.execute(f"DROP TABLE IF EXISTS {TABLES[mix]}")
    if not had:
        admin.execute("DROP EXTENSION pg_envelope CASCADE")


PAIR_INSTANCE, PAIR_PORT = "pg15-auditpair", 54361


def paired(a, script):
    """Both variants at once: a second cluster (PAIR_INSTANCE, same build and settings), audit on
    in one and off in the other, each with half the clients, run simultaneously, the roles
    swapped every round. Each round's two runs see the same machine (this VM's speed moves by
    +-15% between 10 s periods, which sequential rounds cannot separate from the audit's cost).
    Each variant's CPU per transaction is its cluster's processes (the writer of the audited one
    included) plus its own pgbench (the rusage of that child alone, from wait4). What this design does not
    charge to the audit: a slowdown the writer causes to every process on the machine (caches,
    scheduling), which here falls on both variants alike; the sequential design charges it."""
    env = dict(os.environ, PGE_INSTANCE=PAIR_INSTANCE, PGE_PORT=str(PAIR_PORT))
    subprocess.run(["bash", str(Path(__file__).resolve().parents[2] / "scripts/cluster.sh"), "start"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    clusters = [("pg15", PORT), (PAIR_INSTANCE, PAIR_PORT)]
    admins = [connect(port) for _, port in clusters]
    hads = [prepare(ad, a.mix) for ad in admins]
    ratios, cpus, splits = [], {False: [], True: []}, {False: [], True: []}
    tps_ratios = []
    try:
        for ad, (_, port) in zip(admins, clusters):
            setup(ad, a.mix, port)
        for r in range(a.rounds):
            on_cluster = r % 2  # which cluster audits this round
            for i, ad in enumerate(admins):
                set_audit(ad, i == on_cluster)
            c0 = [server_cpu(inst) for inst, _ in clusters]
            procs = [subprocess.Popen(pgbench_argv(script, a.clients // 2, a.seconds, port), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _, port in clusters]
            outs, client = [], []
            for p in procs:
                out, err = p.stdout.read(), p.stderr.read()
                _, status, ru = os.wait4(p.pid, 0)  # this pgbench's CPU alone (sudo waits for it)
                p.returncode = os.waitstatus_to_exitcode(status)
                if p.returncode != 0:
                    raise SystemExit(f"pgbench failed:\n{err[-2000:]}")
                outs.append(out)
                client.append(ru.ru_utime + ru.ru_stime)
            wait_until = time.monotonic() + 5
            while time.monotonic() < wait_until and any(
                    k != "reaped" and k not in c0[i] and kind(v[0]) == "backends"
                    for i, (inst, _) in enumerate(clusters) for k, v in server_cpu(inst).items()):
                time.sleep(0.05)
            c1 = [server_cpu(inst) for inst, _ in clusters]
            res = [pgbench_result(o) for o in outs]
            per = []
            for i in range(2):
                by = cpu_delta(c0[i], c1[i])
                by["pgbench"] = client[i]
                per.append((sum(by.values()) / res[i][1] * 1e6, by.get("writer", 0.0) / res[i][1] * 1e6,
                            {k: v / res[i][1] * 1e6 for k, v in by.items()}))
            on_cpu, off_cpu = per[on_cluster][0], per[1 - on_cluster][0]
            splits[True].append(per[on_cluster][2])
            splits[False].append(per[1 - on_cluster][2])
            cpus[True].append(on_cpu)
            cpus[False].append(off_cpu)
            ratios.append(off_cpu / on_cpu)
            tps_ratios.append(res[on_cluster][0] / res[1 - on_cluster][0])
            print(f"round {r + 1}: audit on in {clusters[on_cluster][0]}: on {res[on_cluster][0]:.0f} tps, {on_cpu:.1f} CPU-us/tx "
                  f"(writer {per[on_cluster][1]:.1f}); off {res[1 - on_cluster][0]:.0f} tps, {off_cpu:.1f}; off/on {ratios[-1]:.3f}", flush=True)
    finally:
        for ad, had in zip(admins, hads):
            cleanup(ad, a.mix, had)
        subprocess.run(["bash", str(Path(__file__).resolve().parents[2] / "scripts/cluster.sh"), "stop"], env=env,
                       stdout=subprocess.DEVNULL)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    by_cluster = [statistics.median(ratios[i::2]) for i in range(2)] if len(ratios) > 1 else [ratios[0]] * 2
    print(f"mix {a.mix}, paired: 2 clusters x {a.clients // 2} clients x {a.seconds} s x {a.rounds} rounds: CPU per transaction (server + pgbench) "
          f"off {statistics.median(cpus[False]):.1f} us, on {statistics.median(cpus[True]):.1f} us; per round off/on median "
          f"{statistics.median(ratios):.3f} [IQR {q[0]:.3f}-{q[2]:.3f}] (audit in pg15: {by_cluster[0]:.3f}, in the pair: {by_cluster[1]:.3f}; goal >= 0.95)")
    print(interval(ratios, "CPU off/on per round"))
    print(interval(tps_ratios, "TPS on/off per round (each cluster's own throughput)"))
    kinds = sorted({k for d in splits[False] + splits[True] for k in d})
    med = lambda on, k: statistics.median(d.get(k, 0.0) for d in splits[on])
    diff = lambda k: statistics.median(on.get(k, 0.0) - off.get(k, 0.0) for on, off in zip(splits[True], splits[False]))
    print("CPU-us per transaction by process (medians), off -> on [median of the rounds' differences]: " +
          ", ".join(f"{k} {med(False, k):.1f} -> {med(True, k):.1f} [{diff(k):+.1f}]" for k in kinds))


def interval(ratios, label):
    """The geometric mean of the rounds' ratios with a 95% confidence interval (Student's t over
    the logarithms: each round's two runs share the machine's speed of that moment, so a round's
    ratio is what varies independently), and a bootstrap 95% interval of their median. Many short
    rounds pin the ratio down where a few long ones cannot (this machine's speed moves by +-15%
    from one 10 s period to the next)."""
    import math
    import random
    n = len(ratios)
    if n < 3:
        return ""
    logs = [math.log(x) for x in ratios]
    m = statistics.fmean(logs)
    se = statistics.stdev(logs) / math.sqrt(n)
    # Student's t, two-sided 95%, for n - 1 degrees of freedom (table; 1.96 past 120).
    t_table = {2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
               12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
    df = n - 1
    t = next((v for k, v in sorted(t_table.items()) if k >= df), 1.96)
    rng = random.Random(20261206)
    meds = sorted(statistics.median(rng.choices(ratios, k=n)) for _ in range(2000))
    return (f"{label}: geometric mean {math.exp(m):.3f} [95% CI {math.exp(m - t * se):.3f}-{math.exp(m + t * se):.3f}], "
            f"median {statistics.median(ratios):.3f} [bootstrap 95% CI {meds[50]:.3f}-{meds[1949]:.3f}], {n} rounds")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mix", choices=sorted(SCRIPTS), default="dense")
    ap.add_argument("--paired", action="store_true", help="both variants at once on two clusters (see `paired`)")
    a = ap.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(SCRIPTS[a.mix])
    os.chmod(f.name, 0o644)
    if a.paired:
        try:
            paired(a, f.name)
        finally:
            os.unlink(f.name)
        return
    admin = connect()
    had = prepare(admin, a.mix)
    setup(admin, a.mix)
    tps = {False: [], True: []}
    cpu = {False: [], True: []}  # CPU microseconds per transaction: server + pgbench
    split = {False: [], True: []}  # the same by kind of process
    idle = {False: [], True: []}  # the machine's idle share, percent
    pairs = []  # per round: (TPS on/off, CPU off/on) of that round's two runs
    try:
        for r in range(a.rounds):
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                set_audit(admin, on)
                before = admin.execute("SELECT envelope.status()->'audit'").fetchone()[0]
                c0, r0, m0 = server_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN), machine_ticks()
                t, n = pgbench(f.name, a.clients, a.seconds)
                # pgbench's backends are still exiting when it returns; an exited child that is
                # not yet reaped (a zombie) shows no CPU time in /proc, so a reading taken then
                # lost a whole round's backends (one round read 65 us per transaction).
                wait_until = time.monotonic() + 5
                while time.monotonic() < wait_until and any(
                        k != "reaped" and k not in c0 and kind(v[0]) == "backends" for k, v in server_cpu().items()):
                    time.sleep(0.05)
                c1, r1, m1 = server_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN), machine_ticks()
                idle[on].append(100.0 * (m1[0] - m0[0]) / max(1, m1[2] - m0[2]))
                steal = 100.0 * (m1[1] - m0[1]) / max(1, m1[2] - m0[2])
                tps[on].append(t)
                client = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
                by = cpu_delta(c0, c1)
                by["pgbench"] = client
                cpu[on].append(sum(by.values()) / n * 1e6)
                split[on].append({k: v / n * 1e6 for k, v in by.items()})
                after = admin.execute("SELECT envelope.status()->'audit'").fetchone()[0]
                extra = ""
                if on:
                    n = after["records_written"] - before["records_written"]
                    extra = f" ({n / a.seconds:.0f} records/s, {after['queue_full_waits'] - before['queue_full_waits']} waits for a full queue)"
                parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(split[on][-1].items()))
                print(f"round {r + 1} audit {'on ' if on else 'off'}: {tps[on][-1]:.1f} tps, {cpu[on][-1]:.1f} CPU-us/transaction ({parts}), "
                      f"machine idle {idle[on][-1]:.1f}%, steal {steal:.1f}%{extra}", flush=True)
            pairs.append((tps[True][-1] / tps[False][-1], cpu[False][-1] / cpu[True][-1]))
    finally:
        os.unlink(f.name)
        cleanup(admin, a.mix, had)
    off, on = statistics.median(tps[False]), statistics.median(tps[True])
    coff, con = statistics.median(cpu[False]), statistics.median(cpu[True])
    print(f"mix {a.mix}: pgbench {a.clients} clients x {a.seconds} s x {a.rounds} rounds: audit off {off:.1f} tps, on {on:.1f} tps, "
          f"on/off {on / off:.3f}; CPU per transaction (server + pgbench) off {coff:.1f} us, on {con:.1f} us, "
          f"off/on {coff / con:.3f} (the throughput ratio of a CPU-bound machine without the noise; goal >= 0.95)")
    if pairs:
        q = lambda xs: statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        tq, cq = q([p[0] for p in pairs]), q([p[1] for p in pairs])
        print(f"per round (the two runs of one round side by side): TPS on/off median {statistics.median(p[0] for p in pairs):.3f} "
              f"[IQR {tq[0]:.3f}-{tq[2]:.3f}], CPU off/on median {statistics.median(p[1] for p in pairs):.3f} [IQR {cq[0]:.3f}-{cq[2]:.3f}]; "
              f"machine idle off {statistics.median(idle[False]):.1f}%, on {statistics.median(idle[True]):.1f}% (medians)")
        print(interval([p[0] for p in pairs], "TPS on/off per round"))
        print(interval([p[1] for p in pairs], "CPU off/on per round"))
    kinds = sorted({k for d in split[False] + split[True] for k in d})
    med = lambda on, k: statistics.median(d.get(k, 0.0) for d in split[on])
    print("CPU-us per transaction by process (medians), off -> on: " + ", ".join(f"{k} {med(False, k):.1f} -> {med(True, k):.1f}" for k in kinds))


if __name__ == "__main__":
    main()
