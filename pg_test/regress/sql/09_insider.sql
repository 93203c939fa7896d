-- Regressions of the insider review (issue 10): revocation under REPEATABLE READ and
-- SERIALIZABLE, tenant crossing through RLS, plaintext through maintenance (security-restricted
-- operations), grant checks before the cache, DROP ROLE and grants, PostgreSQL's privilege rule.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'regress_noinherit') THEN CREATE ROLE regress_noinherit NOLOGIN NOINHERIT; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'regress_dropme') THEN CREATE ROLE regress_dropme NOLOGIN; END IF;
END $$;
GRANT regress_app TO regress_noinherit;
SELECT envelope.create_tenant('ins_a') > 0 AS a, envelope.create_tenant('ins_b') > 0 AS b;
SELECT envelope.grant_tenant('ins_a', 'regress_app') AS app_holds_a;
SELECT envelope.grant_tenant('ins_a', current_user) AND envelope.grant_tenant('ins_b', current_user) AS su_holds_both;
CREATE TABLE rr_secrets (env bytea);
GRANT SELECT ON rr_secrets TO PUBLIC;  -- table access for all: the refusals below are pg_envelope's
SET app.tenant_id = 'ins_a';
INSERT INTO rr_secrets VALUES (envelope.encrypt_field('a secret of ins_a'));
SELECT dblink_connect('peer', format('host=%s port=%s dbname=%s user=%s',
       current_setting('unix_socket_directories'), current_setting('port'), current_database(), current_user));

-- 1. Revocation reaches a REPEATABLE READ transaction at its next call, and every later one.
SET ROLE regress_app;
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT envelope.decrypt_field(env) AS rr_before FROM rr_secrets;
SELECT ok AS peer_revokes FROM dblink('peer', $$SELECT envelope.revoke_tenant('ins_a', 'regress_app')$$) AS t(ok boolean);
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env) FROM rr_secrets$$) AS rr_after_revoke;
COMMIT;
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env) FROM rr_secrets$$) AS next_transaction;
SELECT ok AS peer_regrants FROM dblink('peer', $$SELECT envelope.grant_tenant('ins_a', 'regress_app')$$) AS t(ok boolean);
-- The same under SERIALIZABLE, with the keys cached before the transaction began.
SELECT envelope.decrypt_field(env) AS warm FROM rr_secrets;
BEGIN ISOLATION LEVEL SERIALIZABLE;
SELECT envelope.decrypt_field(env) AS ser_before FROM rr_secrets;
SELECT ok AS peer_revokes FROM dblink('peer', $$SELECT envelope.revoke_tenant('ins_a', 'regress_app')$$) AS t(ok boolean);
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env) FROM rr_secrets$$) AS ser_after_revoke;
COMMIT;
-- A grant made while a REPEATABLE READ transaction runs is seen at its next call too.
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env) FROM rr_secrets$$) AS rr_without_grant;
SELECT ok AS peer_regrants FROM dblink('peer', $$SELECT envelope.grant_tenant('ins_a', 'regress_app')$$) AS t(ok boolean);
SELECT envelope.decrypt_field(env) AS rr_after_grant FROM rr_secrets;
COMMIT;
RESET ROLE;

-- 4. A policy on envelope.authorized_tenant() cannot be crossed by setting another tenant.
CREATE TABLE accounts (
  id     int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  tenant text NOT NULL DEFAULT envelope.authorized_tenant(),
  email  envelope.encrypted_text,
  note   text
);
ALTER TABLE accounts ENABLE ROW LEVEL SECURITY;
ALTER TABLE accounts FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON accounts
  USING (tenant = envelope.authorized_tenant())
  WITH CHECK (tenant = envelope.authorized_tenant() AND envelope.belongs_to(email, tenant));
