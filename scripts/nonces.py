#!/usr/bin/env python3
"""Nonce uniqueness at scale (issue 16, item 3).

    $PGE_STATE/py-venv/bin/python scripts/nonces.py                     # 10^7 values, 64 backends
    $PGE_STATE/py-venv/bin/python scripts/nonces.py -n 200000 --json target/nonces.json
    $PGE_STATE/py-venv/bin/python scripts/nonces.py --keep              # leave the cluster running

Starts a private PostgreSQL 15 cluster (scripts/cluster.sh with PGE_INSTANCE=pg15-nonce,
127.0.0.1:54341, shared_preload_libraries = 'pg_envelope', the local provider's root key), creates
the extension in a fresh database with two tenants, and has many backends encrypt N values in
total, keeping every nonce. Then it counts, in SQL, the nonces that repeat under one data key.

What makes a nonce unique (crates/core/src/datakey.rs, rng.rs, docs/envelope-format.md): the
XAES-256-GCM nonce is 24 bytes at envelope offset 42 (SQL `substring(e FROM 43 FOR 24)`); its
first 12 bytes are a random *prefix* that each backend draws once per data key (DEK) from its
own ChaCha20 generator, seeded from the OS on first use inside the backend (never in the
postmaster) and reseeded after a fork; the last 12 bytes are a random *suffix* per value. A
repeat only matters under the same DEK, identified by the header's tenant key id and DEK
version (bytes 2..10). So the run stresses exactly that: one tenant's DEK shared by every
backend, backends forked at different times from a postmaster that preloaded the library,
half of them before a server restart and half after (a new postmaster, pids may repeat), one
DEK rotation while backends are connected (each then draws a new prefix for the new version),
a second tenant whose DEK the same backends use in between, and the maintenance worker (a
background worker, not a client backend) re-encrypting a table under the rotated DEK.

Checks (any failure: exit 1):
  * no (DEK, 24-byte nonce) appears twice  -- the property that matters;
  * no 12-byte prefix is used by two processes under one DEK (two backends sharing a generator
    state would show here first), and each backend used exactly one prefix per DEK;
  * no 12-byte suffix appears twice anywhere (random 96-bit values: ~2^-50 for 10^7 values);
  * the counts per DEK are exactly what the plan says, every backend ran in its own process,
    and the restarts happened (postmaster start times differ);
  * positive control: the same queries over the nonces plus one copied row find exactly one
    duplicate, and a copy of a nonce under another DEK is not counted as one.

The nonce offsets are checked first by parsing envelopes in Python (layout, header fields,
commitment constant per DEK, prefix constant per backend, suffix fresh per value, decryption).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("PGE_STATE", "/var/lib/pg_envelope-dev"))
SOCK = str(STATE / "run")
DB = "pge_nonces"
TENANTS = ("nonce_a", "nonce_b")  # nonce_a: the shared, rotated DEK; nonce_b: interleaved
# Envelope layout (docs/envelope-format.md): 0-based offsets, SQL substring() is 1-based.
KEY_OFF, KEY_LEN = 2, 8  # tenant key id (u32be) || DEK version (u32be)
NONCE_OFF, NONCE_LEN, PREFIX_LEN = 42, 24, 12
OVERHEAD = 82
INSERT = (
    "INSERT INTO nonces (key, backend, nonce) "
    f"SELECT substring(e FROM {KEY_OFF + 1} FOR {KEY_LEN}), %s, substring(e FROM {NONCE_OFF + 1} FOR {NONCE_LEN}) "
    "FROM (SELECT envelope.encrypt_field('n' || g) AS e FROM generate_series(1, %s) g) s"
)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Cluster:
    """The private cluster, driven through scripts/cluster.sh (initdb, config, pg_ctl as postgres)."""

    def __init__(self, instance, port):
        if instance == "pg15" or not instance.startswith("pg15-nonce"):
            raise SystemExit(f"refusing instance {instance!r}: use a pg15-nonce* instance of its own")
        if port == 54315:
            raise SystemExit("refusing port 54315: that is the project's main cluster")
        self.instance, self.port = instance, port
        self.dir = STATE / instance

    def _sh(self, cmd):
        env = dict(os.environ, PGE_INSTANCE=self.instance, PGE_PORT=str(self.port))
        env.pop("PGE_NO_ROOT_KEY", None)
        r = subprocess.run(["bash", str(ROOT / "scripts/cluster.sh"), cmd], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cluster.sh {cmd} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r.stdout

    def start(self):
        # Another cluster on the port would make pg_ctl fail with no hint of why.
        import socket
        if not (self.dir / "data/postmaster.pid").exists():
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    raise RuntimeError(f"127.0.0.1:{self.port} is in use by another server: choose --port")
        try:
            self._sh("start")
        except RuntimeError:
            log_file = self.dir / "server.log"
            if log_file.exists():
                print("".join(log_file.read_text(errors="replace").splitlines(True)[-20:]), file=sys.stderr)
            raise

    def stop(self):
        if (self.dir / "data/PG_VERSION").exists():
            self._sh("stop")

    def restart(self):
        self.stop()
        self.start()

    def remove(self):
        self.stop()
        if self.dir.exists():
            if os.geteuid() == 0:
                shutil.rmtree(self.dir)
            else:
                subprocess.run(["sudo", "rm", "-rf", "--", str(self.dir)], check=True)

    def connect(self, dbname=DB, **kw):
        return psycopg.connect(host=SOCK, port=self.port, dbname=dbname, user="postgres", autocommit=True, **kw)


# ---------------------------------------------------------------------------------------------
# Plan: which backend encrypts how much, when, under which tenant.


def split(total, parts):
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def make_plan(n, backends, restarts, chunks, b_share):
    """Backends 1..B over (restarts + 1) phases, each phase an early and a late wave. Every backend
    encrypts its quota in `chunks` statements under tenant A, odd backends one extra statement
    under tenant B in the middle. In the last phase's early wave the DEK of tenant A is rotated
    after every backend's first chunk (a barrier), so those backends write under both versions."""
    phases = restarts + 1
    if backends < 2 * phases:
        raise SystemExit(f"need at least {2 * phases} backends for {phases} phases with two waves each")
    quotas = split(n, backends)
    per_wave = split(backends, 2 * phases)
    plan, label = [], 1
    for phase in range(phases):
        for wave in ("early", "late"):
            count = per_wave[2 * phase + (wave == "late")]
            wave_backends = []
            for _ in range(count):
                q = quotas[label - 1]
                qb = q // b_share if (label % 2 == 1 and b_share) else 0
                a_chunks = split(q - qb, chunks)
                steps = [("nonce_a", c) for c in a_chunks if c]
                if qb:
                    steps.insert(len(steps) // 2 + (len(steps) == 1), ("nonce_b", qb))
                wave_backends.append({"label": label, "steps": steps})
                label += 1
            plan.append({"phase": phase, "wave": wave, "backends": wave_backends,
                         "rotate": phase == phases - 1 and wave == "early"})
    return plan


# ---------------------------------------------------------------------------------------------


def setup_database(cl):
    with cl.connect("postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {DB}")
    with cl.connect() as c:
        c.execute("CREATE EXTENSION pg_envelope")
        ids = {}
        for t in TENANTS:
            ids[t] = c.execute("SELECT envelope.create_tenant(%s)", (t,)).fetchone()[0]
            c.execute("SELECT envelope.grant_tenant(%s, current_user)", (t,))
        # Unlogged: no WAL for 10^7 rows. A clean shutdown keeps unlogged tables, and the exact
        # row counts below would show it if a restart had lost them.
        c.execute("CREATE UNLOGGED TABLE nonces (key bytea NOT NULL, backend int NOT NULL, nonce bytea NOT NULL)")
        c.execute("CREATE TABLE backends (label int PRIMARY KEY, phase int, wave text, pid int,"
                  " backend_start timestamptz, postmaster_start timestamptz, backend_type text)")
        c.execute("CREATE TABLE reenc (id int PRIMARY KEY, v bytea)")
        # The maintenance worker runs queued re-encryption jobs in envelope.database (set at
        # postmaster start: it takes effect at the first restart).
        c.execute(f"ALTER SYSTEM SET envelope.database = '{DB}'")
        c.execute("ALTER SYSTEM SET envelope.maintenance_naptime = '1s'")
    return ids


def key_bytes(tenant_id, version):
    return tenant_id.to_bytes(4, "big") + version.to_bytes(4, "big")


def verify_layout(cl, ids):
    """Parses envelopes from two backends and checks every offset the SQL relies on."""
    pt = "abc"
    envs, sql_parts = [], []
    for backend in range(2):
        with cl.connect() as c:
            c.execute("SELECT set_config('app.tenant_id', 'nonce_a', false)")
            rows = c.execute(
                f"SELECT e, substring(e FROM {KEY_OFF + 1} FOR {KEY_LEN}), substring(e FROM {NONCE_OFF + 1} FOR {NONCE_LEN}),"
                " envelope.key_version(e), envelope.decrypt_field(e)"
                " FROM (SELECT envelope.encrypt_field(%s) AS e FROM generate_series(1, 3)) s", (pt,)).fetchall()
            for e, k, nonce, ver, dec in rows:
                e, k, nonce = bytes(e), bytes(k), bytes(nonce)
                assert dec == pt, "envelope does not decrypt"
                assert len(e) == OVERHEAD + len(pt), f"envelope length {len(e)}"
                assert e[0] == 0x03 and e[1] == 0x01, f"version/algorithm bytes {e[:2].hex()}"  # format v3
                assert int.from_bytes(e[2:6], "big") == ids["nonce_a"], "tenant key id at bytes 2..6"
                assert int.from_bytes(e[6:10], "big") == ver == 1, "DEK version at bytes 6..10"
                assert k == e[KEY_OFF:KEY_OFF + KEY_LEN] == key_bytes(ids["nonce_a"], 1)
                assert nonce == e[NONCE_OFF:NONCE_OFF + NONCE_LEN], "SQL nonce substring"
                envs.append((backend, e))
    commitments = {e[10:42] for _, e in envs}
    assert len(commitments) == 1, "commitment (bytes 10..42) must be constant for one DEK"
    prefixes = {b: {e[42:54] for bb, e in envs if bb == b} for b in range(2)}
    assert all(len(p) == 1 for p in prefixes.values()), "prefix (bytes 42..54) constant per backend"
    assert prefixes[0] != prefixes[1], "two backends drew the same prefix"
    suffixes = {e[54:66] for _, e in envs}
    assert len(suffixes) == len(envs), "suffix (bytes 54..66) fresh per value"
    # Ciphertext+tag start right after the nonce: equal plaintexts give different bytes there.
    assert len({e[66:] for _, e in envs}) == len(envs)
    return {"envelope_len": len(envs[0][1]), "nonce_sql": f"substring(e FROM {NONCE_OFF + 1} FOR {NONCE_LEN})",
            "key_sql": f"substring(e FROM {KEY_OFF + 1} FOR {KEY_LEN})", "envelopes_parsed": len(envs)}


def run_wave(cl, wave, rotate_cb):
    """Runs one wave: its backends connect together and encrypt concurrently (one thread each)."""
    backends = wave["backends"]
    barrier = threading.Barrier(len(backends) + 1) if wave["rotate"] else None
    errors = []

    def work(b):
        waited = False
        try:
            with cl.connect() as c:
                c.execute("SET synchronous_commit = off")
                info = c.execute("SELECT pg_backend_pid(), backend_start, pg_postmaster_start_time(), backend_type"
                                 " FROM pg_stat_activity WHERE pid = pg_backend_pid()").fetchone()
                c.execute("INSERT INTO backends VALUES (%s, %s, %s, %s, %s, %s, %s)",
                          (b["label"], wave["phase"], wave["wave"], *info))
                for i, (tenant, n) in enumerate(b["steps"]):
                    c.execute("SELECT set_config('app.tenant_id', %s, false)", (tenant,))
                    c.execute(INSERT, (b["label"], n))
                    if barrier and not waited:
                        barrier.wait(timeout=600)  # the rotation happens here
                        barrier.wait(timeout=600)
                        waited = True
                if barrier and not waited:
                    barrier.wait(timeout=600)
                    barrier.wait(timeout=600)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append((b["label"], repr(exc)))
            if barrier:
                barrier.abort()

    threads = [threading.Thread(target=work, args=(b,)) for b in backends]
    for t in threads:
        t.start()
    if barrier:
        try:
            barrier.wait(timeout=600)
            rotate_cb()
            barrier.wait(timeout=600)
        except threading.BrokenBarrierError:
            pass  # a backend failed: reported below
        except BaseException:
            barrier.abort()  # release the backends, then fail
            for t in threads:
                t.join()
            raise
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"backend errors: {errors[:3]}")


