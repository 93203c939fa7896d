-- Revocation at every scope (issue 12, first part): tenant suspension and system lockdown, next
-- to the credential (revoke_tenant) and version (disable_data_key) scopes.
SET client_min_messages = warning;
SELECT envelope.create_tenant('rv_a') > 0 AS a, envelope.create_tenant('rv_b') > 0 AS b;
SELECT envelope.grant_tenant('rv_a', current_user), envelope.grant_tenant('rv_b', current_user);
CREATE TABLE rv (id int, tenant text, v envelope.encrypted_text);
SET app.tenant_id = 'rv_a';
INSERT INTO rv VALUES (1, 'rv_a', 'alpha'::text);
SET app.tenant_id = 'rv_b';
INSERT INTO rv VALUES (2, 'rv_b', 'beta'::text);
-- A peer backend with rv_a's keys cached.
SELECT dblink_connect('rv_peer', format('host=%s port=%s dbname=%s user=%s',
       current_setting('unix_socket_directories'), current_setting('port'), current_database(), current_user));
SELECT dblink_exec('rv_peer', 'SET app.tenant_id = ''rv_a''');
SELECT * FROM dblink('rv_peer', $$SELECT v::text FROM rv WHERE id = 1$$) AS t(peer_before text);

-- Tenant scope. A suspension rolled back changes nothing.
BEGIN;
SELECT envelope.suspend_tenant('rv_a', 'rolled back') AS suspended_inside;
ROLLBACK;
SELECT * FROM dblink('rv_peer', $$SELECT v::text FROM rv WHERE id = 1$$) AS t(peer_after_rollback text);
-- Committed: the peer's next call is refused (57000, naming the suspension), whatever it cached;
-- encryption too; other tenants are unaffected.
SELECT envelope.suspend_tenant('rv_a', 'incident 42') AS suspended;
SELECT * FROM dblink('rv_peer', $$SELECT public.sqlstate_of('SELECT v::text FROM rv WHERE id = 1')$$) AS t(peer_after_suspend text);
SELECT * FROM dblink('rv_peer', $$SELECT public.sqlstate_of('SELECT envelope.encrypt_field(''x'')')$$) AS t(peer_encrypt text);
SET app.tenant_id = 'rv_a';
SELECT sqlstate_of($$SELECT v::text FROM rv WHERE id = 1$$) AS here_after_suspend;
SET app.tenant_id = 'rv_b';
SELECT v::text AS other_tenant FROM rv WHERE id = 2;
-- Key administration of a suspended tenant uses no key either.
SELECT sqlstate_of($$SELECT envelope.rotate_data_key('rv_a')$$) AS rotate_suspended;
SELECT envelope.suspend_tenant('rv_a', 'again') AS suspended_again;
SELECT scope, tenant, version, reason, by = current_user AS by_me FROM envelope.revocations ORDER BY 1, 2;
SELECT jsonb_path_query_array(envelope.status(), '$.suspended_tenants[*].tenant') AS status_suspended;
SELECT envelope.resume_tenant('rv_a') AS resumed, envelope.resume_tenant('rv_a') AS resumed_again;
SELECT * FROM dblink('rv_peer', $$SELECT v::text FROM rv WHERE id = 1$$) AS t(peer_after_resume text);
SELECT sqlstate_of($$SELECT envelope.suspend_tenant('rv_nope', 'x')$$) AS unknown_tenant;
SELECT sqlstate_of($$SELECT envelope.suspend_tenant('rv_a', '')$$) AS empty_reason;
SELECT sqlstate_of($$SELECT envelope.suspend_tenant('rv_a', E'two\nlines')$$) AS control_characters;
SELECT sqlstate_of($$SELECT envelope.suspend_tenant('rv_a', E'a\u2028forged log line')$$) AS line_separator;
SELECT sqlstate_of($$SELECT envelope.lockdown(E'\u202Eesrever')$$) AS bidi_override;

-- System scope. Every key use in every backend is refused at its next call (and the cache
-- dropped), key-provider calls too; immediate, not undone by a rollback; only a superuser lifts it.
BEGIN;
SELECT envelope.lockdown('drill') AS locked;
ROLLBACK;
SELECT * FROM dblink('rv_peer', $$SELECT public.sqlstate_of('SELECT v::text FROM rv WHERE id = 1')$$) AS t(peer_in_lockdown text);
SET app.tenant_id = 'rv_b';
SELECT sqlstate_of($$SELECT v::text FROM rv WHERE id = 2$$) AS here_in_lockdown;
SELECT sqlstate_of($$SELECT envelope.create_tenant('rv_c')$$) AS create_in_lockdown;
SELECT sqlstate_of($$SELECT envelope.rotate_tenant_key('rv_b')$$) AS rotate_in_lockdown;
SELECT envelope.status()->'lockdown'->>'active' AS status_active, envelope.status()->'lockdown'->>'reason' AS status_reason,
       envelope.status()->'lockdown'->>'persisted' AS persisted;
SELECT envelope.lockdown('drill 2') AS locked_again;
GRANT EXECUTE ON FUNCTION envelope.lift_lockdown(), envelope.lockdown(text) TO regress_app;
SET ROLE regress_app;
SELECT sqlstate_of($$SELECT envelope.lift_lockdown()$$) AS key_admin_lifts;
RESET ROLE;
REVOKE EXECUTE ON FUNCTION envelope.lift_lockdown(), envelope.lockdown(text) FROM regress_app;
SELECT envelope.lift_lockdown() AS lifted, envelope.lift_lockdown() AS lifted_again;
SELECT * FROM dblink('rv_peer', $$SELECT v::text FROM rv WHERE id = 1$$) AS t(peer_after_lift text);
SELECT v::text AS here_after_lift FROM rv WHERE id = 2;

-- Nothing of this is for PUBLIC.
SET ROLE regress_other;
SELECT sqlstate_of($$SELECT envelope.suspend_tenant('rv_a', 'x')$$) AS suspend_public,
       sqlstate_of($$SELECT envelope.resume_tenant('rv_a')$$) AS resume_public,
       sqlstate_of($$SELECT envelope.lockdown('x')$$) AS lockdown_public,
       sqlstate_of($$SELECT envelope.lift_lockdown()$$) AS lift_public,
       sqlstate_of($$SELECT * FROM envelope.revocations$$) AS view_public;
RESET ROLE;
SELECT dblink_disconnect('rv_peer');
RESET app.tenant_id;
DROP TABLE rv;
RESET client_min_messages;