GRANT SELECT, INSERT, UPDATE, DELETE ON accounts TO regress_app;
-- The superuser (granted both tenants; superusers bypass RLS) writes one row per tenant.
SET app.tenant_id = 'ins_a';
INSERT INTO accounts (email, note) VALUES ('alice@a.test'::text, 'a-row');
SET app.tenant_id = 'ins_b';
INSERT INTO accounts (email, note) VALUES ('bob@b.test'::text, 'b-row');
CREATE TABLE stolen AS SELECT email FROM accounts WHERE tenant = 'ins_b';
GRANT SELECT ON stolen TO regress_app, regress_other;
SET ROLE regress_app;
SET app.tenant_id = 'ins_a';
SELECT envelope.authorized_tenant() AS authorized, note, email::text FROM accounts ORDER BY id;
-- regress_app holds ins_a only: naming ins_b gives no tenant, no rows, no writes.
SET app.tenant_id = 'ins_b';
SELECT envelope.authorized_tenant() IS NULL AS not_authorized, count(*) AS rows_seen FROM accounts;
UPDATE accounts SET note = 'defaced';
DELETE FROM accounts;
SELECT sqlstate_of($$INSERT INTO accounts (tenant, note) VALUES ('ins_b', 'planted')$$) AS insert_into_b;
SELECT sqlstate_of($$INSERT INTO accounts (note) VALUES ('planted')$$) AS insert_with_default;
-- Back in its own tenant it cannot store another tenant's ciphertext in its rows.
SET app.tenant_id = 'ins_a';
SELECT sqlstate_of($$INSERT INTO accounts (email) SELECT email FROM stolen$$) AS plant_foreign_envelope;
SELECT sqlstate_of($$UPDATE accounts SET email = (SELECT email FROM stolen)$$) AS swap_in_foreign_envelope;
UPDATE accounts SET note = 'a-row, edited';
RESET ROLE;
RESET app.tenant_id;
SELECT tenant, note FROM accounts ORDER BY id;
-- belongs_to reads the header only (no key); NULL belongs to everyone.
SELECT envelope.belongs_to(email, 'ins_b') AS b_is_b, envelope.belongs_to(email, 'ins_a') AS b_is_a,
       envelope.belongs_to(email, 'no_such_tenant') AS unknown, envelope.belongs_to(NULL::envelope.encrypted_text, 'ins_a') AS null_value,
       envelope.belongs_to(email, NULL) AS null_tenant, envelope.belongs_to('\x0102'::bytea, 'ins_a') AS garbage
  FROM stolen;
-- No oracle of which tenants exist for a role that holds no grant and cannot read envelope.tenants:
-- belongs_to is false for every tenant, and an unknown tenant is refused like an ungranted one.
SET ROLE regress_other;
SELECT envelope.belongs_to(email, 'ins_b') AS b_is_b_for_other, envelope.belongs_to(email, 'no_such_tenant') AS unknown_for_other FROM stolen;
SELECT envelope.authorized_tenant() IS NULL AS unset_is_null;
SET app.tenant_id = 'ins_b';
SELECT sqlstate_of($$SELECT envelope.encrypt_field('x')$$) AS existing_tenant_for_other;
SET app.tenant_id = 'no_such_tenant';
SELECT sqlstate_of($$SELECT envelope.encrypt_field('x')$$) AS unknown_tenant_for_other;
RESET ROLE;
SELECT sqlstate_of($$SELECT envelope.encrypt_field('x')$$) AS unknown_tenant_for_superuser;
RESET app.tenant_id;

