"""The KMS stampede bound, `envelope.max_concurrent_provider_calls` (issue 16 item 4), measured by the
key server's own log.

The module runs its own PostgreSQL 15 cluster (instance `pg15-stampede-ci`, 127.0.0.1:54344,
started through scripts/cluster.sh) and its own OpenBao dev server (127.0.0.1:8252, plain http;
dev mode also opens 8253) with a file audit device, through `stampede_kit.py` (shared with
benches/stampede.py). OpenBao is made a slower KMS (every storage operation takes 20 ms and caching
is off, so a Transit decrypt spends ~20 ms inside the server): with a cached local OpenBao a
decrypt takes ~0.1 ms between its request and response entries and calls hardly ever overlap
there, so the log could not show a violation of the bound even without one.

What a user would notice:

* 60 sessions cold for tenant `st` (each first decrypted another tenant's value, so that backend
  start-up costs are behind them and their `st` unwraps start together) decrypt at once with a
  bound of 4: OpenBao's log shows exactly 60 `transit/decrypt` calls (one per session; each
  session's status() counts one call for `st`), never more than 4 between request and response,
  every session answered with the right value; status() shows a peak of at most 4 and waits;
* the positive control: the same with the bound off (0, by a reload) shows far more than 4 in
  flight in OpenBao's log (about 50 on the 2-core machine), so the measurement can see a breach;
* a provider that accepts and never answers, bound 1: one backend holds the slot, a second one
  fails with 58000 and the slot message after about its kms_timeout (1 s), not a hang; the slot
  comes back when the holder's own KMS timeout ends its call (in_use 0);
* a waiter cancelled with pg_cancel_backend gets 57014 at once, and its session later calls the
  KMS normally; a holder ended with pg_terminate_backend frees its slot at once (not after its
  20 s kms_timeout);
* a reload from 1 to 2 lets two calls hang at once and the third wait ("all 2 ... slots");
* nobody changes the setting with SET (it is SIGHUP: 55P02, superusers included); a plain role
  cannot ALTER SYSTEM it (42501).
"""

import threading
import time

import psycopg
import pytest

import stampede_kit as kit

PORT = 54344
INSTANCE = "pg15-stampede-ci"
BAO_PORT = 8252
DB = "stampede_ci"
SESSIONS = 60
BOUND = 4
PLAIN = "st_plain"


@pytest.fixture(scope="module")
def env():
    bao = kit.Bao(BAO_PORT, latency_ms=20)
    cl = kit.Cluster(INSTANCE, PORT)
    try:
        bao.start()
        # A restart with the bound set: status()'s peak counts from here.
        cl.start({"max_connections": 150, "envelope.max_concurrent_provider_calls": BOUND, "envelope.kms_timeout": "5s"})
        kit.make_db(cl, bao, DB, tenants=("st", "warm"))
        with cl.connect(DB) as c:
            c.execute(f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{PLAIN}') "
                      f"THEN CREATE ROLE {PLAIN} LOGIN; END IF; END $$")
        yield cl, bao
        log = cl.log.read_text(errors="replace")
        assert "terminated by signal" not in log and "PANIC" not in log, "a backend crashed (see the server log)"
    finally:
        try:
            cl.stop()
        finally:
            bao.stop()


def set_bound(cl, n):
    cl.set({"envelope.max_concurrent_provider_calls": n})
    assert cl.slots(DB)["max"] == n


def stampede(cl, bao, n):
    """n sessions, warmed on tenant `warm`, then all decrypting tenant `st` at once."""
    sessions = kit.open_sessions(cl, DB, n, ["SET app.tenant_id = 'warm'", kit.DECRYPT, "SET app.tenant_id = 'st'"])
    try:
        before = cl.slots(DB)
        offset = bao.audit_offset()
        results, wall, _ = kit.fire(sessions, kit.DECRYPT)
        calls = bao.transit_calls(offset)
        after = cl.slots(DB)
        per_session = [s.conn.execute("SELECT envelope.status()->'backend'->'provider_calls'->>'bao'").fetchone()[0]
                       for s in sessions]
    finally:
        kit.close_sessions(sessions)
    return results, calls, before, after, per_session, wall


