-- Encrypted column types. Generated once from a template; edit all seven alike.
-- Representation: a pg_envelope v1 envelope in a varlena. Text I/O: 'pge1:' || base64(envelope);
-- binary I/O: the raw envelope. Input accepts ciphertext only; plaintext enters through the
-- VOLATILE assignment casts from the base types and leaves through explicit casts or
-- envelope.decrypt_field(). No comparison operators or operator classes: =, <, ORDER BY,
-- GROUP BY, DISTINCT and UNION on these types fail with "operator does not exist" /
-- "could not identify an ordering operator", never compare ciphertext silently.

-- encrypted_text ----------------------------------------------------------------------------
CREATE TYPE encrypted_text;
CREATE FUNCTION encrypted_text_in(cstring) RETURNS encrypted_text
    AS 'MODULE_PATHNAME', 'pge_envelope_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_text_out(encrypted_text) RETURNS cstring
    AS 'MODULE_PATHNAME', 'pge_envelope_out' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_text_recv(internal) RETURNS encrypted_text
    AS 'MODULE_PATHNAME', 'pge_envelope_recv' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_text_send(encrypted_text) RETURNS bytea
    AS 'MODULE_PATHNAME', 'pge_envelope_send' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE TYPE encrypted_text (
    INPUT = encrypted_text_in, OUTPUT = encrypted_text_out, RECEIVE = encrypted_text_recv, SEND = encrypted_text_send,
    INTERNALLENGTH = VARIABLE, STORAGE = extended, ALIGNMENT = int4, CATEGORY = 'U'
);
COMMENT ON TYPE encrypted_text IS 'Ciphertext of a text value under the current tenant''s key (pg_envelope).';
-- Encrypt: VOLATILE (fresh nonce; evaluated at execution with the session''s tenant).
CREATE FUNCTION encrypt_text(text) RETURNS encrypted_text
    AS 'MODULE_PATHNAME', 'pge_encrypt_typed' LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;
-- Decrypt: STABLE, so no index, generated column or extended statistic can hold plaintext
-- (those require IMMUTABLE).
CREATE FUNCTION decrypt_field(encrypted_text) RETURNS text
    AS 'MODULE_PATHNAME', 'pge_decrypt_typed' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE CAST (text AS encrypted_text) WITH FUNCTION encrypt_text(text) AS ASSIGNMENT;
CREATE CAST (encrypted_text AS text) WITH FUNCTION decrypt_field(encrypted_text);

-- encrypted_bytea ----------------------------------------------------------------------------
CREATE TYPE encrypted_bytea;
CREATE FUNCTION encrypted_bytea_in(cstring) RETURNS encrypted_bytea
    AS 'MODULE_PATHNAME', 'pge_envelope_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_bytea_out(encrypted_bytea) RETURNS cstring
    AS 'MODULE_PATHNAME', 'pge_envelope_out' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_bytea_recv(internal) RETURNS encrypted_bytea
    AS 'MODULE_PATHNAME', 'pge_envelope_recv' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_bytea_send(encrypted_bytea) RETURNS bytea
    AS 'MODULE_PATHNAME', 'pge_envelope_send' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE TYPE encrypted_bytea (
    INPUT = encrypted_bytea_in, OUTPUT = encrypted_bytea_out, RECEIVE = encrypted_bytea_recv, SEND = encrypted_bytea_send,
    INTERNALLENGTH = VARIABLE, STORAGE = extended, ALIGNMENT = int4, CATEGORY = 'U'
);
COMMENT ON TYPE encrypted_bytea IS 'Ciphertext of a bytea value under the current tenant''s key (pg_envelope).';
-- Encrypt: VOLATILE (fresh nonce; evaluated at execution with the session''s tenant).
CREATE FUNCTION encrypt_bytea(bytea) RETURNS encrypted_bytea
    AS 'MODULE_PATHNAME', 'pge_encrypt_typed' LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;
