"""The audit trail's export verified offline: envelope.audit_export() from a real database (with
psql's \\copy and with psycopg), then scripts/audit-verify.py with the cluster's local root key
and its server log must say intact; the exported file tampered with (a field edited, a line
deleted, the tail dropped, the tail dropped with its checkpoint rows, a checkpoint's MAC forged)
must be reported at the right record; an export from a later sequence number must start at a
checkpoint.

Like test_audit.py, the audited work runs in the database the maintenance worker writes the trail
in (envelope.database: `postgres` on the project's cluster), auditing is turned on with ALTER
SYSTEM (checkpoints every second) and the database is left as found.
"""

import json
import re
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PORT_A, ROOT, SOCK, as_tenant, connect

TENANT = "audit_export_t"
SCRIPT = ROOT / "scripts" / "audit-verify.py"


def wait_until(pred, timeout=20, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def audit_status(c):
    # envelope.status() reads shared memory, not the audit tables: polling it adds no record.
    return c.execute("SELECT envelope.status()->'audit'").fetchone()[0]


def log_path(c):
    cur = c.execute("SELECT pg_current_logfile()").fetchone()[0]
    data = c.execute("SHOW data_directory").fetchone()[0]
    if cur:
        return Path(cur) if cur.startswith("/") else Path(data) / cur
    # scripts/cluster.sh: pg_ctl -l $PGE_STATE/$PGE_INSTANCE/server.log, next to the data directory.
    return Path(data).parent / "server.log"


def verify(export, *extra):
    """Runs the script; returns (exit status, its JSON verdict)."""
    p = subprocess.run([sys.executable, str(SCRIPT), str(export), "--json", *map(str, extra)], capture_output=True, text=True, timeout=120)
    try:
        verdict = json.loads(p.stdout)
    except ValueError:
        raise AssertionError(f"no JSON from audit-verify (exit {p.returncode}): {p.stdout}\n{p.stderr}") from None
    return p.returncode, verdict


def export_psycopg(c, path, from_seq=1):
    lines = [r[0] for r in c.execute("SELECT line FROM envelope.audit_export(%s)", (from_seq,))]
    path.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    return lines


def export_psql(db, path, from_seq=1):
    subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", SOCK, "-p", str(PORT_A), "-U", "postgres", "-d", db,
         "-c", f"\\copy (SELECT line FROM envelope.audit_export({int(from_seq)})) TO '{path}'"],
        check=True, capture_output=True, text=True, env=dict(os.environ, PGCLIENTENCODING="UTF8"),
    )


@pytest.fixture(scope="module")
def trail(tmp_path_factory):
    """An audited trail in envelope.database with checkpoints every second, exported twice; the
    root key file and the server log lines written during the test."""
    tmp = tmp_path_factory.mktemp("audit_export")
    with connect(PORT_A) as c:
        db = c.execute("SHOW envelope.database").fetchone()[0]
    with connect(PORT_A, db) as c:
        had = c.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_envelope'").fetchone() is not None
        log = log_path(c)
        log_start = log.stat().st_size if log.exists() else 0
        start_us = int(time.time() * 1_000_000)
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_envelope")
        try:
            if c.execute("SELECT to_regprocedure('envelope.audit_export(bigint)')").fetchone()[0] is None:
                pytest.fail(f"pg_envelope in database {db} has no envelope.audit_export (an older install: ALTER EXTENSION pg_envelope UPDATE)")
            provider = c.execute("SHOW envelope.audit_checkpoint_provider").fetchone()[0] or "local"
            kind = c.execute("SELECT kind FROM envelope.key_providers WHERE name = %s", (provider,)).fetchone()
            root_key = c.execute("SHOW envelope.local_root_key_file").fetchone()[0]
            if not c.execute("SELECT 1 FROM envelope.tenants WHERE name = %s", (TENANT,)).fetchone():
                c.execute("SELECT envelope.create_tenant(%s)", (TENANT,))
            c.execute("SELECT envelope.grant_tenant(%s, current_user)", (TENANT,))
            c.execute("DROP TABLE IF EXISTS audit_export_t")
            c.execute("CREATE TABLE audit_export_t (id int, v envelope.encrypted_text)")
            with as_tenant(c, TENANT):
                c.execute("INSERT INTO audit_export_t SELECT g, ('v' || g)::text FROM generate_series(1, 200) g")
            assert wait_until(lambda: c.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_envelope maintenance'").fetchone()[0] == 1)
            c.execute("ALTER SYSTEM SET envelope.audit = on")
            c.execute("ALTER SYSTEM SET envelope.audit_checkpoint_interval = 1")
            c.execute("SELECT pg_reload_conf()")
            time.sleep(0.5)
            # Records in several batches and checkpoints: statements in bursts, a pause between.
            c.execute("SET envelope.request_id = 'audit-export'")
            for burst in range(4):
                for i in range(8):
                    with as_tenant(c, TENANT):
                        c.execute("SELECT count(v::text) FROM audit_export_t WHERE id <= %s", (burst * 8 + i + 1,))
                time.sleep(1.2)
            # Everything written and checkpointed: the queue empty, the newest checkpoint settled.
            assert wait_until(lambda: audit_status(c)["queued"] == 0)
            last = [None]

            def settled():
                s = audit_status(c)["last_checkpoint_seq"]
                same, last[0] = s is not None and s == last[0], s
                return same

            assert wait_until(settled, timeout=30, step=1.5), audit_status(c)
            ok = c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone()
            assert ok == (True, None), ok
            # The export's time: log checkpoints made later certify records the export cannot have.
            until_us = int(time.time() * 1_000_000)
            raw = export_psycopg(c, tmp / "psycopg.jsonl")
            export_psql(db, tmp / "psql.jsonl")
            # The log lines written during this test (earlier ones may be another chain's).
            if log.exists():
                with open(log, "rb") as f:
                    f.seek(log_start)
                    (tmp / "server.log").write_bytes(f.read())
            else:
                (tmp / "server.log").write_bytes(b"")
            yield {
                "db": db, "tmp": tmp, "raw": raw, "provider": provider, "kind": kind[0] if kind else None, "root_key": root_key,
                "log": tmp / "server.log", "start_us": start_us, "until_us": until_us,
            }
        finally:
            c.execute("ALTER SYSTEM RESET envelope.audit")
            c.execute("ALTER SYSTEM RESET envelope.audit_checkpoint_interval")
            c.execute("SELECT pg_reload_conf()")
            c.execute("DROP TABLE IF EXISTS audit_export_t")
            if not had:
                c.execute("DROP EXTENSION pg_envelope CASCADE")


def mac_options(trail):
    if trail["kind"] != "local":
        pytest.skip(f"checkpoints are made by provider {trail['provider']} ({trail['kind']}); this test verifies local MACs")
    if not trail["root_key"] or not os.access(trail["root_key"], os.R_OK):
        pytest.skip(f"the root key file {trail['root_key']!r} is not readable here (the test runs as root)")
    return ["--local-root-key", trail["root_key"]]


def parts(lines):
    recs = [json.loads(ln) for ln in lines if json.loads(ln)["type"] == "record"]
    cps = [json.loads(ln) for ln in lines if json.loads(ln)["type"] == "checkpoint"]
    return recs, cps


def dump(path, objs):
    """An export file from objects; a trailer matching them is added unless one is there (one
    who edits an export file writes its trailer too: the offline verifier requires it)."""
    objs = list(objs)
    if not any(o.get("type") == "export" for o in objs):
        seqs = [o["seq"] for o in objs if o.get("type") == "record"]
        objs.append({"type": "export", "head_seq": seqs[-1] if seqs else None})
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs), encoding="utf-8")
    return path


