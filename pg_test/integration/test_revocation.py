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

from conftest import PORT_A, ROOT, as_tenant, connect, recreate_db, row_or_sqlstate, sh

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


def _role(c, name):
    c.execute(f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{name}') THEN CREATE ROLE {name} LOGIN; END IF; END $$")


def test_revocation_reaches_a_backend_whose_parallel_statement_spanned_it():
    """Insider review 36: under READ COMMITTED a parallel query reads keys under its own
    snapshot (PostgreSQL allows no newer one there). Reloads during a statement that spanned a
    revocation's commit recorded the new epoch against pre-revocation grants, and the backend
    kept decrypting for the key cache's TTL. What was read under a statement's snapshot now
    lasts for that statement only."""
    db, role = "rv_parallel", "rv_parallel_app"
    recreate_db(PORT_A, db)
    with connect(PORT_A, db) as c:
        _role(c, role)
        c.execute("CREATE EXTENSION pg_envelope")
        c.execute("SELECT envelope.create_tenant('acme')")
        c.execute("SELECT envelope.grant_tenant('acme', current_user)")
        c.execute("CREATE TABLE t (id int PRIMARY KEY, v bytea)")
        c.execute(f"GRANT SELECT ON t TO {role}")
        with as_tenant(c, "acme"):
            c.execute("INSERT INTO t SELECT g, envelope.encrypt_field('secret ' || g) FROM generate_series(1, 2000) g")
        c.execute("ANALYZE t")
    query = "SELECT id, pg_sleep(CASE WHEN id = 1 THEN 1.5 ELSE 0 END), envelope.decrypt_field(v) FROM t WHERE id <= 3"
    parallel = ["parallel_setup_cost = 0", "parallel_tuple_cost = 0", "min_parallel_table_scan_size = 0",
                "enable_indexscan = off", "enable_bitmapscan = off"]
    # A cold backend's keys are loaded inside a parallel query at every isolation level (under
    # REPEATABLE READ and SERIALIZABLE this failed with XX000, "cannot update SecondarySnapshot
    # during a parallel operation", before the lookups took catalog-style snapshots).
    with connect(PORT_A, db) as c:
        c.execute(f"SELECT envelope.grant_tenant('acme', '{role}')")
    for iso in ("READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"):
        with connect(PORT_A, db, user=role) as cold:
            for g in parallel + ["force_parallel_mode = on"]:
                cold.execute("SET " + g)
            cold.execute(f"BEGIN ISOLATION LEVEL {iso}")
            cold.execute("SELECT set_config('app.tenant_id', 'acme', true)")
            assert "Gather" in "\n".join(r[0] for r in cold.execute("EXPLAIN (COSTS OFF) SELECT envelope.decrypt_field(v) FROM t").fetchall())
            assert cold.execute("SELECT count(*), count(DISTINCT envelope.decrypt_field(v)) FROM t").fetchone() == (2000, 2000), iso
            cold.execute("COMMIT")
    for change, undo, expected in (
        (f"SELECT envelope.revoke_tenant('acme', '{role}')", None, "42501"),
        ("SELECT envelope.suspend_tenant('acme', 'parallel test')", "SELECT envelope.resume_tenant('acme')", "57000"),
    ):
        with connect(PORT_A, db) as c:
            c.execute(f"SELECT envelope.grant_tenant('acme', '{role}')")
        with connect(PORT_A, db, user=role) as app:
            app.execute("SET app.tenant_id = 'acme'")
            for g in parallel:
                app.execute("SET " + g)
            plan = "\n".join(r[0] for r in app.execute("EXPLAIN (COSTS OFF) " + query).fetchall())
            assert "Gather" in plan, plan
            assert app.execute("SELECT envelope.decrypt_field(v) FROM t WHERE id = 1").fetchone()[0] == "secret 1"
            out = {}

            def spanning():
                try:
                    out["rows"] = app.execute(query).fetchall()
                except psycopg.Error as e:
                    out["rows"] = e.sqlstate

            t = threading.Thread(target=spanning)
            t.start()
            time.sleep(0.5)
            with connect(PORT_A, db) as admin:
                admin.execute(change)
            spanned = t.is_alive()
            t.join(30)
            assert spanned, "the statement ended before the change committed: the test proves nothing"
            # The statement that spanned the commit may finish under its own snapshot (documented).
            # Every later one is refused, parallel or not.
            assert row_or_sqlstate(app, query) == expected
            app.execute("RESET ALL")
            app.execute("SET app.tenant_id = 'acme'")
            for _ in range(3):
                assert row_or_sqlstate(app, "SELECT envelope.decrypt_field(v) FROM t WHERE id = 5") == expected
                assert row_or_sqlstate(app, "SELECT envelope.encrypt_field('new')") == expected
        if undo:
            with connect(PORT_A, db) as c:
                c.execute(undo)
    with connect(PORT_A, "postgres") as c:
        c.execute(f"DROP DATABASE {db} WITH (FORCE)")


def test_a_call_spanning_a_key_change_sees_the_state_before_or_after_it():
    """Insider review 36: the grant check and the key load read the catalog at different
    moments, so one call could decrypt a value that neither the state before nor after a key
    administrator's transaction allowed (before: data key version 1 disabled; after: the role's
    grant revoked). They now read one snapshot. The lock on pg_auth_members only widens the
    window: the call reads the tenant directory, then waits for the role's memberships."""
    db, role, other = "rv_onemoment", "rv_onemoment_app", "rv_onemoment_other"
    recreate_db(PORT_A, db)
    with connect(PORT_A, db) as c:
        _role(c, role)
        _role(c, other)
        c.execute("CREATE EXTENSION pg_envelope")
        c.execute("SELECT envelope.create_tenant('mix')")
        c.execute("SELECT envelope.grant_tenant('mix', current_user)")
        c.execute(f"SELECT envelope.grant_tenant('mix', '{role}')")
        c.execute("SET app.tenant_id = 'mix'")
        v1 = c.execute("SELECT envelope.encrypt_field('under version 1')").fetchone()[0]
        c.execute("SELECT envelope.rotate_data_key('mix')")
        c.execute("SELECT envelope.disable_data_key('mix', 1)")
    app = connect(PORT_A, db, user=role)
    tx = connect(PORT_A, db)
    try:
        app.execute("SET app.tenant_id = 'mix'")
        assert row_or_sqlstate(app, "SELECT envelope.decrypt_field(%s::bytea)", (v1,)) == "55000"
        with connect(PORT_A, db) as c:
            c.execute(f"SELECT envelope.grant_tenant('mix', '{other}')")  # the app backend forgets its caches
        app.execute("SELECT 1")
        tx.execute("BEGIN")
        tx.execute("LOCK TABLE pg_catalog.pg_auth_members IN ACCESS EXCLUSIVE MODE")
        tx.execute(f"SELECT envelope.revoke_tenant('mix', '{role}')")
        tx.execute("SELECT envelope.enable_data_key('mix', 1)")
        out = {}
        pid = app.info.backend_pid

        def call():
            out["r"] = row_or_sqlstate(app, "SELECT envelope.decrypt_field(%s::bytea)", (v1,))

        t = threading.Thread(target=call)
        t.start()
        with connect(PORT_A, db) as w:
            deadline = time.monotonic() + 20
            while w.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted "
                            "AND relation = 'pg_catalog.pg_auth_members'::regclass", (pid,)).fetchone()[0] == 0:
                assert time.monotonic() < deadline, "the call did not wait for the memberships"
                time.sleep(0.02)
        tx.execute("COMMIT")
        t.join(30)
        # Before the change (55000) or after it (42501); never the plaintext.
        assert out["r"] in ("55000", "42501"), out
        assert row_or_sqlstate(app, "SELECT envelope.decrypt_field(%s::bytea)", (v1,)) == "42501"
    finally:
        if tx.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            tx.execute("ROLLBACK")
        tx.close()
        app.close()
    with connect(PORT_A, "postgres") as c:
        c.execute(f"DROP DATABASE {db} WITH (FORCE)")


