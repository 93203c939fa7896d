-- Scheduled key maintenance (src/maintenance.rs, src/worker.rs). The background worker does
-- this on its own when pg_envelope is preloaded and envelope.database names this database;
-- CALL envelope.run_maintenance() does the same due work once (for pg_cron users).

-- Per-tenant rotation period: NULL removes the override (envelope.data_key_rotation_period
-- applies); interval '0' means never automatically.
CREATE FUNCTION set_rotation_period(tenant text, period interval) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    tid integer;
BEGIN
    SELECT t.id INTO tid FROM envelope.tenants t WHERE t.name = tenant;
    IF tid IS NULL THEN
        RAISE EXCEPTION 'pg_envelope: tenant "%" does not exist', left(tenant, 128) USING ERRCODE = 'undefined_object';
    END IF;
    IF period IS NULL THEN
        DELETE FROM envelope.rotation_policy p WHERE p.tenant_id = tid;
    ELSIF period < interval '0' OR (period > interval '0' AND period < interval '1 hour') OR period > interval '100 years' THEN
        RAISE EXCEPTION 'pg_envelope: a rotation period is 0 (never) or between 1 hour and 100 years'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Every rotation makes every backend reload the tenant''s keys: rotating more often than hourly only loads the key server.';
    ELSE
        INSERT INTO envelope.rotation_policy (tenant_id, data_key_rotation_period) VALUES (tid, period)
        ON CONFLICT (tenant_id) DO UPDATE SET data_key_rotation_period = excluded.data_key_rotation_period, updated_at = now();
    END IF;
END $$;

-- Queues a re-encryption job for the maintenance worker, which runs it as the calling role.
CREATE FUNCTION queue_reencrypt(tbl regclass, col name, context text DEFAULT NULL, context_column name DEFAULT NULL,
                                batch_rows integer DEFAULT 10000) RETURNS bigint
LANGUAGE sql VOLATILE AS $$ SELECT envelope.reencrypt_open(tbl, col, context, context_column, batch_rows, true) $$;

-- Next due rotation per tenant (never key bytes).
CREATE VIEW rotation_status AS
SELECT t.name AS tenant, d.version AS active_version, d.created_at AS activated_at,
       x.period AS rotation_period, (p.tenant_id IS NOT NULL) AS period_overridden,
       CASE WHEN x.period OPERATOR(pg_catalog.>) interval '0' THEN d.created_at OPERATOR(pg_catalog.+) x.period END AS next_rotation_due,
       (x.period OPERATOR(pg_catalog.>) interval '0'
        AND (pg_catalog.now() OPERATOR(pg_catalog.-) d.created_at) OPERATOR(pg_catalog.>=) x.period) AS overdue,
       t.provider, t.root_version, t.key_generation AS tenant_key_generation, t.key_rotated_at AS tenant_key_rotated_at
  FROM tenants t
  JOIN data_keys d ON d.tenant_id OPERATOR(pg_catalog.=) t.id AND d.state OPERATOR(pg_catalog.=) 'active'
  LEFT JOIN rotation_policy p ON p.tenant_id OPERATOR(pg_catalog.=) t.id
 CROSS JOIN LATERAL (SELECT coalesce(p.data_key_rotation_period, @extschema@.default_rotation_period()) AS period) x;
REVOKE ALL ON rotation_status FROM PUBLIC;

-- CALL envelope.run_maintenance(): the due rotations, rewraps and this role's queued
-- re-encryption jobs (superusers: every role's; each batch runs as the table's owner), each step
-- committed on its own. A failing step is reported (WARNING) and skipped: it never blocks the
-- others. Call it outside a transaction block. (A procedure that commits cannot carry SET
-- search_path: every name, type and operator below is qualified.)
CREATE PROCEDURE run_maintenance()
LANGUAGE plpgsql AS $$
DECLARE
    w record;
    v pg_catalog.int4;
    n pg_catalog.int8;
    job pg_catalog.int8;
BEGIN
    FOR w IN SELECT * FROM envelope.maintenance_due() LOOP
        IF w.action OPERATOR(pg_catalog.=) 'compact_key_tables' THEN
            BEGIN
                PERFORM envelope.shred_compact_key_tables();
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'pg_envelope: maintenance: rewriting the key tables failed: % (%)', SQLERRM, SQLSTATE;
            END;
            COMMIT;
        ELSIF w.action OPERATOR(pg_catalog.=) 'shred' OR w.action OPERATOR(pg_catalog.=) 'destroy_root_key' THEN
            IF w.action OPERATOR(pg_catalog.=) 'shred' THEN
                BEGIN
                    IF envelope.shred_if_due(w.target) THEN
                        RAISE NOTICE 'pg_envelope: tenant "%" crypto-shredded', w.target;
                    END IF;
                EXCEPTION WHEN OTHERS THEN
                    RAISE WARNING 'pg_envelope: maintenance: shredding tenant "%" failed: % (%)', w.target, SQLERRM, SQLSTATE;
                END;
                COMMIT;
            END IF;
            -- The dedicated root key, after the shred committed (a failure is recorded and retried).
            BEGIN
                PERFORM envelope.shred_destroy_root_key(w.target);
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'pg_envelope: maintenance: destroying the root key of tenant "%" failed: % (%)', w.target, SQLERRM, SQLSTATE;
            END;
            COMMIT;
        ELSIF w.action OPERATOR(pg_catalog.=) 'rotate' THEN
            BEGIN
                v := envelope.rotate_data_key_if_due(w.target);
                IF v IS NOT NULL THEN
                    RAISE NOTICE 'pg_envelope: rotated the data key of tenant "%" to version %', w.target, v;
                END IF;
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'pg_envelope: maintenance: rotating tenant "%" failed: % (%)', w.target, SQLERRM, SQLSTATE;
            END;
            COMMIT;
        ELSIF w.action OPERATOR(pg_catalog.=) 'rewrap' THEN
            BEGIN
                job := envelope.rewrap_tenants_start(w.target);
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'pg_envelope: maintenance: rewrap of provider "%" failed: % (%)', w.target, SQLERRM, SQLSTATE;
                job := NULL;
            END;
            COMMIT;
            LOOP
                EXIT WHEN job IS NULL;
                BEGIN
                    n := envelope.rewrap_tenants_batch(job, 100);
                EXCEPTION WHEN OTHERS THEN
                    RAISE WARNING 'pg_envelope: maintenance: rewrap of provider "%" failed: % (%)', w.target, SQLERRM, SQLSTATE;
                    n := 0;
                END;
                COMMIT;
                EXIT WHEN n OPERATOR(pg_catalog.=) 0;
            END LOOP;
        ELSIF w.action OPERATOR(pg_catalog.=) 'reencrypt' THEN
            LOOP
                BEGIN
                    n := envelope.reencrypt_batch(w.target::pg_catalog.int8);
                EXCEPTION WHEN OTHERS THEN
                    RAISE WARNING 'pg_envelope: maintenance: re-encryption job % failed: % (%)', w.target, SQLERRM, SQLSTATE;
                    n := -1;
                END;
                COMMIT;
                EXIT WHEN n OPERATOR(pg_catalog.<) 0;
            END LOOP;
        END IF;
    END LOOP;
END $$;
