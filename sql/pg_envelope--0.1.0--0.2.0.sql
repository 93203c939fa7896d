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
-- with an encrypted column: its owner (who can add policies, triggers and defaults), the owners
-- of its trigger functions, and the owners of functions its policies and column defaults call;
-- with whether that role is a superuser and whether it holds the privileges of a granted role
-- itself. A row with holds_a_grant = false and is_superuser = false is a role that can run code
-- in granted sessions without being trusted with the keys: review it.
CREATE FUNCTION trust_report()
RETURNS TABLE (table_name regclass, kind text, object text, owner name, is_superuser boolean, holds_a_grant boolean)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH enc_tables AS (
        SELECT DISTINCT a.attrelid AS relid
          FROM pg_attribute a
          JOIN pg_type t ON t.oid = a.atttypid
          JOIN pg_namespace n ON n.oid = t.typnamespace
          JOIN pg_extension e ON e.extname = 'pg_envelope' AND e.extnamespace = n.oid
         WHERE t.typname LIKE 'encrypted\_%' AND a.attnum > 0 AND NOT a.attisdropped
    ), code AS (
        SELECT c.oid AS relid, 'table owner'::text AS kind, c.oid::regclass::text AS object, c.relowner AS owner, 0::oid AS fn
          FROM pg_class c JOIN enc_tables e ON e.relid = c.oid
        UNION ALL
        SELECT tg.tgrelid, 'trigger function', tg.tgname || ' -> ' || p.oid::regprocedure::text, p.proowner, p.oid
          FROM pg_trigger tg JOIN enc_tables e ON e.relid = tg.tgrelid JOIN pg_proc p ON p.oid = tg.tgfoid
         WHERE NOT tg.tgisinternal
        UNION ALL
        SELECT pol.polrelid, 'policy function', pol.polname || ' -> ' || p.oid::regprocedure::text, p.proowner, p.oid
          FROM pg_policy pol JOIN enc_tables e ON e.relid = pol.polrelid
          JOIN pg_depend d ON d.classid = 'pg_policy'::regclass AND d.objid = pol.oid AND d.refclassid = 'pg_proc'::regclass
          JOIN pg_proc p ON p.oid = d.refobjid
        UNION ALL
        SELECT ad.adrelid, 'default function', a.attname || ' -> ' || p.oid::regprocedure::text, p.proowner, p.oid
          FROM pg_attrdef ad JOIN enc_tables e ON e.relid = ad.adrelid
          JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
          JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid AND d.refclassid = 'pg_proc'::regclass
          JOIN pg_proc p ON p.oid = d.refobjid
    )
    SELECT k.relid::regclass, k.kind, k.object, r.rolname, r.rolsuper,
           EXISTS (SELECT 1 FROM envelope.tenant_grants g WHERE pg_has_role(k.owner, g.grantee, 'USAGE'))
      FROM code k JOIN pg_roles r ON r.oid = k.owner
     -- pg_envelope's own functions (authorized_tenant, belongs_to, ...) are trusted.
     WHERE NOT EXISTS (SELECT 1 FROM pg_depend x
                        WHERE x.classid = 'pg_proc'::regclass AND x.objid = k.fn AND x.deptype = 'e'
                          AND x.refclassid = 'pg_extension'::regclass
                          AND x.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_envelope'))
     ORDER BY 1, 2, 3
$$;
COMMENT ON FUNCTION trust_report() IS 'Roles whose code runs inside sessions that hold tenant grants (table owners, trigger, policy and default functions), per table with encrypted columns.';

REVOKE ALL ON FUNCTION trust_report() FROM PUBLIC;
