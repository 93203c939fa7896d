-- No plaintext derived from encrypted columns may be stored by PostgreSQL itself.
--
-- Decryption is STABLE, so PostgreSQL refuses it directly in index expressions, index predicates
-- and generated columns; keys are never used in security-restricted operations (ANALYZE, index
-- builds, REFRESH MATERIALIZED VIEW: src/backend.rs), so maintenance cannot store a decrypted
-- value. What remains is a function that decrypts but is *declared* IMMUTABLE (by mistake or by a
-- table owner who wants plaintext): an expression index or a stored generated column over it is
-- computed during the DML of a granted session, which holds the keys, and the plaintext lands in
-- the index or the heap where the owner can read it without any key. This event trigger refuses
-- every index whose key expressions or predicate read an encrypted column (or the whole row of a
-- table that has one), and every stored generated column that does: nothing legitimate needs them
-- (equality search will come as separate blind-index columns).
CREATE FUNCTION refuse_derived_plaintext() RETURNS event_trigger
    -- jit off: the catalog query is cheap, but its estimated cost would trigger JIT (~0.4 s per DDL).
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    r record;
    bad text;
BEGIN
    FOR r IN SELECT DISTINCT c.classid, c.objid FROM pg_event_trigger_ddl_commands() c
              WHERE c.classid IN ('pg_class'::regclass, 'pg_type'::regclass) LOOP
        -- Columns whose type is an encrypted type, a domain over one, an array of one, or a
        -- composite with such an attribute, of every table touched (the index's table too).
        WITH RECURSIVE enc(typ) AS (
                SELECT t.oid FROM pg_type t
                  JOIN pg_depend d ON d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e'
                  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_envelope'
                 WHERE t.typname LIKE 'encrypted\_%'
                UNION
                SELECT t.oid FROM pg_type t, enc
                 WHERE t.typbasetype = enc.typ OR t.typelem = enc.typ
                    OR (t.typrelid <> 0 AND EXISTS (SELECT 1 FROM pg_attribute a
                                                     WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND a.atttypid = enc.typ))
            ),
            rels AS (
                SELECT r.objid AS relid WHERE r.classid = 'pg_class'::regclass
                UNION SELECT i.indrelid FROM pg_index i WHERE r.classid = 'pg_class'::regclass AND i.indexrelid = r.objid
                -- ALTER TYPE (a composite gaining an encrypted attribute): every table using the type
                UNION SELECT a.attrelid FROM pg_attribute a
                 WHERE a.attnum > 0 AND NOT a.attisdropped
                   AND a.atttypid IN (WITH RECURSIVE users_of(typ) AS (
                                          SELECT r.objid WHERE r.classid = 'pg_type'::regclass
                                          UNION ALL
                                          -- ALTER TYPE ... ADD ATTRIBUTE reports the composite's pg_class row
                                          SELECT c.reltype FROM pg_class c
                                           WHERE r.classid = 'pg_class'::regclass AND c.oid = r.objid AND c.relkind = 'c'
                                          UNION
                                          SELECT t.oid FROM pg_type t, users_of
                                           WHERE t.typbasetype = users_of.typ OR t.typelem = users_of.typ
                                              OR (t.typrelid <> 0 AND EXISTS (SELECT 1 FROM pg_attribute x
                                                   WHERE x.attrelid = t.typrelid AND x.attnum > 0 AND x.atttypid = users_of.typ)))
                                      SELECT typ FROM users_of)
            ),
            enc_cols AS (
                SELECT a.attrelid, a.attnum FROM pg_attribute a JOIN rels ON rels.relid = a.attrelid
                 WHERE a.attnum > 0 AND NOT a.attisdropped AND a.atttypid IN (SELECT typ FROM enc)
            ),
            offenders AS (
                -- indexes with expressions or a predicate reading an encrypted column / the whole row
                SELECT format('index %s', i.indexrelid::regclass) AS what
                  FROM pg_index i JOIN rels ON rels.relid = i.indrelid
                 WHERE (i.indexprs IS NOT NULL OR i.indpred IS NOT NULL)
                   AND (   EXISTS (SELECT 1 FROM pg_depend d
                                    WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                                      AND d.refclassid = 'pg_class'::regclass AND d.refobjid = i.indrelid
                                      AND (d.refobjsubid, d.refobjid) IN (SELECT attnum, attrelid FROM enc_cols))
                        -- a whole-row Var (varattno 0) reads every column
                        OR (EXISTS (SELECT 1 FROM enc_cols WHERE enc_cols.attrelid = i.indrelid)
                            AND (coalesce(i.indexprs::text, '') || coalesce(i.indpred::text, '')) ~ ':varattno 0 '))
                UNION ALL
                -- stored generated columns reading an encrypted column / the whole row
                SELECT format('generated column %s.%I', a.attrelid::regclass, a.attname)
                  FROM pg_attribute a JOIN rels ON rels.relid = a.attrelid
                  JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
                 WHERE a.attgenerated <> ''
                   AND (   EXISTS (SELECT 1 FROM pg_depend d
                                    WHERE d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                                      AND d.refclassid = 'pg_class'::regclass AND d.refobjid = a.attrelid
                                      AND (d.refobjsubid, d.refobjid) IN (SELECT attnum, attrelid FROM enc_cols))
                        OR (EXISTS (SELECT 1 FROM enc_cols WHERE enc_cols.attrelid = a.attrelid)
                            AND ad.adbin::text ~ ':varattno 0 '))
            )
        SELECT string_agg(what, ', ') INTO bad FROM offenders;
        IF bad IS NOT NULL THEN
            RAISE EXCEPTION 'pg_envelope: % would store values derived from an encrypted column', bad
                USING ERRCODE = 'invalid_object_definition',
                      DETAIL = 'It is computed during the writes of sessions that hold the keys, so a function that decrypts (even one declared IMMUTABLE) would put plaintext in the index or the table.',
                      HINT = 'Index or generate from columns that are not encrypted.';
        END IF;
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION refuse_derived_plaintext() FROM PUBLIC;
CREATE EVENT TRIGGER envelope_refuse_derived_plaintext ON ddl_command_end
    WHEN TAG IN ('CREATE INDEX', 'ALTER TABLE', 'CREATE TABLE', 'ALTER INDEX', 'ALTER TYPE')
    EXECUTE FUNCTION refuse_derived_plaintext();
