-- The README's multi-tenant schema: a tenant column defaulting from the setting, an RLS policy
-- on the same setting, FORCE ROW LEVEL SECURITY, encrypted columns, and an application role
-- allowed its tenants.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'regress_tenant_app') THEN CREATE ROLE regress_tenant_app NOLOGIN; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'regress_auditor') THEN CREATE ROLE regress_auditor NOLOGIN BYPASSRLS; END IF;
END $$;
SELECT envelope.grant_tenant('acme', 'regress_tenant_app') AND envelope.grant_tenant('globex', 'regress_tenant_app') AS granted;
CREATE TABLE users (
  id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  tenant text NOT NULL DEFAULT envelope.authorized_tenant(),
  email  envelope.encrypted_text,
  ssn    envelope.encrypted_text
);
ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON users
  USING (tenant = envelope.authorized_tenant())
  WITH CHECK (tenant = envelope.authorized_tenant() AND envelope.belongs_to(email, tenant) AND envelope.belongs_to(ssn, tenant));
GRANT SELECT, INSERT, UPDATE, DELETE ON users TO regress_tenant_app, regress_auditor;

SET ROLE regress_tenant_app;
BEGIN;
SET LOCAL app.tenant_id = 'acme';
INSERT INTO users (email, ssn) VALUES ('alice@acme.test'::text, '111-11-1111'::text), ('bob@acme.test'::text, NULL);
COMMIT;
BEGIN;
SET LOCAL app.tenant_id = 'globex';
INSERT INTO users (email, ssn) VALUES ('carol@globex.test'::text, '333-33-3333'::text);
-- RLS refuses a row for another tenant.
SELECT sqlstate_of($$INSERT INTO users (tenant, email) VALUES ('acme', 'mallory'::text)$$) AS insert_for_other_tenant;
COMMIT;
-- Each tenant sees and decrypts its own rows only.
BEGIN;
SET LOCAL app.tenant_id = 'acme';
SELECT tenant, email::text, ssn::text FROM users ORDER BY id;
UPDATE users SET ssn = '222-22-2222'::text WHERE email::text = 'bob@acme.test';
SELECT email::text, ssn::text FROM users WHERE ssn IS NOT NULL ORDER BY id;
COMMIT;
BEGIN;
SET LOCAL app.tenant_id = 'globex';
SELECT tenant, email::text, ssn::text FROM users ORDER BY id;
COMMIT;
-- After the transaction the tenant is gone: RLS shows nothing and nothing decrypts.
SELECT count(*) AS visible_without_tenant FROM users;
SELECT sqlstate_of($$SELECT envelope.encrypt_field('x')$$) AS encrypt_without_tenant;
RESET ROLE;
-- A BYPASSRLS role without a tenant grant sees every row, as ciphertext only.
SET ROLE regress_auditor;
SET app.tenant_id = 'acme';
SELECT count(*) AS rows_seen, count(*) FILTER (WHERE email::varchar LIKE 'pge1:%') AS ciphertext_rows FROM users;
SELECT sqlstate_of($$SELECT email::text FROM users$$) AS auditor_decrypts;
RESET ROLE;
RESET app.tenant_id;
-- Parallel query gives the serial answer; decryption stays in the leader (PARALLEL RESTRICTED).
CREATE TABLE big (id int, tenant text, v envelope.encrypted_text);
SET app.tenant_id = 'acme';
INSERT INTO big SELECT i, 'acme', (i::text || '-value')::text FROM generate_series(1, 20000) i;
ANALYZE big;
SET max_parallel_workers_per_gather = 2;
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET force_parallel_mode = on;
-- The decryption is evaluated above the Gather, in the leader; workers only scan ciphertext.
EXPLAIN (COSTS OFF, VERBOSE) SELECT v::text FROM big WHERE id % 7 = 0;
SELECT sum(length(v::text)) AS total_length, count(*) FILTER (WHERE v::text LIKE '%-value') AS matching,
       md5(string_agg(v::text, ',' ORDER BY id)) AS digest
  FROM big WHERE id % 7 = 0;
RESET force_parallel_mode;
SET max_parallel_workers_per_gather = 0;
SELECT sum(length(v::text)) AS total_length, count(*) FILTER (WHERE v::text LIKE '%-value') AS matching,
       md5(string_agg(v::text, ',' ORDER BY id)) AS digest
  FROM big WHERE id % 7 = 0;
RESET ALL;
-- A table owner (here a superuser) who rewrites a row's tenant column does not hand the row's
-- values to the new tenant: the key comes from the session's tenant, and the values name
-- acme's key. globex sees the moved row through RLS and cannot read it (22000).
UPDATE users SET tenant = 'globex' WHERE id = 1;
SET ROLE regress_tenant_app;
BEGIN;
SET LOCAL app.tenant_id = 'globex';
SELECT count(*) AS globex_sees_moved_row FROM users WHERE id = 1;
SELECT sqlstate_of($$SELECT email::text FROM users WHERE id = 1$$) AS globex_reads_moved_row,
       sqlstate_of($$SELECT envelope.decrypt_field(email) FROM users WHERE id = 1$$) AS globex_decrypts_moved_row;
COMMIT;
RESET ROLE;
DROP TABLE users, big;
