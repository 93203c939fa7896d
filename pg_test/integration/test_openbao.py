"""The vault_transit provider against a real OpenBao (dev mode, TLS) started by scripts/kms.sh on
127.0.0.1:8200, and against a loopback server that accepts and never answers."""

import socket
import threading
import time

import psycopg
import pytest

from conftest import PORT_A, ROOT, STATE, as_tenant, connect, provider_db, sh

DB = "envelope_kms"
BAO = STATE / "openbao"


def bao_options(**over):
    o = {
        "url": "https://127.0.0.1:8200",
        "key": "pg-root",
        "token_file": str(BAO / "token"),
        "ca_file": str(BAO / "ca.pem"),
    }
    o.update(over)
    return psycopg.types.json.Jsonb(o)


def sqlstate(conn, query, params=None):
    try:
        conn.execute(query, params)
        return None, ""
    except psycopg.Error as e:
        return e.sqlstate, str(e)


@pytest.fixture(scope="module")
def openbao():
    sh("bash", str(ROOT / "scripts/kms.sh"), "start-openbao")
    yield
    # Leave a fresh server for the next run.
    sh("bash", str(ROOT / "scripts/kms.sh"), "start-openbao")


@pytest.fixture(scope="module")
def kms_db(openbao):
    return provider_db(DB, {"bao": ("vault_transit", bao_options()), "bao2": ("vault_transit", bao_options(key="pg-root-2"))},
                       ["kms_acme", "kms_globex", "kms_cold"])


def test_verify_and_round_trip_through_openbao(kms_db):
    with connect(PORT_A, kms_db) as c:
        v = c.execute("SELECT envelope.verify_provider('bao')").fetchone()[0]
        assert v["round_trip"] is True and v["key_check"] == "match" and v["bound_to_tenant"] is True
        # status() describes each provider (to superusers): where it is, never its token.
        bao = next(p for p in c.execute("SELECT envelope.status()->'providers'").fetchone()[0] if p["name"] == "bao")
        assert bao["configured"] is True and bao["url"].startswith("https://127.0.0.1:") and bao["auth"].startswith("token_file ")
        token = (BAO / "token").read_text().strip()
        assert token not in c.execute("SELECT envelope.status()::text").fetchone()[0]
        wrapped = c.execute("SELECT convert_from(wrapped_key, 'UTF8') FROM envelope.tenants WHERE name = 'kms_acme'").fetchone()[0]
        assert wrapped.startswith("vault:v1:")
        with as_tenant(c, "kms_acme"):
            env = c.execute("SELECT envelope.encrypt_field('kept in openbao')").fetchone()[0]
            assert c.execute("SELECT envelope.decrypt_field(%s::bytea)", (env,)).fetchone()[0] == "kept in openbao"
        with as_tenant(c, "kms_globex"):
            assert sqlstate(c, "SELECT envelope.decrypt_field(%s::bytea)", (env,))[0] == "22000"


def test_one_openbao_call_per_tenant_per_backend(kms_db):
    with connect(PORT_A, kms_db) as c:
        c.execute(
            "SELECT count(envelope.encrypt_field(i::text)) FROM generate_series(1, 20000) i, "
            "LATERAL (SELECT set_config('app.tenant_id', CASE WHEN i % 2 = 0 THEN 'kms_acme' ELSE 'kms_globex' END, true)) s"
        )
        calls = c.execute("SELECT envelope.status()->'backend'->'provider_calls'->>'bao'").fetchone()[0]
        assert int(calls) == 2


def test_rewrap_between_transit_keys_keeps_data(kms_db):
    with connect(PORT_A, kms_db) as c:
        with as_tenant(c, "kms_acme"):
            env = c.execute("SELECT envelope.encrypt_field('moves between keys')").fetchone()[0]
        c.execute("SELECT envelope.rewrap_tenant('kms_acme', 'bao2')")
        c.execute("SELECT envelope.rewrap_tenant('kms_acme', 'bao')")
    with connect(PORT_A, kms_db) as c:  # a new backend: keys come from OpenBao again
        with as_tenant(c, "kms_acme"):
            assert c.execute("SELECT envelope.decrypt_field(%s::bytea)", (env,)).fetchone()[0] == "moves between keys"


