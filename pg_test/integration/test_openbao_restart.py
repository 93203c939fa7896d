"""A KMS stopped mid-run and restarted: OpenBao with raft storage (keys persist), scripts/kms.sh."""

import time

import psycopg
import pytest

from conftest import PORT_A, ROOT, STATE, as_tenant, connect, recreate_db, sh

DB = "envelope_kms_restart"
BAOP = STATE / "openbao-persistent"


def kms(cmd):
    sh("bash", str(ROOT / "scripts/kms.sh"), cmd)


@pytest.fixture(scope="module")
def restart_db():
    kms("start-openbao-persistent")
    recreate_db(PORT_A, DB)
    with connect(PORT_A, DB) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        c.execute(
            "SELECT envelope.add_key_provider('baop', 'vault_transit', %s)",
            (psycopg.types.json.Jsonb({"url": "http://127.0.0.1:8210", "key": "pg-root", "token_file": str(BAOP / "token"),
                                       "allow_insecure_http": True}),),
        )
        for t in ("rs_warm", "rs_cold"):
            c.execute("SELECT envelope.create_tenant(%s, provider => 'baop')", (t,))
            c.execute("SELECT envelope.grant_tenant(%s, current_user)", (t,))
    yield DB
    kms("start-openbao-persistent")


def decrypt_as(conn, tenant, env):
    with as_tenant(conn, tenant):
        return conn.execute("SELECT envelope.decrypt_field(%s::bytea)", (env,)).fetchone()[0]


def test_kms_stopped_mid_run_and_restarted(restart_db):
    with connect(PORT_A, restart_db) as warm:
        with as_tenant(warm, "rs_warm"):
            env_warm = warm.execute("SELECT envelope.encrypt_field('survives a KMS restart')").fetchone()[0]
        with connect(PORT_A, restart_db) as c:
            with as_tenant(c, "rs_cold"):
                env_cold = c.execute("SELECT envelope.encrypt_field('cold tenant')").fetchone()[0]
        kms("stop-openbao-persistent")
        assert decrypt_as(warm, "rs_warm", env_warm) == "survives a KMS restart"  # cached: keeps working
        with connect(PORT_A, restart_db) as cold:
            with pytest.raises(psycopg.Error) as e:
                decrypt_as(cold, "rs_cold", env_cold)
            assert e.value.sqlstate == "58000"
            kms("start-openbao-persistent")  # restart and unseal: the Transit key is still there
            time.sleep(2.5)  # past this backend's retry backoff for the cold tenant
            assert decrypt_as(cold, "rs_cold", env_cold) == "cold tenant"
        with connect(PORT_A, restart_db) as fresh:
            assert decrypt_as(fresh, "rs_warm", env_warm) == "survives a KMS restart"
