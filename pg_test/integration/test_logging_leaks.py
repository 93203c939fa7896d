"""Maximal logging and temporary files: where secrets go when every log PostgreSQL has is on
(security checklist items 19 and 22).

The module runs its own PostgreSQL 15 cluster (instance `pg15-leak`, port 54340 on the project's
socket directory only: no TCP listener, see SERVER_CONF) and its own key servers, so that nothing else writes into the logs
it scans and nothing it does disturbs other tests:

* OpenBao in dev mode (in memory, plain http) on 127.0.0.1:8240: a Transit key for tenant keys, an
  HMAC key for the audit trail's checkpoints, a limited token in a file and AppRole credentials
  (role id, secret id) in files; the root token stays in this process;
* moto (AWS KMS emulator) on 127.0.0.1:5080 with SigV4 signatures checked: an IAM user's access
  key and secret key in an AWS credentials file;
* SoftHSM2 with a token directory of its own (the postmaster's SOFTHSM2_CONF points to it), the
  user PIN in a file, and an AES-256 key imported from bytes this test knows (sensitive, so the
  HSM never gives it back), so that the HSM's root key and every tenant key it wraps can be
  computed here and searched for;
* the `local` provider's root key file.

Logging: everything at once (see `SERVER_CONF`): log_statement = all, log_min_messages and
log_min_error_statement = debug5, log_error_verbosity = verbose, log_min_duration_statement = 0,
log_duration, connections and disconnections; auto_explain for every statement, nested ones
included, with ANALYZE, VERBOSE, buffers, settings, triggers and WAL; pg_stat_statements tracking
every statement and utility commands; the logging collector writing stderr, csvlog and jsonlog.
PostgreSQL 15 has no auto_explain.log_parameter_max_length (16 added it).

Plus the README's documented mitigations (section "Rules of the road", "Logging"):
log_parameter_max_length = 0 and log_parameter_max_length_on_error = 0. And one more, found by
this test (see `test_postgresql_prints_plaintext_where_the_docs_say_it_does`): plan_cache_mode =
force_generic_plan in sessions that send plaintext or decrypt into PL/pgSQL variables that later
queries use, because auto_explain prints a custom plan, and a custom plan has the parameter
values folded in as constants.

What is searched for, and must not be found (`test_maximal_logging_leaks_no_key_credential_or_plaintext`):

* key material: the local root key, the HSM's root key, every tenant key (unwrapped here: local
  and HSM with keyscan.py, OpenBao with Transit decrypt under the root token, AWS with KMS
  Decrypt), every data key and every blind-index key, as raw bytes, hex, base64 (standard and
  URL-safe, padded or not, and aligned at any offset inside a longer base64 string);
* credentials: the OpenBao token, root token, AppRole role id and secret id, the AWS secret key,
  the HSM user and SO PINs;
* decrypted values: canaries (random UUID strings) stored beforehand from a session with every
  log off, decrypted many ways with every log on, never sent by the client again;

in every log file of the cluster (stderr, csvlog, jsonlog), pg_stat_statements, snapshots of
pg_stat_activity taken from another connection while statements run, the audit trail
(audit_log, audit_events, audit_alerts, audit_checkpoints, audit_export), envelope.status(), the
client-visible notices and error messages. A positive control (a marker sent as a literal, so
log_statement must log it, and a marker passed through a PL/pgSQL RAISE LOG) must be found in
every kind of source, so the scan cannot pass by looking at nothing.

Every function of schema `envelope` is called at least once (the test fails when a new one
appears that it does not call), with its error paths.

Temporary files (`test_spilling_sort_writes_decrypted_values_to_temp_files`): a sort of decrypted
values under work_mem = 64kB spills to base/pgsql_tmp, and the decrypted canaries are in those
files in plain text. PostgreSQL does not encrypt temporary files; pg_envelope cannot reach them.
The test asserts that they do (so the advice in docs/threat-model.md, temp_tablespaces on
encrypted storage, stays needed) and that temp_file_limit = 0 refuses such a query instead.
"""

import base64
import json
import os
import re
import secrets as pysecrets
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.types.json import Jsonb

import keyscan
import leakscan
from conftest import BIN, SOCK, STATE, TextDumper, sh
from leakscan import Secret

PORT = 54340
INSTANCE = "pg15-leak"
BASE = STATE / INSTANCE
PGDATA = BASE / "data"
SECRETS = BASE / "secrets"          # envelope.credential_dirs of this cluster
DB = "leakdb"
BAO_PORT = 8240
MOTO_PORT = 5080
BAO_BIN = STATE / "bao-venv" / "bin" / "bao"
MOTO_SERVER = STATE / "moto-venv" / "bin" / "moto_server"
MOTO_PY = STATE / "moto-venv" / "bin" / "python"
HSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
APP = "leak_app"          # granted the tenants
NOGRANT = "leak_nogrant"  # may log in, holds no grant
ADMIN2 = "leak_admin2"    # a second key administrator (confirm_shred)

# The documented mitigations (README, "Rules of the road" / "Logging") ...
MITIGATIONS = {
    "log_parameter_max_length": "0",
    "log_parameter_max_length_on_error": "0",
}

# ... and one this test found necessary (README's advice does not cover auto_explain): a custom
# plan has its parameters folded in as constants, and auto_explain prints the plan, so bind
# parameters and PL/pgSQL variables holding decrypted values reach the log (see
# test_postgresql_prints_plaintext_where_the_docs_say_it_does). Generic plans keep them as $n.
PROPOSED_MITIGATIONS = {
    "plan_cache_mode": "force_generic_plan",
}

# ... on top of every log PostgreSQL 15 can write.
SERVER_CONF = {
    # Unix socket only: TCP port 54340 lies in Linux's ephemeral port range (32768-60999), and on
    # this busy machine other tests' loopback connections held it as their local port for many
    # seconds at a time ("could not bind 127.0.0.1: Address already in use").
    "listen_addresses": "''",
    "port": str(PORT),
    "unix_socket_directories": f"'{SOCK}'",
    "shared_preload_libraries": "'pg_envelope,auto_explain,pg_stat_statements'",
    "max_connections": "50",
    "fsync": "off",
    "logging_collector": "on",
    "log_destination": "'stderr,csvlog,jsonlog'",
    "log_directory": "'log'",
    "log_filename": "'postgresql-%Y%m%d_%H%M%S.log'",
    "log_rotation_age": "0",
    "log_rotation_size": "0",
    "log_file_mode": "0600",
    "log_statement": "'all'",
    "log_min_messages": "debug5",
    "log_min_error_statement": "debug5",
    "client_min_messages": "notice",
    "log_error_verbosity": "verbose",
    "log_min_duration_statement": "0",
    "log_duration": "on",
    "log_connections": "on",
    "log_disconnections": "on",
    "log_lock_waits": "on",
    "log_temp_files": "0",
    "log_autovacuum_min_duration": "0",
    "log_checkpoints": "on",
    "log_replication_commands": "on",
    "log_line_prefix": "'%m [%p] %q%u@%d/%a %v %x '",
    "auto_explain.log_min_duration": "0",
    "auto_explain.log_analyze": "on",
    "auto_explain.log_verbose": "on",
    "auto_explain.log_buffers": "on",
    "auto_explain.log_wal": "on",
    "auto_explain.log_triggers": "on",
    "auto_explain.log_settings": "on",
    "auto_explain.log_nested_statements": "on",
    "auto_explain.log_level": "log",
    "pg_stat_statements.track": "all",
    "pg_stat_statements.track_utility": "on",
    "pg_stat_statements.track_planning": "on",
    "track_functions": "'all'",  # pg_stat_user_functions: which envelope functions ran
    "track_activity_query_size": "16384",
    "envelope.database": f"'{DB}'",
    "envelope.audit": "on",
    "envelope.audit_checkpoint_interval": "2",
    "envelope.audit_checkpoint_provider": "'bao'",
    "envelope.maintenance_naptime": "1",
    "envelope.shred_min_delay": "0",
    "envelope.credential_dirs": f"'{SECRETS}'",
    "envelope.pkcs11_modules": f"'{HSM_MODULE}'",
    "envelope.local_root_key_file": f"'{SECRETS / 'root.key'}'",
    **MITIGATIONS,
    **PROPOSED_MITIGATIONS,
}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def wait_until(pred, timeout, step=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def connect(dbname=DB, user="postgres", **kw):
    conn = psycopg.connect(host=SOCK, port=PORT, dbname=dbname, user=user, autocommit=True, connect_timeout=10, **kw)
    conn.adapters.register_dumper(str, TextDumper)
    return conn


def http_json(method, url, body=None, headers=None, timeout=15):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def write_secret_file(path: Path, text: str, owner="postgres"):
    path.parent.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)
    try:
        path.write_text(text)
    finally:
        os.umask(old)
    shutil.chown(path, owner, owner)


def kill_pidfile(pidfile: Path, name: bytes):
    """A leftover server of an interrupted run of this module, by its pid file (and only if
    that pid still runs `name`)."""
    try:
        pid = int(pidfile.read_text())
        if name in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, what=f"old {name.decode()} to exit")
    except (ValueError, FileNotFoundError, ProcessLookupError):
        pass
    pidfile.unlink(missing_ok=True)


