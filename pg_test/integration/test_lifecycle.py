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
* the maintenance worker rotates on its own, runs queued jobs, stops promptly at SIGTERM and
  is restarted, comes back after kill -9, and a lower naptime applies to the nap in progress;
* an AWS KMS root rotation to a new key: tenants not yet rewrapped open through
  `previous_key_ids` (and fail closed without it);
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
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest

from conftest import BIN, PORT_A, ROOT, STATE, as_tenant, connect, recreate_db, row_or_sqlstate, sh

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
        next_block = c.execute("SELECT next_block FROM envelope.reencrypt_jobs WHERE id = %s", (job,)).fetchone()[0]
    # The committed batches survived the crash; the batch in flight (if any) did not count.
    assert state == "running" and 0 < done_at_crash < total and next_block > 0, (state, done_at_crash, next_block)
    print(f"interrupted at {done_at_crash} of {total} values, {batches_at_crash} batches")
    with connect(PORT_A, db) as c:
        notices = []
        c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        c.execute("CALL envelope.reencrypt('t', 'v', batch_rows => 1000)")
        # The same job, from the block after the last committed batch (not from the start).
        assert any(f"resuming re-encryption job {job} " in m and m.endswith(f" at block {next_block}") for m in notices), notices[:3]
        jobs = reencrypt_jobs(c, "public.t")
        # One job, resumed: every value re-encrypted exactly once over the two calls.
        assert [(j[0], j[1], j[2], j[3]) for j in jobs] == [(job, "done", total, 0)], jobs
        assert jobs[0][5] > batches_at_crash
        assert_all_under_active(c, "t", total)
        # Values written under version 1 are gone: a stricter check than the view (header scan).
        assert c.execute("SELECT count(*) FROM t WHERE envelope.key_version(v) = 1").fetchone()[0] == 0
    assert digest(db, "t", CRASH_TENANTS) == before
    return bg.error


def test_reencrypt_resumes_after_kill_9_of_its_backend():
    def kill9(pid):
        os.kill(pid, signal.SIGKILL)
        # The postmaster notices, terminates every backend and reinitializes: wait until it
        # refused or dropped connections at least once, so that wait_for_server() below waits
        # for the restarted server rather than seeing the old one.
        time.sleep(0.5)

    try:
        error = interrupted_reencrypt("lc_crash_kill", kill9)
        assert isinstance(error, psycopg.OperationalError), error  # the connection was lost
    finally:
        ensure_cluster_running()


def test_reencrypt_resumes_after_pg_cancel_backend():
    def cancel(pid):
        with connect(PORT_A) as c:
            assert c.execute("SELECT pg_cancel_backend(%s)", (pid,)).fetchone()[0] is True

    error = interrupted_reencrypt("lc_crash_cancel", cancel)
    assert isinstance(error, psycopg.errors.QueryCanceled), error


def test_reencrypt_resumes_after_immediate_shutdown():
    def immediate_stop(_pid):
        pg_ctl("-m", "immediate", "-w", "stop")
        assert not server_accepts()
        sh("bash", str(ROOT / "scripts/cluster.sh"), "start")

    try:
        error = interrupted_reencrypt("lc_crash_immediate", immediate_stop)
        assert isinstance(error, psycopg.OperationalError), error
    finally:
        ensure_cluster_running()


# --------------------------------------------------------------------------------------------
# 3. An application writing while the column is re-encrypted: no lost or reverted update.
# --------------------------------------------------------------------------------------------

APP_TENANTS = ("acme", "globex")


def tenant_of(rid):
    return APP_TENANTS[rid % 2]


class Workload:
    """Application sessions, each in its own connection, committing one row per transaction:
    three updaters of the encrypted column (each owns the ids with id % 3 == k and remembers
    the last value it committed per row), one updater of a plain column (remembers how many
    increments it committed per row), one inserter. Until stop()."""

    def __init__(self, db, ids, first_new_id):
        self.db = db
        self.ids = ids
        self.stop_flag = threading.Event()
        self.errors = []
        self.last = {}  # id -> last committed plaintext of v
        self.incs = {}  # id -> committed increments of n
        self.inserted = {}  # id -> plaintext
        self.commit_times = []
        self.next_id = first_new_id
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._updater, args=(k,), daemon=True) for k in range(3)]
        self.threads += [threading.Thread(target=self._incrementer, daemon=True), threading.Thread(target=self._inserter, daemon=True)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads)

    def _loop(self, body):
        rng = random.Random()
        try:
            with connect(PORT_A, self.db) as c:
                i = 0
                while not self.stop_flag.is_set():
                    body(c, rng, i)
                    with self.lock:
                        self.commit_times.append(time.monotonic())
                    i += 1
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(e)

    def _updater(self, k):
        mine = [i for i in self.ids if i % 3 == k]

        def body(c, rng, i):
            rid = rng.choice(mine)
            val = f"row {rid} writer {k} update {i}"
            with as_tenant(c, tenant_of(rid)):
                n = c.execute("UPDATE app SET v = %s WHERE id = %s", (val, rid), prepare=True).rowcount
            assert n == 1
            self.last[rid] = val  # after the commit: the value a user was told is saved

        self._loop(body)

    def _incrementer(self):
        def body(c, rng, _i):
            rid = rng.choice(self.ids)
            n = c.execute("UPDATE app SET n = n + 1 WHERE id = %s", (rid,), prepare=True).rowcount
            assert n == 1
            self.incs[rid] = self.incs.get(rid, 0) + 1

        self._loop(body)

    def _inserter(self):
        def body(c, _rng, i):
            rid = self.next_id + i
            val = f"inserted {rid}"
            with as_tenant(c, tenant_of(rid)):
                c.execute("INSERT INTO app (id, tenant, v) VALUES (%s, %s, %s)", (rid, tenant_of(rid), val), prepare=True)
            self.inserted[rid] = val

        self._loop(body)


def test_application_writes_during_reencrypt_are_never_lost():
    db = make_db("lc_workload", APP_TENANTS)
    rows_per_tenant = 6000
    with connect(PORT_A, db) as c:
        create_table(c, "app")
        fill(c, "app", APP_TENANTS, rows_per_tenant, value="'initial ' || i")
        c.execute("VACUUM ANALYZE app")
        for t in APP_TENANTS:
            c.execute("SELECT envelope.rotate_data_key(%s)", (t,))
    ids = list(range(2 * rows_per_tenant))
    wl = Workload(db, ids, first_new_id=1_000_000).start()
    notices = []
    try:
        wait_until(lambda: len(wl.commit_times) >= 100, 30, what="the workload to run")
        with connect(PORT_A, db) as c, connect(PORT_A, db) as admin:
            c.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.message_primary or "")))
            rotated_midway = {}

            def rotate_midway():
                # A rotation of one tenant while the job runs: what the job re-encrypted before it
                # is under an old version again, and only a further pass can catch it.
                wait_until(lambda: (p := progress(db, "public.app")) and p[3] >= 10, 60, what="10 batches")
                rotated_midway["version"] = admin.execute("SELECT envelope.rotate_data_key('acme')").fetchone()[0]

            rot = threading.Thread(target=rotate_midway, daemon=True)
            rot.start()
            t0 = time.monotonic()
            c.execute("CALL envelope.reencrypt('app', 'v', batch_rows => 400, pause => '20ms')")
            t1 = time.monotonic()
            rot.join(10)
            assert rotated_midway.get("version") == 3, rotated_midway
    finally:
        wl.stop()
    assert not wl.errors, wl.errors[:3]
    during = sum(1 for t in wl.commit_times if t0 <= t <= t1)
    assert during >= 100, f"only {during} application commits overlapped the re-encryption"
    with connect(PORT_A, db) as c:
        (job, state, done, remaining, passes, batches), = reencrypt_jobs(c, "public.app")
        assert state == "done" and passes >= 2, (state, passes)
        # The job's last count is an upper bound of what is left now: the only writers since wrote
        # under the active versions.
        old_now = sum(n for (t, v, _s), n in column_versions(c, "app").items() if active_versions(c)[t] != v)
        assert old_now <= remaining, (old_now, remaining)
        if remaining:
            assert any(sev == "WARNING" and "still under old versions" in m for sev, m in notices), notices[-3:]
            c.execute("CALL envelope.reencrypt('app', 'v')")
        total = 2 * rows_per_tenant + len(wl.inserted)
        assert_all_under_active(c, "app", total)
        # Every row holds what its writer last committed.
        got = {}
        for t in APP_TENANTS:
            with as_tenant(c, t):
                got.update({rid: (val, n) for rid, val, n in c.execute("SELECT id, v::text, n FROM app WHERE tenant = %s", (t,))})
    assert len(got) == total
    wrong = []
    for rid in ids:
        want = (wl.last.get(rid, f"initial {rid}"), wl.incs.get(rid, 0))
        if got[rid] != want:
            wrong.append((rid, got[rid], want))
    for rid, val in wl.inserted.items():
        if got[rid] != (val, 0):
            wrong.append((rid, got[rid], (val, 0)))
    assert not wrong, f"{len(wrong)} rows differ from their last committed write, e.g. {wrong[:5]}"
    print(f"workload: {len(wl.commit_times)} commits ({during} during the job), {len(wl.last)} rows updated, "
          f"{len(wl.inserted)} inserted; job {job}: {done} values in {batches} batches, {passes} passes, remaining {remaining}")


# --------------------------------------------------------------------------------------------
# 4. Locks: nothing stronger than ROW EXCLUSIVE on the table while batches run.
# --------------------------------------------------------------------------------------------

LOCK_STRENGTH = [
    "AccessShareLock", "RowShareLock", "RowExclusiveLock", "ShareUpdateExclusiveLock",
    "ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock",
]


def test_reencrypt_batches_hold_at_most_row_exclusive_lock():
    db = make_db("lc_locks", ("acme",))
    with connect(PORT_A, db) as c:
        create_table(c, "lk")
        fill(c, "lk", ("acme",), 40_000)
        c.execute("VACUUM ANALYZE lk")
        c.execute("SELECT envelope.rotate_data_key('acme')")
        relid = c.execute("SELECT 'lk'::regclass::oid").fetchone()[0]
    bg = Background(db, "CALL envelope.reencrypt('lk', 'v', batch_rows => 4000, pause => '30ms')")
    seen = {}  # relation -> set of modes held by the re-encrypting backend
    samples = 0
    probes = []  # (ok, seconds) of SHARE UPDATE EXCLUSIVE NOWAIT attempts (what VACUUM takes)
    app_updates = []
    with connect(PORT_A, db) as mon, connect(PORT_A, db) as other:
        while not bg.done:
            for rel, mode in mon.execute(
                "SELECT coalesce(relation::regclass::text, relation::text), mode FROM pg_locks "
                "WHERE pid = %s AND locktype = 'relation' AND granted", (bg.pid,)
            ):
                seen.setdefault(rel, set()).add(mode)
            samples += 1
            if samples % 20 == 0:
                # Another session takes SHARE UPDATE EXCLUSIVE (VACUUM, ANALYZE, CREATE INDEX
                # CONCURRENTLY) without waiting, and an application UPDATE of one row goes through.
                t0 = time.monotonic()
                try:
                    with other.transaction():
                        other.execute("SET LOCAL lock_timeout = '1s'")
                        other.execute("LOCK TABLE lk IN SHARE UPDATE EXCLUSIVE MODE NOWAIT")
                    probes.append((True, time.monotonic() - t0))
                except psycopg.errors.LockNotAvailable:
                    probes.append((False, time.monotonic() - t0))
                t0 = time.monotonic()
                with as_tenant(other, "acme"):
                    other.execute("SET LOCAL lock_timeout = '5s'")
                    other.execute("UPDATE lk SET n = n + 1 WHERE id = %s", (random.randrange(40_000),))
                app_updates.append(time.monotonic() - t0)
    bg.join()
    assert bg.error is None, bg.error
    assert "RowExclusiveLock" in seen.get("lk", set()), f"no batch sampled ({samples} samples): {seen}"
    strongest = {rel: max(modes, key=LOCK_STRENGTH.index) for rel, modes in seen.items()}
    too_strong = {rel: m for rel, m in strongest.items() if LOCK_STRENGTH.index(m) > LOCK_STRENGTH.index("RowExclusiveLock")}
    assert not too_strong, too_strong
    assert probes and all(ok for ok, _ in probes), probes
    assert max(app_updates) < 1.0, max(app_updates)
    with connect(PORT_A, db) as c:
        assert_all_under_active(c, "lk", 40_000)
    print(f"locks: {samples} samples, strongest per relation {strongest}, {len(probes)} probes, "
          f"slowest app update {max(app_updates) * 1000:.0f} ms, relid {relid}")


