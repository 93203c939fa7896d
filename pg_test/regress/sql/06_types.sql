-- Encrypted column types: transparent INSERT/SELECT, the envelope as I/O, and every refusal.
SET app.tenant_id = 'acme';
CREATE TABLE typed (
  id    int PRIMARY KEY,
  t     envelope.encrypted_text,
  b     envelope.encrypted_bytea,
  j     envelope.encrypted_jsonb,
  i     envelope.encrypted_int8,
  n     envelope.encrypted_numeric,
  d     envelope.encrypted_date,
  ts    envelope.encrypted_timestamptz
);
-- Typed values (a parameter of the base type, a cast) encrypt through the assignment casts.
INSERT INTO typed VALUES (1, 'alice@example.com'::text, '\x00ff'::bytea, '{"b": [1, 2.50], "a": null}'::jsonb,
                          '-9223372036854775808'::bigint, 12345678901234567890.000000001::numeric, '2024-02-29'::date,
                          '2024-01-01 12:00:00.123456+02'::timestamptz);
INSERT INTO typed (id, t, n) VALUES (2, ''::text, 'NaN'::numeric);
INSERT INTO typed (id) VALUES (3);
PREPARE ins(int, text, bigint) AS INSERT INTO typed (id, t, i) VALUES ($1, $2, $3);
EXECUTE ins(4, 'bob@example.com', 7);
INSERT INTO typed (id, t) VALUES (5, 'varchar value'::varchar);
-- Explicit casts and decrypt_field() overloads decrypt to the base type. NULL stays NULL.
SET timezone = 'UTC';
SELECT id, t::text, b::bytea, j::jsonb, i::int8, n::numeric, d::date, ts::timestamptz FROM typed ORDER BY id;
SELECT envelope.decrypt_field(t) AS t, pg_typeof(envelope.decrypt_field(i)) AS i_type, envelope.decrypt_field(i) + 1 AS i_plus_one,
       pg_typeof(envelope.decrypt_field(ts)) AS ts_type
  FROM typed WHERE id = 1;
-- The edges of the fixed-size types (decoded in the extension, not by the receive functions):
-- infinities, the first and the last representable values.
SELECT d, (d::envelope.encrypted_date)::date = d AS date_ok
  FROM unnest(ARRAY['-infinity', 'infinity', '4713-01-01 BC', '5874897-12-31']::date[]) d;
SELECT ts, (ts::envelope.encrypted_timestamptz)::timestamptz = ts AS timestamptz_ok
  FROM unnest(ARRAY['-infinity', 'infinity', '4713-01-01 00:00:00+00 BC', '294276-12-31 23:59:59.999999+00']::timestamptz[]) ts;
SELECT i, (i::envelope.encrypted_int8)::int8 = i AS int8_ok
  FROM unnest(ARRAY[-9223372036854775808, -1, 0, 9223372036854775807]::int8[]) i;
-- The same value decrypts identically under any DateStyle / TimeZone (binary plaintext encoding).
SET datestyle = 'SQL, DMY';
SET timezone = 'America/New_York';
SELECT d::date, ts::timestamptz FROM typed WHERE id = 1;
RESET datestyle;
SET timezone = 'UTC';
-- Stored form: ciphertext; the text form is 'pge1:' || base64(envelope).
SELECT left(t::varchar, 5) AS prefix, octet_length(decode(substr(t::varchar, 6), 'base64')) AS envelope_bytes,
       get_byte(decode(substr(t::varchar, 6), 'base64'), 0) AS version
  FROM typed WHERE id = 1;