def stop_proc(proc, pidfile: Path):
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    pidfile.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Key servers of this module's own
# --------------------------------------------------------------------------------------------


class Bao:
    """OpenBao dev server (in memory) on 127.0.0.1:8240, plain http (allow_insecure_http)."""

    def __init__(self):
        self.addr = f"http://127.0.0.1:{BAO_PORT}"
        self.dir = BASE / "openbao"
        self.cred = SECRETS / "openbao"
        self.root_token = f"root-{uuid.uuid4().hex}"
        self.proc = None

    def api(self, method, path, body=None):
        return http_json(method, f"{self.addr}/v1/{path}", body, {"X-Vault-Token": self.root_token})

    def start(self):
        kill_pidfile(self.dir / "pid", b"bao")
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "server.log", "wb")
        self.proc = subprocess.Popen(
            [str(BAO_BIN), "server", "-dev", f"-dev-root-token-id={self.root_token}",
             f"-dev-listen-address=127.0.0.1:{BAO_PORT}", "-dev-no-store-token"],
            stdout=log, stderr=log, start_new_session=True)
        (self.dir / "pid").write_text(str(self.proc.pid))

        def up():
            try:
                self.api("GET", "sys/health")
                return True
            except (OSError, urllib.error.HTTPError):
                return False

        wait_until(up, 60, what="OpenBao to answer")
        self.api("POST", "sys/mounts/transit", {"type": "transit"})
        self.api("POST", "transit/keys/leak-root", {"type": "aes256-gcm96"})
        self.api("POST", "transit/keys/leak-root-2", {"type": "aes256-gcm96"})
        self.api("POST", "transit/keys/pg-audit", {"type": "hmac", "key_size": 32})
        rules = [("encrypt/leak-root*", "update"), ("decrypt/leak-root*", "update"), ("keys/leak-root*", "read"),
                 ("hmac/pg-audit/*", "update"), ("verify/pg-audit/*", "update")]
        policy = "\n".join(f'path "transit/{p}" {{ capabilities = ["{c}"] }}' for p, c in rules)
        self.api("PUT", "sys/policies/acl/leak-envelope", {"policy": policy})
        self.token = self.api("POST", "auth/token/create",
                              {"policies": ["leak-envelope"], "ttl": "2h", "no_default_policy": True})["auth"]["client_token"]
        self.api("POST", "sys/auth/approle", {"type": "approle"})
        self.api("POST", "auth/approle/role/leak", {"token_policies": ["leak-envelope"], "token_ttl": "5m"})
        self.role_id = self.api("GET", "auth/approle/role/leak/role-id")["data"]["role_id"]
        self.secret_id = self.api("POST", "auth/approle/role/leak/secret-id", {})["data"]["secret_id"]
        write_secret_file(self.cred / "token", self.token + "\n")
        write_secret_file(self.cred / "role-id", self.role_id + "\n")
        write_secret_file(self.cred / "secret-id", self.secret_id + "\n")
        return self

    def stop(self):
        stop_proc(self.proc, self.dir / "pid")

    def options(self, approle=False, key="leak-root"):
        o = {"url": self.addr, "key": key, "allow_insecure_http": True, "hmac_key": "pg-audit"}
        if approle:
            o.update(role_id_file=str(self.cred / "role-id"), secret_id_file=str(self.cred / "secret-id"))
        else:
            o["token_file"] = str(self.cred / "token")
        return Jsonb(o)

    def unwrap(self, tenant, tenant_key_id, wrapped: bytes) -> bytes:
        aad = keyscan.wrap_aad_tenant_key(tenant, tenant_key_id)
        out = self.api("POST", "transit/decrypt/leak-root",
                       {"ciphertext": wrapped.decode(), "associated_data": base64.b64encode(aad).decode()})
        return base64.b64decode(out["data"]["plaintext"])

    def secrets(self):
        return [Secret("openbao token", "credential", self.token.encode()),
                Secret("openbao root token", "credential", self.root_token.encode()),
                Secret("openbao approle role id", "credential", self.role_id.encode()),
                Secret("openbao approle secret id", "credential", self.secret_id.encode())]


class Moto:
    """moto on 127.0.0.1:5080 with SigV4 signatures checked after the first four (bootstrap)
    requests: an IAM user allowed kms:*, its access key, one KMS key."""

    def __init__(self):
        self.endpoint = f"http://127.0.0.1:{MOTO_PORT}"
        self.dir = BASE / "moto"
        self.credentials = SECRETS / "moto" / "credentials"
        self.proc = None

    def start(self):
        kill_pidfile(self.dir / "pid", b"moto_server")
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "server.log", "wb")
        self.proc = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(MOTO_PORT)], stdout=log, stderr=log,
                                     env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="4"), start_new_session=True)
        (self.dir / "pid").write_text(str(self.proc.pid))

        def up():
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2)
                return True
            except OSError:
                return False

        wait_until(up, 60, what="moto to listen")
        out = sh(str(MOTO_PY), "-c", MOTO_BOOTSTRAP, self.endpoint, timeout=60).stdout
        v = json.loads(out)
        self.access_key, self.secret_key, self.key_id = v["access_key"], v["secret_key"], v["key_id"]
        write_secret_file(self.credentials,
                          f"[default]\naws_access_key_id = {self.access_key}\naws_secret_access_key = {self.secret_key}\n")
        return self

    def stop(self):
        stop_proc(self.proc, self.dir / "pid")

    def options(self):
        return Jsonb({"key_id": self.key_id, "region": "us-east-1", "endpoint": self.endpoint,
                      "allow_insecure_http": True, "credentials_file": str(self.credentials)})

    def unwrap(self, tenant, tenant_key_id, wrapped: bytes) -> bytes:
        out = sh(str(MOTO_PY), "-c", MOTO_DECRYPT, self.endpoint, self.access_key, self.secret_key, wrapped.hex(),
                 tenant, str(tenant_key_id), timeout=60).stdout
        return bytes.fromhex(out.strip())

    def secrets(self):
        return [Secret("aws secret access key", "credential", self.secret_key.encode())]


MOTO_BOOTSTRAP = r"""
import json, sys, boto3
url = sys.argv[1]
anon = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
iam = boto3.client("iam", **anon)
iam.create_user(UserName="leak")
iam.put_user_policy(UserName="leak", PolicyName="kms", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="leak")["AccessKey"]
kid = boto3.client("kms", **anon).create_key(Description="leak-root")["KeyMetadata"]["KeyId"]
print(json.dumps({"access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"], "key_id": kid}))
"""

MOTO_DECRYPT = r"""
import sys, boto3
url, ak, sk, blob, tenant, tid = sys.argv[1:]
k = boto3.client("kms", endpoint_url=url, region_name="us-east-1", aws_access_key_id=ak, aws_secret_access_key=sk)
out = k.decrypt(CiphertextBlob=bytes.fromhex(blob),
                EncryptionContext={"pg_envelope_tenant": tenant, "pg_envelope_tenant_key_id": tid})
print(out["Plaintext"].hex())
"""


class Hsm:
    """A SoftHSM2 token in a directory of this module's own. The AES-256 key is imported from
    random bytes kept here (sensitive: the HSM will not give it back), so that tenant keys it
    wraps can be unwrapped here (the pkcs11 provider's stored form is keyscan's v1 wrap)."""

    def __init__(self):
        self.dir = SECRETS / "softhsm"
        self.conf = self.dir / "softhsm2.conf"
        self.pin_file = self.dir / "pin"

    def start(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "tokens").mkdir(parents=True)
        os.chmod(self.dir, 0o755)
        self.conf.write_text(f"directories.tokendir = {self.dir}/tokens\nobjectstore.backend = file\n"
                             "log.level = ERROR\nslots.removable = false\nlibrary.reset_on_fork = true\n")
        os.chmod(self.conf, 0o644)
        env = {"SOFTHSM2_CONF": str(self.conf)}
        self.pin = pysecrets.token_hex(12)
        self.so_pin = pysecrets.token_hex(12)
        sh("softhsm2-util", "--init-token", "--free", "--label", "leak-envelope", "--so-pin", self.so_pin,
           "--pin", self.pin, env=env, timeout=60)
        self.root_key = os.urandom(32)
        keyfile = self.dir / "import.bin"
        keyfile.write_bytes(self.root_key)
        try:
            sh("pkcs11-tool", "--module", HSM_MODULE, "--token-label", "leak-envelope", "--login", "--pin", self.pin,
               "--write-object", str(keyfile), "--type", "secrkey", "--key-type", "AES:32", "--label", "leak-kek",
               "--sensitive", "--usage-decrypt", env=env, timeout=60)
        finally:
            keyfile.unlink()
        write_secret_file(self.pin_file, self.pin + "\n")
        sh("chown", "-R", "postgres:postgres", str(self.dir / "tokens"))
        return self

    def options(self):
        return Jsonb({"module": HSM_MODULE, "token_label": "leak-envelope", "key_label": "leak-kek",
                      "pin_file": str(self.pin_file)})

    def unwrap(self, tenant, tenant_key_id, wrapped: bytes) -> bytes:
        return keyscan.unwrap_key(self.root_key, keyscan.wrap_aad_tenant_key(tenant, tenant_key_id), wrapped)

    def secrets(self):
        return [Secret("hsm user pin", "credential", self.pin.encode()),
                Secret("hsm so pin", "credential", self.so_pin.encode()),
                Secret("hsm root key", "key", self.root_key)]


