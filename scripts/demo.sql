-- pg_envelope demo: two tenants, encrypt, decrypt, and a wrong-tenant attempt that fails.
-- Idempotent: safe to run again.
\set ON_ERROR_STOP on
\pset footer off
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pg_envelope;

-- The application role. It may use only the tenants it is granted.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'demo_app') THEN CREATE ROLE demo_app NOLOGIN; END IF;
END $$;

-- DBA, once: two tenants, each with its own tenant key (wrapped by the local root key) and DEK.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM envelope.tenants WHERE name = 'acme')   THEN PERFORM envelope.create_tenant('acme');   END IF;
  IF NOT EXISTS (SELECT 1 FROM envelope.tenants WHERE name = 'globex') THEN PERFORM envelope.create_tenant('globex'); END IF;
END $$;
SELECT envelope.grant_tenant('acme', 'demo_app') IS NOT NULL AS granted_acme,
       envelope.grant_tenant('globex', 'demo_app') IS NOT NULL AS granted_globex;

DROP TABLE IF EXISTS demo_notes;
CREATE TABLE demo_notes (
  id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  tenant text NOT NULL DEFAULT current_setting('app.tenant_id'),
  note   bytea NOT NULL
);
GRANT SELECT, INSERT ON demo_notes TO demo_app;

\echo
\echo '== The application writes as each tenant (SET LOCAL, as a pooled connection would)'
BEGIN;
SET LOCAL ROLE demo_app;
SET LOCAL app.tenant_id = 'acme';
INSERT INTO demo_notes (note) VALUES (envelope.encrypt_field('acme: launch codes are 0000', 'demo_notes.note'));
COMMIT;
BEGIN;
SET LOCAL ROLE demo_app;
SET LOCAL app.tenant_id = 'globex';
INSERT INTO demo_notes (note) VALUES (envelope.encrypt_field('globex: quarterly numbers', 'demo_notes.note'));
COMMIT;

\echo '== What is stored: ciphertext only (envelope v1, 82 bytes of overhead)'
SELECT id, tenant, octet_length(note) AS bytes, left(encode(note, 'hex'), 40) || '...' AS stored FROM demo_notes ORDER BY id;

\echo '== acme reads its own row'
BEGIN;
SET LOCAL ROLE demo_app;
SET LOCAL app.tenant_id = 'acme';
SELECT id, envelope.decrypt_field(note, 'demo_notes.note') AS plaintext FROM demo_notes WHERE tenant = 'acme';
COMMIT;

\echo '== globex tries to decrypt acme''s row: refused, nothing revealed'
DO $$
DECLARE v text;
BEGIN
  SET LOCAL ROLE demo_app;
  PERFORM set_config('app.tenant_id', 'globex', true);
  SELECT envelope.decrypt_field(note, 'demo_notes.note') INTO v FROM demo_notes WHERE tenant = 'acme';
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