-- Plaintext never enters through the input function (literals are parsed at plan time).
SELECT sqlstate_of($$INSERT INTO typed (id, t) VALUES (10, 'plaintext@example.com')$$) AS literal;
SELECT sqlstate_of($$SELECT 'pge1:AAAA'::envelope.encrypted_text$$) AS short_envelope;
SELECT sqlstate_of($$SELECT 'pge1:***'::envelope.encrypted_text$$) AS bad_base64;
SELECT sqlstate_of($$SELECT ''::envelope.encrypted_int8$$) AS empty;
SELECT sqlstate_of($$SELECT 'hello'::envelope.encrypted_jsonb$$) AS jsonb_literal;
-- The error never repeats the rejected input.
SELECT position('secret-canary' IN sqlstate_of($$SELECT 'secret-canary'::envelope.encrypted_text$$)) = 0 AS input_not_echoed;
-- A valid envelope literal is accepted (that is how COPY and dumps restore), and decrypts.
SELECT t::varchar AS text_form FROM typed WHERE id = 1 \gset
SELECT :'text_form'::envelope.encrypted_text::text AS from_text_form;
-- Careful: a *typed* text value is plaintext, so a text-form string cast from text is encrypted
-- again (it is just a string); only untyped literals, COPY and binary input take the envelope.
SELECT left(((:'text_form'::text)::envelope.encrypted_text)::text, 5) AS double_encrypted_decrypts_to_text_form;
-- No operator pretends to work on randomized ciphertext.
SELECT sqlstate_of($$SELECT 1 FROM typed WHERE t = t$$) AS equals;
SELECT sqlstate_of($$SELECT 1 FROM typed WHERE t < t$$) AS less_than;
SELECT sqlstate_of($$SELECT 1 FROM typed ORDER BY t$$) AS order_by;
SELECT sqlstate_of($$SELECT t FROM typed GROUP BY t$$) AS group_by;
SELECT sqlstate_of($$SELECT DISTINCT t FROM typed$$) AS distinct_;
SELECT sqlstate_of($$SELECT t FROM typed UNION SELECT t FROM typed$$) AS union_;
SELECT sqlstate_of($$SELECT 1 FROM typed WHERE i > 5$$) AS compare_to_plain;
-- Comparing decrypted values works (and is the documented way).
SELECT id FROM typed WHERE t::text = 'bob@example.com';
-- Nothing may persist plaintext derived from a decrypting expression.
SELECT sqlstate_of($$CREATE INDEX ON typed ((t::text))$$) AS expression_index;
SELECT sqlstate_of($$CREATE INDEX ON typed (id) WHERE t::text = 'x'$$) AS partial_index;
SELECT sqlstate_of($$CREATE INDEX ON typed ((envelope.decrypt_field(i)))$$) AS index_on_decrypt_field;
SELECT sqlstate_of($$ALTER TABLE typed ADD COLUMN g text GENERATED ALWAYS AS (t::text) STORED$$) AS generated_column;
SELECT sqlstate_of($$CREATE STATISTICS typed_stats ON (t::text), (id) FROM typed$$) AS extended_statistics;
SELECT sqlstate_of($$CREATE STATISTICS typed_stats2 ON (envelope.decrypt_field(n)), (id) FROM typed$$) AS extended_statistics_fn;
SELECT sqlstate_of($$CREATE STATISTICS typed_ok ON id, (id + 1) FROM typed$$) AS unrelated_statistics;
-- Bound to its type: an encrypted_text envelope moved into an encrypted_int8 column fails to decrypt.
CREATE TEMP TABLE moved AS SELECT (t::varchar)::envelope.encrypted_int8 AS i FROM typed WHERE id = 1;
SELECT sqlstate_of($$SELECT i::int8 FROM moved$$) AS moved_across_types;
-- Bound to its tenant: the same row read as globex fails.
SET app.tenant_id = 'globex';
SELECT sqlstate_of($$SELECT t::text FROM typed WHERE id = 1$$) AS other_tenant;
SELECT sqlstate_of($$INSERT INTO typed (id, t) VALUES (11, 'x'::text)$$) AS globex_writes;
SELECT sqlstate_of($$SELECT t::text FROM typed WHERE id = 11$$) AS globex_reads_own;
-- ...and a globex ciphertext copied into an acme row stays unreadable for acme.
SET app.tenant_id = 'acme';
SELECT sqlstate_of($$SELECT t::text FROM typed WHERE id = 11$$) AS acme_reads_globex_row;
-- No tenant: writing fails closed; NULLs and ciphertext still move.
RESET app.tenant_id;
SELECT sqlstate_of($$INSERT INTO typed (id, t) VALUES (12, 'x'::text)$$) AS no_tenant_insert;
SELECT count(*) AS rows_readable_as_ciphertext FROM typed WHERE t IS NOT NULL;
SET app.tenant_id = 'acme';
-- Large values through TOAST: 10 MB.
INSERT INTO typed (id, t) VALUES (20, repeat('0123456789', 1024 * 1024)::text);
SELECT length(t::text) AS ten_mb, pg_column_size(t) > 10 * 1024 * 1024 AS stored_size_ok FROM typed WHERE id = 20;
SELECT pg_relation_size(reltoastrelid) > 10 * 1024 * 1024 AS toasted FROM pg_class WHERE relname = 'typed';
SET envelope.max_value_size = '1MB';
SELECT sqlstate_of($$INSERT INTO typed (id, t) VALUES (21, repeat('x', 1024 * 1024 + 1)::text)$$) AS over_limit;
RESET envelope.max_value_size;
DELETE FROM typed WHERE id IN (11, 20);
-- COPY text and binary: the envelope moves unchanged, no key needed, and decrypts afterwards.
COPY typed TO '/tmp/pg_envelope_regress_typed.copy';
COPY typed TO '/tmp/pg_envelope_regress_typed.bin' (FORMAT binary);
CREATE TABLE typed_text (LIKE typed);
CREATE TABLE typed_bin (LIKE typed);
RESET app.tenant_id;
COPY typed_text FROM '/tmp/pg_envelope_regress_typed.copy';
COPY typed_bin FROM '/tmp/pg_envelope_regress_typed.bin' (FORMAT binary);
SET app.tenant_id = 'acme';
SELECT (SELECT count(*) FROM typed_text x JOIN typed y USING (id) WHERE x.t::varchar IS NOT DISTINCT FROM y.t::varchar) AS text_copy_identical,
       (SELECT count(*) FROM typed_bin x JOIN typed y USING (id) WHERE x.j::varchar IS NOT DISTINCT FROM y.j::varchar) AS binary_copy_identical;