# --------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------


def as_postgres(*args, env=None, timeout=120):
    envs = [f"{k}={v}" for k, v in (env or {}).items()]
    return sh("sudo", "-u", "postgres", "-H", "--", "env", "-u", "RUST_BACKTRACE", *envs, *args, timeout=timeout)


class Cluster:
    def __init__(self, hsm_conf: Path):
        self.env = {"SOFTHSM2_CONF": str(hsm_conf)}

    def pg_ctl(self, *args, timeout=120):
        return as_postgres(f"{BIN}/pg_ctl", "-D", str(PGDATA), *args, env=self.env, timeout=timeout)

    def running(self):
        return (PGDATA / "postmaster.pid").exists() and sh(
            "sudo", "-u", "postgres", "--", f"{BIN}/pg_ctl", "-D", str(PGDATA), "status", check=False).returncode == 0

    def stop(self):
        if self.running():
            self.pg_ctl("-w", "-m", "fast", "stop", timeout=60)

    def init(self, root_key: bytes):
        if PGDATA.exists():
            self.stop()
            shutil.rmtree(PGDATA)
        sh("install", "-d", "-o", "postgres", "-g", "postgres", "-m", "0700", str(PGDATA))
        as_postgres(f"{BIN}/initdb", "-D", str(PGDATA), "-U", "postgres", "--auth-local=trust",
                    "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")
        (BASE / "startup.log").unlink(missing_ok=True)
        (SECRETS / "root.key").unlink(missing_ok=True)
        old = os.umask(0o077)
        try:
            (SECRETS / "root.key").write_bytes(root_key)
        finally:
            os.umask(old)
        shutil.chown(SECRETS / "root.key", "postgres", "postgres")
        conf = "".join(f"{k} = {v}\n" for k, v in SERVER_CONF.items())
        (PGDATA / "pg_leak.conf").write_text("# Written by test_logging_leaks.py\n" + conf)
        shutil.chown(PGDATA / "pg_leak.conf", "postgres", "postgres")
        with open(PGDATA / "postgresql.conf", "a") as f:
            f.write("include = 'pg_leak.conf'\n")

    def start(self):
        for attempt in range(3):
            try:
                self.pg_ctl("-w", "-t", "60", "-l", str(BASE / "startup.log"), "start")
                break
            except subprocess.CalledProcessError:
                if attempt == 2:
                    raise
                time.sleep(1)
        wait_until(self.accepts, 60, 0.2, "the leak cluster to accept connections")

    def accepts(self):
        try:
            with connect("postgres") as c:
                # (SHOW: before 47d6a23, with envelope.audit = on, a statement through the
                # executor in a database without pg_envelope failed with XX000; test_audit.py
                # now covers that)
                return c.execute("SHOW server_version").fetchone() is not None
        except psycopg.Error:
            return False

    def log_files(self):
        """Every file the server logged to: the logging collector's stderr, csvlog and jsonlog
        files and pg_ctl's startup log. Read as root (mode 0600, owned by postgres)."""
        files = sorted((PGDATA / "log").glob("*")) + [BASE / "startup.log"]
        return [f for f in files if f.is_file()]


# --------------------------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------------------------

QUIET = [  # a session that logs nothing (superuser settings): how the canaries are stored
    "SET log_statement = 'none'", "SET log_min_duration_statement = -1", "SET log_duration = off",
    "SET log_min_messages = panic", "SET log_min_error_statement = panic", "SET auto_explain.log_min_duration = -1",
    "SET pg_stat_statements.track = 'none'", "SET pg_stat_statements.track_utility = off",
]


class Recorder:
    """What clients saw: notices and error messages (they must not carry secrets either), and
    the SQLSTATE of every expected error."""

    def __init__(self):
        self.texts = []
        self.errors = {}

    def attach(self, conn):
        conn.add_notice_handler(lambda d: self.texts.append(
            " | ".join(str(x) for x in (d.severity, d.sqlstate, d.message_primary, d.message_detail, d.message_hint, d.context) if x)))
        return conn

    def expect_error(self, conn, label, states, query, params=None):
        """Runs a statement that must fail with one of `states`; keeps the message."""
        states = (states,) if isinstance(states, str) else states
        try:
            with conn.transaction():  # a savepoint inside a transaction
                conn.execute(query, params)
        except psycopg.Error as e:
            d = e.diag
            self.texts.append(" | ".join(str(x) for x in (e.sqlstate, d.message_primary, d.message_detail, d.message_hint, d.context) if x))
            assert e.sqlstate in states, f"{label}: expected {states}, got {e.sqlstate}: {e}"
            self.errors[label] = e.sqlstate
            return e.sqlstate
        raise AssertionError(f"{label}: expected an error {states}, the statement succeeded")


def app(recorder, user=APP):
    return recorder.attach(connect(user=user, application_name="leak-app"))


def admin(recorder):
    return recorder.attach(connect(application_name="leak-admin"))


def in_tenant(conn, tenant):
    """A transaction with the tenant set (set_config(..., true): SET LOCAL)."""
    tx = conn.transaction()
    tx.__enter__()
    conn.execute("SELECT set_config('app.tenant_id', %s, true)", (tenant,))
    return tx


class Tx:
    def __init__(self, conn, tenant, **settings):
        self.conn, self.tenant, self.settings = conn, tenant, settings

    def __enter__(self):
        self.tx = self.conn.transaction()
        self.tx.__enter__()
        self.conn.execute("SELECT set_config('app.tenant_id', %s, true)", (self.tenant,))
        for k, v in self.settings.items():
            self.conn.execute("SELECT set_config(%s, %s, true)", (k.replace("__", "."), str(v)))
        return self.conn

    def __exit__(self, *exc):
        return self.tx.__exit__(*exc)


class ActivityMonitor:
    """Another connection that keeps reading pg_stat_activity while the exercise runs."""

    def __init__(self):
        self.conn = connect(application_name="leak-monitor")
        self.conn.execute("SET log_statement = 'none'")  # its own polling need not flood the log
        self.conn.execute("SET auto_explain.log_min_duration = -1")
        self.conn.execute("SET log_min_duration_statement = -1")
        self.seen = set()
        self.samples = 0
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop_flag.is_set():
            try:
                rows = self.conn.execute(
                    "SELECT pid, usename, application_name, state, backend_type, wait_event, query "
                    "FROM pg_stat_activity WHERE pid <> pg_backend_pid()").fetchall()
            except psycopg.Error:
                continue
            self.samples += 1
            for r in rows:
                self.seen.add(" | ".join("" if x is None else str(x) for x in r))
            time.sleep(0.01)

    def stop(self):
        self.stop_flag.set()
        self.thread.join(10)
        self.conn.close()
        return "\n".join(sorted(self.seen))


# --------------------------------------------------------------------------------------------
# The module's fixture: servers, cluster, schema, canaries
# --------------------------------------------------------------------------------------------

TENANTS = {  # tenant -> provider
    "t_local": "local",
    "t_bao": "bao",
    "t_approle": "bao_approle",
    "t_aws": "aws",
    "t_hsm": "hsm",
}
EXTRA_TENANTS = {"t_rot": "local", "t_shred": "local", "t_idle": "hsm"}

TABLE_DDL = """
CREATE TABLE vault (
  id     int PRIMARY KEY,
  tenant text NOT NULL DEFAULT envelope.authorized_tenant(),
  t      envelope.encrypted_text,
  j      envelope.encrypted_jsonb,
  n      envelope.encrypted_numeric,
  i      envelope.encrypted_int8,
  d      envelope.encrypted_date,
  ts     envelope.encrypted_timestamptz,
  b      envelope.encrypted_bytea,
  f      bytea,
  t_idx  envelope.blind_index
);
CREATE INDEX vault_t_idx ON vault (tenant, t_idx);
CREATE TRIGGER vault_t_idx BEFORE INSERT OR UPDATE ON vault FOR EACH ROW
  EXECUTE FUNCTION envelope.blind_index_trigger('t', 't_idx', 'vault.t');
ALTER TABLE vault ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON vault
  USING (tenant = envelope.authorized_tenant())
  WITH CHECK (tenant = envelope.authorized_tenant() AND envelope.belongs_to(t, tenant));
GRANT SELECT, INSERT, UPDATE, DELETE ON vault TO leak_app, leak_nogrant;
"""


class Env:
    pass


def random_digits(n):
    return str(pysecrets.randbelow(9 * 10 ** (n - 1)) + 10 ** (n - 1))


def make_canaries(tenant):
    """One canary per column kind for one tenant. Numbers are long random digit strings, so a
    hit in a log is no accident."""
    u = uuid.uuid4().hex
    return {
        "t": f"CANARY-T-{tenant}-{u}",
        "j": f"CANARY-J-{tenant}-{uuid.uuid4().hex}",
        "n": random_digits(28) + "." + random_digits(6),
        "i": random_digits(18),
        "b": f"CANARY-B-{tenant}-{uuid.uuid4().hex}",
        "f": f"CANARY-F-{tenant}-{uuid.uuid4().hex}",
    }


