"""CREATE EXTENSION refuses an `envelope` schema that an untrusted role controls (found while
justifying pgspot's findings): its owner could otherwise DROP SCHEMA envelope CASCADE (the
extension and every key table with it) or plant functions next to the extension's."""

import psycopg
import pytest

from conftest import PORT_A, connect, recreate_db

DB = "schema_guard"


@pytest.fixture()
def db():
    recreate_db(PORT_A, DB)
    with connect(PORT_A) as c:
        c.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'guard_mallory') "
                  "THEN CREATE ROLE guard_mallory LOGIN; END IF; END $$")
    yield DB
    with connect(PORT_A) as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        c.execute("DROP ROLE IF EXISTS guard_mallory")


def test_a_schema_owned_by_a_plain_role_is_refused(db):
    with connect(PORT_A, db) as c:
        c.execute("CREATE SCHEMA envelope AUTHORIZATION guard_mallory")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not controlled by superusers only"):
            c.execute("CREATE EXTENSION pg_envelope")
        assert c.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pg_envelope'").fetchone()[0] == 0


def test_a_schema_where_a_plain_role_may_create_is_refused(db):
    with connect(PORT_A, db) as c:
        c.execute("CREATE SCHEMA envelope")
        c.execute("GRANT CREATE ON SCHEMA envelope TO guard_mallory")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("CREATE EXTENSION pg_envelope")
        c.execute("REVOKE CREATE ON SCHEMA envelope FROM guard_mallory")
        c.execute("GRANT USAGE ON SCHEMA envelope TO PUBLIC")
        c.execute("CREATE EXTENSION pg_envelope")  # superuser-controlled: accepted (a restore does this)
        c.execute("DROP EXTENSION pg_envelope")


def test_a_schema_with_planted_objects_is_refused_even_after_its_owner_is_changed(db):
    """An insider review: a database owner creates `envelope`, plants an operator there, and the
    superuser follows the old hint (make a superuser the owner, revoke CREATE). The extension's
    views bound to the planted operator and the owner became superuser at the first read."""
    with connect(PORT_A, db) as c:
        c.execute("CREATE SCHEMA envelope AUTHORIZATION guard_mallory")
        c.execute("SET ROLE guard_mallory")
        c.execute("CREATE FUNCTION envelope.mul_hook(numeric, bigint) RETURNS numeric LANGUAGE sql AS 'SELECT $1 * $2::numeric'")
        c.execute("CREATE OPERATOR envelope.* (FUNCTION = envelope.mul_hook, LEFTARG = numeric, RIGHTARG = bigint)")
        c.execute("RESET ROLE")
        c.execute("ALTER SCHEMA envelope OWNER TO postgres")
        c.execute("REVOKE ALL ON SCHEMA envelope FROM guard_mallory")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not empty"):
            c.execute("CREATE EXTENSION pg_envelope")
        c.execute("DROP SCHEMA envelope CASCADE")
        c.execute("CREATE SCHEMA envelope")
        c.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA envelope GRANT ALL ON TABLES TO guard_mallory")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not empty"):
            c.execute("CREATE EXTENSION pg_envelope")
        c.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA envelope REVOKE ALL ON TABLES FROM guard_mallory")


def test_no_schema_installs_as_always(db):
    with connect(PORT_A, db) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        owner = c.execute("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'envelope'").fetchone()[0]
        assert owner == "postgres"
