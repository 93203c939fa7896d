"""Hot standbys: the maintenance worker does nothing there and starts once promoted; revocations
made on the primary reach the standby's backends at their next call.

A streaming standby of the project's cluster (pg_basebackup -R) runs on 127.0.0.1:54318 with its
own socket directory; it is removed afterwards.
"""

import shutil
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import psycopg

from conftest import BIN, PORT_A, SOCK, STATE, as_tenant, recreate_db, sh

PORT = 54318
DATA = STATE / "pg15-standby" / "data"
SOCKDIR = STATE / "pg15-standby" / "run"


def as_postgres(*args, check=True):
    return sh("sudo", "-u", "postgres", *args, check=check)


def workers(conn):
    return [r[0] for r in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_envelope maintenance'").fetchall()]


def wait_for(pred, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            v = pred()
            if v:
                return v
        except psycopg.OperationalError:
            pass
        time.sleep(0.2)
    return pred()


def test_worker_idle_on_standby_starts_after_promotion():
    with psycopg.connect(host=SOCK, port=PORT_A, dbname="postgres", user="postgres", autocommit=True) as c:
        # The primary runs its worker (envelope.database = postgres by default).
        assert wait_for(lambda: workers(c), 15), "no maintenance worker on the primary"
    with standby() as connect:
        with connect() as s:
            assert s.execute("SELECT pg_is_in_recovery()").fetchone()[0]
            assert "pg_envelope" in s.execute("SHOW shared_preload_libraries").fetchone()[0]
            time.sleep(3)
            assert workers(s) == [], "a maintenance worker runs on a hot standby"
        as_postgres(f"{BIN}/pg_ctl", "-D", str(DATA), "-w", "promote")
        with connect() as s:
            assert not s.execute("SELECT pg_is_in_recovery()").fetchone()[0]
            assert wait_for(lambda: workers(s), 20), "no maintenance worker after promotion"


@contextmanager
def standby():
    if DATA.parent.exists():
        as_postgres(f"{BIN}/pg_ctl", "-D", str(DATA), "-m", "immediate", "stop", check=False)
        shutil.rmtree(DATA.parent)
    SOCKDIR.mkdir(parents=True)
    shutil.chown(DATA.parent, "postgres", "postgres")
    shutil.chown(SOCKDIR, "postgres", "postgres")
    try:
        as_postgres(f"{BIN}/pg_basebackup", "-h", SOCK, "-p", str(PORT_A), "-U", "postgres", "-D", str(DATA), "-R", "-X", "stream", "-c", "fast")
        as_postgres(f"{BIN}/pg_ctl", "-D", str(DATA), "-w", "-l", str(DATA.parent / "server.log"), "-o",
                    f"-p {PORT} -c listen_addresses=127.0.0.1 -c unix_socket_directories={SOCKDIR}", "start")
        yield lambda db="postgres": psycopg.connect(host=str(SOCKDIR), port=PORT, dbname=db, user="postgres", autocommit=True)
    finally:
        as_postgres(f"{BIN}/pg_ctl", "-D", str(DATA), "-m", "immediate", "stop", check=False)
        # Keep the standby's log (a failed start says why there), then remove the rest.
        log = DATA.parent / "server.log"
        if log.exists():
            shutil.copy(log, STATE / "pg15-standby-last.log")
            print(log.read_text(errors="replace")[-3000:])
        shutil.rmtree(DATA.parent, ignore_errors=True)


def test_revocations_reach_standby_backends_at_their_next_call():
    """A standby never sees the primary's shared-memory epoch: the relation-cache invalidation of
    envelope.tenants that every key change commits travels in the WAL, and a standby backend that
    replays it drops its cached keys before its next call, which then reads the suspension (or
    the missing grant, or the shred) from the replayed catalog. Without it, a standby would serve
    a suspended tenant from its cache for up to envelope.key_cache_ttl (1 h)."""
    db = "envelope_standby"
    recreate_db(PORT_A, db)
    primary = psycopg.connect(host=SOCK, port=PORT_A, dbname=db, user="postgres", autocommit=True)
    with primary:
        primary.execute("CREATE EXTENSION pg_envelope")
        for t in ("sb_a", "sb_b"):
            primary.execute("SELECT envelope.create_tenant(%s)", (t,))
            primary.execute("SELECT envelope.grant_tenant(%s, current_user)", (t,))
        primary.execute("CREATE TABLE s (tenant text, v envelope.encrypted_text)")
        for t in ("sb_a", "sb_b"):
            with as_tenant(primary, t):
                primary.execute("INSERT INTO s VALUES (%s, (%s || ' on the standby')::text)", (t, t))

        def replayed(conn):
            lsn = primary.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            assert wait_for(lambda: conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0], 20)

        def read(conn, tenant):
            try:
                with as_tenant(conn, tenant):
                    return conn.execute("SELECT v::text FROM s WHERE tenant = %s AND v::text LIKE '%% on the standby'", (tenant,)).fetchone()[0]
            except psycopg.Error as e:
                return e.sqlstate

        with standby() as connect_standby, connect_standby(db) as sb:
            assert sb.execute("SELECT pg_is_in_recovery()").fetchone()[0]
            # A physical (streaming) standby holds ciphertext only: its copy of the table and the
            # WAL it received (security checklist row 27). Written now, so both travel in the WAL
            # stream: a secret stored encrypted, and a control marker stored in clear (the scan
            # must find the marker, or it proves nothing).
            secret, marker = f"standby-secret-{uuid.uuid4().hex}", f"standby-control-{uuid.uuid4().hex}"
            with as_tenant(primary, "sb_a"):
                primary.execute("INSERT INTO s VALUES ('sb_a', %s::text)", (secret,))
            primary.execute("CREATE TABLE standby_control (v text)")
            primary.execute("INSERT INTO standby_control VALUES (%s)", (marker,))
            replayed(sb)
            sb.execute("CHECKPOINT")  # a restartpoint: replayed pages reach the standby's files
            rels = [sb.execute("SELECT pg_relation_filepath(%s)", (r,)).fetchone()[0] for r in ("s", "standby_control")]
            files = [str(p) for r in rels for p in DATA.glob(r + "*")] + sorted(str(p) for p in (DATA / "pg_wal").glob("0*"))
            text = "".join(subprocess.run(["strings", "-a", f], capture_output=True, text=True).stdout for f in files)
            assert marker in text, "control marker not found in the standby's files: method broken"
            assert secret not in text and "on the standby" not in text, "plaintext in the standby's files"
            primary.execute("DROP TABLE standby_control")
            assert read(sb, "sb_a") == "sb_a on the standby"  # cached in this standby backend now
            primary.execute("SELECT envelope.suspend_tenant('sb_a', 'standby test')")
            replayed(sb)
            assert read(sb, "sb_a") == "57000", "a suspension on the primary must reach the standby's next call"
            assert read(sb, "sb_b") == "sb_b on the standby"
            primary.execute("SELECT envelope.resume_tenant('sb_a')")
            replayed(sb)
            assert read(sb, "sb_a") == "sb_a on the standby"
            primary.execute("SELECT envelope.revoke_tenant('sb_a', current_user)")
            replayed(sb)
            assert read(sb, "sb_a") == "42501"
            primary.execute("SELECT envelope.grant_tenant('sb_a', current_user)")
            assert read(sb, "sb_b") == "sb_b on the standby"
            primary.execute("SET envelope.shred_min_delay = 0")
            primary.execute("SELECT envelope.schedule_shred('sb_b', '1 second')")
            replayed(sb)
            assert read(sb, "sb_b") == "57000"
            time.sleep(1.1)
            primary.execute("CALL envelope.run_maintenance()")
            replayed(sb)
            assert read(sb, "sb_b") == "42704", "a shredded tenant on the standby"
            assert read(sb, "sb_a") == "sb_a on the standby"


def test_audit_on_a_standby_fails_closed_or_logs_unchained_records():
    """A standby is read-only: the audit trail cannot be written there. With envelope.audit on,
    key use on the standby is refused (57P03) unless envelope.audit_fail_closed is off there;
    then each statement's record goes to the standby's server log as JSON (not chained), and the
    primary's trail is untouched."""
    db = "envelope_standby_audit"
    recreate_db(PORT_A, db)
    with psycopg.connect(host=SOCK, port=PORT_A, dbname=db, user="postgres", autocommit=True) as primary:
        primary.execute("CREATE EXTENSION pg_envelope")
        primary.execute("SELECT envelope.create_tenant('sb_audit')")
        primary.execute("SELECT envelope.grant_tenant('sb_audit', current_user)")
        primary.execute("CREATE TABLE s (v envelope.encrypted_text)")
        with as_tenant(primary, "sb_audit"):
            primary.execute("INSERT INTO s SELECT ('secret-standby-' || g)::text FROM generate_series(1, 5) g")
        lsn = primary.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        with standby() as connect_standby, connect_standby(db) as sb:
            assert wait_for(lambda: sb.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0], 20)
            sb.execute("ALTER SYSTEM SET envelope.audit = on")
            sb.execute("SELECT pg_reload_conf()")
            time.sleep(0.5)
            try:
                with as_tenant(sb, "sb_audit"):
                    sb.execute("SELECT count(v::text) FROM s")
                raise AssertionError("decryption on an audited standby was not refused")
            except psycopg.Error as e:
                assert e.sqlstate == "57P03" and "hot standby" in (e.diag.message_detail or ""), (e.sqlstate, e.diag.message_detail)
            sb.execute("ALTER SYSTEM SET envelope.audit_fail_closed = off")
            sb.execute("SELECT pg_reload_conf()")
            time.sleep(0.5)
            sb.execute("SET envelope.request_id = 'on-the-standby'")
            with as_tenant(sb, "sb_audit"):
                assert sb.execute("SELECT count(v::text) FROM s").fetchone()[0] == 5
                sb.execute("SELECT 1")
            sb.execute("SELECT 1")
            log = (DATA.parent / "server.log").read_text(errors="replace")
            lines = [l for l in log.splitlines() if "pg_envelope audit (standby, not chained):" in l and "on-the-standby" in l]
            assert lines, "no audit line in the standby's log"
            rec = __import__("json").loads(lines[0].split("not chained): ", 1)[1])
            assert (rec["kind"], rec["tenant"], rec["value_count"], rec["outcome"]) == ("decrypt", "sb_audit", 5, "ok"), rec
            assert "secret-standby" not in log
