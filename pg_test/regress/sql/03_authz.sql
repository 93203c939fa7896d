-- Setting the tenant is not proof of identity: the role must hold a grant.
CREATE TABLE secrets (tenant text, env bytea);
GRANT SELECT, INSERT ON secrets TO PUBLIC;
SET app.tenant_id = 'acme';
INSERT INTO secrets VALUES ('acme', envelope.encrypt_field('acme payroll'));
-- regress_app holds acme.
SET ROLE regress_app;
SELECT envelope.decrypt_field(env) AS app_reads FROM secrets;
-- regress_member is a member of regress_app: allowed through membership.
SET ROLE regress_member;
SELECT envelope.decrypt_field(env) AS member_reads FROM secrets;
-- regress_other holds nothing: 42501, for encrypt and decrypt alike.
SET ROLE regress_other;
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env) FROM secrets$$) AS other_decrypt;
SELECT sqlstate_of($$SELECT envelope.encrypt_field('x')$$) AS other_encrypt;
-- regress_app does not hold globex.
SET ROLE regress_app;
SET app.tenant_id = 'globex';
SELECT sqlstate_of($$SELECT envelope.encrypt_field('x')$$) AS app_other_tenant;
RESET ROLE;
-- Superusers are not exempt: a tenant nobody was granted is closed to them too.
SELECT envelope.create_tenant('sealed') > 0 AS created;
SET app.tenant_id = 'sealed';
SELECT sqlstate_of($$SELECT envelope.encrypt_field('x')$$) AS superuser_without_grant;
-- Revocation takes effect at once in this backend (and in others at their next use).
SET app.tenant_id = 'acme';
SELECT envelope.revoke_tenant('acme', 'regress_app') AS revoked;
SELECT envelope.revoke_tenant('acme', 'regress_app') AS revoked_again;
SET ROLE regress_app;
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env) FROM secrets$$) AS after_revoke;
RESET ROLE;
SELECT envelope.grant_tenant('acme', 'regress_app') AS regranted;
SET ROLE regress_app;
SELECT envelope.decrypt_field(env) AS after_regrant FROM secrets;
RESET ROLE;
-- Revocation reaches another backend that has the keys cached (a dblink session).
SELECT dblink_connect('peer', format('host=%s port=%s dbname=%s user=%s',
       current_setting('unix_socket_directories'), current_setting('port'), current_database(), current_user));
SELECT dblink_exec('peer', 'SET app.tenant_id = ''acme''');
SELECT * FROM dblink('peer', 'SELECT envelope.decrypt_field(env) FROM secrets') AS t(v text);
SELECT envelope.revoke_tenant('acme', current_user) AS revoked_self;
SELECT * FROM dblink('peer', 'SELECT public.sqlstate_of($q$SELECT envelope.decrypt_field(env) FROM secrets$q$)') AS t(v text);
SELECT envelope.grant_tenant('acme', current_user) AS regranted_self;
SELECT * FROM dblink('peer', 'SELECT envelope.decrypt_field(env) FROM secrets') AS t(v text);
-- Revoking a role membership takes effect like PostgreSQL's own privilege checks (at the next
-- statement here, at the next transaction elsewhere), not after the key cache TTL, although the
-- grant check for that role was already passed and remembered.
SET ROLE regress_member;
SELECT envelope.decrypt_field(env) AS member_reads_before FROM secrets;
RESET ROLE;
REVOKE regress_app FROM regress_member;
SET ROLE regress_member;
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env) FROM secrets$$) AS member_after_membership_revoked;
RESET ROLE;
GRANT regress_app TO regress_member;
SELECT dblink_exec('peer', 'SET ROLE regress_member');
SELECT * FROM dblink('peer', 'SELECT envelope.decrypt_field(env) FROM secrets') AS t(v text);
REVOKE regress_app FROM regress_member;
SELECT * FROM dblink('peer', 'SELECT public.sqlstate_of($q$SELECT envelope.decrypt_field(env) FROM secrets$q$)') AS t(v text);
GRANT regress_app TO regress_member;
SELECT * FROM dblink('peer', 'SELECT envelope.decrypt_field(env) FROM secrets') AS t(v text);
SELECT dblink_disconnect('peer');
-- A transaction that changed grants cannot be prepared (2PC): other backends hear of key and
-- grant changes at commit, and COMMIT PREPARED happens elsewhere. The change is rolled back.
BEGIN;
SELECT envelope.revoke_tenant('acme', 'regress_app') AS revoked_in_2pc;
PREPARE TRANSACTION 'pg_envelope_regress';
SET ROLE regress_app;
SELECT envelope.decrypt_field(env) AS still_granted FROM secrets;
RESET ROLE;
DROP TABLE secrets;
-- A role name that needs quoting (mixed case, a space, a double quote): the grant reaches that
-- role and no other, and is taken back.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'Regress Mixed "Q" Role') THEN CREATE ROLE "Regress Mixed ""Q"" Role" NOLOGIN; END IF;
END $$;
SELECT envelope.grant_tenant('globex', 'Regress Mixed "Q" Role') AS quoted_granted;
SELECT has_table_privilege('Regress Mixed "Q" Role', 'envelope.grant_anchor', 'SELECT') AS quoted_anchor;
SET ROLE "Regress Mixed ""Q"" Role";
SET app.tenant_id = 'globex';
SELECT envelope.decrypt_field(envelope.encrypt_field('for a quoted role')) AS quoted_reads;
RESET ROLE;
SELECT envelope.revoke_tenant('globex', 'Regress Mixed "Q" Role') AS quoted_revoked,
       has_table_privilege('Regress Mixed "Q" Role', 'envelope.grant_anchor', 'SELECT') AS quoted_anchor_after;
SET ROLE "Regress Mixed ""Q"" Role";
SELECT sqlstate_of($$SELECT envelope.encrypt_field('x')$$) AS quoted_after_revoke;
RESET ROLE;
RESET app.tenant_id;
DROP ROLE "Regress Mixed ""Q"" Role";
