"""The audit trail (issue 13, first slice): per-statement records that survive a rollback, the
hash chain and its verification against tampering, fail-closed when the writer is gone.

The writer is the maintenance worker, which writes in envelope.database (`postgres` here), so
the audited work runs there too. The module turns `envelope.audit` on with ALTER SYSTEM and off
again at the end.
"""

import os
import signal
import time

import psycopg
import pytest

from conftest import PORT_A, as_tenant, connect

DB = "postgres"
TENANT = "audit_t"


def wait_until(pred, timeout=15, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def set_audit(c, on, **extra):
    c.execute(f"ALTER SYSTEM SET envelope.audit = {'on' if on else 'off'}")
    for k, v in extra.items():
        c.execute(f"ALTER SYSTEM SET envelope.{k} = {v}")
    c.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)


@pytest.fixture(scope="module")
def audited():
    with connect(PORT_A, DB) as c:
        # Leave the database as found: test_lifecycle's worker tests need a `postgres` database
        # without pg_envelope (they install and drop it themselves).
        had = c.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_envelope'").fetchone() is not None
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_envelope")
        if not c.execute("SELECT 1 FROM envelope.tenants WHERE name = %s", (TENANT,)).fetchone():
            c.execute("SELECT envelope.create_tenant(%s)", (TENANT,))
        c.execute("SELECT envelope.grant_tenant(%s, current_user)", (TENANT,))
        c.execute("DROP TABLE IF EXISTS audit_t")
        c.execute("CREATE TABLE audit_t (id int, v envelope.encrypted_text)")
        with as_tenant(c, TENANT):
            c.execute("INSERT INTO audit_t SELECT g, ('v' || g)::text FROM generate_series(1, 10000) g")
        assert wait_until(lambda: c.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_envelope maintenance'").fetchone()[0] == 1)
        set_audit(c, True)
    yield
    with connect(PORT_A, DB) as c:
        c.execute("ALTER SYSTEM RESET envelope.audit")
        c.execute("ALTER SYSTEM RESET envelope.audit_max_delay")
        c.execute("ALTER SYSTEM RESET envelope.audit_fail_closed")
        c.execute("ALTER SYSTEM RESET envelope.audit_checkpoint_interval")
        c.execute("SELECT pg_reload_conf()")
        c.execute("DROP TABLE IF EXISTS audit_t")
        if not had:
            c.execute("DROP EXTENSION pg_envelope CASCADE")


def last_seq(c):
    return c.execute("SELECT coalesce(max(seq), 0) FROM envelope.audit_log").fetchone()[0]


def records_after(c, seq, request_id):
    assert wait_until(lambda: c.execute("SELECT (envelope.status()->'audit'->>'queued')::int").fetchone()[0] == 0)
    return c.execute(
        "SELECT kind, tenant, operation, value_count, failure_count, outcome, key_versions FROM envelope.audit_log "
        "WHERE seq > %s AND request_id = %s ORDER BY seq", (seq, request_id)).fetchall()


def test_one_record_per_statement_also_when_rolled_back_and_failures_with_their_code(audited):
    with connect(PORT_A, DB) as c:
        start = last_seq(c)
        c.execute("SET envelope.request_id = 'counts-1'")
        with as_tenant(c, TENANT):
            assert c.execute("SELECT count(v::text) FROM audit_t").fetchone()[0] == 10000
        # 50 statements in a transaction that rolls back: 50 records.
        c.execute("BEGIN")
        c.execute("SELECT set_config('app.tenant_id', %s, true)", (TENANT,))
        for i in range(50):
            c.execute("SELECT count(v::text) FROM audit_t WHERE id <= %s", (i + 1,))
        c.execute("ROLLBACK")
        # A failed decryption: the failure's SQLSTATE.
        with pytest.raises(psycopg.Error):
            with as_tenant(c, TENANT):
                c.execute("SELECT envelope.decrypt_field('\\x00'::bytea)")
        rows = records_after(c, start, "counts-1")
    assert rows[0] == ("decrypt", TENANT, "decrypt", 10000, 0, "ok", "1"), rows[0]
    assert [r[3] for r in rows[1:51]] == list(range(1, 51)), "one record per statement of the rolled-back transaction"
    assert rows[51][3:6] == (1, 1, "22000"), rows[51]
    assert len(rows) == 52


def test_chain_verifies_and_every_tampering_is_reported(audited):
    with connect(PORT_A, DB) as c:
        c.execute("SET envelope.request_id = 'chain'")
        for _ in range(5):
            with as_tenant(c, TENANT):
                c.execute("SELECT count(v::text) FROM audit_t WHERE id < 3")
        records_after(c, 0, "chain")
        # A checkpoint covering the head (a truncated tail is caught by the newest checkpoint).
        set_audit(c, True, audit_checkpoint_interval=1)
        head = last_seq(c)
        assert wait_until(lambda: c.execute("SELECT coalesce(max(seq), 0) FROM envelope.audit_checkpoints").fetchone()[0] >= head)
        ok = c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone()
        assert ok == (True, None), ok
        # Normal paths refuse changes, even to a superuser.
        for q in ("UPDATE envelope.audit_log SET value_count = 0", "DELETE FROM envelope.audit_log", "TRUNCATE envelope.audit_log"):
            with pytest.raises(psycopg.Error) as e:
                c.execute(q)
            assert e.value.sqlstate == "42501" and "append-only" in str(e.value)
        seq = last_seq(c) - 2
        # Each tampering, done as a superuser with the triggers disabled, inside a transaction
        # that is rolled back afterwards (the chain must stay usable for the next test).
        cases = {
            "edit": (f"UPDATE envelope.audit_log SET value_count = value_count + 1 WHERE seq = {seq}", f"record {seq} does not match its hash: altered"),
            "delete": (f"DELETE FROM envelope.audit_log WHERE seq = {seq}", f"record {seq} is missing"),
            "insert": (f"ALTER TABLE envelope.audit_log DROP CONSTRAINT audit_log_pkey; INSERT INTO envelope.audit_log SELECT * FROM envelope.audit_log WHERE seq = {seq}",
                       f"record {seq} appears twice: inserted"),
            "reorder": (f"UPDATE envelope.audit_log SET seq = -1 WHERE seq = {seq}; UPDATE envelope.audit_log SET seq = {seq} WHERE seq = {seq + 1};"
                        f" UPDATE envelope.audit_log SET seq = {seq + 1} WHERE seq = -1", f"record {seq} does not"),
            "truncate-tail": (f"DELETE FROM envelope.audit_log WHERE seq > {seq}", "truncated"),
        }
        for name, (tamper, expected) in cases.items():
            c.execute("BEGIN")
            c.execute("ALTER TABLE envelope.audit_log DISABLE TRIGGER USER")
            c.execute(tamper)
            ok, brk = c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone()
            c.execute("ROLLBACK")
            print(f"{name}: {brk}")
            assert ok is False and expected in brk, (name, brk)
        assert c.execute("SELECT ok FROM envelope.audit_verify()").fetchone()[0] is True
        # A forged checkpoint (another MAC) is reported.
        c.execute("BEGIN")
        c.execute("ALTER TABLE envelope.audit_checkpoints DISABLE TRIGGER USER")
        c.execute("UPDATE envelope.audit_checkpoints SET mac = sha256(mac)")
        ok, brk = c.execute("SELECT ok, first_break FROM envelope.audit_verify()").fetchone()
        c.execute("ROLLBACK")
        assert ok is False and "invalid MAC" in brk, brk
        # Reading the trail through audit_verify is itself recorded.
        assert wait_until(lambda: c.execute("SELECT count(*) FROM envelope.audit_log WHERE kind = 'audit_read'").fetchone()[0] > 0)


def test_writer_gone_fails_closed_then_records_everything(audited):
    with connect(PORT_A, DB) as c:
        set_audit(c, True, audit_max_delay=2)
        start = last_seq(c)
        c.execute("SET envelope.request_id = 'writer-gone'")
        pid = c.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_envelope maintenance'").fetchone()[0]
        os.kill(pid, signal.SIGSTOP)  # the writer hangs: nothing is drained
        try:
            with as_tenant(c, TENANT):
                c.execute("SELECT count(v::text) FROM audit_t WHERE id < 5")  # queued, not written
            time.sleep(2.5)
            with pytest.raises(psycopg.Error) as e:
                with as_tenant(c, TENANT):
                    c.execute("SELECT count(v::text) FROM audit_t WHERE id < 5")
            assert e.value.sqlstate == "57P03" and "cannot be audited" in str(e.value)
            # The documented alternative: warn and continue.
            set_audit(c, True, audit_max_delay=2, audit_fail_closed="off")
            with as_tenant(c, TENANT):
                assert c.execute("SELECT count(v::text) FROM audit_t WHERE id < 5").fetchone()[0] == 4
        finally:
            os.kill(pid, signal.SIGCONT)
        set_audit(c, True, audit_max_delay=10, audit_fail_closed="on")
        rows = records_after(c, start, "writer-gone")
    # Nothing recorded was lost: the first statement, the refused one, the warned one.
    assert [r[3:6] for r in rows] == [(4, 0, "ok"), (1, 1, "57P03"), (4, 0, "ok")], rows


def test_a_burst_of_short_statements_outruns_no_writer(audited):
    """More single-value statements than the queue holds, as fast as one client sends them:
    backends wake the writer as the queue fills and wait for room, so none is refused and every
    statement is recorded once."""
    n = 5000  # the queue holds 2048
    with connect(PORT_A, DB) as c:
        start = last_seq(c)
        c.execute("SET envelope.request_id = 'burst'")
        c.execute("SELECT set_config('app.tenant_id', %s, false)", (TENANT,))
        for i in range(n):
            c.execute("SELECT v::text FROM audit_t WHERE id = %s", (i % 10000 + 1,), prepare=True)
        c.execute("SELECT 1")  # the last statement's record is pushed at the next key use or transaction end
        rows = records_after(c, start, "burst")
        assert len(rows) == n and all(r[3] == 1 and r[5] == "ok" for r in rows), (len(rows), rows[:3])
        assert c.execute("SELECT (envelope.status()->'audit'->>'dropped')::int").fetchone()[0] == 0