-- 5. Maintenance runs as the table owner in a security-restricted operation: no key is used
-- there, so statistics, indexes and materialized views can never hold decrypted values, even
-- through a wrapper function (honestly STABLE, or falsely IMMUTABLE).
CREATE FUNCTION public.dec_wrap(e envelope.encrypted_text) RETURNS text LANGUAGE sql STABLE AS $$ SELECT e::text $$;
CREATE FUNCTION public.dec_imm(e envelope.encrypted_text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT e::text $$;
CREATE TABLE sro (id int, email envelope.encrypted_text);
SET app.tenant_id = 'ins_a';
INSERT INTO sro SELECT i, ('user' || i || '@a.test')::text FROM generate_series(1, 50) i;
SELECT count(*) AS decrypts_normally FROM sro WHERE public.dec_wrap(email) LIKE 'user%';
CREATE STATISTICS sro_wrap ON (public.dec_wrap(email)) FROM sro;
SELECT sqlstate_of('ANALYZE sro') AS analyze_with_wrapper_statistics;
SELECT count(*) AS plaintext_statistics FROM pg_statistic_ext_data d JOIN pg_statistic_ext s ON s.oid = d.stxoid WHERE s.stxname = 'sro_wrap';
DROP STATISTICS sro_wrap;
SELECT sqlstate_of('ANALYZE sro') AS analyze_plain;
SELECT sqlstate_of('CREATE INDEX sro_imm ON sro (public.dec_imm(email))') AS index_on_false_immutable;
SELECT sqlstate_of('CREATE MATERIALIZED VIEW sro_mv AS SELECT public.dec_wrap(email) AS e FROM sro') AS matview;
CREATE MATERIALIZED VIEW sro_mv2 AS SELECT public.dec_wrap(email) AS e FROM sro WITH NO DATA;
SELECT sqlstate_of('REFRESH MATERIALIZED VIEW sro_mv2') AS refresh_matview;
DROP MATERIALIZED VIEW sro_mv2;
RESET app.tenant_id;

-- 6a. A role without the grant, in a backend holding another role's cached keys (SET ROLE, a
-- pooled connection), is refused before the cache is touched: it cannot evict them.
SET envelope.key_cache_ttl = '1s';
SET app.tenant_id = 'ins_a';
SELECT envelope.decrypt_field(env) AS su_warm FROM rr_secrets;
SELECT pg_sleep(1.2);
SELECT (envelope.status()->'backend'->>'root_unwraps')::int AS unwraps_before \gset
SET ROLE regress_other;
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env) FROM rr_secrets$$) AS denied;
RESET ROLE;
SELECT count(*) AS still_cached FROM envelope.key_cache() WHERE tenant = 'ins_a';
SELECT (envelope.status()->'backend'->>'root_unwraps')::int - :unwraps_before AS unwraps_by_denied_role;
RESET envelope.key_cache_ttl;

-- 6c. PostgreSQL's rule for privileges: a NOINHERIT member of a granted role does not use its
-- grant (it can SET ROLE to it, then it does).
SET ROLE regress_noinherit;
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env) FROM rr_secrets$$) AS noinherit_member;
SET ROLE regress_app;
SELECT envelope.decrypt_field(env) AS after_set_role FROM rr_secrets;
RESET ROLE;

-- 6b. Grants hold a shared dependency on their role: DROP ROLE refuses; after DROP OWNED BY the
-- grant no longer counts, and the next key-management call removes it.
SELECT envelope.grant_tenant('ins_a', 'regress_dropme') AS granted;
SELECT sqlstate_of('DROP ROLE regress_dropme') AS drop_role_with_grant;
DROP OWNED BY regress_dropme;
DROP ROLE regress_dropme;
SELECT count(*) AS orphaned_rows FROM envelope.tenant_grants g WHERE NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = g.grantee);
SELECT envelope.grant_tenant('ins_a', 'regress_app') AS regrant_cleans_up;
SELECT count(*) AS orphaned_rows FROM envelope.tenant_grants g WHERE NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = g.grantee);
-- The anchor privilege follows the grants: the last revoke of a role removes it.
SELECT has_table_privilege('regress_app', 'envelope.grant_anchor', 'SELECT') AS app_anchor;
SELECT envelope.grant_tenant('ins_b', 'regress_other') AS other_granted;
SELECT has_table_privilege('regress_other', 'envelope.grant_anchor', 'SELECT') AS other_anchor;
SELECT envelope.revoke_tenant('ins_b', 'regress_other') AS other_revoked;
SELECT has_table_privilege('regress_other', 'envelope.grant_anchor', 'SELECT') AS other_anchor_after;
-- A grant row whose role lost the anchor privilege by other means does not count.
SELECT envelope.grant_tenant('ins_b', 'regress_other') AS other_granted;
REVOKE SELECT ON envelope.grant_anchor FROM regress_other;
SET ROLE regress_other;
SET app.tenant_id = 'ins_b';
SELECT sqlstate_of($$SELECT envelope.encrypt_field('x')$$) AS grant_without_anchor;
RESET ROLE;
SELECT envelope.revoke_tenant('ins_b', 'regress_other') AS cleanup;

