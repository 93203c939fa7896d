"""What benches/stampede.py and test_stampede.py share: a private PostgreSQL 15 cluster, a private
OpenBao whose file audit device is the measurement, and N sessions sending one statement at once.

* `Cluster`: started through scripts/cluster.sh (PGE_INSTANCE / PGE_PORT: the project's
  shared_preload_libraries and envelope settings), runs as the postgres user; `set()` writes
  settings with ALTER SYSTEM (postgresql.auto.conf of this cluster only) and reloads or restarts.
* `Bao`: OpenBao dev server (in memory, plain http on 127.0.0.1:<port>, so the provider needs
  allow_insecure_http) with a file audit device; a Transit key, a token limited to
  encrypt/decrypt/read on it, written for the postgres user under envelope.credential_dirs.
  Started and stopped by pid. `transit_calls(offset)` reads OpenBao's own audit log from a byte
  offset and pairs every Transit request with its response by request id.
* `max_in_flight(calls)`: the most calls OpenBao had between their request and their response
  entries at any moment (a sweep over both timestamps).
* `fire(conns, sql)`: sends `sql` on every connection back to back from one thread (the barrier:
  every session is connected, its tenant set, idle), then collects each answer as it comes, with
  its latency (send to answer), SQLSTATE and notices.
* `HangingServer`: accepts TCP connections on 127.0.0.1 and never answers.
"""

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psycopg
from psycopg import pq

ROOT = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("PGE_STATE", "/var/lib/pg_envelope-dev"))
SOCK = str(STATE / "run")
BIN = "/usr/lib/postgresql/15/bin"
BAO_BIN = STATE / "bao-venv" / "bin" / "bao"
SLOT_MESSAGE = "(envelope.max_concurrent_provider_calls) stayed taken"


def sh(*args, env=None, check=True, timeout=300):
    return subprocess.run(args, check=check, capture_output=True, text=True, env=dict(os.environ, **(env or {})), timeout=timeout)