# --------------------------------------------------------------------------------------------
# 5. rotate_data_key under a long REPEATABLE READ reader and a backend with the old key cached.
# --------------------------------------------------------------------------------------------


def test_rotation_under_repeatable_read_reader_and_cached_writer():
    db = make_db("lc_rotate_rr", ("acme",))
    with connect(PORT_A, db) as c:
        create_table(c, "r")
        fill(c, "r", ("acme",), 200, value="'before ' || i")
    expected = [f"before {i}" for i in range(200)]
    reader = connect(PORT_A, db)
    writer = connect(PORT_A, db)
    try:
        reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        reader.execute("SELECT set_config('app.tenant_id', 'acme', true)")
        assert [v for (v,) in reader.execute("SELECT v::text FROM r ORDER BY id")] == expected
        writer.execute("SET app.tenant_id = 'acme'")
        writer.execute("INSERT INTO r (id, tenant, v) VALUES (1000, 'acme', 'cached v1'::text)")
        assert writer.execute("SELECT envelope.key_version(v) FROM r WHERE id = 1000").fetchone()[0] == 1
        with connect(PORT_A, db) as admin:
            assert admin.execute("SELECT envelope.rotate_data_key('acme')").fetchone()[0] == 2
            admin.execute("SET app.tenant_id = 'acme'")
            after = admin.execute("SELECT envelope.encrypt_field('written after the rotation')").fetchone()[0]
        # The reader's snapshot is from before the rotation: its rows (version 1) still decrypt.
        assert [v for (v,) in reader.execute("SELECT v::text FROM r WHERE id < 1000 ORDER BY id")] == expected
        assert reader.execute("SELECT count(*) FROM r WHERE envelope.key_version(v) = 1").fetchone()[0] == 200
        # A value under the new version, handed to it by the application, decrypts too.
        assert reader.execute("SELECT envelope.key_version(%s::bytea), envelope.decrypt_field(%s::bytea)", (after, after)).fetchone() == (
            2, "written after the rotation")
        # The writer, which had version 1 cached, writes its next value under version 2.
        writer.execute("INSERT INTO r (id, tenant, v) VALUES (1001, 'acme', 'after rotation'::text)")
        assert writer.execute("SELECT envelope.key_version(v) FROM r WHERE id = 1001").fetchone()[0] == 2
        assert writer.execute("SELECT envelope.key_version(envelope.encrypt_field('x'))").fetchone()[0] == 2
        # Both of its values decrypt.
        assert writer.execute("SELECT string_agg(v::text, '|' ORDER BY id) FROM r WHERE id >= 1000").fetchone()[0] == "cached v1|after rotation"
        reader.execute("COMMIT")
        # After its transaction, the reader sees and decrypts both versions.
        reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        reader.execute("SELECT set_config('app.tenant_id', 'acme', true)")
        assert reader.execute(
            "SELECT envelope.key_version(v), count(*), count(v::text) FROM r GROUP BY 1 ORDER BY 1"
        ).fetchall() == [(1, 201, 201), (2, 1, 1)]
        reader.execute("COMMIT")
        with connect(PORT_A, db) as c:
            assert c.execute("SELECT version, state FROM envelope.key_versions WHERE tenant = 'acme' ORDER BY version").fetchall() == [
                (1, "retired"), (2, "active")]
    finally:
        reader.close()
        writer.close()


def test_key_load_reads_one_state_when_a_tenant_key_rotation_commits_midway():
    """A backend loading a tenant's keys reads the tenant row (the wrapped tenant key) and the
    data keys (wrapped under it). A `rotate_tenant_key` that commits between the two reads must
    not pair the old tenant key with the new wrappings ("stored keys ... are damaged", seen in
    the soak test). Made deterministic with a lock: the rotating session holds ACCESS EXCLUSIVE
    on envelope.data_keys, so the loading backend reads the tenant row and then waits on the
    data keys while the rotation commits."""
    db = make_db("lc_rotate_midload", ("acme",))
    with connect(PORT_A, db) as c:
        c.execute("SET app.tenant_id = 'acme'")
        value = c.execute("SELECT envelope.encrypt_field('read across a tenant key rotation')").fetchone()[0]
    admin = connect(PORT_A, db)
    loader = connect(PORT_A, db)  # a new backend: nothing cached
    try:
        loader.execute("SET app.tenant_id = 'acme'")
        loader_pid = loader.info.backend_pid
        admin.execute("BEGIN")
        admin.execute("LOCK TABLE envelope.data_keys IN ACCESS EXCLUSIVE MODE")
        result = {}

        def load():
            try:
                result["value"] = loader.execute("SELECT envelope.decrypt_field(%s::bytea)", (value,)).fetchone()[0]
            except psycopg.Error as e:
                result["error"] = (e.sqlstate, str(e))

        t = threading.Thread(target=load)
        t.start()
        with connect(PORT_A, db) as watch:
            # The loader has read the tenant row and waits for the data keys.
            wait_until(lambda: watch.execute(
                "SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted AND relation = 'envelope.data_keys'::regclass",
                (loader_pid,)).fetchone()[0] == 1, 20, what="the loader to wait on envelope.data_keys")
            assert watch.execute(
                "SELECT count(*) FROM pg_locks WHERE pid = %s AND granted AND relation = 'envelope.tenants'::regclass",
                (loader_pid,)).fetchone()[0] == 1, "the loader has not read the tenant row yet: the test proves nothing"
        assert admin.execute("SELECT envelope.rotate_tenant_key('acme')").fetchone()[0] == 2
        admin.execute("COMMIT")
        t.join(30)
        assert not t.is_alive()
        assert result == {"value": "read across a tenant key rotation"}
        # Its next call loads the rotated keys and reads the value again; new values are written.
        assert loader.execute("SELECT envelope.decrypt_field(%s::bytea)", (value,)).fetchone()[0] == "read across a tenant key rotation"
        assert loader.execute("SELECT envelope.decrypt_field(envelope.encrypt_field('after'))").fetchone()[0] == "after"
    finally:
        if admin.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            admin.execute("ROLLBACK")
        admin.close()
        loader.close()


def test_rotate_tenant_key_under_repeatable_read_never_strands_a_key():
    """Insider review 36: rotate_tenant_key reads the keys to re-wrap under a fresh snapshot but
    stores them under the transaction's. Under REPEATABLE READ or SERIALIZABLE, a blind-index key
    created (a tenant's first: every tenant updated from 0.1.0 has none) after the transaction
    began was read, re-wrapped, and its UPDATE matched nothing: the rotation committed and left
    the key under the overwritten tenant key, and every use of the tenant failed with XX001.
    Now such a rotation fails with 40001 and changes nothing; under READ COMMITTED it rotates."""
    for iso, expected in (("repeatable read", "40001"), ("serializable", "40001"), ("read committed", 2)):
        db = make_db("lc_rotate_rr_index", ("legacy",))
        with connect(PORT_A, db) as c:
            c.execute("SET app.tenant_id = 'legacy'")
            value = c.execute("SELECT envelope.encrypt_field('legacy secret')").fetchone()[0]
            c.execute("DELETE FROM envelope.index_keys")  # as a tenant made by 0.1.0: no index key yet
        a, b = connect(PORT_A, db), connect(PORT_A, db)
        try:
            a.execute(f"SET default_transaction_isolation = '{iso}'")
            b.execute("BEGIN")
            assert b.execute("SELECT envelope.rotate_index_key('legacy')").fetchone()[0] == 1
            out = {}

            def rotate():
                try:
                    out["r"] = a.execute("SELECT envelope.rotate_tenant_key('legacy')").fetchone()[0]
                except psycopg.Error as e:
                    out["r"] = e.sqlstate

            t = threading.Thread(target=rotate)
            t.start()
            with connect(PORT_A, db) as w:
                # A has its snapshot and waits for the tenant's row lock, which B holds.
                wait_until(lambda: w.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
                                             (a.info.backend_pid,)).fetchone()[0] == 1, 20, what="the rotation to wait for the tenant's lock")
            b.execute("COMMIT")
            t.join(30)
            assert out["r"] == expected, (iso, out)
            with connect(PORT_A, db) as c:
                c.execute("SET app.tenant_id = 'legacy'")
                assert c.execute("SELECT envelope.decrypt_field(%s::bytea)", (value,)).fetchone()[0] == "legacy secret"
                assert c.execute("SELECT envelope.decrypt_field(envelope.encrypt_field('new'))").fetchone()[0] == "new"
                c.execute("SELECT envelope.declare_blind_index('lc.email')")
                assert c.execute("SELECT envelope.blind_index('lc.email', 'x@example.com') = envelope.blind_index('lc.email', 'x@example.com')").fetchone()[0] is True
                assert c.execute("SELECT key_generation FROM envelope.tenants WHERE name = 'legacy'").fetchone()[0] == (
                    2 if expected == 2 else 1)
        finally:
            a.close()
            b.close()


def _state_or_sqlstate(conn, query, params=None):
    """The statement's single value, or the SQLSTATE it failed with."""
    r = row_or_sqlstate(conn, query, params)
    return r[0] if isinstance(r, tuple) else r


