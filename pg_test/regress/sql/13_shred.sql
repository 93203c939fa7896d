-- Crypto-shredding (issue 12): schedule, cancel, schedule again, the window elapses, destruction;
-- tombstones; bad input; the two-person rule. Messages carry timestamps: where they do, only the
-- SQLSTATE is shown (left(..., 5)).
SET client_min_messages = warning;
SELECT envelope.create_tenant('sh_a') > 0 AS a, envelope.create_tenant('sh_b') > 0 AS b;
SELECT envelope.grant_tenant('sh_a', current_user), envelope.grant_tenant('sh_b', current_user);
CREATE TABLE sh (id int, tenant text, v envelope.encrypted_text, b bytea);
SET app.tenant_id = 'sh_a';
INSERT INTO sh VALUES (1, 'sh_a', 'alpha'::text, envelope.encrypt_field('\x0102'::bytea)), (2, 'sh_a', 'alpha 2'::text, NULL);
SET app.tenant_id = 'sh_b';
INSERT INTO sh VALUES (3, 'sh_b', 'beta'::text, envelope.encrypt_field('\x03'::bytea));
-- A peer backend with sh_a's keys cached.
SELECT dblink_connect('sh_peer', format('host=%s port=%s dbname=%s user=%s',
       current_setting('unix_socket_directories'), current_setting('port'), current_database(), current_user));
SELECT dblink_exec('sh_peer', 'SET app.tenant_id = ''sh_a''');
SELECT * FROM dblink('sh_peer', $$SELECT v::text FROM sh WHERE id = 1$$) AS t(peer_before text);

-- Bad input: unknown tenant, a window below envelope.shred_min_delay (1 hour by default), NULL.
SELECT sqlstate_of($$SELECT envelope.schedule_shred('sh_nope')$$) AS unknown_tenant;
SELECT sqlstate_of($$SELECT envelope.schedule_shred('sh_a', '10 minutes')$$) AS below_min_delay;
SELECT sqlstate_of($$SELECT envelope.schedule_shred('sh_a', NULL)$$) AS null_delay;
SELECT sqlstate_of($$SELECT envelope.cancel_shred('sh_nope')$$) AS cancel_unknown;
SELECT sqlstate_of($$SELECT envelope.confirm_shred('sh_a')$$) AS confirm_unscheduled;
SELECT envelope.cancel_shred('sh_a') AS cancel_unscheduled;

-- Scheduled (default window: 7 days): suspended at once, in every backend, with its own message.
SELECT d BETWEEN interval '6 days 23 hours' AND interval '7 days' AS seven_days
  FROM (SELECT envelope.schedule_shred('sh_a') - now() AS d OFFSET 0) s;
SELECT left(r, 5) AS peer_scheduled, r LIKE '%scheduled for crypto-shredding%' AS says_so
  FROM dblink('sh_peer', $$SELECT public.sqlstate_of('SELECT v::text FROM sh WHERE id = 1')$$) AS t(r text);
SET app.tenant_id = 'sh_b';
SELECT v::text AS other_tenant FROM sh WHERE id = 3;
SELECT left(sqlstate_of($$SELECT envelope.schedule_shred('sh_a', '8 days')$$), 5) AS scheduled_twice;
SELECT left(sqlstate_of($$SELECT envelope.resume_tenant('sh_a')$$), 5) AS resume_while_scheduled;
SELECT state, scheduled_by = current_user AS by_me, confirmation, root_key LIKE 'shared (local, provider "local", %' AS shared_root, kms_destruction
  FROM envelope.shred_report('sh_a');
