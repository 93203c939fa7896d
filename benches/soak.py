#!/usr/bin/env python3
"""Soak: many sessions over many tenants for minutes, while the key lifecycle happens under them.

    /var/lib/pg_envelope-dev/py-venv/bin/python benches/soak.py                 # 10 minutes
    /var/lib/pg_envelope-dev/py-venv/bin/python benches/soak.py --duration 60   # the CI variant
    scripts/soak.sh [--duration S] [...]                                         # the same

What runs (issue 16 item 6):

* its own PostgreSQL 15 cluster (instance `pg15-soak`, 127.0.0.1:54342, started through
  scripts/cluster.sh as the postgres user, the maintenance worker in the soak database) and its
  own OpenBao (raft storage, so that the Transit keys survive a restart; 127.0.0.1:8242; the
  private-server class of pg_test/integration/test_lifecycle.py);
* 20 tenants: 12 on an OpenBao provider, 4 on a second OpenBao provider with a 5 s key cache TTL
  (so that an outage puts cached keys into the degraded mode), 4 on `local`; one table with an
  `encrypted_text`, an `encrypted_int8` and an `encrypted_jsonb` column, a tenant column with the
  README's RLS policies, two application roles (one granted every tenant, one the even ones);
* 32 sessions, each a long-lived connection, running transactions as fast as they can: INSERT
  (values of 20 B to 9 KB, so some are TOASTed), UPDATE (all columns, the text only, or the int8
  incremented inside the server), and SELECT-and-verify (point reads, a scan of the newest rows,
  a count that also checks that no other tenant's row is visible), each on a random tenant of its
  role, with `set_config('app.tenant_id', ..., true)` per transaction; plus one "cold" client that
  opens a new connection for every read, so that key loads from the KMS keep happening;
* mid-run, one after the other, at fixed fractions of the duration: data key rotation of four
  tenants and a tenant key rotation of one, then `CALL envelope.reencrypt` of the three columns
  while the writers go on; a tenant suspended and resumed; a lockdown and its lift; OpenBao
  stopped and restarted; and, on their own schedule, two sessions' backends are ended with
  pg_terminate_backend (they reconnect; a COMMIT cut off that way has an unknown outcome).

The client keeps a ledger: every row's committed versions (a plain `ver` column counts updates).
A value is entered as pending before COMMIT, promoted when COMMIT returns, removed when the
transaction failed for certain, and kept as "uncertain" when the outcome of a COMMIT is unknown
(the connection broke during it); the final check accepts either outcome for those. Every value a
session reads is checked against the ledger at once.

Errors are counted by SQLSTATE and phase. Allowed: 57000 "suspended" for the suspended tenant
during its suspension, 57000 "lockdown" during the lockdown, 58000 (KMS unreachable) for OpenBao
tenants from the stop until the restart plus the backends' retry backoff, the degraded-mode
WARNING in that window, and 57P01 or a lost connection for a terminated session. Anything else
fails the run.

At the end, with a new connection per tenant (keys fetched again from the restarted OpenBao):
md5 over every row's id, version and decrypted values, ordered by id, computed in SQL, against the
same digest of the ledger; row counts; rows lost, corrupted or unexpected; every value under its
tenant's active data key version (column_key_versions) and every re-encryption job done; no
lockdown or suspension left; no crash in the server log. Backend RSS (VmRSS, and RssAnon, the
private part) of the sessions' backends and of the postmaster at the start and the end, and
sampled during the run. Summary in target/soak.json (or --json), a table on stdout, exit status 1
on any unexpected error or mismatch.
"""

import argparse
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pg_test" / "integration"))

import psycopg  # noqa: E402
from psycopg.types.json import Jsonb  # noqa: E402

from conftest import BIN, STATE, connect  # noqa: E402
from test_lifecycle import Bao  # noqa: E402  (the private OpenBao: raft storage, start/stop by pid)

DB = "soak"
APP_ALL = "soak_app"  # granted every tenant
APP_EVEN = "soak_app_even"  # granted the even-numbered tenants only
COLUMNS = ("note", "qty", "doc")
SHORT_TTL_S = 5  # key_cache_ttl of the 'bao_short' provider: shorter than the OpenBao outage


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--tenants", type=int, default=20, help="at least 8")
    p.add_argument("--initial-rows", type=int, default=150, help="rows per tenant before the load")
    p.add_argument("--instance", default="pg15-soak")
    p.add_argument("--port", type=int, default=54342)
    p.add_argument("--bao-port", type=int, default=8242)
    p.add_argument("--json", default=str(ROOT / "target" / "soak.json"))
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--think-ms", type=float, default=0.0, help="pause between a session's transactions")
    p.add_argument("--keep", action="store_true", help="leave the cluster and OpenBao running")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.tenants < 8:
        p.error("--tenants must be at least 8")
    return a