-- Who can run code in granted sessions: table owners, and the owners of functions and operators
-- of triggers (and WHEN clauses), policies, defaults, CHECK constraints and domains.
CREATE FUNCTION public.audit_trg() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
ALTER FUNCTION public.audit_trg() OWNER TO regress_other;
CREATE TRIGGER accounts_audit BEFORE INSERT ON accounts FOR EACH ROW EXECUTE FUNCTION public.audit_trg();
CREATE FUNCTION public.chk(e envelope.encrypted_text) RETURNS boolean LANGUAGE sql AS $$ SELECT true $$;
ALTER FUNCTION public.chk(envelope.encrypted_text) OWNER TO regress_other;
ALTER TABLE accounts ADD CONSTRAINT email_ok CHECK (public.chk(email));
CREATE TRIGGER accounts_when BEFORE UPDATE ON accounts FOR EACH ROW WHEN (public.chk(NEW.email)) EXECUTE FUNCTION public.audit_trg();
CREATE FUNCTION public.eqf(a text, b text) RETURNS boolean LANGUAGE sql AS $$ SELECT a = b $$;
ALTER FUNCTION public.eqf(text, text) OWNER TO regress_other;
CREATE OPERATOR public.=== (LEFTARG = text, RIGHTARG = text, FUNCTION = public.eqf);
CREATE POLICY via_operator ON accounts AS RESTRICTIVE USING (tenant OPERATOR(public.===) envelope.authorized_tenant());
CREATE DOMAIN public.checked_email AS envelope.encrypted_text CHECK (public.chk(VALUE));
CREATE TABLE contacts (id int, phone public.checked_email, tags envelope.encrypted_text[]);
SELECT table_name, kind, object, owner, is_superuser, holds_a_grant FROM envelope.trust_report() ORDER BY table_name::text, kind, object;
SET ROLE regress_app;
SELECT sqlstate_of('SELECT * FROM envelope.trust_report()') AS app_runs_report;
RESET ROLE;

SELECT dblink_disconnect('peer');
RESET ALL;
DROP TABLE rr_secrets, accounts, stolen, sro, contacts;
DROP DOMAIN public.checked_email;
DROP OPERATOR public.=== (text, text);
DROP FUNCTION public.dec_wrap(envelope.encrypted_text), public.dec_imm(envelope.encrypted_text), public.audit_trg(),
              public.chk(envelope.encrypted_text), public.eqf(text, text);
REVOKE regress_app FROM regress_noinherit;