def test_the_export_verifies_offline_with_its_macs_and_the_log(trail):
    opts = mac_options(trail)
    recs, cps = parts(trail["raw"])
    assert len(recs) >= 10 and cps, (len(recs), len(cps))
    log = ["--log", trail["log"], "--log-until", trail["until_us"]]
    for name in ("psycopg.jsonl", "psql.jsonl"):
        code, v = verify(trail["tmp"] / name, *opts, *log)
        assert (code, v["status"], v["first_break"]) == (0, "intact", None), (name, v)
        if name == "psycopg.jsonl":
            assert v["head_seq"] == recs[-1]["seq"] and v["checkpoint_seq"] == max(c["seq"] for c in cps), v
        else:  # taken just after (it may hold the first export's own audit_read record)
            assert v["head_seq"] >= recs[-1]["seq"] and v["checkpoint_seq"] >= max(c["seq"] for c in cps), v
        # Every local checkpoint verified with the root key (others, e.g. a Transit provider an
        # earlier test used, are reported as not checked), none invalid.
        assert v["mac_counts"]["invalid"] == 0 and v["mac_counts"]["error"] == 0, v
        assert all(c["mac"] == "verified" for c in v["checkpoints"] if c["kind"] == "local"), v["checkpoints"]
        assert sum(1 for c in v["checkpoints"] if c["mac"] == "verified" and c["in_export"]) >= 1, v
        # Every checkpoint of the export made during the test is also in the log (the copy
        # outside the table), up to --log-until.
        during = [c for c in v["checkpoints"] if c["in_export"] and trail["start_us"] <= c["at_us"] <= trail["until_us"]]
        assert during and all(c["in_log"] for c in during), v["checkpoints"]
    # The human summary, and nothing secret in it.
    p = subprocess.run([sys.executable, str(SCRIPT), str(trail["tmp"] / "psql.jsonl"), *map(str, opts + log)], capture_output=True, text=True)
    assert p.returncode == 0 and "INTACT" in p.stdout, p.stdout + p.stderr
    key = Path(trail["root_key"]).read_bytes()
    assert key.hex() not in p.stdout and key.strip().decode("latin-1") not in p.stdout


