-- Key lifecycle (issue 11): version states, tenant key rotation, online re-encryption, rewrap,
-- rotation policies and run_maintenance. Progress NOTICEs carry rates: keep them out of the output.
SET client_min_messages = warning;
SELECT envelope.create_tenant('re_a') > 0 AS a, envelope.create_tenant('re_b') > 0 AS b;
SELECT envelope.grant_tenant('re_a', current_user), envelope.grant_tenant('re_b', current_user);
CREATE TABLE re (id int PRIMARY KEY, tenant text, v envelope.encrypted_text, n envelope.encrypted_int8,
                 b bytea, ctx text GENERATED ALWAYS AS ('re.b:' || id) STORED, c bytea, note text);
CREATE FUNCTION re_fill(t text, lo int, hi int) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  PERFORM set_config('app.tenant_id', t, true);
  INSERT INTO re (id, tenant, v, n, b, c) SELECT g, t, ('v' || g)::text, g::int8, envelope.encrypt_field('b' || g, 're.b:' || g),
                        envelope.encrypt_field('c' || g, 'constant-ctx')
    FROM generate_series(lo, hi) g;
END $$;
SELECT re_fill('re_a', 1, 300), re_fill('re_b', 301, 400);
CREATE FUNCTION re_digest() RETURNS text LANGUAGE plpgsql AS $$
DECLARE d text := '';
BEGIN
  FOR t IN 0..1 LOOP
    PERFORM set_config('app.tenant_id', (ARRAY['re_a', 're_b'])[t + 1], true);
    d := d || (SELECT md5(string_agg(v::text || n::int8 || envelope.decrypt_field(b, ctx) || envelope.decrypt_field(c, 'constant-ctx'), ',' ORDER BY id))
                 FROM re WHERE tenant = (ARRAY['re_a', 're_b'])[t + 1]);
  END LOOP;
  RETURN md5(d);
END $$;
-- A copy of one value under version 1, kept in a temporary table (tracked too).
CREATE TEMP TABLE old_value AS SELECT v FROM re WHERE id = 1;
SELECT envelope.rotate_data_key('re_a') AS a_v2;
SELECT re_fill('re_a', 401, 450);
CREATE TEMP TABLE digest AS SELECT re_digest() AS before;
CREATE TABLE re_noctx (id int PRIMARY KEY, tok bytea, tok2 bytea, ctx text);
SET app.tenant_id = 're_a';
INSERT INTO re_noctx VALUES (1, envelope.encrypt_field('no-context-1'), envelope.encrypt_field('null-ctx'), NULL),
                            (2, envelope.encrypt_field('no-context-2'), envelope.encrypt_field('with-ctx', 'c2'), 'c2'),
                            (3, NULL, NULL, NULL);
RESET app.tenant_id;
-- Counts per tenant and version, from headers only.
SELECT tenant, version, state, "values" FROM envelope.column_key_versions('re', 'v');

-- Version states: the active version cannot be disabled; a disabled one is refused with its own
-- error (not the opaque decryption failure) until enabled; destroy needs disable first.
SELECT sqlstate_of($$SELECT envelope.disable_data_key('re_a', 2)$$) AS disable_active;
SELECT sqlstate_of($$SELECT envelope.disable_data_key('re_a', 9)$$) AS disable_unknown;
SELECT sqlstate_of($$SELECT envelope.disable_data_key('nope', 1)$$) AS disable_unknown_tenant;
SELECT sqlstate_of($$SELECT envelope.destroy_data_key('re_a', 1)$$) AS destroy_retired;
SELECT envelope.disable_data_key('re_a', 1) AS disabled, envelope.disable_data_key('re_a', 1) AS again;
SET app.tenant_id = 're_a';
SELECT sqlstate_of($$SELECT v::text FROM re WHERE id = 1$$) AS decrypt_disabled;
SELECT sqlstate_of($$SELECT envelope.decrypt_field(b, ctx) FROM re WHERE id = 1$$) AS decrypt_field_disabled;
SELECT v::text AS v2_still_reads FROM re WHERE id = 401;
-- Destroy refuses while a tracked column (every encrypted-type column; bytea ones once a job named
-- them) holds values under the version.
SELECT sqlstate_of($$SELECT envelope.destroy_data_key('re_a', 1)$$) AS destroy_in_use;
SELECT envelope.enable_data_key('re_a', 1) AS enabled;
SELECT left(v::text, 2) AS reads_again FROM re WHERE id = 1;

