-- Online re-encryption of stored values (src/reencrypt.rs): CALL envelope.reencrypt(table, column).
-- One job per column; its progress is stored with each committed batch, so a crash or a cancel
-- loses at most the batch in flight and a second CALL continues.
CREATE TABLE reencrypt_jobs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    relid           oid NOT NULL,
    table_name      text NOT NULL,
    column_name     name NOT NULL,
    attnum          smallint NOT NULL,
    context         text,
    context_column  name,
    state           text NOT NULL CHECK (state IN ('queued', 'running', 'done', 'cancelled', 'failed')),
    by_worker       boolean NOT NULL DEFAULT false,
    requested_by    oid NOT NULL,
    batch_blocks    integer NOT NULL CHECK (batch_blocks > 0),
    next_block      bigint NOT NULL DEFAULT 0,
    blocks_total    bigint,
    values_done     bigint NOT NULL DEFAULT 0,
    values_remaining bigint,
    pass            integer NOT NULL DEFAULT 1,
    batches         bigint NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    updated_at      timestamptz,
    finished_at     timestamptz,
    last_error      text
);
CREATE UNIQUE INDEX reencrypt_jobs_one_open ON reencrypt_jobs (relid, column_name) WHERE state IN ('queued', 'running');
COMMENT ON TABLE reencrypt_jobs IS 'Re-encryption jobs (CALL envelope.reencrypt): one column each, progress stored with every committed batch.';
REVOKE ALL ON reencrypt_jobs FROM PUBLIC;

-- The per-value functions of the encrypted types: one C function each for every type. They work
-- only for the UPDATE of a running batch (its token, a bound parameter).
CREATE FUNCTION reencrypt_value(encrypted_text, batch_token bigint) RETURNS encrypted_text
    AS 'MODULE_PATHNAME', 'pge_reencrypt_typed' LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
CREATE FUNCTION reencrypt_value(encrypted_bytea, batch_token bigint) RETURNS encrypted_bytea
    AS 'MODULE_PATHNAME', 'pge_reencrypt_typed' LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
CREATE FUNCTION reencrypt_value(encrypted_jsonb, batch_token bigint) RETURNS encrypted_jsonb
    AS 'MODULE_PATHNAME', 'pge_reencrypt_typed' LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
CREATE FUNCTION reencrypt_value(encrypted_int8, batch_token bigint) RETURNS encrypted_int8
    AS 'MODULE_PATHNAME', 'pge_reencrypt_typed' LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
CREATE FUNCTION reencrypt_value(encrypted_numeric, batch_token bigint) RETURNS encrypted_numeric
    AS 'MODULE_PATHNAME', 'pge_reencrypt_typed' LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
CREATE FUNCTION reencrypt_value(encrypted_date, batch_token bigint) RETURNS encrypted_date
    AS 'MODULE_PATHNAME', 'pge_reencrypt_typed' LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
CREATE FUNCTION reencrypt_value(encrypted_timestamptz, batch_token bigint) RETURNS encrypted_timestamptz
    AS 'MODULE_PATHNAME', 'pge_reencrypt_typed' LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
CREATE FUNCTION needs_reencryption(encrypted_text, batch_token bigint) RETURNS boolean
    AS 'MODULE_PATHNAME', 'needs_reencryption_wrapper' LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
CREATE FUNCTION needs_reencryption(encrypted_bytea, batch_token bigint) RETURNS boolean
    AS 'MODULE_PATHNAME', 'needs_reencryption_wrapper' LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
CREATE FUNCTION needs_reencryption(encrypted_jsonb, batch_token bigint) RETURNS boolean
    AS 'MODULE_PATHNAME', 'needs_reencryption_wrapper' LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
CREATE FUNCTION needs_reencryption(encrypted_int8, batch_token bigint) RETURNS boolean
    AS 'MODULE_PATHNAME', 'needs_reencryption_wrapper' LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
