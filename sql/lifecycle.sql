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
CREATE FUNCTION key_tenant_id(encrypted_text) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_tenant_id_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_tenant_id(encrypted_bytea) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_tenant_id_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_tenant_id(encrypted_jsonb) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_tenant_id_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_tenant_id(encrypted_int8) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_tenant_id_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_tenant_id(encrypted_numeric) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_tenant_id_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_tenant_id(encrypted_date) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_tenant_id_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_tenant_id(encrypted_timestamptz) RETURNS integer
    AS 'MODULE_PATHNAME', 'key_tenant_id_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
-- key_header(value): tenant key id << 32 | version, or -1 for a value that is not an envelope
-- (scans that must not stop at one foreign value).
CREATE FUNCTION key_header(encrypted_text) RETURNS bigint
    AS 'MODULE_PATHNAME', 'key_header_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_header(encrypted_bytea) RETURNS bigint
    AS 'MODULE_PATHNAME', 'key_header_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_header(encrypted_jsonb) RETURNS bigint
    AS 'MODULE_PATHNAME', 'key_header_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_header(encrypted_int8) RETURNS bigint
    AS 'MODULE_PATHNAME', 'key_header_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_header(encrypted_numeric) RETURNS bigint
    AS 'MODULE_PATHNAME', 'key_header_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_header(encrypted_date) RETURNS bigint
    AS 'MODULE_PATHNAME', 'key_header_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION key_header(encrypted_timestamptz) RETURNS bigint
    AS 'MODULE_PATHNAME', 'key_header_wrapper' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- Version states. 'disabled' (disable_data_key, reversible) and 'destroyed' (destroy_data_key:
-- the wrapped key is removed, the row stays as a tombstone so a version number is never reused).
-- 'revoked' is 0.1.0's name, never written; it reads as disabled.
ALTER TABLE data_keys DROP CONSTRAINT data_keys_state_check;
ALTER TABLE data_keys ADD CONSTRAINT data_keys_state_check
    CHECK (state IN ('active', 'retired', 'disabled', 'destroyed', 'revoked'));
ALTER TABLE data_keys ALTER COLUMN wrapped_key DROP NOT NULL;
ALTER TABLE data_keys ADD CONSTRAINT data_keys_destroyed_has_no_key CHECK ((state = 'destroyed') = (wrapped_key IS NULL));
ALTER TABLE data_keys ADD COLUMN retired_at timestamptz, ADD COLUMN disabled_at timestamptz, ADD COLUMN destroyed_at timestamptz;
COMMENT ON COLUMN data_keys.state IS 'active (new writes), retired (reads), disabled (refused, reversible), destroyed (key removed for good)';

-- Tenant key generations (rotate_tenant_key) and root key versions (rewrap_tenants).
ALTER TABLE tenants ADD COLUMN key_generation integer NOT NULL DEFAULT 1 CHECK (key_generation > 0),
                    ADD COLUMN key_rotated_at timestamptz,
                    ADD COLUMN root_version text,
                    ADD COLUMN wrapped_at timestamptz;
COMMENT ON COLUMN tenants.key_generation IS 'Incremented by rotate_tenant_key: a new tenant key, the same tenant key id (envelope headers do not change).';
COMMENT ON COLUMN tenants.root_version IS 'The root key version the tenant key is wrapped under, where the provider tells (Transit vN; AWS key id; PKCS#11 label).';

-- Root key rotation: one open job per provider (CALL rewrap_tenants).
CREATE TABLE rewrap_jobs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider        text NOT NULL REFERENCES key_providers (name),
    target_version  text,
    only_outdated   boolean NOT NULL,
    state           text NOT NULL CHECK (state IN ('running', 'done')),
    tenants_total   integer NOT NULL,
    tenants_done    integer NOT NULL DEFAULT 0,
    started_at      timestamptz NOT NULL,
    updated_at      timestamptz,
    finished_at     timestamptz
);
CREATE UNIQUE INDEX rewrap_jobs_one_open ON rewrap_jobs (provider) WHERE state = 'running';
COMMENT ON TABLE rewrap_jobs IS 'Root key rotations: re-wrapping a provider''s tenant keys under its newest root key version.';

-- Per-tenant rotation periods (the worker and run_maintenance rotate data keys older than this;
-- without a row, envelope.data_key_rotation_period applies). '0' = never automatically.
CREATE TABLE rotation_policy (
    tenant_id                 integer PRIMARY KEY REFERENCES tenants (id),
    data_key_rotation_period  interval NOT NULL CHECK (data_key_rotation_period >= interval '0'),
    updated_at                timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('rotation_policy', '');

REVOKE ALL ON rewrap_jobs, rotation_policy FROM PUBLIC;

-- CALL envelope.rewrap_tenants(provider): re-wraps every tenant key of a provider under its
-- root key's newest version, one committed batch at a time; a rerun continues an interrupted
-- job. Call it outside a transaction block. Needs EXECUTE on the two step functions too.
-- (A procedure that commits cannot carry SET search_path: every name, type and operator below
-- is qualified.)
CREATE PROCEDURE rewrap_tenants(provider text, batch_size integer DEFAULT 100)
LANGUAGE plpgsql AS $$
DECLARE
    job pg_catalog.int8;
    n pg_catalog.int4;
    total pg_catalog.int8 := 0;
BEGIN
    job := envelope.rewrap_tenants_start(provider);
    COMMIT;
    LOOP
        n := envelope.rewrap_tenants_batch(job, batch_size);
        COMMIT;
        EXIT WHEN n OPERATOR(pg_catalog.=) 0;
        total := total OPERATOR(pg_catalog.+) n;
        RAISE NOTICE 'pg_envelope: rewrap job % of provider "%": % tenant keys re-wrapped', job, provider, total;
    END LOOP;
    RAISE NOTICE 'pg_envelope: rewrap job % of provider "%" is done (% tenant keys re-wrapped by this call)', job, provider, total;
END $$;

-- Key versions per tenant, never key bytes. Readable by whom the DBA grants (not PUBLIC).
-- Views qualify every operator and function (OPERATOR(pg_catalog.=)): an exact-match operator
-- planted in the schema would otherwise win over pg_catalog's (an insider review planted one
-- before an update; the schema guard refuses that, this is the second line).
CREATE VIEW key_versions AS
SELECT t.name AS tenant, t.id AS tenant_key_id, d.version, d.state,
       d.created_at, d.created_at AS activated_at, d.retired_at, d.disabled_at, d.destroyed_at,
       t.provider, t.root_version, t.key_generation AS tenant_key_generation, t.key_rotated_at AS tenant_key_rotated_at
  FROM tenants t JOIN data_keys d ON d.tenant_id OPERATOR(pg_catalog.=) t.id;
COMMENT ON VIEW key_versions IS 'Data key versions per tenant with their states and dates, and the tenant key''s provider, root version and generation. No key bytes.';

-- Root key rotations in progress and done.
CREATE VIEW rewrap_progress AS
SELECT j.id AS job, j.provider, j.target_version, j.state, j.tenants_done, j.tenants_total,
       greatest(j.tenants_total OPERATOR(pg_catalog.-) j.tenants_done, 0) AS tenants_remaining, j.started_at, j.updated_at, j.finished_at
  FROM rewrap_jobs j;
REVOKE ALL ON key_versions, rewrap_progress FROM PUBLIC;