def test_cold_sessions_make_one_call_each_and_never_more_than_the_bound_at_once(env):
    cl, bao = env
    assert cl.slots(DB)["max"] == BOUND
    results, calls, before, after, per_session, wall = stampede(cl, bao, SESSIONS)
    failed = [(r.sqlstate, r.message) for r in results if r.sqlstate or r.value != kit.PLAINTEXT]
    assert not failed, failed[:3]
    # OpenBao's own log: one unwrap per session, every one answered, at most BOUND at once.
    assert len(calls) == SESSIONS, f"{len(calls)} transit/decrypt calls for {SESSIONS} cold sessions"
    assert all(resp is not None for _, resp, _ in calls)
    in_flight = kit.max_in_flight(calls)
    assert 1 <= in_flight <= BOUND, f"{in_flight} calls in flight at OpenBao with a bound of {BOUND}"
    # Each backend counted exactly one provider call for `st` (one for `warm` before).
    assert per_session == ["2"] * SESSIONS, per_session
    # status(): the peak since the restart stayed within the bound; sessions waited for slots.
    assert after["peak"] <= BOUND, after
    assert after["calls"] - before["calls"] == SESSIONS, (before, after)
    assert after["waited"] - before["waited"] > 0, (before, after)
    assert after["timed_out"] == before["timed_out"], (before, after)
    assert after["in_use"] == 0, after
    print(f"\nbound {BOUND}: {len(calls)} calls, {in_flight} in flight at most, {wall:.2f} s, "
          f"waited {after['waited'] - before['waited']}")


def test_positive_control_without_the_bound_openbao_sees_more_than_the_bound_at_once(env):
    """The same stampede with the bound off (a reload to 0): the measurement sees the overlap
    (about 50 of 60 at once here). Robust on 2 cores because (1) OpenBao's 20 ms per decrypt makes
    calls overlap inside it whenever more than one is sent at a time, and (2) the sessions are
    warmed on another tenant first, so their `st` unwraps are sent within a few ms of each other
    instead of being spread out by backend start-up work."""
    cl, bao = env
    set_bound(cl, 0)
    try:
        results, calls, before, after, per_session, _ = stampede(cl, bao, SESSIONS)
    finally:
        set_bound(cl, BOUND)
    assert not [r for r in results if r.sqlstate or r.value != kit.PLAINTEXT]
    assert len(calls) == SESSIONS and per_session == ["2"] * SESSIONS
    in_flight = kit.max_in_flight(calls)
    assert in_flight > BOUND, f"only {in_flight} in flight without a bound: the measurement cannot see a breach"
    # No slot table in use without a bound.
    assert after["calls"] == before["calls"] and after["in_use"] == 0
    print(f"\nbound off: {len(calls)} calls, {in_flight} in flight at most")


def test_the_setting_is_sighup_only(env):
    cl, _ = env
    with cl.connect(DB, user=PLAIN) as c:
        for q in ("SET envelope.max_concurrent_provider_calls = 0",
                  "SELECT set_config('envelope.max_concurrent_provider_calls', '0', false)"):
            with pytest.raises(psycopg.Error) as e:
                c.execute(q)
            assert e.value.sqlstate == "55P02", (q, e.value)
        with pytest.raises(psycopg.Error) as e:
            c.execute("ALTER SYSTEM SET envelope.max_concurrent_provider_calls = 0")
        assert e.value.sqlstate == "42501"
        assert c.execute("SHOW envelope.max_concurrent_provider_calls").fetchone()[0] == str(BOUND)
    with cl.connect(DB) as c:  # not even a superuser, inside a session
        with pytest.raises(psycopg.Error) as e:
            c.execute("SET envelope.max_concurrent_provider_calls = 0")
        assert e.value.sqlstate == "55P02"


# --------------------------------------------------------------------------------------------
# A key server that never answers: the waits, their timeout, cancellation, termination.
# --------------------------------------------------------------------------------------------


@pytest.fixture
def hang(env):
    cl, bao = env
    srv = kit.HangingServer()
    with cl.connect(DB) as c:
        c.execute("DELETE FROM envelope.key_providers WHERE name = 'hang'")
        c.execute("SELECT envelope.add_key_provider('hang', 'vault_transit', %s)",
                  (bao.options(url=f"http://127.0.0.1:{srv.port}"),))
    yield srv
    srv.close()
    kit.wait_until(lambda: cl.slots(DB)["in_use"] == 0, 30, what="every slot to come back")
    set_bound(cl, BOUND)


