"""Fixtures for the integration tier: real clients and tools against real clusters.

Cluster A is the project's cluster (scripts/cluster.sh, 127.0.0.1:54315). Cluster B (54316) is a
second cluster started here without the local root key configured, to show that restores and
replication need no key. pgbouncer (transaction mode, pool size 1) listens on 127.0.0.1:54320.
"""

import os
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg.types.string import StrDumper

ROOT = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("PGE_STATE", "/var/lib/pg_envelope-dev"))
SOCK = str(STATE / "run")
PORT_A = int(os.environ.get("PGE_PORT", "54315"))
PORT_B = 54316
PORT_BOUNCER = 54320
BIN = "/usr/lib/postgresql/15/bin"
APP_ROLE = "integ_app"


class TextDumper(StrDumper):
    """Send Python str as `text` (OID 25) rather than psycopg's default `unknown`, so the server
    applies the assignment cast (encryption) instead of the type's input function."""

    oid = psycopg.adapters.types["text"].oid


def sh(*args, env=None, check=True, **kw):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(args, check=check, capture_output=True, text=True, env=full_env, **kw)


def connect(port=PORT_A, dbname="postgres", user="postgres", typed_text=True, **kw):
    conn = psycopg.connect(host=SOCK, port=port, dbname=dbname, user=user, autocommit=True, **kw)
    if typed_text:
        conn.adapters.register_dumper(str, TextDumper)
    return conn


def row_or_sqlstate(conn, query, params=None):
    """The first row of a statement, or the SQLSTATE it failed with."""
    try:
        return conn.execute(query, params).fetchone()
    except psycopg.Error as e:
        return e.sqlstate


@contextmanager
def as_tenant(conn, tenant):
    """A transaction with the tenant set for it only (SET LOCAL semantics), as an application
    behind a transaction pooler does."""
    with conn.transaction():
        conn.execute("SELECT set_config('app.tenant_id', %s, true)", (tenant,))
        yield conn


def provider_db(db, providers, tenants, kms_command=None):
    """Recreates `db` with pg_envelope, registers `providers` ({name: (kind, options)}), and
    creates `tenants` on the first provider, granted to the current user. Starts the key server
    first with `scripts/kms.sh <kms_command>` when given."""
    if kms_command:
        sh("bash", str(ROOT / "scripts/kms.sh"), kms_command)
    recreate_db(PORT_A, db)
    first = next(iter(providers))
    with connect(PORT_A, db) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        for name, (kind, options) in providers.items():
            c.execute("SELECT envelope.add_key_provider(%s, %s, %s)", (name, kind, options))
        for t in tenants:
            c.execute("SELECT envelope.create_tenant(%s, provider => %s)", (t, first))
            c.execute("SELECT envelope.grant_tenant(%s, current_user)", (t,))
    return db


def recreate_db(port, name):
    with connect(port) as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {name}")


@pytest.fixture(scope="session")
def canary():
    return f"CANARY-{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def cluster_b():
    env = {"PGE_INSTANCE": "pg15-b", "PGE_PORT": str(PORT_B), "PGE_NO_ROOT_KEY": "1"}
    sh("bash", str(ROOT / "scripts/cluster.sh"), "start", env=env)
    with connect(PORT_B) as c:
        # Start without the root key each session, whatever an earlier run left.
        c.execute("ALTER SYSTEM RESET envelope.local_root_key_file")
        c.execute("SELECT pg_reload_conf()")
        for role in (APP_ROLE,):
            c.execute(
                f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') "
                f"THEN CREATE ROLE {role} LOGIN; END IF; END $$"
            )
    time.sleep(0.2)
    yield PORT_B


def drop_replication(sub="envelope_sub"):
    """Undoes the logical replication test's subscription (B, database `sub`) and slot (A). Run
    before and after that test, and before `envelope_integ` is recreated: a run that failed
    midway must not leave B subscribed, or A's database cannot be dropped next time."""
    try:
        with connect(PORT_B) as c:
            has_db = c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (sub,)).fetchone()
    except psycopg.OperationalError:
        has_db = None  # cluster B is not running, so neither are its subscription workers
    if has_db:
        with connect(PORT_B, sub) as s:
            if s.execute("SELECT 1 FROM pg_subscription WHERE subname = %s", (sub,)).fetchone():
                s.execute(f"ALTER SUBSCRIPTION {sub} DISABLE")
                s.execute(f"ALTER SUBSCRIPTION {sub} SET (slot_name = NONE)")
                s.execute(f"DROP SUBSCRIPTION {sub}")
    with connect(PORT_A) as c:
        deadline = time.time() + 10
        while c.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active", (sub,)).fetchone():
            if time.time() > deadline:
                raise TimeoutError(f"replication slot {sub} still active")
            time.sleep(0.1)
        c.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (sub,))