-- More insider angles: cached plans across SET ROLE / SET SESSION AUTHORIZATION, a table owner
-- without a grant, role names that need quoting, honest markers, maintenance without a tenant.
CREATE TABLE more (id int PRIMARY KEY, env bytea, email envelope.encrypted_text);
GRANT SELECT ON more TO PUBLIC;
SET app.tenant_id = 'ins_a';
INSERT INTO more VALUES (1, envelope.encrypt_field('prepared'), 'owner@a.test'::text);
SET ROLE regress_app;
PREPARE dec AS SELECT envelope.decrypt_field(env) FROM more;
EXECUTE dec;
RESET ROLE;
SET ROLE regress_other;
SELECT sqlstate_of('EXECUTE dec') AS prepared_after_set_role;
RESET ROLE;
SET SESSION AUTHORIZATION regress_other;
SELECT sqlstate_of('EXECUTE dec') AS prepared_after_session_authorization;
RESET SESSION AUTHORIZATION;
DEALLOCATE dec;
-- The owner of a table holds no key by owning it.
ALTER TABLE more OWNER TO regress_other;
SET ROLE regress_other;
SELECT sqlstate_of($$SELECT email::text FROM more$$) AS owner_without_grant;
RESET ROLE;
ALTER TABLE more OWNER TO CURRENT_USER;
-- Role names are quoted wherever pg_envelope builds SQL with them.
DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'Regress Odd"Name') THEN CREATE ROLE "Regress Odd""Name" NOLOGIN; END IF; END $$;
SELECT envelope.grant_tenant('ins_a', 'Regress Odd"Name') AS odd_granted;
SELECT has_table_privilege('Regress Odd"Name', 'envelope.grant_anchor', 'SELECT') AS odd_anchor;
SET ROLE "Regress Odd""Name";
SELECT envelope.decrypt_field(env) AS odd_reads FROM more;
RESET ROLE;
SELECT envelope.revoke_tenant('ins_a', 'Regress Odd"Name') AS odd_revoked;
DROP ROLE "Regress Odd""Name";
-- Honest markers: nothing of pg_envelope is LEAKPROOF yet (decryption must never be), and the one
-- SECURITY DEFINER function pins its search_path.
SELECT count(*) AS leakproof_functions FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'envelope' AND p.proleakproof;
SELECT p.oid::regprocedure AS secdef, p.proconfig FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'envelope' AND p.prosecdef;
-- Maintenance needs no tenant and no key: VACUUM, ANALYZE, REINDEX, CLUSTER.
RESET app.tenant_id;
CREATE INDEX more_id ON more (id);
VACUUM (ANALYZE) more;
VACUUM FULL more;
SELECT sqlstate_of('REINDEX TABLE more') AS reindex, sqlstate_of('CLUSTER more USING more_id') AS cluster;
SET app.tenant_id = 'ins_a';
SELECT envelope.decrypt_field(env) AS after_maintenance, email::text FROM more;
RESET app.tenant_id;
DROP TABLE more;

