"""Revocation at the tenant and system scopes, measured across many backends.

* 20 backends loop short decrypting statements of one tenant; `suspend_tenant` commits; every
  backend's next statement is refused with 57000 (the time from the commit to the last backend's
  refusal is reported, not asserted: see target/revocation-latency.json); a second tenant keeps
  working throughout. Then `resume_tenant`, and the same for `lockdown` / `lift_lockdown`.
* The same for `revoke_tenant` (42501; the role keeps its other tenant).
* A revocation committed while one long statement decrypts (6,000,000 values) stops that
  statement at its next value, under READ COMMITTED, REPEATABLE READ and SERIALIZABLE.
* A lockdown survives a restart of the server (the flag is restored from the data directory),
  a key administrator cannot lift it, a superuser can.
"""

import json
import threading
import time

import psycopg

from conftest import PORT_A, ROOT, as_tenant, connect, recreate_db, sh

DB = "rv_integ"
BACKENDS = 20
ADMIN = "rv_key_admin"


def setup_db():
    recreate_db(PORT_A, DB)
    with connect(PORT_A, DB) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        for t in ("victim", "bystander"):
            c.execute("SELECT envelope.create_tenant(%s)", (t,))
            c.execute("SELECT envelope.grant_tenant(%s, current_user)", (t,))
        c.execute("CREATE TABLE s (id int, tenant text, v envelope.encrypted_text)")
        for i, t in enumerate(("victim", "bystander")):
            with as_tenant(c, t):
                c.execute("INSERT INTO s VALUES (%s, %s, %s)", (i, t, f"secret-{t}"))
        c.execute(f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ADMIN}') THEN CREATE ROLE {ADMIN} LOGIN; END IF; END $$")
        c.execute(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA envelope TO {ADMIN}")


class Reader(threading.Thread):
    """A backend decrypting `tenant`'s value in a loop of short statements until refused."""

    def __init__(self, tenant, start_evt):
        super().__init__(daemon=True)
        self.tenant, self.start_evt = tenant, start_evt
        self.refused_at = None
        self.sqlstate = None
        self.calls = 0
        self.stop = False

    def run(self):
        with connect(PORT_A, DB) as c:
            c.execute("SELECT set_config('app.tenant_id', %s, false)", (self.tenant,))
            c.execute("SELECT v::text FROM s WHERE tenant = %s", (self.tenant,))  # keys cached
            self.start_evt.wait()
            while not self.stop:
                try:
                    c.execute("SELECT v::text FROM s WHERE tenant = %s", (self.tenant,)).fetchone()
                    self.calls += 1
                except psycopg.Error as e:
                    self.refused_at = time.monotonic()
                    self.sqlstate = e.sqlstate
                    return


def measure(revoke_sql, victim="victim"):
    """Starts BACKENDS readers of `victim` and one of the bystander, runs `revoke_sql`, and returns
    (seconds from its return to the last victim refusal, sqlstates, bystander calls after)."""
    go = threading.Event()
    readers = [Reader(victim, go) for _ in range(BACKENDS)]
    bystander = Reader("bystander", go)
    for r in readers + [bystander]:
        r.start()
    time.sleep(1.0)
    go.set()
    time.sleep(0.5)
    assert all(r.calls > 0 for r in readers), "the readers were not decrypting"
    with connect(PORT_A, DB) as c:
        sent = time.monotonic()
        c.execute(revoke_sql)
        t0 = time.monotonic()
    deadline = time.monotonic() + 30
    while any(r.refused_at is None for r in readers) and time.monotonic() < deadline:
        time.sleep(0.01)
    calls_before = bystander.calls
    time.sleep(0.3)
    bystander_after = bystander.calls - calls_before
    for r in readers + [bystander]:
        r.stop = True
    for r in readers + [bystander]:
        r.join(5)
    assert all(r.refused_at is not None for r in readers), "a backend kept decrypting"
    last = max(r.refused_at for r in readers)
    # (seconds after the call returned, which is negative when every backend was refused before
    # the caller got its answer; seconds after the call was sent)
    return (last - t0, last - sent), {r.sqlstate for r in readers}, bystander_after, bystander.sqlstate


def test_suspension_and_lockdown_reach_every_backend():
    setup_db()
    report = {}
    try:
        latency, states, bystander_calls, bystander_state = measure("SELECT envelope.suspend_tenant('victim', 'latency test')")
        assert states == {"57000"}, states
        assert bystander_calls > 0 and bystander_state is None, "the other tenant was affected"
        report["suspend_tenant"] = {"backends": BACKENDS, "seconds_after_commit_returned": round(latency[0], 4), "seconds_after_sent": round(latency[1], 4)}
        with connect(PORT_A, DB) as c:
            c.execute("SELECT envelope.resume_tenant('victim')")
            with as_tenant(c, "victim"):
                assert c.execute("SELECT v::text FROM s WHERE tenant = 'victim'").fetchone()[0] == "secret-victim"

        # The grant's revocation (the readers' role loses tenant victim, keeps bystander).
        latency, states, bystander_calls, bystander_state = measure("SELECT envelope.revoke_tenant('victim', current_user)")
        assert states == {"42501"}, states
        assert bystander_calls > 0 and bystander_state is None, "the other tenant was affected"
        report["revoke_tenant"] = {"backends": BACKENDS, "seconds_after_commit_returned": round(latency[0], 4), "seconds_after_sent": round(latency[1], 4)}
        with connect(PORT_A, DB) as c:
            c.execute("SELECT envelope.grant_tenant('victim', current_user)")

        latency, states, bystander_calls, bystander_state = measure("SELECT envelope.lockdown('latency test')")
        assert states == {"57000"}, states
        assert bystander_state == "57000", "a lockdown stops every tenant"
        report["lockdown"] = {"backends": BACKENDS, "seconds_after_call_returned": round(latency[0], 4), "seconds_after_sent": round(latency[1], 4)}
    finally:
        with connect(PORT_A, DB) as c:
            c.execute("SELECT envelope.lift_lockdown()")
            c.execute("SELECT envelope.resume_tenant('victim')")
    out = ROOT / "target" / "revocation-latency.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


def test_lockdown_survives_a_restart_and_only_a_superuser_lifts_it():
    setup_db()
    with connect(PORT_A, DB, user=ADMIN) as a:
        assert a.execute("SELECT envelope.lockdown('restart drill')").fetchone()[0] is True
    try:
        sh("bash", str(ROOT / "scripts/cluster.sh"), "stop")
        sh("bash", str(ROOT / "scripts/cluster.sh"), "start")
        deadline = time.time() + 30
        while True:
            try:
                c = connect(PORT_A, DB)
                break
            except psycopg.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        with c:
            s = c.execute("SELECT envelope.status()->'lockdown'").fetchone()[0]
            assert s["active"] is True and "restart drill" in s["reason"], s
            with as_tenant(c, "bystander"):
                try:
                    c.execute("SELECT v::text FROM s WHERE tenant = 'bystander'")
                    raise AssertionError("decrypted in a lockdown after a restart")
                except psycopg.Error as e:
                    assert e.sqlstate == "57000", e
        with connect(PORT_A, DB, user=ADMIN) as a:
            try:
                a.execute("SELECT envelope.lift_lockdown()")
                raise AssertionError("a key administrator lifted the lockdown")
            except psycopg.Error as e:
                assert e.sqlstate == "42501", e
    finally:
        with connect(PORT_A, DB) as c:
            c.execute("SELECT envelope.lift_lockdown()")
    with connect(PORT_A, DB) as c:
        with as_tenant(c, "bystander"):
            assert c.execute("SELECT v::text FROM s WHERE tenant = 'bystander'").fetchone()[0] == "secret-bystander"


def test_revocation_stops_a_long_statement_midway():
    """Security checklist row 11: a revocation takes effect at the next call, and a call is a
    value, not a statement: a statement that is decrypting millions of values when the revocation
    commits fails with 42501 there, at every isolation level (its snapshot predates the commit)."""
    role = "rv_long_reader"
    recreate_db(PORT_A, "rv_long")
    with connect(PORT_A, "rv_long") as c:
        c.execute(f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN CREATE ROLE {role} LOGIN; END IF; END $$")
        c.execute("CREATE EXTENSION pg_envelope")
        c.execute("SELECT envelope.create_tenant('acme')")
        c.execute("SELECT envelope.grant_tenant('acme', current_user)")
        c.execute("CREATE TABLE big (id int, v envelope.encrypted_text)")
        c.execute(f"GRANT SELECT ON big TO {role}")
        with as_tenant(c, "acme"):
            c.execute("INSERT INTO big SELECT i, ('value ' || i)::text FROM generate_series(1, 1000000) i")
    for iso in ("READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"):
        with connect(PORT_A, "rv_long") as c:
            c.execute(f"SELECT envelope.grant_tenant('acme', '{role}')")
        with connect(PORT_A, "rv_long", user=role) as app:
            app.execute("SET app.tenant_id = 'acme'")
            assert app.execute("SELECT v::text FROM big WHERE id = 7").fetchone()[0] == "value 7"  # keys cached
            app.execute(f"BEGIN ISOLATION LEVEL {iso}")
            assert app.execute("SELECT v::text FROM big WHERE id = 8").fetchone()[0] == "value 8"  # snapshot taken
            result = {}

            def long_statement():
                try:
                    result["count"] = app.execute("SELECT count(v::text) FROM big, generate_series(1, 6) g").fetchone()[0]
                except psycopg.Error as e:
                    result["sqlstate"] = e.sqlstate

            t = threading.Thread(target=long_statement)
            t.start()
            with connect(PORT_A, "rv_long") as admin:
                # Wait until the statement is running (and has decrypted for a while).
                deadline = time.monotonic() + 20
                while admin.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND state = 'active' "
                                    "AND query LIKE 'SELECT count(v::text)%%'", (role,)).fetchone()[0] == 0:
                    assert time.monotonic() < deadline, "the statement did not start"
                    time.sleep(0.01)
                time.sleep(0.2)
                assert t.is_alive(), "the statement ended before the revocation: the test proves nothing"
                admin.execute(f"SELECT envelope.revoke_tenant('acme', '{role}')")
                revoked_while_running = t.is_alive()
            t.join(60)
            assert revoked_while_running, "the statement ended before the revocation committed: the test proves nothing"
            assert result == {"sqlstate": "42501"}, (iso, result)
            app.execute("ROLLBACK")
    with connect(PORT_A, "postgres") as c:
        c.execute("DROP DATABASE rv_long WITH (FORCE)")
