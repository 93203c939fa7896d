-- The audit trail (src/audit.rs; the chain in crates/core/src/audit.rs). With envelope.audit on,
-- the maintenance worker appends here, in the database named by envelope.database, one record per
-- key-management operation and per statement's encryptions or decryptions (per tenant and role):
-- who, where, which keys, how many values, the outcome. Never plaintext, keys, parameters or query
-- text. Each record carries the hash chain (hash = SHA-256 over the previous hash and the canonical
-- record); envelope.audit_verify() walks it.
-- Stored as blocks (crates/core/src/audit_blocks.rs): one row per few records (up to ~1.6 kB of
-- them, so a row is neither compressed nor moved out of line), the records and their hashes'
-- tags; envelope.audit_log shows one row per record. One heap tuple and one index entry per
-- record were most of the writer's CPU (docs/design-decisions.md, "Writer cost").
CREATE TABLE audit_blocks (
    first_seq         bigint PRIMARY KEY,
    last_seq          bigint NOT NULL,
    first_at          timestamptz NOT NULL,
    last_at           timestamptz NOT NULL,
    -- The hash before the first record (the chain's link to the previous block).
    prev_hash         bytea NOT NULL,
    -- The records (crates/core/src/audit_blocks.rs): format 2, what the writer writes, stores per
    -- record only what differs from the record before it in the block and an 8-byte tag of its
    -- hash (the full hashes are computed when the block is read); format 1, read forever, per
    -- record a 4-byte big-endian length, the canonical bytes the chain hashes, the 32-byte hash.
    records           bytea NOT NULL,
    -- Where the block's last record was in the shared-memory queue (not hashed).
    server_started_at bigint NOT NULL,
    queue_pos         bigint NOT NULL
);
-- Never compressed (a block is written once and read rarely; compression cost the writer CPU).
ALTER TABLE audit_blocks ALTER COLUMN records SET STORAGE EXTERNAL;
-- Never scanned by parallel workers: each worker's read of the trail is recorded (a function's
-- query in a worker must be), so a parallel scan would record one statement's read several times.
ALTER TABLE audit_blocks SET (parallel_workers = 0);
COMMENT ON TABLE audit_blocks IS 'pg_envelope audit trail storage (several records per row); read it through envelope.audit_log.';

-- One row per record. Filtering by column decodes every block: narrow by audit_blocks.first_seq,
-- last_seq, first_at or last_at for large trails (envelope.audit_export does, by sequence).
CREATE VIEW audit_log AS
    SELECT r.seq, r.at, r.at_us, r.kind, r.database, r.session_user_name, r.role_name, r.client_addr, r.application_name,
           r.backend_pid, r.statement_id, r.request_id, r.tenant, r.key_versions, r.operation, r.value_count,
           r.failure_count, r.outcome, r.duration_us, r.detail, r.prev_hash, r.hash
      FROM audit_blocks b CROSS JOIN LATERAL audit_block_records(b.prev_hash, b.records) r;
COMMENT ON VIEW audit_log IS 'pg_envelope audit trail: append-only, hash-chained; verify with envelope.audit_verify().';

-- Signed heads of the chain: every envelope.audit_checkpoint_interval the writer has the key of
-- envelope.audit_checkpoint_provider MAC (seq, hash, time) inside its KMS or HSM (Transit hmac,
-- AWS KMS GenerateMac, PKCS#11 CKM_SHA256_HMAC; 'local': a key derived from the root file, for
-- development only), and logs the same line to the server log.
CREATE TABLE audit_checkpoints (
    seq       bigint NOT NULL,
    hash      bytea NOT NULL,
    at_us     bigint NOT NULL,
    at        timestamptz NOT NULL,
    method    text NOT NULL,     -- 'hmac-sha256'
    provider  text NOT NULL,     -- the registered provider whose key made the MAC
    key_name  text NOT NULL,     -- which key (not secret): 'transit/pg-audit', 'aws-kms <id>', ...
    mac       bytea NOT NULL,    -- as the KMS returns it (Transit: the text 'vault:v1:...')
    PRIMARY KEY (seq, at_us)
);

-- Append-only through every normal path: UPDATE, DELETE and TRUNCATE are refused to everyone
-- (the table owner and superusers included: disabling the triggers is a deliberate, visible act,
-- and audit_verify finds what it changed).
-- The one exception: envelope.audit_prune (superusers; recorded and checkpointed) deletes the
-- oldest blocks of audit_blocks up to a checkpoint.
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'audit_blocks' AND TG_LEVEL = 'ROW' AND @extschema@.audit_prune_in_progress() THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'pg_envelope: % is append-only (% refused)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_blocks_append_only BEFORE UPDATE OR DELETE ON audit_blocks
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_blocks_no_truncate BEFORE TRUNCATE ON audit_blocks
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
-- ALWAYS: also with session_replication_role = replica, which any superuser may SET and which
-- would otherwise skip them without an ALTER TABLE (insider review 45). (A logical-replication
-- subscriber of these tables therefore refuses the publisher's retention deletes: prune there too.)
ALTER TABLE audit_blocks ENABLE ALWAYS TRIGGER audit_blocks_append_only;
ALTER TABLE audit_blocks ENABLE ALWAYS TRIGGER audit_blocks_no_truncate;
-- The view refuses writes with the same error (it could not take them anyway).
CREATE TRIGGER audit_log_append_only INSTEAD OF INSERT OR UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
ALTER TABLE audit_checkpoints ENABLE ALWAYS TRIGGER audit_checkpoints_append_only;
ALTER TABLE audit_checkpoints ENABLE ALWAYS TRIGGER audit_checkpoints_no_truncate;

-- Anomaly detection (src/audit/alerts.rs): hourly counts per role and tenant, kept by the writer
-- from the per-statement records (derived data: it can be rebuilt from audit_log).
CREATE TABLE audit_hourly (
    hour       timestamptz NOT NULL,
    role_name  text NOT NULL,
    tenant     text NOT NULL,
    decrypts   bigint NOT NULL DEFAULT 0,
    encrypts   bigint NOT NULL DEFAULT 0,
    failures   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, role_name, tenant)
);
CREATE INDEX ON audit_hourly (role_name, tenant, hour);