class Call:
    """A statement on its own connection and thread; the backend pid is known before it runs."""

    def __init__(self, cl, sql, setup=(), db=DB):
        self.conn = cl.connect(db)
        for s in setup:
            self.conn.execute(s)
        self.pid = self.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        self.state = self.message = self.took = None
        self.t0 = time.monotonic()

        def run():
            try:
                self.conn.execute(sql)
                self.state = "ok"
            except psycopg.Error as e:
                self.state, self.message = e.sqlstate or "08006", str(e)
            self.took = time.monotonic() - self.t0

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the statement did not end"
        return self.state

    def close(self):
        # Never close a connection under a thread still inside a statement on it: libpq's
        # PQfinish would free it and close its socket while that thread waits on it, the socket's
        # number would be reused by the next connection this process opens, and the waiting
        # thread would read that connection's bytes (CI once saw the next connection's startup
        # messages torn: "message contents do not agree with length in message type S"). The
        # statement is cancelled and the thread joined first.
        if self.thread.is_alive():
            try:
                self.conn.cancel_safe(timeout=5)
            except psycopg.Error:
                pass
            self.thread.join(15)
            assert not self.thread.is_alive(), "the statement did not end after its cancel"
        self.conn.close()


def hold(cl, kms_timeout, in_use=1):
    """A backend that takes a slot with a call to the hanging server; returns once `in_use`
    slots are taken and it is inside its call."""
    c = Call(cl, "SELECT envelope.verify_provider('hang')", [f"SET envelope.kms_timeout = '{kms_timeout}'"])
    kit.wait_until(lambda: cl.slots(DB)["in_use"] >= in_use and pid_waits_on_kms(cl, c.pid), 10,
                   what="the holder to take a slot")
    return c


