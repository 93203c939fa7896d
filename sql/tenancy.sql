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
