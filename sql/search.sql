-- Blind indexes: equality search on encrypted columns (src/search.rs; the terms themselves in
-- crates/core/src/search.rs). A term is a keyed hash of a normalised plaintext under the
-- tenant's index key: equal values of one tenant and purpose give equal terms, so a B-tree or
-- hash index on a term column finds rows without decrypting anything. See README "Search".

-- Per-tenant index keys, wrapped under the tenant key (like data keys, in a wrapping domain of
-- their own). Separate from the data keys and the tenant key: rotating those never forces a
-- re-index. 'active': new terms; 'retired': still matched by blind_index_all() during a
-- re-index; 'destroyed': the wrapped key is gone (envelope.destroy_index_key).
CREATE TABLE index_keys (
    tenant_id   integer NOT NULL REFERENCES tenants (id),
    version     integer NOT NULL CHECK (version > 0),
    wrapped_key bytea,
    state       text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'retired', 'destroyed')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, version),
    CHECK ((state = 'destroyed') = (wrapped_key IS NULL))
);
CREATE UNIQUE INDEX index_keys_one_active ON index_keys (tenant_id) WHERE state = 'active';
COMMENT ON TABLE index_keys IS 'Blind-index keys (pg_envelope search terms), versioned, each wrapped by its tenant key.';

-- Purposes: what a term column indexes, with its normalisation, declared once. The purpose,
-- the normalisation and the value's type all go into the derivation of the term key, so terms
-- of different purposes never match. A purpose cannot be redefined (its terms would stop
-- matching); declare a new one and re-index.
CREATE TABLE blind_index_purposes (
    name          text PRIMARY KEY CHECK (octet_length(name) BETWEEN 1 AND 200),
    normalization text NOT NULL CHECK (normalization IN ('none', 'nfc', 'nfkc_casefold', 'digits')),
    created_at    timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE blind_index_purposes IS 'Declared blind-index purposes and their normalisation (pg_envelope).';

SELECT pg_catalog.pg_extension_config_dump('index_keys', '');
SELECT pg_catalog.pg_extension_config_dump('blind_index_purposes', '');
REVOKE ALL ON index_keys, blind_index_purposes FROM PUBLIC;

-- The term type: 21 bytes (format 0x01, index key version, 128-bit tag). Text form
-- 'bi1:v<version>:<32 hex>', binary form the 21 bytes: COPY, pg_dump and logical replication
-- move terms with no key. No cast to or from text or bytea: a term is never taken for a
-- plaintext, nor a plaintext for a term.
CREATE TYPE blind_index;
CREATE FUNCTION blind_index_in(cstring) RETURNS blind_index
    AS 'MODULE_PATHNAME', 'pge_blind_index_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION blind_index_out(blind_index) RETURNS cstring
    AS 'MODULE_PATHNAME', 'pge_blind_index_out' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION blind_index_recv(internal) RETURNS blind_index
    AS 'MODULE_PATHNAME', 'pge_blind_index_recv' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION blind_index_send(blind_index) RETURNS bytea
    AS 'MODULE_PATHNAME', 'pge_blind_index_send' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE TYPE blind_index (
    INPUT = blind_index_in, OUTPUT = blind_index_out, RECEIVE = blind_index_recv, SEND = blind_index_send,
    INTERNALLENGTH = 21, ALIGNMENT = char, STORAGE = plain, CATEGORY = 'U'
);
COMMENT ON TYPE blind_index IS 'A blind-index search term (pg_envelope): equality only; its order means nothing.';

-- Comparisons: byte comparisons of two terms. LEAKPROOF (true: they raise no error and reveal
-- nothing but the comparison), so the planner uses a term index under Row-Level Security.
-- The order (for B-tree, merge joins, ORDER BY) is the order of random tags: it says nothing
-- about the plaintexts.
CREATE FUNCTION blind_index_eq(blind_index, blind_index) RETURNS boolean
    AS 'MODULE_PATHNAME', 'pge_blind_index_eq' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE LEAKPROOF;
CREATE FUNCTION blind_index_ne(blind_index, blind_index) RETURNS boolean
    AS 'MODULE_PATHNAME', 'pge_blind_index_ne' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE LEAKPROOF;
CREATE FUNCTION blind_index_lt(blind_index, blind_index) RETURNS boolean
    AS 'MODULE_PATHNAME', 'pge_blind_index_lt' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE LEAKPROOF;
CREATE FUNCTION blind_index_le(blind_index, blind_index) RETURNS boolean
    AS 'MODULE_PATHNAME', 'pge_blind_index_le' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE LEAKPROOF;
CREATE FUNCTION blind_index_gt(blind_index, blind_index) RETURNS boolean
    AS 'MODULE_PATHNAME', 'pge_blind_index_gt' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE LEAKPROOF;
CREATE FUNCTION blind_index_ge(blind_index, blind_index) RETURNS boolean
    AS 'MODULE_PATHNAME', 'pge_blind_index_ge' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE LEAKPROOF;
CREATE FUNCTION blind_index_cmp(blind_index, blind_index) RETURNS integer
    AS 'MODULE_PATHNAME', 'pge_blind_index_cmp' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE LEAKPROOF;
CREATE FUNCTION blind_index_hash(blind_index) RETURNS integer
    AS 'MODULE_PATHNAME', 'pge_blind_index_hash' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE LEAKPROOF;
CREATE FUNCTION blind_index_hash_extended(blind_index, bigint) RETURNS bigint
    AS 'MODULE_PATHNAME', 'pge_blind_index_hash_extended' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE LEAKPROOF;

-- The operators live in pg_catalog (as plpgsql's handler functions do), so that
-- `WHERE email_idx = envelope.blind_index(...)` resolves without envelope on the search_path.
-- They are defined for blind_index only: no other type's operators are touched.
CREATE OPERATOR pg_catalog.= (
    LEFTARG = blind_index, RIGHTARG = blind_index, FUNCTION = blind_index_eq,
    COMMUTATOR = OPERATOR(pg_catalog.=), NEGATOR = OPERATOR(pg_catalog.<>), RESTRICT = eqsel, JOIN = eqjoinsel, HASHES, MERGES
);
CREATE OPERATOR pg_catalog.<> (
    LEFTARG = blind_index, RIGHTARG = blind_index, FUNCTION = blind_index_ne,
    COMMUTATOR = OPERATOR(pg_catalog.<>), NEGATOR = OPERATOR(pg_catalog.=), RESTRICT = neqsel, JOIN = neqjoinsel
);
CREATE OPERATOR pg_catalog.< (
    LEFTARG = blind_index, RIGHTARG = blind_index, FUNCTION = blind_index_lt,
    COMMUTATOR = OPERATOR(pg_catalog.>), NEGATOR = OPERATOR(pg_catalog.>=), RESTRICT = scalarltsel, JOIN = scalarltjoinsel
);
CREATE OPERATOR pg_catalog.<= (
    LEFTARG = blind_index, RIGHTARG = blind_index, FUNCTION = blind_index_le,
    COMMUTATOR = OPERATOR(pg_catalog.>=), NEGATOR = OPERATOR(pg_catalog.>), RESTRICT = scalarlesel, JOIN = scalarlejoinsel
);
CREATE OPERATOR pg_catalog.> (
    LEFTARG = blind_index, RIGHTARG = blind_index, FUNCTION = blind_index_gt,
    COMMUTATOR = OPERATOR(pg_catalog.<), NEGATOR = OPERATOR(pg_catalog.<=), RESTRICT = scalargtsel, JOIN = scalargtjoinsel
);
CREATE OPERATOR pg_catalog.>= (
    LEFTARG = blind_index, RIGHTARG = blind_index, FUNCTION = blind_index_ge,
    COMMUTATOR = OPERATOR(pg_catalog.<=), NEGATOR = OPERATOR(pg_catalog.<), RESTRICT = scalargesel, JOIN = scalargejoinsel
);
CREATE OPERATOR CLASS blind_index_ops DEFAULT FOR TYPE blind_index USING btree AS
    OPERATOR 1 pg_catalog.<, OPERATOR 2 pg_catalog.<=, OPERATOR 3 pg_catalog.=, OPERATOR 4 pg_catalog.>=, OPERATOR 5 pg_catalog.>,
    FUNCTION 1 blind_index_cmp(blind_index, blind_index);
CREATE OPERATOR CLASS blind_index_hash_ops DEFAULT FOR TYPE blind_index USING hash AS
    OPERATOR 1 pg_catalog.=,
    FUNCTION 1 blind_index_hash(blind_index),
    FUNCTION 2 blind_index_hash_extended(blind_index, bigint);

-- Terms. STABLE, never IMMUTABLE: the key depends on the session's tenant setting, so no
-- expression index or generated column can hold a term computed under whichever tenant was set.
-- The same tenant setting and grant as decryption: without the grant, the same error (42501),
-- never a silent non-match. An undeclared purpose: 42704.
CREATE FUNCTION blind_index(purpose text, value text) RETURNS blind_index
    AS 'MODULE_PATHNAME', 'pge_blind_index' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE FUNCTION blind_index(purpose text, value bytea) RETURNS blind_index
    AS 'MODULE_PATHNAME', 'pge_blind_index' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE FUNCTION blind_index(purpose text, value bigint) RETURNS blind_index
    AS 'MODULE_PATHNAME', 'pge_blind_index' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE FUNCTION blind_index(purpose text, value numeric) RETURNS blind_index
    AS 'MODULE_PATHNAME', 'pge_blind_index' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE FUNCTION blind_index(purpose text, value date) RETURNS blind_index
    AS 'MODULE_PATHNAME', 'pge_blind_index' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE FUNCTION blind_index(purpose text, value timestamptz) RETURNS blind_index
    AS 'MODULE_PATHNAME', 'pge_blind_index' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
-- timestamp (without time zone) has its own terms: an implicit cast to timestamptz would make
-- them depend on the session's TimeZone.
CREATE FUNCTION blind_index(purpose text, value timestamp) RETURNS blind_index
    AS 'MODULE_PATHNAME', 'pge_blind_index' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
-- integer: the same term as the bigint of the same value (an int4 column and an int8 parameter match).
CREATE FUNCTION blind_index(purpose text, value integer) RETURNS blind_index
    LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
    AS $$ SELECT @extschema@.blind_index(purpose, value::bigint) $$;
-- Every live index key version's term (active first): during a re-index, a lookup matches rows
-- of either version: WHERE email_idx = ANY(envelope.blind_index_all('users.email', $1)).
CREATE FUNCTION blind_index_all(purpose text, value text) RETURNS blind_index[]
    AS 'MODULE_PATHNAME', 'pge_blind_index_all' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE FUNCTION blind_index_all(purpose text, value bytea) RETURNS blind_index[]
    AS 'MODULE_PATHNAME', 'pge_blind_index_all' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE FUNCTION blind_index_all(purpose text, value bigint) RETURNS blind_index[]
    AS 'MODULE_PATHNAME', 'pge_blind_index_all' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE FUNCTION blind_index_all(purpose text, value numeric) RETURNS blind_index[]
    AS 'MODULE_PATHNAME', 'pge_blind_index_all' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE FUNCTION blind_index_all(purpose text, value date) RETURNS blind_index[]
    AS 'MODULE_PATHNAME', 'pge_blind_index_all' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE FUNCTION blind_index_all(purpose text, value timestamptz) RETURNS blind_index[]
    AS 'MODULE_PATHNAME', 'pge_blind_index_all' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE FUNCTION blind_index_all(purpose text, value timestamp) RETURNS blind_index[]
    AS 'MODULE_PATHNAME', 'pge_blind_index_all' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE FUNCTION blind_index_all(purpose text, value integer) RETURNS blind_index[]
    LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
    AS $$ SELECT @extschema@.blind_index_all(purpose, value::bigint) $$;
-- The encrypted types: the term of the decrypted value (decrypted as decrypt_field does: same
-- tenant, grant and audit record), equal to the term of the same plaintext.
CREATE FUNCTION blind_index(purpose text, value encrypted_text) RETURNS blind_index LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
    AS $$ SELECT @extschema@.blind_index(purpose, @extschema@.decrypt_field(value)) $$;
CREATE FUNCTION blind_index(purpose text, value encrypted_bytea) RETURNS blind_index LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
    AS $$ SELECT @extschema@.blind_index(purpose, @extschema@.decrypt_field(value)) $$;
CREATE FUNCTION blind_index(purpose text, value encrypted_jsonb) RETURNS blind_index LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
    AS $$ SELECT @extschema@.blind_index(purpose, @extschema@.decrypt_field(value)::pg_catalog.text) $$;
CREATE FUNCTION blind_index(purpose text, value encrypted_int8) RETURNS blind_index LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
    AS $$ SELECT @extschema@.blind_index(purpose, @extschema@.decrypt_field(value)) $$;
CREATE FUNCTION blind_index(purpose text, value encrypted_numeric) RETURNS blind_index LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
    AS $$ SELECT @extschema@.blind_index(purpose, @extschema@.decrypt_field(value)) $$;
CREATE FUNCTION blind_index(purpose text, value encrypted_date) RETURNS blind_index LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
    AS $$ SELECT @extschema@.blind_index(purpose, @extschema@.decrypt_field(value)) $$;
CREATE FUNCTION blind_index(purpose text, value encrypted_timestamptz) RETURNS blind_index LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
    AS $$ SELECT @extschema@.blind_index(purpose, @extschema@.decrypt_field(value)) $$;

-- Keeping a term column in step with its source column, at INSERT and UPDATE:
--   CREATE TRIGGER users_email_idx BEFORE INSERT OR UPDATE ON users FOR EACH ROW
--       EXECUTE FUNCTION envelope.blind_index_trigger('email', 'email_idx', 'users.email');
-- (source column, term column, purpose). The term is always computed here: whatever the client
-- put in the term column is overwritten (a forged term never sticks); a NULL source gives a
-- NULL term. The source may be plaintext or an encrypted column.
CREATE FUNCTION blind_index_trigger() RETURNS trigger
    AS 'MODULE_PATHNAME', 'pge_blind_index_trigger' LANGUAGE C;


-- The index key version of a term (it is in the term's text form; not secret).
CREATE FUNCTION blind_index_version(blind_index) RETURNS integer
    AS 'MODULE_PATHNAME', 'pge_blind_index_version' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE LEAKPROOF;

-- Backfill: gives every row of the session's tenant the term the trigger would give it (the
-- tenant's active index key version, this purpose): rows without a term, with a term of an
-- older version, another purpose, or a forged or copied one are rewritten; rows already right
-- are left alone. One pass over the table in block ranges (a TID range scan per batch of about
-- batch_size rows), each batch committed (CALL it outside a transaction block):
--   CALL envelope.blind_index_backfill('users', 'email', 'email_idx', 'users.email');
-- Which rows are the tenant's: those whose tenant_column equals the tenant setting when one is
-- named; otherwise, for an encrypted source, those under the tenant's key; otherwise (a
-- plaintext source, no tenant column) every row. A partitioned table is done partition by
-- partition; inheritance children are not included (call it per child). Ends with a WARNING when
-- the column's terms are so few that their frequencies give values away. Runs with the caller's
-- rights; a procedure that commits cannot pin its search_path, so every name and operator in it
-- is schema-qualified.
CREATE PROCEDURE blind_index_backfill(tbl regclass, source name, term name, purpose text,
                                      tenant_column name DEFAULT NULL, batch_size integer DEFAULT 1000)
LANGUAGE plpgsql AS $$
DECLARE
    src_type pg_catalog.oid;
    base_type pg_catalog.oid;
    term_type pg_catalog.oid;
    encrypted pg_catalog.bool;
    filter pg_catalog.text;
    part pg_catalog.regclass;
    per_block pg_catalog.float8;
    step pg_catalog.int8;
    nblocks pg_catalog.int8;
    blk pg_catalog.int8;
    n pg_catalog.int8;
    total pg_catalog.int8 := 0;
    active pg_catalog.int4;
    nrows pg_catalog.int8;
    ndistinct pg_catalog.int8;
    warn pg_catalog.text;
BEGIN
    IF batch_size IS NULL OR batch_size OPERATOR(pg_catalog.<) 1 THEN
        RAISE EXCEPTION 'pg_envelope: batch_size must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT a.atttypid INTO src_type FROM pg_catalog.pg_attribute a
     WHERE a.attrelid OPERATOR(pg_catalog.=) tbl AND a.attname OPERATOR(pg_catalog.=) source AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped;
    SELECT a.atttypid INTO term_type FROM pg_catalog.pg_attribute a
     WHERE a.attrelid OPERATOR(pg_catalog.=) tbl AND a.attname OPERATOR(pg_catalog.=) term AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped;
    IF src_type IS NULL OR term_type IS NULL THEN
        RAISE EXCEPTION 'pg_envelope: % has no column %', tbl, coalesce(CASE WHEN src_type IS NULL THEN source END, term)
            USING ERRCODE = 'undefined_column';
    END IF;
    IF term_type OPERATOR(pg_catalog.<>) '@extschema@.blind_index'::pg_catalog.regtype THEN
        RAISE EXCEPTION 'pg_envelope: column % of % is not of type envelope.blind_index', term, tbl
            USING ERRCODE = 'datatype_mismatch';
    END IF;
    active := @extschema@.active_index_version();
    -- The source's base type (a domain over an encrypted type is encrypted too).
    base_type := src_type;
    WHILE EXISTS (SELECT 1 FROM pg_catalog.pg_type ty WHERE ty.oid OPERATOR(pg_catalog.=) base_type AND ty.typtype OPERATOR(pg_catalog.=) 'd') LOOP
        SELECT ty.typbasetype INTO base_type FROM pg_catalog.pg_type ty WHERE ty.oid OPERATOR(pg_catalog.=) base_type;
    END LOOP;
    encrypted := EXISTS (SELECT 1 FROM pg_catalog.pg_type ty
                          WHERE ty.oid OPERATOR(pg_catalog.=) base_type
                            AND ty.typnamespace OPERATOR(pg_catalog.=) '@extschema@'::pg_catalog.regnamespace
                            AND ty.typname OPERATOR(pg_catalog.~~) 'encrypted\_%');
    -- The tenant's rows: by the tenant column when one is named, and by the key in the
    -- ciphertext's header for an encrypted source (both when both apply: a row whose column
    -- and key disagree is skipped, never decrypted under the wrong tenant).
    filter := 'true';
    IF tenant_column IS NOT NULL THEN
        filter := pg_catalog.format('t.%I OPERATOR(pg_catalog.=) pg_catalog.current_setting(pg_catalog.current_setting(%L))',
                                    tenant_column, 'envelope.tenant_setting');
    END IF;
    IF encrypted THEN
        filter := pg_catalog.format('%s AND @extschema@.key_tenant_id(t.%I) OPERATOR(pg_catalog.=) %s', filter, source, @extschema@.current_tenant_key_id());
    END IF;
    FOR part IN SELECT p.relid FROM pg_catalog.pg_partition_tree(tbl) p
                 WHERE p.isleaf AND p.relid OPERATOR(pg_catalog.<>) tbl
                UNION ALL
                SELECT tbl FROM pg_catalog.pg_class c
                 WHERE c.oid OPERATOR(pg_catalog.=) tbl AND c.relkind OPERATOR(pg_catalog.<>) 'p' LOOP
        SELECT CASE WHEN c.relpages OPERATOR(pg_catalog.>) 0 AND c.reltuples OPERATOR(pg_catalog.>) 0
                    THEN c.reltuples OPERATOR(pg_catalog./) c.relpages ELSE 50 END
          INTO per_block FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) part;
        step := GREATEST(1, (batch_size OPERATOR(pg_catalog./) per_block)::pg_catalog.int8);
        nblocks := pg_catalog.pg_relation_size(part) OPERATOR(pg_catalog./) pg_catalog.current_setting('block_size')::pg_catalog.int8;
        blk := 0;
        WHILE blk OPERATOR(pg_catalog.<=) nblocks LOOP
            -- The tenant filter is evaluated first (CASE): another tenant's value is never
            -- decrypted, and its term never touched.
            -- A row with no source gets no term (a term left there, forged or old, is cleared);
            -- for an encrypted source such a row's tenant is unknown, so it is left alone.
            EXECUTE pg_catalog.format(
                'UPDATE ONLY %s t SET %I = CASE WHEN t.%I IS NULL THEN NULL ELSE @extschema@.blind_index(%L, t.%I) END
                  WHERE t.ctid OPERATOR(pg_catalog.>=) ''(%s,0)''::pg_catalog.tid AND t.ctid OPERATOR(pg_catalog.<) ''(%s,0)''::pg_catalog.tid
                    AND CASE WHEN t.%I IS NULL THEN %s AND t.%I IS NOT NULL
                             WHEN %s THEN t.%I IS NULL OR NOT (t.%I OPERATOR(pg_catalog.=) @extschema@.blind_index(%L, t.%I))
                             ELSE false END',
                part, term, source, purpose, source, blk, blk OPERATOR(pg_catalog.+) step,
                source, CASE WHEN encrypted THEN 'false' ELSE filter END, term,
                filter, term, term, purpose, source);
            GET DIAGNOSTICS n = ROW_COUNT;
            total := total OPERATOR(pg_catalog.+) n;
            COMMIT;
            blk := blk OPERATOR(pg_catalog.+) step;
        END LOOP;
    END LOOP;
    EXECUTE pg_catalog.format('SELECT pg_catalog.count(*), pg_catalog.count(DISTINCT t.%I) FROM %s t WHERE t.%I IS NOT NULL AND %s',
                              term, tbl, term, filter)
        INTO nrows, ndistinct;
    warn := @extschema@.blind_index_cardinality_warning(ndistinct, nrows);
    IF warn IS NOT NULL THEN
        RAISE WARNING 'pg_envelope: %', warn;
    END IF;
    RAISE NOTICE 'pg_envelope: % row(s) of % given terms of index key version %', total, tbl, active;
END $$;
