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
        init = http_json("PUT", f"{self.addr}/v1/sys/init", {"secret_shares": 1, "secret_threshold": 1})
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
        http_json("PUT", f"{self.addr}/v1/sys/unseal", {"key": self.unseal_key})
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


def add_tenants(conn, tenants, provider, table="kv", rows=5):
    create_table(conn, table)
    for i, t in enumerate(tenants):
        conn.execute("SELECT envelope.create_tenant(%s, provider => %s)", (t, provider))
        conn.execute("SELECT envelope.grant_tenant(%s, current_user)", (t,))
        with as_tenant(conn, t):
            conn.execute(
                f"INSERT INTO {table} (id, tenant, v) SELECT %s * 1000 + g, %s, ('secret of ' || %s || ' #' || g)::text "
                "FROM generate_series(1, %s) g",
                (i, t, t, rows),
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