-- Re-encryption: bad targets and callers.
SELECT sqlstate_of($$CALL envelope.reencrypt('no_such_table', 'v')$$) AS unknown_table;
SELECT sqlstate_of($$CALL envelope.reencrypt('re', 'nope')$$) AS unknown_column;
SELECT sqlstate_of($$CALL envelope.reencrypt('re', 'note')$$) AS text_column;
CREATE VIEW re_view AS SELECT * FROM re;
SELECT sqlstate_of($$CALL envelope.reencrypt('re_view', 'v')$$) AS a_view;
CREATE TABLE re_part (id int, v envelope.encrypted_text) PARTITION BY RANGE (id);
SELECT sqlstate_of($$CALL envelope.reencrypt('re_part', 'v')$$) AS partitioned;
CREATE TABLE re_parent (id int, v envelope.encrypted_text);
CREATE TABLE re_child () INHERITS (re_parent);
SELECT sqlstate_of($$CALL envelope.reencrypt('re_parent', 'v')$$) AS inheritance_parent;
SELECT sqlstate_of($$SELECT * FROM envelope.column_key_versions('re_view', 'v')$$) AS versions_of_a_view;
SELECT sqlstate_of($$CALL envelope.reencrypt('re', 'v', context => 'x')$$) AS context_on_typed;
SELECT sqlstate_of($$CALL envelope.reencrypt('re', 'b', context => 'x', context_column => 'ctx')$$) AS both_contexts;
SELECT sqlstate_of($$CALL envelope.reencrypt('re', 'b', context => 'pg_envelope/type/text')$$) AS reserved_context;
SET ROLE regress_other;
SELECT sqlstate_of($$CALL envelope.reencrypt('re', 'v')$$) AS no_execute;
-- The per-value functions are executable by anyone but work only for a running batch's UPDATE
-- (a token only that UPDATE holds).
SELECT sqlstate_of($$SELECT envelope.reencrypt_value('\x00'::bytea, NULL, 12345)$$) AS value_outside_a_batch;
SELECT sqlstate_of($$SELECT envelope.needs_reencryption('\x00'::bytea, 0)$$) AS needs_outside_a_batch;
SELECT sqlstate_of($$SELECT envelope.rotate_tenant_key('re_a')$$) AS no_execute_rotate;
SELECT sqlstate_of($$SELECT envelope.disable_data_key('re_a', 1)$$) AS no_execute_disable;
SELECT sqlstate_of($$SELECT * FROM envelope.key_versions$$) AS no_select_versions;
RESET ROLE;
-- Inside a transaction block a CALL that commits cannot run.
\set VERBOSITY terse
BEGIN;
CALL envelope.reencrypt('re', 'v');
ROLLBACK;
\set VERBOSITY default

-- Each column under each tenant's active version; values keep their plaintext and context.
RESET app.tenant_id;
CALL envelope.reencrypt('re', 'v', batch_rows => 50);
CALL envelope.reencrypt('re', 'n');
CALL envelope.reencrypt('re', 'b', context_column => 'ctx');
CALL envelope.reencrypt('re', 'c', context => 'constant-ctx');
SELECT tenant, version, state, "values" FROM envelope.column_key_versions('re', 'v');
SELECT tenant, version, "values" FROM envelope.column_key_versions('re', 'b');
SELECT table_name, column_name, state, values_done, pass, values_remaining, percent
  FROM envelope.reencrypt_progress ORDER BY job;