def run_until_blocked(db, waiter, sql, blocker, result=row_or_sqlstate):
    """Runs `sql` on `waiter` in a thread and returns once that backend waits for `blocker`'s
    (`pg_blocking_pids`): the interleaving is forced, not timed. Join the thread, then read
    `out["r"]` (`result(waiter, sql)`)."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", result(waiter, sql)))
    t.start()
    with connect(PORT_A, db) as w:
        wait_until(lambda: blocker.info.backend_pid in w.execute("SELECT pg_blocking_pids(%s)", (waiter.info.backend_pid,)).fetchone()[0],
                   20, what=f"{sql} to wait for backend {blocker.info.backend_pid}")
    return t, out


def test_key_administration_under_repeatable_read_never_reports_a_change_it_did_not_make():
    """Insider review 38: disable_data_key and destroy_data_key under REPEATABLE READ or
    SERIALIZABLE returned true and changed nothing when the version was made after the
    transaction's snapshot (the UPDATE, under that snapshot, matched no row). Any key
    administration that takes the tenant's lock with a snapshot older than the tenant's key rows
    now fails with 40001; under READ COMMITTED the same calls work."""
    db = make_db("lc_rr_admin", ("acme",))
    for iso in ("repeatable read", "serializable"):
        a, b = connect(PORT_A, db), connect(PORT_A, db)
        try:
            a.execute(f"BEGIN ISOLATION LEVEL {iso}")
            a.execute("SELECT count(*) FROM envelope.key_versions")  # the snapshot is taken
            v_new = b.execute("SELECT envelope.rotate_data_key('acme')").fetchone()[0]
            b.execute("SELECT envelope.rotate_data_key('acme')")
            assert _state_or_sqlstate(a, "SELECT envelope.disable_data_key('acme', %s)", (v_new,)) == "40001", iso
            a.execute("ROLLBACK")
            # The destroy of a version disabled after the snapshot: refused the same way.
            a.execute(f"BEGIN ISOLATION LEVEL {iso}")
            a.execute("SELECT count(*) FROM envelope.key_versions")
            b.execute("SELECT envelope.disable_data_key('acme', %s)", (v_new,))
            assert _state_or_sqlstate(a, "SELECT envelope.destroy_data_key('acme', %s)", (v_new,)) == "40001", iso
            a.execute("ROLLBACK")
            with connect(PORT_A, db) as c:
                assert c.execute("SELECT state FROM envelope.key_versions WHERE tenant = 'acme' AND version = %s",
                                 (v_new,)).fetchone()[0] == "disabled"
                c.execute("SELECT envelope.enable_data_key('acme', %s)", (v_new,))
        finally:
            a.close()
            b.close()
    # READ COMMITTED: the same sequence changes the state.
    a, b = connect(PORT_A, db), connect(PORT_A, db)
    try:
        a.execute("BEGIN")
        a.execute("SELECT count(*) FROM envelope.key_versions")
        v_new = b.execute("SELECT envelope.rotate_data_key('acme')").fetchone()[0]
        b.execute("SELECT envelope.rotate_data_key('acme')")
        assert a.execute("SELECT envelope.disable_data_key('acme', %s)", (v_new,)).fetchone()[0] is True
        a.execute("COMMIT")
        with connect(PORT_A, db) as c:
            assert c.execute("SELECT state FROM envelope.key_versions WHERE tenant = 'acme' AND version = %s",
                             (v_new,)).fetchone()[0] == "disabled"
    finally:
        a.close()
        b.close()


def test_destroy_waits_for_writers_and_sees_what_they_committed():
    """Insider reviews 38 and 39: destroy_data_key (without force) looked for values under the
    version with the destroyer's snapshot, so rows a writer had encrypted under the version
    before it was retired, and committed after that snapshot (REPEATABLE READ) or after the check
    (READ COMMITTED), were destroyed with it; the first fix waited only for writers holding an
    xid. The destroy now waits for every transaction running when it starts, also one that
    has only computed a ciphertext so far (no xid: here kept in a setting), and looks under a
    fresh snapshot."""
    for iso in ("read committed", "repeatable read"):
        db = make_db("lc_destroy_writers", ("acme",))
        with connect(PORT_A, db) as c:
            create_table(c, "t")
        writer, early, admin = connect(PORT_A, db), connect(PORT_A, db), connect(PORT_A, db)
        try:
            writer.execute("BEGIN")
            writer.execute("SELECT set_config('app.tenant_id', 'acme', true)")
            writer.execute("INSERT INTO t (id, tenant, v) SELECT i, 'acme', ('w' || i)::text FROM generate_series(1, 3) i")
            # A transaction that encrypted under version 1 but has written nothing (no xid).
            early.execute("BEGIN")
            early.execute("SELECT set_config('app.tenant_id', 'acme', true)")
            early.execute("SELECT set_config('lc.pending', (('pending'::text)::envelope.encrypted_text)::text, true)")
            assert early.execute("SELECT backend_xid FROM pg_stat_activity WHERE pid = pg_backend_pid()").fetchone()[0] is None
            with connect(PORT_A, db) as c:
                assert c.execute("SELECT envelope.rotate_data_key('acme')").fetchone()[0] == 2
                c.execute("SELECT envelope.disable_data_key('acme', 1)")
            admin.execute(f"BEGIN ISOLATION LEVEL {iso}")
            admin.execute("SELECT count(*) FROM envelope.key_versions")  # the snapshot is taken
            out = {}

            def destroy():
                out["r"] = _state_or_sqlstate(admin, "SELECT envelope.destroy_data_key('acme', 1)")

            t = threading.Thread(target=destroy)
            t.start()

            def blocker():
                with connect(PORT_A, db) as w:
                    r = w.execute("SELECT pg_blocking_pids(%s)", (admin.info.backend_pid,)).fetchone()[0]
                    return r[0] if r else None

            # The destroy waits for each of the two, in whatever order it found them.
            pending = {writer.info.backend_pid: writer, early.info.backend_pid: early}
            while pending:
                pid = wait_until(lambda: blocker() in pending and blocker(), 20, what="the destroy to wait for a writer")
                conn = pending.pop(pid)
                if conn is early:
                    early.execute("INSERT INTO t (id, tenant, v) VALUES (4, 'acme', current_setting('lc.pending')::envelope.encrypted_text)")
                conn.execute("COMMIT")
            t.join(30)
            assert out["r"] == "2BP01", (iso, out)
            admin.execute("ROLLBACK")
            with connect(PORT_A, db) as c:
                assert c.execute("SELECT state FROM envelope.key_versions WHERE tenant = 'acme' AND version = 1").fetchone()[0] == "disabled"
                c.execute("SELECT envelope.enable_data_key('acme', 1)")
                with as_tenant(c, "acme"):
                    assert c.execute("SELECT string_agg(v::text, ',' ORDER BY id) FROM t").fetchone()[0] == "w1,w2,w3,pending"
        finally:
            writer.close()
            early.close()
            admin.close()


def test_destroy_refuses_while_a_prepared_transaction_may_hold_values_under_the_version():
    """A prepared transaction (two-phase commit) that encrypted under version 1 holds rows no
    snapshot sees until its COMMIT PREPARED, which may come days later. destroy_data_key waited
    for it as for any running transaction, without end (bounded only by lock_timeout; the test
    sets 5 s). It now refuses at once (2BP01, naming the prepared transaction) until that
    transaction is committed or rolled back, and never destroys what it committed."""
    db = make_db("lc_destroy_2pc", ("acme",))
    with connect(PORT_A, db) as c:
        create_table(c, "t")
        assert int(c.execute("SHOW max_prepared_transactions").fetchone()[0]) > 0
    gid = "lc_destroy_2pc_gid"
    p = connect(PORT_A, db)
    try:
        p.execute("BEGIN")
        p.execute("SELECT set_config('app.tenant_id', 'acme', true)")
        p.execute("INSERT INTO t (id, tenant, v) VALUES (1, 'acme', 'prepared under v1'::text)")
        p.execute(f"PREPARE TRANSACTION '{gid}'")
    finally:
        p.close()
    try:
        with connect(PORT_A, db) as c:
            c.execute("SET lock_timeout = '5s'")
            assert c.execute("SELECT envelope.rotate_data_key('acme')").fetchone()[0] == 2
            c.execute("SELECT envelope.disable_data_key('acme', 1)")
            assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 0  # what the old check saw
            state, msg = sqlstate(c, "SELECT envelope.destroy_data_key('acme', 1)")
            assert state == "2BP01" and f"prepared transactions: '{gid}' (owner postgres)" in msg, (state, msg)
            assert c.execute("SELECT state FROM envelope.key_versions WHERE tenant = 'acme' AND version = 1").fetchone()[0] == "disabled"
            c.execute(f"COMMIT PREPARED '{gid}'")
            # Committed: the row is there, under version 1, and the usual check names the column.
            state, msg = sqlstate(c, "SELECT envelope.destroy_data_key('acme', 1)")
            assert state == "2BP01" and "t.v" in msg, (state, msg)
            c.execute("SELECT envelope.enable_data_key('acme', 1)")
            with as_tenant(c, "acme"):
                assert c.execute("SELECT v::text FROM t").fetchone()[0] == "prepared under v1"
            # A prepared transaction that is rolled back holds nothing: once it is gone, the
            # destroy goes through (after the column is re-encrypted).
            c.execute("CALL envelope.reencrypt('t', 'v')")
            c.execute("SELECT envelope.disable_data_key('acme', 1)")
        p = connect(PORT_A, db)
        try:
            p.execute("BEGIN")
            p.execute("SELECT set_config('app.tenant_id', 'acme', true)")
            p.execute("INSERT INTO t (id, tenant, v) VALUES (2, 'acme', 'rolled back'::text)")
            p.execute(f"PREPARE TRANSACTION '{gid}'")
        finally:
            p.close()
        with connect(PORT_A, db) as c:
            c.execute("SET lock_timeout = '5s'")
            state, _msg = sqlstate(c, "SELECT envelope.destroy_data_key('acme', 1)")
            assert state == "2BP01", state
            c.execute(f"ROLLBACK PREPARED '{gid}'")
            assert c.execute("SELECT envelope.destroy_data_key('acme', 1)").fetchone()[0] is True
            with as_tenant(c, "acme"):
                assert c.execute("SELECT string_agg(v::text, ',') FROM t").fetchone()[0] == "prepared under v1"
    finally:
        with connect(PORT_A, db) as c:
            if c.execute("SELECT 1 FROM pg_prepared_xacts WHERE gid = %s", (gid,)).fetchone():
                c.execute(f"ROLLBACK PREPARED '{gid}'")


def test_a_key_change_waiting_for_a_provider_move_still_finds_the_tenant():
    """Insider review 41: a key change that waited for a `rewrap_tenant` moving the tenant to
    another provider failed with 42704 "tenant does not exist" under READ COMMITTED (the lock's
    query joined the provider's row, and PostgreSQL's re-check after the wait met the old one):
    an emergency suspension, a shred schedule or a rotation was not applied. Each now waits,
    then applies to the moved tenant."""
    db = make_db("lc_move_race", ("t1",))
    with connect(PORT_A, db) as c:
        c.execute("SELECT envelope.add_key_provider('local2', 'local', '{}')")
    # (A suspended tenant cannot be moved: the suspension and the shred schedule come last, each
    # after the tenant is resumed.)
    calls = [
        ("SELECT envelope.rotate_data_key('t1')", 2),
        ("SELECT envelope.disable_data_key('t1', 1)", True),
        ("SELECT envelope.rotate_tenant_key('t1')", None),
        ("SELECT envelope.suspend_tenant('t1', 'incident 42')", True),
        ("SELECT envelope.schedule_shred('t1', '2 hours')", None),
    ]
    mover, admin = connect(PORT_A, db), connect(PORT_A, db)
    try:
        for sql, want in calls:
            now = admin.execute("SELECT provider FROM envelope.tenants WHERE name = 't1'").fetchone()[0]
            to = "local2" if now == "local" else "local"
            mover.execute("BEGIN")
            mover.execute("SELECT envelope.rewrap_tenant('t1', %s)", (to,))
            t, out = run_until_blocked(db, admin, sql, mover, result=_state_or_sqlstate)
            mover.execute("COMMIT")
            t.join(30)
            assert out["r"] not in ("42704", "XX000") and (want is None or out["r"] == want), (sql, out)
            assert admin.execute("SELECT provider FROM envelope.tenants WHERE name = 't1'").fetchone()[0] == to
            if "suspend_tenant" in sql:
                assert admin.execute("SELECT suspended_reason FROM envelope.tenants WHERE name = 't1'").fetchone()[0] == "incident 42"
                admin.execute("SELECT envelope.resume_tenant('t1')")
        row = admin.execute("SELECT suspended_reason IS NOT NULL, shred_after IS NOT NULL FROM envelope.tenants WHERE name = 't1'").fetchone()
        assert row == (True, True), row  # the schedule suspends; the shred is scheduled
        admin.execute("SELECT envelope.cancel_shred('t1')")
    finally:
        mover.close()
        admin.close()


def test_nothing_that_locks_or_writes_key_tables_can_be_prepared():
    """Insider review 41: a rewrap batch, a rewrap job's start and a re-encryption batch could be
    PREPAREd (two-phase commit): the prepared transaction kept the rows it locked (tenants, jobs,
    the application's rows) past its session and restarts, and blocked suspensions, shreds and
    rotations of those tenants, and the maintenance worker. Every transaction holding more than
    a read lock on a table of pg_envelope is now refused at PREPARE (0A000); an application's
    two-phase transaction that encrypts and decrypts is not."""
    db = make_db("lc_prepare_locks", ("acme", "globex"))
    with connect(PORT_A, db) as c:
        create_table(c, "t")
        fill(c, "t", ("acme",), 50)
        c.execute("SELECT envelope.rotate_data_key('acme')")
    attempts = [
        ("rewrap_tenants_start", ["SELECT envelope.rewrap_tenants_start('local')"]),
        ("rewrap_tenants_batch", ["SELECT envelope.rewrap_tenants_batch(envelope.rewrap_tenants_start('local'), 100)"]),
        ("reencrypt_open", ["SELECT envelope.reencrypt_open('t'::regclass, 'v')"]),
        ("queue_reencrypt", ["SELECT envelope.queue_reencrypt('t', 'v')"]),
        ("set_rotation_period", ["SELECT envelope.set_rotation_period('acme', '30 days')"]),
        ("a row lock taken by hand", ["SELECT 1 FROM envelope.tenants WHERE name = 'acme' FOR UPDATE"]),
    ]
    for what, statements in attempts:
        with connect(PORT_A, db) as c:
            c.execute("BEGIN")
            for q in statements:
                c.execute(q)
            state, msg = sqlstate(c, f"PREPARE TRANSACTION 'lc_prepare_{what.replace(' ', '_')}'")
            assert state == "0A000" and "cannot be prepared" in msg, (what, state, msg)
            assert not c.execute("SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()").fetchone()[0]
    # Key administration is not blocked afterwards: nothing was left holding a lock.
    with connect(PORT_A, db) as c:
        c.execute("SET lock_timeout = '5s'")
        assert c.execute("SELECT envelope.suspend_tenant('acme', 'drill')").fetchone()[0] is True
        c.execute("SELECT envelope.resume_tenant('acme')")
    # An application's two-phase transaction that reads and writes encrypted values prepares.
    with connect(PORT_A, db) as c:
        c.execute("BEGIN")
        c.execute("SELECT set_config('app.tenant_id', 'acme', true)")
        assert c.execute("SELECT count(v::text) FROM t").fetchone()[0] == 50
        c.execute("INSERT INTO t (id, tenant, v) VALUES (1000, 'acme', 'two-phase'::text)")
        c.execute("PREPARE TRANSACTION 'lc_prepare_app'")
        c.execute("COMMIT PREPARED 'lc_prepare_app'")
        with as_tenant(c, "acme"):
            assert c.execute("SELECT v::text FROM t WHERE id = 1000").fetchone()[0] == "two-phase"


def test_the_key_tables_list_names_every_table_of_the_schema():
    """`backend::ENVELOPE_TABLES` (the tables whose locks refuse PREPARE) must name every table
    of the schema: a new table missing from it could be locked by a prepared transaction."""
    src = (ROOT / "src/backend.rs").read_text()
    listed = set(re.findall(r'c"([a-z_]+)",', src[src.index("pub const ENVELOPE_TABLES"):src.index("];", src.index("pub const ENVELOPE_TABLES"))]))
    db = make_db("lc_tables_list", ())
    with connect(PORT_A, db) as c:
        tables = {r for (r,) in c.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'envelope'::regnamespace AND relkind IN ('r', 'p', 'm')")}
    assert tables == listed, (tables - listed, listed - tables)


def test_concurrent_reencrypt_calls_share_one_job():
    """Insider review 41: two sessions queueing (or starting) a re-encryption of one column at
    once: the second failed with 23505 (`reencrypt_jobs_one_open`). It now waits for the first
    one's job and takes it; under REPEATABLE READ a job committed after its snapshot is 40001."""
    db = make_db("lc_reencrypt_race", ("acme",))
    with connect(PORT_A, db) as c:
        create_table(c, "t")
        fill(c, "t", ("acme",), 20)
        c.execute("SELECT envelope.rotate_data_key('acme')")
    for iso, want in (("READ COMMITTED", None), ("REPEATABLE READ", "40001")):
        first, second = connect(PORT_A, db), connect(PORT_A, db)
        try:
            first.execute("BEGIN")
            job = first.execute("SELECT envelope.queue_reencrypt('t', 'v')").fetchone()[0]
            second.execute(f"BEGIN ISOLATION LEVEL {iso}")
            second.execute("SELECT count(*) FROM envelope.reencrypt_jobs")  # the snapshot is taken
            t, out = run_until_blocked(db, second, "SELECT envelope.queue_reencrypt('t', 'v')", first)
            first.execute("COMMIT")
            t.join(30)
            assert out["r"] == ((job,) if want is None else want), (iso, job, out)
            second.execute("ROLLBACK")
            with connect(PORT_A, db) as c:
                assert c.execute("SELECT count(*) FROM envelope.reencrypt_jobs WHERE state IN ('queued', 'running')").fetchone()[0] == 1
                c.execute("SELECT envelope.cancel_reencrypt(%s)", (job,))
        finally:
            first.close()
            second.close()
    with connect(PORT_A, db) as c:
        assert sqlstate(c, "SELECT envelope.rewrap_tenants_batch(999999, 10)")[0] == "42704"


def test_a_dedicated_provider_never_gets_a_second_tenant_under_repeatable_read():
    """Insider review 38: create_tenant and rewrap_tenant check that a `dedicated` provider has no
    tenant yet after locking the provider's row, but read the tenants under the transaction's
    snapshot: under REPEATABLE READ two tenants ended up on one dedicated provider (and shredding
    one would destroy the other's root key). (A `local` provider marked dedicated in its row: the
    check reads only that option, as for Transit and AWS KMS.)"""
    db = make_db("lc_dedicated_rr", ("m1", "m2"))
    with connect(PORT_A, db) as c:
        # All registered first: a dedicated provider refuses another one naming its root key.
        for tag in ("repeatable_read", "serializable"):
            for p in (f"ded_new_{tag}", f"ded_move_{tag}"):
                c.execute("SELECT envelope.add_key_provider(%s, 'local', '{}')", (p,))
        c.execute("""UPDATE envelope.key_providers SET options = options || '{"dedicated": true}' WHERE name LIKE 'ded%'""")
    for iso in ("repeatable read", "serializable"):
        tag = iso.replace(" ", "_")
        for first, second, provider in (
            (f"SELECT envelope.create_tenant('x_{tag}', 'ded_new_{tag}')", f"SELECT envelope.create_tenant('y_{tag}', 'ded_new_{tag}')", f"ded_new_{tag}"),
            (f"SELECT envelope.rewrap_tenant('m1', 'ded_move_{tag}')", f"SELECT envelope.rewrap_tenant('m2', 'ded_move_{tag}')", f"ded_move_{tag}"),
        ):
            a, b = connect(PORT_A, db), connect(PORT_A, db)
            try:
                a.execute(f"BEGIN ISOLATION LEVEL {iso}")
                a.execute("SELECT count(*) FROM envelope.tenants")  # the snapshot is taken
                b.execute(first)
                got = _state_or_sqlstate(a, second)
                assert got == "55000", (iso, second, got)
                a.execute("ROLLBACK")
            finally:
                a.close()
                b.close()
            with connect(PORT_A, db) as c:
                assert c.execute("SELECT count(*) FROM envelope.tenants WHERE provider = %s", (provider,)).fetchone()[0] == 1
        with connect(PORT_A, db) as c:
            c.execute("SELECT envelope.rewrap_tenant('m1', 'local')")


# --------------------------------------------------------------------------------------------
# Private key servers: OpenBao with raft storage (keys survive a stop), moto.
# --------------------------------------------------------------------------------------------

BAO_BIN = STATE / "bao-venv" / "bin" / "bao"
MOTO_PY = STATE / "moto-venv" / "bin" / "python"
MOTO_SERVER = STATE / "moto-venv" / "bin" / "moto_server"


def http_json(method, url, body=None, headers=None, timeout=10):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


class Bao:
    """An OpenBao server of this module's own: raft storage in a directory under
    envelope.credential_dirs, plain http on 127.0.0.1:<port> (providers need
    allow_insecure_http), one unseal key. stop() kills it by pid; start() starts and unseals it
    again with everything it stored. The pg_envelope token may encrypt, decrypt and read key
    metadata of transit keys named lc-*; key rotation and configuration use the root token."""

    def __init__(self, port=8230):
        self.port = port
        self.addr = f"http://127.0.0.1:{port}"
        self.dir = STATE / "openbao-persistent" / f"lc-{port}"
        self.token_file = self.dir / "token"
        self.proc = None

    def _kill_leftover(self):
        pidfile = self.dir / "pid"
        if pidfile.exists():
            try:
                pid = int(pidfile.read_text())
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"bao"):
                    os.kill(pid, signal.SIGKILL)
                    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, what="old OpenBao to exit")
            except (ValueError, FileNotFoundError, ProcessLookupError):
                pass
            pidfile.unlink(missing_ok=True)

    def health(self):
        try:
            urllib.request.urlopen(f"{self.addr}/v1/sys/health", timeout=2)
            return 200
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def api(self, method, path, body=None):
        return http_json(method, f"{self.addr}/v1/{path}", body, {"X-Vault-Token": self.root_token})

    def init(self):
        """A fresh server: transit mounted, keys lc-root and lc-root-2, a limited token."""
        self._kill_leftover()
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "data").mkdir(parents=True)
        (self.dir / "config.hcl").write_text(
            f'storage "raft" {{\n  path = "{self.dir}/data"\n  node_id = "lc"\n}}\n'
            f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n  tls_disable = true\n}}\n'
            f'api_addr = "{self.addr}"\ncluster_addr = "http://127.0.0.1:{self.port + 1}"\ndisable_mlock = true\n'
        )
        self._spawn()
        wait_until(lambda: self.health() == 501, 30, 0.1, "OpenBao to listen (uninitialised)")
        # Initialising (key generation, the raft bootstrap) took more than 10 s once on the busy
        # 2-core machine: give it a minute.
        init = http_json("PUT", f"{self.addr}/v1/sys/init", {"secret_shares": 1, "secret_threshold": 1}, timeout=60)
        self.unseal_key, self.root_token = init["keys"][0], init["root_token"]
        self._unseal()
        self.api("POST", "sys/mounts/transit", {"type": "transit"})
        for k in ("lc-root", "lc-root-2"):
            self.create_key(k)
        rules = [("encrypt", "update"), ("decrypt", "update"), ("keys", "read")]
        policy = "\n".join(f'path "transit/{p}/lc-*" {{ capabilities = ["{c}"] }}' for p, c in rules)
        self.api("PUT", "sys/policies/acl/lc-envelope", {"policy": policy})
        token = self.api("POST", "auth/token/create", {"policies": ["lc-envelope"], "ttl": "24h", "no_default_policy": True})
        old = os.umask(0o077)
        try:
            self.token_file.write_text(token["auth"]["client_token"] + "\n")
        finally:
            os.umask(old)
        shutil.chown(self.token_file, "postgres", "postgres")
        return self

    def create_key(self, name):
        self.api("POST", f"transit/keys/{name}", {"type": "aes256-gcm96"})

    def _spawn(self):
        log = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(BAO_BIN), "server", f"-config={self.dir}/config.hcl"], stdout=log, stderr=log, start_new_session=True
        )
        (self.dir / "pid").write_text(str(self.proc.pid))

    def _unseal(self):
        wait_until(lambda: self.health() == 503, 30, 0.1, "OpenBao to listen (sealed)")
        http_json("PUT", f"{self.addr}/v1/sys/unseal", {"key": self.unseal_key}, timeout=60)
        wait_until(lambda: self.health() == 200, 60, 0.1, "OpenBao to become active")
        # Active in the health check; transit answers a moment later on a fresh raft leader.
        wait_until(lambda: self._transit_ready(), 30, 0.1, "transit to answer")

    def _transit_ready(self):
        try:
            self.api("LIST", "transit/keys")
            return True
        except urllib.error.HTTPError as e:
            return e.code == 404  # no keys yet
        except OSError:
            return False

    def start(self):
        self._spawn()
        self._unseal()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        (self.dir / "pid").unlink(missing_ok=True)
        assert self.health() is None

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def provider_options(self, key="lc-root"):
        return psycopg.types.json.Jsonb(
            {"url": self.addr, "key": key, "token_file": str(self.token_file), "allow_insecure_http": True}
        )

    def rotate(self, key):
        self.api("POST", f"transit/keys/{key}/rotate")
        return self.latest_version(key)

    def latest_version(self, key):
        return self.api("GET", f"transit/keys/{key}")["data"]["latest_version"]

    def set_min_decryption_version(self, key, v):
        self.api("POST", f"transit/keys/{key}/config", {"min_decryption_version": v})


