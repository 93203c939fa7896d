"""Upgrade from the installed release: 0.1.0, built from its commit, writes data; the current build
replaces the library, `ALTER EXTENSION pg_envelope UPDATE` runs, and everything 0.1.0 wrote still
decrypts (envelope format v2, typed values included), re-encrypts (into v3), moves between root keys and rotates to a new data key version (values
re-encrypted under it, by UPDATE and by `CALL envelope.reencrypt`), with the grants it had; its
tenants' keys rotate at every level and an old version is disabled and destroyed. The updated schema is
the same as a fresh install's. An update into a schema a plain role controls, or one holding objects
that are not the extension's, is refused.

The test runs its own cluster (127.0.0.1:54317). The library file is shared by every cluster of
this PostgreSQL installation, so the old one is swapped in by write-new-then-rename (running
backends of other clusters keep their mapping) and the current build is always put back.
"""

import os
import time
import re
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest

from conftest import ROOT, STATE, connect, sh

PORT = 54317
INSTANCE = "pg15-upgrade"
PREVIOUS = "0.1.0"
LIBDIR = Path(subprocess.run(["/usr/lib/postgresql/15/bin/pg_config", "--pkglibdir"], capture_output=True, text=True).stdout.strip())
SHAREDIR = Path(subprocess.run(["/usr/lib/postgresql/15/bin/pg_config", "--sharedir"], capture_output=True, text=True).stdout.strip())
CURRENT_STAGE = ROOT / "target/release/pg_envelope-pg15"


JSON_DOCS = ['{"a": [1, 2.50, -0.001], "b": null, "c": true, "é": "ünïcode ✓"}', '"just a string"', '12345678901234567890.5',
             '[]', '{}', '{"n": {"d": [[{"e": false}]]}}', '[' + ', '.join(str(i) for i in range(40)) + ']']


def swap_library(so: Path):
    """Installs `so` as pg_envelope.so by write-new-then-rename."""
    dest = LIBDIR / "pg_envelope.so"
    tmp = LIBDIR / "pg_envelope.so.pge-new"
    shutil.copyfile(so, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)


def cluster(cmd):
    env = {"PGE_INSTANCE": INSTANCE, "PGE_PORT": str(PORT)}
    return sh("bash", str(ROOT / "scripts/cluster.sh"), cmd, env=env)


def definitions(c):
    """Every member function's full definition and privileges, every member table's columns,
    privileges and comment: what a fresh install and an update must agree on."""
    funcs = c.execute(
        "SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid), coalesce(p.proacl::text, ''),"
        " coalesce(obj_description(p.oid, 'pg_proc'), '')"
        " FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'"
        " JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_envelope' ORDER BY 1").fetchall()
    rels = c.execute(
        "SELECT c.relname, c.relkind, coalesce(c.relacl::text, ''), coalesce(obj_description(c.oid, 'pg_class'), ''),"
        " (SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || coalesce(' default ' || pg_get_expr(ad.adbin, ad.adrelid), '')"
        "                    || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END, ', ' ORDER BY a.attnum)"
        "    FROM pg_attribute a LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum"
        "   WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),"
        " (SELECT string_agg(pg_get_constraintdef(k.oid), '; ' ORDER BY conname) FROM pg_constraint k WHERE k.conrelid = c.oid),"
        " (SELECT string_agg(pg_get_indexdef(i.indexrelid), '; ' ORDER BY 1) FROM pg_index i WHERE i.indrelid = c.oid)"
        " FROM pg_class c JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'"
        " JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_envelope' ORDER BY 1").fetchall()
    # The test's own role holds the anchor privilege in the updated database only.
    # (So does the role whose name needs quoting, escaped inside the aclitem[] text form.)
    quoted = re.escape('"\\"Upg Mixed \\"\\"Q\\"\\" Role\\"=r/postgres"')
    rels = [tuple(re.sub(r",?upg_app=r/\w+", "", re.sub(",?" + quoted, "", str(v))) for v in r) for r in rels]
    return funcs, rels


def extension_members(c):
    return sorted(r[0] for r in c.execute(
        "SELECT pg_describe_object(classid, objid, objsubid) FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid "
        "WHERE e.extname = 'pg_envelope' AND d.deptype = 'e'").fetchall())