def pid_waits_on_kms(cl, pid):
    """The backend is inside its provider call (not waiting for a slot: that is wait event Extension)."""
    with cl.connect(DB) as c:
        row = c.execute("SELECT state, wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row is not None and row[0] == "active" and row[1] != "Extension"


def waits_for_slot(cl, pid):
    with cl.connect(DB) as c:
        row = c.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row is not None and row[0] == "Extension"


def cold_decrypt(cl, kms_timeout):
    return Call(cl, kit.DECRYPT, ["SET app.tenant_id = 'st'", f"SET envelope.kms_timeout = '{kms_timeout}'"])


def hang_call(cl, kms_timeout):
    """Another call to the hanging provider: the bound is per provider, so this one waits for
    the holder's slot."""
    return Call(cl, "SELECT envelope.verify_provider('hang')", [f"SET envelope.kms_timeout = '{kms_timeout}'"])


def test_a_hung_provider_holds_only_its_own_slots(env, hang):
    """The bound is per provider: with the hanging provider's only slot taken, a cold tenant on
    OpenBao is served at once (a customer's hung KMS does not stall other tenants)."""
    cl, _ = env
    set_bound(cl, 1)
    holder = hold(cl, "5s")
    try:
        other = cold_decrypt(cl, "5s")
        assert other.join(10) == "ok", other.message
        assert other.took < 2.0, f"a call to another provider waited {other.took:.2f} s"
        other.close()
        waiter = hang_call(cl, "1s")
        assert waiter.join(10) == "58000" and '"hang"' in waiter.message, waiter.message
        waiter.close()
    finally:
        holder.close()


def test_a_rewrap_to_a_hung_provider_holds_no_slot_of_its_source(env, hang):
    """An insider review: rewrap_tenant ran the target's wrap inside the source provider's slot,
    so rewraps to a hung KMS used up the source's slots (the `local` provider's, every tenant's).
    The unwrap takes a source slot and gives it back; the wrap waits in the target's own."""
    cl, _ = env
    set_bound(cl, 1)
    with cl.connect(DB) as c:
        c.execute("SELECT envelope.create_tenant('st_move', provider => 'bao') WHERE NOT EXISTS "
                  "(SELECT 1 FROM envelope.tenants WHERE name = 'st_move')")
    mover = Call(cl, "SELECT envelope.rewrap_tenant('st_move', 'hang')", ["SET envelope.kms_timeout = '4s'"])
    try:
        kit.wait_until(lambda: pid_waits_on_kms(cl, mover.pid) and cl.slots(DB)["in_use"] >= 1, 10,
                       what="the rewrap to be inside its call to the hung provider")
        time.sleep(0.3)
        other = cold_decrypt(cl, "4s")   # a cold tenant of the source provider (bound 1)
        assert other.join(10) == "ok", other.message
        assert other.took < 2.0, f"the source provider's only slot was held: waited {other.took:.2f} s"
        other.close()
        assert mover.join(15) == "58000", mover.message
    finally:
        mover.close()
    with cl.connect(DB) as c:
        assert c.execute("SELECT provider FROM envelope.tenants WHERE name = 'st_move'").fetchone()[0] == "bao"


def test_a_waiter_times_out_with_58000_and_the_slot_comes_back(env, hang):
    cl, _ = env
    set_bound(cl, 1)
    before = cl.slots(DB)
    holder = hold(cl, "3s")
    waiter = hang_call(cl, "1s")
    try:
        assert waiter.join(10) == "58000", (waiter.state, waiter.message)
        assert kit.SLOT_MESSAGE in waiter.message and "all 1 " in waiter.message, waiter.message
        assert 0.9 <= waiter.took <= 2.5, f"failed after {waiter.took:.2f} s with kms_timeout = 1s"
        # The holder's own call ends at its kms_timeout (3 s) ...
        assert holder.join(10) == "58000" and "timed out after 3000 ms" in holder.message, holder.message
        # ... and gives its slot back.
        kit.wait_until(lambda: cl.slots(DB)["in_use"] == 0, 3, what="in_use to return to 0")
        after = cl.slots(DB)
        assert after["timed_out"] - before["timed_out"] == 1 and after["peak"] <= BOUND, (before, after)
        # The KMS is usable again at once (a new cold session).
        fresh = cold_decrypt(cl, "5s")
        assert fresh.join(10) == "ok", fresh.message
        fresh.close()
    finally:
        holder.close()
        waiter.close()


def test_a_cancelled_waiter_gets_57014_at_once_and_its_session_works_afterwards(env, hang):
    cl, _ = env
    set_bound(cl, 1)
    holder = hold(cl, "3s")
    waiter = hang_call(cl, "10s")
    try:
        kit.wait_until(lambda: waits_for_slot(cl, waiter.pid), 5, what="the second backend to wait for a slot")
        time.sleep(0.3)
        t_cancel = time.monotonic()
        with cl.connect(DB) as admin:
            assert admin.execute("SELECT pg_cancel_backend(%s)", (waiter.pid,)).fetchone()[0]
        assert waiter.join(5) == "57014", (waiter.state, waiter.message)
        assert time.monotonic() - t_cancel < 1.0, f"cancel took {time.monotonic() - t_cancel:.2f} s"
        holder.join(10)
        kit.wait_until(lambda: cl.slots(DB)["in_use"] == 0, 3, what="in_use to return to 0")
        # The cancelled session's next provider call works.
        waiter.conn.execute("SET app.tenant_id = 'st'")
        assert waiter.conn.execute(kit.DECRYPT).fetchone()[0] == kit.PLAINTEXT
    finally:
        holder.close()
        waiter.close()


def test_a_terminated_holder_frees_its_slot_at_once(env, hang):
    cl, _ = env
    set_bound(cl, 1)
    holder = hold(cl, "20s")
    try:
        t_term = time.monotonic()
        with cl.connect(DB) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (holder.pid,)).fetchone()[0]
        assert holder.join(5) in ("57P01", "08006"), (holder.state, holder.message)
        kit.wait_until(lambda: cl.slots(DB)["in_use"] == 0, 3, what="the terminated holder's slot to come back")
        assert time.monotonic() - t_term < 3.5
        fresh = cold_decrypt(cl, "5s")
        assert fresh.join(10) == "ok", fresh.message
        assert fresh.took < 2.0, f"the next call waited {fresh.took:.2f} s for the freed slot"
        fresh.close()
    finally:
        holder.close()


def test_a_reload_raising_the_bound_takes_effect(env, hang):
    cl, _ = env
    set_bound(cl, 1)
    first = hold(cl, "4s")
    set_bound(cl, 2)  # the running holder keeps its slot; the bound is now 2
    second = hold(cl, "4s", in_use=2)
    try:
        kit.wait_until(lambda: cl.slots(DB)["in_use"] == 2, 5, what="two calls in flight after the reload to 2")
        third = hang_call(cl, "1s")
        assert third.join(10) == "58000" and "all 2 " in third.message and kit.SLOT_MESSAGE in third.message, third.message
        third.close()
        first.join(10)
        second.join(10)
        kit.wait_until(lambda: cl.slots(DB)["in_use"] == 0, 3, what="in_use to return to 0")
    finally:
        first.close()
        second.close()