CREATE FUNCTION needs_reencryption(encrypted_numeric, batch_token bigint) RETURNS boolean
    AS 'MODULE_PATHNAME', 'needs_reencryption_wrapper' LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
CREATE FUNCTION needs_reencryption(encrypted_date, batch_token bigint) RETURNS boolean
    AS 'MODULE_PATHNAME', 'needs_reencryption_wrapper' LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
CREATE FUNCTION needs_reencryption(encrypted_timestamptz, batch_token bigint) RETURNS boolean
    AS 'MODULE_PATHNAME', 'needs_reencryption_wrapper' LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;

-- CALL envelope.reencrypt(table, column): re-encrypts every value of one column under each
-- tenant's active data key, online, one committed batch at a time. Run it outside a transaction
-- block, under READ COMMITTED. Throttle with pause (between batches) and time_limit (stop
-- cleanly; CALL again to continue); cancel with pg_cancel_backend (the batch in flight rolls
-- back) or envelope.cancel_reencrypt(job). (A procedure that commits cannot carry SET
-- search_path: every name, type and operator below is qualified.)
CREATE PROCEDURE reencrypt(
    tbl regclass,
    col name,
    context text DEFAULT NULL,
    context_column name DEFAULT NULL,
    batch_rows integer DEFAULT 10000,
    pause interval DEFAULT '0',
    time_limit interval DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    job pg_catalog.int8;
    n pg_catalog.int8;
    t0 pg_catalog.timestamptz := pg_catalog.clock_timestamp();
BEGIN
    IF pg_catalog.current_setting('transaction_isolation') OPERATOR(pg_catalog.<>) 'read committed' THEN
        RAISE EXCEPTION 'pg_envelope: envelope.reencrypt runs under READ COMMITTED'
            USING ERRCODE = 'active_sql_transaction',
                  HINT = 'SET default_transaction_isolation = ''read committed'' in the session, then CALL it outside a transaction block.';
    END IF;
    job := envelope.reencrypt_open(tbl, col, context, context_column, batch_rows);
    COMMIT;
    LOOP
        n := envelope.reencrypt_batch(job);
        COMMIT;
        EXIT WHEN n OPERATOR(pg_catalog.<) 0;
        IF time_limit IS NOT NULL AND (pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) t0) OPERATOR(pg_catalog.>=) time_limit THEN
            RAISE NOTICE 'pg_envelope: time limit reached; re-encryption job % stays open: CALL envelope.reencrypt(...) again to continue', job;
            RETURN;
        END IF;
        IF pause OPERATOR(pg_catalog.>) interval '0' THEN
            PERFORM pg_catalog.pg_sleep(extract(epoch FROM pause)::pg_catalog.float8);
        END IF;
    END LOOP;
END $$;

-- Progress of re-encryption jobs: values done, blocks done of the table, rate and an estimate.
CREATE VIEW reencrypt_progress AS
SELECT j.id AS job, j.table_name, j.column_name, j.state,
       j.values_done, j.next_block AS blocks_done, coalesce(j.blocks_total, 0) AS blocks_total,
       CASE WHEN coalesce(j.blocks_total, 0) OPERATOR(pg_catalog.>) 0
            THEN pg_catalog.round((100.0 OPERATOR(pg_catalog.*) j.next_block::numeric) OPERATOR(pg_catalog./) j.blocks_total::numeric, 1) END AS percent,
       CASE WHEN j.started_at IS NOT NULL AND j.updated_at OPERATOR(pg_catalog.>) j.started_at
            THEN pg_catalog.round((j.values_done::float8 OPERATOR(pg_catalog./) extract(epoch FROM j.updated_at OPERATOR(pg_catalog.-) j.started_at)::float8)::numeric, 1) END AS values_per_second,
       CASE WHEN j.state OPERATOR(pg_catalog.=) ANY (ARRAY['queued', 'running']) AND j.next_block OPERATOR(pg_catalog.>) 0
                 AND j.updated_at OPERATOR(pg_catalog.>) j.started_at
            THEN (j.updated_at OPERATOR(pg_catalog.-) j.started_at)
                 OPERATOR(pg_catalog.*) ((j.blocks_total OPERATOR(pg_catalog.-) j.next_block)::float8 OPERATOR(pg_catalog./) j.next_block::float8) END AS eta,
       j.pass, j.values_remaining, j.batches, j.created_at, j.started_at, j.updated_at, j.finished_at, j.last_error,
       j.requested_by::regrole AS requested_by
  FROM reencrypt_jobs j;
