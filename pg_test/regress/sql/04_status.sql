-- status() and key_cache(): what is cached, never key bytes.
SET app.tenant_id = 'acme';
SELECT octet_length(envelope.encrypt_field('warm the cache')) > 0 AS warmed;
SET app.tenant_id = 'globex';
SELECT octet_length(envelope.encrypt_field('warm the cache')) > 0 AS warmed;
SELECT tenant, provider, active_dek_version, dek_versions, age_seconds >= 0 AS has_age,
       expires_in_seconds <= 3600 AS within_ttl, hits
  FROM envelope.key_cache() ORDER BY tenant;
SELECT jsonb_object_keys(envelope.status()) AS key ORDER BY 1;
SELECT s->'backend'->'root_unwraps' AS root_unwraps, s->'backend'->'cached_tenants' AS cached,
       s->'backend'->'nonce_rng_seeds' AS rng_seeds, s->>'current_tenant' AS current_tenant,
       s->>'tenant_setting' AS tenant_setting, s->'key_cache_ttl_seconds' AS ttl, s->'preloaded' AS preloaded,
       jsonb_path_query_array(s, '$.providers[*].name') AS providers
  FROM envelope.status() AS s;
-- Stampede control: slots for key-provider calls across the server (the two cold tenants
-- above took one each, and gave it back).
SELECT s->'provider_call_slots'->'max' AS slot_max, s->'provider_call_slots'->'in_use' AS slots_in_use,
       (s->'provider_call_slots'->>'calls')::int >= 2 AS calls_counted,
       (s->'provider_call_slots'->>'peak')::int >= 1 AS peak_counted
  FROM envelope.status() AS s;
-- No key material anywhere in the status output: not the root key, not a wrapped key.
SELECT position(encode(pg_read_binary_file(current_setting('envelope.local_root_key_file')), 'hex') IN envelope.status()::text) = 0
   AND position(encode(pg_read_binary_file(current_setting('envelope.local_root_key_file')), 'base64') IN envelope.status()::text) = 0
       AS no_root_key,
       NOT EXISTS (SELECT 1 FROM envelope.tenants t WHERE position(encode(t.wrapped_key, 'hex') IN envelope.status()::text) > 0)
       AS no_wrapped_keys;
-- The root key file path is shown to superusers only; pg_monitor members see the rest.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'regress_monitor') THEN CREATE ROLE regress_monitor NOLOGIN IN ROLE pg_monitor; END IF;
END $$;
SELECT envelope.status()->'providers'->0 ? 'root_key_file' AS superuser_sees_path;
SET ROLE regress_monitor;
SELECT envelope.status()->'providers'->0 ? 'root_key_file' AS monitor_sees_path;
-- pg_monitor includes pg_read_all_settings, which may read superuser-only settings.
SELECT sqlstate_of($$SHOW envelope.local_root_key_file$$) AS monitor_show_path;
SET ROLE regress_app;
SELECT sqlstate_of($$SHOW envelope.local_root_key_file$$) AS app_show_path;
RESET ROLE;
-- The settings: who may change them.
SET ROLE regress_app;
SELECT sqlstate_of($$SET envelope.tenant_setting = 'other.setting'$$) AS app_sets_tenant_setting;
SELECT sqlstate_of($$SET envelope.key_cache_ttl = '10s'$$) AS app_sets_ttl;
SELECT sqlstate_of($$SET envelope.local_root_key_file = '/tmp/mine'$$) AS app_sets_key_file;
SELECT sqlstate_of($$SET envelope.max_concurrent_provider_calls = 0$$) AS app_sets_call_bound;
RESET ROLE;
SELECT sqlstate_of($$SET envelope.max_concurrent_provider_calls = 0$$) AS superuser_sets_call_bound;
SELECT sqlstate_of($$SET envelope.local_root_key_file = '/tmp/mine'$$) AS superuser_sets_key_file;
SELECT name, CASE WHEN name IN ('envelope.local_root_key_file', 'envelope.credential_dirs', 'envelope.pkcs11_modules')
                  THEN '(path)' ELSE setting END AS setting, unit, context
  FROM pg_settings WHERE name LIKE 'envelope.%' ORDER BY name;
-- envelope.key_cache_ttl changed in the middle of a session reaches keys already cached, at the
-- next key use (encryption, then decryption), with no status() or key_cache() call between the
-- SET and that use: each key use compares the setting with the one the cache last applied.
SET app.tenant_id = 'acme';
CREATE TEMP TABLE ttl_probe AS
  SELECT envelope.encrypt_field('ttl probe') AS v,
         (envelope.status()->'backend'->>'root_unwraps')::int AS unwraps;
SET envelope.key_cache_ttl = '1s';
SELECT pg_sleep(1.2);
SELECT octet_length(envelope.encrypt_field('past the ttl')) > 0 AS encrypted_past_ttl;
SELECT (envelope.status()->'backend'->>'root_unwraps')::int - unwraps AS unwraps_by_encrypt FROM ttl_probe;
RESET envelope.key_cache_ttl;
SELECT envelope.decrypt_field(v) AS decrypt_after_reset FROM ttl_probe;
UPDATE ttl_probe SET unwraps = (envelope.status()->'backend'->>'root_unwraps')::int;
SET envelope.key_cache_ttl = '1s';
SELECT pg_sleep(1.2);
SELECT envelope.decrypt_field(v) AS decrypt_past_ttl FROM ttl_probe;
SELECT (envelope.status()->'backend'->>'root_unwraps')::int - unwraps AS unwraps_by_decrypt,
       (SELECT expires_in_seconds <= 1 FROM envelope.key_cache() WHERE tenant = 'acme') AS short_ttl_shown
  FROM ttl_probe;
RESET envelope.key_cache_ttl;
UPDATE ttl_probe SET unwraps = (envelope.status()->'backend'->>'root_unwraps')::int;
SELECT envelope.decrypt_field(v) AS decrypt_after_second_reset FROM ttl_probe;
SELECT (envelope.status()->'backend'->>'root_unwraps')::int - unwraps AS unwraps_after_reset,
       (SELECT expires_in_seconds > 3000 FROM envelope.key_cache() WHERE tenant = 'acme') AS long_ttl_again
  FROM ttl_probe;
DROP TABLE ttl_probe;
RESET app.tenant_id;