SELECT tenant, state, dedicated_root_key FROM envelope.shreds;
SELECT jsonb_path_query_array(envelope.status(), '$.shreds[*].state') AS status_shreds;
-- Cancelled inside the window: the suspension it made is lifted.
SELECT envelope.cancel_shred('sh_a') AS cancelled, envelope.cancel_shred('sh_a') AS cancelled_again;
SELECT * FROM dblink('sh_peer', $$SELECT v::text FROM sh WHERE id = 1$$) AS t(peer_after_cancel text);
-- A tenant suspended before the schedule stays suspended after a cancel.
SELECT envelope.suspend_tenant('sh_a', 'incident 7') AS suspended;
SELECT envelope.schedule_shred('sh_a') IS NOT NULL AS scheduled, envelope.cancel_shred('sh_a') AS cancelled;
SELECT scope, tenant, reason FROM envelope.revocations WHERE tenant = 'sh_a';
SELECT envelope.resume_tenant('sh_a') AS resumed;
-- A suspension requested while a shred is scheduled takes over the shred's own: a cancel then
-- leaves it in place.
SELECT envelope.schedule_shred('sh_a') IS NOT NULL AS scheduled;
SELECT envelope.suspend_tenant('sh_a', 'incident 8') AS suspension_taken_over;
SELECT envelope.cancel_shred('sh_a') AS cancelled;
SELECT scope, tenant, reason FROM envelope.revocations WHERE tenant = 'sh_a';
SELECT envelope.resume_tenant('sh_a') AS resumed;
-- A schedule rolled back changes nothing.
BEGIN;
SELECT envelope.schedule_shred('sh_a') IS NOT NULL AS scheduled_inside;
ROLLBACK;
SELECT * FROM dblink('sh_peer', $$SELECT v::text FROM sh WHERE id = 1$$) AS t(peer_after_rollback text);

-- Scheduled again with a short window (a superuser lowers the minimum); before it elapses the
-- maintenance does nothing; after it, the destruction.
SET envelope.shred_min_delay = 0;
SELECT envelope.schedule_shred('sh_a', '2 seconds') IS NOT NULL AS scheduled_short;
SELECT count(*) AS due_before_window FROM envelope.maintenance_due() WHERE action = 'shred';
SELECT envelope.shred_if_due('sh_a') AS shred_before_window;
SELECT pg_sleep(2.2);
SELECT action, target FROM envelope.maintenance_due() WHERE action IN ('shred', 'destroy_root_key');
SET client_min_messages = error; -- other tests' leftover jobs may warn
CALL envelope.run_maintenance();
SET client_min_messages = warning;
SELECT envelope.shred_if_due('sh_a') AS shred_twice;
-- Every value of the tenant fails with 42704 "crypto-shredded", here and in the peer; the other
-- tenant is unaffected.
SELECT left(r, 5) AS peer_shredded, r LIKE '%was crypto-shredded%' AS says_so
  FROM dblink('sh_peer', $$SELECT public.sqlstate_of('SELECT v::text FROM sh WHERE id = 2')$$) AS t(r text);
SET app.tenant_id = 'sh_a';
SELECT left(sqlstate_of($$SELECT v::text FROM sh WHERE id = 1$$), 5) AS typed_value;
SELECT left(sqlstate_of($$SELECT envelope.decrypt_field_bytea(b) FROM sh WHERE id = 1$$), 5) AS bytea_value;
SELECT left(sqlstate_of($$SELECT envelope.encrypt_field('new')$$), 5) AS encrypt;
SET app.tenant_id = 'sh_b';
SELECT v::text AS other_tenant_after, envelope.decrypt_field_bytea(b) AS other_bytea FROM sh WHERE id = 3;
-- The tombstone: no key left, every version destroyed, the id and the name never reused.
SELECT wrapped_key IS NULL AS no_tenant_key, key_check IS NULL AS no_check, suspended_at IS NOT NULL AS suspended,
       shredded_by = current_user AS by_me, kms_destruction IS NULL AS shared_root
  FROM envelope.tenants WHERE name = 'sh_a';
SELECT version, state, destroyed_at IS NOT NULL AS dated FROM envelope.key_versions WHERE tenant = 'sh_a' ORDER BY 1;
SELECT count(*) AS wrapped_deks_left FROM envelope.data_keys d JOIN envelope.tenants t ON t.id = d.tenant_id
 WHERE t.name = 'sh_a' AND d.wrapped_key IS NOT NULL;