@pytest.fixture(scope="module")
def bao():
    b = Bao().init()
    yield b
    b.stop()
    shutil.rmtree(b.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# 6. The KMS stops in the middle: rotate_tenant_key, CALL envelope.rewrap_tenants.
# --------------------------------------------------------------------------------------------

KMS_TENANTS = [f"kt_{i:02d}" for i in range(30)]


def add_tenants(conn, tenants, provider, table="kv", rows=5, create=True):
    if create:
        create_table(conn, table)
    for t in tenants:
        conn.execute("SELECT envelope.create_tenant(%s, provider => %s)", (t, provider))
        conn.execute("SELECT envelope.grant_tenant(%s, current_user)", (t,))
        with as_tenant(conn, t):
            conn.execute(
                f"INSERT INTO {table} (id, tenant, v) SELECT (SELECT coalesce(max(id), 0) FROM {table}) + g, %s, "
                "('secret of ' || %s || ' #' || g)::text FROM generate_series(1, %s) g",
                (t, t, rows),
            )


def decrypt_all(db, tenants, table="kv", conn=None):
    """{tenant: [plaintexts]}, in a new backend unless conn is given (so keys come from the KMS)."""
    out = {}
    c = conn or connect(PORT_A, db)
    try:
        for t in tenants:
            with as_tenant(c, t):
                out[t] = [v for (v,) in c.execute(f"SELECT v::text FROM {table} WHERE tenant = %s ORDER BY id", (t,))]
    finally:
        if conn is None:
            c.close()
    return out


def key_state(db, tenant):
    with connect(PORT_A, db) as c:
        versions = c.execute(
            "SELECT version, state, tenant_key_generation, root_version FROM envelope.key_versions WHERE tenant = %s ORDER BY version",
            (tenant,),
        ).fetchall()
        kek = c.execute("SELECT wrapped_key, key_check FROM envelope.tenants WHERE name = %s", (tenant,)).fetchone()
        deks = c.execute(
            "SELECT d.version, d.wrapped_key FROM envelope.data_keys d JOIN envelope.tenants t ON t.id = d.tenant_id "
            "WHERE t.name = %s ORDER BY 1", (tenant,)
        ).fetchall()
    return {"versions": versions, "kek": kek, "deks": deks}


@pytest.fixture(scope="module")
def kms_db(bao):
    db = "lc_kms"
    recreate_db(PORT_A, db)
    with connect(PORT_A, db) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        c.execute("SELECT envelope.add_key_provider('lcbao', 'vault_transit', %s)", (bao.provider_options("lc-root"),))
        add_tenants(c, KMS_TENANTS, "lcbao")
    return db


def test_rotate_tenant_key_with_kms_down_changes_nothing_and_succeeds_later(bao, kms_db):
    t = "kt_00"
    with connect(PORT_A, kms_db) as c:
        assert c.execute("SELECT envelope.rotate_data_key(%s)", (t,)).fetchone()[0] == 2  # two DEKs to re-wrap
        with as_tenant(c, t):
            c.execute("INSERT INTO kv (id, tenant, v) VALUES (999, %s, 'under version 2'::text)", (t,))
    plain = decrypt_all(kms_db, [t])
    before = key_state(kms_db, t)
    assert [v[:3] for v in before["versions"]] == [(1, "retired", 1), (2, "active", 1)]
    warm = connect(PORT_A, kms_db)  # a backend with the tenant's keys cached
    try:
        assert decrypt_all(kms_db, [t], conn=warm) == plain
        bao.stop()
        try:
            with connect(PORT_A, kms_db) as c:
                t0 = time.monotonic()
                state, msg = sqlstate(c, "SELECT envelope.rotate_tenant_key(%s)", (t,))
                took = time.monotonic() - t0
            # A clear error at once: the KMS is unreachable (class 58, system error), named.
            assert state == "58000" and "lcbao" in msg, (state, msg)
            assert took < 6, took
            # Nothing changed: same tenant key, same data keys, same generation.
            assert key_state(kms_db, t) == before
            # A data key rotation needs the tenant key too (one root-key unwrap), also in the
            # backend that has the tenant's data keys cached: the same clear error, nothing
            # changed (checklist row 14).
            t0 = time.monotonic()
            state, msg = sqlstate(warm, "SELECT envelope.rotate_data_key(%s)", (t,))
            assert state == "58000" and "lcbao" in msg and time.monotonic() - t0 < 6, (state, msg)
            assert key_state(kms_db, t) == before
            # The cached backend keeps working through the outage.
            assert decrypt_all(kms_db, [t], conn=warm) == plain
        finally:
            bao.start()
        # The old keys work from a cold backend once the KMS is back.
        assert decrypt_all(kms_db, [t]) == plain
        with connect(PORT_A, kms_db) as c:
            assert c.execute("SELECT envelope.rotate_tenant_key(%s)", (t,)).fetchone()[0] == 2
        after = key_state(kms_db, t)
        assert [v[:3] for v in after["versions"]] == [(1, "retired", 2), (2, "active", 2)]
        assert after["kek"][0] != before["kek"][0] and after["kek"][1] != before["kek"][1]
        assert all(a[1] != b[1] for a, b in zip(after["deks"], before["deks"]))
        assert decrypt_all(kms_db, [t]) == plain
        # The backend that had the old tenant key cached reloads: reads and writes go on.
        assert decrypt_all(kms_db, [t], conn=warm) == plain
        with as_tenant(warm, t):
            warm.execute("INSERT INTO kv (id, tenant, v) VALUES (1000, %s, 'after the tenant key rotation'::text)", (t,))
            assert warm.execute("SELECT envelope.key_version(v) FROM kv WHERE id = 1000").fetchone()[0] == 2
        assert decrypt_all(kms_db, [t])[t][-1] == "after the tenant key rotation"
    finally:
        warm.close()


def rewrap_state(db, provider):
    with connect(PORT_A, db) as c:
        jobs = c.execute(
            "SELECT job, state, tenants_done, tenants_total, target_version FROM envelope.rewrap_progress WHERE provider = %s ORDER BY job",
            (provider,),
        ).fetchall()
        roots = dict(c.execute("SELECT name, root_version FROM envelope.tenants WHERE provider = %s", (provider,)).fetchall())
    return jobs, roots


def test_rewrap_tenants_with_kms_stopped_after_first_batch_resumes(bao, kms_db):
    plain = decrypt_all(kms_db, KMS_TENANTS)
    assert bao.rotate("lc-root") == 2
    _jobs, roots = rewrap_state(kms_db, "lcbao")
    assert set(roots.values()) == {"v1"}
    with connect(PORT_A, kms_db) as c:
        assert ("rewrap", "lcbao") in c.execute("SELECT * FROM envelope.maintenance_due()").fetchall()
        ordered = [n for (n,) in c.execute("SELECT name FROM envelope.tenants WHERE provider = 'lcbao' ORDER BY id")]
    assert ordered == KMS_TENANTS
    # A session rotating the 11th tenant's data key holds that tenant's row: the second batch
    # waits for it, after the first batch (10 tenants) committed. The KMS is stopped meanwhile.
    blocker = connect(PORT_A, kms_db)
    try:
        blocker.execute("BEGIN")
        blocker.execute("SELECT envelope.rotate_data_key(%s)", (KMS_TENANTS[10],))
        bg = Background(kms_db, "CALL envelope.rewrap_tenants('lcbao', batch_size => 10)")
        with connect(PORT_A, kms_db) as mon:
            wait_until(
                lambda: mon.execute(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (bg.pid,)
                ).fetchone()[0] and rewrap_state(kms_db, "lcbao")[0][-1][2] == 10,
                30,
                what="the first batch committed and the second waiting",
            )
        bao.stop()
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    bg.join(60)
    assert isinstance(bg.error, psycopg.Error) and bg.error.sqlstate == "58000", bg.error
    assert "lcbao" in str(bg.error)
    jobs, roots = rewrap_state(kms_db, "lcbao")
    (job, state, done, total, target), = jobs
    assert (state, done, total, target) == ("running", 10, 30, "v2")
    assert sorted(n for n, v in roots.items() if v == "v2") == KMS_TENANTS[:10]
    assert sorted(n for n, v in roots.items() if v == "v1") == KMS_TENANTS[10:]
    bao.start()
    with connect(PORT_A, kms_db) as c:
        notices = []
        c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        c.execute("CALL envelope.rewrap_tenants('lcbao', batch_size => 10)")
        assert any(f"rewrap job {job} of provider \"lcbao\" is done (20 tenant keys" in m for m in notices), notices
        assert not c.execute("SELECT * FROM envelope.maintenance_due() WHERE action = 'rewrap'").fetchall()
        wrapped = [bytes(w).decode() for (w,) in c.execute("SELECT wrapped_key FROM envelope.tenants WHERE provider = 'lcbao'")]
    jobs, roots = rewrap_state(kms_db, "lcbao")
    assert [j[:4] for j in jobs] == [(job, "done", 30, 30)]
    assert set(roots.values()) == {"v2"} and all(w.startswith("vault:v2:") for w in wrapped)
    # Everything decrypts from cold backends, with keys unwrapped from the new wrapping.
    assert decrypt_all(kms_db, KMS_TENANTS) == plain


# --------------------------------------------------------------------------------------------
# 7. Root key rotation end to end: OpenBao Transit, AWS KMS (moto).
# --------------------------------------------------------------------------------------------


def test_root_key_rotation_with_openbao(bao):
    db = "lc_root_bao"
    for k in ("lc-rot", "lc-stale"):
        bao.create_key(k)
    rot_tenants = [f"r_{i}" for i in range(5)]
    recreate_db(PORT_A, db)
    with connect(PORT_A, db) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        c.execute("SELECT envelope.add_key_provider('rot', 'vault_transit', %s)", (bao.provider_options("lc-rot"),))
        c.execute("SELECT envelope.add_key_provider('stale', 'vault_transit', %s)", (bao.provider_options("lc-stale"),))
        add_tenants(c, rot_tenants, "rot")
        add_tenants(c, ["s_0"], "stale", create=False)
        assert set(v for (v,) in c.execute("SELECT root_version FROM envelope.tenants")) == {"v1"}
    plain = decrypt_all(db, rot_tenants + ["s_0"])
    # The security team rotates both Transit keys (the root token; pg_envelope's token cannot).
    assert bao.rotate("lc-rot") == 2 and bao.rotate("lc-stale") == 2
    with connect(PORT_A, db) as c:
        due = c.execute("SELECT * FROM envelope.maintenance_due() ORDER BY 2").fetchall()
        assert due == [("rewrap", "rot"), ("rewrap", "stale")], due
        c.execute("CALL envelope.rewrap_tenants('rot')")
        roots = c.execute("SELECT name, root_version, convert_from(wrapped_key, 'UTF8') FROM envelope.tenants WHERE provider = 'rot'").fetchall()
        assert all(v == "v2" and w.startswith("vault:v2:") for _n, v, w in roots), roots
        assert c.execute("SELECT state, tenants_done, tenants_total FROM envelope.rewrap_progress WHERE provider = 'rot'").fetchall() == [
            ("done", 5, 5)]
        assert c.execute("SELECT * FROM envelope.maintenance_due()").fetchall() == [("rewrap", "stale")]
    # Version 1 of both keys is retired for decryption.
    bao.set_min_decryption_version("lc-rot", 2)
    bao.set_min_decryption_version("lc-stale", 2)
    # New backends (nothing cached) unwrap every rewrapped tenant key and decrypt everything.
    assert decrypt_all(db, rot_tenants) == {t: plain[t] for t in rot_tenants}
    # The tenant that was not rewrapped is still under version 1: it no longer opens, and the
    # error says why (the key server's min_decryption_version, not a wrong key).
    with connect(PORT_A, db) as c:
        with pytest.raises(psycopg.Error) as e:
            decrypt_all(db, ["s_0"], conn=c)
        assert e.value.sqlstate == "28000" and "min_decryption_version" in str(e.value), e.value
        # Nor can it be rewrapped while version 1 is refused.
        state, msg = sqlstate(c, "CALL envelope.rewrap_tenants('stale')")
        assert state == "28000" and "min_decryption_version" in msg, (state, msg)
    # Recovery: allow version 1 again, finish the open rewrap job, retire version 1 again.
    bao.set_min_decryption_version("lc-stale", 1)
    with connect(PORT_A, db) as c:
        c.execute("CALL envelope.rewrap_tenants('stale')")
        assert c.execute("SELECT state, tenants_done FROM envelope.rewrap_progress WHERE provider = 'stale'").fetchall() == [("done", 1)]
        assert c.execute("SELECT root_version FROM envelope.tenants WHERE name = 's_0'").fetchone()[0] == "v2"
    bao.set_min_decryption_version("lc-stale", 2)
    assert decrypt_all(db, ["s_0"]) == {"s_0": plain["s_0"]}


def test_concurrent_rewrap_calls_share_one_job():
    """Two DBAs (or a DBA and the worker) starting a root key rotation of one provider at the
    same moment: the second start waits for the first one's job and joins it (review 39 saw
    the second call fail with 23505 from `rewrap_jobs_one_open`). Under REPEATABLE READ a job
    committed after the snapshot is a serialization failure, never a unique violation."""
    db = "lc_rewrap_race"
    recreate_db(PORT_A, db)
    with connect(PORT_A, db) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        add_tenants(c, [f"rr_{i}" for i in range(3)], "local")
    plain = decrypt_all(db, [f"rr_{i}" for i in range(3)])
    for iso, want in (("READ COMMITTED", None), ("REPEATABLE READ", "40001")):
        first = connect(PORT_A, db)
        second = connect(PORT_A, db)
        try:
            first.execute("BEGIN")
            job = first.execute("SELECT envelope.rewrap_tenants_start('local')").fetchone()[0]
            second.execute(f"BEGIN ISOLATION LEVEL {iso}")
            second.execute("SELECT count(*) FROM envelope.tenants")  # the snapshot is taken
            t, out = run_until_blocked(db, second, "SELECT envelope.rewrap_tenants_start('local')", first)
            first.execute("COMMIT")
            t.join(30)
            assert not t.is_alive()
            if want is None:
                assert out["r"] == (job,), (iso, job, out)
                second.execute("COMMIT")
            else:
                assert out["r"] == want, (iso, out)
                second.execute("ROLLBACK")
            # Two whole calls at once (each commits per batch) both finish; one job, done.
            with connect(PORT_A, db) as c:
                c.execute("CALL envelope.rewrap_tenants('local')")
                assert c.execute("SELECT count(*) FROM envelope.rewrap_jobs WHERE state = 'running'").fetchone()[0] == 0
        finally:
            first.close()
            second.close()
    calls = [Background(db, "CALL envelope.rewrap_tenants('local', batch_size => 1)") for _ in range(4)]
    for b in calls:
        b.join(60)
        assert b.error is None, b.error
    with connect(PORT_A, db) as c:
        assert c.execute("SELECT count(*) FROM envelope.rewrap_jobs WHERE state = 'running'").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM envelope.rewrap_jobs").fetchone()[0] >= 3
    assert decrypt_all(db, [f"rr_{i}" for i in range(3)]) == plain


class Moto:
    """A moto server (AWS KMS emulator) of this module's own on 127.0.0.1:<port>, signatures not
    checked; keys are created with boto3 from moto's venv."""

    def __init__(self, port=5075):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.dir = STATE / "moto" / f"lc-{port}"
        self.credentials = self.dir / "credentials"
        self.proc = None

    def start(self):
        pidfile = self.dir / "pid"
        if pidfile.exists():  # a leftover of an interrupted run of this module
            try:
                pid = int(pidfile.read_text())
                if b"moto_server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except (ValueError, FileNotFoundError, ProcessLookupError):
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        log = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=log,
                                     start_new_session=True)
        pidfile.write_text(str(self.proc.pid))

        def up():
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2)
                return True
            except OSError:
                return False

        wait_until(up, 30, 0.1, "moto to listen")
        old = os.umask(0o077)
        try:
            self.credentials.write_text("[default]\naws_access_key_id = AKIDLIFECYCLE\naws_secret_access_key = lifecycle-test\n")
        finally:
            os.umask(old)
        shutil.chown(self.credentials, "postgres", "postgres")
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        (self.dir / "pid").unlink(missing_ok=True)

    def create_key(self, description):
        out = sh(str(MOTO_PY), "-c", (
            "import boto3, sys; k = boto3.client('kms', endpoint_url=sys.argv[1], region_name='us-east-1', "
            "aws_access_key_id='AKIDLIFECYCLE', aws_secret_access_key='lifecycle-test'); "
            "print(k.create_key(Description=sys.argv[2])['KeyMetadata']['KeyId'])"), self.endpoint, description)
        return out.stdout.strip()

    def provider_options(self, key_id):
        return psycopg.types.json.Jsonb({
            "key_id": key_id, "region": "us-east-1", "endpoint": self.endpoint,
            "allow_insecure_http": True, "credentials_file": str(self.credentials),
        })


