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


def test_no_schema_installs_as_always(db):
    with connect(PORT_A, db) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        owner = c.execute("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'envelope'").fetchone()[0]
        assert owner == "postgres"