SELECT (SELECT before FROM digest) = re_digest() AS same_plaintexts;
-- A wrong context fails (nothing is written), and the job stays open for a rerun.
SELECT envelope.rotate_data_key('re_a') AS a_v3;
\set VERBOSITY terse
CALL envelope.reencrypt('re', 'c', context => 'wrong');
CALL envelope.reencrypt('re', 'c', context => 'other');
\set VERBOSITY default
SELECT envelope.cancel_reencrypt(job) AS cancelled FROM envelope.reencrypt_progress WHERE column_name = 'c' AND state = 'running';
CALL envelope.reencrypt('re', 'c', context => 'constant-ctx');
SELECT version, "values" FROM envelope.column_key_versions('re', 'c') WHERE tenant = 're_a';

-- Values without a context (encrypt_field(x)) and rows whose context column is NULL keep their
-- value and their (absence of) context (written under version 1, at the top).
CALL envelope.reencrypt('re_noctx', 'tok');
CALL envelope.reencrypt('re_noctx', 'tok2', context_column => 'ctx');
SELECT column_name, values_done, values_remaining FROM envelope.reencrypt_progress WHERE table_name = 'public.re_noctx' ORDER BY job;
SET app.tenant_id = 're_a';
SELECT id, envelope.key_version(tok) AS v1, envelope.decrypt_field(tok) AS tok,
       envelope.key_version(tok2) AS v2, envelope.decrypt_field(tok2, ctx) AS tok2 FROM re_noctx ORDER BY id;
RESET app.tenant_id;
-- A batch runs the table's code (triggers) as the table's owner in a security-restricted
-- operation, never with the caller's rights, and no tenant key can be used there.
CREATE TABLE re_trig (id int PRIMARY KEY, v envelope.encrypted_text);
CREATE TABLE re_trig_log (who text, can_decrypt text);
GRANT INSERT ON re_trig_log TO regress_app;
CREATE FUNCTION re_trig_spy() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  -- Trigger code sees search_path = pg_catalog, pg_temp during a batch: qualify names.
  PERFORM set_config('app.tenant_id', 're_a', true);
  INSERT INTO public.re_trig_log SELECT current_user, public.sqlstate_of(format('SELECT v::text FROM public.re_trig WHERE id = %s', OLD.id));
  RETURN NEW;
END $$;
CREATE TRIGGER re_trig_spy BEFORE UPDATE ON re_trig FOR EACH ROW EXECUTE FUNCTION re_trig_spy();
SET app.tenant_id = 're_a';
INSERT INTO re_trig VALUES (1, 'spied'::text);
RESET app.tenant_id;
ALTER TABLE re_trig OWNER TO regress_app;
SELECT envelope.rotate_data_key('re_a') AS a_v4;
CALL envelope.reencrypt('re_trig', 'v');
SELECT who, can_decrypt FROM re_trig_log;

-- Old versions: disable, then destroy once nothing uses them; the tombstone keeps the number.
CALL envelope.reencrypt('re', 'v');
CALL envelope.reencrypt('re', 'n');
CALL envelope.reencrypt('re', 'b', context_column => 'ctx');
CALL envelope.reencrypt('re', 'c', context => 'constant-ctx');
CALL envelope.reencrypt('re_noctx', 'tok');
CALL envelope.reencrypt('re_noctx', 'tok2', context_column => 'ctx');
CALL envelope.reencrypt('re_trig', 'v');
SELECT tenant, version, "values" FROM envelope.column_key_versions('re', 'v');
SELECT envelope.disable_data_key('re_a', 1) AS d1, envelope.disable_data_key('re_a', 2) AS d2;
-- A value that is not an envelope in a tracked column does not stop the check.
CREATE TABLE re_junk (v envelope.encrypted_text);
INSERT INTO re_junk VALUES ('pge1:AgEAAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==');
-- The temporary copy still holds a version-1 value: refused, unless forced.
SELECT sqlstate_of($$SELECT envelope.destroy_data_key('re_a', 1)$$) AS destroy_in_use;
SELECT envelope.destroy_data_key('re_a', 1, force => true) AS forced, envelope.destroy_data_key('re_a', 2) AS destroyed;
SELECT d.version, d.state, d.wrapped_key IS NULL AS key_gone FROM envelope.data_keys d JOIN envelope.tenants t ON t.id = d.tenant_id
 WHERE t.name = 're_a' ORDER BY d.version;
