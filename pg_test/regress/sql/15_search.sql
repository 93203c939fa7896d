-- Blind indexes (issue 14): the term type, its operators and operator classes, terms per tenant
-- and purpose, normalisation, the trigger that keeps a term column in step, the backfill, index
-- key rotation, and who may do what. Terms are random per tenant key: compared, never printed.
SET client_min_messages = warning;
SELECT envelope.create_tenant('bi_a') > 0 AS a, envelope.create_tenant('bi_b') > 0 AS b;
SELECT envelope.grant_tenant('bi_a', current_user), envelope.grant_tenant('bi_b', current_user);
SELECT envelope.declare_blind_index('bi.email', 'nfkc_casefold');
SELECT envelope.declare_blind_index('bi.ssn', 'digits');
SELECT envelope.declare_blind_index('bi.raw');
SELECT envelope.declare_blind_index('bi.nfc', 'nfc');

-- The type: strict text and binary forms, no casts from or to text or bytea (PostgreSQL's
-- explicit I/O conversion gives the marked text form, and takes only that form back).
SELECT 'bi1:v1:00112233445566778899aabbccddeeff'::envelope.blind_index AS text_round_trip;
SELECT 'bi1:v1:00112233445566778899aabbccddeeff'::envelope.blind_index::text AS io_conversion_to_text;
SELECT envelope.blind_index_version('bi1:v7:00112233445566778899aabbccddeeff') AS version;
SELECT sqlstate_of($$SELECT 'bi1:v1:0011'::envelope.blind_index$$) AS short_tag,
       sqlstate_of($$SELECT 'bi1:v0:00112233445566778899aabbccddeeff'::envelope.blind_index$$) AS version_zero,
       sqlstate_of($$SELECT 'bi1:v2147483648:00112233445566778899aabbccddeeff'::envelope.blind_index$$) AS version_over_int4,
       sqlstate_of($$SELECT 'BI1:V1:00112233445566778899AABBCCDDEEFF'::envelope.blind_index$$) AS upper_case,
       sqlstate_of($$SELECT 'alice@example.com'::envelope.blind_index$$) AS plaintext,
       sqlstate_of($$SELECT 'x'::text::envelope.blind_index$$) AS no_cast_from_text,
       sqlstate_of($$SELECT '\x00'::bytea::envelope.blind_index$$) AS no_cast_from_bytea;

-- Operators: equality is LEAKPROOF (usable under RLS), and so are the others; default B-tree
-- and hash operator classes.
SELECT o.oprname, p.proleakproof, p.provolatile
  FROM pg_operator o JOIN pg_proc p ON p.oid = o.oprcode
 WHERE o.oprleft = 'envelope.blind_index'::regtype ORDER BY o.oprname;
SELECT am.amname, opc.opcdefault FROM pg_opclass opc JOIN pg_am am ON am.oid = opc.opcmethod
 WHERE opc.opcintype = 'envelope.blind_index'::regtype ORDER BY am.amname;
-- Term functions: STABLE (never IMMUTABLE), strict.
SELECT DISTINCT provolatile, proisstrict FROM pg_proc
 WHERE proname IN ('blind_index', 'blind_index_all') AND pronamespace = 'envelope'::regnamespace;

