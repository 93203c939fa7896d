"""Nonce uniqueness at scale, CI size (issue 16, item 3): scripts/nonces.py with 10^6 values over
64 backends, half before a server restart and half after, on its own cluster (127.0.0.1:54351,
instance pg15-nonce-ci, removed afterwards). The full run (10^7 values, port 54341) is the same
script with its defaults; see docs/testing.md.

And security checklist row 10 on the project's cluster: a backend killed with SIGKILL in the
middle of its work leaves no counter behind for another process to reset and reuse.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psycopg

from conftest import PORT_A, ROOT, as_tenant, connect, recreate_db

N = 1_000_000
BACKENDS = 64


def test_no_nonce_repeats_across_64_backends_and_a_restart(tmp_path):
    out = tmp_path / "nonces.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts/nonces.py"), "-n", str(N), "-b", str(BACKENDS), "-r", "1",
         "--late-delay", "1", "--churn", "50", "--port", "54351", "--instance", "pg15-nonce-ci", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert out.exists(), r.stdout + r.stderr
    rep = json.loads(out.read_text())
    assert r.returncode == 0 and rep["ok"], (rep.get("problems"), r.stdout[-3000:], r.stderr[-3000:])
    # Exactly what was planned: N values from the client backends, plus the values the worker
    # re-encrypted (written once by a client backend, once more by the worker).
    reenc = rep["worker_reencryptions"]
    assert reenc == N // 50
    assert rep["encryptions"] == N + 2 * reenc == rep["distinct_nonces"]
    assert rep["duplicate_nonces"] == 0 and rep["duplicate_rows"] == 0
    assert rep["duplicate_suffixes"] == 0
    assert rep["shared_prefixes"] == 0 and rep["backends_with_several_prefixes_per_key"] == 0
    assert rep["client_backends"] == BACKENDS and rep["backend_type"] == "client backend"
    assert rep["postmaster_starts"] == 2
    assert rep["worker_backend_type"] == ["pg_envelope maintenance"]
    # Three data keys: tenant A before and after the rotation, tenant B; counts as planned.
    assert {k: v["values"] for k, v in rep["per_key"].items()} == rep["expected_per_key"]
    assert len(rep["per_key"]) == 3
    # The checks can fail: one copied nonce is found, a nonce under another key is not counted.
    assert rep["control"] == {"duplicate_nonces": 1, "duplicate_rows": 1, "duplicate_suffixes": 1, "shared_prefixes": 1}
    # The offsets used by the SQL were checked against parsed envelopes.
    assert rep["layout"]["nonce_sql"] == "substring(e FROM 43 FOR 24)"


def _nonces(conn, table):
    # Envelope layout (docs/envelope-format.md): 42-byte header, then the 24-byte nonce whose
    # first 12 bytes are the writing backend's prefix for this data key.
    return conn.execute(
        f"SELECT w, substring(e FROM 43 FOR 12), substring(e FROM 43 FOR 24) FROM {table}").fetchall()


def test_a_backend_killed_with_sigkill_leaves_no_nonce_space_to_reuse():
    """Checklist row 10. Each backend counts its uses of a derived key (one per random 96-bit
    nonce prefix) in its own memory only. A backend killed with SIGKILL while encrypting takes
    the count with it, and the crash restart takes every other backend's too: the processes
    that write next, a reused pid among them, draw fresh prefixes, and so fresh derived keys
    and counts. No nonce repeats, no prefix is shared, and the killed backend's committed values
    still decrypt."""
    db = "nonce_kill9"
    recreate_db(PORT_A, db)
    with connect(PORT_A, db) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        c.execute("SELECT envelope.create_tenant('acme')")
        c.execute("SELECT envelope.grant_tenant('acme', current_user)")
        c.execute("CREATE TABLE n (w text, e bytea)")
    victim = connect(PORT_A, db)
    pid = victim.info.backend_pid
    with as_tenant(victim, "acme"):
        victim.execute("INSERT INTO n SELECT 'victim', envelope.encrypt_field('v' || i) FROM generate_series(1, 2000) i")
    # Killed in the middle of a long encrypting statement (its values roll back).
    victim.execute("SELECT set_config('app.tenant_id', 'acme', false)")
    killer_done = []

    def kill_soon():
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        killer_done.append(True)

    t = threading.Thread(target=kill_soon)
    t.start()
    try:
        victim.execute("INSERT INTO n SELECT 'lost', envelope.encrypt_field('x' || i) FROM generate_series(1, 20000000) i")
        raise AssertionError("the statement outlived the kill")
    except psycopg.OperationalError:
        pass
    t.join()
    victim.close()
    deadline = time.monotonic() + 60
    while True:
        try:
            probe = connect(PORT_A, db)
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, "the server did not come back after the crash"
            time.sleep(0.2)
    with probe:
        # PostgreSQL restarted every backend: the postmaster's crash recovery ran.
        assert probe.execute("SELECT count(*) FROM n WHERE w = 'lost'").fetchone()[0] == 0
    writers = []
    for k in range(8):
        with connect(PORT_A, db) as c:
            writers.append(c.info.backend_pid)
            with as_tenant(c, "acme"):
                c.execute("INSERT INTO n SELECT %s, envelope.encrypt_field('w' || i) FROM generate_series(1, 2000) i", (f"w{k}",))
    with connect(PORT_A, db) as c:
        rows = _nonces(c, "n")
        assert len(rows) == 9 * 2000
        nonces = [bytes(r[2]) for r in rows]
        assert len(set(nonces)) == len(nonces), "a nonce repeated"
        prefixes = {}
        for w, prefix, _ in rows:
            prefixes.setdefault(w, set()).add(bytes(prefix))
        assert all(len(p) == 1 for p in prefixes.values()), "a backend used several prefixes for one key"
        assert len({next(iter(p)) for p in prefixes.values()}) == 9, "two backends shared a prefix"
        with as_tenant(c, "acme"):
            assert c.execute("SELECT count(*) FROM n WHERE w = 'victim' AND envelope.decrypt_field(e) LIKE 'v%'").fetchone()[0] == 2000
    with connect(PORT_A, "postgres") as c:
        c.execute(f"DROP DATABASE {db} WITH (FORCE)")