def tenant_layout(n):
    """Tenant names and their providers: 60% 'bao', 20% 'bao_short' (5 s TTL), 20% 'local'."""
    names = [f"t{i:02d}" for i in range(n)]
    n_local = max(2, n // 5)
    n_short = max(2, n // 5)
    n_bao = n - n_local - n_short
    prov = {}
    for i, t in enumerate(names):
        prov[t] = "bao" if i < n_bao else "bao_short" if i < n_bao + n_short else "local"
    return names, prov


class Schedule:
    """When each event starts (seconds into the load) and how long its state is held."""

    def __init__(self, duration):
        d = duration
        self.rotate_at = 0.12 * d
        self.suspend_at = 0.35 * d
        self.suspend_hold = max(3.0, 0.06 * d)
        self.lockdown_at = 0.52 * d
        self.lockdown_hold = max(2.0, 0.04 * d)
        self.bao_at = 0.66 * d
        self.bao_hold = max(SHORT_TTL_S + 2.0, 0.05 * d)
        self.terminate_at = (0.25 * d, 0.88 * d)  # a session's backend ended by pg_terminate_backend


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Values: generated per row version; jsonb's text form reproduced for the digest.
# --------------------------------------------------------------------------------------------

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 äöüßé€漢字😀-_.,"


def jsonb_string(s):
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\b":
            out.append("\\b")
        elif ch == "\f":
            out.append("\\f")
        elif o < 0x20:
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def jsonb_text(v):
    """PostgreSQL's text output of a jsonb value: object keys ordered by length, then bytes."""
    if isinstance(v, dict):
        keys = sorted(v, key=lambda k: (len(k.encode()), k.encode()))
        return "{" + ", ".join(f"{jsonb_string(k)}: {jsonb_text(v[k])}" for k in keys) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(jsonb_text(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return jsonb_string(v)
    raise TypeError(type(v))


def gen_note(rng, tenant, rid):
    r = rng.random()
    n = rng.randint(20, 200) if r < 0.90 else rng.randint(500, 1500) if r < 0.98 else rng.randint(3000, 9000)
    return f"{tenant}|{rid}|" + "".join(rng.choice(ALPHABET) for _ in range(n))


def gen_qty(rng):
    return None if rng.random() < 0.05 else rng.randint(-(2**62), 2**62)


def gen_doc(rng, tenant, rid):
    if rng.random() < 0.03:
        return None
    return {
        "id": rid,
        "t": tenant,
        "k": "%08x" % rng.getrandbits(32),
        "tags": [rng.choice(["a", "bb", "ccc", "ü", "€"]) for _ in range(rng.randint(0, 4))],
        "deep": {"n": rng.randint(0, 10**9), "flag": rng.random() < 0.5, "none": None},
    }


def vdigest(note, qty, doc):
    """md5 of one row version's plaintexts, as VALUES_MD5 computes it in SQL. The ledger keeps
    these 16 bytes per version rather than the values."""
    text = "|".join(("<null>" if note is None else note, "<null>" if qty is None else str(qty),
                     "<null>" if doc is None else jsonb_text(doc)))
    return hashlib.md5(text.encode()).digest()


VALUES_MD5 = ("md5(coalesce(note::text, '<null>') || '|' || coalesce((qty::int8)::text, '<null>') || '|' "
              "|| coalesce((doc::jsonb)::text, '<null>'))")
# Per tenant: md5 over the lines "id|ver|md5(plaintexts)" ordered by id, every value decrypted.
DIGEST_SQL = (
    f"SELECT count(*), md5(coalesce(string_agg(id::text || '|' || ver::text || '|' || {VALUES_MD5}, E'\\n' ORDER BY id), '')) "
    "FROM items WHERE tenant = %s"
)


def ledger_digest(rows):
    """The client side of DIGEST_SQL: rows = [(id, ver, vdigest)] ordered by id."""
    return hashlib.md5("\n".join(f"{rid}|{ver}|{d.hex()}" for rid, ver, d in rows).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------------

KEEP_VERSIONS = 64  # per row: older versions are forgotten (a reader that old is reported, not failed)


class Row:
    __slots__ = ("tenant", "committed", "versions", "pending", "uncertain", "insert_uncertain")

    def __init__(self, tenant):
        self.tenant = tenant
        self.committed = None  # highest committed version (None: not committed yet)
        self.versions = {}  # ver -> vdigest of (note, qty, doc), committed
        self.pending = {}  # ver -> [(token, vdigest)]: written, COMMIT not returned yet
        self.uncertain = {}  # ver -> vdigest: COMMIT outcome unknown
        self.insert_uncertain = False


class Ledger:
    def __init__(self, tenants):
        self.lock = threading.Lock()
        self.rows = {}
        self.ids = {t: [] for t in tenants}  # committed ids per tenant (for sampling)
        self.tokens = itertools.count(1)
        self.next_id = itertools.count(1)
        self.stats = Counter()

    def new_id(self):
        with self.lock:
            return next(self.next_id)

    def seed(self, tenant, rid, vals):
        d = vdigest(*vals)
        with self.lock:
            r = self.rows[rid] = Row(tenant)
            r.committed = 1
            r.versions[1] = d
            self.ids[tenant].append(rid)

    def pending(self, tenant, rid, ver, vals, insert):
        """Before the statement that writes it: the value may become visible to others once COMMIT
        is sent, so it is known here first."""
        vals = vdigest(*vals)
        with self.lock:
            tok = next(self.tokens)
            r = self.rows.get(rid)
            if r is None:
                assert insert
                r = self.rows[rid] = Row(tenant)
            r.pending.setdefault(ver, []).append((tok, vals))
            return (rid, ver, tok, insert)

    def _take(self, r, ver, tok):
        lst = r.pending.get(ver, [])
        for i, (t, vals) in enumerate(lst):
            if t == tok:
                del lst[i]
                if not lst:
                    del r.pending[ver]
                return vals
        raise AssertionError("ledger: pending entry vanished")

    def commit(self, entries):
        with self.lock:
            for rid, ver, tok, insert in entries:
                r = self.rows[rid]
                vals = self._take(r, ver, tok)
                r.versions[ver] = vals
                if insert and r.committed is None:
                    self.ids[r.tenant].append(rid)
                if r.committed is None or ver > r.committed:
                    r.committed = ver
                    for old in [v for v in r.versions if v < ver - KEEP_VERSIONS]:
                        del r.versions[old]
                self.stats["committed_writes"] += 1

    def abort(self, entries):
        with self.lock:
            for rid, ver, tok, insert in entries:
                r = self.rows[rid]
                self._take(r, ver, tok)
                if insert and r.committed is None and not r.pending and not r.uncertain:
                    del self.rows[rid]
                self.stats["aborted_writes"] += 1

    def uncertain(self, entries):
        with self.lock:
            for rid, ver, tok, insert in entries:
                r = self.rows[rid]
                r.uncertain[ver] = self._take(r, ver, tok)
                if insert and r.committed is None:
                    r.insert_uncertain = True
                self.stats["uncertain_writes"] += 1

    def sample(self, rng, tenant, k):
        with self.lock:
            ids = self.ids[tenant]
            if not ids:
                return []
            return [rng.choice(ids) for _ in range(k)]

    def committed_count(self, tenant):
        with self.lock:
            return len(self.ids[tenant])

    def check(self, rid, tenant, ver, vals, must_be_latest=False):
        """A value read from the database: 'ok', or a description of what is wrong."""
        vals = vdigest(*vals)
        with self.lock:
            r = self.rows.get(rid)
            if r is None:
                return f"row {rid} is not in the ledger"
            if r.tenant != tenant:
                return f"row {rid} belongs to {r.tenant}, read as {tenant}"
            cands = []
            if ver in r.versions:
                cands.append(r.versions[ver])
            cands += [v for _t, v in r.pending.get(ver, [])]
            if ver in r.uncertain:
                cands.append(r.uncertain[ver])
            if not cands:
                if r.committed is not None and ver < r.committed - KEEP_VERSIONS:
                    self.stats["reads_too_old_to_check"] += 1
                    return "ok"
                return f"row {rid}: version {ver} was never written (committed {r.committed})"
            if vals not in cands:
                return f"row {rid} version {ver}: the decrypted values differ from what was written"
            if must_be_latest and r.committed is not None and ver < r.committed:
                return f"row {rid}: read version {ver} under a row lock, but {r.committed} was committed"
            return "ok"


# --------------------------------------------------------------------------------------------
# Timeline: phases and the windows in which refusals are expected
# --------------------------------------------------------------------------------------------


class Timeline:
    def __init__(self):
        self.t0 = None
        self.phase = "setup"
        self.windows = []  # dicts: kind, start, end, tenant/tenants, grace
        self.events = []  # (t, text)
        self.lock = threading.Lock()

    def now(self):
        return time.monotonic() - self.t0 if self.t0 else 0.0

    def set_phase(self, phase):
        with self.lock:
            self.phase = phase
            self.events.append((round(self.now(), 2), f"phase {phase}"))

    def note(self, text):
        with self.lock:
            self.events.append((round(self.now(), 2), text))
        log(f"t={self.now():6.1f}s {text}")

    def open_window(self, kind, **kw):
        w = dict(kind=kind, start=self.now(), end=None, **kw)
        with self.lock:
            self.windows.append(w)
        return w

    def close_window(self, w, grace=0.0):
        w["end"] = self.now()
        w["grace"] = grace


# --------------------------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------------------------


class Stats:
    """Per-session counters, merged at the end (no lock on the hot path)."""

    def __init__(self):
        self.ops = Counter()  # kind -> committed transactions
        self.ops_phase = Counter()  # (phase, kind)
        self.errors = []  # dicts
        self.warnings = []  # (t, phase, message)
        self.mismatches = []  # str
        self.latencies = defaultdict(list)  # kind -> seconds (sampled)


def rss_of(pid):
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssShmem", "VmHWM"):
                out[k] = int(v.split()[0])  # kB
    except (FileNotFoundError, ProcessLookupError):
        return None
    return out


class Session(threading.Thread):
    def __init__(self, idx, soak, role, tenants):
        super().__init__(daemon=True, name=f"session-{idx}")
        self.idx = idx
        self.soak = soak
        self.role = role
        self.tenants = tenants
        self.rng = random.Random(soak.seed * 1000 + idx)
        self.stats = Stats()
        self.conn = None
        self.pid = None
        self.pids = []  # every backend this session had (reconnects)
        self.rss_start = None
        self.last_progress = time.monotonic()
        self.ready = threading.Event()

    # -- connection --------------------------------------------------------------------------

    def connect(self):
        for attempt in range(60):
            try:
                c = connect(self.soak.args.port, DB, user=self.role)
                break
            except psycopg.OperationalError:
                if attempt == 59:
                    raise
                time.sleep(1)
        c.add_notice_handler(self._notice)
        c.execute("SET statement_timeout = '120s'")
        self.conn = c
        self.pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        self.pids.append(self.pid)

    def _notice(self, d):
        if (d.severity_nonlocalized or "") in ("WARNING", "ERROR"):
            tl = self.soak.tl
            self.stats.warnings.append((round(tl.now(), 2), tl.phase, d.message_primary or ""))

    # -- one transaction ---------------------------------------------------------------------

    def run(self):
        try:
            self.connect()
            self.one_tx(warm=True)  # a first transaction, so that the start RSS is a working backend's
            self.rss_start = rss_of(self.pid)
            self.ready.set()
            self.soak.go.wait()
            while not self.soak.stop.is_set():
                self.one_tx()
                self.last_progress = time.monotonic()
                if self.soak.args.think_ms:
                    time.sleep(self.soak.args.think_ms / 1000)
        except Exception:  # noqa: BLE001 - a client bug: report it, fail the run
            self.stats.mismatches.append("session crashed: " + traceback.format_exc())
            self.ready.set()

    def one_tx(self, warm=False):
        rng = self.rng
        tenant = rng.choice(self.tenants)
        r = rng.random()
        kind = "read" if warm else "insert" if r < 0.30 else "update" if r < 0.65 else "read"
        c = self.conn
        tl = self.soak.tl
        entries = []
        t_start = time.monotonic()
        phase = tl.phase
        try:
            c.execute("BEGIN")
            c.execute("SELECT set_config('app.tenant_id', %s, true)", (tenant,), prepare=True)
            if kind == "insert":
                kind = self.tx_insert(c, rng, tenant, entries)
            elif kind == "update":
                kind = self.tx_update(c, rng, tenant, entries)
            else:
                kind = self.tx_read(c, rng, tenant)
        except psycopg.Error as e:
            self.fail(e, tenant, kind, "statement", entries, phase)
            return
        try:
            c.execute("COMMIT")
        except psycopg.Error as e:
            self.fail(e, tenant, kind, "commit", entries, phase)
            return
        self.soak.ledger.commit(entries)
        self.stats.ops[kind] += 1
        self.stats.ops_phase[(phase, kind)] += 1
        if rng.random() < 0.05:
            self.stats.latencies[kind].append(time.monotonic() - t_start)

    def fail(self, e, tenant, kind, stage, entries, phase):
        c = self.conn
        broken = c.broken or c.closed or e.sqlstate is None or (e.sqlstate or "").startswith(("08", "57P"))
        if stage == "commit" and broken:
            # The COMMIT was sent; whether it happened is unknown: either outcome is accepted.
            self.soak.ledger.uncertain(entries)
        else:
            self.soak.ledger.abort(entries)
        tl = self.soak.tl
        self.stats.errors.append(dict(
            t=round(tl.now(), 3), phase=phase, session=self.idx, tenant=tenant, kind=kind, stage=stage,
            sqlstate=e.sqlstate, message=(e.diag.message_primary or str(e))[:300] if hasattr(e, "diag") else str(e)[:300],
        ))
        if broken:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
            self.connect()
        else:
            try:
                c.execute("ROLLBACK")
            except psycopg.Error:
                try:
                    c.close()
                except Exception:  # noqa: BLE001
                    pass
                self.connect()

    def tx_insert(self, c, rng, tenant, entries):
        n = 1 if rng.random() < 0.8 else rng.randint(2, 5)
        for _ in range(n):
            rid = self.soak.ledger.new_id()
            vals = (gen_note(rng, tenant, rid), gen_qty(rng), gen_doc(rng, tenant, rid))
            entries.append(self.soak.ledger.pending(tenant, rid, 1, vals, insert=True))
            c.execute(
                "INSERT INTO items (id, tenant, ver, note, qty, doc) VALUES (%s, %s, 1, %s::text, %s::int8, %s::jsonb)",
                (rid, tenant, vals[0], vals[1], None if vals[2] is None else Jsonb(vals[2])),
                prepare=True,
            )
        return "insert"

    def tx_update(self, c, rng, tenant, entries):
        ids = self.soak.ledger.sample(rng, tenant, 1)
        if not ids:
            return self.tx_insert(c, rng, tenant, entries)
        rid = ids[0]
        row = c.execute(
            "SELECT ver, note::text, qty::int8, doc::jsonb FROM items WHERE id = %s FOR UPDATE", (rid,), prepare=True
        ).fetchone()
        if row is None:
            self.mismatch(f"row {rid} of {tenant} (committed) not found by UPDATE's SELECT FOR UPDATE")
            return "update"
        ver, note, qty, doc = row
        verdict = self.soak.ledger.check(rid, tenant, ver, (note, qty, doc), must_be_latest=True)
        if verdict != "ok":
            self.mismatch(verdict)
        mode = rng.random()
        new = ver + 1
        if mode < 0.5:
            vals = (gen_note(rng, tenant, rid), gen_qty(rng), gen_doc(rng, tenant, rid))
            entries.append(self.soak.ledger.pending(tenant, rid, new, vals, insert=False))
            n = c.execute(
                "UPDATE items SET ver = %s, note = %s::text, qty = %s::int8, doc = %s::jsonb WHERE id = %s",
                (new, vals[0], vals[1], None if vals[2] is None else Jsonb(vals[2]), rid), prepare=True,
            ).rowcount
            kind = "update_all"
        elif mode < 0.8:
            vals = (gen_note(rng, tenant, rid), qty, doc)
            entries.append(self.soak.ledger.pending(tenant, rid, new, vals, insert=False))
            n = c.execute("UPDATE items SET ver = %s, note = %s::text WHERE id = %s", (new, vals[0], rid), prepare=True).rowcount
            kind = "update_text"
        else:
            # Decrypt, add and encrypt again inside the server.
            want = (qty or 0) + 1 if (qty or 0) < 2**62 else 0
            vals = (note, want, doc)
            entries.append(self.soak.ledger.pending(tenant, rid, new, vals, insert=False))
            got = c.execute(
                "UPDATE items SET ver = %s, qty = CASE WHEN coalesce(qty::int8, 0) < 4611686018427387904 "
                "THEN coalesce(qty::int8, 0) + 1 ELSE 0 END WHERE id = %s RETURNING qty::int8",
                (new, rid), prepare=True,
            ).fetchall()
            n = len(got)
            if got and got[0][0] != want:
                self.mismatch(f"row {rid}: qty incremented in the server to {got[0][0]}, expected {want}")
            kind = "update_incr"
        if n != 1:
            self.mismatch(f"row {rid}: UPDATE changed {n} rows")
        return kind

    def tx_read(self, c, rng, tenant):
        r = rng.random()
        if r < 0.6:
            ids = sorted(set(self.soak.ledger.sample(rng, tenant, rng.randint(1, 5))))
            if not ids:
                return "read_point"
            rows = c.execute(
                "SELECT id, tenant, ver, note::text, qty::int8, doc::jsonb FROM items WHERE id = ANY(%s) ORDER BY id",
                (ids,), prepare=True,
            ).fetchall()
            if [x[0] for x in rows] != ids:
                self.mismatch(f"{tenant}: point read of {ids} returned {[x[0] for x in rows]}")
            self.verify_rows(rows, tenant)
            return "read_point"
        if r < 0.85:
            rows = c.execute(
                "SELECT id, tenant, ver, envelope.decrypt_field(note), qty::int8, doc::jsonb FROM items "
                "WHERE tenant = %s ORDER BY id DESC LIMIT 40", (tenant,), prepare=True,
            ).fetchall()
            self.verify_rows(rows, tenant)
            return "read_scan"
        # A count under RLS: bounded by the committed rows before and what may commit meanwhile;
        # no row of another tenant is visible.
        low = self.soak.ledger.committed_count(tenant)
        n, others, decrypted = c.execute(
            "SELECT count(*), count(*) FILTER (WHERE tenant <> %s), count(qty::int8) FILTER (WHERE id %% 64 = 0) FROM items",
            (tenant,), prepare=True,
        ).fetchone()
        if others:
            self.mismatch(f"{tenant}: {others} rows of other tenants visible under RLS")
        if n < low:
            self.mismatch(f"{tenant}: count(*) = {n} below the {low} committed rows")
        self.stats.ops["values_decrypted_by_counts"] += decrypted
        return "read_count"

    def verify_rows(self, rows, tenant):
        for rid, t, ver, note, qty, doc in rows:
            if t != tenant or not (note is None or note.startswith(f"{tenant}|{rid}|")):
                self.mismatch(f"row {rid}: tenant {t} / text prefix {note[:20] if note else None!r} read as {tenant}")
                continue
            verdict = self.soak.ledger.check(rid, tenant, ver, (note, qty, doc))
            if verdict != "ok":
                self.mismatch(verdict)

    def mismatch(self, text):
        tl = self.soak.tl
        self.stats.mismatches.append(f"t={tl.now():.1f}s phase={tl.phase} session={self.idx}: {text}")


class ColdClient(threading.Thread):
    """A new connection for every read: each one loads the tenant's keys from its provider, so an
    outage of the KMS is seen (58000) and so is its end."""

    def __init__(self, soak, tenants):
        super().__init__(daemon=True, name="cold")
        self.soak = soak
        self.tenants = tenants
        self.rng = random.Random(soak.seed * 1000 + 999)
        self.stats = Stats()
        self.outcomes = []  # (t, tenant, ok)

    def run(self):
        s = self.soak
        s.go.wait()
        while not s.stop.is_set():
            tenant = self.rng.choice(self.tenants)
            phase = s.tl.phase
            try:
                with connect(s.args.port, DB, user=APP_ALL) as c:
                    c.add_notice_handler(lambda d: self.stats.warnings.append((round(s.tl.now(), 2), s.tl.phase, d.message_primary or ""))
                                         if d.severity_nonlocalized == "WARNING" else None)
                    ids = s.ledger.sample(self.rng, tenant, 1)
                    with c.transaction():
                        c.execute("SELECT set_config('app.tenant_id', %s, true)", (tenant,))
                        if ids:
                            row = c.execute(
                                "SELECT id, tenant, ver, note::text, qty::int8, doc::jsonb FROM items WHERE id = %s", (ids[0],)
                            ).fetchone()
                            verdict = s.ledger.check(row[0], tenant, row[2], tuple(row[3:])) if row else f"row {ids[0]} missing"
                            if verdict != "ok":
                                self.stats.mismatches.append(f"t={s.tl.now():.1f}s cold: {verdict}")
                self.stats.ops["cold_read"] += 1
                self.stats.ops_phase[(phase, "cold_read")] += 1
                self.outcomes.append((round(s.tl.now(), 2), tenant, True))
            except psycopg.Error as e:
                self.stats.errors.append(dict(
                    t=round(s.tl.now(), 3), phase=phase, session="cold", tenant=tenant, kind="cold_read", stage="statement",
                    sqlstate=e.sqlstate, message=(e.diag.message_primary or str(e))[:300],
                ))
                self.outcomes.append((round(s.tl.now(), 2), tenant, False))
            time.sleep(0.15)


# --------------------------------------------------------------------------------------------
# The soak
# --------------------------------------------------------------------------------------------


def sh(*cmd, env=None, check=True):
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


class Soak:
    def __init__(self, args):
        self.args = args
        self.seed = args.seed if args.seed is not None else random.randrange(1 << 30)
        self.tenants, self.provider = tenant_layout(args.tenants)
        self.sched = Schedule(args.duration)
        self.tl = Timeline()
        self.ledger = Ledger(self.tenants)
        self.go = threading.Event()
        self.stop = threading.Event()
        self.env = {"PGE_INSTANCE": args.instance, "PGE_PORT": str(args.port)}
        self.data = STATE / args.instance / "data"
        self.server_log = STATE / args.instance / "server.log"
        self.bao = None
        self.event_log = {}
        self.event_errors = []
        self.rss_series = []
        self.reencrypt = {}
        rng = random.Random(self.seed)
        bao_tenants = [t for t in self.tenants if self.provider[t] == "bao"]
        short = [t for t in self.tenants if self.provider[t] == "bao_short"]
        local = [t for t in self.tenants if self.provider[t] == "local"]
        # Rotation: two on the long-TTL provider, one short-TTL, one local; another one gets a new
        # tenant key; a different one is suspended.
        self.rotated = sorted(rng.sample(bao_tenants, 2) + rng.sample(short, 1) + rng.sample(local, 1))
        rest = [t for t in bao_tenants if t not in self.rotated]
        self.kek_rotated = rng.choice(rest)
        self.suspended = rng.choice([t for t in rest if t != self.kek_rotated])

    # -- cluster and key server --------------------------------------------------------------

    def pg_ctl(self, *a):
        return sh("sudo", "-u", "postgres", "-H", "--", "env", f"SOFTHSM2_CONF={STATE}/softhsm/softhsm2.conf",
                  f"{BIN}/pg_ctl", "-D", str(self.data), *a)

    def admin(self, db=DB):
        c = connect(self.args.port, db)
        return c

    def port_owner(self, port):
        """The command line of whatever listens on 127.0.0.1:port, or None."""
        out = sh("ss", "-Hltnp", f"sport = :{port}", check=False).stdout
        if not out.strip():
            return None
        pid = out.split("pid=")[1].split(",")[0] if "pid=" in out else "?"
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            return f"pid {pid}"

    def start_cluster(self):
        owner = self.port_owner(self.args.port)
        if owner and str(self.data) not in owner:
            raise SystemExit(f"port {self.args.port} is taken by another server ({owner}): choose --port/--instance")
        owner = self.port_owner(self.args.bao_port)
        if owner and f"lc-{self.args.bao_port}" not in owner:
            raise SystemExit(f"port {self.args.bao_port} is taken by another server ({owner}): choose --bao-port")
        sh("bash", str(ROOT / "scripts/cluster.sh"), "start", env=self.env)
        with connect(self.args.port, "postgres") as c:
            # The maintenance worker runs in the soak database (it is where a deployment runs it).
            want = {"envelope.database": DB, "max_connections": "200"}
            cur = {k: c.execute(f"SHOW {k}").fetchone()[0] for k in want}
            changed = False
            for k, v in want.items():
                if cur[k] != v:
                    c.execute(f"ALTER SYSTEM SET {k} = '{v}'")
                    changed = True
            if c.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_envelope'").fetchone():
                raise RuntimeError("pg_envelope is installed in the postgres database of the soak cluster")
        if changed:
            log("restarting the soak cluster for envelope.database / max_connections")
            self.pg_ctl("-w", "-m", "fast", "restart", "-l", str(self.server_log))

    def postmaster_pid(self):
        return int((self.data / "postmaster.pid").read_text().split("\n")[0])

    def start_bao(self):
        self.bao = Bao(port=self.args.bao_port).init()

    def setup_db(self):
        with connect(self.args.port, "postgres") as c:
            c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
            c.execute(f"CREATE DATABASE {DB}")
            for role in (APP_ALL, APP_EVEN):
                c.execute(f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') "
                          f"THEN CREATE ROLE {role} LOGIN; END IF; END $$")
        with self.admin() as c:
            c.execute("CREATE EXTENSION pg_envelope")
            if c.execute("SELECT (envelope.status()->'lockdown'->>'active')::boolean").fetchone()[0]:
                log("a lockdown was left by an earlier run: lifting it")
                c.execute("SELECT envelope.lift_lockdown()")
            c.execute("SELECT envelope.add_key_provider('bao', 'vault_transit', %s)", (self.bao.provider_options("lc-root"),))
            opts = dict(self.bao.provider_options("lc-root-2").obj, key_cache_ttl=f"{SHORT_TTL_S}s")
            c.execute("SELECT envelope.add_key_provider('bao_short', 'vault_transit', %s)", (Jsonb(opts),))
            for i, t in enumerate(self.tenants):
                c.execute("SELECT envelope.create_tenant(%s, provider => %s)", (t, self.provider[t]))
                c.execute("SELECT envelope.grant_tenant(%s, %s)", (t, APP_ALL))
                if i % 2 == 0:
                    c.execute("SELECT envelope.grant_tenant(%s, %s)", (t, APP_EVEN))
            c.execute(
                f"""
                CREATE TABLE items (
                  id     bigint PRIMARY KEY,
                  tenant text NOT NULL DEFAULT envelope.authorized_tenant(),
                  ver    integer NOT NULL,
                  note   envelope.encrypted_text,
                  qty    envelope.encrypted_int8,
                  doc    envelope.encrypted_jsonb
                );
                CREATE INDEX items_tenant ON items (tenant, id);
                ALTER TABLE items ENABLE ROW LEVEL SECURITY;
                ALTER TABLE items FORCE ROW LEVEL SECURITY;
                CREATE POLICY tenant_isolation ON items
                  USING (tenant = envelope.authorized_tenant())
                  WITH CHECK (tenant = envelope.authorized_tenant() AND envelope.belongs_to(note, tenant)
                              AND envelope.belongs_to(qty, tenant) AND envelope.belongs_to(doc, tenant));
                GRANT SELECT, INSERT, UPDATE ON items TO {APP_ALL}, {APP_EVEN};
                """
            )
            # The digest's jsonb text rule, checked against the server once.
            rng = random.Random(1)
            for _ in range(20):
                d = gen_doc(rng, "t00", 1) or {"x": None}
                got = c.execute("SELECT (%s::text)::jsonb::text", (json.dumps(d, ensure_ascii=False),)).fetchone()[0]
                assert got == jsonb_text(d), (got, jsonb_text(d))
        rng = random.Random(self.seed + 1)
        with connect(self.args.port, DB, user=APP_ALL) as c:
            for t in self.tenants:
                rows = []
                for _ in range(self.args.initial_rows):
                    rid = self.ledger.new_id()
                    rows.append((rid, (gen_note(rng, t, rid), gen_qty(rng), gen_doc(rng, t, rid))))
                with c.transaction():
                    c.execute("SELECT set_config('app.tenant_id', %s, true)", (t,))
                    c.execute(
                        "INSERT INTO items (id, tenant, ver, note, qty, doc) SELECT i, %s, 1, n, q, d "
                        "FROM unnest(%s::bigint[], %s::text[], %s::int8[], %s::jsonb[]) AS u(i, n, q, d)",
                        (t, [r for r, _ in rows], [v[0] for _, v in rows], [v[1] for _, v in rows],
                         [None if v[2] is None else Jsonb(v[2]) for _, v in rows]),
                    )
                for rid, vals in rows:
                    self.ledger.seed(t, rid, vals)
        with self.admin() as c:
            c.execute("VACUUM ANALYZE items")

    # -- events --------------------------------------------------------------------------------

    def wait_until_t(self, at):
        while not self.stop.is_set() and self.tl.now() < at:
            time.sleep(min(0.2, max(0.01, at - self.tl.now())))
        return not self.stop.is_set()

    def events(self):
        s = self.sched
        tl = self.tl
        try:
            if self.wait_until_t(s.rotate_at):
                self.ev_rotate_and_reencrypt()
            if self.wait_until_t(s.suspend_at):
                self.ev_suspend()
            if self.wait_until_t(s.lockdown_at):
                self.ev_lockdown()
            if self.wait_until_t(s.bao_at):
                self.ev_bao_restart()
            tl.set_phase("steady")
        except Exception:  # noqa: BLE001 - an event that fails fails the run
            self.event_errors.append(traceback.format_exc())
            tl.note("EVENT FAILED: " + traceback.format_exc().splitlines()[-1])
            tl.set_phase("steady")

    def ev_rotate_and_reencrypt(self):
        tl = self.tl
        ev = self.event_log["rotation"] = {"tenants": self.rotated, "tenant_key": self.kek_rotated}
        tl.set_phase("rotate")
        with self.admin() as c:
            ev["new_versions"] = {t: c.execute("SELECT envelope.rotate_data_key(%s)", (t,)).fetchone()[0] for t in self.rotated}
            ev["tenant_key_generation"] = c.execute("SELECT envelope.rotate_tenant_key(%s)", (self.kek_rotated,)).fetchone()[0]
            ev["t_rotated"] = round(tl.now(), 2)
            tl.note(f"rotated data keys of {self.rotated} -> {ev['new_versions']}, tenant key of {self.kek_rotated}")
            tl.set_phase("reencrypt")
            notices = []
            c.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.message_primary or "")))
            jobs = {}
            for col in COLUMNS:
                t0 = time.monotonic()
                calls = 0
                while True:
                    calls += 1
                    c.execute("CALL envelope.reencrypt('items', %s, batch_rows => 2000, pause => '20ms')", (col,))
                    job = c.execute(
                        "SELECT id, state, values_done, values_remaining, pass, batches FROM envelope.reencrypt_jobs "
                        "WHERE column_name = %s ORDER BY id DESC LIMIT 1", (col,)
                    ).fetchone()
                    if job[1] == "done" and job[3] == 0 or calls >= 5:
                        break
                jobs[col] = dict(job=job[0], state=job[1], values_done=job[2], values_remaining=job[3], passes=job[4],
                                 batches=job[5], calls=calls, seconds=round(time.monotonic() - t0, 2))
                tl.note(f"reencrypt {col}: {jobs[col]}")
            ev["reencrypt"] = jobs
            ev["notices"] = [m for sev, m in notices if sev == "WARNING"][:10]
            ev["t_done"] = round(tl.now(), 2)
        tl.set_phase("steady")

    def ev_suspend(self):
        tl = self.tl
        t = self.suspended
        tl.set_phase("suspend")
        w = tl.open_window("suspend", tenant=t)
        with self.admin() as c:
            assert c.execute("SELECT envelope.suspend_tenant(%s, 'soak: suspended mid-run')", (t,)).fetchone()[0] is True
            tl.note(f"suspended {t}")
            time.sleep(self.sched.suspend_hold)
            assert c.execute("SELECT envelope.resume_tenant(%s)", (t,)).fetchone()[0] is True
        tl.close_window(w, grace=1.0)
        tl.note(f"resumed {t}")
        self.event_log["suspend"] = {"tenant": t, "start": round(w["start"], 2), "end": round(w["end"], 2)}
        tl.set_phase("steady")

    def ev_lockdown(self):
        tl = self.tl
        tl.set_phase("lockdown")
        w = tl.open_window("lockdown")
        with self.admin() as c:
            assert c.execute("SELECT envelope.lockdown('soak: lockdown mid-run')").fetchone()[0] is True
            tl.note("lockdown")
            time.sleep(self.sched.lockdown_hold)
            assert c.execute("SELECT envelope.lift_lockdown()").fetchone()[0] is True
        tl.close_window(w, grace=1.0)
        tl.note("lockdown lifted")
        self.event_log["lockdown"] = {"start": round(w["start"], 2), "end": round(w["end"], 2)}
        tl.set_phase("steady")

    def ev_bao_restart(self):
        tl = self.tl
        tl.set_phase("bao_down")
        w = tl.open_window("kms_down", providers=("bao", "bao_short"))
        t0 = time.monotonic()
        self.bao.stop()
        tl.note("OpenBao stopped")
        time.sleep(self.sched.bao_hold)
        down = time.monotonic() - t0
        self.bao.start()
        took = time.monotonic() - t0 - down
        # Backends that failed cold loads during the outage retry after an exponential backoff
        # (1 s, 2 s, 4 s ... with +-25% jitter): a 58000 stays possible that long after the restart.
        grace = min(80.0, 1.3 * (down + took) + 5.0)
        tl.close_window(w, grace=grace)
        tl.note(f"OpenBao restarted and unsealed ({took:.1f} s to start); refusals allowed for {grace:.0f} s more")
        self.event_log["openbao_restart"] = {"stopped_at": round(w["start"], 2), "down_s": round(down, 2),
                                             "start_s": round(took, 2), "up_at": round(w["end"], 2), "grace_s": round(grace, 1)}
        tl.set_phase("bao_recovery")
        self.wait_until_t(w["end"] + grace)

    def terminator(self):
        """Ends one session's backend with pg_terminate_backend at each of the scheduled times: the
        session sees 57P01 or a lost connection, reconnects, and its transaction's outcome is
        either a definite rollback or, if the end came during COMMIT, uncertain for the ledger."""
        rng = random.Random(self.seed + 2)
        done = self.event_log.setdefault("terminations", [])
        victims = rng.sample(range(len(self.sessions)), len(self.sched.terminate_at))
        for at, idx in zip(self.sched.terminate_at, victims):
            if not self.wait_until_t(at):
                return
            s = self.sessions[idx]
            w = self.tl.open_window("terminate", session=idx)
            try:
                with self.admin() as c:
                    ok = c.execute("SELECT pg_terminate_backend(%s)", (s.pid,)).fetchone()[0]
            except Exception:  # noqa: BLE001
                self.event_errors.append(traceback.format_exc())
                ok = False
            self.tl.close_window(w, grace=10.0)
            done.append({"t": round(w["start"], 2), "session": idx, "pid": s.pid, "terminated": ok})
            self.tl.note(f"terminated the backend of session {idx} (pid {s.pid}): {ok}")

    # -- monitoring ------------------------------------------------------------------------

    def monitor(self):
        step = max(2.0, self.args.duration / 30)
        pm = self.postmaster_pid()
        while not self.stop.wait(step):
            vals = [x["VmRSS"] for s in self.sessions if (x := rss_of(s.pid))]
            anon = [x["RssAnon"] for s in self.sessions if (x := rss_of(s.pid))]
            pmr = rss_of(pm) or {}
            ops = sum(sum(v for k, v in s.stats.ops.items() if k != "values_decrypted_by_counts") for s in self.sessions)
            stuck = [s.idx for s in self.sessions if time.monotonic() - s.last_progress > 120]
            self.rss_series.append(dict(t=round(self.tl.now(), 1), phase=self.tl.phase, ops=ops,
                                        backend_rss_median_kb=statistics.median(vals) if vals else None,
                                        backend_rss_anon_median_kb=statistics.median(anon) if anon else None,
                                        backend_rss_max_kb=max(vals) if vals else None, postmaster_rss_kb=pmr.get("VmRSS")))
            if stuck:
                self.tl.note(f"sessions without progress for 120 s: {stuck}")
            if not self.args.quiet:
                log(f"t={self.tl.now():6.1f}s phase={self.tl.phase:12s} tx={ops:8d} backend RSS median "
                    f"{(statistics.median(vals) if vals else 0) / 1024:.1f} MiB (anon {(statistics.median(anon) if anon else 0) / 1024:.1f})")

    # -- run -------------------------------------------------------------------------------

    def run(self):
        a = self.args
        log(f"seed {self.seed}; {a.sessions} sessions, {len(self.tenants)} tenants, {a.duration:.0f} s; "
            f"cluster {a.instance} on {a.port}, OpenBao on {a.bao_port}")
        self.start_cluster()
        log_offset = self.server_log.stat().st_size if self.server_log.exists() else 0
        self.start_bao()
        self.setup_db()
        log(f"setup done: {len(self.ledger.rows)} rows; rotate {self.rotated}, new tenant key {self.kek_rotated}, "
            f"suspend {self.suspended}")
        even = [t for i, t in enumerate(self.tenants) if i % 2 == 0]
        self.sessions = [
            Session(i, self, APP_EVEN if i % 4 == 3 else APP_ALL, even if i % 4 == 3 else self.tenants) for i in range(a.sessions)
        ]
        for s in self.sessions:
            s.start()
        for s in self.sessions:
            s.ready.wait(120)
        pm = self.postmaster_pid()
        rss_start = {s.idx: s.rss_start for s in self.sessions}
        pm_start = rss_of(pm)
        self.cold = ColdClient(self, [t for t in self.tenants if self.provider[t] != "local"] + [self.tenants[-1]])
        self.cold.start()
        self.tl.t0 = time.monotonic()
        self.tl.set_phase("steady")
        self.go.set()
        ev = threading.Thread(target=self.events, daemon=True, name="events")
        ev.start()
        mon = threading.Thread(target=self.monitor, daemon=True, name="monitor")
        mon.start()
        term = threading.Thread(target=self.terminator, daemon=True, name="terminator")
        term.start()
        self.wait_until_t(a.duration)
        # Events still in progress are finished before the load stops (a late re-encryption).
        ev.join(timeout=600)
        self.stop.set()
        load_s = self.tl.now()
        for s in self.sessions:
            s.join(180)
        self.cold.join(60)
        mon.join(10)
        term.join(10)
        hung = [s.idx for s in self.sessions if s.is_alive()]
        rss_end = {s.idx: rss_of(s.pid) for s in self.sessions}
        pm_end = rss_of(pm)
        same_backend = [s.idx for s in self.sessions if len(s.pids) == 1]
        for s in self.sessions:
            try:
                s.conn.close()
            except Exception:  # noqa: BLE001
                pass
        log(f"load stopped after {load_s:.1f} s; verifying")
        verify = self.verify()
        crashes = self.server_log_problems(log_offset)
        summary = self.summarize(load_s, rss_start, rss_end, pm_start, pm_end, same_backend, hung, verify, crashes)
        return summary

    # -- verification ----------------------------------------------------------------------

    def resolve_uncertain(self, c):
        """Rows whose last COMMIT had an unknown outcome: take what the database holds, if it is
        one of the candidates."""
        out = {"resolved": 0, "unresolvable": []}
        for rid, r in list(self.ledger.rows.items()):
            if not r.uncertain and not r.pending:
                continue
            if r.pending:
                out["unresolvable"].append(f"row {rid}: still pending after the load")
                continue
            with c.transaction():
                c.execute("SELECT set_config('app.tenant_id', %s, true)", (r.tenant,))
                row = c.execute("SELECT ver, note::text, qty::int8, doc::jsonb FROM items WHERE id = %s", (rid,)).fetchone()
            if row is None:
                if r.committed is None:
                    del self.ledger.rows[rid]  # the insert did not happen
                    out["resolved"] += 1
                else:
                    out["unresolvable"].append(f"row {rid}: gone")
                continue
            ver, vals = row[0], vdigest(*row[1:])
            if r.uncertain.get(ver) == vals and (r.committed is None or ver > r.committed):
                r.versions[ver] = vals
                if r.committed is None:
                    self.ledger.ids[r.tenant].append(rid)
                r.committed = ver
                out["resolved"] += 1
            elif r.committed is not None and ver == r.committed:
                out["resolved"] += 1  # the uncertain write did not happen
            else:
                out["unresolvable"].append(f"row {rid}: database has version {ver}, not a candidate")
            r.uncertain.clear()
        return out

    def verify(self):
        v = {}
        with connect(self.args.port, DB, user=APP_ALL) as c:
            v["uncertain"] = self.resolve_uncertain(c)
        expected = defaultdict(list)
        for rid, r in self.ledger.rows.items():
            if r.committed is not None:
                expected[r.tenant].append((rid, r.committed, r.versions[r.committed]))
        per_tenant = {}
        lost, corrupt, unexpected, digest_mismatch = [], [], [], []
        t0 = time.monotonic()
        for t in self.tenants:
            rows = sorted(expected[t])
            want = ledger_digest(rows)
            # A new backend per tenant: keys come from the provider again (OpenBao after its restart).
            with connect(self.args.port, DB, user=APP_ALL) as c:
                with c.transaction():
                    c.execute("SELECT set_config('app.tenant_id', %s, true)", (t,))
                    try:
                        n, got = c.execute(DIGEST_SQL, (t,)).fetchone()
                    except psycopg.Error as e:
                        n, got = None, f"error {e.sqlstate}: {e.diag.message_primary}"
                per_tenant[t] = {"rows": n, "ledger_rows": len(rows), "md5": got, "ledger_md5": want, "provider": self.provider[t]}
                if got != want or n != len(rows):
                    digest_mismatch.append(t)
                    # Row by row, to say what differs (values decrypted one by one: a row that
                    # does not decrypt is named).
                    db_rows = {}
                    with c.transaction():
                        c.execute("SELECT set_config('app.tenant_id', %s, true)", (t,))
                        ids = [x[0] for x in c.execute("SELECT id FROM items WHERE tenant = %s ORDER BY id", (t,))]
                    for rid in ids:
                        try:
                            with c.transaction():
                                c.execute("SELECT set_config('app.tenant_id', %s, true)", (t,))
                                ver, *vals = c.execute(
                                    "SELECT ver, note::text, qty::int8, doc::jsonb FROM items WHERE id = %s", (rid,)).fetchone()
                                db_rows[rid] = (ver, vdigest(*vals))
                        except psycopg.Error as e:
                            db_rows[rid] = ("error", e.sqlstate, e.diag.message_primary)
                    want_rows = {rid: (ver, d) for rid, ver, d in rows}
                    for rid, w in want_rows.items():
                        if rid not in db_rows:
                            lost.append({"tenant": t, "id": rid, "ledger_version": w[0]})
                        elif tuple(db_rows[rid]) != w:
                            corrupt.append({"tenant": t, "id": rid, "ledger_version": w[0], "db": str(db_rows[rid])[:200]})
                    for rid in db_rows:
                        if rid not in want_rows:
                            unexpected.append({"tenant": t, "id": rid})
        v["digest_seconds"] = round(time.monotonic() - t0, 1)
        v["tenants"] = per_tenant
        v["digest_mismatch"] = digest_mismatch
        v["lost"], v["corrupt"], v["unexpected"] = lost, corrupt, unexpected
        with self.admin() as c:
            v["rows_total"] = c.execute("SELECT count(*) FROM items").fetchone()[0]
            v["rows_by_tenant_without_keys"] = dict(c.execute("SELECT tenant, count(*) FROM items GROUP BY 1 ORDER BY 1").fetchall())
            active = dict(c.execute("SELECT tenant, version FROM envelope.key_versions WHERE state = 'active'").fetchall())
            stale = {}
            versions = {}
            for col in COLUMNS:
                for tenant, _tid, ver, state, n in c.execute("SELECT * FROM envelope.column_key_versions('items', %s)", (col,)):
                    versions.setdefault(col, {})[f"{tenant}/v{ver}/{state}"] = n
                    if active.get(tenant) != ver:
                        stale[f"{col}:{tenant}/v{ver}/{state}"] = n
            v["values_by_version"] = versions
            v["values_not_under_active_version"] = stale
            v["active_versions"] = {t: active[t] for t in self.rotated}
            v["reencrypt_jobs"] = [dict(zip(("job", "column", "state", "values_done", "values_remaining", "pass", "batches"), r))
                                   for r in c.execute("SELECT id, column_name, state, values_done, values_remaining, pass, batches "
                                                      "FROM envelope.reencrypt_jobs ORDER BY id")]
            st = c.execute("SELECT envelope.status()").fetchone()[0]
            v["lockdown_after"] = st.get("lockdown", {}).get("active")
            v["suspended_after"] = st.get("suspended_tenants")
            v["revocations_after"] = c.execute("SELECT count(*) FROM envelope.revocations").fetchone()[0]
            v["tenant_key_generation"] = c.execute(
                "SELECT key_generation FROM envelope.tenants WHERE name = %s", (self.kek_rotated,)).fetchone()[0]
        return v

    def server_log_problems(self, offset):
        try:
            with open(self.server_log, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return ["server log missing"]
        bad = ("PANIC", "was terminated by signal", "terminating any other active server processes", "TRAP:",
               "server process (PID", "all server processes terminated")
        return [ln for ln in text.splitlines() if any(b in ln for b in bad)][:20]

    # -- classification and report ---------------------------------------------------------

    def expected(self, e):
        """Whether an error is an expected refusal: the window it falls in, else None."""
        st, t, msg = e["sqlstate"], e["t"], e["message"]
        for w in self.tl.windows:
            end = (w["end"] if w["end"] is not None else float("inf")) + w.get("grace", 0.0)
            if not (w["start"] - 0.5 <= t <= end):
                continue
            if w["kind"] == "suspend" and st == "57000" and "suspended" in msg and e["tenant"] == w["tenant"]:
                return "suspend"
            if w["kind"] == "lockdown" and st == "57000" and "lockdown" in msg:
                return "lockdown"
            if w["kind"] == "kms_down" and st == "58000" and self.provider.get(e["tenant"]) in w["providers"]:
                return "kms_down"
            if w["kind"] == "terminate" and e["session"] == w["session"] and (st is None or st == "57P01" or st.startswith("08")):
                return "terminate"
        return None

    def expected_warning(self, t, msg):
        for w in self.tl.windows:
            if w["kind"] == "kms_down" and w["start"] - 0.5 <= t <= (w["end"] or float("inf")) + w["grace"]:
                if "unreachable" in msg or "degraded" in msg or "cached" in msg:
                    return True
        return False

    def summarize(self, load_s, rss_start, rss_end, pm_start, pm_end, same_backend, hung, verify, crashes):
        workers = self.sessions + [self.cold]
        ops = Counter()
        ops_phase = Counter()
        errors_by = Counter()
        expected_by = Counter()
        unexpected = []
        mismatches = []
        warnings_by = Counter()
        unexpected_warnings = []
        for w in workers:
            ops.update(w.stats.ops)
            ops_phase.update(w.stats.ops_phase)
            mismatches += w.stats.mismatches
            for e in w.stats.errors:
                errors_by[(e["sqlstate"], e["phase"])] += 1
                why = self.expected(e)
                if why:
                    expected_by[(why, e["sqlstate"])] += 1
                else:
                    unexpected.append(e)
            for t, phase, msg in w.stats.warnings:
                warnings_by[(phase, msg[:90])] += 1
                if not self.expected_warning(t, msg):
                    unexpected_warnings.append({"t": t, "phase": phase, "message": msg[:200]})
        decrypted = ops.pop("values_decrypted_by_counts", 0)
        tx = sum(ops.values())

        def dist(d, key):
            vals = sorted(x[key] for x in d.values() if x)
            if not vals:
                return None
            return {"min": vals[0], "median": statistics.median(vals), "max": vals[-1], "n": len(vals)}

        growth = sorted(rss_end[i]["RssAnon"] - rss_start[i]["RssAnon"] for i in same_backend if rss_end.get(i) and rss_start.get(i))
        lat = defaultdict(list)
        for w in self.sessions:
            for k, v in w.stats.latencies.items():
                lat[k] += v
        latency_ms = {k: {"p50": round(statistics.median(v) * 1000, 2), "p99": round(sorted(v)[int(0.99 * (len(v) - 1))] * 1000, 2),
                          "samples": len(v)} for k, v in lat.items() if v}
        cold_fail = [t for t, _tn, ok in self.cold.outcomes if not ok]
        degraded_t = [t for w in workers for t, _p, m in w.stats.warnings if "unreachable" in m]
        kms = self.event_log.get("openbao_restart", {})
        cold_ok_after = [t for t, _tn, ok in self.cold.outcomes if ok and kms and t > kms.get("up_at", 1e9)]
        refusals_seen = {k: sum(n for (why, _s), n in expected_by.items() if why == k)
                         for k in ("suspend", "lockdown", "kms_down", "terminate")}
        problems = []
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected errors")
        if unexpected_warnings:
            problems.append(f"{len(unexpected_warnings)} unexpected warnings")
        if mismatches:
            problems.append(f"{len(mismatches)} wrong reads or client failures")
        if verify["lost"] or verify["corrupt"] or verify["unexpected"] or verify["digest_mismatch"]:
            problems.append(f"rows lost {len(verify['lost'])}, corrupt {len(verify['corrupt'])}, unexpected "
                            f"{len(verify['unexpected'])}, digest mismatch in {verify['digest_mismatch']}")
        if verify["uncertain"]["unresolvable"]:
            problems.append(f"unresolvable uncertain writes: {verify['uncertain']['unresolvable'][:3]}")
        if verify["values_not_under_active_version"]:
            problems.append(f"values left under old data key versions: {verify['values_not_under_active_version']}")
        if any(j["state"] != "done" for j in verify["reencrypt_jobs"]) or len(verify["reencrypt_jobs"]) < len(COLUMNS):
            problems.append(f"re-encryption jobs not done: {verify['reencrypt_jobs']}")
        if verify["lockdown_after"] is not False or verify["revocations_after"] or verify["suspended_after"]:
            problems.append("a lockdown or suspension was left behind")
        if self.event_errors:
            problems.append(f"{len(self.event_errors)} events failed")
        for k in ("rotation", "suspend", "lockdown", "openbao_restart"):
            if k not in self.event_log:
                problems.append(f"event {k} did not happen (duration too short?)")
        for k in ("suspend", "lockdown"):
            if k in self.event_log and not refusals_seen[k]:
                problems.append(f"no refusal was seen during the {k} (did it take effect?)")
        if len(self.event_log.get("terminations", [])) < len(self.sched.terminate_at) or not all(
                x["terminated"] for x in self.event_log.get("terminations", [])):
            problems.append(f"backend terminations: {self.event_log.get('terminations')}")
        degraded_warnings = sum(n for (p, m), n in warnings_by.items() if "unreachable" in m)
        if "openbao_restart" in self.event_log and not degraded_warnings:
            problems.append("no degraded-mode warning while OpenBao was down (cached keys past their TTL)")
        if "openbao_restart" in self.event_log and not cold_fail:
            problems.append("no cold key load failed while OpenBao was down (did it stop?)")
        if "openbao_restart" in self.event_log and not cold_ok_after:
            problems.append("no cold key load succeeded after OpenBao restarted")
        if crashes:
            problems.append(f"server log: {crashes[:3]}")
        if hung:
            problems.append(f"sessions hung: {hung}")
        return {
            "ok": not problems,
            "problems": problems,
            "seed": self.seed,
            "config": {"duration_s": self.args.duration, "sessions": self.args.sessions, "tenants": len(self.tenants),
                       "providers": dict(Counter(self.provider.values())), "initial_rows_per_tenant": self.args.initial_rows,
                       "instance": self.args.instance, "port": self.args.port, "openbao_port": self.args.bao_port},
            "load_seconds": round(load_s, 1),
            "transactions": tx,
            "transactions_per_s": round(tx / load_s, 1) if load_s else None,
            "ops": dict(sorted(ops.items())),
            "values_decrypted_by_count_reads": decrypted,
            "ops_by_phase": {f"{p}/{k}": n for (p, k), n in sorted(ops_phase.items())},
            "ledger": dict(self.ledger.stats),
            "latency_ms": latency_ms,
            "errors_by_sqlstate_and_phase": {f"{s}/{p}": n for (s, p), n in sorted(errors_by.items(), key=str)},
            "expected_refusals": {f"{w}/{s}": n for (w, s), n in sorted(expected_by.items(), key=str)},
            "unexpected_errors": unexpected[:50],
            "unexpected_error_count": len(unexpected),
            "warnings": {f"{p}: {m}": n for (p, m), n in sorted(warnings_by.items())},
            "unexpected_warnings": unexpected_warnings[:20],
            "read_mismatches": mismatches[:50],
            "events": self.event_log,
            "timeline": self.tl.events,
            "degraded_warnings": {"count": len(degraded_t), "first_t": min(degraded_t, default=None),
                                  "last_t": max(degraded_t, default=None)},
            "cold_reads": {"ok": sum(1 for _t, _n, ok in self.cold.outcomes if ok), "failed": len(cold_fail),
                           "first_failure_t": cold_fail[0] if cold_fail else None, "last_failure_t": cold_fail[-1] if cold_fail else None,
                           "first_ok_after_restart_t": cold_ok_after[0] if cold_ok_after else None},
            "verify": verify,
            "rss_kb": {
                "backends_start_VmRSS": dist(rss_start, "VmRSS"), "backends_end_VmRSS": dist(rss_end, "VmRSS"),
                "backends_start_RssAnon": dist(rss_start, "RssAnon"), "backends_end_RssAnon": dist(rss_end, "RssAnon"),
                "backends_end_VmHWM": dist(rss_end, "VmHWM"),
                "backend_RssAnon_growth": {"min": growth[0], "median": statistics.median(growth), "max": growth[-1], "n": len(growth)} if growth else None,
                "postmaster_start": pm_start, "postmaster_end": pm_end,
                "sessions_on_their_first_backend": len(same_backend),
                "series": self.rss_series,
            },
            "server_log_problems": crashes,
        }

    def teardown(self):
        if self.args.keep:
            log(f"--keep: cluster {self.args.instance} ({self.args.port}) and OpenBao ({self.args.bao_port}) left running")
            return
        try:
            if self.bao:
                self.bao.stop()
                shutil.rmtree(self.bao.dir, ignore_errors=True)
        except Exception as e:  # noqa: BLE001
            log(f"stopping OpenBao: {e}")
        try:
            with connect(self.args.port, "postgres") as c:
                c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        except Exception as e:  # noqa: BLE001
            log(f"dropping {DB}: {e}")
        sh("bash", str(ROOT / "scripts/cluster.sh"), "stop", env=self.env, check=False)


def mib(kb):
    return "-" if kb is None else f"{kb / 1024:.1f}"


def print_report(s):
    print()
    print(f"== pg_envelope soak: {'OK' if s['ok'] else 'FAILED'} (seed {s['seed']}) ==")
    c = s["config"]
    print(f"{c['sessions']} sessions + 1 cold client, {c['tenants']} tenants {c['providers']}, load {s['load_seconds']} s")
    print(f"transactions {s['transactions']} ({s['transactions_per_s']}/s)")
    for k, n in s["ops"].items():
        print(f"  {k:14s} {n:10d}")
    print("latency (ms):", ", ".join(f"{k} p50 {v['p50']} p99 {v['p99']}" for k, v in sorted(s["latency_ms"].items())))
    print("errors by SQLSTATE/phase:", s["errors_by_sqlstate_and_phase"] or "none")
    print("  expected refusals:", s["expected_refusals"] or "none")
    print(f"  unexpected: {s['unexpected_error_count']}")
    for e in s["unexpected_errors"][:10]:
        print(f"    t={e['t']}s {e['phase']} session {e['session']} {e['tenant']} {e['kind']}/{e['stage']}: {e['sqlstate']} {e['message']}")
    if s["warnings"]:
        print("warnings:")
        for k, n in list(s["warnings"].items())[:8]:
            print(f"  {n:6d}  {k}")
    print("events:")
    for t, text in s["timeline"]:
        if not text.startswith("phase"):
            print(f"  t={t:7.1f}s {text}")
    v = s["verify"]
    print(f"verify: {v['rows_total']} rows; digest mismatch {v['digest_mismatch'] or 'none'}; lost {len(v['lost'])}, "
          f"corrupt {len(v['corrupt'])}, unexpected {len(v['unexpected'])}; uncertain writes resolved "
          f"{v['uncertain']['resolved']}; values not under the active version: {v['values_not_under_active_version'] or 'none'}")
    print(f"  cold reads (a new backend each): {s['cold_reads']}")
    print(f"  degraded-mode warnings: {s['degraded_warnings']}")
    r = s["rss_kb"]
    print("RSS (MiB)            start min/med/max        end min/med/max")
    for name, a, b in (("backends VmRSS", r["backends_start_VmRSS"], r["backends_end_VmRSS"]),
                       ("backends RssAnon", r["backends_start_RssAnon"], r["backends_end_RssAnon"])):
        if a and b:
            print(f"  {name:18s} {mib(a['min']):>6s} {mib(a['median']):>6s} {mib(a['max']):>6s}      "
                  f"{mib(b['min']):>6s} {mib(b['median']):>6s} {mib(b['max']):>6s}")
    if r["postmaster_start"] and r["postmaster_end"]:
        print(f"  postmaster VmRSS   {mib(r['postmaster_start']['VmRSS']):>6s}                    {mib(r['postmaster_end']['VmRSS']):>6s}")
    if r["backend_RssAnon_growth"]:
        g = r["backend_RssAnon_growth"]
        print(f"  RssAnon growth per backend (KiB): min {g['min']} median {g['median']} max {g['max']} (n={g['n']})")
    for p in s["problems"]:
        print(f"PROBLEM: {p}")


def main(argv=None):
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("run as root (the cluster is managed through sudo -u postgres and /proc of its backends is read)")
    soak = Soak(args)

    def on_signal(signum, _frame):
        soak.stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    summary = None
    try:
        summary = soak.run()
    finally:
        soak.teardown()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print_report(summary)
    print(f"summary: {out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