-- Terms: equal within a tenant and purpose (after normalisation), different across tenants,
-- purposes, normalisations and types.
SET app.tenant_id = 'bi_a';
SELECT envelope.blind_index('bi.email', 'Alice@Example.COM') = envelope.blind_index('bi.email', 'alice@example.com') AS casefold,
       envelope.blind_index('bi.email', 'Straße@x') = envelope.blind_index('bi.email', 'STRASSE@x') AS full_folding,
       envelope.blind_index('bi.raw', 'Alice') = envelope.blind_index('bi.raw', 'alice') AS none_keeps_case,
       envelope.blind_index('bi.nfc', E'e\u0301') = envelope.blind_index('bi.nfc', E'\u00e9') AS nfc,
       envelope.blind_index('bi.raw', E'e\u0301') = envelope.blind_index('bi.raw', E'\u00e9') AS none_keeps_form,
       envelope.blind_index('bi.ssn', '123-45-6789') = envelope.blind_index('bi.ssn', '123 45 6789') AS digits,
       envelope.blind_index('bi.raw', '1') = envelope.blind_index('bi.raw', 1::bigint) AS text_vs_int8,
       envelope.blind_index('bi.raw', 1) = envelope.blind_index('bi.raw', 1::bigint) AS int4_is_int8,
       envelope.blind_index('bi.raw', 1.50) = envelope.blind_index('bi.raw', 1.5::numeric) AS numeric_scale,
       envelope.blind_index('bi.raw', 'a') = envelope.blind_index('bi.email', 'a') AS across_purposes,
       envelope.blind_index_version(envelope.blind_index('bi.raw', 'a')) AS active_version;
-- timestamp (without time zone): the same term whatever the session's TimeZone.
SET TimeZone = 'UTC';
CREATE TEMP TABLE ts_term AS SELECT envelope.blind_index('bi.raw', '2026-01-01 00:00'::timestamp) AS t;
SET TimeZone = 'America/New_York';
SELECT envelope.blind_index('bi.raw', '2026-01-01 00:00'::timestamp) = (SELECT t FROM ts_term) AS timestamp_ignores_timezone;
RESET TimeZone;
CREATE TEMP TABLE a_terms AS SELECT envelope.blind_index('bi.email', 'alice@example.com') AS t;
SET app.tenant_id = 'bi_b';
SELECT envelope.blind_index('bi.email', 'alice@example.com') = (SELECT t FROM a_terms) AS across_tenants;
-- Encrypted values: the term of the plaintext.
SELECT envelope.blind_index('bi.email', 'Bob@x'::text::envelope.encrypted_text) = envelope.blind_index('bi.email', 'bob@x') AS encrypted_text,
       envelope.blind_index('bi.raw', 42::bigint::envelope.encrypted_int8) = envelope.blind_index('bi.raw', 42) AS encrypted_int8,
       envelope.blind_index('bi.raw', '2026-01-02'::date::envelope.encrypted_date) = envelope.blind_index('bi.raw', '2026-01-02'::date) AS encrypted_date;

-- Errors: no tenant, no grant (the decryption error, never an empty result), an undeclared
-- purpose, a value with no digits, a redefined purpose, a bad normalisation.
RESET app.tenant_id;
SELECT sqlstate_of($$SELECT envelope.blind_index('bi.email', 'x')$$) AS no_tenant;
SET app.tenant_id = 'bi_a';
SELECT sqlstate_of($$SELECT envelope.blind_index('bi.nope', 'x')$$) AS undeclared,
       sqlstate_of($$SELECT envelope.blind_index('bi.ssn', 'no digits')$$) AS no_digits,
       sqlstate_of($$SELECT envelope.declare_blind_index('bi.email', 'none')$$) AS redefined,
       sqlstate_of($$SELECT envelope.declare_blind_index('bi.x', 'lower')$$) AS bad_normalization,
       sqlstate_of($$SELECT envelope.declare_blind_index('', 'none')$$) AS empty_purpose;
SELECT envelope.declare_blind_index('bi.email', 'nfkc_casefold') AS same_definition_is_a_no_op;
SET ROLE regress_other;
SELECT sqlstate_of($$SELECT envelope.blind_index('bi.email', 'x')$$) AS no_grant,
       sqlstate_of($$SELECT envelope.blind_index('bi.no_such_purpose', 'x')$$) AS no_grant_hides_purposes,
       sqlstate_of($$SELECT envelope.declare_blind_index('bi.y')$$) AS declare_not_public,
       sqlstate_of($$SELECT envelope.rotate_index_key('bi_a')$$) AS rotate_not_public,
       sqlstate_of($$SELECT envelope.destroy_index_key('bi_a', 1)$$) AS destroy_not_public,
       sqlstate_of($$SELECT * FROM envelope.index_keys$$) AS keys_not_public;
