"""Blind indexes (issue 14) as applications and operators use them: lookups under Row-Level
Security by a role that is not a superuser (the planner still uses the term index: the operators
are LEAKPROOF), terms through COPY (text and binary), pg_dump/pg_restore and logical replication
without any key, malformed binary input, revocation and crypto-shredding at the next call (in an
open REPEATABLE READ transaction too), and the audit record of term lookups."""

import subprocess
import time

import psycopg
import pytest

from conftest import BIN, PORT_A, SOCK, as_tenant, connect, recreate_db

DB = "envelope_search"
ROLE = "search_app"


def sqlstate_of(c, q, args=None):
    try:
        with c.transaction():
            c.execute(q, args)
    except psycopg.Error as e:
        return e.sqlstate
    return None


@pytest.fixture(scope="module")
def search_db():
    recreate_db(PORT_A, DB)
    with connect(PORT_A, DB) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        c.execute(f"DROP ROLE IF EXISTS {ROLE}")
        c.execute(f"CREATE ROLE {ROLE} LOGIN")
        for t in ("s_acme", "s_globex"):
            c.execute("SELECT envelope.create_tenant(%s)", (t,))
            c.execute("SELECT envelope.grant_tenant(%s, current_user)", (t,))
            c.execute("SELECT envelope.grant_tenant(%s, %s)", (t, ROLE))
        c.execute("SELECT envelope.declare_blind_index('users.email', 'nfkc_casefold')")
        c.execute("CREATE TABLE users (id int PRIMARY KEY, tenant text NOT NULL, email envelope.encrypted_text,"
                  " email_idx envelope.blind_index)")
        c.execute("CREATE UNIQUE INDEX users_email ON users (tenant, email_idx)")
        c.execute("CREATE INDEX users_email_only ON users (email_idx)")
        c.execute("CREATE TRIGGER users_email_idx BEFORE INSERT OR UPDATE ON users FOR EACH ROW"
                  " EXECUTE FUNCTION envelope.blind_index_trigger('email', 'email_idx', 'users.email')")
        for base, t in ((0, "s_acme"), (5000, "s_globex")):
            with as_tenant(c, t):
                c.execute("INSERT INTO users SELECT g, %s, ('user' || g || '@' || %s || '.test')::text, NULL"
                          " FROM generate_series(%s::int, %s::int) g", (t, t, base + 1, base + 5000))
        c.execute("ALTER TABLE users ENABLE ROW LEVEL SECURITY")
        c.execute("ALTER TABLE users FORCE ROW LEVEL SECURITY")
        c.execute("CREATE POLICY tenant_rows ON users USING (tenant = current_setting('app.tenant_id', true))")
        c.execute(f"GRANT SELECT, INSERT, UPDATE ON users TO {ROLE}")
        c.execute("ANALYZE users")
    yield DB
    with connect(PORT_A) as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        c.execute(f"DROP DATABASE IF EXISTS {DB}_restored WITH (FORCE)")
        c.execute(f"DROP ROLE IF EXISTS {ROLE}")


def lookup(c, tenant, email):
    with as_tenant(c, tenant):
        return [r[0] for r in c.execute(
            "SELECT id FROM users WHERE email_idx = envelope.blind_index('users.email', %s) ORDER BY id", (email,)).fetchall()]


def test_rls_lookup_by_an_application_role_uses_the_index(search_db):
    """A role that is not the owner, under the table's policy (FORCE ROW LEVEL SECURITY on)."""
    with connect(PORT_A, search_db, user=ROLE) as c:
        with as_tenant(c, "s_acme"):
            plan = "\n".join(r[0] for r in c.execute(
                "EXPLAIN SELECT id FROM users WHERE email_idx = envelope.blind_index('users.email', 'user42@s_acme.test')").fetchall())
        # The term condition is an index condition, not a filter applied after the policy's (a
        # qual that is not LEAKPROOF cannot be moved ahead of the RLS policy).
        assert "Index Cond: (email_idx = envelope.blind_index(" in plan or "AND (email_idx = envelope.blind_index(" in plan, plan
        assert lookup(c, "s_acme", "USER42@S_ACME.TEST") == [42]
        # The other tenant's row is neither visible (RLS) nor matched by this tenant's term.
        assert lookup(c, "s_acme", "user5042@s_globex.test") == []
        assert lookup(c, "s_globex", "user5042@s_globex.test") == [5042]


def test_a_role_without_the_grant_gets_the_decryption_error_not_an_empty_result(search_db):
    with connect(PORT_A, search_db) as c:
        c.execute("DROP ROLE IF EXISTS search_nogrant")
        c.execute("CREATE ROLE search_nogrant LOGIN")
        c.execute("GRANT SELECT ON users TO search_nogrant")
    try:
        with connect(PORT_A, search_db, user="search_nogrant") as c:
            with pytest.raises(psycopg.Error) as err:
                lookup(c, "s_acme", "user42@s_acme.test")
            assert err.value.sqlstate == "42501"
    finally:
        with connect(PORT_A, search_db) as c:
            c.execute("REVOKE ALL ON users FROM search_nogrant")
            c.execute("DROP ROLE search_nogrant")