def test_tampered_exports_are_reported_at_their_record(trail):
    opts = mac_options(trail)
    tmp = trail["tmp"]
    recs, cps = parts(trail["raw"])
    newest = max(c["seq"] for c in cps)
    # The kept records (after a prune by an earlier test they start later than 1) up to the
    # newest checkpoint: one in the middle of them is tampered with.
    covered = [k for k, r in enumerate(recs) if r["seq"] < newest - 3]
    assert len(covered) >= 4, (recs[0]["seq"], newest)
    i = covered[len(covered) // 2]
    mid = recs[i]["seq"]
    log = ["--log", trail["log"], "--log-until", trail["until_us"]]

    edited = [dict(r) for r in recs]
    edited[i]["value_count"] += 1
    code, v = verify(dump(tmp / "edit.jsonl", edited + cps), *opts)
    assert (code, v["first_break"]) == (1, f"record {mid} does not match its hash: altered"), v

    deleted = recs[:i] + recs[i + 1:]
    code, v = verify(dump(tmp / "delete.jsonl", deleted + cps), *opts)
    assert (code, v["first_break"]) == (1, f"record {mid} is missing (the next record is {mid + 1}): deleted"), v

    cut = [r for r in recs if r["seq"] < newest - 2]
    code, v = verify(dump(tmp / "tail.jsonl", cut + cps), *opts)
    # Reported at the newest checkpoint that certifies more than the export holds.
    expected = f"the chain ends at record {newest - 3}, before the checkpoint at record {newest}: truncated"
    assert (code, v["first_break"]) == (1, expected), v

    # The tail dropped with the checkpoint rows that certified it: the log's copies catch it.
    kept = [c for c in cps if c["seq"] < newest - 2]
    code, v = verify(dump(tmp / "tail-and-checkpoints.jsonl", cut + kept), *opts)
    assert code == 0, ("without the log the cut is invisible", v)
    code, v = verify(tmp / "tail-and-checkpoints.jsonl", *opts, *log)
    # The newest checkpoint the log holds up to --log-until (the export was taken just after
    # it, so the export's newest checkpoint may be one the bounded log does not reach: CI had
    # checkpoints at 35 and 36 with only 35 in the log's window).
    logged = [
        int(m.group(1))
        for m in re.finditer(r"pg_envelope audit checkpoint: seq=(\d+) hash=\S+ at_us=(\d+)", Path(trail["log"]).read_text(errors="replace"))
        if int(m.group(2)) <= int(trail["until_us"])
    ]
    in_window = max(s for s in logged if s > newest - 3)
    expected_log = f"the chain ends at record {newest - 3}, before the checkpoint at record {in_window}: truncated"
    assert (code, v["first_break"]) == (1, expected_log), v

    # A checkpoint's MAC forged in the export.
    forged = [dict(c) for c in cps]
    forged[-1]["mac"] = "00" * 32
    code, v = verify(dump(tmp / "forged.jsonl", recs + forged), *opts)
    assert code == 1 and f"the checkpoint at record {forged[-1]['seq']} has an invalid MAC" in v["first_break"], v


def test_an_export_from_a_later_record_starts_at_a_checkpoint(trail):
    opts = mac_options(trail)
    recs, cps = parts(trail["raw"])
    seqs = sorted({c["seq"] for c in cps})
    head = recs[-1]["seq"]
    first = recs[0]["seq"]
    with connect(PORT_A, trail["db"]) as c:
        anchored = next((s for s in seqs if first <= s < head), None)
        assert anchored is not None, seqs
        export_psql(trail["db"], trail["tmp"] / "from.jsonl", anchored + 1)
        code, v = verify(trail["tmp"] / "from.jsonl", *opts)
        assert (code, v["anchor_seq"], v["first_seq"]) == (0, anchored, anchored + 1), v
        # From a record no checkpoint precedes: the start is not anchored.
        loose = next((s for s in range(first + 1, head + 1) if s - 1 not in seqs), None)
        if loose is None:
            pytest.skip(f"every record of {first}..{head} was checkpointed: no unanchored start to try")
        export_psycopg(c, trail["tmp"] / "loose.jsonl", loose)
    # The export rounds the start down to the record after the nearest checkpoint: verifiable.
    code, v = verify(trail["tmp"] / "loose.jsonl", *opts)
    below = max((s for s in seqs if s < loose), default=None)
    assert (code, v["first_seq"]) == (0, below + 1 if below is not None else first), v
    # A file cut at `loose` by hand (its leading records and their checkpoints removed) is not
    # anchored: the verifier says so.
    lines = (trail["tmp"] / "loose.jsonl").read_text().splitlines()
    cut = [l for l in lines if not ((o := json.loads(l))["type"] == "record" and o["seq"] < loose)
           and not (o["type"] == "checkpoint" and o["seq"] < loose - 1 + (1 if (loose - 1) not in seqs else 0))]
    (trail["tmp"] / "cut.jsonl").write_text("\n".join(cut) + "\n")
    code, v = verify(trail["tmp"] / "cut.jsonl", *opts)
    assert (code, v["anchored"]) == (1, False), v
    assert f"the export starts at record {loose} and no checkpoint at record {loose - 1} anchors it" in v["hint"], v


def test_a_replaced_export_function_is_reported_by_audit_verify(trail):
    """Insider review 52 F3: a superuser's `audit_export` that wrote another `from_seq` in its
    trailer (and left the oldest records out) fooled the offline verifier unless it was told
    `--from-seq 1`; audit_verify did not look at the function. The export is pg_envelope's C
    function (review 58); audit_verify reports a body in another language, another symbol,
    changed settings, security or strictness and an overload beside it, and says ok again once
    the function is back."""
    with connect(PORT_A, trail["db"]) as c:
        original = c.execute("SELECT pg_get_functiondef('envelope.audit_export(bigint)'::regprocedure)").fetchone()[0]
        assert "LANGUAGE c" in original and "audit_export_wrapper" in original, original
        assert c.execute("SELECT ok FROM envelope.audit_verify()").fetchone()[0] is True
        lying = ("CREATE OR REPLACE FUNCTION envelope.audit_export(from_seq bigint DEFAULT 1) RETURNS TABLE(line text) "
                 "LANGUAGE sql AS $$ SELECT '{\"type\" : \"export\", \"from_seq\" : 1}'::text $$")
        tries = [
            ("a replaced body", lying, None),
            ("another symbol", original.replace("audit_export_wrapper", "audit_prune_in_progress_wrapper"), None),
            ("SECURITY DEFINER", original, "ALTER FUNCTION envelope.audit_export(bigint) SECURITY DEFINER"),
            ("STRICT", original, "ALTER FUNCTION envelope.audit_export(bigint) STRICT"),
            ("another search_path", original, "ALTER FUNCTION envelope.audit_export(bigint) SET search_path = public, pg_catalog"),
            ("an overload", original, "CREATE FUNCTION envelope.audit_export(from_seq integer) RETURNS TABLE (line text) "
                                      "LANGUAGE sql AS $$ SELECT line FROM envelope.audit_export(from_seq::bigint) $$"),
        ]

        def restore():
            c.execute("DROP FUNCTION IF EXISTS envelope.audit_export(integer)")
            c.execute(original)
            c.execute("ALTER FUNCTION envelope.audit_export(bigint) RESET ALL")
            c.execute("ALTER FUNCTION envelope.audit_export(bigint) SECURITY INVOKER CALLED ON NULL INPUT")

        try:
            for what, definition, extra in tries:
                c.execute(definition)
                if extra:
                    c.execute(extra)
                if what == "a replaced body":   # the attack works
                    assert c.execute("SELECT count(*) FROM envelope.audit_export(1)").fetchone()[0] == 1
                ok, brk = c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone()
                assert ok is False and "envelope.audit_export is not the function the extension made" in brk, (what, brk)
                restore()
        finally:
            restore()
        assert c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone() == (True, None)
        assert c.execute("SELECT count(*) FROM envelope.audit_export(1)").fetchone()[0] > 1
        # A parsed body (`prosqlbody`, what BEGIN ATOMIC stores) with the language made SQL by a
        # catalog update: PostgreSQL runs the body; the symbol and library stay as they were.
        c.execute("CREATE FUNCTION envelope.r52_export(from_seq bigint DEFAULT 1) RETURNS TABLE (line text) "
                  "LANGUAGE sql BEGIN ATOMIC SELECT 'nothing to see'::text; END")
        try:
            c.execute("UPDATE pg_catalog.pg_proc SET prolang = (SELECT oid FROM pg_language WHERE lanname = 'sql'), "
                      "prosqlbody = (SELECT prosqlbody FROM pg_catalog.pg_proc "
                      "WHERE oid = 'envelope.r52_export(bigint)'::regprocedure) WHERE oid = 'envelope.audit_export(bigint)'::regprocedure")
            c.execute("DROP FUNCTION envelope.r52_export(bigint)")
        finally:
            c.execute("DROP FUNCTION IF EXISTS envelope.r52_export(bigint)")
        try:
            with connect(PORT_A, trail["db"]) as other:   # a new session: no cached plan of the function
                assert other.execute("SELECT line FROM envelope.audit_export(1)").fetchall() == [("nothing to see",)]
            ok, brk = c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone()
            assert ok is False and "envelope.audit_export is not the function the extension made" in brk, brk
        finally:
            c.execute("UPDATE pg_catalog.pg_proc SET prolang = (SELECT oid FROM pg_language WHERE lanname = 'c'), prosqlbody = NULL "
                      "WHERE oid = 'envelope.audit_export(bigint)'::regprocedure")
        assert c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone() == (True, None)


# The first export (a SQL function, until insider review 58): the reference for the lines'
# format, which SIEM parsers and the offline verifier read.
SQL_EXPORT = """
CREATE FUNCTION pg_temp.sql_export(from_seq bigint DEFAULT 1) RETURNS TABLE (line text)
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
    SET enable_indexscan = off SET enable_indexonlyscan = off SET enable_bitmapscan = off SET enable_seqscan = on AS $$
    WITH s AS (
        SELECT coalesce((SELECT max(c.seq) + 1 FROM envelope.audit_checkpoints c WHERE c.seq < from_seq), 1) AS start
    )
    SELECT line FROM (
        SELECT 0 AS part, b.first_seq AS k1, l.seq AS k2, CASE WHEN l.seq IS NULL THEN json_build_object(
            -- Bytes of a stored block that are not records (altered): the offline verifier fails on it.
            'type', 'unreadable', 'after_seq', b.first_seq - 1, 'block_first_seq', b.first_seq, 'detail', l.detail)::text
          ELSE json_build_object(
            'type', 'record', 'seq', l.seq, 'at', l.at, 'at_us', l.at_us, 'kind', l.kind, 'database', l.database,
            'session_user', l.session_user_name, 'current_role', l.role_name, 'client_addr', l.client_addr,
            'application_name', l.application_name, 'backend_pid', l.backend_pid, 'statement_id', l.statement_id,
            'request_id', l.request_id, 'tenant', l.tenant, 'key_versions', l.key_versions, 'operation', l.operation,
            'value_count', l.value_count, 'failure_count', l.failure_count, 'outcome', l.outcome,
            'duration_us', l.duration_us, 'detail', l.detail,
            'prev_hash', encode(l.prev_hash, 'hex'), 'hash', encode(l.hash, 'hex'))::text END AS line
          FROM s, envelope.audit_blocks b CROSS JOIN LATERAL envelope.audit_block_records(b.prev_hash, b.records) l
         WHERE b.last_seq >= s.start AND (l.seq >= s.start OR l.seq IS NULL)
        UNION ALL
        SELECT 1, c.seq, 0, json_build_object(
            'type', 'checkpoint', 'seq', c.seq, 'hash', encode(c.hash, 'hex'), 'at', c.at, 'at_us', c.at_us,
            'method', c.method, 'provider', c.provider, 'key_name', c.key_name, 'mac', encode(c.mac, 'hex'))::text
          FROM envelope.audit_checkpoints c, s WHERE c.seq >= s.start - 1
        UNION ALL
        SELECT 2, 0, 0, json_build_object(
            'type', 'export', 'from_seq', s.start, 'head_seq', (SELECT max(last_seq) FROM envelope.audit_blocks),
            'at_us', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint, 'database', current_database())::text
          FROM s
) e ORDER BY part, k1, k2 NULLS LAST
$$;
"""


def test_the_export_writes_the_lines_the_sql_export_wrote(trail):
    """The export became a C function (review 58); its lines are the SQL export's, byte for byte
    (times in UTC, which the SQL export printed in the session's time zone), in the same order,
    from the start and from a later sequence number; only the trailer's clock differs."""
    with connect(PORT_A, trail["db"]) as c:
        c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        try:
            c.execute("SET LOCAL timezone = 'UTC'")
            c.execute(SQL_EXPORT)
            checkpoints = [r[0] for r in c.execute("SELECT seq FROM envelope.audit_checkpoints ORDER BY seq")]
            assert len(checkpoints) >= 2
            for from_seq in (1, checkpoints[1], checkpoints[-1] + 1):
                # (The SQL export reads with this transaction's snapshot, the C export with the
                # latest: it may hold records and checkpoints written since, after the same ones.)
                old = [r[0] for r in c.execute("SELECT line FROM pg_temp.sql_export(%s)", (from_seq,))]
                new = [r[0] for r in c.execute("SELECT line FROM envelope.audit_export(%s)", (from_seq,))]
                for kind in ("record", "checkpoint", "unreadable"):
                    o = [l for l in old if json.loads(l)["type"] == kind]
                    n = [l for l in new if json.loads(l)["type"] == kind]
                    assert n[:len(o)] == o, (from_seq, kind)
                assert len(old) > 1 and json.loads(new[-1])["type"] == "export"
                tn, to = json.loads(new[-1]), json.loads(old[-1])
                assert abs(tn.pop("at_us") - to.pop("at_us")) < 60_000_000, (new[-1], old[-1])
                assert tn.pop("head_seq") >= to.pop("head_seq")
                # What the writer had committed (shared memory): the export holds that record.
                wseq, whash, wcommitted = tn.pop("writer_head_seq"), tn.pop("writer_head_hash"), tn.pop("writer_committed_seq")
                assert tn == to, (new[-1], old[-1])
                records = {json.loads(l)["seq"]: json.loads(l)["hash"] for l in new if json.loads(l)["type"] == "record"}
                assert wseq is not None and wcommitted >= wseq
                if records:
                    assert max(records) <= wcommitted
                    if wseq >= min(records):
                        assert records[wseq] == whash
            assert any(json.loads(l)["type"] == "checkpoint" for l in new)
        finally:
            c.execute("ROLLBACK")


def test_a_child_of_the_trail_is_reported_whatever_the_catalogs_say(trail):
    """Insider review 61 F2: a child table of audit_blocks shows its forged rows in the views;
    audit_verify's SQL check for children was blinded by an `=(regclass, oid)` operator row
    inserted into pg_operator with a low object id over a built-in function (`oidgt`), and by
    pg_inherits' columns renamed with look-alikes added (`allow_system_table_mods`). The checks
    read the catalogs through PostgreSQL's own lookups now; the writer refuses such a table."""
    db = trail["db"]
    with connect(PORT_A, db) as c:
        assert c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone() == (True, None)
        free = c.execute("SELECT min(g) FROM generate_series(15000, 16383) g "
                         "WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_operator WHERE oid = g)").fetchone()[0]
        blinds = {
            "an operator row with a low oid": [
                "INSERT INTO pg_catalog.pg_operator (oid, oprname, oprnamespace, oprowner, oprkind, oprcanmerge, oprcanhash, "
                "oprleft, oprright, oprresult, oprcom, oprnegate, oprcode, oprrest, oprjoin) VALUES "
                f"({free}, '=', 11, 10, 'b', false, false, 'regclass'::regtype, 'oid'::regtype, 'bool'::regtype, 0, 0, "
                "'oidgt'::regproc, 0, 0)"],
            "pg_inherits' columns renamed": [
                "SET LOCAL allow_system_table_mods = on",
                "ALTER TABLE pg_catalog.pg_inherits RENAME COLUMN inhparent TO inhparent_r61",
                "ALTER TABLE pg_catalog.pg_inherits RENAME COLUMN inhrelid TO inhrelid_r61",
                "ALTER TABLE pg_catalog.pg_inherits ADD COLUMN inhparent oid",
                "ALTER TABLE pg_catalog.pg_inherits ADD COLUMN inhrelid oid"],
        }
        for what, statements in blinds.items():
            c.execute("BEGIN")
            try:
                c.execute("CREATE TABLE envelope.r61_child () INHERITS (envelope.audit_blocks)")
                for sql in statements:
                    c.execute(sql)
                if what == "an operator row with a low oid":   # the operator is live
                    assert c.execute("SELECT 'pg_class'::regclass = 1259::oid").fetchone()[0] is False
                ok, brk = c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone()
                assert ok is False and "has inheritance children or a parent" in brk, (what, brk)
            finally:
                c.execute("ROLLBACK")
        assert c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone() == (True, None)


def test_a_low_id_function_behind_a_view_made_again_is_reported(trail):
    """Insider review 61b: a row inserted into pg_proc with a low id, `encode(bytea, unknown)`
    running `md5_bytea`, matched the analysis of audit_events' query better than the built-in,
    and the view made again with the same text then matched that analysis: audit_events showed
    md5s for hashes, verify ok. The analysed query must call the decoder and the built-in
    `encode` by their ids."""
    with connect(PORT_A, trail["db"]) as c:
        free = c.execute("SELECT min(g) FROM generate_series(9000, 16383) g "
                         "WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_proc WHERE oid = g)").fetchone()[0]
        c.execute("BEGIN")
        try:
            c.execute("INSERT INTO pg_catalog.pg_proc SELECT %s, 'encode', pronamespace, proowner, prolang, procost, prorows, "
                      "provariadic, prosupport, prokind, prosecdef, proleakproof, proisstrict, proretset, provolatile, proparallel, "
                      "pronargs, pronargdefaults, prorettype, '17 705'::oidvector, proallargtypes, proargmodes, proargnames, "
                      "proargdefaults, protrftypes, 'md5_bytea', probin, prosqlbody, proconfig, proacl "
                      "FROM pg_catalog.pg_proc WHERE oid = 'pg_catalog.encode(bytea,text)'::regprocedure", (free,))
            # (sql/audit.sql's text: the 'hex' literal is of type unknown, which the inserted row takes.)
            c.execute("CREATE OR REPLACE VIEW envelope.audit_events AS SELECT seq, at, kind, database, session_user_name, role_name, "
                      "client_addr, application_name, backend_pid, statement_id, request_id, tenant, key_versions, operation, "
                      "value_count, failure_count, outcome, duration_us, detail, pg_catalog.encode(hash, 'hex') AS hash "
                      "FROM envelope.audit_log")
            shown, real = c.execute("SELECT e.hash, pg_catalog.encode(l.hash, 'hex'::text) FROM envelope.audit_events e "
                                    "JOIN envelope.audit_log l USING (seq) ORDER BY seq LIMIT 1").fetchone()
            assert shown != real and len(shown) == 32   # the attack works: an md5 in place of the hash
            ok, brk = c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone()
            assert ok is False and "envelope.audit_events's query is not the one the extension made" in brk, brk
        finally:
            c.execute("ROLLBACK")
        assert c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone() == (True, None)


def test_audit_prune_ignores_the_callers_search_path(trail):
    """Insider review 61b: audit_prune resolved `now() - interval` through the caller's
    search_path, and an operator there made every block "older than 400 days"."""
    with connect(PORT_A, trail["db"]) as c:
        first = c.execute("SELECT min(first_seq) FROM envelope.audit_blocks").fetchone()[0]
        c.execute("BEGIN")
        try:
            c.execute("CREATE SCHEMA r61_evil")
            c.execute("CREATE FUNCTION r61_evil.minus(timestamptz, interval) RETURNS timestamptz LANGUAGE sql "
                      "AS $$ SELECT 'infinity'::timestamptz $$")
            c.execute("CREATE OPERATOR r61_evil.- (LEFTARG = timestamptz, RIGHTARG = interval, FUNCTION = r61_evil.minus)")
            c.execute("SET LOCAL search_path = r61_evil, pg_catalog")
            assert c.execute("SELECT now() - interval '400 days' = 'infinity'::timestamptz").fetchone()[0] is True
            assert c.execute("SELECT envelope.audit_prune('400 days')").fetchone()[0] == 0
            assert c.execute("SELECT min(first_seq) FROM envelope.audit_blocks").fetchone()[0] == first
        finally:
            c.execute("ROLLBACK")


def test_a_cast_inserted_with_a_low_object_id_does_not_change_the_export(trail):
    """Insider review 58 F3: `INSERT INTO pg_cast` of a json-to-text cast with a chosen object id
    below 16384 passed the check of additions (which went by id), and the SQL export's
    `json_build_object(...)::text` took it: records blanked, the export cut at a checkpoint with
    a matching trailer, the offline verifier INTACT. The export is built in Rust over heap scans
    now: with the cast in place its records are the same lines; audit_verify reports the cast
    (its function was created after initdb, whatever the cast's own id)."""
    db = trail["db"]
    with connect(PORT_A, db) as c:
        assert c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone() == (True, None)
        before = [r[0] for r in c.execute("SELECT line FROM envelope.audit_export(1)")]
        records_before = [l for l in before if json.loads(l)["type"] == "record"]
        assert len(records_before) > 10
        c.execute("BEGIN")
        try:
            c.execute("CREATE SCHEMA r58")
            c.execute("CREATE FUNCTION r58.j2t(j json) RETURNS text LANGUAGE sql IMMUTABLE "
                      "AS $$ SELECT CASE WHEN j->>'type' = 'record' THEN NULL ELSE textin(json_out(j)) END $$")
            free = c.execute("SELECT min(g) FROM generate_series(16000, 16383) g "
                             "WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_cast WHERE oid = g)").fetchone()[0]
            c.execute("INSERT INTO pg_catalog.pg_cast (oid, castsource, casttarget, castfunc, castcontext, castmethod) "
                      "VALUES (%s, 'json'::regtype, 'text'::regtype, 'r58.j2t(json)'::regprocedure, 'e', 'f')", (free,))
            # The cast is live: what the first (SQL) export did with every record.
            assert c.execute("""SELECT json_build_object('type', 'record', 'seq', 1)::text""").fetchone()[0] is None
            after = [r[0] for r in c.execute("SELECT line FROM envelope.audit_export(1)")]
            assert all(l is not None for l in after)
            records_after = [l for l in after if json.loads(l)["type"] == "record"]
            assert records_after[:len(records_before)] == records_before
            assert json.loads(after[-1])["head_seq"] >= json.loads(before[-1])["head_seq"]
            ok, brk = c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone()
            assert ok is False and "1 cast(s) between built-in types" in brk, brk
        finally:
            c.execute("ROLLBACK")
        assert c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone() == (True, None)


def test_additions_to_pg_catalog_are_reported_by_audit_verify(trail):
    """Insider review 55: the export's body (search_path pg_catalog) names built-in functions,
    operators and casts unqualified, and a superuser can add better matches to pg_catalog: a new
    json-to-text cast blanked the newest records out of every export, a json_build_object
    overload rewrote the trailer, and an `=` operator on text[] made audit_verify's own check of
    the function's settings pass. audit_verify now reports objects added to pg_catalog (and
    row-level security on audit_checkpoints, which hid the newest checkpoints from an auditor
    without BYPASSRLS)."""
    with connect(PORT_A, trail["db"]) as c:
        assert c.execute("SELECT ok FROM envelope.audit_verify()").fetchone()[0] is True
        c.execute("CREATE SCHEMA IF NOT EXISTS r55")
        c.execute("CREATE OR REPLACE FUNCTION r55.json_to_text(j json) RETURNS text LANGUAGE sql IMMUTABLE "
                  "AS $$ SELECT CASE WHEN j->>'type' = 'record' THEN NULL ELSE textin(json_out(j)) END $$")
        c.execute("CREATE OR REPLACE FUNCTION r55.always(text[], text[]) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true'")
        c.execute("CREATE DOMAIN r55.k AS text")
        c.execute("CREATE DOMAIN r55.seq AS bigint")
        c.execute("CREATE FUNCTION r55.lt(r55.seq, bigint) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT $1::bigint < $2'")
        undo = {
            "a cast": ("CREATE CAST (json AS text) WITH FUNCTION r55.json_to_text(json)", "DROP CAST IF EXISTS (json AS text)", "1 cast(s)"),
            "a function": ("CREATE FUNCTION pg_catalog.json_build_object(text, text) RETURNS json LANGUAGE sql "
                           "AS $$ SELECT '{}'::json $$", "DROP FUNCTION IF EXISTS pg_catalog.json_build_object(text, text)",
                           "function(s): json_build_object"),
            "an operator": ("CREATE OPERATOR pg_catalog.= (LEFTARG = text[], RIGHTARG = text[], FUNCTION = r55.always)",
                            "DROP OPERATOR IF EXISTS pg_catalog.= (text[], text[])", "operator(s): ="),
            "row-level security": ("ALTER TABLE envelope.audit_checkpoints ENABLE ROW LEVEL SECURITY",
                                   "ALTER TABLE envelope.audit_checkpoints DISABLE ROW LEVEL SECURITY", "row-level security"),
            # Review 56: the keys' `unknown` literals match a domain over text exactly.
            "a function on a type of its own": ("CREATE FUNCTION pg_catalog.json_build_object(r55.k, r55.k) RETURNS json "
                                                "LANGUAGE sql AS $$ SELECT '{}'::json $$",
                                                "DROP FUNCTION IF EXISTS pg_catalog.json_build_object(r55.k, r55.k)",
                                                "function(s): json_build_object"),
            "an operator on a type of its own": ("CREATE OPERATOR pg_catalog.< (LEFTARG = r55.seq, RIGHTARG = bigint, FUNCTION = r55.lt)",
                                                 "DROP OPERATOR IF EXISTS pg_catalog.< (r55.seq, bigint)", "operator(s): <"),
            # Review 56: a checkpoint column changed to a domain (whose operators then filtered
            # the export) or another type (verify raised an error reading it).
            "a checkpoint column's type": ("ALTER TABLE envelope.audit_checkpoints ALTER COLUMN seq TYPE r55.seq",
                                           "ALTER TABLE envelope.audit_checkpoints ALTER COLUMN seq TYPE bigint",
                                           "envelope.audit_checkpoints does not have exactly the extension's columns"),
            "a checkpoint column's type (numeric)": ("ALTER TABLE envelope.audit_checkpoints ALTER COLUMN seq TYPE numeric",
                                                     "ALTER TABLE envelope.audit_checkpoints ALTER COLUMN seq TYPE bigint",
                                                     "envelope.audit_checkpoints does not have exactly the extension's columns"),
        }
        try:
            for what, (do, _, says) in undo.items():
                c.execute(do)
                # (A changed checkpoint table holds the writer back: it stays queued until undone.)
                ok, brk = c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone()
                assert ok is False and says in brk, (what, brk)
                c.execute(undo[what][1])
            if c.execute("SELECT 1 FROM pg_cast WHERE castsource = 'json'::regtype AND casttarget = 'text'::regtype").fetchone():
                pytest.fail("the cast was not dropped")
        finally:
            for _, (_, drop, _) in undo.items():
                c.execute(drop)
            c.execute("DROP SCHEMA r55 CASCADE")
            assert c.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                             "WHERE attrelid = 'envelope.audit_checkpoints'::regclass AND attname = 'seq'").fetchone() == ("bigint",)
        assert c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone() == (True, None)