RESET ROLE;

-- A table: the trigger fills the term (a forged one is overwritten), a unique index per tenant,
-- lookups with a literal and with a generic plan's parameter use the index.
CREATE TABLE bi_users (id int PRIMARY KEY, tenant text NOT NULL, email envelope.encrypted_text, email_idx envelope.blind_index);
CREATE UNIQUE INDEX bi_users_email ON bi_users (tenant, email_idx);
CREATE TRIGGER bi_users_email_idx BEFORE INSERT OR UPDATE ON bi_users FOR EACH ROW
    EXECUTE FUNCTION envelope.blind_index_trigger('email', 'email_idx', 'bi.email');
INSERT INTO bi_users SELECT g, 'bi_a', ('user' || g || '@example.com')::text, NULL FROM generate_series(1, 2000) g;
INSERT INTO bi_users VALUES (3000, 'bi_a', 'someone@example.com'::text, 'bi1:v1:00000000000000000000000000000000');
SELECT email_idx = envelope.blind_index('bi.email', 'SOMEONE@example.com') AS forged_term_overwritten FROM bi_users WHERE id = 3000;
SELECT sqlstate_of($$INSERT INTO bi_users VALUES (3001, 'bi_a', 'User7@Example.com'::text, NULL)$$) AS unique_per_tenant;
UPDATE bi_users SET email = 'changed@example.com'::text WHERE id = 5;
SELECT id AS found_after_update FROM bi_users WHERE email_idx = envelope.blind_index('bi.email', 'changed@example.com');
ANALYZE bi_users;
SET enable_seqscan = off;
EXPLAIN (COSTS OFF) SELECT id FROM bi_users WHERE tenant = 'bi_a' AND email_idx = envelope.blind_index('bi.email', 'user42@example.com');
SELECT id FROM bi_users WHERE tenant = 'bi_a' AND email_idx = envelope.blind_index('bi.email', 'USER42@example.com');
PREPARE bi_lookup(text) AS SELECT id FROM bi_users WHERE tenant = 'bi_a' AND email_idx = envelope.blind_index('bi.email', $1);
SET plan_cache_mode = force_generic_plan;
EXPLAIN (COSTS OFF) EXECUTE bi_lookup('user43@example.com');
EXECUTE bi_lookup('User43@example.com');
RESET plan_cache_mode;
RESET enable_seqscan;
-- The same e-mail in another tenant is accepted (its term differs).
SET app.tenant_id = 'bi_b';
INSERT INTO bi_users VALUES (4000, 'bi_b', 'user7@example.com'::text, NULL);
SET app.tenant_id = 'bi_a';
-- NULL in, NULL out; an unsupported type is refused at planning.
SELECT envelope.blind_index('bi.raw', NULL::text) IS NULL AS null_in_null_out;
SELECT sqlstate_of($$SELECT envelope.blind_index('bi.raw', true)$$) AS no_boolean,
       sqlstate_of($$SELECT envelope.blind_index('bi.raw', '{"a":1}'::jsonb)$$) AS no_jsonb;
-- A hash join of two tables on terms of a shared purpose.
CREATE TABLE bi_orders (id int, email_idx envelope.blind_index);
INSERT INTO bi_orders SELECT g, envelope.blind_index('bi.email', 'user' || g || '@example.com') FROM generate_series(1, 2000, 7) g;
ANALYZE bi_orders;
SET enable_mergejoin = off;
SET enable_nestloop = off;
EXPLAIN (COSTS OFF) SELECT count(*) FROM bi_users u JOIN bi_orders o ON o.email_idx = u.email_idx;
SELECT count(*) AS orders_matched FROM bi_users u JOIN bi_orders o ON o.email_idx = u.email_idx;
RESET enable_mergejoin;
RESET enable_nestloop;
DROP TABLE bi_orders;
-- GROUP BY, DISTINCT, hash join.
SELECT count(DISTINCT email_idx) AS distinct_terms, count(*) AS rows FROM bi_users;
SET enable_mergejoin = off;
SELECT count(*) AS hash_join FROM bi_users a JOIN bi_users b USING (email_idx);
RESET enable_mergejoin;

