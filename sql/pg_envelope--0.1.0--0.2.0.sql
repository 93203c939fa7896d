-- pg_envelope 0.1.0 -> 0.2.0 (ALTER EXTENSION pg_envelope UPDATE).
-- Every SQL change since 0.1.0, in order. A fresh 0.2.0 install and an updated 0.1.0 must end up
-- with the same objects (tested: pg_test/integration/test_upgrade.py compares pg_dump --schema-only
-- of both). Envelope formats are unchanged: every value written by 0.1.0 decrypts.
\echo Use "ALTER EXTENSION pg_envelope UPDATE TO '0.2.0'" to load this file. \quit

-- Issue 10: grants hold a shared dependency on their role (src/catalog.rs LIVE_GRANTEES).
CREATE TABLE grant_anchor ();
COMMENT ON TABLE grant_anchor IS 'Holds SELECT for each role with tenant grants (pg_envelope): ties grants to roles through pg_shdepend.';
REVOKE ALL ON grant_anchor FROM PUBLIC;
-- Grants of 0.1.0 whose role still exists keep working; rows of dropped roles (bare OIDs) go.
DELETE FROM tenant_grants g WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.oid = g.grantee::oid);
DO $$
DECLARE r record;
BEGIN
  FOR r IN SELECT DISTINCT grantee FROM envelope.tenant_grants LOOP
    EXECUTE pg_catalog.format('GRANT SELECT ON envelope.grant_anchor TO %s', r.grantee);
  END LOOP;
END $$;

-- Issue 10: a tenant RLS policies can trust, and a header-only ownership check.
CREATE FUNCTION "authorized_tenant"() RETURNS TEXT
STRICT STABLE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'authorized_tenant_wrapper';
CREATE FUNCTION "belongs_to"(
	"value" bytea,
	"tenant" TEXT
) RETURNS bool
STABLE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'belongs_to_wrapper';

-- sql/tenancy.sql as of 0.2.0:
-- Tenancy checks RLS policies and constraints can trust (src/tenancy.rs).
--
-- envelope.authorized_tenant(): the tenant setting only when the current role holds that
-- tenant's grant, else NULL. Policies read it instead of the raw setting.
-- envelope.belongs_to(value, tenant): the value's header names the tenant's key (no key, no
-- grant, nothing decrypted). One C function serves bytea and every encrypted type.
CREATE FUNCTION belongs_to(encrypted_text, text) RETURNS boolean
    AS 'MODULE_PATHNAME', 'belongs_to_wrapper' LANGUAGE C STABLE PARALLEL RESTRICTED;
CREATE FUNCTION belongs_to(encrypted_bytea, text) RETURNS boolean
    AS 'MODULE_PATHNAME', 'belongs_to_wrapper' LANGUAGE C STABLE PARALLEL RESTRICTED;
CREATE FUNCTION belongs_to(encrypted_jsonb, text) RETURNS boolean
    AS 'MODULE_PATHNAME', 'belongs_to_wrapper' LANGUAGE C STABLE PARALLEL RESTRICTED;
CREATE FUNCTION belongs_to(encrypted_int8, text) RETURNS boolean
    AS 'MODULE_PATHNAME', 'belongs_to_wrapper' LANGUAGE C STABLE PARALLEL RESTRICTED;
CREATE FUNCTION belongs_to(encrypted_numeric, text) RETURNS boolean
    AS 'MODULE_PATHNAME', 'belongs_to_wrapper' LANGUAGE C STABLE PARALLEL RESTRICTED;
CREATE FUNCTION belongs_to(encrypted_date, text) RETURNS boolean
    AS 'MODULE_PATHNAME', 'belongs_to_wrapper' LANGUAGE C STABLE PARALLEL RESTRICTED;
CREATE FUNCTION belongs_to(encrypted_timestamptz, text) RETURNS boolean
    AS 'MODULE_PATHNAME', 'belongs_to_wrapper' LANGUAGE C STABLE PARALLEL RESTRICTED;

