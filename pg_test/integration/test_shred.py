"""Crypto-shredding with KMS-side destruction, and bring-your-own-key tenants (issue 12), against
the real key servers of scripts/kms.sh: OpenBao (Transit, TLS) and moto (AWS KMS, SigV4).

* test_shred_destroys_dedicated_root_keys_and_a_restored_dump_cannot_decrypt: schedule, cancel,
  schedule again, the window elapses, destruction; the tenant's Transit key is gone from OpenBao
  and its AWS key pending deletion in moto; a pg_dump taken before the shred, restored into a
  second cluster with the same providers, cannot decrypt the Transit tenant (and, as
  shred_report says, can still decrypt a tenant under a shared root key).
* test_byok_revocation_takes_effect_within_the_providers_key_cache_ttl: two tenants under two
  customers' providers; customer A revokes pg_envelope's token in their KMS; A fails within its
  provider's key_cache_ttl (3 s) in a session that keeps reading, B keeps working.
"""

import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import psycopg
import pytest

from conftest import BIN, PORT_A, ROOT, SOCK, STATE, as_tenant, connect, recreate_db, sh

DB = "envelope_shred"
RESTORED = "envelope_shred_restored"
BAO = STATE / "openbao"
MOTO = STATE / "moto"
BAO_URL = "https://127.0.0.1:8200"


def sqlstate(conn, query, params=None):
    try:
        conn.execute(query, params)
        return None, ""
    except psycopg.Error as e:
        return e.sqlstate, str(e)


class BaoAdmin:
    """What the customer (or the operator) does in OpenBao, with the dev server's root token."""

    def __init__(self):
        self.ctx = ssl.create_default_context(cafile=str(BAO / "ca.pem"))
        self.root = (BAO / "root-token").read_text().strip()

    def call(self, method, path, body=None, token=None):
        req = urllib.request.Request(
            f"{BAO_URL}/v1/{path}", method=method, data=json.dumps(body).encode() if body is not None else None,
            headers={"X-Vault-Token": token or self.root},
        )
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=10) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            return e.code, None

    def key_with_token(self, key, can_delete):
        """A Transit key of its own and a token (in a 0600 file the server can read) allowed to
        use it and, when `can_delete`, to delete it: what a dedicated or customer key needs."""
        assert self.call("POST", f"transit/keys/{key}", {"type": "aes256-gcm96"})[0] in (200, 204)
        rules = [(f"transit/encrypt/{key}", '"update"'), (f"transit/decrypt/{key}", '"update"'),
                 (f"transit/keys/{key}", '"read", "delete"' if can_delete else '"read"')]
        if can_delete:
            rules.append((f"transit/keys/{key}/config", '"update"'))
        policy = "\n".join(f'path "{p}" {{ capabilities = [{c}] }}' for p, c in rules)
        assert self.call("PUT", f"sys/policies/acl/{key}", {"policy": policy})[0] in (200, 204)
        _, t = self.call("POST", "auth/token/create", {"policies": [key], "ttl": "1h", "no_default_policy": True})
        token = t["auth"]["client_token"]
        path = BAO / f"{key}.token"
        old = os.umask(0o077)
        try:
            path.write_text(token + "\n")
        finally:
            os.umask(old)
        subprocess.run(["chown", "postgres:postgres", str(path)], check=True)
        return token, path

    def key_exists(self, key):
        return self.call("GET", f"transit/keys/{key}")[0] == 200


def bao_options(key, token_file, **extra):
    return psycopg.types.json.Jsonb(
        {"url": BAO_URL, "key": key, "token_file": str(token_file), "ca_file": str(BAO / "ca.pem"), **extra}
    )


def moto_env():
    return dict(l.removeprefix("export ").split("=", 1) for l in (MOTO / "env").read_text().splitlines())