def test_terms_round_trip_through_copy_text_and_binary_and_bad_binary_is_refused(search_db):
    with connect(PORT_A, search_db) as c:
        c.execute("CREATE TEMP TABLE copied (id int, email_idx envelope.blind_index)")
        for fmt in ("text", "binary"):
            c.execute("TRUNCATE copied")
            buf = bytearray()
            with c.cursor().copy(f"COPY (SELECT id, email_idx FROM users) TO STDOUT (FORMAT {fmt})") as cp:
                for chunk in cp:
                    buf += chunk
            with c.cursor().copy(f"COPY copied FROM STDIN (FORMAT {fmt})") as cp:
                cp.write(bytes(buf))
            assert c.execute("SELECT count(*) FROM copied JOIN users u USING (id) WHERE copied.email_idx = u.email_idx").fetchone()[0] == 10000
        # A binary term of the wrong length, and a text term with a wrong form: clear errors.
        header = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
        row = b"\x00\x02" + (4).to_bytes(4, "big") + (1).to_bytes(4, "big", signed=True) + (5).to_bytes(4, "big") + b"\x01\x00\x00\x00\x01"
        with pytest.raises(psycopg.Error) as err:
            with c.transaction():
                with c.cursor().copy("COPY copied FROM STDIN (FORMAT binary)") as cp:
                    cp.write(header + row + b"\xff\xff")
        assert err.value.sqlstate == "22P02", err.value
        assert c.execute("SELECT 1").fetchone()[0] == 1  # the backend is fine