-- Alerts: one row per rule, role, tenant and hour (volume, baseline, failures, after_hours,
-- canary), also sent as NOTIFY envelope_audit_alert (in envelope.database) and logged.
CREATE TABLE audit_alerts (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT pg_catalog.now(),
    rule       text NOT NULL,
    role_name  text NOT NULL,
    tenant     text NOT NULL,
    hour       timestamptz NOT NULL,
    observed   bigint NOT NULL,
    threshold  double precision,
    detail     text NOT NULL,
    audit_seq  bigint NOT NULL,          -- the audit record that raised it
    UNIQUE (rule, role_name, tenant, hour)
);

-- Canaries: decoy encrypted values whose decryption always alerts (envelope.add_canary). Only
-- the value's nonce is kept.
CREATE TABLE audit_canaries (
    nonce          bytea PRIMARY KEY,
    tenant_key_id  bigint NOT NULL,
    label          text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT pg_catalog.now()
);

CREATE TRIGGER audit_alerts_append_only BEFORE UPDATE OR DELETE ON audit_alerts
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_alerts_no_truncate BEFORE TRUNCATE ON audit_alerts
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
ALTER TABLE audit_alerts ENABLE ALWAYS TRIGGER audit_alerts_append_only;
ALTER TABLE audit_alerts ENABLE ALWAYS TRIGGER audit_alerts_no_truncate;

ALTER TABLE audit_checkpoints SET (parallel_workers = 0);
ALTER TABLE audit_hourly SET (parallel_workers = 0);
ALTER TABLE audit_alerts SET (parallel_workers = 0);
SELECT pg_catalog.pg_extension_config_dump('audit_blocks', '');
SELECT pg_catalog.pg_extension_config_dump('audit_hourly', '');
SELECT pg_catalog.pg_extension_config_dump('audit_alerts', '');
SELECT pg_catalog.pg_extension_config_dump('audit_canaries', '');
SELECT pg_catalog.pg_extension_config_dump('audit_checkpoints', '');
REVOKE ALL ON audit_blocks, audit_log, audit_checkpoints, audit_hourly, audit_alerts, audit_canaries FROM PUBLIC;
REVOKE ALL ON FUNCTION audit_append_only() FROM PUBLIC;
-- ANALYZE keeps no sample of the trail: pg_stats (most common values, histograms) would otherwise
-- show an auditor, and pg_statistic a superuser, who did what, when, and the chain's hashes,
-- without the read being recorded (found by the second and third insider reviews). Every column
-- of every audit table.
DO $$
DECLARE r record;
BEGIN
    FOR r IN SELECT a.attrelid::pg_catalog.regclass AS rel, a.attname FROM pg_catalog.pg_attribute a
              WHERE a.attrelid OPERATOR(pg_catalog.=) ANY (ARRAY['@extschema@.audit_blocks'::pg_catalog.regclass,
                        '@extschema@.audit_checkpoints'::pg_catalog.regclass, '@extschema@.audit_hourly'::pg_catalog.regclass,
                        '@extschema@.audit_alerts'::pg_catalog.regclass, '@extschema@.audit_canaries'::pg_catalog.regclass]::pg_catalog.oid[])
                AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
              ORDER BY 1, a.attnum LOOP
        EXECUTE pg_catalog.format('ALTER TABLE %s ALTER COLUMN %I SET STATISTICS 0', r.rel, r.attname);
    END LOOP;
END $$;

-- Export for SIEMs and the offline verifier (scripts/audit-verify.py): envelope.audit_export(from_seq
-- bigint DEFAULT 1) RETURNS TABLE (line text), a C function (src/audit/export.rs; the lines are
-- built in crates/core/src/audit_export.rs): one JSON object per line: the records from
-- `from_seq` on in sequence order ("type": "record": the hashed fields, and prev_hash/hash in
-- hex), rounded down to the record after the nearest checkpoint so the export can be verified
-- from its first line; then every checkpoint from there on ("type": "checkpoint"); then one
-- trailer ("type": "export": when it was taken, the head, the database).
--   psql -XAt -c 'SELECT line FROM envelope.audit_export(1)' -o audit.jsonl
-- (not \copy: COPY's text format doubles backslashes, so a field holding " or \ would break the
-- JSON). Reading it is recorded. It reads the tables by heap scans and builds the JSON in Rust:
-- a SQL body resolves its casts and operators by name at every call, and a cast inserted into
-- pg_cast with a chosen low object id rewrote the first (SQL) export (insider review 58).

-- The trail for people and dashboards: one row per record, hashes in hex.
CREATE VIEW audit_events AS
    SELECT seq, at, kind, database, session_user_name, role_name, client_addr, application_name, backend_pid,
           statement_id, request_id, tenant, key_versions, operation, value_count, failure_count, outcome,
           duration_us, detail, pg_catalog.encode(hash, 'hex') AS hash
      FROM audit_log;

REVOKE ALL ON audit_events FROM PUBLIC;