def test_wrong_token_and_wrong_ca_fail_without_leaking_the_token(kms_db, tmp_path):
    token = (BAO / "token").read_text().strip()
    bad = STATE / "openbao" / "bad-token"
    bad.write_text("s.not-a-real-token\n")
    sh("chown", "postgres:postgres", str(bad))
    # A CA bundle that did not sign OpenBao's certificate (copied under envelope.credential_dirs).
    wrong_ca = STATE / "openbao" / "wrong-ca.pem"
    sh("cp", "/etc/ssl/certs/ca-certificates.crt", str(wrong_ca))
    with connect(PORT_A, kms_db) as c:
        c.execute("SELECT envelope.add_key_provider('bao_badtoken', 'vault_transit', %s)", (bao_options(token_file=str(bad)),))
        c.execute(
            "SELECT envelope.add_key_provider('bao_badca', 'vault_transit', %s)",
            (bao_options(ca_file=str(wrong_ca)),),
        )
        state, msg = sqlstate(c, "SELECT envelope.verify_provider('bao_badtoken')")
        assert state == "28000" and "403" in msg
        state, msg = sqlstate(c, "SELECT envelope.verify_provider('bao_badca')")
        assert state == "58000" and "certificate" in msg.lower(), msg
        status = c.execute("SELECT envelope.status()::text").fetchone()[0]
        for text in (msg, status):
            assert token not in text


def test_approle_login(kms_db):
    opts = bao_options()
    o = dict(opts.obj)
    del o["token_file"]
    o.update(role_id_file=str(BAO / "role-id"), secret_id_file=str(BAO / "secret-id"))
    with connect(PORT_A, kms_db) as c:
        c.execute("SELECT envelope.add_key_provider('bao_approle', 'vault_transit', %s)", (psycopg.types.json.Jsonb(o),))
        v = c.execute("SELECT envelope.verify_provider('bao_approle')").fetchone()[0]
        assert v["round_trip"] and v["key_check"] == "match"
        c.execute("SELECT envelope.create_tenant('kms_approle', provider => 'bao_approle')")
        c.execute("SELECT envelope.grant_tenant('kms_approle', current_user)")
        with as_tenant(c, "kms_approle"):
            env_ = c.execute("SELECT envelope.encrypt_field('approle')").fetchone()[0]
            assert c.execute("SELECT envelope.decrypt_field(%s::bytea)", (env_,)).fetchone()[0] == "approle"
        # A wrong secret id: the login is refused (28000), nothing secret in the message.
        bad = BAO / "bad-secret-id"
        bad.write_text("00000000-0000-0000-0000-000000000000\n")
        sh("chown", "postgres:postgres", str(bad))
        o["secret_id_file"] = str(bad)
        c.execute("SELECT envelope.add_key_provider('bao_approle_bad', 'vault_transit', %s)", (psycopg.types.json.Jsonb(o),))
        state, msg = sqlstate(c, "SELECT envelope.verify_provider('bao_approle_bad')")
        assert state == "28000" and (BAO / "secret-id").read_text().strip() not in msg, msg


def test_expired_token_is_refused(kms_db):
    import json
    import ssl
    import urllib.request

    root = (BAO / "root-token").read_text().strip()
    req = urllib.request.Request(
        "https://127.0.0.1:8200/v1/auth/token/create",
        data=json.dumps({"policies": ["pg-envelope"], "ttl": "2s", "no_default_policy": True}).encode(),
        headers={"X-Vault-Token": root},
        method="POST",
    )
    ctx = ssl.create_default_context(cafile=str(BAO / "ca.pem"))
    token = json.load(urllib.request.urlopen(req, context=ctx))["auth"]["client_token"]
    f = BAO / "short-token"
    f.write_text(token + "\n")
    sh("chown", "postgres:postgres", str(f))
    with connect(PORT_A, kms_db) as c:
        c.execute("SELECT envelope.add_key_provider('bao_short', 'vault_transit', %s)", (bao_options(token_file=str(f)),))
        assert c.execute("SELECT envelope.verify_provider('bao_short')->>'round_trip'").fetchone()[0] == "true"
        time.sleep(3)
        state, msg = sqlstate(c, "SELECT envelope.verify_provider('bao_short')")
        assert state == "28000" and token not in msg, msg