def test_one_provider_name_in_two_databases_is_two_providers(env, hang):
    """An insider review: buckets keyed on the name only let a hung provider called `bao` in one
    database hold the slots of the healthy `bao` of another. A provider is its database and name."""
    cl, bao = env
    set_bound(cl, 1)
    other = "stampede_other"
    with cl.connect() as c:
        c.execute(f"DROP DATABASE IF EXISTS {other} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {other}")
    with cl.connect(other) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        c.execute("SELECT envelope.add_key_provider('bao', 'vault_transit', %s)", (bao.options(url=f"http://127.0.0.1:{hang.port}"),))
    holder = Call(cl, "SELECT envelope.verify_provider('bao')", ["SET envelope.kms_timeout = '5s'"], db=other)
    try:
        kit.wait_until(lambda: cl.slots(DB)["in_use"] >= 1 and pid_waits_on_kms(cl, holder.pid), 10, what="the holder to take a slot")
        healthy = cold_decrypt(cl, "5s")
        assert healthy.join(10) == "ok", healthy.message
        assert healthy.took < 2.0, f"the healthy provider waited {healthy.took:.2f} s behind its namesake"
        healthy.close()
    finally:
        with cl.connect(DB) as c:
            c.execute("SELECT pg_terminate_backend(%s)", (holder.pid,))
        holder.join(10)
        holder.close()
        with cl.connect() as c:
            c.execute(f"DROP DATABASE IF EXISTS {other} WITH (FORCE)")


def test_a_slot_wait_timeout_never_serves_keys_past_their_ttl(env, hang):
    """An insider review: a slot wait that timed out counted as the KMS being unreachable, so a
    session whose keys had expired was served from them (outage mode), for as long as other
    callers kept the provider's slots busy, and a revocation the KMS would report was bridged.
    Now the wait fails closed (58000, "busy")."""
    cl, bao = env
    set_bound(cl, 1)
    with cl.connect(DB) as c:
        c.execute("DELETE FROM envelope.key_providers WHERE name = 'bao2' AND NOT EXISTS (SELECT 1 FROM envelope.tenants WHERE provider = 'bao2')")
        if not c.execute("SELECT 1 FROM envelope.key_providers WHERE name = 'bao2'").fetchone():
            c.execute("SELECT envelope.add_key_provider('bao2', 'vault_transit', %s)", (bao.options(),))
        if not c.execute("SELECT 1 FROM envelope.tenants WHERE name = 'st2'").fetchone():
            c.execute("SELECT envelope.create_tenant('st2', provider => 'bao2')")
            c.execute("SELECT envelope.grant_tenant('st2', current_user)")
            with c.transaction():
                c.execute("SELECT set_config('app.tenant_id', 'st2', true)")
                c.execute("INSERT INTO st_values VALUES ('st2', %s::text)", (kit.PLAINTEXT,))
        c.execute("UPDATE envelope.key_providers SET options = %s WHERE name = 'bao2'", (bao.options(),))
    victim = cl.connect(DB)
    holder = None
    try:
        for s_ in ("SET app.tenant_id = 'st2'", "SET envelope.key_cache_ttl = '1s'", "SET envelope.kms_timeout = '1s'"):
            victim.execute(s_)
        assert victim.execute(kit.DECRYPT).fetchone()[0] == kit.PLAINTEXT  # keys cached
        with cl.connect(DB) as c:
            c.execute("UPDATE envelope.key_providers SET options = %s WHERE name = 'bao2'", (bao.options(url=f"http://127.0.0.1:{hang.port}"),))
        holder = Call(cl, "SELECT envelope.verify_provider('bao2')", ["SET envelope.kms_timeout = '10s'"])
        kit.wait_until(lambda: cl.slots(DB)["in_use"] >= 1 and pid_waits_on_kms(cl, holder.pid), 10, what="the holder to take bao2's slot")
        time.sleep(1.5)  # the victim's keys are past their TTL
        notices = []
        victim.add_notice_handler(lambda d: notices.append(d.message_primary))
        with pytest.raises(psycopg.errors.SystemError, match="busy"):
            victim.execute(kit.DECRYPT)
        assert not any("served from keys cached" in n for n in notices), notices
    finally:
        if holder:
            with cl.connect(DB) as c:
                c.execute("SELECT pg_terminate_backend(%s)", (holder.pid,))
            holder.join(10)
            holder.close()
        victim.close()
        with cl.connect(DB) as c:
            c.execute("UPDATE envelope.key_providers SET options = %s WHERE name = 'bao2'", (bao.options(),))