SELECT id, t::text, j::jsonb, n::numeric FROM typed_bin ORDER BY id;
-- numeric decoded in the extension (finite canonical values) or by numeric_recv (the rest):
-- the same value, display scale and stored form (stored size: the short or the long header) as
-- the original, across the header boundaries (scale 63/64, weight 63/64 and -64/-65) and the
-- special values.
CREATE TABLE numeric_back AS
SELECT v AS original, (v::envelope.encrypted_numeric)::numeric AS decrypted
  FROM (VALUES (0::numeric), (0.000), (-0.0), (1), (-1), (12345678901234567890.000000001), (123.4500), (9999.9999),
               (10000), (0.0001), (-0.00001), (1e-100), (1e100), (-1e200), (1.5e-20), (round(1.1, 63)), (round(1.1, 64)),
               (1e252), (1e256), (-1e252 + 1), (1e-256), (1e-260), (0.1e-255), (123456789.123456789e-200),
               ('NaN'), ('Infinity'), ('-Infinity'), (2::numeric ^ 1000), (-(2::numeric ^ -100)),
               (trunc(3.14159, 3)), (1234.5678::numeric(10, 2))) AS x(v);
SELECT count(*) AS numerics,
       count(*) FILTER (WHERE decrypted::text = original::text AND numeric_send(decrypted) = numeric_send(original)
                          AND pg_column_size(decrypted) = pg_column_size(original)) AS identical
  FROM numeric_back;
DROP TABLE numeric_back;
-- Function markers of the typed functions.
SELECT p.oid::regprocedure AS function, p.provolatile AS volatility, p.proparallel AS parallel, p.proisstrict AS strict
  FROM pg_proc p WHERE p.pronamespace = 'envelope'::regnamespace
   AND (p.proname LIKE 'encrypt\_%' OR (p.proname = 'decrypt_field' AND p.proargtypes[0] <> 'bytea'::regtype) OR p.proname LIKE 'encrypted\_text\_%')
 ORDER BY p.oid::regprocedure::text;
SELECT castsource::regtype, casttarget::regtype, castcontext FROM pg_cast
 WHERE castsource::regtype::text LIKE 'envelope.%' OR casttarget::regtype::text LIKE 'envelope.%' ORDER BY castsource::regtype::text, casttarget::regtype::text;
DROP TABLE typed, typed_text, typed_bin;