@pytest.fixture(scope="module")
def moto():
    m = Moto().start()
    yield m
    m.stop()
    shutil.rmtree(m.dir, ignore_errors=True)


def test_root_key_rotation_with_aws_kms(moto):
    db = "lc_root_aws"
    k1 = moto.create_key("lc-root-1")
    tenants = [f"a_{i}" for i in range(4)]
    recreate_db(PORT_A, db)
    with connect(PORT_A, db) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        c.execute("SELECT envelope.add_key_provider('lcaws', 'aws_kms', %s)", (moto.provider_options(k1),))
        add_tenants(c, tenants, "lcaws")
        # moto's ciphertext blobs start with the key id (an emulator detail, used here only to
        # see which key a tenant key is wrapped under; real KMS blobs do not show it).
        blobs = [bytes(w) for (w,) in c.execute("SELECT wrapped_key FROM envelope.tenants")]
        assert all(b.startswith(k1.encode()) for b in blobs)
        assert {v for (v,) in c.execute("SELECT root_version FROM envelope.tenants")} == {k1}
    plain = decrypt_all(db, tenants)
    # Root key rotation with AWS KMS: a new KMS key; the DBA points the provider at it.
    k2 = moto.create_key("lc-root-2")
    with connect(PORT_A, db) as c:
        c.execute("UPDATE envelope.key_providers SET options = jsonb_set(options, '{key_id}', to_jsonb(%s::text)) WHERE name = 'lcaws'", (k2,))
        assert c.execute("SELECT * FROM envelope.maintenance_due()").fetchall() == [("rewrap", "lcaws")]
        c.execute("CALL envelope.rewrap_tenants('lcaws', batch_size => 3)")
        assert c.execute("SELECT state, tenants_done, tenants_total FROM envelope.rewrap_progress").fetchall() == [("done", 4, 4)]
        rows = c.execute("SELECT root_version, wrapped_key FROM envelope.tenants").fetchall()
        assert all(v == k2 and bytes(w).startswith(k2.encode()) for v, w in rows), [(v, bytes(w)[:36]) for v, w in rows]
        assert c.execute("SELECT * FROM envelope.maintenance_due()").fetchall() == []
    # Cold backends: every tenant key unwraps under the new key; every value decrypts.
    assert decrypt_all(db, tenants) == plain
    # (moto does not enforce DisableKey or pending deletion, so "the old key is disabled and
    # nothing breaks" cannot be shown here; the blobs above show the new key is the one used.)


