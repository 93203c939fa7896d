-- The audit trail (src/audit.rs; the chain in crates/core/src/audit.rs). With envelope.audit on,
-- the maintenance worker appends here, in the database named by envelope.database, one record per
-- key-management operation and per statement's encryptions or decryptions (per tenant and role):
-- who, where, which keys, how many values, the outcome. Never plaintext, keys, parameters or query
-- text. Each record carries the hash chain (hash = SHA-256 over the previous hash and the canonical
-- record); envelope.audit_verify() walks it.
CREATE TABLE audit_log (
    seq               bigint PRIMARY KEY,
    at                timestamptz NOT NULL,
    at_us             bigint NOT NULL,
    kind              text NOT NULL,
    database          text NOT NULL,
    session_user_name text NOT NULL,
    role_name         text NOT NULL,
    client_addr       text NOT NULL,
    application_name  text NOT NULL,
    backend_pid       bigint NOT NULL,
    statement_id      bigint NOT NULL,
    request_id        text NOT NULL,
    tenant            text NOT NULL,
    key_versions      text NOT NULL,
    operation         text NOT NULL,
    value_count       bigint NOT NULL,
    failure_count     bigint NOT NULL,
    outcome           text NOT NULL,
    duration_us       bigint NOT NULL,
    detail            text NOT NULL,
    prev_hash         bytea NOT NULL,
    hash              bytea NOT NULL,
    -- Where the record was in the shared-memory queue (not hashed): a restarted writer resumes
    -- after the last record it committed, never writing one twice.
    server_started_at bigint NOT NULL,
    queue_pos         bigint NOT NULL
);
COMMENT ON TABLE audit_log IS 'pg_envelope audit trail: append-only, hash-chained; verify with envelope.audit_verify().';

-- Signed heads of the chain (the writer MACs (seq, hash, time) every envelope.audit_checkpoint_interval).
CREATE TABLE audit_checkpoints (
    seq     bigint NOT NULL,
    hash    bytea NOT NULL,
    at_us   bigint NOT NULL,
    at      timestamptz NOT NULL,
    method  text NOT NULL,
    mac     bytea NOT NULL,
    PRIMARY KEY (seq, at_us)
);

-- Append-only through every normal path: UPDATE, DELETE and TRUNCATE are refused to everyone
-- (the table owner and superusers included: disabling the triggers is a deliberate, visible act,
-- and audit_verify finds what it changed).
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RAISE EXCEPTION 'pg_envelope: % is append-only (% refused)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();

SELECT pg_catalog.pg_extension_config_dump('audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('audit_checkpoints', '');
REVOKE ALL ON audit_log, audit_checkpoints FROM PUBLIC;
REVOKE ALL ON FUNCTION audit_append_only() FROM PUBLIC;
