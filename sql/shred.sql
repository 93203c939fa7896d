-- Crypto-shredding (src/shred.rs), in two steps:
--   schedule_shred(tenant, delay)  suspends the tenant at once and schedules the destruction
--   cancel_shred(tenant)           undoes both inside the window
--   confirm_shred(tenant)          a second role's confirmation (required when
--                                  envelope.shred_requires_confirmation is on)
-- After the window the maintenance worker (or CALL run_maintenance()) destroys: the wrapped
-- tenant key and every wrapped data key are removed, the row stays as a tombstone (the tenant
-- key id and name are never reused) and every value of the tenant fails with 42704 "shredded".
-- A tenant whose provider is `dedicated` then has its root key destroyed in the key server
-- (Transit delete, AWS ScheduleKeyDeletion, PKCS#11 C_DestroyObject), retried until it succeeds.
-- shred_report(tenant) says what the shred means for backups.
ALTER TABLE tenants ALTER COLUMN wrapped_key DROP NOT NULL,
                    ALTER COLUMN key_check DROP NOT NULL,
                    ADD COLUMN shred_after timestamptz,
                    ADD COLUMN shred_scheduled_at timestamptz,
                    ADD COLUMN shred_scheduled_by text,
                    ADD COLUMN shred_scheduler oid,
                    ADD COLUMN shred_confirmed_by text,
                    ADD COLUMN shred_resumes boolean,
                    ADD COLUMN shredded_at timestamptz,
                    ADD COLUMN shredded_by text,
                    ADD COLUMN kms_destruction text,
                    ADD COLUMN kms_destroyed_at timestamptz,
                    ADD COLUMN kms_last_error text,
                    ADD COLUMN shredded_xid bigint,
                    ADD COLUMN keys_compacted_at timestamptz;
-- A live tenant has its keys; a shredded one has none, stays suspended and keeps its schedule.
ALTER TABLE tenants ADD CONSTRAINT tenants_shredded_has_no_key
    CHECK ((shredded_at IS NULL) = (wrapped_key IS NOT NULL AND key_check IS NOT NULL));
ALTER TABLE tenants ADD CONSTRAINT tenants_shred_suspends
    CHECK (shred_after IS NULL OR suspended_at IS NOT NULL);
ALTER TABLE tenants ADD CONSTRAINT tenants_shredded_was_scheduled
    CHECK (shredded_at IS NULL OR shred_after IS NOT NULL);
COMMENT ON COLUMN tenants.shred_after IS 'schedule_shred: the destruction runs after this time (cancel_shred before it undoes the schedule).';
COMMENT ON COLUMN tenants.shredded_at IS 'Crypto-shredded: the wrapped keys are gone; the row is a tombstone so the tenant key id and name are never reused.';
COMMENT ON COLUMN tenants.keys_compacted_at IS 'When the key tables were rewritten after the shred (CLUSTER): the old row versions that still held the wrapped keys are gone from the data files.';
COMMENT ON COLUMN tenants.kms_destruction IS 'Dedicated root key: ''pending'' until the key server destroyed it, then what it did; shared root key: NULL.';

-- Shreds at a glance (no key bytes).
CREATE VIEW shreds AS
SELECT t.name AS tenant, t.id AS tenant_key_id,
       CASE WHEN t.shredded_at IS NOT NULL THEN 'shredded' ELSE 'scheduled' END AS state,
       t.shred_scheduled_at AS scheduled_at, t.shred_scheduled_by AS scheduled_by, t.shred_after AS destroy_after,
       t.shred_confirmed_by AS confirmed_by, t.shredded_at, t.shredded_by, t.provider,
       coalesce((p.options OPERATOR(pg_catalog.->>) 'dedicated'::text)::boolean, false) AS dedicated_root_key,
       t.kms_destruction, t.kms_destroyed_at, t.kms_last_error, t.keys_compacted_at
  FROM tenants t JOIN key_providers p ON p.name OPERATOR(pg_catalog.=) t.provider
 WHERE t.shred_after IS NOT NULL;
REVOKE ALL ON shreds FROM PUBLIC;

-- What a shred means, in plain words, for one tenant: its state, the root key's fate and what
-- copies of its wrapped keys in backups, dumps, WAL archives and replicas can still do.
CREATE FUNCTION shred_report(tenant text)
RETURNS TABLE (state text, scheduled_at timestamptz, scheduled_by text, destroy_after timestamptz,
               confirmation text, shredded_at timestamptz, provider text, root_key text, kms_destruction text,
               backups text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    t record;
    dedicated boolean;
    kind text;
    others integer;
BEGIN
    SELECT x.*, p.kind AS provider_kind, coalesce((p.options->>'dedicated')::boolean, false) AS is_dedicated
      INTO t FROM envelope.tenants x JOIN envelope.key_providers p ON p.name = x.provider WHERE x.name = shred_report.tenant;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pg_envelope: tenant "%" does not exist', regexp_replace(left(shred_report.tenant, 128), '[[:cntrl:]]', '?', 'g')
            USING ERRCODE = 'undefined_object';
    END IF;
    dedicated := t.is_dedicated;
    kind := t.provider_kind;
    SELECT count(*) INTO others FROM envelope.tenants o WHERE o.provider = t.provider AND o.id <> t.id AND o.shredded_at IS NULL;
    state := CASE WHEN t.shredded_at IS NOT NULL THEN 'shredded'
                  WHEN t.shred_after IS NOT NULL THEN 'scheduled'
                  WHEN t.suspended_at IS NOT NULL THEN 'suspended'
                  ELSE 'active' END;
    scheduled_at := t.shred_scheduled_at;
    scheduled_by := t.shred_scheduled_by;
    destroy_after := t.shred_after;
    confirmation := CASE WHEN t.shred_after IS NULL THEN NULL
                         WHEN t.shred_confirmed_by IS NOT NULL THEN 'confirmed by ' || t.shred_confirmed_by
                         WHEN coalesce(current_setting('envelope.shred_requires_confirmation', true), 'off')::boolean THEN 'required, not given: another key administrator runs envelope.confirm_shred()'
                         ELSE 'not required' END;
    shredded_at := t.shredded_at;
    provider := t.provider;
    root_key := CASE WHEN dedicated THEN 'dedicated to this tenant (' || kind || ')'
                     ELSE 'shared (' || kind || ', provider "' || t.provider || '", ' || others || ' other tenant(s))' END;
    kms_destruction := CASE
        WHEN NOT dedicated THEN 'none: the root key is shared and is not destroyed'
        WHEN t.kms_destruction IS NULL THEN 'will be destroyed when the tenant is shredded'
        WHEN t.kms_destruction = 'pending' THEN 'pending (retried by the maintenance worker)' || coalesce('; last error: ' || t.kms_last_error, '')
        ELSE t.kms_destruction || ' at ' || t.kms_destroyed_at END;
    backups := CASE WHEN t.shredded_at IS NOT NULL AND t.keys_compacted_at IS NULL THEN
            'Old row versions of the key tables still hold its wrapped keys in the data files until the maintenance worker rewrites them (pending: it waits for transactions older than the shred to end, and for a moment when no session holds a lock on envelope.tenants or envelope.data_keys: see pg_locks, pg_prepared_xacts). '
        ELSE '' END || CASE
        WHEN t.shredded_at IS NULL AND dedicated THEN
            'Not shredded yet. When it is, the root key is destroyed in the key server, and copies of this tenant''s wrapped keys in backups, dumps, WAL archives and replicas can no longer be unwrapped.'
        WHEN t.shredded_at IS NULL THEN
            'Not shredded yet. Its root key is shared and will not be destroyed: after the shred, copies of this tenant''s wrapped keys in backups, dumps, WAL archives and replicas stay decryptable, by anyone holding such a copy and access to the root key, until those copies expire.'
        WHEN dedicated AND t.kms_destruction = 'pending' THEN
            'The live database holds no key of this tenant, but its root key still exists in the key server (destruction pending): copies of its wrapped keys in backups, dumps, WAL archives and replicas stay decryptable until the destruction succeeds.'
        WHEN dedicated AND kind = 'aws_kms' THEN
            'The root key is pending deletion in AWS KMS, which refuses every use of it from the request on and deletes it when the window ends (until then, CancelKeyDeletion in KMS would bring it back). Copies of this tenant''s wrapped keys in backups, dumps, WAL archives and replicas cannot be unwrapped.'
        WHEN dedicated THEN
            'The root key was destroyed in the key server: copies of this tenant''s wrapped keys in backups, dumps, WAL archives and replicas can no longer be unwrapped. Its data is unrecoverable.'
        ELSE
            'The live database holds no key of this tenant, but its root key is shared and was not destroyed: copies of its wrapped keys in backups, dumps, WAL (archived, or not yet recycled) and replicas from before the shred (' || t.shredded_at::timestamptz(0) || ')' ||
            ' stay decryptable, by anyone holding such a copy and access to that root key, until those copies expire. Expire or destroy them (README, "Crypto-shredding"), or give tenants that may be shredded a dedicated provider.'
        END;
    RETURN NEXT;
END $$;
