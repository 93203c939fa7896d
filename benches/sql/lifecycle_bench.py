"""Key lifecycle benchmarks: online re-encryption and root-key rewrap. Not a test.

    $PGE_STATE/py-venv/bin/python benches/sql/lifecycle_bench.py [--rows 1000000] [--tenants 1000]

Part `reencrypt`: N rows of one envelope.encrypted_text column (10 tenants, data keys rotated
after loading, so every value is under an old version), three fresh tables of the same shape and
fillfactor, VACUUM ANALYZE'd, autovacuum off, a CHECKPOINT before each variant:

* `plain_update`  UPDATE t SET v = v                        (the cost of rewriting every row)
* `one_batch`     CALL envelope.reencrypt('t', 'v', batch_rows => 10000000)
                  (the same work with as few batches as the job makes: one over the table's
                  blocks, one over the blocks its own updates appended)
* `reencrypt`     CALL envelope.reencrypt('t', 'v', batch_rows => B)

(envelope.reencrypt_value cannot be called outside a job's batch, so "the crypto in one plain
UPDATE" is approximated by `one_batch`.) Reported: wall time, the ratios, batches and ms per
batch, the batching overhead per batch ((reencrypt - one_batch) / extra batches), WAL bytes
(pg_current_wal_insert_lsn before and after), dead tuples left and HOT updates (pg_stat_user_tables after
a stats flush) and the table's size.

Part `rewrap`: T tenants whose keys are wrapped by an OpenBao Transit key (a private dev server
with TLS on 127.0.0.1:8240, started and stopped here), the key rotated, then
`CALL envelope.rewrap_tenants(provider)`: wall time, and the provider calls counted from
OpenBao's file audit log (response entries per path).

Uses the database lc_bench (dropped and recreated) on the project's cluster.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg

STATE = Path(os.environ.get("PGE_STATE", "/var/lib/pg_envelope-dev"))
SOCK = str(STATE / "run")
PORT = int(os.environ.get("PGE_PORT", "54315"))
DB = "lc_bench"
TENANTS = [f"bench_t{i}" for i in range(10)]
VARIANTS = ("plain_update", "one_batch", "reencrypt")
ONE_BATCH_ROWS = 10_000_000


def connect(dbname=DB):
    return psycopg.connect(host=SOCK, port=PORT, dbname=dbname, user="postgres", autocommit=True)


def log(msg):
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def recreate_db():
    with connect("postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {DB}")
    with connect() as c:
        c.execute("CREATE EXTENSION pg_envelope")


# --------------------------------------------------------------------------------------------
# Re-encryption against a plain UPDATE
# --------------------------------------------------------------------------------------------


def load_table(c, name, rows, fillfactor):
    c.execute(f"DROP TABLE IF EXISTS {name}")
    c.execute(
        f"CREATE TABLE {name} (id bigint PRIMARY KEY, tenant text NOT NULL, v envelope.encrypted_text, n integer NOT NULL DEFAULT 0) "
        f"WITH (fillfactor = {fillfactor}, autovacuum_enabled = false)"
    )
    k = len(TENANTS)
    for j, t in enumerate(TENANTS):
        with c.transaction():
            c.execute("SELECT set_config('app.tenant_id', %s, true)", (t,))
            c.execute(
                f"INSERT INTO {name} (id, tenant, v) SELECT i, %s, ('customer ' || i || ' <' || md5(i::text) || '@example.test>')::text "
                f"FROM generate_series(%s::bigint, %s::bigint) i WHERE i %% {k} = {j}",
                (t, 1, rows),
            )


def table_stats(c, name):
    c.execute("SELECT pg_stat_force_next_flush()")
    time.sleep(0.05)
    c.execute("SELECT pg_stat_clear_snapshot()")
    r = c.execute(
        "SELECT n_dead_tup, n_live_tup, n_tup_upd, n_tup_hot_upd, pg_relation_size(relid) FROM pg_stat_user_tables WHERE relname = %s",
        (name,),
    ).fetchone()
    return dict(zip(("dead", "live", "updated", "hot_updated", "bytes"), r))


def wal_lsn(c):
    return c.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]


def wal_diff(c, a, b):
    return int(c.execute("SELECT pg_wal_lsn_diff(%s, %s)", (b, a)).fetchone()[0])


def run_variant(c, variant, table, batch_rows):
    c.execute(f"VACUUM ANALYZE {table}")
    c.execute("CHECKPOINT")
    before = table_stats(c, table)
    lsn0 = wal_lsn(c)
    t0 = time.perf_counter()
    if variant == "plain_update":
        c.execute(f"UPDATE {table} SET v = v")
    else:
        c.execute("CALL envelope.reencrypt(%s, 'v', batch_rows => %s)", (table, ONE_BATCH_ROWS if variant == "one_batch" else batch_rows))
    wall = time.perf_counter() - t0
    lsn1 = wal_lsn(c)
    after = table_stats(c, table)
    out = {
        "wall_s": wall,
        "wal_bytes": wal_diff(c, lsn0, lsn1),
        # n_dead_tup after the variant: a job's end-of-pass count reads every page, which prunes
        # HOT chains, so with room for HOT updates this is far below the rows updated.
        "dead_tuples_after": after["dead"] - before["dead"],
        "rows_updated": after["updated"] - before["updated"],
        "hot_updates": after["hot_updated"] - before["hot_updated"],
        "table_bytes_before": before["bytes"],
        "table_bytes_after": after["bytes"],
    }
    if variant != "plain_update":
        job = c.execute(
            "SELECT values_done, batches, pass, blocks_total, values_remaining, batch_blocks FROM envelope.reencrypt_jobs "
            "WHERE table_name = %s ORDER BY id DESC LIMIT 1",
            (f"public.{table}",),
        ).fetchone()
        out.update(dict(zip(("values_done", "batches", "passes", "blocks_total", "values_remaining", "batch_blocks"), job)))
        out["ms_per_batch"] = 1000 * wall / max(job[1], 1)
    # Every value of the crypto variants is under the active version now.
    if variant != "plain_update":
        old = c.execute(
            f"SELECT count(*) FROM {table} t JOIN envelope.key_versions k ON k.tenant = t.tenant AND k.state = 'active' "
            "WHERE envelope.key_version(t.v) <> k.version"
        ).fetchone()[0]
        assert old == 0, f"{variant}: {old} values left under old versions"
    return out


def bench_reencrypt(rows, batch_rows, fillfactor):
    recreate_db()
    with connect() as c:
        for t in TENANTS:
            c.execute("SELECT envelope.create_tenant(%s), envelope.grant_tenant(%s, current_user)", (t, t))
        tables = {v: f"re_{v}" for v in VARIANTS}
        for v, name in tables.items():
            t0 = time.perf_counter()
            load_table(c, name, rows, fillfactor)
            log(f"loaded {rows:,} rows into {name} in {time.perf_counter() - t0:.1f} s")
        for t in TENANTS:
            c.execute("SELECT envelope.rotate_data_key(%s)", (t,))
        c.execute("SET app.tenant_id = 'bench_t0'")
        sample_before = c.execute(f"SELECT v::text FROM {tables['reencrypt']} WHERE id = 10").fetchone()[0]
        results = {}
        for v in VARIANTS:
            log(f"running {v} ...")
            results[v] = run_variant(c, v, tables[v], batch_rows)
            log(f"  {v}: {json.dumps(results[v])}")
        assert c.execute(f"SELECT v::text FROM {tables['reencrypt']} WHERE id = 10").fetchone()[0] == sample_before
    p, s, r = (results[v] for v in VARIANTS)
    results["ratios"] = {
        "reencrypt_over_plain_update": r["wall_s"] / p["wall_s"],
        "one_batch_over_plain_update": s["wall_s"] / p["wall_s"],
        "reencrypt_over_one_batch": r["wall_s"] / s["wall_s"],
        "wal_reencrypt_over_plain_update": r["wal_bytes"] / p["wal_bytes"],
    }
    results["batching_overhead_ms_per_batch"] = 1000 * (r["wall_s"] - s["wall_s"]) / max(r["batches"] - s["batches"], 1)
    results["rows"] = rows
    results["batch_rows"] = batch_rows
    results["fillfactor"] = fillfactor
    return results


# --------------------------------------------------------------------------------------------
# rewrap_tenants against OpenBao
# --------------------------------------------------------------------------------------------


class DevBao:
    """An OpenBao dev server with TLS (in memory), its own port and directory, a file audit log."""

    def __init__(self, port=8240):
        self.port = port
        self.addr = f"https://127.0.0.1:{port}"
        self.dir = STATE / "openbao-persistent" / f"lc-bench-{port}"
        self.proc = None

    def start(self):
        pidfile = self.dir / "pid"
        if pidfile.exists():
            try:
                pid = int(pidfile.read_text())
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"bao"):
                    os.kill(pid, signal.SIGKILL)
                    time.sleep(0.5)
            except (ValueError, FileNotFoundError, ProcessLookupError):
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "tls").mkdir(parents=True)
        self.root = "root-" + os.urandom(12).hex()
        self.audit_file = self.dir / "audit.log"
        # OpenBao 2.x enables audit devices from its configuration only (not through the API).
        (self.dir / "audit.hcl").write_text(f'audit "file" "lc" {{\n  options {{\n    file_path = "{self.audit_file}"\n  }}\n}}\n')
        log_f = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(STATE / "bao-venv/bin/bao"), "server", "-dev", "-dev-tls", f"-dev-tls-cert-dir={self.dir}/tls",
             f"-dev-root-token-id={self.root}", f"-dev-listen-address=127.0.0.1:{self.port}", "-dev-no-store-token",
             f"-config={self.dir}/audit.hcl"],
            stdout=log_f, stderr=log_f, start_new_session=True,
        )
        pidfile.write_text(str(self.proc.pid))
        ca = self.dir / "tls" / "vault-ca.pem"
        deadline = time.time() + 30
        while True:
            try:
                if ca.exists() and ca.stat().st_size:
                    self.ctx = ssl.create_default_context(cafile=str(ca))
                    urllib.request.urlopen(f"{self.addr}/v1/sys/health", context=self.ctx, timeout=2)
                    break
            except (OSError, ssl.SSLError):
                pass
            if time.time() > deadline:
                raise TimeoutError("OpenBao did not start")
            time.sleep(0.1)
        self.ca_file = self.dir / "ca.pem"
        shutil.copy(ca, self.ca_file)
        self.ca_file.chmod(0o644)
        self.api("POST", "sys/mounts/transit", {"type": "transit"})
        self.api("POST", "transit/keys/lc-bench", {"type": "aes256-gcm96"})
        rules = [("encrypt", "update"), ("decrypt", "update"), ("keys", "read")]
        policy = "\n".join(f'path "transit/{p}/lc-bench" {{ capabilities = ["{c}"] }}' for p, c in rules)
        self.api("PUT", "sys/policies/acl/lc-bench", {"policy": policy})
        tok = self.api("POST", "auth/token/create", {"policies": ["lc-bench"], "ttl": "24h", "no_default_policy": True})
        self.token_file = self.dir / "token"
        old = os.umask(0o077)
        try:
            self.token_file.write_text(tok["auth"]["client_token"] + "\n")
        finally:
            os.umask(old)
        shutil.chown(self.token_file, "postgres", "postgres")
        return self

    def api(self, method, path, body=None):
        req = urllib.request.Request(f"{self.addr}/v1/{path}", method=method, headers={"X-Vault-Token": self.root},
                                     data=json.dumps(body).encode() if body is not None else None)
        with urllib.request.urlopen(req, context=self.ctx, timeout=10) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def audit_counts(self):
        """Response entries of the audit log per request path (transit/... only)."""
        counts = {}
        with open(self.audit_file) as f:
            for line in f:
                e = json.loads(line)
                if e.get("type") != "response":
                    continue
                p = e.get("request", {}).get("path", "")
                if p.startswith("transit/") and not p.startswith("transit/keys/lc-bench/rotate"):
                    counts[p] = counts.get(p, 0) + 1
        return counts

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        shutil.rmtree(self.dir, ignore_errors=True)


def bench_rewrap(tenants, batch_size):
    bao = DevBao()
    try:
        bao.start()
        recreate_db()
        with connect() as c:
            c.execute(
                "SELECT envelope.add_key_provider('benchbao', 'vault_transit', %s)",
                (psycopg.types.json.Jsonb({"url": bao.addr, "key": "lc-bench", "token_file": str(bao.token_file),
                                           "ca_file": str(bao.ca_file)}),),
            )
            t0 = time.perf_counter()
            c.execute(
                "SELECT count(envelope.create_tenant('rw_' || i, provider => 'benchbao')) FROM generate_series(1, %s) i", (tenants,)
            )
            log(f"created {tenants} tenants under OpenBao in {time.perf_counter() - t0:.1f} s")
            c.execute("SELECT envelope.grant_tenant('rw_' || i, current_user) FROM generate_series(1, 3) i")
            c.execute("SET app.tenant_id = 'rw_1'")
            sample = c.execute("SELECT envelope.encrypt_field('rewrap sample')").fetchone()[0]
        bao.api("POST", "transit/keys/lc-bench/rotate")
        with connect() as c:
            before = bao.audit_counts()
            t0 = time.perf_counter()
            c.execute("CALL envelope.rewrap_tenants('benchbao', batch_size => %s)", (batch_size,))
            wall = time.perf_counter() - t0
            time.sleep(0.3)
            after = bao.audit_counts()
            job = c.execute("SELECT state, tenants_done, tenants_total FROM envelope.rewrap_progress").fetchone()
            versions = c.execute("SELECT root_version, count(*) FROM envelope.tenants GROUP BY 1").fetchall()
        assert job == ("done", tenants, tenants), job
        assert versions == [("v2", tenants)], versions
        with connect() as c:  # a cold backend: the rewrapped key opens
            c.execute("SET app.tenant_id = 'rw_1'")
            assert c.execute("SELECT envelope.decrypt_field(%s::bytea)", (sample,)).fetchone()[0] == "rewrap sample"
        calls = {p: after.get(p, 0) - before.get(p, 0) for p in after if after.get(p, 0) != before.get(p, 0)}
        total = sum(calls.values())
        return {
            "tenants": tenants, "batch_size": batch_size, "wall_s": wall, "tenants_per_s": tenants / wall,
            "ms_per_tenant": 1000 * wall / tenants, "provider_calls": calls, "provider_calls_total": total,
            "calls_per_tenant": total / tenants, "transport": "https (TLS) on 127.0.0.1",
        }
    finally:
        bao.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch-rows", type=int, default=10_000)
    ap.add_argument("--fillfactor", type=int, default=100)
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--rewrap-batch", type=int, default=100)
    ap.add_argument("--parts", default="reencrypt,rewrap")
    ap.add_argument("--out-json")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    with connect("postgres") as c:
        server = c.execute("SELECT version()").fetchone()[0]
    out = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
           "server": server}
    if "reencrypt" in parts:
        out["reencrypt"] = bench_reencrypt(a.rows, a.batch_rows, a.fillfactor)
    if "rewrap" in parts:
        out["rewrap"] = bench_rewrap(a.tenants, a.rewrap_batch)
    with connect("postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    print(json.dumps(out, indent=2))
    if "reencrypt" in out:
        r = out["reencrypt"]
        print(f"\nRe-encryption of {r['rows']:,} rows (batch_rows {r['batch_rows']:,}, fillfactor {r['fillfactor']}):")
        print("| variant | wall s | WAL MB | rows updated (HOT) | dead tuples after | table MB before → after | batches | ms/batch |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for v in VARIANTS:
            x = r[v]
            batches = f"{x['batches']} | {x['ms_per_batch']:.0f}" if "batches" in x else " | "
            print(f"| {v} | {x['wall_s']:.1f} | {x['wal_bytes'] / 1e6:.0f} | {x['rows_updated']:,} ({x['hot_updates']:,}) | "
                  f"{x['dead_tuples_after']:,} | "
                  f"{x['table_bytes_before'] / 1e6:.0f} → {x['table_bytes_after'] / 1e6:.0f} | {batches} |")
        print(f"ratios: {json.dumps({k: round(v, 2) for k, v in r['ratios'].items()})}; "
              f"batching overhead {r['batching_overhead_ms_per_batch']:.1f} ms/batch")
    if "rewrap" in out:
        w = out["rewrap"]
        print(f"\nrewrap_tenants: {w['tenants']} tenants in {w['wall_s']:.2f} s ({w['ms_per_tenant']:.2f} ms/tenant), "
              f"{w['provider_calls_total']} OpenBao calls ({w['calls_per_tenant']:.2f}/tenant): {w['provider_calls']}")
    if a.out_json:
        Path(a.out_json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