def store_quietly(env, rows):
    """Stores canaries from a session that logs nothing and is not counted by
    pg_stat_statements; bind parameters (extended protocol)."""
    with connect(application_name="leak-quiet") as c:
        for s in QUIET:
            c.execute(s)
        for rid, tenant, cv in rows:
            with Tx(c, tenant):
                c.execute(
                    "INSERT INTO vault (id, tenant, t, j, n, i, d, ts, b, f) VALUES "
                    "(%s, %s, %s::text, jsonb_build_object('secret', %s::text), %s::numeric, %s::bigint, "
                    " date '2020-01-01' + %s::int, timestamptz '2020-01-01' + %s::int * interval '1 second', "
                    " convert_to(%s::text, 'UTF8'), envelope.encrypt_field(%s::text, 'vault.f/' || %s))",
                    (rid, tenant, cv["t"], cv["j"], cv["n"], cv["i"], rid, rid, cv["b"], cv["f"], rid))


@pytest.fixture(scope="module")
def env():
    e = Env()
    e.started = []
    sh("install", "-d", "-o", "postgres", "-g", "postgres", "-m", "0755", str(BASE))
    shutil.rmtree(SECRETS, ignore_errors=True)
    sh("install", "-d", "-o", "root", "-g", "root", "-m", "0755", str(SECRETS))
    e.bao = e.moto = e.cluster = None
    try:
        e.hsm = Hsm()
        e.root_key = os.urandom(32)
        e.cluster = Cluster(e.hsm.conf)
        e.cluster.init(e.root_key)
        e.cluster.start()
        e.bao = Bao().start()
        e.moto = Moto().start()
        e.hsm.start()
        # Files this module reads a secret from, besides the key servers' own: a wrong token.
        e.wrong_token = f"wrong-{uuid.uuid4().hex}"
        write_secret_file(SECRETS / "openbao" / "wrong-token", e.wrong_token + "\n")
        setup_schema(e)
        yield e
    finally:
        if e.cluster is not None:
            try:
                e.cluster.stop()
            except Exception:  # noqa: BLE001 - stop the key servers whatever happened
                pass
        for s in (e.bao, e.moto):
            if s is not None:
                s.stop()
        shutil.rmtree(SECRETS, ignore_errors=True)


def setup_schema(e):
    """Roles, the database, providers and tenants: with every log on (key creation and
    wrapping are part of what is searched); the canaries: quietly."""
    rec = Recorder()
    e.recorder = rec
    with connect("postgres") as c:
        # Only utility statements here (written when envelope.audit = on broke other
        # databases; fixed, and covered by test_audit.py).
        c.execute(f"CREATE DATABASE {DB}")
        for r in (APP, NOGRANT, ADMIN2):
            c.execute(f"CREATE ROLE {r} LOGIN")
    with admin(rec) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        c.execute("CREATE EXTENSION pg_stat_statements")
        c.execute("SELECT envelope.add_key_provider('bao', 'vault_transit', %s)", (e.bao.options(),))
        c.execute("SELECT envelope.add_key_provider('bao2', 'vault_transit', %s)", (e.bao.options(key="leak-root-2"),))
        c.execute("SELECT envelope.add_key_provider('bao_approle', 'vault_transit', %s)", (e.bao.options(approle=True),))
        c.execute("SELECT envelope.add_key_provider('aws', 'aws_kms', %s)", (e.moto.options(),))
        c.execute("SELECT envelope.add_key_provider('hsm', 'pkcs11', %s)", (e.hsm.options(),))
        bad = dict(e.bao.options().obj, token_file=str(SECRETS / "openbao" / "wrong-token"))
        c.execute("SELECT envelope.add_key_provider('bao_wrong', 'vault_transit', %s)", (Jsonb(bad),))
        for t, p in {**TENANTS, **EXTRA_TENANTS}.items():
            c.execute("SELECT envelope.create_tenant(%s, provider => %s)", (t, p))
            c.execute("SELECT envelope.grant_tenant(%s, %s)", (t, APP))
            c.execute("SELECT envelope.grant_tenant(%s, current_user)", (t,))
        for f in ("grant_tenant", "revoke_tenant", "confirm_shred", "schedule_shred", "cancel_shred", "shred_report"):
            c.execute(f"GRANT EXECUTE ON FUNCTION envelope.{f} TO {ADMIN2}")
        c.execute("GRANT SELECT ON envelope.tenants, envelope.tenant_grants TO leak_admin2")
        c.execute("SELECT envelope.declare_blind_index('vault.t', 'nfkc_casefold')")
        c.execute("SELECT envelope.declare_blind_index('vault.any')")
        c.execute(TABLE_DDL)
    e.canaries = {}
    rows = []
    rid = 0
    for t in TENANTS:
        for k in range(2):
            rid += 1
            cv = make_canaries(t)
            e.canaries[rid] = (t, cv)
            rows.append((rid, t, cv))
    # t_rot: a few rows for rotation, destruction and re-encryption; t_shred: rows that are shredded.
    for t in ("t_rot", "t_shred"):
        rid += 1
        cv = make_canaries(t)
        e.canaries[rid] = (t, cv)
        rows.append((rid, t, cv))
    store_quietly(e, rows)
    with connect() as c:
        c.execute("SELECT pg_stat_statements_reset()")
        e.keys_at_setup = key_rows(c)


# --------------------------------------------------------------------------------------------
# Key material: every key this module can compute, from catalog snapshots
# --------------------------------------------------------------------------------------------


def key_rows(c):
    return {
        "tenants": c.execute("SELECT name, id, provider, wrapped_key FROM envelope.tenants WHERE wrapped_key IS NOT NULL").fetchall(),
        "data_keys": c.execute("SELECT tenant_id, version, wrapped_key FROM envelope.data_keys WHERE wrapped_key IS NOT NULL").fetchall(),
        "index_keys": c.execute("SELECT tenant_id, version, wrapped_key FROM envelope.index_keys WHERE wrapped_key IS NOT NULL").fetchall(),
    }


def index_key_aad(tenant, tenant_key_id, version):
    t = tenant.encode()
    return (bytes([1]) + b"pg_envelope/v1/index-key\x00" + tenant_key_id.to_bytes(4, "big") + version.to_bytes(4, "big")
            + len(t).to_bytes(4, "big") + t)


def unwrap_tenant_key(e, provider_kind, tenant, tid, wrapped):
    if provider_kind == "local":
        return keyscan.unwrap_key(e.root_key, keyscan.wrap_aad_tenant_key(tenant, tid), wrapped)
    if provider_kind.startswith("bao"):
        return e.bao.unwrap(tenant, tid, wrapped)
    if provider_kind == "aws":
        return e.moto.unwrap(tenant, tid, wrapped)
    if provider_kind == "hsm":
        return e.hsm.unwrap(tenant, tid, wrapped)
    raise ValueError(provider_kind)


def keys_from(e, snapshots, envelopes=()):
    """{label: key bytes} for every tenant key, data key and index key in the snapshots, plus
    the XAES-256-GCM keys derived for the nonce prefixes of `envelopes` ({tenant: [bytes]})."""
    keys = {"local root key": e.root_key, "hsm root key": e.hsm.root_key}
    for snap in snapshots:
        names = {}
        for name, tid, provider, wrapped in snap["tenants"]:
            tk = unwrap_tenant_key(e, provider, name, tid, bytes(wrapped))
            keys[f"tenant key {name} ({provider}) {keyscan.fingerprint(tk)}"] = tk
            names[tid] = (name, tk)
        for tid, v, wrapped in snap["data_keys"]:
            name, tk = names[tid]
            dek = keyscan.unwrap_key(tk, keyscan.wrap_aad_data_key(name, tid, v), bytes(wrapped))
            keys[f"dek {name} v{v} {keyscan.fingerprint(dek)}"] = dek
            keys[f"dek {name} v{v} K1"] = keyscan.xaes_k1(dek)
            for env in envelopes.get(name, ()):
                if keyscan.envelope_dek_version(env) == v:
                    d = keyscan.xaes_derive(dek, keyscan.envelope_prefix(env))
                    keys[f"dek {name} v{v} derived {keyscan.envelope_prefix(env).hex()}"] = d
        for tid, v, wrapped in snap["index_keys"]:
            name, tk = names[tid]
            ik = keyscan.unwrap_key(tk, index_key_aad(name, tid, v), bytes(wrapped))
            keys[f"index key {name} v{v} {keyscan.fingerprint(ik)}"] = ik
    return keys


# --------------------------------------------------------------------------------------------
# The exercise: every function, every way of decrypting, with every log on
# --------------------------------------------------------------------------------------------

PLPGSQL = """
CREATE FUNCTION leak_nested(p_tenant text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE v text; nv numeric; c bigint := 0; r record;
BEGIN
  FOR r IN SELECT id, t::text AS tv, n::numeric AS nv FROM vault WHERE tenant = p_tenant ORDER BY id LOOP
    v := r.tv;
    -- nested statements whose parameters hold decrypted values (auto_explain logs their plans)
    SELECT count(*) INTO c FROM vault WHERE tenant = p_tenant AND t::text = v;
    PERFORM 1 FROM vault WHERE n::numeric = r.nv AND j::jsonb ->> 'secret' IS NOT NULL;
    nv := r.nv;
  END LOOP;
  RETURN c;
END $$;
CREATE FUNCTION leak_fail_after_decrypt(p_tenant text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE v text;
BEGIN
  SELECT t::text INTO v FROM vault WHERE tenant = p_tenant ORDER BY id LIMIT 1;
  IF v IS NOT NULL THEN
    RAISE EXCEPTION 'failing after a decryption' USING ERRCODE = 'P0001', HINT = 'on purpose';
  END IF;
  RETURN v;
END $$;
CREATE FUNCTION leak_sql_decrypt(p_tenant text) RETURNS SETOF text LANGUAGE sql AS $$
  SELECT envelope.decrypt_field(f, 'vault.f/' || id) FROM vault WHERE tenant = p_tenant
$$;
"""