class HangingServer:
    """Accepts TCP connections on 127.0.0.1 and never answers (not even the TLS handshake)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except OSError:
                return

    def close(self):
        self.stop = True
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def hanging(kms_db):
    srv = HangingServer()
    with connect(PORT_A, kms_db) as c:
        c.execute("DELETE FROM envelope.key_providers WHERE name = 'hang'")
        c.execute(
            "SELECT envelope.add_key_provider('hang', 'vault_transit', %s)",
            (bao_options(url=f"https://127.0.0.1:{srv.port}"),),
        )
    yield srv
    srv.close()


def test_statement_timeout_ends_a_hung_kms_call(hanging, kms_db):
    with connect(PORT_A, kms_db) as c:
        c.execute("SET statement_timeout = '1s'")
        t0 = time.monotonic()
        state, _ = sqlstate(c, "SELECT envelope.verify_provider('hang')")
        took = time.monotonic() - t0
    assert state == "57014" and took < 2.0, (state, took)


def test_pg_cancel_backend_ends_a_hung_kms_call(hanging, kms_db):
    with connect(PORT_A, kms_db) as c, connect(PORT_A, kms_db) as admin:
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        result = {}

        def run():
            t0 = time.monotonic()
            result["state"] = sqlstate(c, "SELECT envelope.verify_provider('hang')")[0]
            result["took"] = time.monotonic() - t0

        th = threading.Thread(target=run)
        th.start()
        time.sleep(0.5)
        t_cancel = time.monotonic()
        admin.execute("SELECT pg_cancel_backend(%s)", (pid,))
        th.join(10)
        assert result["state"] == "57014"
        assert result["took"] < 1.5 and time.monotonic() - t_cancel < 1.0


def test_kms_timeout_bounds_a_hung_call(hanging, kms_db):
    with connect(PORT_A, kms_db) as c:
        c.execute("SET envelope.kms_timeout = '700ms'")
        t0 = time.monotonic()
        state, msg = sqlstate(c, "SELECT envelope.verify_provider('hang')")
        took = time.monotonic() - t0
    assert state == "58000" and 0.6 < took < 2.0, (state, took, msg)


def test_hung_kms_past_ttl_costs_one_timeout_per_statement_then_serves_degraded(hanging, kms_db):
    with connect(PORT_A, kms_db) as c:
        c.execute("SELECT envelope.create_tenant('kms_stale', provider => 'bao')")
        c.execute("SELECT envelope.grant_tenant('kms_stale', current_user)")
    with connect(PORT_A, kms_db) as c:
        notices = []
        c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        c.execute("SET envelope.key_cache_ttl = '1s'")
        c.execute("SET envelope.kms_timeout = '500ms'")
        c.execute("SET app.tenant_id = 'kms_stale'")
        env = c.execute("SELECT envelope.encrypt_field('cached before the KMS hung')").fetchone()[0]
        # The KMS starts hanging (the provider now points at a server that never answers).
        with connect(PORT_A, kms_db) as admin:
            admin.execute(
                "UPDATE envelope.key_providers SET options = jsonb_set(options, '{url}', to_jsonb(%s::text)) WHERE name = 'bao'",
                (f"https://127.0.0.1:{hanging.port}",),
            )
        try:
            time.sleep(1.2)  # past the TTL
            t0 = time.monotonic()
            n = c.execute("SELECT count(envelope.encrypt_field(i::text)) FROM generate_series(1, 200) i").fetchone()[0]
            took = time.monotonic() - t0
            assert n == 200
            assert took < 1.5, f"{took:.2f}s: more than one KMS timeout in one statement"
            warnings = [m for m in notices if "served from keys cached" in m]
            assert len(warnings) == 1, notices
            assert c.execute("SELECT envelope.decrypt_field(%s::bytea)", (env,)).fetchone()[0] == "cached before the KMS hung"
            st = c.execute("SELECT envelope.status()").fetchone()[0]
            assert st["degraded"] is True and st["backend"]["degraded_tenants"] == 1
            row = c.execute("SELECT degraded_by FROM envelope.key_cache() WHERE tenant = 'kms_stale'").fetchone()[0]
            assert row and "timed out after 500 ms" in row, row
            # Past envelope.max_key_age (counted from the last successful unwrap): fail closed.
            c.execute("SET envelope.max_key_age = '2s'")
            time.sleep(1.0)
            state, msg = sqlstate(c, "SELECT envelope.encrypt_field('x')")
            assert state == "58000", (state, msg)
        finally:
            with connect(PORT_A, kms_db) as admin:
                admin.execute(
                    "UPDATE envelope.key_providers SET options = jsonb_set(options, '{url}', '\"https://127.0.0.1:8200\"') WHERE name = 'bao'"
                )


def test_hung_kms_cold_tenant_fails_within_kms_timeout_and_stores_nothing(hanging, kms_db):
    """A tenant no backend has cached, its KMS accepting connections and never answering: the
    first key use fails with 58000 after about envelope.kms_timeout (not a hang), nothing is
    stored in its place, and the next attempt fails at once during the backoff (no second wait).
    Checklist row 36: until the thirteenth session only a stopped server was tested here."""
    with connect(PORT_A, kms_db) as c:
        c.execute("SELECT envelope.create_tenant('kms_cold_hung', provider => 'bao')")
        c.execute("SELECT envelope.grant_tenant('kms_cold_hung', current_user)")
        c.execute("DROP TABLE IF EXISTS cold_hung")
        c.execute("CREATE TABLE cold_hung (v envelope.encrypted_text)")
    with connect(PORT_A, kms_db) as admin:
        admin.execute(
            "UPDATE envelope.key_providers SET options = jsonb_set(options, '{url}', to_jsonb(%s::text)) WHERE name = 'bao'",
            (f"https://127.0.0.1:{hanging.port}",),
        )
    try:
        with connect(PORT_A, kms_db) as c:  # a new backend: nothing cached
            c.execute("SET envelope.kms_timeout = '700ms'")
            with as_tenant(c, "kms_cold_hung"):
                t0 = time.monotonic()
                state, msg = sqlstate(c, "INSERT INTO cold_hung VALUES ('must not be stored'::text)")
                took = time.monotonic() - t0
                assert state == "58000" and 0.6 < took < 2.0, (state, took, msg)
                assert "must not be stored" not in msg, msg
            with as_tenant(c, "kms_cold_hung"):
                t0 = time.monotonic()
                state, msg = sqlstate(c, "SELECT envelope.encrypt_field('again')")
                took = time.monotonic() - t0
                assert state == "58000" and "not retried" in msg and took < 0.5, (state, took, msg)
            assert c.execute("SELECT count(*) FROM cold_hung").fetchone()[0] == 0
    finally:
        with connect(PORT_A, kms_db) as admin:
            admin.execute(
                "UPDATE envelope.key_providers SET options = jsonb_set(options, '{url}', '\"https://127.0.0.1:8200\"') WHERE name = 'bao'"
            )
            admin.execute("DROP TABLE IF EXISTS cold_hung")


def test_kms_down_cached_tenant_works_cold_tenant_fails_fast(kms_db):
    with connect(PORT_A, kms_db) as warm:
        with as_tenant(warm, "kms_acme"):
            env = warm.execute("SELECT envelope.encrypt_field('before the outage')").fetchone()[0]
        sh("bash", str(ROOT / "scripts/kms.sh"), "stop-openbao")
        # Cached (within its TTL): keeps working with the KMS down.
        with as_tenant(warm, "kms_acme"):
            assert warm.execute("SELECT envelope.decrypt_field(%s::bytea)", (env,)).fetchone()[0] == "before the outage"
        # Cold tenant: a clear error at once, not a hang.
        with as_tenant(warm, "kms_cold"):
            t0 = time.monotonic()
            state, msg = sqlstate(warm, "SELECT envelope.encrypt_field('x')")
            assert state == "58000" and time.monotonic() - t0 < 1.0, (state, msg)
        # Retried only after a backoff: the next attempt fails at once without a KMS call.
        with as_tenant(warm, "kms_cold"):
            state, msg = sqlstate(warm, "SELECT envelope.encrypt_field('x')")
            assert state == "58000" and "not retried" in msg, msg
