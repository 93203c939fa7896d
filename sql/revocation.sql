-- Revocation at every scope (src/revocation.rs). One family:
--   credential: revoke_tenant(tenant, role)        -- one role loses one tenant
--   version:    disable_data_key(tenant, version)  -- one data key version refused (55000)
--   tenant:     suspend_tenant(tenant, reason)     -- every use of one tenant's keys refused (57000)
--   system:     lockdown(reason)                   -- every key use in the cluster refused (57000)
-- and their reversals revoke -> grant_tenant, enable_data_key, resume_tenant, lift_lockdown.
ALTER TABLE tenants ADD COLUMN suspended_at timestamptz,
                    ADD COLUMN suspended_reason text,
                    ADD COLUMN suspended_by text;
ALTER TABLE tenants ADD CONSTRAINT tenants_suspension_check
    CHECK ((suspended_at IS NULL) = (suspended_reason IS NULL));
COMMENT ON COLUMN tenants.suspended_at IS 'suspend_tenant: every use of the tenant''s keys is refused until resume_tenant.';

-- The revocation state at a glance (no key bytes): suspended tenants and disabled versions.
CREATE VIEW revocations AS
SELECT 'tenant'::text AS scope, t.name AS tenant, NULL::integer AS version, t.suspended_at AS since,
       t.suspended_reason AS reason, t.suspended_by AS by
  FROM tenants t WHERE t.suspended_at IS NOT NULL
UNION ALL
SELECT 'version', t.name, d.version, d.disabled_at, NULL, NULL
  FROM tenants t JOIN data_keys d ON d.tenant_id OPERATOR(pg_catalog.=) t.id WHERE d.state OPERATOR(pg_catalog.=) ANY (ARRAY['disabled', 'revoked']);
REVOKE ALL ON revocations FROM PUBLIC;
