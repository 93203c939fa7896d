"""The maintenance worker does nothing on a hot standby and starts once it is promoted.

A streaming standby of the project's cluster (pg_basebackup -R) runs on 127.0.0.1:54318 with its
own socket directory; it is removed afterwards.
"""

import shutil
import time
from pathlib import Path

import psycopg

from conftest import BIN, PORT_A, SOCK, STATE, sh

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
    if DATA.parent.exists():
        as_postgres(f"{BIN}/pg_ctl", "-D", str(DATA), "-m", "immediate", "stop", check=False)
        shutil.rmtree(DATA.parent)
    SOCKDIR.mkdir(parents=True)
    shutil.chown(DATA.parent, "postgres", "postgres")
    shutil.chown(SOCKDIR, "postgres", "postgres")
    try:
        as_postgres(f"{BIN}/pg_basebackup", "-h", SOCK, "-p", str(PORT_A), "-U", "postgres", "-D", str(DATA), "-R", "-X", "stream")
        as_postgres(f"{BIN}/pg_ctl", "-D", str(DATA), "-w", "-l", str(DATA.parent / "server.log"), "-o",
                    f"-p {PORT} -c listen_addresses=127.0.0.1 -c unix_socket_directories={SOCKDIR}", "start")
        connect = lambda: psycopg.connect(host=str(SOCKDIR), port=PORT, dbname="postgres", user="postgres", autocommit=True)
        with connect() as s:
            assert s.execute("SELECT pg_is_in_recovery()").fetchone()[0]
            assert "pg_envelope" in s.execute("SHOW shared_preload_libraries").fetchone()[0]
            time.sleep(3)
            assert workers(s) == [], "a maintenance worker runs on a hot standby"
        as_postgres(f"{BIN}/pg_ctl", "-D", str(DATA), "-w", "promote")
        with connect() as s:
            assert not s.execute("SELECT pg_is_in_recovery()").fetchone()[0]
            assert wait_for(lambda: workers(s), 20), "no maintenance worker after promotion"
    finally:
        as_postgres(f"{BIN}/pg_ctl", "-D", str(DATA), "-m", "immediate", "stop", check=False)
        shutil.rmtree(DATA.parent, ignore_errors=True)