def moto_call(action, **params):
    """boto3 in moto's own venv (the test's interpreter has no AWS SDK)."""
    e = moto_env()
    code = (
        "import boto3, configparser, json, sys\n"
        "c = configparser.ConfigParser(); c.read(sys.argv[1]); d = c['default']\n"
        "k = boto3.client('kms', endpoint_url=sys.argv[2], region_name='us-east-1',"
        " aws_access_key_id=d['aws_access_key_id'], aws_secret_access_key=d['aws_secret_access_key'])\n"
        "print(json.dumps(getattr(k, sys.argv[3])(**json.loads(sys.argv[4])), default=str))\n"
    )
    out = subprocess.run(
        [str(STATE / "moto-venv/bin/python"), "-c", code, str(MOTO / "credentials"), e["MOTO_ENDPOINT"], action, json.dumps(params)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout)


def aws_options(key_id, **extra):
    e = moto_env()
    return psycopg.types.json.Jsonb({
        "key_id": key_id, "region": "us-east-1", "endpoint": e["MOTO_ENDPOINT"], "allow_insecure_http": True,
        "credentials_file": str(MOTO / "credentials"), **extra,
    })


@pytest.fixture(scope="module")
def servers():
    sh("bash", str(ROOT / "scripts/kms.sh"), "start-openbao")
    sh("bash", str(ROOT / "scripts/kms.sh"), "start-moto")
    yield BaoAdmin()
    sh("bash", str(ROOT / "scripts/kms.sh"), "start-openbao")  # a fresh server for the next module


def dump(dbname):
    return subprocess.run([f"{BIN}/pg_dump", "-h", SOCK, "-p", str(PORT_A), "-U", "postgres", "-Fc", dbname],
                          check=True, capture_output=True).stdout


def restore(blob, port, dbname):
    recreate_db(port, dbname)
    r = subprocess.run([f"{BIN}/pg_restore", "-h", SOCK, "-p", str(port), "-U", "postgres", "-d", dbname, "--exit-on-error"],
                       input=blob, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()


def in_key_table_files(conn, needle):
    """Whether `needle` occurs in the data files of envelope.tenants or envelope.data_keys (every
    fork and segment), read from the data directory."""
    datadir = conn.execute("SHOW data_directory").fetchone()[0]
    for rel in ("envelope.tenants", "envelope.data_keys"):
        base = os.path.join(datadir, conn.execute("SELECT pg_relation_filepath(%s)", (rel,)).fetchone()[0])
        d, stem = os.path.dirname(base), os.path.basename(base)
        for f in os.listdir(d):
            if f == stem or f.startswith(stem + ".") or f.startswith(stem + "_"):
                with open(os.path.join(d, f), "rb") as fh:
                    if needle in fh.read():
                        return True
    return False


def read_all(conn, tenant):
    with as_tenant(conn, tenant):
        return [r[0] for r in conn.execute("SELECT v::text FROM secrets WHERE tenant = %s ORDER BY id", (tenant,)).fetchall()]


def test_shred_destroys_dedicated_root_keys_and_a_restored_dump_cannot_decrypt(servers, cluster_b):
    bao = servers
    run = uuid.uuid4().hex[:8]
    acme_key, shared_key = f"shred-acme-{run}", f"shred-shared-{run}"
    _, acme_token = bao.key_with_token(acme_key, can_delete=True)
    _, shared_token = bao.key_with_token(shared_key, can_delete=False)
    initech_key = moto_call("create_key", Description=f"shred-initech-{run}")["KeyMetadata"]["KeyId"]
    recreate_db(PORT_A, DB)
    tenants = {"acme": "bao_acme", "initech": "aws_initech", "globex": "bao_shared", "hooli": "bao_shared"}
    with connect(PORT_A, DB) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        c.execute("SELECT envelope.add_key_provider('bao_acme', 'vault_transit', %s)", (bao_options(acme_key, acme_token, dedicated=True),))
        c.execute("SELECT envelope.add_key_provider('aws_initech', 'aws_kms', %s)", (aws_options(initech_key, dedicated=True),))
        c.execute("SELECT envelope.add_key_provider('bao_shared', 'vault_transit', %s)", (bao_options(shared_key, shared_token),))
        for t, p in tenants.items():
            c.execute("SELECT envelope.create_tenant(%s, provider => %s)", (t, p))
            c.execute("SELECT envelope.grant_tenant(%s, current_user)", (t,))
        # A dedicated provider serves one tenant.
        state, msg = sqlstate(c, "SELECT envelope.create_tenant('acme2', provider => 'bao_acme')")
        assert state == "55000" and 'dedicated to tenant "acme"' in msg
        state, _ = sqlstate(c, "SELECT envelope.rewrap_tenant('globex', 'aws_initech')")
        assert state == "55000"
        # A dedicated provider's root key is its own: no other provider may name it, either way.
        state, msg = sqlstate(c, "SELECT envelope.add_key_provider('bao_dup', 'vault_transit', %s)", (bao_options(acme_key, shared_token),))
        assert state == "42710" and '"bao_acme"' in msg, (state, msg)
        state, _ = sqlstate(c, "SELECT envelope.add_key_provider('bao_dup', 'vault_transit', %s)", (bao_options(shared_key, acme_token, dedicated=True),))
        assert state == "42710"
        state, _ = sqlstate(c, "SELECT envelope.add_key_provider('aws_dup', 'aws_kms', %s)",
                            (aws_options("arn:aws:kms:us-east-1:123456789012:key/" + initech_key),))
        assert state == "42710"
        state, _ = sqlstate(c, "SELECT envelope.add_key_provider('aws_alias', 'aws_kms', %s)", (aws_options("alias/whatever", dedicated=True),))
        assert state == "22023"
        c.execute("CREATE TABLE secrets (id serial PRIMARY KEY, tenant text, v envelope.encrypted_text)")
        for t in tenants:
            with as_tenant(c, t):
                c.execute("INSERT INTO secrets (tenant, v) SELECT %s, (%s || ' secret ' || g)::text FROM generate_series(1, 3) g", (t, t))
        before = {t: read_all(c, t) for t in tenants}
        report = c.execute("SELECT root_key, backups FROM envelope.shred_report('acme')").fetchone()
        assert report[0].startswith("dedicated") and "can no longer be unwrapped" in report[1]
    blob = dump(DB)  # the backup taken before the shred
    # The wrapped keys of hooli (under the shared root key) are in the key tables' data files.
    with connect(PORT_A, DB) as c:
        hooli_keys = [bytes(r[0]) for r in c.execute(
            "SELECT wrapped_key FROM envelope.tenants WHERE name = 'hooli' UNION ALL "
            "SELECT d.wrapped_key FROM envelope.data_keys d JOIN envelope.tenants t ON t.id = d.tenant_id WHERE t.name = 'hooli'").fetchall()]
        c.execute("CHECKPOINT")
        assert all(in_key_table_files(c, k) for k in hooli_keys), "control: the wrapped keys are not found in the data files"

    with connect(PORT_A, DB) as c:
        c.execute("SET envelope.shred_min_delay = 0")
        # Schedule, cancel, schedule again; a short window.
        c.execute("SELECT envelope.schedule_shred('acme', '1 hour')")
        assert sqlstate(c, "SELECT 1")[0] is None
        with as_tenant(c, "acme"):
            assert sqlstate(c, "SELECT v::text FROM secrets WHERE tenant = 'acme'")[0] == "57000"
        assert c.execute("SELECT envelope.cancel_shred('acme')").fetchone()[0] is True
        assert read_all(c, "acme") == before["acme"]
        for t in ("acme", "initech", "hooli"):
            c.execute("SELECT envelope.schedule_shred(%s, '2 seconds')", (t,))
        time.sleep(2.2)
        c.execute("CALL envelope.run_maintenance()")
        shreds = {r[0]: r[1:] for r in c.execute(
            "SELECT tenant, state, dedicated_root_key, kms_destruction, kms_last_error FROM envelope.shreds").fetchall()}
        assert shreds["acme"][:2] == ("shredded", True) and "deleted" in shreds["acme"][2] and shreds["acme"][3] is None, shreds
        assert shreds["initech"][:2] == ("shredded", True) and "pending deletion on" in shreds["initech"][2], shreds
        assert shreds["hooli"] == ("shredded", False, None, None), shreds
        report = dict(zip(("state", "kms", "backups"),
                          c.execute("SELECT state, kms_destruction, backups FROM envelope.shred_report('hooli')").fetchone()))
        assert report["state"] == "shredded" and "stay decryptable" in report["backups"] and "until those copies expire" in report["backups"]
        report = c.execute("SELECT kms_destruction, backups FROM envelope.shred_report('acme')").fetchone()
        assert "deleted" in report[0] and "can no longer be unwrapped" in report[1]

    # The old row versions that held the wrapped keys leave the data files once the key tables
    # are rewritten (the maintenance does it when no transaction older than the shred runs).
    with connect(PORT_A, DB) as c:
        deadline = time.monotonic() + 20
        while c.execute("SELECT count(*) FROM envelope.shreds WHERE state = 'shredded' AND keys_compacted_at IS NULL").fetchone()[0]:
            assert time.monotonic() < deadline, "the key tables were not rewritten"
            time.sleep(0.5)
            c.execute("CALL envelope.run_maintenance()")
        c.execute("CHECKPOINT")
        left = [k for k in hooli_keys if in_key_table_files(c, k)]
        assert not left, f"{len(left)} wrapped key(s) of the shredded tenant still in the key tables' data files"
        assert "Old row versions" not in c.execute("SELECT backups FROM envelope.shred_report('hooli')").fetchone()[0]

    # The key servers: the Transit key is gone, the AWS key pending deletion.
    assert not bao.key_exists(acme_key) and bao.key_exists(shared_key)
    assert moto_call("describe_key", KeyId=initech_key)["KeyMetadata"]["KeyState"] == "PendingDeletion"

    # Every value of a shredded tenant fails with the shredded error in fresh backends; the
    # others are unaffected.
    with connect(PORT_A, DB) as c:
        for t in ("acme", "initech", "hooli"):
            with as_tenant(c, t):
                state, msg = sqlstate(c, "SELECT v::text FROM secrets WHERE tenant = %s", (t,))
                assert state == "42704" and "crypto-shredded" in msg, (t, state, msg)
        assert read_all(c, "globex") == before["globex"]

    # The backup from before the shred, restored into a second cluster with the same providers
    # (the same key servers, the same credentials).
    restore(blob, cluster_b, RESTORED)
    with connect(cluster_b, RESTORED) as c:
        assert read_all(c, "globex") == before["globex"], "the restore works for a live tenant"
        with as_tenant(c, "acme"):
            state, msg = sqlstate(c, "SELECT v::text FROM secrets WHERE tenant = 'acme'")
        assert state == "28000" and "does not exist" in msg, (state, msg)
        # hooli's root key is shared and was not destroyed: as shred_report said, the old backup
        # still decrypts it.
        assert read_all(c, "hooli") == before["hooli"]
        # initech: real AWS KMS refuses a key pending deletion (KMSInvalidStateException, a
        # denial: unit-tested in the core crate); moto 5.x does not enforce the state.
        with as_tenant(c, "initech"):
            state, msg = sqlstate(c, "SELECT v::text FROM secrets WHERE tenant = 'initech'")
        assert state is None or (state == "28000" and "KMSInvalidStateException" in msg), (state, msg)

    # The KMS step is retried until it succeeds: a dedicated key whose token may not delete it.
    with connect(PORT_A, DB) as c:
        nodel_key = f"shred-nodelete-{run}"
        _, nodel_token = bao.key_with_token(nodel_key, can_delete=False)
        c.execute("SELECT envelope.add_key_provider('bao_nodel', 'vault_transit', %s)", (bao_options(nodel_key, nodel_token, dedicated=True),))
        c.execute("SELECT envelope.create_tenant('umbrella', provider => 'bao_nodel')")
        c.execute("SET envelope.shred_min_delay = 0")
        c.execute("SELECT envelope.schedule_shred('umbrella', '1 second')")
        time.sleep(1.2)
        c.execute("CALL envelope.run_maintenance()")
        kms, err = c.execute("SELECT kms_destruction, kms_last_error FROM envelope.shreds WHERE tenant = 'umbrella'").fetchone()
        assert kms == "pending" and "HTTP 403" in err, (kms, err)
        assert c.execute("SELECT count(*) FROM envelope.maintenance_due() WHERE action = 'destroy_root_key'").fetchone()[0] == 1
        backups = c.execute("SELECT backups FROM envelope.shred_report('umbrella')").fetchone()[0]
        assert "destruction pending" in backups
        # The operator fixes the policy; the next maintenance run destroys the key.
        policy = bao.call("GET", f"sys/policies/acl/{nodel_key}")[1]["data"]["policy"]
        policy = policy.replace('"read"]', '"read", "delete"]') + f'\npath "transit/keys/{nodel_key}/config" {{ capabilities = ["update"] }}'
        bao.call("PUT", f"sys/policies/acl/{nodel_key}", {"policy": policy})
        c.execute("CALL envelope.run_maintenance()")
        kms, err = c.execute("SELECT kms_destruction, kms_last_error FROM envelope.shreds WHERE tenant = 'umbrella'").fetchone()
        assert "deleted" in kms and err is None, (kms, err)
        assert not bao.key_exists(nodel_key)


def test_byok_revocation_takes_effect_within_the_providers_key_cache_ttl(servers):
    bao = servers
    run = uuid.uuid4().hex[:8]
    a_key, b_key = f"byok-a-{run}", f"byok-b-{run}"
    a_token, a_file = bao.key_with_token(a_key, can_delete=False)
    _, b_file = bao.key_with_token(b_key, can_delete=False)
    db = "envelope_byok"
    recreate_db(PORT_A, db)
    with connect(PORT_A, db) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        # Customer A's own KMS key and credentials, cached for at most 3 s; customer B's, with the
        # server's TTL (1 h). A provider cannot lengthen the server's TTL.
        c.execute("SELECT envelope.add_key_provider('cust_a', 'vault_transit', %s)", (bao_options(a_key, a_file, key_cache_ttl="3s"),))
        c.execute("SELECT envelope.add_key_provider('cust_b', 'vault_transit', %s)", (bao_options(b_key, b_file, key_cache_ttl="2d"),))
        for t, p in (("byok_a", "cust_a"), ("byok_b", "cust_b")):
            c.execute("SELECT envelope.create_tenant(%s, provider => %s)", (t, p))
            c.execute("SELECT envelope.grant_tenant(%s, current_user)", (t,))
        c.execute("CREATE TABLE secrets (id serial PRIMARY KEY, tenant text, v envelope.encrypted_text)")
        for t in ("byok_a", "byok_b"):
            with as_tenant(c, t):
                c.execute("INSERT INTO secrets (tenant, v) VALUES (%s, (%s || ' data')::text)", (t, t))

    with connect(PORT_A, db) as reader:
        assert read_all(reader, "byok_a") == ["byok_a data"] and read_all(reader, "byok_b") == ["byok_b data"]
        # Each entry expires by its provider's TTL, capped by the server's: A in 3 s, B in 1 h (its
        # provider asked for 2 days: a provider cannot lengthen the DBA's setting).
        left = dict(reader.execute("SELECT tenant, expires_in_seconds FROM envelope.key_cache()").fetchall())
        assert 0 < left["byok_a"] <= 3 and 3000 < left["byok_b"] <= 3600, left
        # Customer A revokes pg_envelope's access in their KMS.
        revoked_at = time.monotonic()
        assert bao.call("POST", "auth/token/revoke", {"token": a_token})[0] in (200, 204)
        failed_after = None
        b_reads = 0
        while time.monotonic() - revoked_at < 10:
            state, msg = sqlstate(reader, "SELECT set_config('app.tenant_id', 'byok_a', false), (SELECT v::text FROM secrets WHERE tenant = 'byok_a')")
            if state is not None:
                failed_after = time.monotonic() - revoked_at
                assert state == "28000" and "cust_a" in msg and "403" in msg, (state, msg)
                break
            assert read_all(reader, "byok_b") == ["byok_b data"]
            b_reads += 1
            time.sleep(0.1)
        assert failed_after is not None, "customer A's revocation never took effect"
        assert failed_after <= 3.0 + 0.5, f"took {failed_after:.2f} s, past the provider's key_cache_ttl of 3 s"
        # A denial is never served from the stale cache: it stays refused, and B keeps working.
        for _ in range(3):
            with as_tenant(reader, "byok_a"):
                assert sqlstate(reader, "SELECT v::text FROM secrets WHERE tenant = 'byok_a'")[0] == "28000"
        assert read_all(reader, "byok_b") == ["byok_b data"]
    out = STATE / "byok-revocation.json"
    try:
        out.write_text(json.dumps({"provider_key_cache_ttl_s": 3, "refused_after_s": round(failed_after, 3), "other_tenant_reads_meanwhile": b_reads}))
    except OSError:
        pass
    print(f"BYOK: customer A's revocation refused after {failed_after:.2f} s (key_cache_ttl 3 s); B read {b_reads} times meanwhile")
