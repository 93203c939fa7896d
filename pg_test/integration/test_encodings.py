"""Databases whose encoding is not UTF8: text is encrypted as its bytes in the database
encoding and must come back as the same text, through the functions and the typed column."""

import uuid

import psycopg
import pytest

from conftest import PORT_A, connect

WORD = "héllo wörld ½"


@pytest.fixture(params=["LATIN1", "SQL_ASCII"])
def db(request):
    name = f"enc_{request.param.lower()}_{uuid.uuid4().hex[:6]}"
    tenant = f"t_{name}"
    with connect(PORT_A) as c:
        c.execute(f"CREATE DATABASE {name} ENCODING '{request.param}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    with connect(PORT_A, name) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        c.execute("SELECT envelope.create_tenant(%s), envelope.grant_tenant(%s, 'postgres')", (tenant, tenant))
    yield name, tenant, request.param
    with connect(PORT_A) as c:
        c.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_text_round_trips_in_a_non_utf8_database(db):
    name, tenant, encoding = db
    # The client speaks UTF-8; the server converts to the database encoding (for SQL_ASCII it
    # stores the UTF-8 bytes as they are).
    with connect(PORT_A, name, client_encoding="UTF8") as c:
        c.execute("SELECT set_config('app.tenant_id', %s, false)", (tenant,))
        assert c.execute("SELECT envelope.decrypt_field(envelope.encrypt_field(%s, 'ctx ½'), 'ctx ½')", (WORD,)).fetchone()[0] == WORD
        # The plaintext inside is the database encoding's bytes (é is one byte in LATIN1).
        n = c.execute("SELECT octet_length(envelope.decrypt_field_bytea(envelope.encrypt_field(%s)))", (WORD,)).fetchone()[0]
        assert n == len(WORD.encode("latin-1" if encoding == "LATIN1" else "utf-8"))
        # The context is bound as bytes too.
        env = c.execute("SELECT envelope.encrypt_field(%s, 'ctx ½')", (WORD,)).fetchone()[0]
        with pytest.raises(psycopg.errors.DataException):
            c.execute("SELECT envelope.decrypt_field(%s, 'ctx 1/2')", (env,))
        if encoding == "LATIN1":
            # A tenant setting that is not UTF-8 names no tenant: a clear 22023, not "unset".
            c.execute("SET app.tenant_id = 'café'")
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                c.execute("SELECT envelope.encrypt_field('x')")
            c.execute("SELECT set_config('app.tenant_id', %s, false)", (tenant,))
        c.execute("CREATE TABLE t (v envelope.encrypted_text)")
        c.execute("INSERT INTO t VALUES (%s)", (WORD,))
        assert c.execute("SELECT v::text FROM t").fetchone()[0] == WORD


def test_blind_index_terms_depend_only_on_the_value_in_a_non_utf8_database(db):
    """Terms are of the value's UTF-8 text: the same in every row and statement, whatever the
    bytes next to it in memory (the adversarial review found terms of empty strings, and of any
    string in SQL_ASCII, computed over the value plus the following bytes), and equal to the
    term of the same text sent again."""
    name, tenant, encoding = db
    with connect(PORT_A, name, client_encoding="UTF8") as c:
        c.execute("SELECT envelope.declare_blind_index('enc.raw'), envelope.declare_blind_index('enc.fold', 'nfkc_casefold')")
        c.execute("SELECT set_config('app.tenant_id', %s, false)", (tenant,))
        c.execute("CREATE TABLE bi (s text, neighbour text)")
        c.execute("INSERT INTO bi VALUES ('', 'hello'), ('', 'world'), ('abc', 'secret1'), ('abc', 'secret2'), (%s, 'x'), (%s, 'y')", (WORD, WORD))
        terms = c.execute("SELECT s, array_agg(DISTINCT envelope.blind_index('enc.raw', s)::text) FROM bi GROUP BY s").fetchall()
        assert all(len(t) == 1 for _, t in terms), terms
        by_value = {s: t[0] for s, t in terms}
        assert by_value[""] == c.execute("SELECT envelope.blind_index('enc.raw', '')::text").fetchone()[0]
        assert c.execute("SELECT envelope.blind_index('enc.raw', '') = envelope.blind_index('enc.raw', '')").fetchone()[0] is True
        assert by_value["abc"] == c.execute("SELECT envelope.blind_index('enc.raw', 'abc')::text").fetchone()[0]
        assert by_value[WORD] == c.execute("SELECT envelope.blind_index('enc.raw', %s)::text", (WORD,)).fetchone()[0]
        if encoding == "SQL_ASCII":
            # Bytes that are not UTF-8 (SQL_ASCII stores anything): a clear 22021 that quotes
            # none of them (PostgreSQL's own check would, and they may be plaintext).
            c.execute("CREATE TABLE bad (v envelope.encrypted_text)")
            c.execute("INSERT INTO bad VALUES ((%s || convert_from('\\xe9'::bytea, 'SQL_ASCII') || %s)::text)", ("SSN 12", "3-45-6789"))
            with pytest.raises(psycopg.Error) as err:
                c.execute("SELECT envelope.blind_index('enc.raw', v) FROM bad")
            assert err.value.sqlstate == "22021"
            assert "3-45" not in str(err.value) and "0x" not in str(err.value), str(err.value)
        if encoding == "LATIN1":
            # Non-ASCII text is folded as Unicode: the upper-case form has the same term.
            assert c.execute("SELECT envelope.blind_index('enc.fold', %s) = envelope.blind_index('enc.fold', %s)",
                             (WORD, WORD.upper())).fetchone()[0] is True


def test_decrypting_bytes_that_are_not_text_is_22021_not_garbage():
    name = f"enc_utf8_{uuid.uuid4().hex[:6]}"
    t = f"t_{name}"
    with connect(PORT_A) as c:
        c.execute(f"CREATE DATABASE {name} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    try:
        with connect(PORT_A, name) as c:
            c.execute("CREATE EXTENSION pg_envelope")
            c.execute("SELECT envelope.create_tenant(%s), envelope.grant_tenant(%s, 'postgres')", (t, t))
            c.execute("SELECT set_config('app.tenant_id', %s, false)", (t,))
            for raw in (b"\xff\xfe", b"a\x00b", b"\xc3"):
                with pytest.raises(psycopg.errors.CharacterNotInRepertoire):
                    c.execute("SELECT envelope.decrypt_field(envelope.encrypt_field(%s::bytea))", (raw,))
    finally:
        with connect(PORT_A) as c:
            c.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_reencryption_keeps_a_non_utf8_context(db):
    """A bytea value encrypted under a context that is not UTF-8 (LATIN1 '½') is re-encrypted
    under a new data key with the same context bytes (review 35: the re-encryption function
    took its context as UTF-8 text and refused it)."""
    name, tenant, encoding = db
    with connect(PORT_A, name, client_encoding="UTF8") as c:
        c.execute("SELECT set_config('app.tenant_id', %s, false)", (tenant,))
        c.execute("CREATE TABLE b (id int PRIMARY KEY, ctx text, v bytea)")
        c.execute("INSERT INTO b SELECT i, 'ctx ½ ' || i, envelope.encrypt_field(%s || i, 'ctx ½ ' || i) FROM generate_series(1, 20) i", (WORD,))
        assert c.execute("SELECT envelope.rotate_data_key(%s)", (tenant,)).fetchone()[0] == 2
        c.execute("CALL envelope.reencrypt('b', 'v', context_column => 'ctx')")
        rows = c.execute("SELECT envelope.key_version(v), envelope.decrypt_field(v, ctx), get_byte(v, 0) FROM b ORDER BY id").fetchall()
        assert rows == [(2, f"{WORD}{i}", 3) for i in range(1, 21)], rows[:2]
        if encoding == "LATIN1":
            # A constant context is kept in the job's row as UTF-8 text: refused clearly when it
            # is not, with the way out in the hint (context_column, above).
            assert c.execute("SELECT envelope.rotate_data_key(%s)", (tenant,)).fetchone()[0] == 3
            with pytest.raises(psycopg.errors.CharacterNotInRepertoire) as e:
                c.execute("CALL envelope.reencrypt('b', 'v', context => 'ctx ½ 1')")
            assert "context_column" in (e.value.diag.message_hint or "")
