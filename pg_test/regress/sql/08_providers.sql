-- Key providers: registration rules, privileges, verification, re-wrapping, key check values.
-- Options never hold secrets: credentials are file paths.
SELECT sqlstate_of($$SELECT envelope.add_key_provider('bao', 'vault_transit', '{"url":"https://127.0.0.1:8200","key":"pg-root","token":"s.SECRET-TOKEN"}')$$) AS inline_token;
SELECT position('SECRET-TOKEN' IN sqlstate_of($$SELECT envelope.add_key_provider('bao', 'vault_transit', '{"url":"https://127.0.0.1:8200","key":"pg-root","token":"s.SECRET-TOKEN"}')$$)) = 0 AS token_not_echoed;
SELECT sqlstate_of($$SELECT envelope.add_key_provider('bao', 'vault_transit', '{"url":"http://10.1.2.3:8200","key":"k","token_file":"/t","allow_insecure_http":true}')$$) AS http_not_loopback;
SELECT sqlstate_of($$SELECT envelope.add_key_provider('bao', 'vault_transit', '{"url":"https://127.0.0.1:8200","key":"k"}')$$) AS missing_token_file;
SELECT sqlstate_of($$SELECT envelope.add_key_provider('bao', 'vault_transit', '{"url":"https://127.0.0.1:8200","key":"k","token_file":"/t","extra":1}')$$) AS unknown_option;
SELECT sqlstate_of($$SELECT envelope.add_key_provider('Bad-Name', 'local', '{}')$$) AS bad_name;
SELECT sqlstate_of($$SELECT envelope.add_key_provider('gcp', 'gcp_kms', '{}')$$) AS unknown_kind;
SELECT sqlstate_of($$SELECT envelope.add_key_provider('local', 'local', '{}')$$) AS duplicate;
SELECT sqlstate_of($$SELECT envelope.add_key_provider('local2', 'local', '{"path":"/x"}')$$) AS local_with_options;
-- Files named by options must resolve under envelope.credential_dirs (postgresql.conf).
SELECT split_part(current_setting('envelope.credential_dirs'), ',', 1) AS creddir,
       split_part(current_setting('envelope.credential_dirs'), ',', 1) || '/regress-token' AS tokenfile \gset
COPY (SELECT 'not-a-real-token') TO :'tokenfile';
SELECT sqlstate_of($$SELECT envelope.add_key_provider('bao', 'vault_transit', '{"url":"http://127.0.0.1:1","key":"k","token_file":"/etc/passwd","allow_insecure_http":true}')$$) AS token_file_outside;
SELECT sqlstate_of(format($$SELECT envelope.add_key_provider('bao', 'vault_transit', '{"url":"http://127.0.0.1:1","key":"k","token_file":"%s/../../../etc/passwd","allow_insecure_http":true}')$$, :'creddir')) AS dotdot_escape;
SELECT sqlstate_of($$SELECT envelope.add_key_provider('bao', 'vault_transit', '{"url":"http://127.0.0.1:1","key":"k","token_file":"/nonexistent/token","allow_insecure_http":true}')$$) AS token_file_missing;
SELECT sqlstate_of($$SELECT envelope.add_key_provider('hsm', 'pkcs11', '{"module":"/lib/x86_64-linux-gnu/libc.so.6","token_label":"t","key_label":"k","pin_file":"/etc/passwd"}')$$) AS module_not_listed;
SELECT envelope.add_key_provider('dev_bao', 'vault_transit', format('{"url":"http://127.0.0.1:1","key":"pg-root","token_file":"%s/regress-token","allow_insecure_http":true}', :'creddir')::jsonb) AS registered;
SELECT name, kind, options->>'url' AS url FROM envelope.key_providers ORDER BY name;
-- Not for PUBLIC, and registration is for superusers even with EXECUTE granted.
SET ROLE regress_app;
SELECT sqlstate_of($$SELECT envelope.add_key_provider('x', 'local', '{}')$$) AS app_adds_provider;
RESET ROLE;
GRANT EXECUTE ON FUNCTION envelope.add_key_provider(text, text, jsonb) TO regress_app;
SET ROLE regress_app;
SELECT sqlstate_of($$SELECT envelope.add_key_provider('x', 'local', '{}')$$) AS key_admin_adds_provider;
RESET ROLE;
REVOKE EXECUTE ON FUNCTION envelope.add_key_provider(text, text, jsonb) FROM regress_app;
SET ROLE regress_app;
SELECT sqlstate_of($$SELECT envelope.verify_provider('local')$$) AS app_verifies;
SELECT sqlstate_of($$SELECT envelope.rewrap_tenant('acme', 'local')$$) AS app_rewraps;
SELECT sqlstate_of($$SELECT * FROM envelope.key_providers$$) AS app_reads_providers;
RESET ROLE;
-- verify_provider: a full round trip and a key check, bound to the tenant.
SELECT v->>'kind' AS kind, v->>'round_trip' AS round_trip, v->>'key_check' AS key_check, v->>'bound_to_tenant' AS bound
  FROM envelope.verify_provider('local') AS v;