def exercise(e, marker):
    """Every function of schema envelope, its error paths, and decryption of every canary in
    SELECT lists, WHERE clauses, PL/pgSQL (nested statements), SQL functions, cursors, extended
    protocol with bind parameters (unnamed and named prepared), binary results, COPY, and in
    statements that fail after decrypting. Returns the results of the functions that report
    (status, key_cache, ...), to be searched as well."""
    rec = e.recorder
    reports = []
    tenants = list(TENANTS)
    a = admin(rec)
    p = app(rec)
    a.execute(PLPGSQL)
    a.execute("GRANT EXECUTE ON FUNCTION leak_nested(text), leak_fail_after_decrypt(text), leak_sql_decrypt(text) TO leak_app")

    # -- positive controls: a literal that log_statement and auto_explain must log, a RAISE LOG,
    #    a utility statement kept verbatim by pg_stat_statements, a request id in the audit trail,
    #    a statement pg_stat_activity must show while it runs
    a.execute(f"SELECT '{marker}' AS control_literal")
    a.execute(f"DO $$ BEGIN RAISE LOG 'control %', '{marker}'; END $$")
    a.execute(f"COMMENT ON TABLE vault IS '{marker}'")
    a.execute(f"SELECT pg_sleep(0.3), '{marker}' AS control_activity")
    with Tx(p, "t_local", envelope__request_id=marker):
        p.execute("SELECT t::text FROM vault WHERE tenant = 't_local'").fetchall()
    p.execute(f"DO $$ BEGIN RAISE NOTICE 'control %', '{marker}'; END $$")

    # -- every provider: verify, status, key cache
    for prov in ("local", "bao", "bao2", "bao_approle", "aws", "hsm"):
        reports.append(a.execute("SELECT envelope.verify_provider(%s)::text", (prov,)).fetchone()[0])
    rec.expect_error(a, "verify wrong token", ("28000", "58000"), "SELECT envelope.verify_provider('bao_wrong')")
    rec.expect_error(a, "verify unknown provider", ("42704", "22023"), "SELECT envelope.verify_provider('nope')")
    rec.expect_error(a, "inline token refused", "F0000",
                     "SELECT envelope.add_key_provider('inline', 'vault_transit', %s)",
                     (Jsonb({"url": e.bao.addr, "key": "leak-root", "token": "INLINE-NOT-A-SECRET", "allow_insecure_http": True}),))
    rec.expect_error(p, "app adds provider", "42501", "SELECT envelope.add_key_provider('x', 'local', '{}')")

    # -- decrypt every canary, many ways (as the application role, tenant by tenant)
    for t in tenants:
        with Tx(p, t):
            rows = p.execute(
                "SELECT id, t::text, j::jsonb, n::numeric, i::bigint, d::date, ts::timestamptz, b::bytea, "
                "envelope.decrypt_field(f, 'vault.f/' || id), envelope.decrypt_field_bytea(f, 'vault.f/' || id), "
                "envelope.decrypt_field(t), envelope.decrypt_field(j), envelope.decrypt_field(n), envelope.decrypt_field(i), "
                "envelope.decrypt_field(d), envelope.decrypt_field(ts), envelope.decrypt_field(b) "
                "FROM vault WHERE tenant = %s ORDER BY id", (t,)).fetchall()
            for r in rows:
                cv = e.canaries[r[0]][1]
                assert r[1] == cv["t"] and r[2]["secret"] == cv["j"] and r[8] == cv["f"] and str(r[4]) == cv["i"]
            # WHERE clauses, ORDER BY, GROUP BY, DISTINCT over decrypted values; bind parameters
            p.execute("SELECT id FROM vault WHERE t::text LIKE 'CANARY-%%' AND n::numeric > %s ORDER BY t::text", (0,)).fetchall()
            p.execute("SELECT j::jsonb ->> 'secret', count(*) FROM vault WHERE tenant = %s GROUP BY 1", (t,)).fetchall()
            p.execute("SELECT DISTINCT upper(t::text) FROM vault WHERE i::bigint <> %s", (-1,)).fetchall()
            # named prepared statement (extended protocol), executed 7 times: custom then generic plans
            for _ in range(7):
                p.execute("SELECT count(*) FROM vault WHERE tenant = %s AND t::text IS NOT NULL AND length(t::text) > %s",
                          (t, 3), prepare=True).fetchone()
            # binary results (the types' send functions) and text I/O of ciphertexts
            p.execute("SELECT t, j, n, i, d, ts, b, t_idx FROM vault WHERE tenant = %s", (t,), binary=True).fetchall()
            # nested statements (auto_explain.log_nested_statements), an SQL function, a cursor
            p.execute("SELECT leak_nested(%s)", (t,)).fetchone()
            p.execute("SELECT * FROM leak_sql_decrypt(%s)", (t,)).fetchall()
            p.execute("DECLARE cur NO SCROLL CURSOR FOR SELECT t::text, b::bytea FROM vault WHERE tenant = %s", (t,))
            p.execute("FETCH 1 FROM cur").fetchall()
            p.execute("CLOSE cur")
            # blind-index lookups by a stored value (no plaintext sent)
            p.execute("SELECT v.id FROM vault v JOIN vault w ON w.t_idx = v.t_idx WHERE v.tenant = %s", (t,)).fetchall()

    # -- statements that fail after decrypting
    with Tx(p, "t_bao"):
        rec.expect_error(p, "division after decrypt", "22012",
                         "SELECT t::text, j::jsonb, 1 / (id - id) FROM vault WHERE tenant = 't_bao'")
    with Tx(p, "t_aws"):
        rec.expect_error(p, "plpgsql raise after decrypt", "P0001", "SELECT leak_fail_after_decrypt('t_aws')")
    with Tx(a, "t_hsm"):
        a.execute("SET LOCAL envelope.max_decrypts_per_statement = 1")
        rec.expect_error(a, "decrypt cap", "54000", "SELECT t::text FROM vault WHERE tenant = 't_hsm'")
    with Tx(p, "t_approle", statement_timeout="300"):
        rec.expect_error(p, "timeout after decrypt", "57014",
                         "SELECT t::text, pg_sleep(1) FROM vault WHERE tenant = 't_approle'")

    # -- error paths: wrong tenant, no grant, tampered ciphertext, bad typed input
    env_local = bytes(a.execute("SELECT t::bytea FROM (SELECT envelope.encrypted_text_send(t) AS t FROM vault WHERE id = 1) s").fetchone()[0])
    with Tx(a, "t_bao"):  # the superuser sees every row (no RLS) and holds every grant
        rec.expect_error(a, "wrong tenant", "22000", "SELECT envelope.decrypt_field(f, 'vault.f/1') FROM vault WHERE id = 1")
        rec.expect_error(a, "wrong tenant typed", "22000", "SELECT t::text FROM vault WHERE id = 1")
    with Tx(p, "t_local"):
        rec.expect_error(p, "wrong context", "22000", "SELECT envelope.decrypt_field(f, 'vault.f/2') FROM vault WHERE id = 1")
        f1 = bytearray(p.execute("SELECT f FROM vault WHERE id = 1").fetchone()[0])
        f1[-1] ^= 1
        rec.expect_error(p, "tampered", "22000", "SELECT envelope.decrypt_field(%s::bytea, 'vault.f/1')", (bytes(f1),))
        tampered = bytearray(env_local)
        tampered[-1] ^= 1
        # a ciphertext literal (not a secret) through the type's input function
        lit = "pge1:" + base64.b64encode(bytes(tampered)).decode()
        rec.expect_error(p, "tampered typed", "22000", f"SELECT envelope.decrypt_field('{lit}'::envelope.encrypted_text)")
        # a value bound as unknown (a literal) reaches the type's input function: 22P02, no echo
        rec.expect_error(p, "bad typed input", "22P02", "INSERT INTO vault (id, t) VALUES (900, 'NOT-AN-ENVELOPE')")
        rec.expect_error(p, "bad typed cast", "22P02", "SELECT 'pge1:AAAA'::envelope.encrypted_text")
    with app(rec, NOGRANT) as n:
        with Tx(n, "t_local"):
            f_row1 = bytes(a.execute("SELECT f FROM vault WHERE id = 1").fetchone()[0])
            rec.expect_error(n, "no grant", "42501", "SELECT envelope.decrypt_field(%s::bytea, 'vault.f/1')", (f_row1,))
        with Tx(n, "t_local"):
            rec.expect_error(n, "no grant encrypt", "42501", "SELECT envelope.encrypt_field('x'::text)")
    rec.expect_error(p, "no tenant", ("22023", "42501", "55000", "28000"), "SELECT envelope.encrypt_field('x'::text)")

    # -- the application writes plaintext with bind parameters (extended protocol)
    e.app_params = [f"APPPARAM-{uuid.uuid4().hex}" for _ in range(4)]
    with Tx(p, "t_local"):
        p.execute("INSERT INTO vault (id, tenant, t, f) VALUES (%s, 't_local', %s, envelope.encrypt_field(%s::text))",
                  (801, e.app_params[0], e.app_params[1]))
        p.execute("INSERT INTO vault (id, tenant, t) VALUES (%s, 't_local', %s)", (802, e.app_params[2]), prepare=True)
        p.execute("SELECT id FROM vault WHERE t::text = %s", (e.app_params[0],)).fetchall()
        p.execute("SELECT id FROM vault WHERE t_idx = envelope.blind_index('vault.t', %s::text)", (e.app_params[2],)).fetchall()
        rec.expect_error(p, "bind param then error", "22012", "SELECT envelope.encrypt_field(%s::text), 1/0", (e.app_params[3],))
    p.execute("DELETE FROM vault WHERE id > 800")  # RLS: no tenant, no rows
    a.execute("DELETE FROM vault WHERE id > 800")

    # -- typed functions, header functions, every overload
    with Tx(p, "t_local"):
        for typ, val in (("text", "'v'::text"), ("bytea", "'\\x01'::bytea"), ("jsonb", "'{}'::jsonb"), ("int8", "1::bigint"),
                         ("numeric", "1.5::numeric"), ("date", "current_date"), ("timestamptz", "now()")):
            p.execute(f"SELECT envelope.decrypt_field(envelope.encrypt_{typ}({val})), "
                      f"envelope.key_header(x), envelope.key_tenant_id(x), envelope.key_version(x), envelope.belongs_to(x, 't_local'), "
                      f"envelope.blind_index('vault.any', x), envelope.blind_index_all('vault.any', {val}::{'bigint' if typ == 'int8' else typ}) "
                      f"FROM (SELECT envelope.encrypt_{typ}({val}) AS x) s" if typ not in ("jsonb",) else
                      f"SELECT envelope.decrypt_field(envelope.encrypt_{typ}({val})), envelope.key_header(x), envelope.key_tenant_id(x), "
                      f"envelope.key_version(x), envelope.belongs_to(x, 't_local'), envelope.blind_index('vault.any', x) "
                      f"FROM (SELECT envelope.encrypt_{typ}({val}) AS x) s").fetchall()
        p.execute("SELECT envelope.key_header(f), envelope.key_tenant_id(f), envelope.key_version(f), envelope.belongs_to(f, 't_local'), "
                  "envelope.encrypt_field('\\x0102'::bytea), envelope.encrypt_field('x'::text, 'ctx') FROM vault WHERE id = 1").fetchall()
        p.execute("SELECT envelope.blind_index('vault.any', 1::int), envelope.blind_index('vault.any', 1::bigint), "
                  "envelope.blind_index('vault.any', 1::numeric), envelope.blind_index('vault.any', 'x'::bytea), "
                  "envelope.blind_index('vault.any', current_date), envelope.blind_index('vault.any', now()), "
                  "envelope.blind_index('vault.any', localtimestamp), envelope.blind_index('vault.any', 'x'::text), "
                  "envelope.blind_index_all('vault.any', 1::int), envelope.blind_index_all('vault.any', localtimestamp), "
                  "envelope.blind_index_all('vault.any', now()), envelope.blind_index_all('vault.any', current_date), "
                  "envelope.active_index_version(), envelope.current_tenant_key_id(), envelope.authorized_tenant()").fetchall()
        p.execute("SELECT envelope.blind_index_version(t_idx), envelope.blind_index_eq(t_idx, t_idx), envelope.blind_index_ne(t_idx, t_idx), "
                  "envelope.blind_index_lt(t_idx, t_idx), envelope.blind_index_le(t_idx, t_idx), envelope.blind_index_gt(t_idx, t_idx), "
                  "envelope.blind_index_ge(t_idx, t_idx), envelope.blind_index_cmp(t_idx, t_idx), envelope.blind_index_hash(t_idx), "
                  "envelope.blind_index_hash_extended(t_idx, 7), envelope.blind_index_out(t_idx), envelope.blind_index_send(t_idx), "
                  "envelope.blind_index_in(envelope.blind_index_out(t_idx)) FROM vault WHERE tenant = 't_local'").fetchall()
        # text I/O of every encrypted type, called directly
        for col in ("t", "j", "n", "i", "d", "ts", "b"):
            typ = {"t": "text", "j": "jsonb", "n": "numeric", "i": "int8", "d": "date", "ts": "timestamptz", "b": "bytea"}[col]
            p.execute(f"SELECT envelope.encrypted_{typ}_in(envelope.encrypted_{typ}_out({col})), envelope.encrypted_{typ}_send({col}) "
                      "FROM vault WHERE tenant = 't_local'").fetchall()
    with Tx(n_conn := app(rec, NOGRANT), "t_local"):
        rec.expect_error(n_conn, "blind index without grant", "42501", "SELECT envelope.blind_index('vault.t', 'x'::text)")
    n_conn.close()
    # COPY out and in, text and binary (the types' receive functions)
    # a copy without the blind-index trigger, with the bytea column's context as a stored column
    # (re-encrypting a table with the trigger is covered by regress 15_search.sql since 47d6a23)
    a.execute("CREATE TABLE vault_copy AS SELECT id, t, j, n, i, d, ts, b, t_idx, f, 'vault.f/' || id AS f_ctx FROM vault WITH NO DATA")
    for fmt in ("text", "binary"):
        buf = bytearray()
        with a.cursor().copy(f"COPY (SELECT id, t, j, n, i, d, ts, b, t_idx FROM vault) TO STDOUT (FORMAT {fmt})") as cp:
            for chunk in cp:
                buf += chunk
        a.execute("TRUNCATE vault_copy")
        with a.cursor().copy(f"COPY vault_copy (id, t, j, n, i, d, ts, b, t_idx) FROM STDIN (FORMAT {fmt})") as cp:
            cp.write(bytes(buf))
    assert a.execute("SELECT count(*) FROM vault_copy").fetchone()[0] == len(e.canaries)
    a.execute("TRUNCATE vault_copy")

    # -- key lifecycle: rotations, rewrap, re-encryption, disable/enable/destroy
    for t in tenants:
        a.execute("SELECT envelope.rotate_data_key(%s)", (t,))
    a.execute("SELECT envelope.rotate_tenant_key('t_bao'), envelope.rotate_tenant_key('t_aws'), envelope.rotate_tenant_key('t_hsm'), "
              "envelope.rotate_tenant_key('t_local'), envelope.rotate_tenant_key('t_approle')")
    a.execute("SELECT envelope.rewrap_tenant('t_bao', 'bao2')")
    a.execute("SELECT envelope.rewrap_tenant('t_bao', 'bao')")
    a.execute("CALL envelope.rewrap_tenants('bao', 10)")
    a.execute("SELECT envelope.rotate_data_key('t_rot')")
    e.keys_mid = key_rows(a)
    a.execute("INSERT INTO vault_copy SELECT id, t, j, n, i, d, ts, b, t_idx, f, 'vault.f/' || id FROM vault")
    for col in ("t", "j", "n", "i", "d", "ts", "b"):
        a.execute(f"CALL envelope.reencrypt('vault_copy', '{col}', batch_rows => 5)")
    a.execute("CALL envelope.reencrypt('vault_copy', 'f', context_column => 'f_ctx', batch_rows => 5)")
    reports.append(str(a.execute("SELECT * FROM envelope.column_key_versions('vault_copy', 't')").fetchall()))
    rec.expect_error(a, "disable active", "55006", "SELECT envelope.disable_data_key('t_rot', 2)")
    a.execute("SELECT envelope.disable_data_key('t_local', 1)")
    with Tx(p, "t_local"):
        rec.expect_error(p, "disabled version", "55000", "SELECT t::text FROM vault WHERE tenant = 't_local'")
    with Tx(a, "t_local"):
        a.execute("SELECT t::text FROM vault_copy WHERE envelope.key_tenant_id(t) = envelope.current_tenant_key_id()").fetchall()
    a.execute("SELECT envelope.enable_data_key('t_local', 1)")
    a.execute("SELECT envelope.disable_data_key('t_rot', 1)")
    rec.expect_error(a, "destroy a version in use", "2BP01", "SELECT envelope.destroy_data_key('t_rot', 1)")
    a.execute("SELECT envelope.destroy_data_key('t_rot', 1, force => true)")
    job = a.execute("SELECT envelope.queue_reencrypt('vault', 't', batch_rows => 3)").fetchone()[0]
    a.execute("SELECT envelope.cancel_reencrypt(%s)", (job,))
    rec.expect_error(p, "reencrypt_value outside a batch", "42501",
                     "SELECT envelope.reencrypt_value(%s::bytea, 'vault.f/1', 1)", (f_row1,))
    a.execute("SELECT envelope.set_rotation_period('t_local', '1 day')")
    a.execute("SELECT envelope.rotate_data_key_if_due('t_local'), envelope.default_rotation_period()")
    reports.append(str(a.execute("SELECT * FROM envelope.maintenance_due()").fetchall()))
    a.execute("CALL envelope.run_maintenance()")
    reports.append(str(a.execute("SELECT * FROM envelope.maintenance_status()").fetchall()))
    for v in ("key_versions", "rotation_status", "reencrypt_progress", "rewrap_progress", "revocations", "shreds"):
        reports.append(str(a.execute(f"SELECT * FROM envelope.{v}").fetchall()))

    # -- blind-index keys and backfill
    a.execute("SELECT envelope.rotate_index_key('t_local')")
    a.execute("SELECT envelope.destroy_index_key('t_local', 1)")
    with Tx(p, "t_local"):
        p.execute("SELECT envelope.blind_index_all('vault.t', t::text) FROM vault WHERE tenant = 't_local'").fetchall()
    p.execute("SET app.tenant_id = 't_local'")
    p.execute("CALL envelope.blind_index_backfill('vault', 't', 't_idx', 'vault.t', 'tenant', 2)")
    p.execute("RESET app.tenant_id")
    a.execute("SELECT envelope.blind_index_cardinality_warning(1, 1000)")

    # -- revocation: revoke/grant, suspend/resume, lockdown/lift (values passed as parameters:
    #    under RLS a refused role would see no row at all)
    fval = {t: (rid, bytes(f)) for rid, t, f in a.execute("SELECT id, tenant, f FROM vault ORDER BY id DESC").fetchall()}

    def dec(t):
        rid, f = fval[t]
        return "SELECT envelope.decrypt_field(%s::bytea, %s)", (f, f"vault.f/{rid}")

    a.execute("SELECT envelope.revoke_tenant('t_aws', 'leak_app')")
    with Tx(p, "t_aws"):
        rec.expect_error(p, "revoked", "42501", *dec("t_aws"))
    a.execute("SELECT envelope.grant_tenant('t_aws', 'leak_app')")
    a.execute("SELECT envelope.suspend_tenant('t_hsm', 'leak test')")
    with Tx(p, "t_hsm"):
        rec.expect_error(p, "suspended", "57000", *dec("t_hsm"))
    a.execute("SELECT envelope.resume_tenant('t_hsm')")
    a.execute("SELECT envelope.lockdown('leak test')")
    with Tx(p, "t_bao"):
        rec.expect_error(p, "lockdown", "57000", *dec("t_bao"))
    rec.expect_error(p, "app lifts lockdown", "42501", "SELECT envelope.lift_lockdown()")
    a.execute("SELECT envelope.lift_lockdown()")
    with Tx(p, "t_bao"):
        p.execute("SELECT t::text FROM vault WHERE tenant = 't_bao'").fetchall()

    # -- canaries of the audit trail (a decoy whose decryption alerts)
    a.execute("SELECT envelope.add_canary(f, 'leak decoy') FROM vault WHERE id = 3")
    with Tx(p, e.canaries[3][0]):
        p.execute("SELECT envelope.decrypt_field(f, 'vault.f/3') FROM vault WHERE id = 3").fetchall()
    a.execute("SELECT envelope.drop_canary('leak decoy')")

    # -- crypto-shredding, two steps (the second login confirms)
    e.keys_before_shred = key_rows(a)
    a.execute("SELECT envelope.schedule_shred('t_shred', '1 hour')")
    a.execute("SELECT envelope.cancel_shred('t_shred')")
    a.execute("SELECT envelope.schedule_shred('t_shred', '0 seconds')")
    rec.expect_error(a, "confirm by scheduler", "42501", "SELECT envelope.confirm_shred('t_shred')")
    with recorder_attach(rec, connect(user=ADMIN2)) as c2:
        c2.execute("SELECT envelope.confirm_shred('t_shred')")
    reports.append(str(a.execute("SELECT * FROM envelope.shred_report('t_shred')").fetchall()))
    a.execute("SELECT envelope.shred_if_due('t_shred')")
    a.execute("SELECT envelope.shred_destroy_root_key('t_shred')")
    a.execute("SELECT envelope.shred_compact_key_tables()")
    rec.expect_error(a, "resume after shred", "55000", "SELECT envelope.resume_tenant('t_shred')")
    with Tx(p, "t_shred"):
        rec.expect_error(p, "shredded", ("42704", "57000"), *dec("t_shred"))

    # -- DDL the event triggers look at (one allowed, one refused), statistics
    a.execute("CREATE TABLE leak_plain (id int, v text)")
    rec.expect_error(a, "index on decrypt", ("42P17", "42501"), "CREATE INDEX ON vault ((t::text))")
    a.execute("CREATE STATISTICS leak_stats ON id, tenant FROM vault")
    a.execute("ANALYZE vault")

    # -- reports, audit
    reports.append(a.execute("SELECT envelope.status()::text").fetchone()[0])
    reports.append(str(a.execute("SELECT * FROM envelope.key_cache()").fetchall()))
    reports.append(str(a.execute("SELECT * FROM envelope.trust_report()").fetchall()))
    wait_until(lambda: a.execute("SELECT count(*) FROM envelope.audit_checkpoints").fetchone()[0] > 0, 30,
               what="an audit checkpoint")
    reports.append(str(a.execute("SELECT * FROM envelope.audit_verify()").fetchall()))
    reports.append(str(a.execute("SELECT * FROM envelope.audit_verify(true)").fetchall()))
    reports.append(str(a.execute("SELECT envelope.audit_prune_in_progress()").fetchall()))
    rec.expect_error(a, "audit is append-only", "42501", "UPDATE envelope.audit_log SET detail = 'x' WHERE seq = 1")
    p.close()
    a.close()
    return reports


