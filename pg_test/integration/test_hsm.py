"""The pkcs11 provider against SoftHSM2 (a token in a private folder, set up by scripts/kms.sh)."""

import psycopg
import pytest

from conftest import PORT_A, STATE, as_tenant, connect, provider_db, sh

DB = "envelope_hsm"
HSM = STATE / "softhsm"


def hsm_options(**over):
    o = {"module": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "pg-envelope", "key_label": "pg-kek", "pin_file": str(HSM / "pin")}
    o.update(over)
    return psycopg.types.json.Jsonb(o)


@pytest.fixture(scope="module")
def hsm_db():
    return provider_db(DB, {"hsm": ("pkcs11", hsm_options()), "hsm2": ("pkcs11", hsm_options(key_label="pg-kek-2"))},
                       ["hsm_acme"], kms_command="start-softhsm")


def test_round_trip_and_key_never_leaves_the_hsm(hsm_db):
    with connect(PORT_A, hsm_db) as c:
        v = c.execute("SELECT envelope.verify_provider('hsm')").fetchone()[0]
        assert v["kind"] == "pkcs11" and v["key_check"] == "match" and v["bound_to_tenant"]
        with as_tenant(c, "hsm_acme"):
            env = c.execute("SELECT envelope.encrypt_field('sealed by the hsm')").fetchone()[0]
            assert c.execute("SELECT envelope.decrypt_field(%s::bytea)", (env,)).fetchone()[0] == "sealed by the hsm"
    out = sh("pkcs11-tool", "--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label", "pg-envelope", "--login",
             "--pin", (HSM / "pin").read_text().strip(), "--list-objects", env={"SOFTHSM2_CONF": str(HSM / "softhsm2.conf")}).stdout
    assert "never extractable" in out and "sensitive" in out


def test_every_backend_initialises_its_own_session(hsm_db):
    # Ten fresh backends (forked from the postmaster) each unwrap the tenant key through the HSM.
    with connect(PORT_A, hsm_db) as c:
        with as_tenant(c, "hsm_acme"):
            env = c.execute("SELECT envelope.encrypt_field('x')").fetchone()[0]
    for _ in range(10):
        with connect(PORT_A, hsm_db) as c:
            with as_tenant(c, "hsm_acme"):
                assert c.execute("SELECT envelope.decrypt_field(%s::bytea)", (env,)).fetchone()[0] == "x"
                assert c.execute("SELECT envelope.status()->'backend'->'provider_calls'->>'hsm'").fetchone()[0] == "1"


def test_wrong_pin_and_missing_key_fail_clearly(hsm_db):
    bad = HSM / "bad-pin"
    bad.write_text("000000\n")
    sh("chown", "postgres:postgres", str(bad))
    with connect(PORT_A, hsm_db) as c:
        c.execute("SELECT envelope.add_key_provider('hsm_badpin', 'pkcs11', %s)", (hsm_options(pin_file=str(bad)),))
        c.execute("SELECT envelope.add_key_provider('hsm_nokey', 'pkcs11', %s)", (hsm_options(key_label="absent"),))
        with pytest.raises(psycopg.Error) as e:
            c.execute("SELECT envelope.verify_provider('hsm_badpin')")
        assert e.value.sqlstate == "28000" and "000000" not in str(e.value)
        with pytest.raises(psycopg.Error) as e:
            c.execute("SELECT envelope.verify_provider('hsm_nokey')")
        assert e.value.sqlstate == "55000"


def test_rewrap_between_hsm_keys_and_providers(hsm_db):
    with connect(PORT_A, hsm_db) as c:
        with as_tenant(c, "hsm_acme"):
            env = c.execute("SELECT envelope.encrypt_field('portable')").fetchone()[0]
        c.execute("SELECT envelope.rewrap_tenant('hsm_acme', 'hsm2')")
    with connect(PORT_A, hsm_db) as c:
        with as_tenant(c, "hsm_acme"):
            assert c.execute("SELECT envelope.decrypt_field(%s::bytea)", (env,)).fetchone()[0] == "portable"
        # Under the other HSM key, the old wrapped form is useless: check by unwrapping under 'hsm'.
        c.execute("UPDATE envelope.tenants SET provider = 'hsm' WHERE name = 'hsm_acme'")
    with connect(PORT_A, hsm_db) as c:
        with as_tenant(c, "hsm_acme"):
            with pytest.raises(psycopg.Error) as e:
                c.execute("SELECT envelope.decrypt_field(%s::bytea)", (env,))
            assert e.value.sqlstate == "22000"


def test_recovers_when_the_token_disappears_and_returns(hsm_db):
    """A lost HSM (token storage gone mid-run) fails the next operation clearly; once it is back,
    the next operation works again: every operation opens its own session, none is reused."""
    tokens = HSM / "tokens"
    moved = HSM / "tokens.away"
    with connect(PORT_A, hsm_db) as c:
        assert c.execute("SELECT envelope.verify_provider('hsm')->>'round_trip'").fetchone()[0] == "true"
        tokens.rename(moved)
        try:
            with pytest.raises(psycopg.Error) as e:
                c.execute("SELECT envelope.verify_provider('hsm')")
            assert e.value.sqlstate in ("55000", "58000"), e.value
        finally:
            moved.rename(tokens)
        assert c.execute("SELECT envelope.verify_provider('hsm')->>'round_trip'").fetchone()[0] == "true"
