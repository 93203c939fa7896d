-- Tenants: creation, duplicates, names, providers, grants, privileges and function markers.
SELECT envelope.create_tenant('acme') > 0 AS created;
SELECT envelope.create_tenant('globex', provider => 'local') > 0 AS created;
-- A duplicate is an error, never a silent no-op (the keys are never replaced).
SELECT sqlstate_of($$SELECT envelope.create_tenant('acme')$$);
-- Names: 1 to 255 bytes, no control characters.
SELECT sqlstate_of($$SELECT envelope.create_tenant('')$$);
SELECT sqlstate_of($$SELECT envelope.create_tenant(repeat('x', 256))$$);
SELECT sqlstate_of($$SELECT envelope.create_tenant(E'bad\nname')$$);
SELECT sqlstate_of($$SELECT envelope.create_tenant('zeta', provider => 'nope')$$);
-- Keys are stored wrapped (61 bytes: version, nonce, 32-byte key, tag), never in the clear.
SELECT t.name, octet_length(t.wrapped_key) AS kek_bytes, d.version, d.state, octet_length(d.wrapped_key) AS dek_bytes
  FROM envelope.tenants t JOIN envelope.data_keys d ON d.tenant_id = t.id ORDER BY t.name;
-- Grants.
SELECT envelope.grant_tenant('acme', 'regress_app') AS granted;
SELECT envelope.grant_tenant('acme', 'regress_app') AS granted_again;
SELECT sqlstate_of($$SELECT envelope.grant_tenant('acme', 'no_such_role')$$);
SELECT sqlstate_of($$SELECT envelope.grant_tenant('no_such_tenant', 'regress_app')$$);
SELECT t.name, g.grantee FROM envelope.tenant_grants g JOIN envelope.tenants t ON t.id = g.tenant_id ORDER BY 1, 2::text;
-- Key management and the key tables are not for PUBLIC.
SET ROLE regress_app;
SELECT sqlstate_of($$SELECT envelope.create_tenant('sneaky')$$);
SELECT sqlstate_of($$SELECT envelope.grant_tenant('globex', 'regress_app')$$);
SELECT sqlstate_of($$SELECT envelope.revoke_tenant('acme', 'regress_app')$$);
SELECT sqlstate_of($$SELECT * FROM envelope.tenants$$);
SELECT sqlstate_of($$SELECT * FROM envelope.data_keys$$);
SELECT sqlstate_of($$SELECT envelope.status()$$);
RESET ROLE;
-- Honest markers: volatility, parallel safety, strictness, no SECURITY DEFINER, and who may execute.
SELECT p.oid::regprocedure AS function,
       p.provolatile AS volatility, p.proparallel AS parallel, p.proisstrict AS strict, p.prosecdef AS secdef,
       p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE') AS public_execute
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'envelope' AND p.proname !~ '^encrypted_[a-z0-9]+_(in|out|recv|send)$'
 ORDER BY p.oid::regprocedure::text;
SELECT c.relname, EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = 0) AS public_access
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'envelope' AND c.relkind IN ('r', 'S') ORDER BY 1;