@pytest.fixture(scope="module")
def previous_stage():
    if not (CURRENT_STAGE / "usr/lib/postgresql/15/lib/pg_envelope.so").exists():
        pytest.fail("the current build is not staged: run scripts/cluster.sh install first")
    out = sh("bash", str(ROOT / "scripts/build-previous.sh"), PREVIOUS, timeout=3600)
    return Path(out.stdout.strip().splitlines()[-1])


def test_update_from_previous_release_keeps_every_value(previous_stage):
    old_so = previous_stage / "usr/lib/postgresql/15/lib/pg_envelope.so"
    old_sql = previous_stage / f"usr/share/postgresql/15/extension/pg_envelope--{PREVIOUS}.sql"
    new_so = CURRENT_STAGE / "usr/lib/postgresql/15/lib/pg_envelope.so"
    shutil.copyfile(old_sql, SHAREDIR / "extension" / old_sql.name)
    data = STATE / INSTANCE / "data"
    cluster("stop")
    sh("rm", "-rf", str(data))
    try:
        # 1. The previous release, as users run it today.
        swap_library(old_so)
        cluster("start")
        with connect(PORT) as c:
            c.execute("DROP DATABASE IF EXISTS upgraded")
            c.execute("DROP DATABASE IF EXISTS fresh")
            c.execute("CREATE DATABASE upgraded")
            c.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'upg_app') THEN CREATE ROLE upg_app LOGIN; END IF; END $$")
            c.execute("""DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'Upg Mixed "Q" Role') THEN CREATE ROLE "Upg Mixed ""Q"" Role" NOLOGIN; END IF; END $$""")
        with connect(PORT, "upgraded") as c:
            c.execute(f"CREATE EXTENSION pg_envelope VERSION '{PREVIOUS}'")
            assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_envelope'").fetchone()[0] == PREVIOUS
            for t in ("acme", "globex"):
                c.execute("SELECT envelope.create_tenant(%s)", (t,))
                c.execute("SELECT envelope.grant_tenant(%s, 'upg_app')", (t,))
            # A grantee whose name needs quoting: the update grants it the anchor privilege by name.
            c.execute("SELECT envelope.grant_tenant('acme', 'Upg Mixed \"Q\" Role')")
            c.execute("CREATE TABLE t (id int PRIMARY KEY, tenant text, email envelope.encrypted_text, "
                      "n envelope.encrypted_int8, blob bytea)")
            c.execute("GRANT SELECT, INSERT, UPDATE ON t TO upg_app")
            c.execute("CREATE TABLE t_v2 (id int PRIMARY KEY, email envelope.encrypted_text, n envelope.encrypted_int8)")
            c.execute("GRANT SELECT, INSERT ON t_v2 TO upg_app")
            # jsonb: 0.1.0 stores the text form; this build writes PostgreSQL's internal form and
            # reads the text form forever.
            c.execute("CREATE TABLE tj (id int PRIMARY KEY, doc envelope.encrypted_jsonb)")
            c.execute("GRANT SELECT, INSERT, UPDATE ON tj TO upg_app")
        with connect(PORT, "upgraded", user="upg_app") as c:
            for t in ("acme", "globex"):
                with c.transaction():
                    c.execute("SELECT set_config('app.tenant_id', %s, true)", (t,))
                    c.execute(
                        "INSERT INTO t SELECT i, %s, (%s || '-user' || i || '@x.test')::text, (i * 1000)::bigint,"
                        " envelope.encrypt_field(('blob-' || i)::bytea, 't.blob/' || i)"
                        " FROM generate_series(%s::int, %s::int) i",
                        (t, t, 1 if t == "acme" else 101, 100 if t == "acme" else 150))
            with c.transaction():
                c.execute("SELECT set_config('app.tenant_id', 'globex', true)")
                c.execute("INSERT INTO t_v2 SELECT i, ('kept-' || i)::text, (i * 7)::bigint FROM generate_series(1, 10) i")
            t_v2_expected = ",".join(f"kept-{i}={i * 7}" for i in range(1, 11))
            with c.transaction():
                c.execute("SELECT set_config('app.tenant_id', 'acme', true)")
                for i, doc in enumerate(JSON_DOCS):
                    c.execute("INSERT INTO tj VALUES (%s, %s::jsonb)", (i, doc))
                json_before = c.execute("SELECT string_agg(doc::jsonb::text, ' | ' ORDER BY id) FROM tj").fetchone()[0]
            before = {}
            for t in ("acme", "globex"):
                with c.transaction():
                    c.execute("SELECT set_config('app.tenant_id', %s, true)", (t,))
                    before[t] = c.execute(
                        "SELECT md5(string_agg(email::text || n::int8 || encode(envelope.decrypt_field_bytea(blob, 't.blob/' || id), 'hex'), ',' ORDER BY id)), count(*)"
                        " FROM t WHERE tenant = %s", (t,)).fetchone()
        assert before["acme"][1] == 100 and before["globex"][1] == 50
        with connect(PORT, "upgraded") as c:
            stored = c.execute("SELECT md5(string_agg(email::varchar || n::varchar || encode(blob, 'hex'), ',' ORDER BY id)) FROM t").fetchone()[0]
            # 0.1.0 writes envelope format v2 (the typed values with their type's full context
            # string in the associated data); this build writes v3 and must read v2 forever.
            formats = c.execute("SELECT tenant, get_byte(decode(substr(email::varchar, 6), 'base64'), 0), get_byte(decode(substr(n::varchar, 6), 'base64'), 0),"
                " get_byte(blob, 0), count(*) FROM t GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4").fetchall()
            assert formats == [("acme", 2, 2, 2, 100), ("globex", 2, 2, 2, 50)], formats
        # 0.1.0 had no schema guard: it installed into a schema a plain role had made, and that
        # role planted an operator the update's views would bind to (an insider review became
        # superuser through envelope.reencrypt_progress so).
        with connect(PORT) as c:
            c.execute("DROP DATABASE IF EXISTS planted")
            c.execute("CREATE DATABASE planted")
            c.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'upg_mallory') THEN CREATE ROLE upg_mallory LOGIN; END IF; END $$")
        with connect(PORT, "planted") as c:
            c.execute("CREATE SCHEMA envelope AUTHORIZATION upg_mallory")
            c.execute(f"CREATE EXTENSION pg_envelope VERSION '{PREVIOUS}'")
        with connect(PORT, "planted", user="upg_mallory") as c:
            c.execute("CREATE FUNCTION envelope.mul_hook(numeric, bigint) RETURNS numeric LANGUAGE sql"
                      " AS 'SELECT $1 * $2::numeric'")
            c.execute("CREATE OPERATOR envelope.* (FUNCTION = envelope.mul_hook, LEFTARG = numeric, RIGHTARG = bigint)")
        cluster("stop")

        # 2. The new library, then ALTER EXTENSION ... UPDATE.
        swap_library(new_so)
        cluster("start")
        with connect(PORT, "upgraded") as c:
            c.execute("ALTER EXTENSION pg_envelope UPDATE")
            assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_envelope'").fetchone()[0] == "0.2.0"
            # Nothing stored changed.
            assert c.execute("SELECT md5(string_agg(email::varchar || n::varchar || encode(blob, 'hex'), ',' ORDER BY id)) FROM t").fetchone()[0] == stored
            # 0.1.0's grants carried over (and now hold their role through the anchor privilege).
            assert c.execute("SELECT has_table_privilege('upg_app', 'envelope.grant_anchor', 'SELECT')").fetchone()[0]
            assert c.execute("""SELECT has_table_privilege('Upg Mixed "Q" Role', 'envelope.grant_anchor', 'SELECT')""").fetchone()[0]
            # The trail's views, as the update made them, are the extension's (audit_verify
            # compares their queries with the extension's).
            assert c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone() == (True, None)
        with connect(PORT, "planted") as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not controlled by superusers only"):
                c.execute("ALTER EXTENSION pg_envelope UPDATE")
            # The owner changed (the hint's first step) but the planted operator is still there.
            c.execute("ALTER SCHEMA envelope OWNER TO CURRENT_USER")
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not part of the extension"):
                c.execute("ALTER EXTENSION pg_envelope UPDATE")
            assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_envelope'").fetchone()[0] == PREVIOUS
            c.execute("DROP OPERATOR envelope.*(numeric, bigint)")
            c.execute("DROP FUNCTION envelope.mul_hook(numeric, bigint)")
            # Another extension's objects count as planted (a database owner may create a
            # trusted extension in any schema it can use: third review).
            c.execute("CREATE EXTENSION citext SCHEMA envelope")
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not part of the extension"):
                c.execute("ALTER EXTENSION pg_envelope UPDATE")
            c.execute("DROP EXTENSION citext")
            # A plain role's default privileges for its own objects never apply to the
            # extension's, and must not block the update (third review); a superuser's do.
            c.execute("ALTER DEFAULT PRIVILEGES FOR ROLE CURRENT_USER IN SCHEMA envelope GRANT SELECT ON TABLES TO upg_mallory")
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="default privileges"):
                c.execute("ALTER EXTENSION pg_envelope UPDATE")
            c.execute("ALTER DEFAULT PRIVILEGES FOR ROLE CURRENT_USER IN SCHEMA envelope REVOKE SELECT ON TABLES FROM upg_mallory")
        with connect(PORT, "planted", user="upg_mallory") as c:
            c.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA envelope GRANT SELECT ON TABLES TO PUBLIC")
        with connect(PORT, "planted") as c:
            c.execute("ALTER EXTENSION pg_envelope UPDATE")
            assert c.execute("SELECT count(*) FROM envelope.reencrypt_progress").fetchone()[0] == 0
        with connect(PORT) as c:
            c.execute("DROP DATABASE planted")
            c.execute("DROP ROLE upg_mallory")  # its default privileges went with the database
        with connect(PORT, "upgraded", user="upg_app") as c:
            for t in ("acme", "globex"):
                with c.transaction():
                    c.execute("SELECT set_config('app.tenant_id', %s, true)", (t,))
                    assert c.execute("SELECT envelope.authorized_tenant()").fetchone()[0] == t
                    after = c.execute(
                        "SELECT md5(string_agg(email::text || n::int8 || encode(envelope.decrypt_field_bytea(blob, 't.blob/' || id), 'hex'), ',' ORDER BY id)), count(*)"
                        " FROM t WHERE tenant = %s", (t,)).fetchone()
                    assert after == before[t], f"{t}: values written by {PREVIOUS} read differently after the update"
                    # Re-encrypt every value in place (new envelopes, same plaintexts).
                    c.execute("UPDATE t SET email = email::text, n = n::int8,"
                              " blob = envelope.encrypt_field(envelope.decrypt_field_bytea(blob, 't.blob/' || id), 't.blob/' || id)"
                              " WHERE tenant = %s", (t,))
                    again = c.execute(
                        "SELECT md5(string_agg(email::text || n::int8 || encode(envelope.decrypt_field_bytea(blob, 't.blob/' || id), 'hex'), ',' ORDER BY id)), count(*)"
                        " FROM t WHERE tenant = %s", (t,)).fetchone()
                    assert again == before[t]
            # jsonb written by 0.1.0 (text form) reads the same; rewritten by this build (the
            # internal form: test_roundtrips.py checks the form) it still reads the same and
            # equals what a plain jsonb column holds.
            with c.transaction():
                c.execute("SELECT set_config('app.tenant_id', 'acme', true)")
                assert c.execute("SELECT string_agg(doc::jsonb::text, ' | ' ORDER BY id) FROM tj").fetchone()[0] == json_before
                c.execute("UPDATE tj SET doc = doc::jsonb")
                assert c.execute("SELECT string_agg(doc::jsonb::text, ' | ' ORDER BY id) FROM tj").fetchone()[0] == json_before
                assert c.execute("SELECT bool_and(doc::jsonb = (%s::jsonb[])[id + 1]) FROM tj", (JSON_DOCS,)).fetchone()[0]
        with connect(PORT, "upgraded") as c:
            assert c.execute("SELECT md5(string_agg(email::varchar || n::varchar || encode(blob, 'hex'), ',' ORDER BY id)) FROM t").fetchone()[0] != stored
            # Root-level rotation: re-wrap a tenant of 0.1.0 under the (current) root key.
            c.execute("SELECT envelope.rewrap_tenant('acme', 'local')")
            # Data-key rotation of a tenant created by 0.1.0: version 2 for new writes.
            assert c.execute("SELECT envelope.rotate_data_key('acme')").fetchone()[0] == 2
        with connect(PORT, "upgraded", user="upg_app") as c:
            with c.transaction():
                c.execute("SELECT set_config('app.tenant_id', 'acme', true)")
                assert c.execute("SELECT md5(string_agg(email::text || n::int8 || encode(envelope.decrypt_field_bytea(blob, 't.blob/' || id), 'hex'), ',' ORDER BY id)) FROM t WHERE tenant = 'acme'").fetchone()[0] == before["acme"][0]
                # Re-encrypt every acme value under the new version; the plaintexts stay the same.
                assert c.execute("SELECT count(*) FROM t WHERE tenant = 'acme' AND envelope.key_version(email) = 1").fetchone()[0] == 100
                c.execute("UPDATE t SET email = email::text, n = n::int8,"
                          " blob = envelope.encrypt_field(envelope.decrypt_field_bytea(blob, 't.blob/' || id), 't.blob/' || id)"
                          " WHERE tenant = 'acme'")
                assert c.execute("SELECT count(*) FROM t WHERE tenant = 'acme' AND envelope.key_version(email) = 2 AND envelope.key_version(blob) = 2").fetchone()[0] == 100
                assert c.execute("SELECT md5(string_agg(email::text || n::int8 || encode(envelope.decrypt_field_bytea(blob, 't.blob/' || id), 'hex'), ',' ORDER BY id)) FROM t WHERE tenant = 'acme'").fetchone()[0] == before["acme"][0]

        # The key lifecycle on 0.1.0's tenants: rotate globex's data key and tenant key, move its
        # values online with CALL envelope.reencrypt (typed and bytea columns, context per row),
        # disable and destroy its version 1; the plaintexts are unchanged throughout.
        with connect(PORT, "upgraded") as c:
            c.execute("ALTER TABLE t ADD COLUMN blob_ctx text GENERATED ALWAYS AS ('t.blob/' || id) STORED")
            assert c.execute("SELECT envelope.rotate_data_key('globex')").fetchone()[0] == 2
            assert c.execute("SELECT envelope.rotate_tenant_key('globex')").fetchone()[0] == 2
            c.execute("CALL envelope.reencrypt('t', 'email')")
            c.execute("CALL envelope.reencrypt('t', 'n')")
            c.execute("CALL envelope.reencrypt('t', 'blob', context_column => 'blob_ctx')")
            counts = c.execute("SELECT tenant, version, \"values\" FROM envelope.column_key_versions('t', 'blob') ORDER BY 1, 2").fetchall()
            assert counts == [("acme", 2, 100), ("globex", 2, 50)], counts
            # Values 0.1.0 wrote (v2) and nothing rewrote since: CALL envelope.reencrypt decrypts
            # them under v2's associated data and writes v3 (typed: the type as a one-byte code).
            assert c.execute("SELECT get_byte(decode(substr(email::varchar, 6), 'base64'), 0), get_byte(decode(substr(n::varchar, 6), 'base64'), 0), count(*)"
                             " FROM t_v2 GROUP BY 1, 2").fetchall() == [(2, 2, 10)]
            c.execute("CALL envelope.reencrypt('t_v2', 'email')")
            c.execute("CALL envelope.reencrypt('t_v2', 'n')")
            assert c.execute("SELECT get_byte(decode(substr(email::varchar, 6), 'base64'), 0), get_byte(decode(substr(n::varchar, 6), 'base64'), 0), count(*)"
                             " FROM t_v2 GROUP BY 1, 2").fetchall() == [(3, 3, 10)]
            c.execute("SELECT set_config('app.tenant_id', 'globex', false), envelope.grant_tenant('globex', current_user)")
            assert c.execute("SELECT string_agg(email::text || '=' || n::int8, ',' ORDER BY id) FROM t_v2").fetchone()[0] == t_v2_expected
            formats = c.execute("SELECT tenant, get_byte(decode(substr(email::varchar, 6), 'base64'), 0), get_byte(decode(substr(n::varchar, 6), 'base64'), 0),"
                " get_byte(blob, 0), count(*) FROM t GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4").fetchall()
            assert formats == [("acme", 3, 3, 3, 100), ("globex", 3, 3, 3, 50)], formats
            assert c.execute("SELECT envelope.disable_data_key('globex', 1), envelope.destroy_data_key('globex', 1)").fetchone() == (True, True)
        with connect(PORT, "upgraded", user="upg_app") as c:
            for t in ("acme", "globex"):
                with c.transaction():
                    c.execute("SELECT set_config('app.tenant_id', %s, true)", (t,))
                    assert c.execute("SELECT md5(string_agg(email::text || n::int8 || encode(envelope.decrypt_field_bytea(blob, 't.blob/' || id), 'hex'), ',' ORDER BY id)), count(*)"
                                     " FROM t WHERE tenant = %s", (t,)).fetchone() == before[t]
        with connect(PORT, "upgraded") as c:
            c.execute("ALTER TABLE t DROP COLUMN blob_ctx")
            # Crypto-shredding works on the updated schema (0.1.0's NOT NULL key columns relaxed).
            c.execute("SELECT envelope.create_tenant('upg_shred'), envelope.grant_tenant('upg_shred', current_user)")
            with c.transaction():
                c.execute("SELECT set_config('app.tenant_id', 'upg_shred', true)")
                env = c.execute("SELECT envelope.encrypt_field('to be shredded')").fetchone()[0]
            c.execute("SET envelope.shred_min_delay = 0")
            c.execute("SELECT envelope.schedule_shred('upg_shred', '1 second')")
            time.sleep(1.1)
            assert c.execute("SELECT envelope.shred_if_due('upg_shred')").fetchone()[0] is True
            with pytest.raises(psycopg.Error) as err:
                with c.transaction():
                    c.execute("SELECT set_config('app.tenant_id', 'upg_shred', true)")
                    c.execute("SELECT envelope.decrypt_field(%s::bytea)", (env,))
            assert err.value.sqlstate == "42704"

        # Blind indexes on 0.1.0's tenants: none has an index key until a key administrator
        # makes one (a clear 55000 before); then a term column is backfilled and searched.
        with connect(PORT, "upgraded") as c:
            c.execute("SELECT envelope.declare_blind_index('t.email', 'nfkc_casefold'), envelope.grant_tenant('acme', current_user)")
            c.execute("ALTER TABLE t ADD COLUMN email_idx envelope.blind_index")
            c.execute("SET app.tenant_id = 'acme'")
            with pytest.raises(psycopg.Error) as err:
                c.execute("SELECT envelope.blind_index('t.email', 'x')")
            assert err.value.sqlstate == "55000"
            assert c.execute("SELECT envelope.rotate_index_key('acme')").fetchone()[0] == 1
            c.execute("CALL envelope.blind_index_backfill('t', 'email', 'email_idx', 't.email', 'tenant')")
            some = c.execute("SELECT id, email::text FROM t WHERE tenant = 'acme' ORDER BY id LIMIT 1").fetchone()
            assert c.execute("SELECT array_agg(id) FROM t WHERE email_idx = envelope.blind_index('t.email', upper(%s))",
                             (some[1],)).fetchone()[0] == [some[0]]
            assert c.execute("SELECT count(email_idx) FROM t WHERE tenant = 'acme'").fetchone()[0] == 100
            c.execute("RESET app.tenant_id")
            c.execute("ALTER TABLE t DROP COLUMN email_idx")

        # 3. The updated extension is the same as a fresh install.
        with connect(PORT) as c:
            c.execute("CREATE DATABASE fresh")
        with connect(PORT, "fresh") as c:
            c.execute("CREATE EXTENSION pg_envelope")
            fresh_members = extension_members(c)
        with connect(PORT, "upgraded") as c:
            upgraded_members = extension_members(c)
        assert upgraded_members == fresh_members
        with connect(PORT, "fresh") as f, connect(PORT, "upgraded") as u:
            fresh_funcs, fresh_rels = definitions(f)
            upg_funcs, upg_rels = definitions(u)
        assert len(fresh_funcs) > 40 and len(fresh_rels) >= 6
        assert upg_funcs == fresh_funcs
        assert upg_rels == fresh_rels
    finally:
        swap_library(new_so)
        cluster("stop")