def test_insider_review_57_changes_to_the_decoder_views_export_and_tables_are_reported(trail):
    """Insider review 57 made audit_verify say ok while the views or the export lied, through the
    extension's own objects: a result column's type of the decoder changed in pg_proc, a junk
    target entry with a set-returning function put into audit_log's stored rule (the deparser
    does not print it: the view's readers lost every decrypt record), a function call hidden
    behind the printed default of audit_export's `from_seq`; made it raise an error (a composite
    type in place of a table of the writer's); made it report pg_envelope's own operators as
    foreign (`quote_all_identifiers`); and an index kept from receiving new blocks, then marked
    ready again, made the export leave out the newest records under the reader's planner
    settings. Each is done, checked and undone."""
    db = trail["db"]
    with connect(PORT_A, db) as c:
        assert c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone() == (True, None)
        # The caller's settings do not change the verdict.
        for setting in ("quote_all_identifiers = on", "enable_seqscan = off", "enable_bitmapscan = off"):
            c.execute(f"SET {setting}")
        assert c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone() == (True, None)
        c.execute("RESET ALL")
        dec = "'envelope.audit_block_records(bytea,bytea)'::regprocedure"
        exp = "'envelope.audit_export(bigint)'::regprocedure"
        types = c.execute(f"SELECT proallargtypes::text FROM pg_proc WHERE oid = {dec}").fetchone()[0]
        rule = c.execute("SELECT ev_action::text FROM pg_rewrite WHERE ev_class = 'envelope.audit_log'::regclass").fetchone()[0]
        default = c.execute(f"SELECT proargdefaults::text FROM pg_proc WHERE oid = {exp}").fetchone()[0]
        decrypts = c.execute("SELECT count(*) FROM envelope.audit_log WHERE kind = 'decrypt'").fetchone()[0]
        assert decrypts > 0
        c.execute("CREATE SCHEMA IF NOT EXISTS r57")
        c.execute("CREATE FUNCTION r57.keep(kind text) RETURNS SETOF int LANGUAGE sql IMMUTABLE "
                  "AS $$ SELECT 1 WHERE kind IS DISTINCT FROM 'decrypt' $$")
        c.execute("CREATE FUNCTION r57.late_start(int) RETURNS bigint LANGUAGE sql STABLE "
                  "AS $$ SELECT coalesce((SELECT max(seq) FROM envelope.audit_checkpoints), 0) $$")
        keep = c.execute("SELECT 'r57.keep(text)'::regprocedure::oid").fetchone()[0]
        late = c.execute("SELECT 'r57.late_start(int)'::regprocedure::oid").fetchone()[0]
        junk = (" {TARGETENTRY :expr {FUNCEXPR :funcid %d :funcresulttype 23 :funcretset true :funcvariadic false :funcformat 0 "
                ":funccollid 0 :inputcollid 100 :args ({VAR :varno 4 :varattno 4 :vartype 25 :vartypmod -1 :varcollid 100 "
                ":varlevelsup 0 :varnosyn 4 :varattnosyn 4 :location -1}) :location -1} :resno 23 :resname <> :ressortgroupref 0 "
                ":resorigtbl 0 :resorigcol 0 :resjunk true}" % keep)
        last_te = ":resname hash :ressortgroupref 0 :resorigtbl 0 :resorigcol 0 :resjunk false})"
        assert last_te in rule and ":hasTargetSRFs false" in rule
        forged_rule = rule.replace(last_te, last_te[:-2] + "}" + junk + ")").replace(":hasTargetSRFs false", ":hasTargetSRFs true")
        assert ":funcid 481 " in default

        def as_tree(text):
            # (A cast of text to pg_node_tree exists only while a catalog row is written: verify
            # reports any cast added between built-in types.)
            c.execute("CREATE CAST (text AS pg_node_tree) WITHOUT FUNCTION")
            return text

        def done():
            c.execute("DROP CAST IF EXISTS (text AS pg_node_tree)")

        cases = {
            "a result column's type": (
                lambda: c.execute(f"UPDATE pg_proc SET proallargtypes = (SELECT array_agg(CASE WHEN i = 9 THEN 17 ELSE t END ORDER BY i) "
                                  f"FROM unnest(proallargtypes) WITH ORDINALITY u(t, i))::oid[] WHERE oid = {dec}"),
                lambda: c.execute(f"UPDATE pg_proc SET proallargtypes = %s::oid[] WHERE oid = {dec}", (types,)),
                "envelope.audit_log is not as the extension made it"),
            "a junk entry in the view's rule": (
                lambda: (as_tree(None), c.execute("UPDATE pg_rewrite SET ev_action = %s::text::pg_node_tree "
                                                  "WHERE ev_class = 'envelope.audit_log'::regclass", (forged_rule,)), done()),
                lambda: (as_tree(None), c.execute("UPDATE pg_rewrite SET ev_action = %s::text::pg_node_tree "
                                                  "WHERE ev_class = 'envelope.audit_log'::regclass", (rule,)), done()),
                "envelope.audit_log's query is not the one the extension made"),
            "a call behind the export's default": (
                lambda: (as_tree(None), c.execute(f"UPDATE pg_proc SET proargdefaults = %s::text::pg_node_tree WHERE oid = {exp}",
                                                  (default.replace(":funcid 481 ", f":funcid {late} "),)), done()),
                lambda: (as_tree(None), c.execute(f"UPDATE pg_proc SET proargdefaults = %s::text::pg_node_tree WHERE oid = {exp}",
                                                  (default,)), done()),
                "envelope.audit_export is not the function the extension made"),
            # Review 58: a qualification in the rule (every read of the views failed).
            "a qualification in the view's rule": (
                lambda: (as_tree(None), c.execute("UPDATE pg_rewrite SET ev_qual = %s::text::pg_node_tree "
                                                  "WHERE ev_class = 'envelope.audit_log'::regclass",
                                                  ("{CONST :consttype 16 :consttypmod -1 :constcollid 0 :constlen 1 :constbyval true "
                                                   ":constisnull false :location -1 :constvalue 1 [ 1 0 0 0 0 0 0 0 ]}",)), done()),
                lambda: (as_tree(None), c.execute("UPDATE pg_rewrite SET ev_qual = %s::text::pg_node_tree "
                                                  "WHERE ev_class = 'envelope.audit_log'::regclass", ("<>",)), done()),
                "envelope.audit_log's query is not the one the extension made"),
            # Review 58: a truncated tree crashed PostgreSQL's node reader in the check.
            "a malformed default": (
                lambda: (as_tree(None), c.execute(f"UPDATE pg_proc SET proargdefaults = %s::text::pg_node_tree WHERE oid = {exp}",
                                                  ("({FUNCEXPR :funcid",)), done()),
                lambda: (as_tree(None), c.execute(f"UPDATE pg_proc SET proargdefaults = %s::text::pg_node_tree WHERE oid = {exp}",
                                                  (default,)), done()),
                "envelope.audit_export is not the function the extension made"),
            # Review 58: code on the writer's other tables, and tables a crash empties.
            "a CHECK constraint on the hourly counts": (
                lambda: c.execute("ALTER TABLE envelope.audit_hourly ADD CONSTRAINT r57_peek CHECK (decrypts >= 0)"),
                lambda: c.execute("ALTER TABLE envelope.audit_hourly DROP CONSTRAINT IF EXISTS r57_peek"),
                "envelope.audit_hourly has a CHECK constraint"),
            "another default on the alerts": (
                lambda: c.execute("ALTER TABLE envelope.audit_alerts ALTER COLUMN detail SET DEFAULT r57.late_start(1)::text"),
                lambda: c.execute("ALTER TABLE envelope.audit_alerts ALTER COLUMN detail DROP DEFAULT"),
                "envelope.audit_alerts has a column default the extension did not give it"),
            "an unlogged trail": (
                lambda: c.execute("ALTER TABLE envelope.audit_blocks SET UNLOGGED"),
                lambda: c.execute("ALTER TABLE envelope.audit_blocks SET LOGGED"),
                "is not a permanent (logged) table"),
            # Review 61b: without its primary key a block forged at the writer's next sequence
            # number sat beside the writer's own.
            "no primary key on the trail": (
                lambda: c.execute("ALTER TABLE envelope.audit_blocks DROP CONSTRAINT audit_blocks_pkey"),
                lambda: c.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'audit_blocks_pkey') THEN "
                                  "ALTER TABLE envelope.audit_blocks ADD CONSTRAINT audit_blocks_pkey PRIMARY KEY (first_seq); END IF; END $$"),
                "has no valid unique index on first_seq"),
            "unlogged checkpoints": (
                lambda: c.execute("ALTER TABLE envelope.audit_checkpoints SET UNLOGGED"),
                lambda: c.execute("ALTER TABLE envelope.audit_checkpoints SET LOGGED"),
                "envelope.audit_checkpoints is not a permanent heap table"),
            # Review 59: an inheritance child's index expressions ran inside verify and the writer.
            "a child of the checkpoints": (
                lambda: c.execute("CREATE TABLE envelope.r59_cp_child () INHERITS (envelope.audit_checkpoints)"),
                lambda: c.execute("DROP TABLE IF EXISTS envelope.r59_cp_child"),
                "envelope.audit_checkpoints has inheritance children or a parent"),
            "a composite type in place of a table": (
                lambda: (c.execute("ALTER TABLE envelope.audit_alerts RENAME TO audit_alerts_r57"),
                         c.execute("CREATE TYPE envelope.audit_alerts AS (a int)")),
                lambda: c.execute("DO $$ BEGIN IF to_regclass('envelope.audit_alerts_r57') IS NOT NULL THEN "
                                  "DROP TYPE IF EXISTS envelope.audit_alerts; ALTER TABLE envelope.audit_alerts_r57 RENAME TO audit_alerts; "
                                  "END IF; END $$"),
                "envelope.audit_alerts is missing or is not pg_envelope's table"),
        }
        try:
            for what, (do, undo, says) in cases.items():
                do()
                with connect(PORT_A, db) as other:   # a new session: the rule and the function as stored now
                    if what == "a junk entry in the view's rule":
                        # The attack works: the view's readers lose every decrypt record.
                        assert other.execute("SELECT count(*) FROM envelope.audit_log WHERE kind = 'decrypt'").fetchone()[0] == 0
                    if what == "a call behind the export's default":
                        # The attack works: the printed default is intact, the export starts late.
                        first = json.loads(other.execute("SELECT line FROM envelope.audit_export()").fetchone()[0])
                        assert first["type"] == "record" and first["seq"] > 1, first
                        assert other.execute("SELECT pg_get_function_arguments(%s::regprocedure)" % exp).fetchone()[0] == "from_seq bigint DEFAULT 1"
                    ok, brk = other.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone()
                assert ok is False and says in brk, (what, brk)
                undo()
                with connect(PORT_A, db) as other:
                    assert other.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone() == (True, None), what
        finally:
            done()
            for _, (_, undo, _) in cases.items():
                undo()
            c.execute("DROP SCHEMA r57 CASCADE")
        with connect(PORT_A, db) as other:
            assert other.execute("SELECT count(*) FROM envelope.audit_log WHERE kind = 'decrypt'").fetchone()[0] >= decrypts
            assert other.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone() == (True, None)


