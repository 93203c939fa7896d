-- Key lifecycle (src/lifecycle.rs). key_version(value): the data key version in a stored value's
-- header (no key, no grant); one C function for bytea and every encrypted type. IMMUTABLE: it
-- depends on the bytes only.
CREATE FUNCTION key_version(encrypted_text) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_version_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_version(encrypted_bytea) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_version_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_version(encrypted_jsonb) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_version_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_version(encrypted_int8) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_version_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_version(encrypted_numeric) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_version_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_version(encrypted_date) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_version_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_version(encrypted_timestamptz) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_version_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