def recorder_attach(rec, conn):
    return rec.attach(conn)


# --------------------------------------------------------------------------------------------
# Collecting and scanning
# --------------------------------------------------------------------------------------------


def audit_text(c):
    """The audit trail as text: every table and view, and the export."""
    out = []
    for q in ("SELECT a::text FROM envelope.audit_log a", "SELECT a::text FROM envelope.audit_events a",
              "SELECT a::text FROM envelope.audit_alerts a", "SELECT a::text FROM envelope.audit_checkpoints a",
              "SELECT a::text FROM envelope.audit_hourly a", "SELECT line FROM envelope.audit_export(1)"):
        out += [r[0] for r in c.execute(q).fetchall()]
    return "\n".join(out)


@pytest.fixture(scope="module")
def exercised(env):
    """Runs the exercise with every log on, then collects every place a secret could have gone."""
    e = env
    e.marker = f"LEAKCONTROL-{uuid.uuid4().hex}"
    mon = ActivityMonitor()
    t0 = time.monotonic()
    try:
        e.reports = exercise(e, e.marker)
    finally:
        e.activity = mon.stop()
    e.exercise_s = time.monotonic() - t0
    e.activity_samples = mon.samples
    with connect() as c:
        for s in QUIET:
            c.execute(s)
        e.keys_end = key_rows(c)
        e.pgss = "\n".join(r[0] for r in c.execute("SELECT query FROM pg_stat_statements").fetchall())
        e.audit = audit_text(c)
        envs = {}
        for tenant, f in c.execute("SELECT tenant, f FROM vault").fetchall():
            envs.setdefault(tenant, []).append(bytes(f))
        e.envelopes = envs
        # a last audit step, after the trail was read: retention (a recorded, checkpointed event)
        c.execute("SELECT envelope.audit_prune('0 seconds')")  # (fires audit_append_only)
    # the server flushes its logs (and function statistics) at a stop
    e.cluster.stop()
    e.logs = [(f"log {f.name}", f.read_bytes()) for f in e.cluster.log_files()]
    e.cluster.start()
    return e