def test_a_revocation_under_repeatable_read_never_misses_a_newer_grant():
    """Insider review 37: revoke_tenant deleted the grant under the transaction's snapshot.
    Under REPEATABLE READ or SERIALIZABLE a grant committed after that snapshot was invisible:
    nothing was deleted, the call returned false, and the role kept decrypting. Grant changes
    now serialize, and such a transaction fails with 40001 (the grant stays, visibly); under
    READ COMMITTED the same sequence revokes."""
    db, role = "rv_rr_revoke", "rv_rr_revoke_app"
    recreate_db(PORT_A, db)
    with connect(PORT_A, db) as c:
        _role(c, role)
        c.execute("CREATE EXTENSION pg_envelope")
        for t in ("acme", "globex"):
            c.execute("SELECT envelope.create_tenant(%s)", (t,))
            c.execute("SELECT envelope.grant_tenant(%s, current_user)", (t,))
        c.execute(f"SELECT envelope.grant_tenant('globex', '{role}')")  # the role holds another tenant
        c.execute("CREATE TABLE t (id int, v bytea)")
        c.execute(f"GRANT SELECT ON t TO {role}")
        with as_tenant(c, "acme"):
            c.execute("INSERT INTO t VALUES (7, envelope.encrypt_field('val7'))")

    def app_reads():
        with connect(PORT_A, db, user=role) as app:
            app.execute("SET app.tenant_id = 'acme'")
            return row_or_sqlstate(app, "SELECT envelope.decrypt_field(v) FROM t WHERE id = 7")

    for iso, expected in (("REPEATABLE READ", "40001"), ("SERIALIZABLE", "40001"), ("READ COMMITTED", (True,))):
        with connect(PORT_A, db) as c:
            c.execute(f"SELECT envelope.revoke_tenant('acme', '{role}')")
        assert app_reads() == "42501"
        a, b = connect(PORT_A, db), connect(PORT_A, db)
        try:
            a.execute(f"BEGIN ISOLATION LEVEL {iso}")
            a.execute("SELECT count(*) FROM envelope.tenant_grants")  # the snapshot is taken
            b.execute(f"SELECT envelope.grant_tenant('acme', '{role}')")
            assert app_reads() == ("val7",)
            got = row_or_sqlstate(a, f"SELECT envelope.revoke_tenant('acme', '{role}')")
            assert got == expected, (iso, got)
            a.execute("ROLLBACK" if expected == "40001" else "COMMIT")
        finally:
            a.close()
            b.close()
        # Refused: the grant is still there, and still works. Revoked: refused at once.
        assert app_reads() == (("val7",) if expected == "40001" else "42501"), iso
    with connect(PORT_A, "postgres") as c:
        c.execute(f"DROP DATABASE {db} WITH (FORCE)")