@pytest.fixture(scope="session")
def source_db(canary):
    """Database `envelope_integ` on cluster A: two tenants, the README's RLS schema (with its
    blind-index term column, unique index and trigger), an app role."""
    drop_replication()
    recreate_db(PORT_A, "envelope_integ")
    with connect(PORT_A, "envelope_integ") as c:
        c.execute(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') "
            f"THEN CREATE ROLE {APP_ROLE} LOGIN; END IF; END $$"
        )
        c.execute("CREATE EXTENSION pg_envelope")
        for t in ("acme", "globex"):
            c.execute("SELECT envelope.create_tenant(%s)", (t,))
            c.execute("SELECT envelope.grant_tenant(%s, %s)", (t, APP_ROLE))
            c.execute("SELECT envelope.grant_tenant(%s, 'postgres')", (t,))
        c.execute(
            """
            CREATE TABLE users (
              id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
              tenant text NOT NULL DEFAULT envelope.authorized_tenant(),
              email  envelope.encrypted_text,
              profile envelope.encrypted_jsonb,
              balance envelope.encrypted_numeric,
              email_idx envelope.blind_index
            );
            CREATE UNIQUE INDEX users_email ON users (tenant, email_idx);
            CREATE TRIGGER users_email_idx BEFORE INSERT OR UPDATE ON users FOR EACH ROW
              EXECUTE FUNCTION envelope.blind_index_trigger('email', 'email_idx', 'users.email');
            SELECT envelope.declare_blind_index('users.email', 'nfkc_casefold');
            ALTER TABLE users ENABLE ROW LEVEL SECURITY;
            ALTER TABLE users FORCE ROW LEVEL SECURITY;
            CREATE POLICY tenant_isolation ON users
              USING (tenant = envelope.authorized_tenant())
              WITH CHECK (tenant = envelope.authorized_tenant() AND envelope.belongs_to(email, tenant));
            GRANT SELECT, INSERT, UPDATE, DELETE ON users TO integ_app;
            CREATE TABLE scratch (id serial PRIMARY KEY, env bytea);
            GRANT SELECT, INSERT ON scratch TO integ_app;
            GRANT USAGE ON SEQUENCE scratch_id_seq TO integ_app;
            """
        )
    with connect(PORT_A, "envelope_integ", user=APP_ROLE) as c:
        for tenant, rows in {
            "acme": [("alice@acme.test", '{"plan": "gold"}', "10.50"), (f"{canary}@acme.test", '{"k": 1}', "0")],
            "globex": [("carol@globex.test", '{"plan": "free"}', "-3.25")],
        }.items():
            with c.transaction():
                # SET LOCAL takes no bind parameters; set_config(..., true) is the same thing.
                c.execute("SELECT set_config('app.tenant_id', %s, true)", (tenant,))
                for email, profile, balance in rows:
                    c.execute(
                        "INSERT INTO users (email, profile, balance) VALUES (%s, %s::jsonb, %s::numeric)",
                        (email, profile, balance),
                        prepare=True,
                    )
    return "envelope_integ"


def plaintexts(port, dbname, tenant, user="postgres"):
    with connect(port, dbname, user=user) as c:
        with as_tenant(c, tenant):
            return c.execute(
                "SELECT email::text, profile::jsonb, balance::numeric FROM users WHERE tenant = %s ORDER BY 1",
                (tenant,),
            ).fetchall()


def ciphertexts(port, dbname):
    """Every stored envelope, in text form, as the table owner sees it (FORCE RLS: via BYPASSRLS superuser)."""
    with connect(port, dbname) as c:
        return sorted(
            c.execute(
                "SELECT tenant, email::varchar, profile::varchar, balance::varchar FROM users"
            ).fetchall()
        )