def churn_connections(cl, count):
    """Short-lived connections between the waves: the late wave's backends are forked after many
    other children of the same postmaster (and get pids far from the early wave's)."""
    for _ in range(count):
        with cl.connect() as c:
            c.execute("SELECT 1")


CHECK_SQL = {
    # One pass over (DEK, nonce): distinct nonces, groups that repeat, surplus rows.
    "nonces": """SELECT count(*), count(*) FILTER (WHERE c > 1), coalesce(sum(c - 1), 0)
                   FROM (SELECT count(*) AS c FROM {rel} GROUP BY key, nonce) g""",
    # Suffixes anywhere (any DEK, any prefix).
    "suffixes": """SELECT count(*) FILTER (WHERE c > 1)
                     FROM (SELECT count(*) AS c FROM {rel} GROUP BY substring(nonce FROM 13)) g""",
    # (DEK, process, prefix) summary: small, so the prefix checks are cheap.
    "prefixes": """SELECT key, backend, substring(nonce FOR 12) AS prefix, count(*) AS n
                     FROM {rel} GROUP BY 1, 2, 3""",
}


def check(c, rel):
    t0 = time.time()
    distinct, dup_groups, surplus = c.execute(CHECK_SQL["nonces"].format(rel=rel)).fetchone()
    (suffix_dups,) = c.execute(CHECK_SQL["suffixes"].format(rel=rel)).fetchone()
    c.execute("DROP TABLE IF EXISTS prefix_summary")
    c.execute("CREATE TEMP TABLE prefix_summary AS " + CHECK_SQL["prefixes"].format(rel=rel))
    (shared_prefixes,) = c.execute(
        "SELECT count(*) FROM (SELECT 1 FROM prefix_summary GROUP BY key, prefix HAVING count(DISTINCT backend) > 1) x").fetchone()
    per_key = {bytes(k).hex(): (n, p) for k, n, p in c.execute(
        "SELECT key, sum(n), count(DISTINCT prefix) FROM prefix_summary GROUP BY key ORDER BY key").fetchall()}
    multi_prefix = c.execute(
        "SELECT backend, key FROM prefix_summary WHERE backend > 0 GROUP BY 1, 2 HAVING count(*) <> 1").fetchall()
    return {"distinct_nonces": distinct, "duplicate_nonces": dup_groups, "duplicate_rows": int(surplus),
            "duplicate_suffixes": suffix_dups, "shared_prefixes": shared_prefixes,
            "backends_with_several_prefixes_per_key": len(multi_prefix),
            "per_key": {k: {"values": int(n), "prefixes": p} for k, (n, p) in per_key.items()},
            "check_seconds": round(time.time() - t0, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--encryptions", type=int, default=10_000_000, help="values encrypted by the client backends (default 10^7)")
    ap.add_argument("-b", "--backends", type=int, default=64, help="client backends (default 64)")
    ap.add_argument("-r", "--restarts", type=int, default=1, help="server restarts between phases (default 1)")
    ap.add_argument("--chunks", type=int, default=4, help="INSERT statements per backend under tenant A (default 4)")
    ap.add_argument("--b-share", type=int, default=16, help="odd backends put 1/B-SHARE of their quota under tenant B (0: none)")
    ap.add_argument("--reencrypt", type=int, default=None, help="values the maintenance worker re-encrypts (default min(n/50, 100000); 0: skip)")
    ap.add_argument("--churn", type=int, default=100, help="short-lived connections between early and late waves (default 100)")
    ap.add_argument("--late-delay", type=float, default=2.0, help="seconds between early and late waves (default 2)")
    ap.add_argument("--instance", default="pg15-nonce")
    ap.add_argument("--port", type=int, default=54341)
    ap.add_argument("--work-mem", default="1GB", help="work_mem for the duplicate counts (default 1GB)")
    ap.add_argument("--big", type=int, default=20_000_000,
                    help="above this many nonces: sort-based counts, control over one backend's rows (default 2*10^7)")
    ap.add_argument("--json", help="write the report here as JSON")
    ap.add_argument("--keep", action="store_true", help="leave the cluster running with its data (default: stop and remove it)")
    args = ap.parse_args(argv)
    if args.backends > 180:
        raise SystemExit("at most 180 backends (the cluster's max_connections is 200)")
    reenc_n = args.reencrypt if args.reencrypt is not None else min(args.encryptions // 50, 100_000)
    if args.restarts == 0:
        reenc_n = 0  # envelope.database takes effect at a restart

    plan = make_plan(args.encryptions, args.backends, args.restarts, args.chunks, args.b_share)
    cl = Cluster(args.instance, args.port)
    report = {"encryptions_requested": args.encryptions, "backends": args.backends, "restarts": args.restarts}
    t_start = time.time()
    ok = False
    try:
        log(f"fresh cluster {args.instance} on 127.0.0.1:{args.port}")
        cl.remove()
        cl.start()
        ids = setup_database(cl)
        report["tenant_ids"] = ids
        report["layout"] = verify_layout(cl, ids)
        log(f"envelope layout verified: {report['layout']}")
        versions = {"nonce_a": 1, "nonce_b": 1}
        expected = {}  # key hex -> values
        t_enc = time.time()

        def rotate():
            with cl.connect() as c:
                v = c.execute("SELECT envelope.rotate_data_key('nonce_a')").fetchone()[0]
            versions["nonce_a"] = v
            log(f"  rotated nonce_a's data key to version {v} (the wave's backends are connected)")

        reenc_written = False
        for i, wave in enumerate(plan):
            if i > 0 and wave["phase"] != plan[i - 1]["phase"]:
                if reenc_n and not reenc_written:
                    # Values for the worker to re-encrypt later; their first nonces are counted
                    # too (written by this short-lived backend, label -1).
                    with cl.connect() as c:
                        c.execute("SELECT set_config('app.tenant_id', 'nonce_a', false)")
                        c.execute("INSERT INTO reenc SELECT g, envelope.encrypt_field('r' || g) FROM generate_series(1, %s) g", (reenc_n,))
                        c.execute(f"INSERT INTO nonces SELECT substring(v FROM {KEY_OFF + 1} FOR {KEY_LEN}), -1,"
                                  f" substring(v FROM {NONCE_OFF + 1} FOR {NONCE_LEN}) FROM reenc")
                    k = key_bytes(ids["nonce_a"], versions["nonce_a"]).hex()
                    expected[k] = expected.get(k, 0) + reenc_n
                    reenc_written = True
                log("restarting the server")
                cl.restart()
            elif i > 0:
                time.sleep(args.late_delay)
                churn_connections(cl, args.churn)
            n_wave = sum(n for b in wave["backends"] for _, n in b["steps"])
            log(f"phase {wave['phase']} ({wave['wave']} wave): {len(wave['backends'])} backends, {n_wave:,} values"
                + (", DEK rotation after the first statement" if wave["rotate"] else ""))
            # Expected counts per DEK, from the plan.
            for b in wave["backends"]:
                for j, (tenant, n) in enumerate(b["steps"]):
                    v = versions[tenant] + (1 if wave["rotate"] and tenant == "nonce_a" and j > 0 else 0)
                    k = key_bytes(ids[tenant], v).hex()
                    expected[k] = expected.get(k, 0) + n
            t0 = time.time()
            run_wave(cl, wave, rotate)
            log(f"  done in {time.time() - t0:.1f} s")
        report["encryption_seconds"] = round(time.time() - t_enc, 1)

        if reenc_n:
            log(f"maintenance worker: re-encrypting {reenc_n:,} values under the rotated DEK")
            with cl.connect() as c:
                job = c.execute("SELECT envelope.queue_reencrypt('reenc', 'v')").fetchone()[0]
                deadline = time.time() + 600
                while True:
                    state, err = c.execute("SELECT state, last_error FROM envelope.reencrypt_progress WHERE job = %s", (job,)).fetchone()
                    if state not in ("queued", "running"):
                        break
                    if time.time() > deadline:
                        raise RuntimeError("the re-encryption job did not finish in 10 minutes")
                    time.sleep(0.5)
                if state != "done":
                    raise RuntimeError(f"re-encryption job {job}: {state} {err}")
                report["worker_backend_type"] = [r[0] for r in c.execute(
                    "SELECT DISTINCT backend_type FROM pg_stat_activity WHERE datname = current_database()"
                    " AND backend_type NOT IN ('client backend')").fetchall()]
                wk = c.execute("SELECT count(*), min(envelope.key_version(v)), max(envelope.key_version(v)) FROM reenc").fetchone()
                if wk != (reenc_n, versions["nonce_a"], versions["nonce_a"]):
                    raise RuntimeError(f"re-encryption left {wk}")
                # The worker's nonces (label 0): one process, one prefix per DEK.
                c.execute(f"INSERT INTO nonces SELECT substring(v FROM {KEY_OFF + 1} FOR {KEY_LEN}), 0,"
                          f" substring(v FROM {NONCE_OFF + 1} FOR {NONCE_LEN}) FROM reenc")
                k = key_bytes(ids["nonce_a"], versions["nonce_a"]).hex()
                expected[k] = expected.get(k, 0) + reenc_n
            log("  done")

        log("counting (GROUP BY over every nonce)")
        with cl.connect() as c:
            c.execute(f"SET work_mem = '{args.work_mem}'")
            c.execute("SET max_parallel_workers_per_gather = 2")
            total = c.execute("SELECT count(*) FROM nonces").fetchone()[0]
            big = total > args.big
            if big:
                # Hash aggregates over 10^8 groups spill and re-spill; sorts scale better.
                c.execute("SET enable_hashagg = off")
            res = check(c, "nonces")
            bk = c.execute("SELECT count(*), count(DISTINCT pid), count(DISTINCT (pid, postmaster_start)),"
                           " count(DISTINCT postmaster_start), count(DISTINCT backend_type),"
                           " min(backend_type), max(backend_start) - min(backend_start) FROM backends").fetchone()
            # Positive control: the same queries over the nonces plus (1) a copy of one row under
            # another process label: a duplicate, and (2) the same nonce under another DEK: not one.
            # Above --big rows, the control runs the same SQL over one backend's rows (plus the
            # two extra rows) instead of every row, to save two passes over the table.
            c.execute("CREATE TEMP VIEW nonces_control AS"
                      " WITH one AS MATERIALIZED (SELECT key, nonce FROM nonces WHERE backend = 1 LIMIT 1)"
                      f" SELECT * FROM nonces {'WHERE backend = 1' if big else ''}"
                      " UNION ALL SELECT key, -2, nonce FROM one"
                      " UNION ALL SELECT '\\xffffffff00000001'::bytea, -3, nonce FROM one")
            ctl = check(c, "nonces_control")
        per_key_expected = {k: v for k, v in sorted(expected.items())}
        report.update({
            "encryptions": total,
            "client_encryptions": args.encryptions + reenc_n,
            "worker_reencryptions": reenc_n,
            "postmaster_starts": bk[3],
            "client_backends": bk[0], "distinct_pids": bk[1], "pids_reused_after_a_restart": bk[2] - bk[1],
            "backend_types": bk[4], "backend_type": bk[5], "backend_start_spread": str(bk[6]),
            **res,
            "expected_per_key": per_key_expected,
            "control": {k: ctl[k] for k in ("duplicate_nonces", "duplicate_rows", "duplicate_suffixes", "shared_prefixes")},
            "control_rows": "one backend's" if big else "all",
        })
        problems = []
        if total != sum(expected.values()):
            problems.append(f"{total} nonces stored, {sum(expected.values())} expected")
        if {k: v["values"] for k, v in res["per_key"].items()} != per_key_expected:
            problems.append(f"per-key counts {res['per_key']} != expected {per_key_expected}")
        if res["duplicate_nonces"] or res["duplicate_rows"]:
            problems.append(f"{res['duplicate_nonces']} nonces repeat under one DEK")
        if res["shared_prefixes"]:
            problems.append(f"{res['shared_prefixes']} prefixes used by more than one process under one DEK")
        if res["backends_with_several_prefixes_per_key"]:
            problems.append(f"{res['backends_with_several_prefixes_per_key']} backends used several prefixes under one DEK")
        if res["duplicate_suffixes"]:
            problems.append(f"{res['duplicate_suffixes']} suffixes repeat")
        if bk[0] != args.backends or bk[2] != args.backends:  # one process per backend
            problems.append(f"backends: {bk}")
        if bk[3] != args.restarts + 1:
            problems.append(f"{bk[3]} postmaster start times for {args.restarts} restarts")
        if bk[4] != 1 or bk[5] != "client backend":
            problems.append(f"backend types: {bk[4:6]}")
        want_ctl = {"duplicate_nonces": 1, "duplicate_rows": 1, "duplicate_suffixes": 1, "shared_prefixes": 1}
        if report["control"] != want_ctl:
            problems.append(f"positive control: {report['control']} != {want_ctl}")
        report["problems"] = problems
        ok = not problems
    finally:
        report["wall_seconds"] = round(time.time() - t_start, 1)
        if args.keep:
            log(f"cluster left running: psql -h {SOCK} -p {args.port} -U postgres {DB}")
        else:
            try:
                cl.remove()
            except Exception as exc:  # noqa: BLE001
                log(f"cleanup failed: {exc}")
    report["ok"] = ok
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    summary = {k: report.get(k) for k in (
        "encryptions", "client_encryptions", "worker_reencryptions", "backends", "restarts", "postmaster_starts", "distinct_nonces",
        "duplicate_nonces", "shared_prefixes", "duplicate_suffixes", "encryption_seconds", "check_seconds",
        "wall_seconds")}
    print(json.dumps({**summary, "per_key": report.get("per_key"), "control": report.get("control"),
                      "problems": report.get("problems"), "ok": ok}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