def all_secrets(e):
    keys = keys_from(e, [e.keys_at_setup, e.keys_mid, e.keys_before_shred, e.keys_end], e.envelopes)
    secrets = [Secret(label, "key", k) for label, k in keys.items()]
    secrets += e.bao.secrets() + e.moto.secrets() + e.hsm.secrets()
    secrets.append(Secret("wrong openbao token (a file the server reads)", "credential", e.wrong_token.encode()))
    for rid, (tenant, cv) in e.canaries.items():
        for col, v in cv.items():
            secrets.append(Secret(f"canary row {rid} ({tenant}) column {col}", "canary", v.encode()))
    for i, v in enumerate(e.app_params):
        secrets.append(Secret(f"application bind parameter {i}", "bind parameter", v.encode()))
    return secrets


def sources(e):
    out = list(e.logs)
    out.append(("pg_stat_statements", e.pgss.encode()))
    out.append(("pg_stat_activity snapshots", e.activity.encode()))
    out.append(("audit trail", e.audit.encode()))
    out.append(("function reports (status, key_cache, verify_provider, ...)", "\n".join(e.reports).encode()))
    out.append(("client notices and error messages", "\n".join(e.recorder.texts).encode()))
    return out


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_maximal_logging_leaks_no_key_credential_or_plaintext(exercised, tmp_path):
    e = exercised
    secrets = all_secrets(e)
    control = Secret("positive control", "control", e.marker.encode())
    srcs = sources(e)
    hits, scanned = leakscan.scan_grep(srcs, secrets + [control], str(tmp_path / "scan"))
    found = {h.source for h in hits if h.kind == "control"}
    kinds = {k: sum(1 for s in secrets if s.kind == k) for k in sorted({s.kind for s in secrets})}
    print(f"\nscanned {len(srcs)} sources, {scanned:,} bytes; {len(secrets)} secrets {kinds}, "
          f"{leakscan.needle_count(secrets)} needles; pg_stat_activity samples: {e.activity_samples}; "
          f"exercise {e.exercise_s:.1f}s")
    # The control must be found in every kind of place searched (an empty result means "not
    # there", not "not looked at").
    log_kinds = {ext: [n for n, _ in e.logs if n.endswith(ext)] for ext in (".log", ".csv", ".json")}
    for ext, names in log_kinds.items():
        assert names, f"no {ext} log file"
        assert any(n in found for n in names), f"the control was not found in any {ext} log"
    for name in ("pg_stat_statements", "pg_stat_activity snapshots", "audit trail", "client notices and error messages"):
        assert name in found, f"the control was not found in {name}"
    leaks = [h for h in hits if h.kind != "control"]
    assert not leaks, f"{len(leaks)} secret(s) found:\n" + "\n".join(str(h) for h in leaks[:40])