-- An unreachable provider fails clearly (58000).
SELECT sqlstate_of($$SELECT envelope.verify_provider('dev_bao')$$) AS unreachable;
-- A provider row edited by hand (or restored from a dump) gains nothing: checked at every use.
BEGIN;
UPDATE envelope.key_providers SET options = jsonb_set(options, '{token_file}', '"/etc/passwd"') WHERE name = 'dev_bao';
SELECT sqlstate_of($$SELECT envelope.verify_provider('dev_bao')$$) AS edited_row;
ROLLBACK;
SELECT sqlstate_of($$SELECT envelope.verify_provider('nope')$$) AS unknown_provider;
-- Re-wrapping moves a tenant without touching its data.
SET app.tenant_id = 'acme';
CREATE TEMP TABLE keep AS SELECT envelope.encrypt_field('survives rewrap') AS env;
SELECT encode(wrapped_key, 'hex') AS before FROM envelope.tenants WHERE name = 'acme' \gset
SELECT envelope.rewrap_tenant('acme', 'local') AS rewrapped;
SELECT encode(wrapped_key, 'hex') <> :'before' AS wrapped_key_changed FROM envelope.tenants WHERE name = 'acme';
SELECT envelope.decrypt_field(env) AS after_rewrap FROM keep;
SELECT sqlstate_of($$SELECT envelope.rewrap_tenant('acme', 'nope')$$) AS to_unknown_provider;
SELECT sqlstate_of($$SELECT envelope.rewrap_tenant('nobody', 'local')$$) AS unknown_tenant;
-- A provider that hands back a different key under the same name fails closed (check value).
BEGIN;
UPDATE envelope.tenants SET key_check = decode(repeat('00', 32), 'hex') WHERE name = 'acme';
SELECT sqlstate_of($$SELECT envelope.rewrap_tenant('acme', 'local')$$) AS rewrap_refuses_mismatch;
ROLLBACK;
BEGIN;
UPDATE envelope.tenants SET key_check = decode(repeat('00', 32), 'hex') WHERE name = 'acme';
SELECT envelope.grant_tenant('acme', 'regress_other') IS NOT NULL AS invalidate;
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env) FROM keep$$) AS key_check_mismatch;
ROLLBACK;
SELECT envelope.decrypt_field(env) AS intact_after_rollback FROM keep;
-- Key tables altered so that no data key version is active (a superuser's UPDATE; checklist
-- row 16): the tenant's keys do not load, for writing or reading, with XX001 and no key used.
BEGIN;
UPDATE envelope.data_keys SET state = 'retired', retired_at = now()
 WHERE tenant_id = (SELECT id FROM envelope.tenants WHERE name = 'acme') AND state = 'active';
SELECT envelope.grant_tenant('acme', 'regress_other') IS NOT NULL AS invalidate;
SELECT sqlstate_of($$SELECT envelope.encrypt_field('no active version')$$) AS no_active_version_encrypt;
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env) FROM keep$$) AS no_active_version_decrypt;
ROLLBACK;
SELECT envelope.decrypt_field(env) AS intact_after_no_active_rollback FROM keep;
-- A stale entry (past its TTL) whose refresh meets a different key is evicted and fails closed;
-- it is never served degraded (only an unreachable provider is). Checklist row 38.
SET envelope.key_cache_ttl = '1s';
SELECT envelope.decrypt_field(env) AS cached_before_mismatch FROM keep;
BEGIN;
UPDATE envelope.tenants SET key_check = decode(repeat('00', 32), 'hex') WHERE name = 'acme';
SELECT pg_sleep(1.2);
SELECT count(*) AS cached_and_stale FROM envelope.key_cache() WHERE tenant = 'acme' AND expires_in_seconds <= 0;
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env) FROM keep$$) AS stale_meets_mismatch;
SELECT count(*) AS evicted FROM envelope.key_cache() WHERE tenant = 'acme';
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env) FROM keep$$) AS still_refused;
ROLLBACK;
RESET envelope.key_cache_ttl;
SELECT envelope.decrypt_field(env) AS reads_after_rollback FROM keep;
DELETE FROM envelope.key_providers WHERE name = 'dev_bao';