def test_aws_tenants_not_yet_rewrapped_stay_readable_after_key_id_change(moto):
    """Between the DBA's key_id change and the end of `CALL envelope.rewrap_tenants` (minutes for
    many tenants; up to a naptime more when the worker does it), a new connection must still read
    a tenant that is not rewrapped yet: its tenant key is under the old key, which KMS still has,
    and the provider names it in `previous_key_ids`. Without that option it fails closed (Decrypt
    is pinned to the provider's keys)."""
    db = "lc_root_aws_window"
    k1 = moto.create_key("lc-window-1")
    recreate_db(PORT_A, db)
    with connect(PORT_A, db) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        c.execute("SELECT envelope.add_key_provider('lcaws', 'aws_kms', %s)", (moto.provider_options(k1),))
        add_tenants(c, ["w_0"], "lcaws")
    plain = decrypt_all(db, ["w_0"])
    k2 = moto.create_key("lc-window-2")
    with connect(PORT_A, db) as c:
        c.execute("UPDATE envelope.key_providers SET options = jsonb_set(options, '{key_id}', to_jsonb(%s::text)) WHERE name = 'lcaws'", (k2,))
    with pytest.raises(psycopg.errors.DataException):
        decrypt_all(db, ["w_0"])
    with connect(PORT_A, db) as c:
        c.execute("UPDATE envelope.key_providers SET options = options || jsonb_build_object('previous_key_ids', %s::text) WHERE name = 'lcaws'", (k1,))
    assert decrypt_all(db, ["w_0"]) == plain
    with connect(PORT_A, db) as c:
        c.execute("CALL envelope.rewrap_tenants('lcaws')")
        assert c.execute("SELECT root_version FROM envelope.tenants WHERE name = 'w_0'").fetchone()[0] == k2
        c.execute("UPDATE envelope.key_providers SET options = options - 'previous_key_ids' WHERE name = 'lcaws'")
    assert decrypt_all(db, ["w_0"]) == plain