def test_an_index_kept_from_new_blocks_does_not_shorten_the_export(trail):
    """Insider review 57: an index on audit_blocks.last_seq that a superuser kept from receiving
    new blocks (indisready off while the writer appended), then marked ready again, made the
    export leave out the newest records for a reader whose role disabled sequential scans. The
    export and audit_verify read the tables without indexes."""
    db = trail["db"]
    with connect(PORT_A, db) as c:
        c.execute("CREATE INDEX r57_last_seq ON envelope.audit_blocks (last_seq)")
        try:
            c.execute("UPDATE pg_index SET indisready = false WHERE indexrelid = 'envelope.r57_last_seq'::regclass")
            # `last_seq + 0`: max(last_seq) itself may be answered from the stale index (it is
            # still valid for queries, only not ready for inserts), which never sees the new
            # blocks, and the wait then timed out (CI, thirteenth session).
            before = c.execute("SELECT max(last_seq + 0) FROM envelope.audit_blocks").fetchone()[0]
            with as_tenant(c, TENANT):
                c.execute("SELECT count(v::text) FROM audit_export_t WHERE id <= 3")
            assert wait_until(lambda: audit_status(c)["queued"] == 0 and
                              c.execute("SELECT max(last_seq + 0) FROM envelope.audit_blocks").fetchone()[0] > before)
            c.execute("UPDATE pg_index SET indisready = true WHERE indexrelid = 'envelope.r57_last_seq'::regclass")
            with connect(PORT_A, db) as reader:
                for setting in ("enable_seqscan = off", "enable_bitmapscan = off"):
                    reader.execute(f"SET {setting}")
                # The stale index really is what such a plan would read.
                assert reader.execute("SELECT count(*) FROM envelope.audit_blocks WHERE last_seq > %s", (before,)).fetchone()[0] == 0
                newest = reader.execute("SELECT max(seq) FROM envelope.audit_log").fetchone()[0]
                lines = [json.loads(r[0]) for r in reader.execute("SELECT line FROM envelope.audit_export(1)")]
                assert max(x["seq"] for x in lines if x["type"] == "record") >= newest
                ok, brk = reader.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone()
                assert ok is True, brk
        finally:
            c.execute("DROP INDEX IF EXISTS envelope.r57_last_seq")


def test_a_catalog_replaced_by_a_view_is_reported(trail):
    """Insider review 59: with allow_system_table_mods a superuser renamed pg_catalog.pg_cast and
    put a view under its name that left out their new json-to-text cast; audit_verify's checks,
    reading the catalog by name, said ok while the export was rewritten through the cast."""
    with connect(PORT_A, trail["db"]) as c:
        c.execute("BEGIN")
        try:
            c.execute("SET LOCAL allow_system_table_mods = on")
            c.execute("ALTER TABLE pg_catalog.pg_cast RENAME TO pg_cast_r59")
            c.execute("CREATE VIEW pg_catalog.pg_cast AS SELECT * FROM pg_catalog.pg_cast_r59")
            ok, brk = c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone()
            assert ok is False and "pg_catalog.pg_cast is not the system catalog of that name" in brk, brk
        finally:
            c.execute("ROLLBACK")
        assert c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone() == (True, None)
