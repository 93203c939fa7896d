"""Key lifecycle under failure, load and misuse, against the project's cluster (54315).

What a user of rotation and re-encryption would notice:

* `CALL envelope.reencrypt` interrupted by kill -9 of its backend and by an immediate shutdown
  of the cluster resumes with the same job, loses and changes no value, and leaves every value
  under the active data key version;
* an application updating and inserting rows meanwhile loses no update; the job's passes catch
  rows that concurrent updates moved behind it (and a rotation in the middle of the job);
* a batch holds nothing stronger than ROW EXCLUSIVE on the table (VACUUM, ANALYZE, CREATE INDEX
  CONCURRENTLY are not blocked);
* a REPEATABLE READ reader keeps decrypting across `rotate_data_key`; a backend that cached the
  old version writes with the new one at its next call;
* a KMS that stops in the middle of `rotate_tenant_key` or `CALL envelope.rewrap_tenants` leaves
  the old keys working; after a restart the same job resumes and completes;
* root key rotation end to end with OpenBao (`transit/keys/<key>/rotate`, rewrap,
  `min_decryption_version`) and with AWS KMS (moto: a new key, `key_id` changed, rewrap);
* the maintenance worker rotates on its own, runs queued jobs, survives SIGTERM and kill -9;
* bad input and missing privileges get their SQLSTATEs.

OpenBao (raft storage, so that keys survive a stop) and moto run here as private instances on
their own ports (8230, 5075), started and stopped by pid, so that other test modules' servers
(scripts/kms.sh on 8200/8210/5055) are never disturbed. Crash tests restart every backend of the
cluster (that is what PostgreSQL does after a backend is killed): run this module alone.

Databases are named lc_*; the worker tests use the `postgres` database (the worker's, by
`envelope.database`) and drop the extension there again.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from conftest import BIN, PORT_A, ROOT, STATE, as_tenant, connect, recreate_db, sh

INSTANCE = os.environ.get("PGE_INSTANCE", "pg15")
PGDATA = STATE / INSTANCE / "data"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def sqlstate(conn, query, params=None):
    """(SQLSTATE, message) of a statement that is expected to fail; (None, '') if it succeeds."""
    try:
        conn.execute(query, params)
        return None, ""
    except psycopg.Error as e:
        return e.sqlstate, str(e)


def wait_until(pred, timeout, step=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def server_accepts(db="postgres"):
    try:
        with connect(PORT_A, db, connect_timeout=2) as c:
            return c.execute("SELECT NOT pg_is_in_recovery()").fetchone()[0]
    except psycopg.Error:
        return False


def wait_for_server(timeout=90):
    """Until the cluster accepts connections again (after a crash restart or a start)."""
    wait_until(server_accepts, timeout, step=0.2, what="the server to accept connections")


def ensure_cluster_running():
    if not server_accepts():
        sh("bash", str(ROOT / "scripts/cluster.sh"), "start")
        wait_for_server()


def make_db(name, tenants=("acme", "globex")):
    recreate_db(PORT_A, name)
    with connect(PORT_A, name) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        for t in tenants:
            c.execute("SELECT envelope.create_tenant(%s)", (t,))
            c.execute("SELECT envelope.grant_tenant(%s, current_user)", (t,))
    return name


def create_table(conn, table, fillfactor=100):
    conn.execute(
        f"CREATE TABLE {table} (id bigint PRIMARY KEY, tenant text NOT NULL, v envelope.encrypted_text, "
        f"n integer NOT NULL DEFAULT 0) WITH (fillfactor = {fillfactor})"
    )


def fill(conn, table, tenants, rows_per_tenant, start=0, value="'val-' || i || '-' || md5(i::text)"):
    """rows_per_tenant rows per tenant, ids interleaved across tenants (id % len(tenants))."""
    k = len(tenants)
    for j, t in enumerate(tenants):
        with as_tenant(conn, t):
            conn.execute(
                f"INSERT INTO {table} (id, tenant, v) SELECT i, %s, ({value})::text "
                f"FROM generate_series(%s::bigint, %s::bigint) i WHERE i %% {k} = {j}",
                (t, start, start + rows_per_tenant * k - 1),
            )


def digest(db, table, tenants):
    """md5 over every (id, plaintext) of the table, decrypted tenant by tenant, and the row count."""
    h = hashlib.md5()
    n = 0
    with connect(PORT_A, db) as c:
        for t in sorted(tenants):
            with as_tenant(c, t):
                for rid, val in c.execute(f"SELECT id, v::text FROM {table} WHERE tenant = %s ORDER BY id", (t,)):
                    h.update(f"{t}|{rid}|{val}\n".encode())
                    n += 1
    return h.hexdigest(), n


def active_versions(conn):
    return dict(conn.execute("SELECT tenant, version FROM envelope.key_versions WHERE state = 'active'").fetchall())


def column_versions(conn, table, col="v"):
    """{(tenant, version, state): values} from envelope.column_key_versions."""
    return {
        (t, v, s): n
        for t, _tid, v, s, n in conn.execute("SELECT * FROM envelope.column_key_versions(%s, %s)", (table, col)).fetchall()
    }


def assert_all_under_active(conn, table, expected_total, col="v"):
    cv = column_versions(conn, table, col)
    active = active_versions(conn)
    assert sum(cv.values()) == expected_total, cv
    stale = {k: n for k, n in cv.items() if k[2] != "active" or active.get(k[0]) != k[1]}
    assert not stale, f"values left under old versions: {stale} (active: {active})"


def reencrypt_jobs(conn, table):
    return conn.execute(
        "SELECT id, state, values_done, values_remaining, pass, batches FROM envelope.reencrypt_jobs "
        "WHERE table_name = %s ORDER BY id",
        (table,),
    ).fetchall()


class Background:
    """A statement run in its own connection on a thread; its backend pid is known before it
    starts. Notices are kept."""

    def __init__(self, db, sql, params=None, setup=()):
        self.conn = connect(PORT_A, db)
        self.notices = []
        self.conn.add_notice_handler(lambda d: self.notices.append(d.message_primary or ""))
        for s in setup:
            self.conn.execute(s)
        self.pid = self.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        self.error = None
        self.done = False
        self.t0 = time.monotonic()
        self.elapsed = None

        def run():
            try:
                self.conn.execute(sql, params)
            except Exception as e:  # noqa: BLE001 - examined by the test
                self.error = e
            finally:
                self.elapsed = time.monotonic() - self.t0
                self.done = True

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout=120):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "background statement did not finish"
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - the connection may be gone (crash tests)
            pass
        return self


def progress(db, table):
    with connect(PORT_A, db) as c:
        return c.execute(
            "SELECT job, state, values_done, batches FROM envelope.reencrypt_progress WHERE table_name = %s ORDER BY job DESC LIMIT 1",
            (table,),
        ).fetchone()


def pg_ctl(*args):
    return sh("sudo", "-u", "postgres", "-H", "--", f"{BIN}/pg_ctl", "-D", str(PGDATA), *args)


# --------------------------------------------------------------------------------------------
# 1, 2. Re-encryption interrupted by a crash: kill -9 of its backend; immediate shutdown.
# --------------------------------------------------------------------------------------------

CRASH_TENANTS = ("acme", "globex")
CRASH_ROWS_PER_TENANT = 10_000


def crash_setup(db):
    make_db(db, CRASH_TENANTS)
    with connect(PORT_A, db) as c:
        create_table(c, "t")
        fill(c, "t", CRASH_TENANTS, CRASH_ROWS_PER_TENANT)
        c.execute("VACUUM ANALYZE t")
        for t in CRASH_TENANTS:
            c.execute("SELECT envelope.rotate_data_key(%s)", (t,))
        old = column_versions(c, "t")
        assert sum(old.values()) == 2 * CRASH_ROWS_PER_TENANT and all(s == "retired" for _t, _v, s in old), old
    return digest(db, "t", CRASH_TENANTS)


def interrupted_reencrypt(db, interrupt):
    """Starts a slow re-encryption, lets it commit a few batches, calls interrupt(pid), waits for
    the server, then resumes with a second CALL and checks everything."""
    total = 2 * CRASH_ROWS_PER_TENANT
    before = crash_setup(db)
    bg = Background(db, "CALL envelope.reencrypt('t', 'v', batch_rows => 1000, pause => '50ms')")
    wait_until(lambda: (p := progress(db, "public.t")) and p[3] >= 4, 60, what="4 committed batches")
    # Interrupt while a batch is in flight (not in the pause between batches): its UPDATE must
    # roll back and be done again, counted once.
    mon = connect(PORT_A, db)
    wait_until(
        lambda: mon.execute(
            "SELECT wait_event IS DISTINCT FROM 'PgSleep' FROM pg_stat_activity WHERE pid = %s", (bg.pid,)
        ).fetchone()[0],
        30,
        step=0.002,
        what="a batch in flight",
    )
    interrupt(bg.pid)
    mon.close()
    bg.join()
    assert bg.error is not None, "the CALL was not interrupted"
    wait_for_server()
    with connect(PORT_A, db) as c:
        (job, state, done_at_crash, _rem, _pass, batches_at_crash), = reencrypt_jobs(c, "public.t")
    # The committed batches survived the crash; the batch in flight (if any) did not count.
    assert state == "running" and 0 < done_at_crash < total, (state, done_at_crash)
    print(f"interrupted at {done_at_crash} of {total} values, {batches_at_crash} batches")
    with connect(PORT_A, db) as c:
        notices = []
        c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        c.execute("CALL envelope.reencrypt('t', 'v', batch_rows => 1000)")
        assert any(f"resuming re-encryption job {job} " in m for m in notices), notices[:3]
        jobs = reencrypt_jobs(c, "public.t")
        # One job, resumed: every value re-encrypted exactly once over the two calls.
        assert [(j[0], j[1], j[2], j[3]) for j in jobs] == [(job, "done", total, 0)], jobs
        assert jobs[0][5] > batches_at_crash
        assert_all_under_active(c, "t", total)
        # Values written under version 1 are gone: a stricter check than the view (header scan).
        assert c.execute("SELECT count(*) FROM t WHERE envelope.key_version(v) = 1").fetchone()[0] == 0
    assert digest(db, "t", CRASH_TENANTS) == before


def test_reencrypt_resumes_after_kill_9_of_its_backend():
    def kill9(pid):
        os.kill(pid, signal.SIGKILL)
        # The postmaster notices, terminates every backend and reinitializes: wait until it
        # refused or dropped connections at least once, so that wait_for_server() below waits
        # for the restarted server rather than seeing the old one.
        time.sleep(0.5)

    try:
        interrupted_reencrypt("lc_crash_kill", kill9)
    finally:
        ensure_cluster_running()


def test_reencrypt_resumes_after_immediate_shutdown():
    def immediate_stop(_pid):
        pg_ctl("-m", "immediate", "-w", "stop")
        assert not server_accepts()
        sh("bash", str(ROOT / "scripts/cluster.sh"), "start")

    try:
        interrupted_reencrypt("lc_crash_immediate", immediate_stop)
    finally:
        ensure_cluster_running()