SELECT sqlstate_of($$SELECT envelope.enable_data_key('re_a', 1)$$) AS enable_destroyed;
SET app.tenant_id = 're_a';
SELECT sqlstate_of($$SELECT v::text FROM old_value$$) AS decrypt_destroyed;
RESET app.tenant_id;
SELECT (SELECT before FROM digest) = re_digest() AS same_plaintexts_after_destroy;

-- A REPEATABLE READ reader whose snapshot predates the tenant key rotation and the root key
-- rewrap below, with neither tenant's keys cached (checklist row 12): it loads them after the
-- rotation, reading the key tables with its old snapshot, and decrypts everything.
SELECT dblink_connect('rr', format('host=%s port=%s dbname=%s user=%s',
       current_setting('unix_socket_directories'), current_setting('port'), current_database(), current_user));
SELECT dblink_exec('rr', 'BEGIN ISOLATION LEVEL REPEATABLE READ');
SELECT * FROM dblink('rr', $$SELECT count(*) FROM re$$) AS t(rr_snapshot_rows bigint);
SELECT * FROM dblink('rr', $$SELECT count(*) FROM envelope.key_cache()$$) AS t(rr_cached_tenants bigint);
-- Tenant key rotation: a new tenant key, every data key re-wrapped; nothing re-encrypted, the
-- header's tenant key id unchanged; the key check changes.
CREATE TEMP TABLE kek AS SELECT key_check, wrapped_key, key_generation FROM envelope.tenants WHERE name = 're_b';
SELECT envelope.rotate_tenant_key('re_b') AS generation;
SELECT t.key_check <> k.key_check AS new_check, t.wrapped_key <> k.wrapped_key AS rewrapped, t.key_generation
  FROM envelope.tenants t, kek k WHERE t.name = 're_b';
SELECT (SELECT before FROM digest) = re_digest() AS same_plaintexts_after_kek_rotation;
SELECT dblink_exec('rr', 'SET LOCAL app.tenant_id = ''re_b''');
SELECT * FROM dblink('rr', $$SELECT count(*) FILTER (WHERE v::text = 'v' || id AND n::int8 = id
                                   AND envelope.decrypt_field(b, ctx) = 'b' || id)
                               FROM re WHERE tenant = 're_b'$$) AS t(rr_reader_after_kek_rotation bigint);
SELECT sqlstate_of($$SELECT envelope.rotate_tenant_key('nope')$$) AS unknown_tenant;
-- Older versions cannot be disabled in the transaction that rotated the tenant (it still writes
-- with the version before its own until it commits).
BEGIN;
SELECT envelope.rotate_data_key('re_b') AS uncommitted_b;
SELECT sqlstate_of($$SELECT envelope.disable_data_key('re_b', 1)$$) AS disable_in_rotating_transaction;
ROLLBACK;
-- A rotation rolled back leaves the old tenant key in place.
BEGIN;
SELECT envelope.rotate_tenant_key('re_b') AS uncommitted;
ROLLBACK;
SELECT key_generation FROM envelope.tenants WHERE name = 're_b';
SELECT (SELECT before FROM digest) = re_digest() AS still_same;

-- Root key rotation for the local provider (no versions: every tenant re-wrapped, in process).
CALL envelope.rewrap_tenants('local', batch_size => 1);
SELECT provider, state, tenants_done = tenants_total AS done_all FROM envelope.rewrap_progress;
SELECT (SELECT before FROM digest) = re_digest() AS same_after_rewrap;
SELECT dblink_exec('rr', 'SET LOCAL app.tenant_id = ''re_a''');
SELECT * FROM dblink('rr', $$SELECT count(*) FILTER (WHERE v::text = 'v' || id AND envelope.decrypt_field(b, ctx) = 'b' || id)
                               FROM re WHERE tenant = 're_a'$$) AS t(rr_reader_after_rewrap bigint);
