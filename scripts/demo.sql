-- pg_envelope demo: a multi-tenant table with RLS and encrypted columns; two tenants; encrypt,
-- decrypt, and attempts that fail closed. Idempotent: safe to run again.
\set ON_ERROR_STOP on
\if :{?provider}
\else
  \set provider local
\endif
\pset footer off
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pg_envelope;

-- The application role. It may use only the tenants it is granted.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'demo_app') THEN CREATE ROLE demo_app NOLOGIN; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'demo_acme_only') THEN CREATE ROLE demo_acme_only NOLOGIN; END IF;
END $$;

-- DBA, once: two tenants, each with its own tenant key (wrapped by the local root key) and DEK.
\echo '== Tenants under provider' :'provider'
SELECT envelope.create_tenant('acme', provider => :'provider') > 0 AS acme_created,
       envelope.create_tenant('globex', provider => :'provider') > 0 AS globex_created;
SELECT envelope.grant_tenant('acme', 'demo_app') IS NOT NULL AS granted_acme,
       envelope.grant_tenant('globex', 'demo_app') IS NOT NULL AS granted_globex,
       envelope.grant_tenant('acme', 'demo_acme_only') IS NOT NULL AS granted_acme_only;

-- The schema: policies and the tenant column's default read envelope.authorized_tenant() (the
-- setting, only if the role holds that tenant), never the raw setting anyone can SET.
DROP TABLE IF EXISTS users;
CREATE TABLE users (
  id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  tenant text NOT NULL DEFAULT envelope.authorized_tenant(),
  email  envelope.encrypted_text,
  ssn    envelope.encrypted_text,
  salary envelope.encrypted_numeric
);
ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON users
  USING (tenant = envelope.authorized_tenant())
  WITH CHECK (tenant = envelope.authorized_tenant()
              AND envelope.belongs_to(email, tenant) AND envelope.belongs_to(ssn, tenant)
              AND envelope.belongs_to(salary, tenant));
GRANT SELECT, INSERT, UPDATE, DELETE ON users TO demo_app, demo_acme_only;

\echo
\echo '== The application writes as each tenant (SET LOCAL per transaction, as a pooled connection would)'
BEGIN;
SET LOCAL ROLE demo_app;
SET LOCAL app.tenant_id = 'acme';
INSERT INTO users (email, ssn, salary) VALUES ('alice@acme.test'::text, '111-22-3333'::text, 120000::numeric),
                                              ('bob@acme.test'::text, '444-55-6666'::text, 95000::numeric);
COMMIT;
BEGIN;
SET LOCAL ROLE demo_app;
SET LOCAL app.tenant_id = 'globex';
INSERT INTO users (email, ssn, salary) VALUES ('carol@globex.test'::text, '777-88-9999'::text, 150000::numeric);
COMMIT;

\echo '== What is stored (seen by a superuser, who bypasses RLS): ciphertext only'
SELECT id, tenant, left(email::varchar, 40) || '...' AS email_as_stored, pg_column_size(email) AS bytes FROM users ORDER BY id;

\echo '== acme reads its own rows (RLS filters, the casts decrypt)'
BEGIN;
SET LOCAL ROLE demo_app;
SET LOCAL app.tenant_id = 'acme';
SELECT id, email::text AS email, ssn::text AS ssn, salary::numeric AS salary FROM users ORDER BY id;
COMMIT;

\echo '== A role granted only acme names globex: no tenant, no rows, no writes'
BEGIN;
SET LOCAL ROLE demo_acme_only;
SET LOCAL app.tenant_id = 'globex';
SELECT envelope.authorized_tenant() AS authorized_tenant, count(*) AS globex_rows_seen FROM users;
UPDATE users SET ssn = NULL;
COMMIT;

\echo '== A plaintext literal never enters an encrypted column'
DO $$
BEGIN
  PERFORM set_config('app.tenant_id', 'acme', true);
  INSERT INTO users (email) VALUES ('typed-as-literal@acme.test');
  RAISE EXCEPTION 'demo failed: a literal was stored';
EXCEPTION WHEN invalid_text_representation THEN
  RAISE WARNING 'as expected: % (SQLSTATE %)', SQLERRM, SQLSTATE;
END $$;

\echo '== globex tries to decrypt acme''s ciphertext: refused, nothing revealed'
DO $$
DECLARE v text; stolen envelope.encrypted_text;
BEGIN
  SELECT email INTO stolen FROM users WHERE tenant = 'acme' LIMIT 1;   -- copied out by a superuser
  SET LOCAL ROLE demo_app;
  PERFORM set_config('app.tenant_id', 'globex', true);
  v := stolen::text;
  RAISE EXCEPTION 'demo failed: globex decrypted acme''s data';
EXCEPTION WHEN data_exception THEN
  RAISE WARNING 'as expected: % (SQLSTATE %)', SQLERRM, SQLSTATE;
END $$;

\echo '== No tenant set: refused (fails closed)'
DO $$
BEGIN
  PERFORM envelope.encrypt_field('should never be stored');
  RAISE EXCEPTION 'demo failed: encrypted without a tenant';
EXCEPTION WHEN object_not_in_prerequisite_state THEN
  RAISE WARNING 'as expected: % (SQLSTATE %)', SQLERRM, SQLSTATE;
END $$;

\echo '== This backend''s key cache (ids, versions, ages; never key bytes)'
SELECT tenant, tenant_key_id, active_dek_version, round(age_seconds::numeric, 3) AS age_s, hits FROM envelope.key_cache();
SELECT envelope.status()->'backend' AS backend;