# --------------------------------------------------------------------------------------------
# 8. The maintenance worker (in the `postgres` database, envelope.database's default).
# --------------------------------------------------------------------------------------------


def worker_pid(conn=None):
    c = conn or connect(PORT_A)
    try:
        r = c.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_envelope maintenance'").fetchone()
        return r[0] if r else None
    finally:
        if conn is None:
            c.close()


def worker_status(conn):
    return conn.execute("SELECT * FROM envelope.maintenance_status()").fetchone()


def restart_cluster():
    sh("bash", str(ROOT / "scripts/cluster.sh"), "stop")
    sh("bash", str(ROOT / "scripts/cluster.sh"), "start")
    wait_for_server()


def restore_worker():
    """After a test that may leave the cluster without its worker: restart the cluster if so."""
    ensure_cluster_running()
    try:
        wait_until(worker_pid, 15, 0.2, "the worker")  # restart time 10 s
    except TimeoutError:
        restart_cluster()
        wait_until(worker_pid, 20, 0.2, "the worker after a restart")


@pytest.fixture(scope="module")
def worker_db():
    """pg_envelope in the `postgres` database for the duration of these tests (dropped after,
    with everything in it), the worker napping 1 s (ALTER SYSTEM; reset after)."""
    ensure_cluster_running()
    with connect(PORT_A) as c:
        if c.execute("SELECT current_setting('envelope.database')").fetchone()[0] != "postgres":
            pytest.skip("envelope.database is not 'postgres'")
        if c.execute(
            "SELECT 1 FROM pg_extension WHERE extname = 'pg_envelope' UNION ALL "
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'envelope'"
        ).fetchone():
            pytest.skip("the postgres database already has pg_envelope or an envelope schema in use: not touching it")
        c.execute("CREATE EXTENSION pg_envelope")
        c.execute("ALTER SYSTEM SET envelope.maintenance_naptime = 1")
        c.execute("SELECT pg_reload_conf()")
    try:
        yield "postgres"
    finally:
        ensure_cluster_running()
        with connect(PORT_A) as c:
            c.execute("ALTER SYSTEM RESET envelope.maintenance_naptime")
            c.execute("SELECT pg_reload_conf()")
            c.execute("SET lock_timeout = '30s'")
            c.execute("DROP TABLE IF EXISTS lc_worker_t")
            c.execute("DROP EXTENSION IF EXISTS pg_envelope")
            # CREATE EXTENSION made the schema named by the control file; DROP EXTENSION leaves
            # it (PostgreSQL's rule). Empty now: without CASCADE this drops nothing else.
            c.execute("DROP SCHEMA IF EXISTS envelope")
            assert not c.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'envelope'").fetchone()


def wait_worker_cadence(conn, naptime=1.0, timeout=75):
    """Until the worker runs every ~naptime (it adopts a new naptime after the nap in progress)."""
    def two_runs_quickly():
        r0 = worker_status(conn)[3]
        deadline = time.monotonic() + 2 * naptime + 1.5
        while time.monotonic() < deadline:
            if worker_status(conn)[3] >= r0 + 2:
                return True
            time.sleep(0.1)
        return False

    wait_until(two_runs_quickly, timeout, 0, "the worker to run every second")


def test_worker_comes_back_after_kill_9(worker_db):
    old = wait_until(worker_pid, 30, 0.2, "the worker")
    bystander = connect(PORT_A)
    try:
        os.kill(old, signal.SIGKILL)
        t0 = time.monotonic()
        # A crashed worker may have left shared memory inconsistent: the postmaster ends every
        # backend (this connection too) and reinitializes, then starts the worker again.
        with pytest.raises(psycopg.OperationalError):
            wait_until(lambda: bystander.execute("SELECT 0").fetchone() is None, 10, 0.1, "the bystander to be ended")
    finally:
        bystander.close()
    wait_for_server()
    new = wait_until(worker_pid, 30, 0.2, "the worker to be restarted")
    took = time.monotonic() - t0
    assert new != old
    assert took < 30, took
    with connect(PORT_A) as c:
        st = c.execute("SELECT envelope.status()->'maintenance_worker'").fetchone()[0]
        assert st["running"] is True and st["pid"] == new and st["database"] == "postgres", st
    print(f"worker back {took:.1f} s after kill -9")


def test_worker_rotates_on_schedule_and_runs_queued_jobs(worker_db):
    with connect(PORT_A) as c:
        wait_worker_cadence(c)
        c.execute("SELECT envelope.create_tenant('lcw_acme'), envelope.grant_tenant('lcw_acme', current_user)")
        c.execute("SELECT envelope.create_tenant('lcw_other'), envelope.grant_tenant('lcw_other', current_user)")
        create_table(c, "lc_worker_t")
        fill(c, "lc_worker_t", ("lcw_acme",), 3000)
        before = digest("postgres", "lc_worker_t", ("lcw_acme",))
        # Periods shorter than an hour are refused (every rotation reloads keys everywhere).
        assert sqlstate(c, "SELECT envelope.set_rotation_period('lcw_acme', '1 second')")[0] == "22023"
        c.execute("SELECT envelope.set_rotation_period('lcw_acme', '1 hour')")
        c.execute("SELECT envelope.set_rotation_period('lcw_other', '1 hour')")
        assert not c.execute("SELECT * FROM envelope.maintenance_due()").fetchall()
        st0 = worker_status(c)
        # The active data key of lcw_acme turns two hours old (the clock, moved by hand): the
        # worker rotates it on its own, within a naptime, without any call; lcw_other is not due.
        c.execute(
            "UPDATE envelope.data_keys d SET created_at = d.created_at - interval '2 hours' FROM envelope.tenants t "
            "WHERE t.id = d.tenant_id AND t.name = 'lcw_acme' AND d.state = 'active'"
        )
        assert c.execute("SELECT overdue FROM envelope.rotation_status WHERE tenant = 'lcw_acme'").fetchone()[0] is True
        t0 = time.monotonic()
        wait_until(
            lambda: c.execute("SELECT max(version) FROM envelope.key_versions WHERE tenant = 'lcw_acme'").fetchone()[0] == 2,
            10, 0.1, "the worker to rotate lcw_acme")
        took = time.monotonic() - t0
        time.sleep(2.5)  # two more runs: nothing more is due
        assert c.execute("SELECT tenant, version, state FROM envelope.key_versions ORDER BY 1, 2").fetchall() == [
            ("lcw_acme", 1, "retired"), ("lcw_acme", 2, "active"), ("lcw_other", 1, "active")]
        st1 = worker_status(c)
        assert st1[4] == st0[4] + 1, (st0, st1)  # rotations counted
        assert st1[3] >= st0[3] + 2 and st1[0] == worker_pid(c) and st1[8] is None, st1  # runs, pid, no last_error
        ws = c.execute("SELECT envelope.status()->'maintenance_worker'").fetchone()[0]
        assert ws["running"] is True and ws["rotations"] == st1[4] and ws["pid"] == st1[0], ws
        assert c.execute("SELECT overdue FROM envelope.rotation_status WHERE tenant = 'lcw_acme'").fetchone()[0] is False
        # A queued job: the worker runs it to the end.
        assert column_versions(c, "lc_worker_t") == {("lcw_acme", 1, "retired"): 3000}
        job = c.execute("SELECT envelope.queue_reencrypt('lc_worker_t', 'v', batch_rows => 500)").fetchone()[0]
        wait_until(
            lambda: c.execute("SELECT state FROM envelope.reencrypt_progress WHERE job = %s", (job,)).fetchone()[0] == "done",
            30, 0.2, "the worker to finish the queued job")
        assert c.execute("SELECT by_worker, values_done, values_remaining FROM envelope.reencrypt_jobs WHERE id = %s", (job,)).fetchone() == (
            True, 3000, 0)
        assert_all_under_active(c, "lc_worker_t", 3000)
        st2 = worker_status(c)
        assert st2[6] == st1[6] + 3000, (st1, st2)  # values_reencrypted
    assert digest("postgres", "lc_worker_t", ("lcw_acme",)) == before
    print(f"worker: rotated {took:.1f} s after the key became due; status {st2}")