def wait_until(pred, timeout, step=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def http_json(method, url, body=None, headers=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def _kill_pidfile(pidfile: Path, name: bytes):
    """A leftover server of an interrupted run, by its pid file (only if that pid still runs `name`)."""
    try:
        pid = int(pidfile.read_text())
        if name in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, what=f"old {name.decode()} to exit")
    except (ValueError, FileNotFoundError, ProcessLookupError):
        pass
    pidfile.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


class Cluster:
    def __init__(self, instance, port):
        self.instance, self.port = instance, port
        self.env = {"PGE_INSTANCE": instance, "PGE_PORT": str(port)}
        self.data = STATE / instance / "data"
        self.log = STATE / instance / "server.log"

    def _script(self, cmd):
        return sh("bash", str(ROOT / "scripts/cluster.sh"), cmd, env=self.env)

    def pg_ctl(self, *args, timeout=180):
        # As scripts/cluster.sh runs it: as postgres, with SoftHSM2's configuration in the environment.
        return sh("sudo", "-u", "postgres", "-H", "--", "env", "-u", "RUST_BACKTRACE",
                  f"SOFTHSM2_CONF={STATE}/softhsm/softhsm2.conf", f"{BIN}/pg_ctl", "-D", str(self.data), *args,
                  timeout=timeout)

    def start(self, settings=None):
        """initdb if needed, start (scripts/cluster.sh), then `settings` by ALTER SYSTEM and a restart."""
        self._script("start")
        wait_until(self.accepts, 60, 0.2, "the cluster to accept connections")
        if settings:
            self.set(settings, restart=True)

    def stop(self):
        self._script("stop")

    def restart(self):
        self.pg_ctl("-w", "-t", "120", "-m", "fast", "restart", "-l", str(self.log))
        wait_until(self.accepts, 60, 0.2, "the cluster to accept connections")

    def set(self, settings, restart=False):
        """ALTER SYSTEM SET each setting (None: RESET), then a restart or a reload that new
        sessions are seen to have taken."""
        with self.connect() as c:
            for k, v in settings.items():
                if v is None:
                    c.execute(f"ALTER SYSTEM RESET {k}")
                else:
                    c.execute(f"ALTER SYSTEM SET {k} = '{v}'")
            if not restart:
                c.execute("SELECT pg_reload_conf()")
        if restart:
            self.restart()
        for k, v in settings.items():
            if v is not None:
                wait_until(lambda: self.show(k) == self._normal(k, v), 10, what=f"{k} = {v} after the reload")

    def _normal(self, k, v):
        """SHOW's form of a value written with ALTER SYSTEM (units as given, integers as is)."""
        return str(v)

    def show(self, name):
        with self.connect() as c:
            return c.execute(f"SHOW {name}").fetchone()[0]

    def accepts(self):
        try:
            with self.connect(connect_timeout=3) as c:
                return c.execute("SELECT 1").fetchone()[0] == 1
        except psycopg.Error:
            return False

    def connect(self, dbname="postgres", user="postgres", **kw):
        kw.setdefault("connect_timeout", 30)
        return psycopg.connect(host=SOCK, port=self.port, dbname=dbname, user=user, autocommit=True, **kw)

    def slots(self, dbname):
        with self.connect(dbname) as c:
            return c.execute("SELECT envelope.status()->'provider_call_slots'").fetchone()[0]


# --------------------------------------------------------------------------------------------
# OpenBao with its audit log
# --------------------------------------------------------------------------------------------


class Bao:
    """OpenBao dev server (in memory) on 127.0.0.1:<port>, plain http, a file audit device.
    Dev mode also listens on <port>+1 (its cluster port)."""

    def __init__(self, port, key="st-root", latency_ms=0):
        self.port, self.key, self.latency_ms = port, key, latency_ms
        self.addr = f"http://127.0.0.1:{port}"
        # Under envelope.credential_dirs of scripts/cluster.sh ($PGE_STATE/openbao-persistent).
        self.dir = STATE / "openbao-persistent" / f"stampede-{port}"
        self.audit_log = self.dir / "audit.log"
        self.token_file = self.dir / "token"
        self.root_token = f"root-{uuid.uuid4().hex}"
        self.proc = None

    def api(self, method, path, body=None):
        return http_json(method, f"{self.addr}/v1/{path}", body, {"X-Vault-Token": self.root_token})

    def start(self):
        _kill_pidfile(self.dir / "pid", b"bao")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        os.chmod(self.dir, 0o755)
        conf = f'audit "file" "stampede" {{\n  options {{\n    file_path = "{self.audit_log}"\n  }}\n}}\n'
        latency = []
        if self.latency_ms:
            # A slower KMS: every storage operation of the in-memory backend takes latency_ms
            # (the dev server's hidden -dev-latency), and no cache hides it, so each Transit
            # decrypt reads its key from storage between its request and response entries.
            conf = "disable_cache = true\n" + conf
            latency = [f"-dev-latency={self.latency_ms}"]
        (self.dir / "config.hcl").write_text(conf)
        log = open(self.dir / "server.log", "wb")
        self.proc = subprocess.Popen(
            [str(BAO_BIN), "server", "-dev", f"-dev-root-token-id={self.root_token}",
             f"-dev-listen-address=127.0.0.1:{self.port}", "-dev-no-store-token", *latency,
             f"-config={self.dir}/config.hcl"],
            stdout=log, stderr=log, start_new_session=True)
        (self.dir / "pid").write_text(str(self.proc.pid))

        def up():
            try:
                self.api("GET", "sys/health")
                return True
            except (OSError, urllib.error.HTTPError):
                return False

        wait_until(up, 60, 0.1, "OpenBao to answer")
        self.api("POST", "sys/mounts/transit", {"type": "transit"})
        self.api("POST", f"transit/keys/{self.key}", {"type": "aes256-gcm96"})
        rules = [(f"encrypt/{self.key}", "update"), (f"decrypt/{self.key}", "update"), (f"keys/{self.key}", "read")]
        policy = "\n".join(f'path "transit/{p}" {{ capabilities = ["{c}"] }}' for p, c in rules)
        self.api("PUT", "sys/policies/acl/stampede", {"policy": policy})
        token = self.api("POST", "auth/token/create",
                         {"policies": ["stampede"], "ttl": "4h", "no_default_policy": True})["auth"]["client_token"]
        old = os.umask(0o077)
        try:
            self.token_file.write_text(token + "\n")
        finally:
            os.umask(old)
        shutil.chown(self.token_file, "postgres", "postgres")
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        (self.dir / "pid").unlink(missing_ok=True)

    def options(self, **over):
        o = {"url": self.addr, "key": self.key, "token_file": str(self.token_file), "allow_insecure_http": True}
        o.update(over)
        return psycopg.types.json.Jsonb(o)

    def audit_offset(self):
        try:
            return self.audit_log.stat().st_size
        except FileNotFoundError:
            return 0

    def transit_calls(self, offset=0, op="decrypt", settle=0.3):
        """[(request ns, response ns or None, request id)] of `transit/<op>/<key>` requests in
        the audit log after byte `offset`, in request order. Waits until the log stops growing
        (`settle` s) so that late response entries are in."""
        last = -1
        while True:
            size = self.audit_offset()
            if size == last:
                break
            last = size
            time.sleep(settle)
        path = f"transit/{op}/{self.key}"
        req, resp = {}, {}
        with open(self.audit_log, "rb") as f:
            f.seek(offset)
            for line in f:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue  # a line still being written
                r = e.get("request") or {}
                if r.get("path") != path:
                    continue
                t = parse_time_ns(e["time"])
                (req if e.get("type") == "request" else resp)[r["id"]] = t
        return sorted((t, resp.get(i), i) for i, t in req.items())


def parse_time_ns(s):
    """RFC 3339 with nanoseconds ("2026-12-02T19:24:19.544847245Z") to integer ns since the epoch."""
    import calendar

    date, frac = (s[:-1].split(".") + ["0"])[:2] if s.endswith("Z") else (s, "0")
    secs = calendar.timegm(time.strptime(date, "%Y-%m-%dT%H:%M:%S"))
    return secs * 1_000_000_000 + int((frac + "000000000")[:9])


def max_in_flight(calls):
    """The most calls between their request and response entries at one moment. At equal
    timestamps a response counts before a request (no overlap claimed that the log cannot show).
    A request without a response counts as in flight to the end."""
    events = []
    for t_req, t_resp, _ in calls:
        events.append((t_req, 1))
        events.append((t_resp if t_resp is not None else float("inf"), -1))
    events.sort(key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


# --------------------------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------------------------


class Session:
    """One connection and what it saw (notices)."""

    def __init__(self, conn):
        self.conn = conn
        self.notices = []
        conn.add_notice_handler(lambda d: self.notices.append(d.message_primary or ""))
        self.pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]

    def close(self):
        self.conn.close()


def open_sessions(cluster, dbname, n, setup=(), threads=8):
    """n connections, each with `setup` statements run, opened by a few threads."""
    out = [None] * n
    errors = []

    def work(idx):
        try:
            for i in idx:
                c = cluster.connect(dbname)
                for s in setup:
                    c.execute(s)
                out[i] = Session(c)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(range(k, n, threads),)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        close_sessions([s for s in out if s])
        raise errors[0]
    return out


def close_sessions(sessions):
    for s in sessions:
        try:
            s.close()
        except Exception:  # noqa: BLE001
            pass


class Result:
    __slots__ = ("latency", "sqlstate", "message", "value", "notices")

    def __init__(self):
        self.latency = None
        self.sqlstate = None
        self.message = ""
        self.value = None
        self.notices = []


def fire(sessions, sql, timeout=300):
    """Sends `sql` on every session back to back from this thread, then waits for every answer.
    Returns ([Result] in session order, seconds from the first send to the last answer, seconds
    the sends took)."""
    sqlb = sql.encode()
    n = len(sessions)
    results = [Result() for _ in range(n)]
    sent = [0.0] * n
    marks = [len(s.notices) for s in sessions]
    t_first = time.perf_counter()
    for i, s in enumerate(sessions):
        sent[i] = time.perf_counter()
        s.conn.pgconn.send_query(sqlb)
    t_sent = time.perf_counter() - t_first
    sel = selectors.DefaultSelector()
    for i, s in enumerate(sessions):
        sel.register(s.conn.pgconn.socket, selectors.EVENT_READ, i)
    pending = n
    deadline = time.monotonic() + timeout
    t_last = t_first
    while pending:
        if time.monotonic() > deadline:
            for k in sel.get_map().values():
                results[k.data].sqlstate = "TIMEOUT"
                results[k.data].message = f"no answer within {timeout} s"
            break
        for key, _ in sel.select(timeout=1.0):
            i = key.data
            p = sessions[i].conn.pgconn
            try:
                p.consume_input()
            except psycopg.OperationalError as e:  # the connection broke (a crash)
                results[i].sqlstate, results[i].message = "08006", str(e)
                sel.unregister(key.fileobj)
                pending -= 1
                continue
            while not p.is_busy():
                r = p.get_result()
                if r is None:
                    now = time.perf_counter()
                    results[i].latency = now - sent[i]
                    t_last = max(t_last, now)
                    sel.unregister(key.fileobj)
                    pending -= 1
                    break
                if r.status == pq.ExecStatus.FATAL_ERROR:
                    results[i].sqlstate = (r.error_field(pq.DiagnosticField.SQLSTATE) or b"08006").decode()
                    results[i].message = (r.error_message or b"").decode(errors="replace").strip()
                elif r.status == pq.ExecStatus.TUPLES_OK and r.ntuples:
                    v = r.get_value(0, 0)
                    results[i].value = v.decode() if v is not None else None
    sel.close()
    for i, s in enumerate(sessions):
        results[i].notices = s.notices[marks[i]:]
    return results, t_last - t_first, t_sent


def percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# --------------------------------------------------------------------------------------------
# A key server that never answers
# --------------------------------------------------------------------------------------------


class HangingServer:
    """Accepts TCP connections on 127.0.0.1 and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
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


# --------------------------------------------------------------------------------------------
# The database: one tenant on OpenBao and a value to decrypt
# --------------------------------------------------------------------------------------------

PLAINTEXT = "stampede: the same tenant for everyone"
DECRYPT = "SELECT v::text FROM st_values WHERE tenant = current_setting('app.tenant_id')"


def make_db(cluster, bao, db, tenants=("st",)):
    with cluster.connect() as c:
        c.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {db}")
    with cluster.connect(db) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        c.execute("SELECT envelope.add_key_provider('bao', 'vault_transit', %s)", (bao.options(),))
        c.execute("CREATE TABLE st_values (tenant text PRIMARY KEY, v envelope.encrypted_text)")
        for t in tenants:
            c.execute("SELECT envelope.create_tenant(%s, provider => 'bao')", (t,))
            c.execute("SELECT envelope.grant_tenant(%s, current_user)", (t,))
            with c.transaction():
                c.execute("SELECT set_config('app.tenant_id', %s, true)", (t,))
                c.execute("INSERT INTO st_values VALUES (%s, %s::text)", (t, PLAINTEXT))
    return db