-- Decrypt: STABLE, so no index, generated column or extended statistic can hold plaintext
-- (those require IMMUTABLE).
CREATE FUNCTION decrypt_field(encrypted_bytea) RETURNS bytea
    AS 'MODULE_PATHNAME', 'pge_decrypt_typed' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE CAST (bytea AS encrypted_bytea) WITH FUNCTION encrypt_bytea(bytea) AS ASSIGNMENT;
CREATE CAST (encrypted_bytea AS bytea) WITH FUNCTION decrypt_field(encrypted_bytea);

-- encrypted_jsonb ----------------------------------------------------------------------------
CREATE TYPE encrypted_jsonb;
CREATE FUNCTION encrypted_jsonb_in(cstring) RETURNS encrypted_jsonb
    AS 'MODULE_PATHNAME', 'pge_envelope_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_jsonb_out(encrypted_jsonb) RETURNS cstring
    AS 'MODULE_PATHNAME', 'pge_envelope_out' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_jsonb_recv(internal) RETURNS encrypted_jsonb
    AS 'MODULE_PATHNAME', 'pge_envelope_recv' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_jsonb_send(encrypted_jsonb) RETURNS bytea
    AS 'MODULE_PATHNAME', 'pge_envelope_send' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE TYPE encrypted_jsonb (
    INPUT = encrypted_jsonb_in, OUTPUT = encrypted_jsonb_out, RECEIVE = encrypted_jsonb_recv, SEND = encrypted_jsonb_send,
    INTERNALLENGTH = VARIABLE, STORAGE = extended, ALIGNMENT = int4, CATEGORY = 'U'
);
COMMENT ON TYPE encrypted_jsonb IS 'Ciphertext of a jsonb value under the current tenant''s key (pg_envelope).';
-- Encrypt: VOLATILE (fresh nonce; evaluated at execution with the session''s tenant).
CREATE FUNCTION encrypt_jsonb(jsonb) RETURNS encrypted_jsonb
    AS 'MODULE_PATHNAME', 'pge_encrypt_typed' LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;
-- Decrypt: STABLE, so no index, generated column or extended statistic can hold plaintext
-- (those require IMMUTABLE).
CREATE FUNCTION decrypt_field(encrypted_jsonb) RETURNS jsonb
    AS 'MODULE_PATHNAME', 'pge_decrypt_typed' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE CAST (jsonb AS encrypted_jsonb) WITH FUNCTION encrypt_jsonb(jsonb) AS ASSIGNMENT;
CREATE CAST (encrypted_jsonb AS jsonb) WITH FUNCTION decrypt_field(encrypted_jsonb);

-- encrypted_int8 ----------------------------------------------------------------------------
CREATE TYPE encrypted_int8;
CREATE FUNCTION encrypted_int8_in(cstring) RETURNS encrypted_int8
    AS 'MODULE_PATHNAME', 'pge_envelope_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_int8_out(encrypted_int8) RETURNS cstring
    AS 'MODULE_PATHNAME', 'pge_envelope_out' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_int8_recv(internal) RETURNS encrypted_int8
    AS 'MODULE_PATHNAME', 'pge_envelope_recv' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_int8_send(encrypted_int8) RETURNS bytea
    AS 'MODULE_PATHNAME', 'pge_envelope_send' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE TYPE encrypted_int8 (
    INPUT = encrypted_int8_in, OUTPUT = encrypted_int8_out, RECEIVE = encrypted_int8_recv, SEND = encrypted_int8_send,
    INTERNALLENGTH = VARIABLE, STORAGE = extended, ALIGNMENT = int4, CATEGORY = 'U'
);
COMMENT ON TYPE encrypted_int8 IS 'Ciphertext of a bigint value under the current tenant''s key (pg_envelope).';
-- Encrypt: VOLATILE (fresh nonce; evaluated at execution with the session''s tenant).
CREATE FUNCTION encrypt_int8(bigint) RETURNS encrypted_int8
    AS 'MODULE_PATHNAME', 'pge_encrypt_typed' LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;