SELECT sqlstate_of($$SELECT envelope.create_tenant('sh_a')$$) AS name_reused;
SELECT envelope.create_tenant('sh_c') > (SELECT id FROM envelope.tenants WHERE name = 'sh_a') AS new_id_is_newer;
-- Re-encryption skips a shredded tenant's values (they can never be re-encrypted) and does the
-- others: a column holding both does not stall.
SELECT envelope.rotate_data_key('sh_b') AS sh_b_rotated;
CALL envelope.reencrypt('sh', 'v');
SELECT id, envelope.key_version(v) AS version FROM sh ORDER BY id;
SET app.tenant_id = 'sh_b';
SELECT v::text AS sh_b_after_reencrypt FROM sh WHERE id = 3;
-- What it means for backups: the root key (local) is shared and stays.
SELECT state, confirmation, root_key LIKE 'shared (local, %' AS shared_root, kms_destruction, backups LIKE '%stay decryptable%until those copies expire%' AS warns
  FROM envelope.shred_report('sh_a');
SELECT jsonb_path_query_array(envelope.status(), '$.suspended_tenants[*].tenant') AS status_suspended;
-- After the destruction: clear errors, nothing changed.
SELECT left(sqlstate_of($$SELECT envelope.schedule_shred('sh_a')$$), 5) AS shred_again;
SELECT left(sqlstate_of($$SELECT envelope.cancel_shred('sh_a')$$), 5) AS cancel_after;
SELECT left(sqlstate_of($$SELECT envelope.resume_tenant('sh_a')$$), 5) AS resume_after;
SELECT left(sqlstate_of($$SELECT envelope.confirm_shred('sh_a')$$), 5) AS confirm_after;
SELECT left(sqlstate_of($$SELECT envelope.grant_tenant('sh_a', 'regress_app')$$), 5) AS grant_after;
SELECT left(sqlstate_of($$SELECT envelope.rotate_data_key('sh_a')$$), 5) AS rotate_after;
SELECT left(sqlstate_of($$SELECT envelope.rotate_tenant_key('sh_a')$$), 5) AS rotate_tenant_key_after;
SELECT left(sqlstate_of($$SELECT envelope.enable_data_key('sh_a', 1)$$), 5) AS enable_after;
SELECT envelope.suspend_tenant('sh_a', 'x') AS suspend_after;
SELECT sqlstate_of($$SELECT envelope.shred_report('sh_nope')$$) AS report_unknown;

-- The two-person rule (envelope.shred_requires_confirmation, postgresql.conf): the login that
-- scheduled a shred cannot confirm it; until another login does, the window passes in vain.
RESET envelope.shred_min_delay;
ALTER SYSTEM SET envelope.shred_requires_confirmation = on;
SELECT pg_reload_conf();
SELECT pg_sleep(0.3);
SHOW envelope.shred_requires_confirmation;
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'regress_keyadmin1') THEN CREATE ROLE regress_keyadmin1 LOGIN; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'regress_keyadmin2') THEN CREATE ROLE regress_keyadmin2 LOGIN; END IF;
END $$;
GRANT EXECUTE ON FUNCTION envelope.schedule_shred(text, interval), envelope.confirm_shred(text),
      envelope.cancel_shred(text) TO regress_keyadmin1, regress_keyadmin2;
-- Two logins of their own (dblink), as two key administrators would connect.
CREATE FUNCTION pg_temp.login(conn text, who text) RETURNS text LANGUAGE sql AS $$
  SELECT dblink_connect(conn, format('host=%s port=%s dbname=%s user=%s',
         current_setting('unix_socket_directories'), current_setting('port'), current_database(), who)) $$;
SELECT pg_temp.login('sh_app', 'regress_keyadmin1');
SELECT * FROM dblink('sh_app', $$SELECT public.sqlstate_of('SELECT envelope.schedule_shred(''sh_c'', ''1 second'')')$$) AS t(app_below_min text);
-- A non-superuser cannot shorten the minimum itself; a superuser can, for a role.
SELECT * FROM dblink('sh_app', $$SELECT public.sqlstate_of('SET envelope.shred_min_delay = 0')$$) AS t(app_sets_min text);
SELECT * FROM dblink('sh_app', $$SELECT public.sqlstate_of('SELECT envelope.schedule_shred(''sh_c'', interval ''1 year -365 days -5 hours'')')$$)
    AS t(calendar_trick text);