def test_a_transaction_holding_a_tenant_never_stalls_the_worker(worker_db):
    """Insider review 41: the worker's rewrap step waited for locks without a bound, so one open
    transaction holding a tenant's row (a key administrator's uncommitted suspension, a
    forgotten session) while a root-key rotation was due stopped every run: a due crypto-shred
    never happened, nor rotations or the audit trail's drain. The rewrap step now gives up
    after the worker's lock bound (10 s) and the run goes on; the rewrap is retried next run."""
    with connect(PORT_A) as c:
        wait_worker_cadence(c)
        for t in ("lcw_held", "lcw_doomed"):
            c.execute("SELECT envelope.create_tenant(%s)", (t,))
        c.execute("SELECT envelope.rewrap_tenants_start('local')")  # a root-key rotation is due
    held = connect(PORT_A)
    try:
        held.execute("BEGIN")
        held.execute("SELECT envelope.suspend_tenant('lcw_held', 'investigating')")  # not committed
        with connect(PORT_A) as c:
            wait_until(lambda: c.execute(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE backend_type = 'pg_envelope maintenance'").fetchone()[0],
                30, 0.1, "the worker to wait for the held tenant")
            c.execute("SET envelope.shred_min_delay = 0")
            c.execute("SELECT envelope.schedule_shred('lcw_doomed', '0 seconds')")
            t0 = time.monotonic()
            wait_until(lambda: c.execute("SELECT shredded_at IS NOT NULL FROM envelope.tenants WHERE name = 'lcw_doomed'").fetchone()[0],
                       60, 0.2, "the worker to shred the due tenant while another is held")
            took = time.monotonic() - t0
            err = worker_status(c)[8] or ""
            assert "lock timeout" in err, err
        held.execute("ROLLBACK")
        # Once nothing holds the tenant, the rewrap job finishes on its own.
        with connect(PORT_A) as c:
            wait_until(lambda: c.execute("SELECT count(*) FROM envelope.rewrap_jobs WHERE state = 'running'").fetchone()[0] == 0,
                       60, 0.2, "the rewrap job to finish")
    finally:
        held.close()
    print(f"worker: shredded a due tenant {took:.1f} s after it was scheduled, with another tenant held")


def test_worker_stops_promptly_on_sigterm_and_is_restarted(worker_db):
    try:
        with connect(PORT_A) as c:
            pid = wait_until(worker_pid, 30, 0.2, "the worker")
            t0 = time.monotonic()
            assert c.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0] is True
            wait_until(lambda: not Path(f"/proc/{pid}").exists(), 5, 0.02, "the worker to exit")
            took = time.monotonic() - t0
            assert took < 1.5, took
            # The server goes on (a clean exit is not a crash): this session was not ended.
            assert c.execute("SELECT 1").fetchone()[0] == 1
            assert c.execute("SELECT envelope.status()->'maintenance_worker'->>'running'").fetchone()[0] == "false"
            # bgw_restart_time is 10 s: the postmaster starts it again (an exit with status 0
            # would tell the postmaster never to restart it).
            new = wait_until(lambda: (p := worker_pid(c)) and p != pid and p, 15, 0.2, "the worker to be restarted")
            restarted = time.monotonic() - t0
            assert 9 < restarted < 15, restarted
            wait_until(lambda: worker_status(c)[0] == new, 5, 0.1, "the new worker to report itself")
        print(f"worker: exited {took:.2f} s after SIGTERM, back after {restarted:.1f} s")
    finally:
        restore_worker()


def test_worker_naptime_change_applies_at_reload(worker_db):
    with connect(PORT_A) as c:
        try:
            wait_worker_cadence(c)
            c.execute("ALTER SYSTEM SET envelope.maintenance_naptime = 30")
            c.execute("SELECT pg_reload_conf()")
            time.sleep(2.5)  # the worker finishes its 1 s nap, runs, and starts a 30 s nap
            runs = worker_status(c)[3]
            c.execute("ALTER SYSTEM SET envelope.maintenance_naptime = 1")
            c.execute("SELECT pg_reload_conf()")
            wait_until(lambda: worker_status(c)[3] > runs, 4, 0.1, "a run within the new naptime")
        finally:
            c.execute("ALTER SYSTEM SET envelope.maintenance_naptime = 1")
            c.execute("SELECT pg_reload_conf()")


# --------------------------------------------------------------------------------------------
# 9. Bad input and privileges.
# --------------------------------------------------------------------------------------------

NOEXEC_ROLE = "lc_app"


def test_bad_input_and_privileges():
    db = make_db("lc_bad", ("acme",))
    with connect(PORT_A, db) as c:
        c.execute(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{NOEXEC_ROLE}') "
            f"THEN CREATE ROLE {NOEXEC_ROLE} LOGIN; END IF; END $$"
        )
        c.execute("SELECT envelope.grant_tenant('acme', %s)", (NOEXEC_ROLE,))
        create_table(c, "t")
        fill(c, "t", ("acme",), 10, value="'v1 value ' || i")
        c.execute(f"GRANT SELECT, INSERT, UPDATE ON t TO {NOEXEC_ROLE}")
        c.execute("CREATE TABLE plain (id int, s text)")
        c.execute("CREATE TABLE parted (id int, v envelope.encrypted_text) PARTITION BY RANGE (id)")
        c.execute("CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100)")
        c.execute("CREATE VIEW t_view AS SELECT * FROM t")
        assert c.execute("SELECT envelope.rotate_data_key('acme')").fetchone()[0] == 2
    # An application role (tenant granted, table privileges) is no key administrator.
    with connect(PORT_A, db, user=NOEXEC_ROLE) as app:
        with as_tenant(app, "acme"):
            assert app.execute("SELECT count(v::text) FROM t").fetchone()[0] == 10  # it can read
        for q in (
            "SELECT envelope.rotate_data_key('acme')",
            "SELECT envelope.rotate_tenant_key('acme')",
            "SELECT envelope.disable_data_key('acme', 1)",
            "SELECT envelope.enable_data_key('acme', 1)",
            "SELECT envelope.destroy_data_key('acme', 1)",
            "CALL envelope.reencrypt('t', 'v')",
            "SELECT envelope.queue_reencrypt('t', 'v')",
            "SELECT envelope.cancel_reencrypt(1)",
            "CALL envelope.rewrap_tenants('local')",
            "CALL envelope.run_maintenance()",
            "SELECT envelope.set_rotation_period('acme', '1 day')",
            "SELECT * FROM envelope.column_key_versions('t', 'v')",
        ):
            state, msg = sqlstate(app, q)
            assert state == "42501", (q, state, msg)
    with connect(PORT_A, db) as c:
        # A role allowed to run re-encryption but without UPDATE on the table: refused up front.
        c.execute(f"GRANT EXECUTE ON PROCEDURE envelope.reencrypt(regclass, name, text, name, integer, interval, interval) TO {NOEXEC_ROLE}")
        c.execute(f"GRANT EXECUTE ON FUNCTION envelope.reencrypt_open(oid, text, text, text, integer, boolean), "
                  f"envelope.reencrypt_batch(bigint) TO {NOEXEC_ROLE}")
        c.execute(f"REVOKE UPDATE ON t FROM {NOEXEC_ROLE}")
    with connect(PORT_A, db, user=NOEXEC_ROLE) as app:
        state, msg = sqlstate(app, "CALL envelope.reencrypt('t', 'v')")
        assert state == "42501" and "update" in msg.lower(), (state, msg)
    with connect(PORT_A, db) as c:
        for q, want in (
            ("CALL envelope.reencrypt('no_such_table', 'v')", "42P01"),
            ("CALL envelope.reencrypt('t', 'no_such_column')", "42703"),
            ("CALL envelope.reencrypt('plain', 's')", "42804"),
            ("CALL envelope.reencrypt('t', 'id')", "42804"),
            ("CALL envelope.reencrypt('parted', 'v')", "42809"),
            ("CALL envelope.reencrypt('t_view', 'v')", "42809"),
            ("CALL envelope.reencrypt('t', 'v', batch_rows => 0)", "22023"),
            ("CALL envelope.reencrypt('t', 'v', context => 'x')", "22023"),  # typed column: no context
            ("SELECT envelope.rotate_data_key('no_such_tenant')", "42704"),
            ("SELECT envelope.disable_data_key('acme', 99)", "42704"),
        ):
            state, msg = sqlstate(c, q)
            assert state == want, (q, state, msg)
        # Inside a transaction block (the procedure commits) and under REPEATABLE READ: refused.
        with pytest.raises(psycopg.Error) as e:
            with c.transaction():
                c.execute("CALL envelope.reencrypt('t', 'v')")
        assert e.value.sqlstate == "2D000", e.value
        c.execute("SET default_transaction_isolation = 'repeatable read'")
        state, msg = sqlstate(c, "CALL envelope.reencrypt('t', 'v')")
        assert state == "25001" and "READ COMMITTED" in msg, (state, msg)
        c.execute("RESET default_transaction_isolation")
        assert not c.execute("SELECT * FROM envelope.reencrypt_jobs").fetchall()
        # Version states. The active version cannot be disabled or destroyed.
        assert sqlstate(c, "SELECT envelope.disable_data_key('acme', 2)")[0] == "55006"
        state, msg = sqlstate(c, "SELECT envelope.destroy_data_key('acme', 2)")
        assert state == "55006", (state, msg)
        # A retired version must be disabled before it is destroyed.
        assert sqlstate(c, "SELECT envelope.destroy_data_key('acme', 1)")[0] == "55000"
        assert c.execute("SELECT envelope.disable_data_key('acme', 1)").fetchone()[0] is True
        assert c.execute("SELECT envelope.disable_data_key('acme', 1)").fetchone()[0] is False  # no change
    # Disabled: refused in every backend at its next call (this one is new), distinctly.
    with connect(PORT_A, db) as c:
        c.execute("SET app.tenant_id = 'acme'")
        state, msg = sqlstate(c, "SELECT v::text FROM t WHERE id = 0")
        assert state == "55000" and "disabled" in msg, (state, msg)
        # Values under the active version are unaffected.
        with as_tenant(c, "acme"):
            c.execute("INSERT INTO t (id, tenant, v) VALUES (100, 'acme', 'v2 value'::text)")
            assert c.execute("SELECT v::text FROM t WHERE id = 100").fetchone()[0] == "v2 value"
        # Re-encryption cannot open values under a disabled version: the batch fails, nothing
        # is lost, the job stays open for after enable_data_key.
        state, msg = sqlstate(c, "CALL envelope.reencrypt('t', 'v')")
        assert state == "55000" and "disabled" in msg, (state, msg)
        # Destroying a version that tracked columns still use: refused, naming the column.
        state, msg = sqlstate(c, "SELECT envelope.destroy_data_key('acme', 1)")
        assert state == "2BP01" and "t.v" in msg, (state, msg)
        assert c.execute("SELECT envelope.enable_data_key('acme', 1)").fetchone()[0] is True
        c.execute("CALL envelope.reencrypt('t', 'v')")
        assert_all_under_active(c, "t", 11)
        with as_tenant(c, "acme"):
            assert sorted(v for (v,) in c.execute("SELECT v::text FROM t")) == sorted(
                [f"v1 value {i}" for i in range(10)] + ["v2 value"])
        # Nothing uses version 1 any more: it can be disabled and destroyed, for good.
        with as_tenant(c, "acme"):
            kept = c.execute("SELECT envelope.encrypt_field('x')").fetchone()[0]  # version 2, kept by the app
        c.execute("SELECT envelope.disable_data_key('acme', 1)")
        assert c.execute("SELECT envelope.destroy_data_key('acme', 1)").fetchone()[0] is True
        assert c.execute("SELECT state FROM envelope.key_versions WHERE tenant = 'acme' AND version = 1").fetchone()[0] == "destroyed"
        assert sqlstate(c, "SELECT envelope.enable_data_key('acme', 1)")[0] == "55000"
        # Version 2, still in use, destroyed by force: its values fail with "destroyed".
        assert c.execute("SELECT envelope.rotate_data_key('acme')").fetchone()[0] == 3
        c.execute("SELECT envelope.disable_data_key('acme', 2)")
        assert sqlstate(c, "SELECT envelope.destroy_data_key('acme', 2)")[0] == "2BP01"
        assert c.execute("SELECT envelope.destroy_data_key('acme', 2, force => true)").fetchone()[0] is True
    with connect(PORT_A, db) as c:
        c.execute("SET app.tenant_id = 'acme'")
        state, msg = sqlstate(c, "SELECT v::text FROM t WHERE id = 0")
        assert state == "42704" and "destroyed" in msg, (state, msg)
        state, msg = sqlstate(c, "SELECT envelope.decrypt_field(%s::bytea)", (kept,))
        assert state == "42704" and "destroyed" in msg, (state, msg)
