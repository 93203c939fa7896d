-- encrypt_field / decrypt_field: round trips, NULLs, sizes, contexts, and every failure path.
SELECT envelope.grant_tenant('acme', current_user) AND envelope.grant_tenant('globex', current_user) AS granted;
SET app.tenant_id = 'acme';
SELECT envelope.decrypt_field(envelope.encrypt_field('hello')) AS text_round_trip;
SELECT envelope.decrypt_field(envelope.encrypt_field('ünïcödé ✓ 日本')) AS unicode;
SELECT envelope.decrypt_field(envelope.encrypt_field('')) = '' AS empty_text;
SELECT envelope.decrypt_field_bytea(envelope.encrypt_field('\x00ff00'::bytea)) AS bytea_round_trip;
SELECT envelope.decrypt_field_bytea(envelope.encrypt_field(''::bytea)) = '' AS empty_bytea;
SELECT envelope.decrypt_field(envelope.encrypt_field('ctx', 'users.email'), 'users.email') AS with_context;
-- NULL stays NULL; a NULL context is "no context".
SELECT envelope.encrypt_field(NULL::text) IS NULL AS null_text, envelope.encrypt_field(NULL::bytea) IS NULL AS null_bytea,
       envelope.decrypt_field(NULL::bytea) IS NULL AS null_decrypt, envelope.decrypt_field_bytea(NULL) IS NULL AS null_decrypt_bytea;
SELECT envelope.decrypt_field(envelope.encrypt_field('x', NULL)) AS null_context;
-- Randomized; 82 bytes of overhead; header = version 1, algorithm 1.
SELECT envelope.encrypt_field('same') <> envelope.encrypt_field('same') AS randomized,
       octet_length(envelope.encrypt_field('abc')) AS bytes,
       get_byte(envelope.encrypt_field('abc'), 0) AS version, get_byte(envelope.encrypt_field('abc'), 1) AS algorithm;
-- Large values: 10 MB round trip.
SELECT length(envelope.decrypt_field(envelope.encrypt_field(repeat('0123456789', 1024 * 1024)))) AS ten_mb;
-- Over envelope.max_value_size: 54000.
SET envelope.max_value_size = '1kB';
SELECT sqlstate_of($$SELECT envelope.encrypt_field(repeat('x', 1025))$$);
SELECT octet_length(envelope.encrypt_field(repeat('x', 1024))) AS at_limit;
RESET envelope.max_value_size;

CREATE TEMP TABLE sample AS SELECT envelope.encrypt_field('acme secret', 'orders.note') AS env;
-- Another tenant, another context, no context, empty context: the same opaque error.
SET app.tenant_id = 'globex';
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env, 'orders.note') FROM sample$$) AS other_tenant;
SET app.tenant_id = 'acme';
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env, 'orders.other') FROM sample$$) AS other_context;
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env) FROM sample$$) AS no_context;
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env, '') FROM sample$$) AS empty_context;
SELECT envelope.decrypt_field(env, 'orders.note') AS right_tenant_and_context FROM sample;
-- The encrypted types' contexts are reserved: a caller cannot mint a value that passes for a
-- typed one (for example text bytes that never went through the database encoding).
SELECT sqlstate_of($$SELECT envelope.encrypt_field('x', 'pg_envelope/type/text')$$) AS reserved_context;
SELECT sqlstate_of($$SELECT envelope.encrypt_field('\xff'::bytea, 'pg_envelope/type/text')$$) AS reserved_context_bytea;
SELECT envelope.decrypt_field(envelope.encrypt_field('x', 'pg_envelope_not_reserved/a'), 'pg_envelope_not_reserved/a') AS similar_prefix_ok;
-- Truncated, extended, garbage, empty: the same opaque error.
SELECT sqlstate_of($$SELECT envelope.decrypt_field(substring(env from 1 for octet_length(env) - 1), 'orders.note') FROM sample$$) AS truncated;
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env || '\x00'::bytea, 'orders.note') FROM sample$$) AS extended;
SELECT sqlstate_of($$SELECT envelope.decrypt_field(substring(env from 1 for 40), 'orders.note') FROM sample$$) AS header_only;
SELECT sqlstate_of($$SELECT envelope.decrypt_field('\xdeadbeef'::bytea)$$) AS garbage;
SELECT sqlstate_of($$SELECT envelope.decrypt_field(''::bytea)$$) AS empty;
-- Flip every single bit of the envelope (header, commitment, nonce, ciphertext, tag): none decrypts.
DO $$
DECLARE e bytea; ok int := 0; i int;
BEGIN
  SELECT env INTO e FROM sample;
  FOR i IN 0 .. octet_length(e) * 8 - 1 LOOP
    BEGIN
      PERFORM envelope.decrypt_field(set_bit(e, i, 1 - get_bit(e, i)), 'orders.note');
      ok := ok + 1;
    EXCEPTION WHEN data_exception THEN NULL;
    END;
  END LOOP;
  RAISE NOTICE 'bits flipped: %, decrypted: %', octet_length(e) * 8, ok;
END $$;
-- Bytes that are not UTF-8 text: decrypt_field refuses (22021), decrypt_field_bytea returns them.
SELECT sqlstate_of($$SELECT envelope.decrypt_field(envelope.encrypt_field('\xff00fe'::bytea))$$) AS not_text;
SELECT envelope.decrypt_field_bytea(envelope.encrypt_field('\xff00fe'::bytea)) AS as_bytea;

-- No tenant: fail closed with 55000, never plaintext, never NULL.
RESET app.tenant_id;
SELECT sqlstate_of($$SELECT envelope.encrypt_field('x')$$) AS unset;
SET app.tenant_id = '';
SELECT sqlstate_of($$SELECT envelope.encrypt_field('x')$$) AS empty_setting;
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env, 'orders.note') FROM sample$$) AS empty_setting_decrypt;
-- SET LOCAL ends with the transaction (what a transaction-mode pooler relies on).
BEGIN;
SET LOCAL app.tenant_id = 'acme';
SELECT envelope.decrypt_field(env, 'orders.note') AS inside_transaction FROM sample;
COMMIT;
SELECT sqlstate_of($$SELECT envelope.decrypt_field(env, 'orders.note') FROM sample$$) AS after_commit;
SET app.tenant_id = 'acme';
RESET ALL;
SELECT sqlstate_of($$SELECT envelope.encrypt_field('x')$$) AS after_reset_all;
-- An unknown tenant: 42704.
SET app.tenant_id = 'initech';
SELECT sqlstate_of($$SELECT envelope.encrypt_field('x')$$) AS unknown_tenant;
-- The setting's name is itself a setting (superuser only).
SET envelope.tenant_setting = 'myapp.tenant';
SET myapp.tenant = 'acme';
SELECT envelope.decrypt_field(env, 'orders.note') AS via_custom_setting FROM sample;
RESET envelope.tenant_setting;
RESET myapp.tenant;
