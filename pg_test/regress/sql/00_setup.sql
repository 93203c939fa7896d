-- Runs first in a fresh database (pg_regress drops and recreates it).
SET client_min_messages = warning;
CREATE EXTENSION pg_envelope;
CREATE EXTENSION dblink;
-- Roles are cluster-wide: create them once, keep them across runs.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'regress_app') THEN CREATE ROLE regress_app NOLOGIN; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'regress_other') THEN CREATE ROLE regress_other NOLOGIN; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'regress_member') THEN CREATE ROLE regress_member NOLOGIN IN ROLE regress_app; END IF;
END $$;
-- Runs a statement and reports its SQLSTATE and message instead of failing.
CREATE FUNCTION public.sqlstate_of(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE q;
  RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ' ' || SQLERRM;
END $$;
GRANT EXECUTE ON FUNCTION public.sqlstate_of(text) TO PUBLIC;