-- A decrypting function declared IMMUTABLE cannot put plaintext in an index or a stored generated
-- column over encrypted columns: those are computed during the writes of granted sessions (not
-- in a security-restricted operation), so the DDL itself is refused.
CREATE TABLE derived (id int, email envelope.encrypted_text, plain text);
CREATE FUNCTION public.leak(e envelope.encrypted_text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS
  $$ BEGIN RETURN envelope.decrypt_field(e); EXCEPTION WHEN others THEN RETURN NULL; END $$;
CREATE FUNCTION public.leak_row(r derived) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT public.leak(r.email) $$;
CREATE DOMAIN public.enc_dom AS envelope.encrypted_text;
SELECT sqlstate_of('CREATE INDEX ON derived (public.leak(email))') AS expression_index;
SELECT sqlstate_of('CREATE INDEX ON derived (id) WHERE public.leak(email) IS NOT NULL') AS partial_index;
SELECT sqlstate_of('CREATE INDEX ON derived (public.leak_row(derived))') AS whole_row_index;
SELECT sqlstate_of('ALTER TABLE derived ADD COLUMN g2 text GENERATED ALWAYS AS (public.leak_row(derived)) STORED') AS whole_row_generated;
SELECT sqlstate_of('ALTER TABLE derived ADD COLUMN g text GENERATED ALWAYS AS (public.leak(email)) STORED') AS generated_column;
SELECT sqlstate_of('CREATE TABLE derived2 (e envelope.encrypted_text, g text GENERATED ALWAYS AS (public.leak(e)) STORED)') AS generated_in_create;
SELECT sqlstate_of('CREATE TABLE derived3 (e public.enc_dom, g text GENERATED ALWAYS AS (public.leak(e::envelope.encrypted_text)) STORED)') AS generated_over_domain;
SELECT sqlstate_of('CREATE TABLE derived4 (a envelope.encrypted_text[], g int GENERATED ALWAYS AS (cardinality(a)) STORED)') AS generated_over_array;
-- A concurrent build commits before the event trigger could refuse it: on a table with encrypted
-- columns, any concurrent build with expressions or a predicate is refused up front (use CREATE INDEX).
CREATE INDEX CONCURRENTLY derived_conc ON derived (public.leak(email));
CREATE INDEX CONCURRENTLY derived_conc ON derived (id) WHERE public.leak(email) IS NOT NULL;
SELECT count(*) AS leftover_indexes FROM pg_index WHERE indrelid = 'derived'::regclass;
CREATE INDEX CONCURRENTLY derived_conc_plain ON derived (lower(plain));
-- A composite type that gains an encrypted attribute after an index over it was created.
CREATE TYPE public.contact AS (label text);
CREATE TABLE contact_book (id int, c public.contact);
CREATE FUNCTION public.cleak(public.contact) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT ($1).label $$;
CREATE INDEX contact_book_c ON contact_book (public.cleak(c));
SELECT sqlstate_of('ALTER TYPE public.contact ADD ATTRIBUTE secret envelope.encrypted_text') AS composite_gains_encrypted;
DROP TABLE contact_book;
DROP FUNCTION public.cleak(public.contact);
DROP TYPE public.contact;
-- Columns that are not encrypted stay indexable, also in a table that has encrypted ones.
SELECT sqlstate_of('CREATE INDEX derived_plain ON derived (lower(plain))') AS unrelated_expression_index;
SELECT sqlstate_of('CREATE INDEX derived_id ON derived (id) WHERE plain IS NOT NULL') AS unrelated_partial_index;
SELECT sqlstate_of('ALTER TABLE derived ADD COLUMN g3 text GENERATED ALWAYS AS (upper(plain)) STORED') AS unrelated_generated;
DROP TABLE derived CASCADE;  -- and leak_row(derived)
DROP FUNCTION public.leak(envelope.encrypted_text);
DROP DOMAIN public.enc_dom;
-- A value whose header names another tenant's key: decrypted under acme it fails (22000) without
-- that tenant's keys ever being looked up (the key comes from the session's tenant; the header's
-- key id is only compared with it): no unwrap, no provider call, nothing cached for it.
SELECT envelope.create_tenant('regress_kid_b') IS NOT NULL AS kid_b_created;
SET app.tenant_id = 'acme';
CREATE TEMP TABLE kid_probe AS
  SELECT overlay(envelope.encrypt_field('acme secret') PLACING int4send((SELECT id FROM envelope.tenants WHERE name = 'regress_kid_b')::int4) FROM 3 FOR 4) AS forged,
         (envelope.status()->'backend'->>'root_unwraps')::int AS unwraps;
SELECT envelope.key_tenant_id(forged) = (SELECT id FROM envelope.tenants WHERE name = 'regress_kid_b') AS header_names_kid_b FROM kid_probe;
SELECT sqlstate_of(format('SELECT envelope.decrypt_field(%L::bytea)', forged)) AS acme_decrypts_kid_b_header FROM kid_probe;
SELECT (envelope.status()->'backend'->>'root_unwraps')::int - unwraps AS unwraps_after,
       NOT EXISTS (SELECT 1 FROM envelope.key_cache() WHERE tenant = 'regress_kid_b') AS kid_b_not_cached
  FROM kid_probe;
DROP TABLE kid_probe;
RESET app.tenant_id;