-- Rotation: new terms carry the new version; blind_index_all matches either version during the
-- re-index; the backfill moves the tenant's rows; the old version is then destroyed.
SELECT envelope.rotate_index_key('bi_a') AS new_version;
SELECT envelope.blind_index_version(envelope.blind_index('bi.email', 'x')) AS new_terms_version;
SELECT count(*) AS old_row_by_active_term FROM bi_users WHERE email_idx = envelope.blind_index('bi.email', 'user9@example.com');
SELECT count(*) AS old_row_by_all_terms FROM bi_users WHERE email_idx = ANY (envelope.blind_index_all('bi.email', 'user9@example.com'));
SELECT sqlstate_of($$SELECT envelope.destroy_index_key('bi_a', 2)$$) AS active_not_destroyable;
CALL envelope.blind_index_backfill('bi_users', 'email', 'email_idx', 'bi.email', 'tenant', 500);
SELECT envelope.blind_index_version(email_idx) AS version, count(*) FROM bi_users WHERE tenant = 'bi_a' GROUP BY 1;
SELECT envelope.destroy_index_key('bi_a', 1);
SELECT count(*) AS found_after_destroy FROM bi_users WHERE email_idx = envelope.blind_index('bi.email', 'user9@example.com');
-- A tenant key rotation keeps the index keys (re-wrapped): terms still match.
SELECT envelope.rotate_tenant_key('bi_a') > 0 AS tenant_key_rotated;
SELECT count(*) AS found_after_tenant_key_rotation FROM bi_users WHERE email_idx = envelope.blind_index('bi.email', 'user9@example.com');