def test_pg_dump_and_restore_keep_terms_matching(search_db):
    blob = subprocess.run([f"{BIN}/pg_dump", "-h", SOCK, "-p", str(PORT_A), "-U", "postgres", "-Fc", search_db],
                          check=True, capture_output=True).stdout
    target = f"{search_db}_restored"
    recreate_db(PORT_A, target)
    r = subprocess.run([f"{BIN}/pg_restore", "-h", SOCK, "-p", str(PORT_A), "-U", "postgres", "-d", target, "--exit-on-error"],
                       input=blob, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    with connect(PORT_A, target) as c:
        assert c.execute("SELECT count(*) FROM envelope.index_keys").fetchone()[0] == 2
        assert c.execute("SELECT count(*) FROM envelope.blind_index_purposes").fetchone()[0] == 1
        # The index keys travelled with the dump (wrapped): the restored terms still match.
        assert lookup(c, "s_globex", "User5077@s_globex.test") == [5077]
        with as_tenant(c, "s_acme"):
            c.execute("INSERT INTO users VALUES (20000, 's_acme', 'restored@s_acme.test'::text, NULL)")
        assert lookup(c, "s_acme", "RESTORED@s_acme.test") == [20000]


def test_logical_replication_carries_terms_without_keys(search_db, cluster_b):
    with connect(PORT_A, search_db) as c:
        c.execute("DROP PUBLICATION IF EXISTS search_pub")
        c.execute("CREATE PUBLICATION search_pub FOR TABLE users")
    recreate_db(cluster_b, "search_sub")
    try:
        with connect(cluster_b, "search_sub") as c:
            # The subscriber has the types but no tenant and no key.
            c.execute("CREATE EXTENSION pg_envelope")
            c.execute("CREATE TABLE users (id int PRIMARY KEY, tenant text NOT NULL, email envelope.encrypted_text,"
                      " email_idx envelope.blind_index)")
            c.execute(f"CREATE SUBSCRIPTION search_sub CONNECTION 'host={SOCK} port={PORT_A} dbname={search_db} user=postgres'"
                      " PUBLICATION search_pub")
            deadline = time.monotonic() + 30
            while c.execute("SELECT count(*) FROM users").fetchone()[0] < 10000 and time.monotonic() < deadline:
                time.sleep(0.2)
            sub = dict(c.execute("SELECT id, email_idx::text FROM users").fetchall())
        with connect(PORT_A, search_db) as c:
            pub = dict(c.execute("SELECT id, email_idx::text FROM users WHERE id <= 10000").fetchall())
        assert {k: sub.get(k) for k in pub} == pub
    finally:
        with connect(cluster_b, "search_sub") as c:
            c.execute("ALTER SUBSCRIPTION search_sub DISABLE")
            c.execute("ALTER SUBSCRIPTION search_sub SET (slot_name = NONE)")
            c.execute("DROP SUBSCRIPTION search_sub")
        with connect(PORT_A, search_db) as c:
            c.execute("SELECT pg_drop_replication_slot('search_sub') FROM pg_replication_slots WHERE slot_name = 'search_sub'")
            c.execute("DROP PUBLICATION search_pub")


def test_terms_are_separated_across_tenants_and_purposes(search_db):
    """100,000 random values under two tenants share no term; the same under two purposes."""
    with connect(PORT_A, search_db) as c:
        c.execute("SELECT envelope.declare_blind_index('sep.a'), envelope.declare_blind_index('sep.b')")
        c.execute("CREATE TEMP TABLE vals AS SELECT md5(random()::text || g) AS v FROM generate_series(1, 100000) g")
        c.execute("CREATE TEMP TABLE terms (who text, t envelope.blind_index)")
        for tenant in ("s_acme", "s_globex"):
            with as_tenant(c, tenant):
                c.execute("INSERT INTO terms SELECT %s, envelope.blind_index('sep.a', v) FROM vals", (tenant,))
        with as_tenant(c, "s_globex"):
            c.execute("INSERT INTO terms SELECT 'purpose b', envelope.blind_index('sep.b', v) FROM vals")
        counts = dict(c.execute("SELECT who, count(DISTINCT t) FROM terms GROUP BY who").fetchall())
        assert counts == {"s_acme": 100000, "s_globex": 100000, "purpose b": 100000}, counts
        shared = c.execute("SELECT count(*) FROM (SELECT t FROM terms GROUP BY t HAVING count(DISTINCT who) > 1) x").fetchone()[0]
        assert shared == 0


def test_terms_are_the_same_in_every_backend_after_a_restart_and_need_no_key_for_maintenance(search_db):
    from conftest import ROOT, sh
    with connect(PORT_A, search_db) as a, connect(PORT_A, search_db) as b:
        ta = lookup_term(a)
        assert ta == lookup_term(b)
        # Maintenance of the term index needs no tenant and no key.
        a.execute("RESET app.tenant_id")
        a.execute("REINDEX TABLE users")
        a.execute("VACUUM (ANALYZE) users")
        a.execute("CLUSTER users USING users_email")
    sh("bash", str(ROOT / "scripts/cluster.sh"), "stop")
    sh("bash", str(ROOT / "scripts/cluster.sh"), "start")
    with connect(PORT_A, search_db) as c:
        assert lookup_term(c) == ta
        assert lookup(c, "s_globex", "user5077@s_globex.test") == [5077]


def lookup_term(c):
    with as_tenant(c, "s_globex"):
        return c.execute("SELECT envelope.blind_index('users.email', 'User5077@S_Globex.test')::text").fetchone()[0]


# Last: it shreds a tenant of the module's database.
def test_suspension_revocation_and_shredding_stop_lookups_at_the_next_call(search_db):
    with connect(PORT_A, search_db) as admin, connect(PORT_A, search_db, user=ROLE) as app:
        # An open REPEATABLE READ transaction that already used the keys.
        app.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        app.execute("SELECT set_config('app.tenant_id', 's_acme', true)")
        assert app.execute("SELECT count(*) FROM users WHERE email_idx = envelope.blind_index('users.email', 'user1@s_acme.test')").fetchone()[0] == 1
        admin.execute("SELECT envelope.suspend_tenant('s_acme', 'search test')")
        with pytest.raises(psycopg.Error) as err:
            app.execute("SELECT envelope.blind_index('users.email', 'user1@s_acme.test')")
        assert err.value.sqlstate == "57000"
        app.execute("ROLLBACK")
        admin.execute("SELECT envelope.resume_tenant('s_acme')")
        assert lookup(app, "s_acme", "user1@s_acme.test") == [1]
        admin.execute("SELECT envelope.revoke_tenant('s_acme', %s)", (ROLE,))
        assert sqlstate_of(app, "SELECT 1") is None
        with pytest.raises(psycopg.Error) as err:
            lookup(app, "s_acme", "user1@s_acme.test")
        assert err.value.sqlstate == "42501"
        admin.execute("SELECT envelope.grant_tenant('s_acme', %s)", (ROLE,))
        # Crypto-shredding destroys the index keys too: no term can be made any more.
        admin.execute("SET envelope.shred_min_delay = 0")
        admin.execute("SELECT envelope.schedule_shred('s_acme', '1 second')")
        time.sleep(1.1)
        assert admin.execute("SELECT envelope.shred_if_due('s_acme')").fetchone()[0] is True
        assert admin.execute("SELECT count(*) FROM envelope.index_keys k JOIN envelope.tenants t ON t.id = k.tenant_id"
                             " WHERE t.name = 's_acme' AND (k.state <> 'destroyed' OR k.wrapped_key IS NOT NULL)").fetchone()[0] == 0
        with pytest.raises(psycopg.Error) as err:
            lookup(app, "s_acme", "user1@s_acme.test")
        assert err.value.sqlstate == "42704"
        assert lookup(app, "s_globex", "user5001@s_globex.test") == [5001]