-- Decrypt: STABLE, so no index, generated column or extended statistic can hold plaintext
-- (those require IMMUTABLE).
CREATE FUNCTION decrypt_field(encrypted_int8) RETURNS bigint
    AS 'MODULE_PATHNAME', 'pge_decrypt_typed' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE CAST (bigint AS encrypted_int8) WITH FUNCTION encrypt_int8(bigint) AS ASSIGNMENT;
CREATE CAST (encrypted_int8 AS bigint) WITH FUNCTION decrypt_field(encrypted_int8);

-- encrypted_numeric ----------------------------------------------------------------------------
CREATE TYPE encrypted_numeric;
CREATE FUNCTION encrypted_numeric_in(cstring) RETURNS encrypted_numeric
    AS 'MODULE_PATHNAME', 'pge_envelope_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_numeric_out(encrypted_numeric) RETURNS cstring
    AS 'MODULE_PATHNAME', 'pge_envelope_out' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_numeric_recv(internal) RETURNS encrypted_numeric
    AS 'MODULE_PATHNAME', 'pge_envelope_recv' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_numeric_send(encrypted_numeric) RETURNS bytea
    AS 'MODULE_PATHNAME', 'pge_envelope_send' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE TYPE encrypted_numeric (
    INPUT = encrypted_numeric_in, OUTPUT = encrypted_numeric_out, RECEIVE = encrypted_numeric_recv, SEND = encrypted_numeric_send,
    INTERNALLENGTH = VARIABLE, STORAGE = extended, ALIGNMENT = int4, CATEGORY = 'U'
);
COMMENT ON TYPE encrypted_numeric IS 'Ciphertext of a numeric value under the current tenant''s key (pg_envelope).';
-- Encrypt: VOLATILE (fresh nonce; evaluated at execution with the session''s tenant).
CREATE FUNCTION encrypt_numeric(numeric) RETURNS encrypted_numeric
    AS 'MODULE_PATHNAME', 'pge_encrypt_typed' LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;
-- Decrypt: STABLE, so no index, generated column or extended statistic can hold plaintext
-- (those require IMMUTABLE).
CREATE FUNCTION decrypt_field(encrypted_numeric) RETURNS numeric
    AS 'MODULE_PATHNAME', 'pge_decrypt_typed' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE CAST (numeric AS encrypted_numeric) WITH FUNCTION encrypt_numeric(numeric) AS ASSIGNMENT;
CREATE CAST (encrypted_numeric AS numeric) WITH FUNCTION decrypt_field(encrypted_numeric);

-- encrypted_date ----------------------------------------------------------------------------
CREATE TYPE encrypted_date;
CREATE FUNCTION encrypted_date_in(cstring) RETURNS encrypted_date
    AS 'MODULE_PATHNAME', 'pge_envelope_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_date_out(encrypted_date) RETURNS cstring
    AS 'MODULE_PATHNAME', 'pge_envelope_out' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_date_recv(internal) RETURNS encrypted_date
    AS 'MODULE_PATHNAME', 'pge_envelope_recv' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_date_send(encrypted_date) RETURNS bytea
    AS 'MODULE_PATHNAME', 'pge_envelope_send' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE TYPE encrypted_date (
    INPUT = encrypted_date_in, OUTPUT = encrypted_date_out, RECEIVE = encrypted_date_recv, SEND = encrypted_date_send,
    INTERNALLENGTH = VARIABLE, STORAGE = extended, ALIGNMENT = int4, CATEGORY = 'U'
);
COMMENT ON TYPE encrypted_date IS 'Ciphertext of a date value under the current tenant''s key (pg_envelope).';
-- Encrypt: VOLATILE (fresh nonce; evaluated at execution with the session''s tenant).
CREATE FUNCTION encrypt_date(date) RETURNS encrypted_date
    AS 'MODULE_PATHNAME', 'pge_encrypt_typed' LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;
-- Decrypt: STABLE, so no index, generated column or extended statistic can hold plaintext
-- (those require IMMUTABLE).
CREATE FUNCTION decrypt_field(encrypted_date) RETURNS date
    AS 'MODULE_PATHNAME', 'pge_decrypt_typed' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE CAST (date AS encrypted_date) WITH FUNCTION encrypt_date(date) AS ASSIGNMENT;