SELECT dblink_disconnect('sh_app');
ALTER ROLE regress_keyadmin1 SET envelope.shred_min_delay = 0;
SELECT pg_temp.login('sh_app', 'regress_keyadmin1'), pg_temp.login('sh_admin2', 'regress_keyadmin2');
SELECT * FROM dblink('sh_app', $$SELECT envelope.schedule_shred('sh_c', '1 second') IS NOT NULL$$) AS t(scheduled_by_app boolean);
SELECT * FROM dblink('sh_app', $$SELECT public.sqlstate_of('SELECT envelope.confirm_shred(''sh_c'')')$$) AS t(confirm_own text);
-- SET SESSION AUTHORIZATION (or SET ROLE) does not make another person: the authenticated
-- login counts. A superuser that scheduled a shred cannot confirm it as someone else.
SELECT envelope.create_tenant('sh_d') > 0 AS d;
SELECT envelope.schedule_shred('sh_d', '1 day') IS NOT NULL AS scheduled_by_superuser;
SET SESSION AUTHORIZATION regress_keyadmin2;
SELECT sqlstate_of($$SELECT envelope.confirm_shred('sh_d')$$) AS confirm_as_someone_else;
RESET SESSION AUTHORIZATION;
SELECT envelope.cancel_shred('sh_d') AS cancelled_d;
SELECT pg_sleep(1.2);
SELECT count(*) AS due_unconfirmed FROM envelope.maintenance_due() WHERE action = 'shred';
SELECT envelope.shred_if_due('sh_c') AS shred_unconfirmed;
SELECT confirmation FROM envelope.shred_report('sh_c');
SELECT * FROM dblink('sh_admin2', $$SELECT envelope.confirm_shred('sh_c'), envelope.confirm_shred('sh_c')$$) AS t(confirmed boolean, confirmed_again boolean);
SELECT confirmation FROM envelope.shred_report('sh_c');
SELECT envelope.shred_if_due('sh_c') AS shred_confirmed;
SELECT dblink_disconnect('sh_app'), dblink_disconnect('sh_admin2');
ALTER ROLE regress_keyadmin1 RESET envelope.shred_min_delay;
ALTER SYSTEM RESET envelope.shred_requires_confirmation;
SELECT pg_reload_conf();
REVOKE EXECUTE ON FUNCTION envelope.schedule_shred(text, interval), envelope.confirm_shred(text),
       envelope.cancel_shred(text) FROM regress_keyadmin1, regress_keyadmin2;
DROP ROLE regress_keyadmin1, regress_keyadmin2;

-- Nothing of this is for PUBLIC.
SET ROLE regress_other;
SELECT sqlstate_of($$SELECT envelope.schedule_shred('sh_b')$$) AS schedule_public,
       sqlstate_of($$SELECT envelope.cancel_shred('sh_b')$$) AS cancel_public,
       sqlstate_of($$SELECT envelope.confirm_shred('sh_b')$$) AS confirm_public,
       sqlstate_of($$SELECT envelope.shred_if_due('sh_b')$$) AS shred_public,
       sqlstate_of($$SELECT envelope.shred_destroy_root_key('sh_b')$$) AS destroy_public,
       sqlstate_of($$SELECT * FROM envelope.shred_report('sh_b')$$) AS report_public,
       sqlstate_of($$SELECT * FROM envelope.shreds$$) AS view_public;
RESET ROLE;
-- A local provider cannot be dedicated (its root key file is shared and cannot be destroyed).
SELECT sqlstate_of($$SELECT envelope.add_key_provider('sh_local', 'local', '{"dedicated": true}')$$) AS dedicated_local;
SELECT sqlstate_of($$SELECT envelope.add_key_provider('sh_local', 'local', '{"key_cache_ttl": "soon"}')$$) AS bad_ttl;
SELECT envelope.add_key_provider('sh_local', 'local', '{"key_cache_ttl": "5s", "max_key_age": 60}') AS local_with_ttl;
SELECT dblink_disconnect('sh_peer');
RESET app.tenant_id;
RESET envelope.shred_min_delay;
DROP TABLE sh;
RESET client_min_messages;