SELECT dblink_exec('rr', 'COMMIT');
SELECT dblink_disconnect('rr');
\set VERBOSITY terse
CALL envelope.rewrap_tenants('nope');
\set VERBOSITY default

-- Rotation policy and run_maintenance (what the worker does, for pg_cron users).
SELECT tenant, active_version, rotation_period, overdue FROM envelope.rotation_status WHERE tenant LIKE 're\_%' ORDER BY tenant;
SELECT sqlstate_of($$SELECT envelope.set_rotation_period('re_a', '1 minute')$$) AS too_short;
SELECT sqlstate_of($$SELECT envelope.set_rotation_period('re_a', '1000 years')$$) AS too_long;
SELECT envelope.set_rotation_period('re_b', '0'), envelope.set_rotation_period('re_a', '1 hour');
-- Make re_a's active version two hours old (as if time had passed).
UPDATE envelope.data_keys SET created_at = created_at - interval '2 hours'
 WHERE state = 'active' AND tenant_id = (SELECT id FROM envelope.tenants WHERE name = 're_a');
SELECT * FROM envelope.maintenance_due() WHERE target LIKE 're\_%';
CALL envelope.run_maintenance();
SELECT tenant, active_version, rotation_period, period_overridden FROM envelope.rotation_status WHERE tenant LIKE 're\_%' ORDER BY tenant;
SELECT envelope.set_rotation_period('re_a', NULL), envelope.set_rotation_period('re_b', NULL);
SELECT sqlstate_of($$SELECT envelope.set_rotation_period('re_a', '-1 day')$$) AS negative;
SELECT tenant, rotation_period = envelope.default_rotation_period() AS default_period FROM envelope.rotation_status WHERE tenant LIKE 're\_%' ORDER BY tenant;

-- time_limit: the CALL stops cleanly after a batch; the job stays open and the next CALL ends it.
SELECT envelope.rotate_data_key('re_b') AS b_v2;
CALL envelope.reencrypt('re', 'v', batch_rows => 1, time_limit => '0');
SELECT state, blocks_done < blocks_total AS part_done FROM envelope.reencrypt_progress
 WHERE column_name = 'v' ORDER BY job DESC LIMIT 1;
CALL envelope.reencrypt('re', 'v', batch_rows => 1000);
SELECT state, values_done FROM envelope.reencrypt_progress WHERE column_name = 'v' ORDER BY job DESC LIMIT 1;
SELECT tenant, version, "values" FROM envelope.column_key_versions('re', 'v');

-- Queued for the worker (it runs in envelope.database, not here): the job waits as queued.
SELECT envelope.queue_reencrypt('re', 'v') > 0 AS queued;
SELECT state FROM envelope.reencrypt_progress WHERE column_name = 'v' ORDER BY job DESC LIMIT 1;

-- Markers and privileges of the lifecycle functions.
SELECT p.oid::regprocedure AS function, p.provolatile, p.proparallel, p.prosecdef,
       has_function_privilege('public', p.oid, 'EXECUTE') AS public_execute
  FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_envelope'
 WHERE p.proname IN ('rotate_tenant_key', 'disable_data_key', 'enable_data_key', 'destroy_data_key', 'rewrap_tenants',
                     'rewrap_tenants_start', 'rewrap_tenants_batch', 'reencrypt', 'reencrypt_value', 'needs_reencryption',
                     'reencrypt_open', 'reencrypt_batch', 'cancel_reencrypt', 'queue_reencrypt', 'column_key_versions',
                     'key_tenant_id', 'data_key_in_use', 'set_rotation_period', 'run_maintenance', 'maintenance_due',
                     'rotate_data_key_if_due', 'maintenance_status', 'default_rotation_period')
 ORDER BY 1::text;
RESET app.tenant_id;
DROP TABLE re, re_part, old_value, re_noctx, re_trig, re_trig_log, re_parent, re_junk CASCADE;
DROP FUNCTION re_trig_spy();
DROP FUNCTION re_fill(text, int, int), re_digest();
RESET client_min_messages;
