-- The tenant setting is read at every call, however it changes. PostgreSQL 15 keeps the
-- setting's record between calls (src/nothrow.rs, to skip its binary search of ~400 settings);
-- each case below must still see the value GetConfigOption would return.
-- (02_fields granted both tenants to this role; granting again changes nothing.)
SELECT envelope.grant_tenant('acme', current_user) OR envelope.grant_tenant('globex', current_user) AS newly_granted;
-- Which tenant a value was encrypted for: decrypts under acme (set in whichever setting
-- envelope.tenant_setting names), or not.
CREATE FUNCTION pg_temp.under_acme(env bytea) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  PERFORM set_config(current_setting('envelope.tenant_setting'), 'acme', true);
  PERFORM envelope.decrypt_field(env);
  RETURN 'acme';
EXCEPTION WHEN OTHERS THEN
  RETURN 'not acme: ' || SQLSTATE;
END $$;
SET app.tenant_id = 'acme';
SELECT pg_temp.under_acme(envelope.encrypt_field('a')) AS plain_set;
-- Changed by set_config() between the rows of one statement.
CREATE TEMP TABLE ts_alt AS
  SELECT i, envelope.encrypt_field('w' || i) AS env
  FROM generate_series(1, 6) i,
       LATERAL (SELECT set_config('app.tenant_id', CASE WHEN i % 2 = 0 THEN 'globex' ELSE 'acme' END, false)) s;
SELECT i, pg_temp.under_acme(env) FROM ts_alt ORDER BY i;
-- SET LOCAL, then its rollback.
SET app.tenant_id = 'acme';
BEGIN;
SET LOCAL app.tenant_id = 'globex';
SELECT pg_temp.under_acme(envelope.encrypt_field('b')) AS set_local;
ROLLBACK;
SELECT current_setting('app.tenant_id') AS after_rollback, pg_temp.under_acme(envelope.encrypt_field('c')) AS after_rollback_tenant;
-- A function's SET clause, and the value after it returns.
CREATE FUNCTION pg_temp.enc_as_globex(t text) RETURNS bytea LANGUAGE sql SET app.tenant_id = 'globex'
  AS $$ SELECT envelope.encrypt_field(t) $$;
SELECT pg_temp.under_acme(pg_temp.enc_as_globex('d')) AS function_set_clause,
       pg_temp.under_acme(envelope.encrypt_field('e')) AS after_function;
-- RESET: no tenant.
RESET app.tenant_id;
SELECT sqlstate_of($$SELECT envelope.encrypt_field('f')$$) AS after_reset;
-- A library that defines settings, loaded after the setting was first read (PostgreSQL's table
-- of settings grows and is re-sorted).
SET app.tenant_id = 'globex';
SELECT pg_temp.under_acme(envelope.encrypt_field('g')) AS before_load;
LOAD 'auto_explain';
SELECT pg_temp.under_acme(envelope.encrypt_field('h')) AS after_load;
SET app.tenant_id = 'acme';
SELECT pg_temp.under_acme(envelope.encrypt_field('i')) AS after_load_and_set;
-- Another setting's name (envelope.tenant_setting), then a library that reserves its prefix:
-- PostgreSQL removes the placeholder, so there is no tenant any more.
SET envelope.tenant_setting = 'pg_trgm.tenant';
SET pg_trgm.tenant = 'globex';
SELECT pg_temp.under_acme(envelope.encrypt_field('j')) AS other_setting_name;
SET client_min_messages = error;  -- the WARNING about the removed placeholder
LOAD 'pg_trgm';
RESET client_min_messages;
SELECT sqlstate_of($$SELECT envelope.encrypt_field('k')$$) AS placeholder_removed;
RESET envelope.tenant_setting;
SET app.tenant_id = 'acme';
SELECT pg_temp.under_acme(envelope.encrypt_field('l')) AS back_to_app_tenant_id;