-- Who must be trusted as much as the grantees (docs/threat-model.md, "inside the trust
-- boundary"): code that runs in a granted session uses that session's grant. For every table
-- with an encrypted column (of an encrypted type, a domain over one, an array of one): its owner
-- (who can add policies, triggers, rules, defaults and constraints), and the owners of every
-- function and operator its triggers (and their WHEN clauses), policies, column defaults, CHECK
-- constraints, indexes, rules and the domains of its encrypted columns call; with whether that
-- role is a superuser and whether it holds the privileges of a role with a live grant itself. A row
-- with holds_a_grant = false and is_superuser = false is a role that can run code in granted
-- sessions without being trusted with the keys: review it. Not listed (see the threat model):
-- functions called by these functions, and code on other tables a granted session writes to.
CREATE FUNCTION trust_report()
RETURNS TABLE (table_name regclass, kind text, object text, owner name, is_superuser boolean, holds_a_grant boolean)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
    WITH RECURSIVE enc(typ) AS (
        -- encrypted types, domains over them, arrays of them, composites containing them
        SELECT t.oid FROM pg_type t
          JOIN pg_depend d ON d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e'
          JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_envelope'
         WHERE t.typname LIKE 'encrypted\_%'
        UNION
        SELECT t.oid FROM pg_type t, enc
         WHERE t.typbasetype = enc.typ OR t.typelem = enc.typ
            OR (t.typrelid <> 0 AND EXISTS (SELECT 1 FROM pg_attribute a
                                             WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND a.atttypid = enc.typ))
    ), enc_cols0 AS (
        SELECT a.attrelid AS relid, a.atttypid AS typ
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
         WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'f')
           AND a.atttypid IN (SELECT typ FROM enc)
    ), enc_cols(relid, typ) AS (
        -- every type a column's value passes through: its domain chain, array elements, composite attributes
        SELECT relid, typ FROM enc_cols0
        UNION
        SELECT ec.relid, x.typ FROM enc_cols ec
          JOIN pg_type t ON t.oid = ec.typ
          CROSS JOIN LATERAL (SELECT t.typbasetype AS typ WHERE t.typbasetype <> 0
                              UNION ALL SELECT t.typelem WHERE t.typelem <> 0 AND t.typcategory = 'A'
                              UNION ALL SELECT a.atttypid FROM pg_attribute a
                                         WHERE t.typrelid <> 0 AND a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped) x
    ), enc_tables AS (
        SELECT DISTINCT relid FROM enc_cols
    ), holders AS (
        -- objects whose code runs in sessions writing or reading the table: (table, kind, name, classid, objid)
        SELECT tg.tgrelid AS relid, 'trigger'::text AS kind, tg.tgname::text AS name, 'pg_trigger'::regclass AS classid, tg.oid AS objid
          FROM pg_trigger tg JOIN enc_tables e ON e.relid = tg.tgrelid WHERE NOT tg.tgisinternal
        UNION ALL
        SELECT pol.polrelid, 'policy', pol.polname::text, 'pg_policy'::regclass, pol.oid
          FROM pg_policy pol JOIN enc_tables e ON e.relid = pol.polrelid
        UNION ALL
        SELECT ad.adrelid, 'default', a.attname::text, 'pg_attrdef'::regclass, ad.oid
          FROM pg_attrdef ad JOIN enc_tables e ON e.relid = ad.adrelid
          JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
        UNION ALL
        SELECT con.conrelid, 'constraint', con.conname::text, 'pg_constraint'::regclass, con.oid
          FROM pg_constraint con JOIN enc_tables e ON e.relid = con.conrelid
        UNION ALL
        SELECT i.indrelid, 'index', i.indexrelid::regclass::text, 'pg_class'::regclass, i.indexrelid
          FROM pg_index i JOIN enc_tables e ON e.relid = i.indrelid
        UNION ALL
        SELECT rw.ev_class, 'rule', rw.rulename::text, 'pg_rewrite'::regclass, rw.oid
          FROM pg_rewrite rw JOIN enc_tables e ON e.relid = rw.ev_class WHERE rw.rulename <> '_RETURN'
        UNION ALL
        SELECT DISTINCT ec.relid, 'domain constraint', con.conname::text || ' on ' || ec.typ::regtype::text, 'pg_constraint'::regclass, con.oid
          FROM enc_cols ec JOIN pg_constraint con ON con.contypid = ec.typ
    ), code AS (
        SELECT c.oid AS relid, 'table owner'::text AS kind, c.oid::regclass::text AS object, c.relowner AS owner, 0::oid AS fn
          FROM pg_class c JOIN enc_tables e ON e.relid = c.oid
        UNION ALL
        SELECT DISTINCT ec.relid, 'type owner', ec.typ::regtype::text, t.typowner, 0::oid
          FROM enc_cols ec JOIN pg_type t ON t.oid = ec.typ WHERE t.typtype IN ('d', 'c') AND NOT EXISTS (
              SELECT 1 FROM pg_class tc WHERE tc.oid = t.typrelid AND tc.relkind <> 'c')
        UNION ALL
        SELECT h.relid, h.kind || ' function', h.name || ' -> ' || p.oid::regprocedure::text, p.proowner, p.oid
          FROM holders h
          JOIN pg_depend d ON d.classid = h.classid AND d.objid = h.objid AND d.refclassid = 'pg_proc'::regclass
          JOIN pg_proc p ON p.oid = d.refobjid
        UNION ALL
        SELECT h.relid, h.kind || ' operator', h.name || ' -> ' || o.oid::regoperator::text, o.oprowner, o.oid
          FROM holders h
          JOIN pg_depend d ON d.classid = h.classid AND d.objid = h.objid AND d.refclassid = 'pg_operator'::regclass
          JOIN pg_operator o ON o.oid = d.refobjid
        UNION ALL
        SELECT h.relid, h.kind || ' operator function', h.name || ' -> ' || o.oid::regoperator::text || ' -> ' || p.oid::regprocedure::text, p.proowner, p.oid
          FROM holders h
          JOIN pg_depend d ON d.classid = h.classid AND d.objid = h.objid AND d.refclassid = 'pg_operator'::regclass
          JOIN pg_operator o ON o.oid = d.refobjid JOIN pg_proc p ON p.oid = o.oprcode
    ), live_grantees AS (
        SELECT DISTINCT g.grantee::oid AS grantee FROM envelope.tenant_grants g
         WHERE EXISTS (SELECT 1 FROM pg_class c, aclexplode(c.relacl) a
                        WHERE c.oid = 'envelope.grant_anchor'::regclass AND a.grantee = g.grantee::oid AND a.privilege_type = 'SELECT')
    ), members(role, grantee) AS (
        -- superusers: plain membership (pg_has_role would answer true for everything)
        SELECT grantee, grantee FROM live_grantees
        UNION
        SELECT m.member, members.grantee FROM pg_auth_members m JOIN members ON m.roleid = members.role
    )
    SELECT k.relid::regclass, k.kind, k.object, r.rolname, r.rolsuper,
           CASE WHEN r.rolsuper THEN EXISTS (SELECT 1 FROM members WHERE members.role = k.owner)
                ELSE EXISTS (SELECT 1 FROM live_grantees g WHERE pg_has_role(k.owner, g.grantee, 'USAGE')) END
      FROM code k JOIN pg_roles r ON r.oid = k.owner
     -- pg_envelope's own functions and PostgreSQL's are trusted.
     WHERE NOT EXISTS (SELECT 1 FROM pg_depend x
                        WHERE x.objid = k.fn AND x.deptype = 'e'
                          AND x.refclassid = 'pg_extension'::regclass
                          AND x.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_envelope'))
       AND (k.fn = 0 OR k.fn >= 16384)
     ORDER BY 1, 2, 3
$$;
COMMENT ON FUNCTION trust_report() IS 'Roles whose code runs inside sessions that hold tenant grants (table owners; owners of trigger, policy, default, constraint, index, rule and domain functions and operators), per table with encrypted columns.';

-- sql/plaintext_guards.sql as of 0.2.0:
-- No plaintext derived from encrypted columns may be stored by PostgreSQL itself.
--
-- Decryption is STABLE, so PostgreSQL refuses it directly in index expressions, index predicates
-- and generated columns; keys are never used in security-restricted operations (ANALYZE, index
-- builds, REFRESH MATERIALIZED VIEW: src/backend.rs), so maintenance cannot store a decrypted
-- value. What remains is a function that decrypts but is *declared* IMMUTABLE (by mistake or by a
-- table owner who wants plaintext): an expression index or a stored generated column over it is
-- computed during the DML of a granted session, which holds the keys, and the plaintext lands in
-- the index or the heap where the owner can read it without any key. This event trigger refuses
-- every index whose key expressions or predicate read an encrypted column (or the whole row of a
-- table that has one), and every stored generated column that does: nothing legitimate needs them
-- (equality search will come as separate blind-index columns).
CREATE FUNCTION refuse_derived_plaintext() RETURNS event_trigger
    -- jit off: the catalog query is cheap, but its estimated cost would trigger JIT (~0.4 s per DDL).
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    r record;
    bad text;
BEGIN
    FOR r IN SELECT DISTINCT c.classid, c.objid FROM pg_event_trigger_ddl_commands() c
              WHERE c.classid IN ('pg_class'::regclass, 'pg_type'::regclass) LOOP
        -- Columns whose type is an encrypted type, a domain over one, an array of one, or a
        -- composite with such an attribute, of every table touched (the index's table too).
        WITH RECURSIVE enc(typ) AS (
                SELECT t.oid FROM pg_type t
                  JOIN pg_depend d ON d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e'
                  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_envelope'
                 WHERE t.typname LIKE 'encrypted\_%'
                UNION
                SELECT t.oid FROM pg_type t, enc
                 WHERE t.typbasetype = enc.typ OR t.typelem = enc.typ
                    OR (t.typrelid <> 0 AND EXISTS (SELECT 1 FROM pg_attribute a
                                                     WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND a.atttypid = enc.typ))
            ),
            rels AS (
                SELECT r.objid AS relid WHERE r.classid = 'pg_class'::regclass
                UNION SELECT i.indrelid FROM pg_index i WHERE r.classid = 'pg_class'::regclass AND i.indexrelid = r.objid
                -- ALTER TYPE (a composite gaining an encrypted attribute): every table using the type
                UNION SELECT a.attrelid FROM pg_attribute a
                 WHERE a.attnum > 0 AND NOT a.attisdropped
                   AND a.atttypid IN (WITH RECURSIVE users_of(typ) AS (
                                          SELECT r.objid WHERE r.classid = 'pg_type'::regclass
                                          UNION ALL
                                          -- ALTER TYPE ... ADD ATTRIBUTE reports the composite's pg_class row
                                          SELECT c.reltype FROM pg_class c
                                           WHERE r.classid = 'pg_class'::regclass AND c.oid = r.objid AND c.relkind = 'c'
                                          UNION
                                          SELECT t.oid FROM pg_type t, users_of
                                           WHERE t.typbasetype = users_of.typ OR t.typelem = users_of.typ
                                              OR (t.typrelid <> 0 AND EXISTS (SELECT 1 FROM pg_attribute x
                                                   WHERE x.attrelid = t.typrelid AND x.attnum > 0 AND x.atttypid = users_of.typ)))
                                      SELECT typ FROM users_of)
            ),
            enc_cols AS (
                SELECT a.attrelid, a.attnum FROM pg_attribute a JOIN rels ON rels.relid = a.attrelid
                 WHERE a.attnum > 0 AND NOT a.attisdropped AND a.atttypid IN (SELECT typ FROM enc)
            ),
            offenders AS (
                -- indexes with expressions or a predicate reading an encrypted column / the whole row
                SELECT format('index %s', i.indexrelid::regclass) AS what
                  FROM pg_index i JOIN rels ON rels.relid = i.indrelid
                 WHERE (i.indexprs IS NOT NULL OR i.indpred IS NOT NULL)
                   AND (   EXISTS (SELECT 1 FROM pg_depend d
                                    WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                                      AND d.refclassid = 'pg_class'::regclass AND d.refobjid = i.indrelid
                                      AND (d.refobjsubid, d.refobjid) IN (SELECT attnum, attrelid FROM enc_cols))
                        -- a whole-row Var (varattno 0) reads every column
                        OR (EXISTS (SELECT 1 FROM enc_cols WHERE enc_cols.attrelid = i.indrelid)
                            AND (coalesce(i.indexprs::text, '') || coalesce(i.indpred::text, '')) ~ ':varattno 0 '))
                UNION ALL
                -- stored generated columns reading an encrypted column / the whole row
                SELECT format('generated column %s.%I', a.attrelid::regclass, a.attname)
                  FROM pg_attribute a JOIN rels ON rels.relid = a.attrelid
                  JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
                 WHERE a.attgenerated <> ''
                   AND (   EXISTS (SELECT 1 FROM pg_depend d
                                    WHERE d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                                      AND d.refclassid = 'pg_class'::regclass AND d.refobjid = a.attrelid
                                      AND (d.refobjsubid, d.refobjid) IN (SELECT attnum, attrelid FROM enc_cols))
                        OR (EXISTS (SELECT 1 FROM enc_cols WHERE enc_cols.attrelid = a.attrelid)
                            AND ad.adbin::text ~ ':varattno 0 '))
            )
        SELECT string_agg(what, ', ') INTO bad FROM offenders;
        IF bad IS NOT NULL THEN
            RAISE EXCEPTION 'pg_envelope: % would store values derived from an encrypted column', bad
                USING ERRCODE = 'invalid_object_definition',
                      DETAIL = 'It is computed during the writes of sessions that hold the keys, so a function that decrypts (even one declared IMMUTABLE) would put plaintext in the index or the table.',
                      HINT = 'Index or generate from columns that are not encrypted.';
        END IF;
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION refuse_derived_plaintext() FROM PUBLIC;
CREATE EVENT TRIGGER envelope_refuse_derived_plaintext ON ddl_command_end
    WHEN TAG IN ('CREATE INDEX', 'ALTER TABLE', 'CREATE TABLE', 'ALTER INDEX', 'ALTER TYPE')
    EXECUTE FUNCTION refuse_derived_plaintext();

REVOKE ALL ON FUNCTION trust_report() FROM PUBLIC;
REVOKE ALL ON FUNCTION refuse_derived_plaintext() FROM PUBLIC;

-- Issue 11 (key lifecycle, first part): data key rotation and header-only inspection.
CREATE FUNCTION "key_version"(
	"value" bytea
) RETURNS INT
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'key_version_wrapper';
CREATE FUNCTION "rotate_data_key"(
	"tenant" TEXT
) RETURNS INT
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'rotate_data_key_wrapper';
-- sql/lifecycle.sql as of 0.2.0:
-- Key lifecycle (src/lifecycle.rs). key_version(value): the data key version in a stored value's
-- header (no key, no grant); one C function for bytea and every encrypted type. IMMUTABLE: it
-- depends on the bytes only.
CREATE FUNCTION key_version(encrypted_text) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_version_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_version(encrypted_bytea) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_version_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_version(encrypted_jsonb) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_version_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_version(encrypted_int8) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_version_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_version(encrypted_numeric) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_version_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_version(encrypted_date) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_version_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_version(encrypted_timestamptz) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_version_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
REVOKE ALL ON FUNCTION rotate_data_key(text) FROM PUBLIC;