REVOKE ALL ON reencrypt_progress FROM PUBLIC;

-- How many values of a column are under each tenant and data key version (headers only, no key,
-- no grant). The scan runs as the table's owner in a security-restricted operation; the caller
-- needs SELECT on the column.
CREATE FUNCTION column_key_versions(tbl regclass, col name)
RETURNS TABLE (tenant text, tenant_key_id integer, version integer, state text, "values" bigint)
LANGUAGE sql VOLATILE AS $$ SELECT * FROM envelope.column_key_versions_of(tbl, col) $$;

-- Whether a data key version still has values in a tracked column: every column of an encrypted
-- type (or a domain over one) in this database, and every bytea column (or domain over bytea) a
-- re-encryption job named. Reads headers only. Used by destroy_data_key; runs as the extension
-- owner, so it reads nothing that could run another role's code: plain tables and materialized
-- views only (no views, no rules), columns whose type is one of ours, bytea, or a domain over
-- them (no cast function is ever resolved), the operators qualified.
CREATE FUNCTION data_key_in_use(tenant_id integer, version integer) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off SET lock_timeout = '10s' AS $$
DECLARE
    r record;
    hit boolean;
    header bigint := (tenant_id::bigint << 32) | version;
BEGIN
    FOR r IN
        WITH RECURSIVE enc(typ) AS (
                SELECT t.oid FROM pg_type t
                  JOIN pg_depend d ON d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e'
                  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_envelope'
                 WHERE t.typname LIKE 'encrypted\_%'
                UNION
                SELECT t.oid FROM pg_type t, enc WHERE t.typtype = 'd' AND t.typbasetype = enc.typ),
            bytes(typ) AS (
                SELECT 'bytea'::regtype::oid
                UNION
                SELECT t.oid FROM pg_type t, bytes WHERE t.typtype = 'd' AND t.typbasetype = bytes.typ),
            cols AS (
                SELECT a.attrelid AS relid, a.attname FROM pg_attribute a
                 WHERE a.attnum > 0 AND NOT a.attisdropped AND a.atttypid IN (SELECT typ FROM enc)
                UNION
                -- By column number: a renamed column stays tracked.
                SELECT a.attrelid, a.attname FROM envelope.reencrypt_jobs j
                  JOIN pg_attribute a ON a.attrelid = j.relid AND a.attnum = j.attnum
                 WHERE NOT a.attisdropped AND a.atttypid IN (SELECT typ FROM bytes))
        SELECT cols.relid, cols.attname FROM cols JOIN pg_class c ON c.oid = cols.relid
         WHERE (c.relkind = 'r' OR (c.relkind = 'm' AND c.relispopulated))
           -- Other sessions' temporary tables cannot be read.
           AND (c.relpersistence <> 't' OR c.relnamespace = pg_my_temp_schema())
         ORDER BY 1, 2
    LOOP
        BEGIN
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM ONLY %s WHERE envelope.key_header(%I) OPERATOR(pg_catalog.=) $1)',
                           r.relid::regclass, r.attname)
               INTO hit USING header;
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'pg_envelope: cannot check %.% for values under the version: %', r.relid::regclass, quote_ident(r.attname), SQLERRM
                USING ERRCODE = SQLSTATE, HINT = 'Fix or exclude that table, or pass force => true.';
        END;
        IF hit THEN
            RETURN format('%s.%I', r.relid::regclass, r.attname);
        END IF;
    END LOOP;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION data_key_in_use(integer, integer) FROM PUBLIC;
