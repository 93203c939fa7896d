-- Key lifecycle, first part (issue 11): data key rotation and header-only inspection.
SELECT envelope.create_tenant('rot_a') > 0 AS created;
SELECT envelope.grant_tenant('rot_a', current_user) AS granted;
CREATE TABLE rot (id int, v envelope.encrypted_text, b bytea);
GRANT SELECT ON rot TO PUBLIC;
SET app.tenant_id = 'rot_a';
INSERT INTO rot VALUES (1, 'one'::text, envelope.encrypt_field('one-b', 'rot.b'));
-- key_version reads the header only: no key and no grant needed.
SET ROLE regress_other;
SELECT envelope.key_version(v) AS v_text, envelope.key_version(b) AS v_bytea FROM rot;
RESET ROLE;
-- Another backend holds version 1 in its cache before the rotation.
SELECT dblink_connect('peer', format('host=%s port=%s dbname=%s user=%s',
       current_setting('unix_socket_directories'), current_setting('port'), current_database(), current_user));
SELECT dblink_exec('peer', 'SET app.tenant_id = ''rot_a''');
SELECT * FROM dblink('peer', $$SELECT envelope.key_version(envelope.encrypt_field('x'))$$) AS t(peer_writes_with int);
-- A long REPEATABLE READ reader opened before the rotation.
SELECT dblink_connect('reader', format('host=%s port=%s dbname=%s user=%s',
       current_setting('unix_socket_directories'), current_setting('port'), current_database(), current_user));
SELECT dblink_exec('reader', 'BEGIN ISOLATION LEVEL REPEATABLE READ');
SELECT dblink_exec('reader', 'SET LOCAL app.tenant_id = ''rot_a''');
SELECT * FROM dblink('reader', $$SELECT v::text FROM rot$$) AS t(reader_before text);
SELECT envelope.rotate_data_key('rot_a') AS new_version;
INSERT INTO rot VALUES (2, 'two'::text, envelope.encrypt_field('two-b', 'rot.b'));
-- Old and new versions both decrypt; new writes use the new one, in every backend at its next call.
SELECT id, envelope.key_version(v) AS version, v::text, envelope.decrypt_field(b, 'rot.b') FROM rot ORDER BY id;
SELECT * FROM dblink('peer', $$SELECT envelope.key_version(envelope.encrypt_field('x'))$$) AS t(peer_writes_with int);
SELECT * FROM dblink('reader', $$SELECT string_agg(v::text, ',' ORDER BY id) FROM rot$$) AS t(reader_after text);
SELECT dblink_exec('reader', 'COMMIT');
SELECT d.version, d.state FROM envelope.data_keys d JOIN envelope.tenants t ON t.id = d.tenant_id
 WHERE t.name = 'rot_a' ORDER BY d.version;
-- Two sessions rotating at once: the second waits for the first, each makes its own version,
-- exactly one stays active.
BEGIN;
SELECT envelope.rotate_data_key('rot_a') AS in_transaction;
SELECT dblink_send_query('peer', $$SELECT envelope.rotate_data_key('rot_a')$$) AS sent;
SELECT pg_sleep(0.3);
COMMIT;
SELECT * FROM dblink_get_result('peer') AS t(peer_rotated_to int);
SELECT * FROM dblink_get_result('peer') AS t(done int);
SELECT count(*) FILTER (WHERE d.state = 'active') AS active, max(d.version) AS newest, count(*) AS versions
  FROM envelope.data_keys d JOIN envelope.tenants t ON t.id = d.tenant_id WHERE t.name = 'rot_a';
SELECT string_agg(v::text || '/' || envelope.decrypt_field(b, 'rot.b'), ',' ORDER BY id) AS all_still_decrypt FROM rot;
-- A rotation rolled back changes nothing, also in the backend that made it. Until it commits,
-- the rotating transaction itself keeps writing with the committed version (a value written with
-- the uncommitted one and sent elsewhere would be lost when a rollback lets the number be made
-- again with another key).
SELECT max(d.version) AS before_rollback FROM envelope.data_keys d JOIN envelope.tenants t ON t.id = d.tenant_id WHERE t.name = 'rot_a';
BEGIN;
SELECT envelope.rotate_data_key('rot_a') AS uncommitted;
SELECT envelope.key_version(envelope.encrypt_field('inside')) AS used_inside;
ROLLBACK;
SELECT envelope.key_version(envelope.encrypt_field('after rollback')) AS after_rollback;
BEGIN;
SAVEPOINT s;
SELECT envelope.rotate_data_key('rot_a') AS uncommitted;
SELECT envelope.key_version(envelope.encrypt_field('inside')) AS used_inside;
ROLLBACK TO SAVEPOINT s;
SELECT envelope.key_version(envelope.encrypt_field('after rollback to')) AS after_rollback_to;
COMMIT;
-- A grant rolled back is forgotten too.
BEGIN;
SELECT envelope.grant_tenant('rot_a', 'regress_other') AS granted_uncommitted;
SET LOCAL ROLE regress_other;
SELECT envelope.key_version(envelope.encrypt_field('x')) AS other_inside;
ROLLBACK;
SET ROLE regress_other;
SELECT sqlstate_of($$SELECT envelope.encrypt_field('x')$$) AS other_after_rollback;
RESET ROLE;
-- Two active versions (the one-active index dropped by hand) fail closed.
BEGIN;
DROP INDEX envelope.data_keys_one_active;
UPDATE envelope.data_keys d SET state = 'active' FROM envelope.tenants t WHERE t.id = d.tenant_id AND t.name = 'rot_a';
SELECT envelope.grant_tenant('rot_a', current_user) IS NOT NULL AS invalidate;
SELECT sqlstate_of($$SELECT envelope.encrypt_field('x')$$) AS two_active_versions;
ROLLBACK;
SELECT envelope.key_version(envelope.encrypt_field('x')) > 0 AS intact_after_rollback;
-- Bad input and privileges.
SELECT sqlstate_of($$SELECT envelope.rotate_data_key('no_such_tenant')$$) AS unknown_tenant;
SELECT sqlstate_of($$SELECT envelope.key_version('\x0102'::bytea)$$) AS not_an_envelope;
SELECT envelope.key_version(NULL::bytea) IS NULL AS null_in_null_out;
-- A well-formed header naming version 0 or 2^32-1 was never written by pg_envelope.
SELECT sqlstate_of(format($$SELECT envelope.key_version('\x%s'::bytea)$$,
       '0201' || '00000001' || 'ffffffff' || repeat('00', 76))) AS version_out_of_range;
-- Names are shown escaped and shortened in messages.
SELECT sqlstate_of($$SELECT envelope.rotate_data_key(E'bad\nname' || repeat('x', 300))$$) AS long_name;
SET ROLE regress_app;
SELECT sqlstate_of($$SELECT envelope.rotate_data_key('rot_a')$$) AS not_a_key_admin;
RESET ROLE;
SELECT dblink_disconnect('peer'), dblink_disconnect('reader');
RESET app.tenant_id;
DROP TABLE rot;