# Functions that pg_stat_user_functions cannot show as called, and how the exercise reaches them:
NOT_COUNTED = {
    # receive functions: COPY ... FROM STDIN (FORMAT binary) calls them through the type's I/O,
    # which PostgreSQL does not count
    **{f"encrypted_{t}_recv": "COPY FROM binary" for t in ("text", "bytea", "jsonb", "int8", "numeric", "date", "timestamptz")},
    "blind_index_recv": "COPY FROM binary",
}
# LANGUAGE sql functions the planner inlines (so no call is counted), each with the statement of
# the exercise that calls it. Only SQL functions may be listed here.
INLINED_SQL = {
    **{f"envelope.blind_index(text,envelope.encrypted_{t})": "typed loop: blind_index('vault.any', x)"
       for t in ("text", "bytea", "jsonb", "int8", "numeric", "date", "timestamptz")},
    "envelope.blind_index(text,integer)": "blind_index('vault.any', 1::int)",
    "envelope.blind_index_all(text,integer)": "blind_index_all('vault.any', 1::int)",
    "envelope.queue_reencrypt(regclass,name,text,name,integer)": "queue_reencrypt('vault', 't', batch_rows => 3)",
    "envelope.column_key_versions(regclass,name)": "column_key_versions('vault_copy', 't')",
    "envelope.trust_report()": "SELECT * FROM envelope.trust_report()",
}


def test_every_envelope_function_was_called(exercised):
    """The exercise calls every function of schema envelope: a new function fails this test
    until the exercise calls it (and so the leak scan covers it)."""
    with connect() as c:
        rows = c.execute(
            "SELECT p.oid::regprocedure::text, p.proname, coalesce(s.calls, 0), l.lanname FROM pg_proc p "
            "JOIN pg_language l ON l.oid = p.prolang LEFT JOIN pg_stat_user_functions s ON s.funcid = p.oid "
            "WHERE p.pronamespace = 'envelope'::regnamespace ORDER BY 1").fetchall()
    assert len(rows) > 150
    lang = {sig: lan for sig, _n, _c, lan in rows}
    assert all(lang.get(sig) == "sql" for sig in INLINED_SQL), {sig: lang.get(sig) for sig in INLINED_SQL}
    missing = [sig for sig, name, calls, _l in rows if calls == 0 and name not in NOT_COUNTED and sig not in INLINED_SQL]
    assert not missing, f"{len(missing)} envelope functions never called by the exercise:\n" + "\n".join(missing)
    assert {"bad typed input", "tampered", "wrong tenant", "no grant", "suspended", "lockdown", "revoked", "shredded"} <= set(
        exercised.recorder.errors)


def log_bytes(e):
    return b"\n".join(f.read_bytes() for f in e.cluster.log_files())


def test_postgresql_prints_plaintext_where_the_docs_say_it_does(env):
    """Where plaintext does reach the server log, and why: PostgreSQL's doing, outside
    pg_envelope, asserted so that the documentation stays true.

    1. auto_explain under the default plan_cache_mode (auto): a custom plan has the bind
       parameters folded in as constants, and PL/pgSQL passes its variables as parameters, so
       auto_explain prints an application's plaintext parameter and a decrypted value kept in a
       PL/pgSQL variable, whatever log_parameter_max_length says. (With force_generic_plan, as in
       the main test, they stay $n.)
    2. PostgreSQL's input errors echo malformed plaintext bound for a typed column (README).
    3. The same for a decrypted value cast to a type it does not parse as: the error message
       quotes the decrypted value."""
    e = env
    m = {k: f"{k}-{uuid.uuid4().hex}" for k in ("PLPGSQL-VAR", "CAST", "APP-PARAM", "MALFORMED")}
    with connect() as c:
        c.execute("CREATE TABLE echo_demo (id int PRIMARY KEY, t envelope.encrypted_text, n envelope.encrypted_numeric)")
        c.execute("""CREATE FUNCTION echo_nested() RETURNS bigint LANGUAGE plpgsql AS $$
            DECLARE v text; c bigint; BEGIN
              SELECT t::text INTO v FROM echo_demo WHERE id = 1;
              SELECT count(*) INTO c FROM echo_demo WHERE t::text = v;
              RETURN c; END $$""")
    with connect() as q:
        for s in QUIET:
            q.execute(s)
        with Tx(q, "t_local"):
            q.execute("INSERT INTO echo_demo (id, t) VALUES (1, %s::text), (2, %s::text)", (m["PLPGSQL-VAR"], m["CAST"]))
    with connect() as c:
        c.execute("SET plan_cache_mode = auto")
        with Tx(c, "t_local"):
            c.execute("SELECT echo_nested()").fetchone()
            c.execute("SELECT count(*) FROM echo_demo WHERE t::text = %s", (m["APP-PARAM"],)).fetchone()
        with Tx(c, "t_local"):
            with pytest.raises(psycopg.errors.InvalidTextRepresentation):
                c.execute("INSERT INTO echo_demo (id, n) VALUES (3, %s::numeric)", (m["MALFORMED"],))
        with Tx(c, "t_local"):
            with pytest.raises(psycopg.errors.InvalidTextRepresentation) as err:
                c.execute("SELECT t::text::int FROM echo_demo WHERE id = 2")
            assert m["CAST"] in str(err.value)  # and to the client
    wait_until(lambda: all(v.encode() in log_bytes(e) for v in m.values()), 15,
               what="every documented echo in the server log: " + ", ".join(k for k, v in m.items() if v.encode() not in log_bytes(e)))


def test_spilling_sort_writes_decrypted_values_to_temp_files(env):
    """Checklist item 22. A sort of decrypted values that does not fit work_mem spills to
    base/pgsql_tmp, and the spill files hold the decrypted values in plain text (PostgreSQL does
    not encrypt temporary files; pg_envelope never sees them). Positive control: the same sort
    over a plain-text table. What stops it: temp_file_limit = 0 (such a query fails instead of
    spilling); what limits the damage: temp_tablespaces on encrypted storage (docs/threat-model.md)."""
    e = env
    tmpdir = PGDATA / "base" / "pgsql_tmp"
    salt = uuid.uuid4().hex[:8]
    with connect() as c:
        c.execute("CREATE TABLE spill (id int, t envelope.encrypted_text)")
        c.execute("CREATE TABLE spill_plain (id int, t text)")
        with Tx(c, "t_local"):
            c.execute("INSERT INTO spill SELECT i, ('SPILL-' || %s || '-' || md5(i::text))::text FROM generate_series(1, 5000) i", (salt,))
        c.execute("INSERT INTO spill_plain SELECT i, 'PLAINCTL-' || %s || '-' || md5(i::text) FROM generate_series(1, 5000) i", (salt,))

    def spill_files():
        return [p for p in tmpdir.rglob("*") if p.is_file()] if tmpdir.exists() else []

    def sorted_spill(table, decrypt, prefix):
        with connect() as c:
            c.execute("SET work_mem = '64kB'")
            with Tx(c, "t_local"):
                expr = "t::text" if decrypt else "t"
                c.execute(f"DECLARE cur NO SCROLL CURSOR FOR SELECT {expr} FROM {table} ORDER BY 1")
                first = c.execute("FETCH 1 FROM cur").fetchone()[0]  # the sort is done, its runs on disk
                files = spill_files()
                data = b"".join(p.read_bytes() for p in files)
                c.execute("CLOSE cur")
        return first, files, data

    first, files, data = sorted_spill("spill_plain", False, b"PLAINCTL-")
    assert files and first.encode() in data, "control: a spilling sort of plain text left no readable temp file"
    first, files, data = sorted_spill("spill", True, b"SPILL-")
    n = data.count(f"SPILL-{salt}-".encode())
    print(f"\nspilling sort of 5000 decrypted values: {len(files)} temp file(s), {len(data):,} bytes, "
          f"{n} decrypted values in plain text")
    assert first.encode() in data and n >= 1000, "decrypted values are expected in the sort's temp files"
    # temp_file_limit = 0 refuses any temporary file: the query fails, nothing is written
    with connect() as c:
        c.execute("SET work_mem = '64kB'")
        c.execute("SET temp_file_limit = 0")
        with Tx(c, "t_local"):
            with pytest.raises(psycopg.errors.ConfigurationLimitExceeded):
                c.execute("SELECT t::text FROM spill ORDER BY 1").fetchall()
    assert not spill_files()
