"""The aws_kms provider against moto with SigV4 signatures checked (scripts/kms.sh start-moto)."""

import os

import psycopg
import pytest

from conftest import PORT_A, ROOT, STATE, as_tenant, connect, provider_db, sh

DB = "envelope_aws"
MOTO = STATE / "moto"


def env():
    out = {}
    for line in (MOTO / "env").read_text().splitlines():
        k, v = line.removeprefix("export ").split("=", 1)
        out[k] = v
    return out


def aws_options(key_var="MOTO_KEY_ID", credentials="credentials"):
    e = env()
    return psycopg.types.json.Jsonb({
        "key_id": e[key_var], "region": "us-east-1", "endpoint": e["MOTO_ENDPOINT"],
        "allow_insecure_http": True, "credentials_file": str(MOTO / credentials),
    })


@pytest.fixture(scope="module")
def aws_db():
    sh("bash", str(ROOT / "scripts/kms.sh"), "start-moto")  # before aws_options() reads its env file
    return provider_db(DB, {"aws": ("aws_kms", aws_options()), "aws2": ("aws_kms", aws_options("MOTO_KEY_ID_2"))}, ["aws_acme"])


def test_round_trip_through_kms_with_encryption_context(aws_db):
    with connect(PORT_A, aws_db) as c:
        v = c.execute("SELECT envelope.verify_provider('aws')").fetchone()[0]
        assert v["kind"] == "aws_kms" and v["key_check"] == "match" and v["bound_to_tenant"]
        with as_tenant(c, "aws_acme"):
            env_ = c.execute("SELECT envelope.encrypt_field('under aws kms')").fetchone()[0]
            assert c.execute("SELECT envelope.decrypt_field(%s::bytea)", (env_,)).fetchone()[0] == "under aws kms"
        c.execute("SELECT envelope.rewrap_tenant('aws_acme', 'aws2')")
    with connect(PORT_A, aws_db) as c:
        with as_tenant(c, "aws_acme"):
            assert c.execute("SELECT envelope.decrypt_field(%s::bytea)", (env_,)).fetchone()[0] == "under aws kms"


def test_wrong_secret_is_refused_by_signature_check(aws_db):
    secret_prefix = next(l for l in (MOTO / "credentials").read_text().splitlines() if "secret" in l).split("=")[1].strip()[:12]
    with connect(PORT_A, aws_db) as c:
        c.execute("SELECT envelope.add_key_provider('aws_bad', 'aws_kms', %s)", (aws_options(credentials="bad-credentials"),))
        with pytest.raises(psycopg.Error) as e:
            c.execute("SELECT envelope.verify_provider('aws_bad')")
        assert e.value.sqlstate == "28000" and "403" in str(e.value)
        assert secret_prefix not in str(e.value)
        assert secret_prefix not in c.execute("SELECT envelope.status()::text").fetchone()[0]


def test_policy_denial_on_decrypt_is_28000_not_a_bad_key(aws_db):
    """A user allowed kms:Encrypt but not kms:Decrypt: creating a tenant wraps, then the round
    trip's Decrypt is refused by policy. That is an authorization error (28000), not "unwrap
    failed", and it names no ARN or key material."""
    with connect(PORT_A, aws_db) as c:
        c.execute("SELECT envelope.add_key_provider('aws_enc_only', 'aws_kms', %s)",
                  (aws_options(credentials="encrypt-only-credentials"),))
        with pytest.raises(psycopg.Error) as e:
            c.execute("SELECT envelope.create_tenant('aws_denied', provider => 'aws_enc_only')")
        assert e.value.sqlstate == "28000", str(e.value)
        assert "Decrypt" in str(e.value) and "arn:" not in str(e.value)
        assert c.execute("SELECT count(*) FROM envelope.tenants WHERE name = 'aws_denied'").fetchone()[0] == 0


def test_inline_secret_refused(aws_db):
    with connect(PORT_A, aws_db) as c:
        with pytest.raises(psycopg.Error) as e:
            c.execute(
                "SELECT envelope.add_key_provider('aws_inline', 'aws_kms', %s)",
                (psycopg.types.json.Jsonb({"key_id": "k", "region": "us-east-1", "secret_access_key": "NOPE-SECRET"}),),
            )
        assert "credentials_file" in str(e.value) and "NOPE-SECRET" not in str(e.value)


def test_many_cold_backends_make_one_kms_call_each(aws_db):
    """16 backends start cold on one tenant at once and each decrypts 200 values: the emulator's
    own request log shows 16 Decrypt calls (one per backend), not 3,200."""
    import threading

    with connect(PORT_A, aws_db) as c:
        with as_tenant(c, "aws_acme"):
            env_ = c.execute("SELECT envelope.encrypt_field('stampede')").fetchone()[0]

    def posts():
        return sum(1 for line in (MOTO / "server.log").read_text(errors="replace").splitlines() if "POST / HTTP/1.1" in line)

    before = posts()
    errors = []

    def worker():
        try:
            with connect(PORT_A, aws_db) as c:
                with as_tenant(c, "aws_acme"):
                    n = c.execute(
                        "SELECT count(*) FILTER (WHERE envelope.decrypt_field(%s::bytea) = 'stampede') FROM generate_series(1, 200)",
                        (env_,),
                    ).fetchone()[0]
                    assert n == 200
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    import time as _t

    _t.sleep(0.3)  # let the server flush its log
    assert posts() - before == 16
