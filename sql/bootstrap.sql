-- pg_envelope bootstrap: the key tables. Runs first in CREATE EXTENSION.
-- The extension's schema must be one that no untrusted role controls. CREATE EXTENSION installs
-- into an existing schema of that name as it is, and that schema's owner could later DROP SCHEMA
-- envelope CASCADE (the extension and its key tables with it), or it or a role with CREATE on it
-- could plant functions there that callers and the extension's own qualified calls may resolve
-- to (shown on PostgreSQL 15 with a schema pre-created by a plain role).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n
                 JOIN pg_catalog.pg_roles o ON o.oid OPERATOR(pg_catalog.=) n.nspowner
                WHERE n.nspname OPERATOR(pg_catalog.=) '@extschema@' AND NOT o.rolsuper)
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n
                   CROSS JOIN LATERAL pg_catalog.aclexplode(n.nspacl) a
                    LEFT JOIN pg_catalog.pg_roles g ON g.oid OPERATOR(pg_catalog.=) a.grantee
                   WHERE n.nspname OPERATOR(pg_catalog.=) '@extschema@'
                     AND a.privilege_type OPERATOR(pg_catalog.=) 'CREATE'
                     AND NOT coalesce(g.rolsuper, false)) THEN
        RAISE EXCEPTION 'pg_envelope: schema "@extschema@" exists and is not controlled by superusers only'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'CREATE EXTENSION creates the schema itself: drop the existing schema first.';
    END IF;
    -- Nor may it hold anything already: an object planted before the owner was changed (every
    -- object in a schema depends on it in pg_depend), or default privileges that would grant the
    -- extension's objects to someone (a superuser's: any role may set them for its own objects,
    -- which never include the extension's) (an insider review planted an operator that the
    -- extension's views then bound to, and became superuser).
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) d.refobjid
                WHERE d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_namespace'::pg_catalog.regclass
                  AND d.classid OPERATOR(pg_catalog.<>) 'pg_catalog.pg_extension'::pg_catalog.regclass  -- this extension
                  -- default privileges depend on their schema too; judged below by whose they are
                  AND d.classid OPERATOR(pg_catalog.<>) 'pg_catalog.pg_default_acl'::pg_catalog.regclass
                  AND n.nspname OPERATOR(pg_catalog.=) '@extschema@')
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_default_acl a JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) a.defaclnamespace
                   JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) a.defaclrole
                   WHERE n.nspname OPERATOR(pg_catalog.=) '@extschema@' AND r.rolsuper) THEN
        RAISE EXCEPTION 'pg_envelope: schema "@extschema@" exists and is not empty'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'CREATE EXTENSION creates the schema itself: drop the existing schema first.';
    END IF;
END $$;

-- Tenant key ids are the "tenant key id" in every envelope header: never reused.
CREATE SEQUENCE tenant_id_seq AS integer MINVALUE 1 NO CYCLE;

CREATE TABLE key_providers (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    kind        text NOT NULL CHECK (kind IN ('local', 'vault_transit', 'aws_kms', 'pkcs11')),
    options     jsonb NOT NULL DEFAULT '{}'::jsonb,
    builtin     boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE key_providers IS 'Root-of-trust providers. Options never hold secrets: credentials are file paths.';
INSERT INTO key_providers (name, kind, builtin) VALUES ('local', 'local', true);

CREATE TABLE tenants (
    id          integer PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (octet_length(name) BETWEEN 1 AND 255),
    provider    text NOT NULL REFERENCES key_providers (name),
    wrapped_key bytea NOT NULL,
    key_check   bytea NOT NULL CHECK (octet_length(key_check) = 32),
    created_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON COLUMN tenants.key_check IS 'HMAC-SHA-256 check value of the tenant key: a provider that returns another key fails closed.';
COMMENT ON TABLE tenants IS 'One tenant key (KEK) per tenant, wrapped by its provider''s root key.';

CREATE TABLE data_keys (
    tenant_id   integer NOT NULL REFERENCES tenants (id),
    version     integer NOT NULL CHECK (version > 0),
    wrapped_key bytea NOT NULL,
    state       text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'retired', 'revoked')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, version)
);
CREATE UNIQUE INDEX data_keys_one_active ON data_keys (tenant_id) WHERE state = 'active';
COMMENT ON TABLE data_keys IS 'Data keys (DEKs), versioned, each wrapped by its tenant key.';

CREATE TABLE tenant_grants (
    tenant_id   integer NOT NULL REFERENCES tenants (id),
    grantee     regrole NOT NULL,
    granted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, grantee)
);
COMMENT ON TABLE tenant_grants IS 'Roles allowed to use a tenant''s keys (members of these roles too; superusers are not exempt).';

-- Key tables travel with pg_dump: a restore needs no key server, and the restored database
-- decrypts with the same root key.
SELECT pg_catalog.pg_extension_config_dump('key_providers', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('tenants', '');
SELECT pg_catalog.pg_extension_config_dump('data_keys', '');
SELECT pg_catalog.pg_extension_config_dump('tenant_grants', '');
SELECT pg_catalog.pg_extension_config_dump('tenant_id_seq', '');

-- One SELECT privilege per role that holds tenant grants in this database: a shared dependency,
-- so DROP ROLE refuses while the role has grants, and a grant whose role lost it (DROP OWNED BY)
-- never counts again, nor after a dump and restore where a bare role OID could name another role.
-- The table has no columns and no rows; the privilege is its only purpose.
CREATE TABLE grant_anchor ();
COMMENT ON TABLE grant_anchor IS 'Holds SELECT for each role with tenant grants (pg_envelope): ties grants to roles through pg_shdepend.';

REVOKE ALL ON key_providers, tenants, data_keys, tenant_grants, grant_anchor FROM PUBLIC;
REVOKE ALL ON SEQUENCE tenant_id_seq FROM PUBLIC;