CREATE CAST (encrypted_date AS date) WITH FUNCTION decrypt_field(encrypted_date);

-- encrypted_timestamptz ----------------------------------------------------------------------------
CREATE TYPE encrypted_timestamptz;
CREATE FUNCTION encrypted_timestamptz_in(cstring) RETURNS encrypted_timestamptz
    AS 'MODULE_PATHNAME', 'pge_envelope_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_timestamptz_out(encrypted_timestamptz) RETURNS cstring
    AS 'MODULE_PATHNAME', 'pge_envelope_out' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_timestamptz_recv(internal) RETURNS encrypted_timestamptz
    AS 'MODULE_PATHNAME', 'pge_envelope_recv' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION encrypted_timestamptz_send(encrypted_timestamptz) RETURNS bytea
    AS 'MODULE_PATHNAME', 'pge_envelope_send' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE TYPE encrypted_timestamptz (
    INPUT = encrypted_timestamptz_in, OUTPUT = encrypted_timestamptz_out, RECEIVE = encrypted_timestamptz_recv, SEND = encrypted_timestamptz_send,
    INTERNALLENGTH = VARIABLE, STORAGE = extended, ALIGNMENT = int4, CATEGORY = 'U'
);
COMMENT ON TYPE encrypted_timestamptz IS 'Ciphertext of a timestamp with time zone value under the current tenant''s key (pg_envelope).';
-- Encrypt: VOLATILE (fresh nonce; evaluated at execution with the session''s tenant).
CREATE FUNCTION encrypt_timestamptz(timestamp with time zone) RETURNS encrypted_timestamptz
    AS 'MODULE_PATHNAME', 'pge_encrypt_typed' LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;
-- Decrypt: STABLE, so no index, generated column or extended statistic can hold plaintext
-- (those require IMMUTABLE).
CREATE FUNCTION decrypt_field(encrypted_timestamptz) RETURNS timestamp with time zone
    AS 'MODULE_PATHNAME', 'pge_decrypt_typed' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE CAST (timestamp with time zone AS encrypted_timestamptz) WITH FUNCTION encrypt_timestamptz(timestamp with time zone) AS ASSIGNMENT;
CREATE CAST (encrypted_timestamptz AS timestamp with time zone) WITH FUNCTION decrypt_field(encrypted_timestamptz);

-- varchar values encrypt like text.
CREATE CAST (varchar AS encrypted_text) WITH FUNCTION encrypt_text(text) AS ASSIGNMENT;

-- Indexes, partial-index predicates and generated columns on decrypted values are refused by
-- PostgreSQL itself (decryption is STABLE, those need IMMUTABLE). Extended statistics on
-- expressions are not, and ANALYZE would then store plaintext in pg_statistic_ext_data:
-- this event trigger refuses them.
CREATE FUNCTION refuse_plaintext_statistics() RETURNS event_trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT objid FROM pg_event_trigger_ddl_commands() WHERE object_type = 'statistics object' LOOP
        IF EXISTS (
            SELECT 1
              FROM pg_statistic_ext s, pg_proc p
             WHERE s.oid = r.objid AND s.stxexprs IS NOT NULL
               AND p.pronamespace = 'envelope'::regnamespace
               AND p.proname IN ('decrypt_field', 'decrypt_field_bytea')
               AND s.stxexprs::text ~ (':funcid ' || p.oid::text || ' ')
        ) THEN
            RAISE EXCEPTION 'pg_envelope: statistics on decrypted values would store plaintext in pg_statistic_ext_data'
                USING ERRCODE = 'invalid_object_definition',
                      HINT = 'Keep extended statistics to columns that are not encrypted.';
        END IF;
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION refuse_plaintext_statistics() FROM PUBLIC;
CREATE EVENT TRIGGER envelope_refuse_plaintext_statistics ON ddl_command_end
    WHEN TAG IN ('CREATE STATISTICS') EXECUTE FUNCTION refuse_plaintext_statistics();