-- The backfill rewrites forged and copied terms of the active version too, and re-indexes
-- under a new purpose.
-- (With the trigger off, as a table owner or a replication apply could; the unique index
-- already refuses a copy of another row's term.)
ALTER TABLE bi_users DISABLE TRIGGER bi_users_email_idx;
UPDATE bi_users SET email_idx = 'bi1:v2:00000000000000000000000000000000' WHERE id = 10;
UPDATE bi_users SET email_idx = 'bi1:v2:11111111111111111111111111111111' WHERE id = 12;
SELECT sqlstate_of($$UPDATE bi_users SET email_idx = (SELECT email_idx FROM bi_users WHERE id = 11) WHERE id = 13$$) AS copied_term_refused_by_unique_index;
ALTER TABLE bi_users ENABLE TRIGGER bi_users_email_idx;
SELECT count(*) AS forged_terms_before FROM bi_users WHERE id IN (10, 12) AND email_idx = envelope.blind_index('bi.email', email);
CALL envelope.blind_index_backfill('bi_users', 'email', 'email_idx', 'bi.email', 'tenant', 500);
SELECT count(*) AS right_terms_after_backfill FROM bi_users WHERE id IN (10, 12)
   AND email_idx = envelope.blind_index('bi.email', email);
SELECT envelope.declare_blind_index('bi.email2', 'none');
ALTER TABLE bi_users DISABLE TRIGGER bi_users_email_idx;
CALL envelope.blind_index_backfill('bi_users', 'email', 'email_idx', 'bi.email2', 'tenant', 500);
ALTER TABLE bi_users ENABLE TRIGGER bi_users_email_idx;
SELECT count(*) AS reindexed_under_new_purpose FROM bi_users WHERE tenant = 'bi_a' AND email_idx = envelope.blind_index('bi.email2', email);
-- A misspelled term column in the trigger is an error, not a silently kept client term.
CREATE TABLE bi_typo (e text, e_idx envelope.blind_index);
CREATE TRIGGER bi_typo BEFORE INSERT ON bi_typo FOR EACH ROW EXECUTE FUNCTION envelope.blind_index_trigger('e', 'e_idX', 'bi.raw');
SELECT sqlstate_of($$INSERT INTO bi_typo VALUES ('x', 'bi1:v1:11111111111111111111111111111111')$$) AS misspelled_term_column;
-- Triggers the function refuses: a generated source (NULL in a BEFORE trigger), a column list
-- or a WHEN clause (an UPDATE of the term column alone would keep a client's term).
CREATE TABLE bi_gen (e text, g text GENERATED ALWAYS AS (lower(e)) STORED, e_idx envelope.blind_index);
CREATE TRIGGER bi_gen BEFORE INSERT ON bi_gen FOR EACH ROW EXECUTE FUNCTION envelope.blind_index_trigger('g', 'e_idx', 'bi.raw');
SELECT sqlstate_of($$INSERT INTO bi_gen (e) VALUES ('x')$$) AS generated_source_refused;
DROP TRIGGER bi_gen ON bi_gen;
CREATE TRIGGER bi_gen BEFORE INSERT OR UPDATE OF e ON bi_gen FOR EACH ROW EXECUTE FUNCTION envelope.blind_index_trigger('e', 'e_idx', 'bi.raw');
SELECT sqlstate_of($$INSERT INTO bi_gen (e) VALUES ('x')$$) AS column_list_refused;
DROP TABLE bi_gen;
-- The backfill clears a term left on a row without a source, and treats a domain over an
-- encrypted type as encrypted (another tenant's values are skipped, not decrypted).
CREATE DOMAIN bi_enc_email AS envelope.encrypted_text;
CREATE TABLE bi_dom (id int, email bi_enc_email, email_idx envelope.blind_index);
SET app.tenant_id = 'bi_b';
INSERT INTO bi_dom VALUES (1, 'b@x'::text::envelope.encrypted_text, NULL);
SET app.tenant_id = 'bi_a';
INSERT INTO bi_dom VALUES (2, 'a@x'::text::envelope.encrypted_text, NULL);
CALL envelope.blind_index_backfill('bi_dom', 'email', 'email_idx', 'bi.email');
SELECT id, email_idx IS NOT NULL AS has_term FROM bi_dom ORDER BY id;
CREATE TABLE bi_nulls (tenant text, email text, email_idx envelope.blind_index);
INSERT INTO bi_nulls VALUES ('bi_a', 'victim@x', NULL), ('bi_a', NULL, envelope.blind_index('bi.email', 'victim@x'));
CALL envelope.blind_index_backfill('bi_nulls', 'email', 'email_idx', 'bi.email', 'tenant');
SELECT count(*) AS only_the_real_row FROM bi_nulls WHERE email_idx = envelope.blind_index('bi.email', 'VICTIM@x');
DROP TABLE bi_dom, bi_nulls;
DROP DOMAIN bi_enc_email;

-- A partitioned table: each tenant's backfill touches only its own rows (the same ctid in two
-- partitions is two rows).
CREATE TABLE bi_parts (tenant text, email text, email_idx envelope.blind_index) PARTITION BY LIST (tenant);
CREATE TABLE bi_parts_a PARTITION OF bi_parts FOR VALUES IN ('bi_a');
CREATE TABLE bi_parts_b PARTITION OF bi_parts FOR VALUES IN ('bi_b');
SET app.tenant_id = 'bi_b';
INSERT INTO bi_parts VALUES ('bi_b', 'bob@b', envelope.blind_index('bi.email', 'bob@b'));
SET app.tenant_id = 'bi_a';
INSERT INTO bi_parts VALUES ('bi_a', 'alice@a', NULL);
CALL envelope.blind_index_backfill('bi_parts', 'email', 'email_idx', 'bi.email', 'tenant');
SELECT count(*) AS a_row_indexed FROM bi_parts WHERE email_idx = envelope.blind_index('bi.email', 'alice@a');
SET app.tenant_id = 'bi_b';
SELECT count(*) AS b_row_untouched FROM bi_parts WHERE email_idx = envelope.blind_index('bi.email', 'bob@b');
SET app.tenant_id = 'bi_a';
DROP TABLE bi_typo, bi_parts;

-- A low-cardinality column: the backfill warns.
CREATE TABLE bi_flags (id int, flag text, flag_idx envelope.blind_index);
INSERT INTO bi_flags SELECT g, (g % 2)::text, NULL FROM generate_series(1, 300) g;
SET client_min_messages = warning;
CALL envelope.blind_index_backfill('bi_flags', 'flag', 'flag_idx', 'bi.raw');
SELECT count(DISTINCT flag_idx) AS two_terms FROM bi_flags;

-- Re-encryption of a table with the README's term trigger (found by the maximal-logging leak
-- test: the batch's UPDATE fired the trigger, which had no tenant: 55000). The batch changes no
-- plaintext, so the trigger keeps the rows' terms; lookups still match afterwards, for the
-- re-encrypted source column and for another encrypted column of the table.
RESET client_min_messages;
CREATE TABLE bi_re (id int, tenant text, email envelope.encrypted_text, phone envelope.encrypted_text,
                    email_idx envelope.blind_index);
CREATE TRIGGER bi_re_email BEFORE INSERT OR UPDATE ON bi_re FOR EACH ROW
    EXECUTE FUNCTION envelope.blind_index_trigger('email', 'email_idx', 'bi.email');
SET app.tenant_id = 'bi_a';
INSERT INTO bi_re SELECT g, 'bi_a', ('user' || g || '@a')::text, ('+1 555 01' || g)::text FROM generate_series(1, 20) g;
SET app.tenant_id = 'bi_b';
INSERT INTO bi_re SELECT g, 'bi_b', ('user' || g || '@b')::text, ('+1 555 02' || g)::text FROM generate_series(21, 30) g;
CREATE TEMP TABLE bi_re_before AS SELECT id, email_idx FROM bi_re;
SELECT envelope.rotate_data_key('bi_a') > 1 AS rotated_a, envelope.rotate_data_key('bi_b') > 1 AS rotated_b;
RESET app.tenant_id;
SET client_min_messages = warning;
CALL envelope.reencrypt('bi_re', 'email');
CALL envelope.reencrypt('bi_re', 'phone');
RESET client_min_messages;
SELECT count(*) AS terms_kept FROM bi_re JOIN bi_re_before USING (id) WHERE bi_re.email_idx = bi_re_before.email_idx;
SELECT count(*) FILTER (WHERE v > 1) AS values_on_the_new_versions
  FROM bi_re, LATERAL (VALUES (envelope.key_version(email)), (envelope.key_version(phone))) AS k(v);
SET app.tenant_id = 'bi_a';
SELECT id FROM bi_re WHERE email_idx = envelope.blind_index('bi.email', 'USER7@a');
-- An application's UPDATE of the source still recomputes the term.
UPDATE bi_re SET email = 'changed@a'::text WHERE id = 7;
SELECT id FROM bi_re WHERE email_idx = envelope.blind_index('bi.email', 'changed@a');
SELECT count(*) AS old_term_gone FROM bi_re WHERE email_idx = envelope.blind_index('bi.email', 'user7@a');
RESET app.tenant_id;
DROP TABLE bi_re;

RESET app.tenant_id;
DROP TABLE bi_users, bi_flags;
DEALLOCATE bi_lookup;
RESET client_min_messages;
