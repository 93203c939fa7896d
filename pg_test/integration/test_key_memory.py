"""Key material in a backend's memory: what stays there, and what a core dump would carry away.

Each test drives one backend through a scenario over a psycopg connection that stays open, then,
while that backend idles, searches its address space (/proc/PID/mem) and a `gcore` dump of it
for every key of the tenant involved (keyscan.py does the work; its docstring lists the forms):

* the `local` root key (file named by `envelope.local_root_key_file`), the tenant key and each
  data key (DEK), unwrapped here from envelope.tenants / envelope.data_keys exactly as
  crates/core/src/wrap.rs does;
* each DEK's XAES-256-GCM subkey K1 and the per-nonce-prefix keys derived from it, for the nonce
  prefixes of the envelopes the backend wrote and read;
* for every key: its raw bytes and its expanded AES-256 schedule (two windows of two adjacent
  round keys, each of which inverts to the key, plus the VAES broadcast forms).

What the scenarios require:

* create_tenant: afterwards no trace of the root key, the new tenant key or DEK v1 anywhere in
  the backend, nor in a dump;
* a backend that encrypted and decrypted: the root key and tenant key are gone (wiped after
  unwrapping, also from the key-provider helper thread's stack, which glibc keeps mapped after
  the thread exits); no stand-alone copy of the raw DEK; the keys it must keep (DEK and derived
  schedules, K1) live only in memory marked MADV_DONTDUMP (`dd` in /proc/PID/smaps); a gcore
  dump (gdb honours MADV_DONTDUMP like the kernel's crash dumps) holds none of them;
* after revoke_tenant and the next (refused, 42501) use, the backend holds no key at all.

Controls: a canary planted in each backend (a session setting) must be found in memory and in
the dump, and the cached keys must be found before they are expected to be gone, so an empty
result means "not there", not "the scanner cannot see it".

Needs root (ptrace access to another user's process) and gdb's `gcore`; skipped otherwise.
Runs in the database `envelope_keymem` (recreated once per session), each scenario with its own
tenant under a unique name.
"""

import os
import shutil
import subprocess
import threading
import time
import uuid

import psycopg
import pytest

from conftest import APP_ROLE, PORT_A, as_tenant, connect, recreate_db

try:
    import keyscan
except ImportError as e:  # the `cryptography` package
    raise ImportError(f"test_key_memory.py needs the `cryptography` package in the test venv: {e}") from e

DB = "envelope_keymem"
HELPER_THREAD = "pg_envelope-kms"  # std::thread name given in src/backend.rs `interruptible`


# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root_key_file():
    if os.geteuid() != 0:
        pytest.skip("needs root: reading a postgres backend's /proc/PID/mem and gcore (ptrace) need it")
    if shutil.which("gcore") is None:
        pytest.skip("gcore is not installed (Debian package gdb)")
    # A fresh database each session: the extension's SQL matches the build under test.
    recreate_db(PORT_A, DB)
    with connect(PORT_A) as c:
        c.execute(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') "
            f"THEN CREATE ROLE {APP_ROLE} LOGIN; END IF; END $$"
        )
    with connect(PORT_A, DB) as c:
        c.execute("CREATE EXTENSION pg_envelope")
        path = c.execute("SHOW envelope.local_root_key_file").fetchone()[0]
        pid = backend_pid(c)
        try:
            ours = open(f"/proc/{pid}/cmdline", "rb").read().startswith(b"postgres")
        except OSError:
            ours = False
        if not ours:
            pytest.skip(f"backend {pid} is not a postgres process of this machine (server on another host or in another PID namespace)")
    assert path, "envelope.local_root_key_file is not set on the project cluster"
    return path


def unique_tenant():
    return f"keymem-{uuid.uuid4().hex[:12]}"


def backend_pid(conn):
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def new_tenant(admin, grant_to=APP_ROLE):
    tenant = unique_tenant()
    admin.execute("SELECT envelope.create_tenant(%s)", (tenant,))
    admin.execute("SELECT envelope.grant_tenant(%s, %s)", (tenant, grant_to))
    return tenant


def encrypt_in_another_backend(tenant, plaintext):
    """An envelope written by a different backend: another random nonce prefix, so the scanned
    backend has to derive (and cache) a second XAES key to decrypt it."""
    with connect(PORT_A, DB, user=APP_ROLE) as other:
        with as_tenant(other, tenant):
            return bytes(other.execute("SELECT envelope.encrypt_field(%s)", (plaintext,)).fetchone()[0])


def encrypt_then_decrypt(conn, tenant, foreign_envelope, foreign_plaintext):
    """In the scanned backend: encrypt a value, decrypt it and the other backend's value."""
    secret = f"secret-{uuid.uuid4().hex}"
    with as_tenant(conn, tenant):
        env = bytes(conn.execute("SELECT envelope.encrypt_field(%s)", (secret,)).fetchone()[0])
        assert conn.execute("SELECT envelope.decrypt_field(%s::bytea)", (env,)).fetchone()[0] == secret
        got = conn.execute("SELECT envelope.decrypt_field(%s::bytea)", (foreign_envelope,)).fetchone()[0]
        assert got == foreign_plaintext
    return env


def plant_canary(conn):
    """Positive control: a random string the backend keeps (a session setting, in its heap)."""
    value = f"keyscan-canary-{uuid.uuid4().hex}"
    conn.execute("SELECT set_config('keymem.canary', %s, false)", (value,))
    return keyscan.control_pattern(value.encode(), "control canary (session setting)")


def wait_for_helper_exit(pid, timeout=5.0):
    """The key-provider helper thread ends on its own after handing over its result; give it a
    moment. Returns the backend's threads as (tid, comm, stack pointer)."""
    deadline = time.monotonic() + timeout
    while True:
        threads = keyscan.read_threads(pid)
        if not any(comm == HELPER_THREAD for _, comm, _ in threads) or time.monotonic() > deadline:
            return threads
        time.sleep(0.05)


def is_control(h):
    return h.key == "control"


def is_root_or_tenant_key(h):
    return h.key in ("root", "tenant key")


def is_dek_material(h):
    """A DEK, its K1, or a key derived from it, in any form."""
    return h.key.startswith("dek v")


def is_standalone_raw_dek(h):
    # A DEK's raw bytes outside an expanded schedule (form "raw"; the first 32 bytes of a live
    # schedule are reported as form schedule[0:32]).
    return h.key.startswith("dek v") and " derived " not in h.key and h.form == "raw"


def is_stack(h):
    return h.region.startswith(("stack", "thread-stack"))


def report(title, hits, stats):
    text = keyscan.format_hits(hits, title, stats)
    print(text)
    return text


def threads_text(threads):
    return ", ".join(f"{tid} {comm!r}" for tid, comm, _ in threads)


# -- scenarios ------------------------------------------------------------------------------------


def test_create_tenant_leaves_no_key_in_memory(root_key_file):
    tenant = unique_tenant()
    with connect(PORT_A, DB) as be, connect(PORT_A, DB) as admin:
        pid = backend_pid(be)
        tenant_key_id = be.execute("SELECT envelope.create_tenant(%s)", (tenant,)).fetchone()[0]
        canary = plant_canary(be)
        threads = wait_for_helper_exit(pid)

        keys = keyscan.KeyMaterial.from_catalog(admin, root_key_file, tenant)
        assert keys.tenant_key_id == tenant_key_id and list(keys.deks) == [1]
        patterns = keys.patterns() + [canary]
        print(f"\nbackend {pid} ran create_tenant({tenant!r}); threads now: {threads_text(threads)}")
        print(keys.describe())
        mem_stats, core_stats = {}, {}
        mem = keyscan.scan_proc_mem(pid, patterns, mem_stats)
        mem_text = report(f"/proc/{pid}/mem after create_tenant", mem, mem_stats)
        core = keyscan.scan_core(pid, patterns, core_stats)
        core_text = report(f"gcore {pid} after create_tenant", core, core_stats)

    problems = []
    if not any(is_control(h) for h in mem):
        problems.append("control: the canary was not found in /proc/PID/mem: the scan is broken")
    if not any(is_control(h) for h in core):
        problems.append("control: the canary was not found in the gcore dump: the dump or its scan is broken")
    if any(comm == HELPER_THREAD for _, comm, _ in threads):
        problems.append(f"the key-provider helper thread is still running: {threads_text(threads)}")
    leaked = [h for h in mem if not is_control(h)]
    if leaked:
        problems.append("key material left in the backend after create_tenant (root key, tenant key or DEK v1):\n"
                        + keyscan.format_hits(leaked, "leaked in memory"))
    leaked = [h for h in core if not is_control(h)]
    if leaked:
        problems.append("key material in a gcore dump after create_tenant:\n" + keyscan.format_hits(leaked, "leaked in the dump"))
    assert not problems, "\n\n".join(problems) + "\n\n" + mem_text + "\n\n" + core_text


def test_decrypting_backend_dumps_no_key(root_key_file):
    with connect(PORT_A, DB) as admin:
        tenant = new_tenant(admin)
    foreign_plaintext = f"written-elsewhere-{uuid.uuid4().hex}"
    foreign = encrypt_in_another_backend(tenant, foreign_plaintext)

    with connect(PORT_A, DB, user=APP_ROLE) as be, connect(PORT_A, DB) as admin:
        pid = backend_pid(be)
        own = encrypt_then_decrypt(be, tenant, foreign, foreign_plaintext)
        canary = plant_canary(be)
        threads = wait_for_helper_exit(pid)

        keys = keyscan.KeyMaterial.from_catalog(admin, root_key_file, tenant)
        own_prefix, foreign_prefix = keyscan.envelope_prefix(own), keyscan.envelope_prefix(foreign)
        active = keyscan.envelope_dek_version(own)
        patterns = keys.patterns([own_prefix, foreign_prefix]) + [canary]
        print(f"\nbackend {pid} ({APP_ROLE}) encrypted and decrypted for {tenant!r}; own prefix {own_prefix.hex()}, "
              f"other backend's prefix {foreign_prefix.hex()}; threads now: {threads_text(threads)}")
        print(keys.describe())
        mem_stats, core_stats = {}, {}
        mem = keyscan.scan_proc_mem(pid, patterns, mem_stats)
        mem_text = report(f"/proc/{pid}/mem of a decrypting backend", mem, mem_stats)
        core = keyscan.scan_core(pid, patterns, core_stats)
        core_text = report(f"gcore {pid} of a decrypting backend", core, core_stats)

    problems = []
    # Controls: the scan sees this backend, and it sees the keys the backend must still hold
    # (otherwise "only in dd memory" below would hold vacuously).
    if not any(is_control(h) for h in mem):
        problems.append("control: the canary was not found in /proc/PID/mem: the scan is broken")
    if not any(is_control(h) for h in core):
        problems.append("control: the canary was not found in the gcore dump: the dump or its scan is broken")
    cached = {h.key for h in mem if is_dek_material(h) and h.form != "raw"}
    expected = {f"dek v{active}", f"dek v{active} derived {own_prefix.hex()}"}
    if not expected <= cached:
        problems.append(
            f"control: the cached keys {sorted(expected - cached)} were not found at all in /proc/PID/mem although "
            "the backend holds them: the patterns do not match this build's key representation (AES-NI round "
            "keys expected), or the keys live where /proc/PID/mem cannot read (memfd_secret?); the dd-only check "
            "below would be vacuous"
        )

    if any(comm == HELPER_THREAD for _, comm, _ in threads):
        problems.append(f"the key-provider helper thread has not exited: {threads_text(threads)}")
    on_stacks = [h for h in mem if h.key == "root" and is_stack(h)]
    if on_stacks:
        problems.append("the root key is on a thread stack (the helper thread's stack stays mapped in glibc's "
                        "stack cache after the thread exits):\n" + keyscan.format_hits(on_stacks, "root key on stacks"))
    root_tenant = [h for h in mem if is_root_or_tenant_key(h)]
    if root_tenant:
        problems.append("the root key or the tenant key survived the unwrap (raw or as a schedule):\n"
                        + keyscan.format_hits(root_tenant, "root / tenant key in memory"))
    raw_dek = [h for h in mem if is_standalone_raw_dek(h)]
    if raw_dek:
        problems.append("stand-alone copies of the raw DEK (outside any key schedule):\n"
                        + keyscan.format_hits(raw_dek, "raw DEK in memory"))
    dumpable = [h for h in mem if is_dek_material(h) and not is_standalone_raw_dek(h) and not h.dd]
    if dumpable:
        problems.append("DEK / derived-key schedules or K1 in memory NOT marked MADV_DONTDUMP:\n"
                        + keyscan.format_hits(dumpable, "dumpable key material"))
    in_core = [h for h in core if not is_control(h)]
    if in_core:
        problems.append("key material in the gcore dump:\n" + keyscan.format_hits(in_core, "key material in the dump"))
    assert not problems, "\n\n".join(problems) + "\n\n" + mem_text + "\n\n" + core_text


def test_revoked_backend_holds_no_key(root_key_file):
    with connect(PORT_A, DB) as admin:
        tenant = new_tenant(admin)
    foreign_plaintext = f"written-elsewhere-{uuid.uuid4().hex}"
    foreign = encrypt_in_another_backend(tenant, foreign_plaintext)

    with connect(PORT_A, DB, user=APP_ROLE) as be, connect(PORT_A, DB) as admin:
        pid = backend_pid(be)
        own = encrypt_then_decrypt(be, tenant, foreign, foreign_plaintext)
        wait_for_helper_exit(pid)
        keys = keyscan.KeyMaterial.from_catalog(admin, root_key_file, tenant)
        own_prefix, foreign_prefix = keyscan.envelope_prefix(own), keyscan.envelope_prefix(foreign)
        active = keyscan.envelope_dek_version(own)
        patterns = keys.patterns([own_prefix, foreign_prefix])
        print(f"\nbackend {pid} ({APP_ROLE}) encrypted and decrypted for {tenant!r}")
        print(keys.describe())
        before_stats = {}
        before = keyscan.scan_proc_mem(pid, patterns, before_stats)
        before_text = report(f"/proc/{pid}/mem before revocation", before, before_stats)

        # Revoke from another session (autocommit: committed at once), then use the key again.
        assert admin.execute("SELECT envelope.revoke_tenant(%s, %s)", (tenant, APP_ROLE)).fetchone()[0] is True
        with pytest.raises(psycopg.Error) as err:
            with as_tenant(be, tenant):
                be.execute("SELECT envelope.decrypt_field(%s::bytea)", (own,))
        assert err.value.sqlstate == "42501", f"expected 42501 after revocation, got {err.value.sqlstate}: {err.value}"

        canary = plant_canary(be)
        after_stats = {}
        after = keyscan.scan_proc_mem(pid, patterns + [canary], after_stats)
        after_text = report(f"/proc/{pid}/mem after revocation and a refused decrypt", after, after_stats)

    problems = []
    if not any(h.key == f"dek v{active}" and h.form != "raw" for h in before):
        problems.append("control: the cached DEK was not found before revocation, so its absence afterwards "
                        "proves nothing (patterns do not match this build's key representation?)")
    if not any(is_control(h) for h in after):
        problems.append("control: the canary was not found after revocation: the scan is broken")
    left = [h for h in after if not is_control(h)]
    if left:
        problems.append("key material left in the backend after revocation (DEK, derived key, K1, tenant key or root "
                        "key; dd or not):\n" + keyscan.format_hits(left, "left after revocation"))
    assert not problems, "\n\n".join(problems) + "\n\n" + before_text + "\n\n" + after_text


@pytest.mark.parametrize("idle_in_transaction", [False, True], ids=["idle", "idle-in-repeatable-read-transaction"])
def test_idle_backend_drops_keys_at_a_suspension_without_another_call(root_key_file, idle_in_transaction):
    """suspend_tenant (like revoke_tenant, disable_data_key and a shred) wakes idle backends at
    its commit: a backend that decrypted and then sits idle, waiting for its client (a pooled
    connection), holds no key of the tenant a moment later, without making another call; also
    when it idles inside an open REPEATABLE READ transaction (it processes the invalidation
    message sent with the wake-up)."""
    with connect(PORT_A, DB) as admin:
        tenant = new_tenant(admin)
    foreign_plaintext = f"written-elsewhere-{uuid.uuid4().hex}"
    foreign = encrypt_in_another_backend(tenant, foreign_plaintext)

    with connect(PORT_A, DB, user=APP_ROLE) as be, connect(PORT_A, DB) as admin:
        pid = backend_pid(be)
        own = encrypt_then_decrypt(be, tenant, foreign, foreign_plaintext)
        canary = plant_canary(be)
        if idle_in_transaction:
            be.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            be.execute("SELECT set_config('app.tenant_id', %s, true)", (tenant,))
            assert be.execute("SELECT envelope.decrypt_field(%s::bytea)", (foreign,)).fetchone()[0] == foreign_plaintext
        # The backend's last call: from here on it only idles.
        wait_for_helper_exit(pid)
        keys = keyscan.KeyMaterial.from_catalog(admin, root_key_file, tenant)
        active = keyscan.envelope_dek_version(own)
        patterns = keys.patterns([keyscan.envelope_prefix(own), keyscan.envelope_prefix(foreign)])
        before_stats = {}
        before = keyscan.scan_proc_mem(pid, patterns + [canary], before_stats)
        before_text = report(f"/proc/{pid}/mem before the suspension", before, before_stats)

        started = time.monotonic()
        assert admin.execute("SELECT envelope.suspend_tenant(%s, 'idle wipe test')", (tenant,)).fetchone()[0] is True
        # Poll the idle backend's memory (no call to it) until no key is left, for up to 5 s.
        scans = []
        while True:
            scan_started = time.monotonic() - started
            after_stats = {}
            after = keyscan.scan_proc_mem(pid, patterns + [canary], after_stats)
            left = [h for h in after if not is_control(h)]
            elapsed = time.monotonic() - started
            scans.append((round(scan_started, 3), len(left)))
            if not left or elapsed > 5:
                break
            time.sleep(0.05)
        after_text = report(f"/proc/{pid}/mem {elapsed:.3f} s after the suspension committed (no call made)", after, after_stats)
        # Each scan reads the whole address space (~0.5 s): the first clean scan bounds the time.
        print(f"idle backend {pid}: scans (started at s, key hits): {scans}")
        if idle_in_transaction:
            be.execute("ROLLBACK")
        # The backend is still fine: its next call is refused with the suspension, not an error.
        with pytest.raises(psycopg.Error) as err:
            with as_tenant(be, tenant):
                be.execute("SELECT envelope.decrypt_field(%s::bytea)", (own,))
        assert err.value.sqlstate == "57000"

    problems = []
    if not any(h.key == f"dek v{active}" and h.form != "raw" for h in before):
        problems.append("control: the cached DEK was not found before the suspension, so its absence afterwards proves nothing")
    if not any(is_control(h) for h in after):
        problems.append("control: the canary was not found after the suspension: the scan is broken")
    if left:
        problems.append("key material left in the idle backend 5 s after the suspension:\n" + keyscan.format_hits(left, "left"))
    assert not problems, "\n\n".join(problems) + "\n\n" + before_text + "\n\n" + after_text


def test_a_decryption_deep_in_the_stack_leaves_no_key_there(root_key_file):
    """Insider review 66: the transaction's end wiped a fixed 128 KiB of stack below its callback,
    but a statement can use keys far deeper (a recursive PL/pgSQL function: 150 calls put the
    decryption ~600 KB down), where the schedule of a key derived for a new nonce prefix stayed,
    in memory a core dump keeps. The wipe now reaches the deepest key use of the transaction."""
    with connect(PORT_A, DB) as admin:
        tenant = new_tenant(admin)
        admin.execute("""CREATE OR REPLACE FUNCTION public.keymem_deep(n int, b bytea) RETURNS text LANGUAGE plpgsql AS $$
                         BEGIN IF n <= 0 THEN RETURN envelope.decrypt_field(b); END IF;
                         RETURN public.keymem_deep(n - 1, b); END $$""")
    foreign_plaintext = f"written-elsewhere-{uuid.uuid4().hex}"
    foreign = encrypt_in_another_backend(tenant, foreign_plaintext)
    try:
        with connect(PORT_A, DB, user=APP_ROLE) as be, connect(PORT_A, DB) as admin:
            pid = backend_pid(be)
            with as_tenant(be, tenant):
                # The other backend's prefix is new here: its key is derived 150 calls down.
                got = be.execute("SELECT public.keymem_deep(150, %s::bytea)", (foreign,)).fetchone()[0]
            assert got == foreign_plaintext
            be.execute("SELECT 1")
            canary = plant_canary(be)
            wait_for_helper_exit(pid)
            keys = keyscan.KeyMaterial.from_catalog(admin, root_key_file, tenant)
            prefix = keyscan.envelope_prefix(foreign)
            patterns = keys.patterns([prefix]) + [canary]
            stats = {}
            mem = keyscan.scan_proc_mem(pid, patterns, stats)
            text = report(f"/proc/{pid}/mem after a decryption 150 PL/pgSQL calls deep", mem, stats)
    finally:
        with connect(PORT_A, DB) as admin:
            admin.execute("DROP FUNCTION IF EXISTS public.keymem_deep(int, bytea)")
    assert_no_key_on_the_stack(mem, foreign, prefix, text, "after the transaction ended")


def assert_no_key_on_the_stack(mem, foreign, prefix, text, when):
    """A live backend's scan (`mem`) holds no key material on its stack, with two controls: the
    planted canary was found (the scan works) and the derived key of `foreign`'s nonce prefix
    was found in the key pool (the backend did use it)."""
    problems = []
    if not any(is_control(h) for h in mem):
        problems.append("control: the canary was not found: the scan is broken")
    derived = f"dek v{keyscan.envelope_dek_version(foreign)} derived {prefix.hex()}"
    if not any(h.key == derived and h.dd for h in mem):
        problems.append(f"control: the derived key {derived!r} the backend keeps was not found in its key pool")
    on_stack = [h for h in mem if is_dek_material(h) and is_stack(h)]
    if on_stack:
        problems.append(f"key material left on the stack {when}:\n" + keyscan.format_hits(on_stack, "on the stack"))
    assert not problems, "\n\n".join(problems) + "\n\n" + text


class StoppedAtExit:
    """gdb attached to a backend, stopped when it reaches `_exit` (after PostgreSQL's exit
    callbacks and libc's exit handlers ran) until `release()`."""

    def __init__(self, pid, tmp_path):
        if not shutil.which("gdb"):
            pytest.skip("gdb is not installed")
        self.at_exit, self.go = tmp_path / f"at-exit-{pid}", tmp_path / f"go-{pid}"
        self.gdb = subprocess.Popen(
            ["gdb", "-nx", "-batch", "-p", str(pid), "-ex", "set pagination off",
             "-ex", "handle all nostop noprint pass", "-ex", "break _exit", "-ex", "echo ARMED\\n", "-ex", "continue",
             "-ex", f"shell touch {self.at_exit}; while [ ! -e {self.go} ]; do sleep 0.05; done", "-ex", "detach"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        for line in self.gdb.stdout:
            if "ARMED" in line or time.monotonic() > deadline:
                break
        time.sleep(0.5)  # gdb's `continue` after the echo

    def wait(self, timeout=30):
        deadline = time.monotonic() + timeout
        while not self.at_exit.exists():
            assert self.gdb.poll() is None and time.monotonic() < deadline, "the backend never reached _exit under gdb"
            time.sleep(0.05)

    def release(self):
        self.go.touch()
        try:
            self.gdb.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.gdb.kill()


def keys_left_at_exit(root_key_file, tmp_path, end):
    """A backend that encrypted and decrypted for a new tenant is scanned live, then `end(be, pid,
    admin)` makes it exit (it may close `be`) while gdb holds it at `_exit`, and it is scanned
    again there. Asserts the control (the cached DEK seen in the live backend) and that no key
    material of the tenant is left at `_exit`."""
    with connect(PORT_A, DB) as admin:
        tenant = new_tenant(admin)
    foreign_plaintext = f"written-elsewhere-{uuid.uuid4().hex}"
    foreign = encrypt_in_another_backend(tenant, foreign_plaintext)
    with connect(PORT_A, DB) as admin:
        be = connect(PORT_A, DB, user=APP_ROLE)
        stopped = None
        try:
            pid = backend_pid(be)
            own = encrypt_then_decrypt(be, tenant, foreign, foreign_plaintext)
            wait_for_helper_exit(pid)
            keys = keyscan.KeyMaterial.from_catalog(admin, root_key_file, tenant)
            patterns = keys.patterns([keyscan.envelope_prefix(own), keyscan.envelope_prefix(foreign)])
            active = keyscan.envelope_dek_version(own)
            before_stats = {}
            before = keyscan.scan_proc_mem(pid, patterns, before_stats)
            before_text = report(f"/proc/{pid}/mem of the live backend", before, before_stats)
            stopped = StoppedAtExit(pid, tmp_path)
            end(be, pid, admin)
            stopped.wait()
            after_stats = {}
            after = keyscan.scan_proc_mem(pid, patterns, after_stats)
            after_text = report(f"/proc/{pid}/mem of the backend stopped at _exit", after, after_stats)
        finally:
            if stopped is not None:
                stopped.release()
            try:
                be.close()
            except psycopg.Error:
                pass
    problems = []
    if not any(h.key == f"dek v{active}" and h.form != "raw" for h in before):
        problems.append("control: the cached DEK was not found in the live backend: its absence at exit proves nothing")
    left = [h for h in after if is_dek_material(h)]
    if left:
        problems.append("key material left in the exiting backend:\n" + keyscan.format_hits(left, "left at _exit"))
    assert not problems, "\n\n".join(problems) + "\n\n" + before_text + "\n\n" + after_text


def test_an_exiting_backend_wipes_its_keys(root_key_file, tmp_path):
    """Insider review 66: a backend's cached keys (data keys, K1, derived keys, in the locked key
    pool) must be wiped when it exits, not left for the kernel to free. The backend is stopped by
    gdb at `_exit` and its memory read there."""
    keys_left_at_exit(root_key_file, tmp_path, lambda be, pid, admin: be.close())


def test_a_backend_terminated_while_it_waits_inside_its_key_state_wipes_its_keys(root_key_file, tmp_path):
    """Insider review 67: a FATAL exit (pg_terminate_backend, which a role may do to its own
    backends) from inside `with_backend`, here while a new tenant's directory read waits for a
    lock, found the key state borrowed: the exit wipe skipped the cache, and another tenant's
    cached keys stayed in the pool. The exit now zeroes the whole pool."""
    with connect(PORT_A, DB) as admin:
        waiting_for = new_tenant(admin)
    other_value = encrypt_in_another_backend(waiting_for, "other tenant's value")

    def terminate_while_waiting(be, pid, admin):
        with connect(PORT_A, DB) as locker:
            # The other tenant is not cached: its first use reads the catalog, which waits.
            locker.execute("BEGIN")
            locker.execute("LOCK TABLE envelope.tenants IN ACCESS EXCLUSIVE MODE")
            try:
                be.execute("SELECT set_config('app.tenant_id', %s, false)", (waiting_for,))

                def use():
                    try:
                        be.execute("SELECT envelope.decrypt_field(%s::bytea)", (other_value,))
                    except psycopg.Error:
                        pass
                threading.Thread(target=use, daemon=True).start()
                deadline = time.monotonic() + 20
                while not admin.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]:
                    assert time.monotonic() < deadline, "the backend never waited for the lock"
                    time.sleep(0.05)
                assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0] is True
                # The lock is held until the backend has left (it is then at `_exit`): its FATAL
                # comes while it waits, inside its key state.
                while admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]:
                    assert time.monotonic() < deadline + 20, "the terminated backend never left"
                    time.sleep(0.05)
            finally:
                locker.execute("ROLLBACK")

    keys_left_at_exit(root_key_file, tmp_path, terminate_while_waiting)


def test_every_session_registers_the_exit_wipe_before_its_first_key(tmp_path):
    """Insider review 68: the exit wipe (the whole key pool zeroed) was registered only when a
    process made its key state, and a fresh session's `create_tenant` fills the pool (the root
    key, on the provider thread) without that: a FATAL exit during the provider call left the
    root key in the pool. The wipe is now registered before a process's first statement runs.
    A session that ran one statement without any key is stopped by gdb when it exits: the wipe
    must be called."""
    if not shutil.which("gdb") or not shutil.which("nm"):
        pytest.skip("gdb and nm (binutils) are needed")
    libdir = subprocess.run(["pg_config", "--pkglibdir"], capture_output=True, text=True).stdout.strip() or "/usr/lib/postgresql/15/lib"
    so = os.path.join(libdir, "pg_envelope.so")
    symbols = subprocess.run(["nm", so], capture_output=True, text=True).stdout.split("\n")
    wipe = [l.split()[-1] for l in symbols if "11pg_envelope7backend12on_proc_exit" in l]
    assert len(wipe) == 1, f"backend::on_proc_exit not found in {so}'s symbols"
    # A new session, with one statement and no key.
    c = connect(PORT_A, DB, user=APP_ROLE)
    pid = backend_pid(c)
    gdb = subprocess.Popen(
        ["gdb", "-nx", "-batch", "-p", str(pid), "-ex", "set pagination off", "-ex", "handle all nostop noprint pass",
         "-ex", f"break {wipe[0]}", "-ex", "echo ARMED\\n", "-ex", "continue", "-ex", "echo WIPE-CALLED\\n", "-ex", "continue"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.monotonic() + 30
    for line in gdb.stdout:
        seen.append(line)
        if "ARMED" in line or time.monotonic() > deadline:
            break
    time.sleep(0.5)
    c.close()
    try:
        out = "".join(seen) + gdb.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        gdb.kill()
        out = "".join(seen) + gdb.communicate()[0]
    assert "Breakpoint 1 at" in out, out
    assert "WIPE-CALLED" in out and "Breakpoint 1," in out, "the exit wipe did not run in a session that made no key state:\n" + out


def test_a_commit_inside_nested_calls_leaves_no_key_on_the_stack(root_key_file):
    """Insider review 67: a COMMIT inside a procedure runs the transaction's end callback from
    `SPI_commit`, here five nested CALLs deeper than the decryption before it: the stack wipe
    started at the callback's frame, below the key use's leftovers, and nothing wiped them later
    (the next transactions used no key). Inside a procedure the wipe now also waits for the end
    of the top-level statement's transaction."""
    with connect(PORT_A, DB) as admin:
        tenant = new_tenant(admin)
        admin.execute("""CREATE OR REPLACE PROCEDURE public.keymem_commit_deep(n int) LANGUAGE plpgsql AS $$
                         BEGIN IF n <= 0 THEN COMMIT; RETURN; END IF; CALL public.keymem_commit_deep(n - 1); END $$""")
        admin.execute("""CREATE OR REPLACE FUNCTION public.keymem_dec(b bytea) RETURNS int LANGUAGE plpgsql AS $$
                         BEGIN RETURN length(envelope.decrypt_field(b)); END $$""")
        admin.execute("""CREATE OR REPLACE PROCEDURE public.keymem_use_then_commit(b bytea, d int) LANGUAGE plpgsql AS $$
                         BEGIN PERFORM public.keymem_dec(b); CALL public.keymem_commit_deep(d); END $$""")
    foreign_plaintext = f"written-elsewhere-{uuid.uuid4().hex}"
    foreign = encrypt_in_another_backend(tenant, foreign_plaintext)
    warm = encrypt_in_another_backend(tenant, "warm-up")
    try:
        with connect(PORT_A, DB, user=APP_ROLE) as be, connect(PORT_A, DB) as admin:
            pid = backend_pid(be)
            # Autocommit and the simple protocol (no parameters): a procedure may COMMIT only so.
            be.execute(f"SELECT set_config('app.tenant_id', '{tenant}', false)")
            be.execute(f"CALL public.keymem_use_then_commit('\\x{warm.hex()}'::bytea, 5)")
            # The other backend's prefix is new here: its key is derived, then five CALLs down the COMMIT.
            be.execute(f"CALL public.keymem_use_then_commit('\\x{foreign.hex()}'::bytea, 5)")
            be.execute("RESET app.tenant_id")
            be.execute("SELECT 1")
            canary = plant_canary(be)
            wait_for_helper_exit(pid)
            keys = keyscan.KeyMaterial.from_catalog(admin, root_key_file, tenant)
            prefix = keyscan.envelope_prefix(foreign)
            stats = {}
            mem = keyscan.scan_proc_mem(pid, keys.patterns([prefix]) + [canary], stats)
            text = report(f"/proc/{pid}/mem after a COMMIT five CALLs below a decryption", mem, stats)
    finally:
        with connect(PORT_A, DB) as admin:
            admin.execute("DROP PROCEDURE IF EXISTS public.keymem_use_then_commit(bytea, int)")
            admin.execute("DROP PROCEDURE IF EXISTS public.keymem_commit_deep(int)")
            admin.execute("DROP FUNCTION IF EXISTS public.keymem_dec(bytea)")
    assert_no_key_on_the_stack(mem, foreign, prefix, text, "after the procedure's COMMIT")


# -- the key pool under a small RLIMIT_MEMLOCK ----------------------------------------------------


def test_key_pool_locks_pages_and_falls_back_cleanly_without_memlock():
    """The key pool mlocks its pages where RLIMIT_MEMLOCK allows; with a limit of 0 it keeps
    working unlocked (still excluded from dumps) and says so in status()."""
    import subprocess

    from conftest import ROOT, sh

    def pool_after_use(port):
        with connect(port) as c:
            c.execute("DROP DATABASE IF EXISTS envelope_memlock")
            c.execute("CREATE DATABASE envelope_memlock")
        with connect(port, "envelope_memlock") as c:
            c.execute("CREATE EXTENSION pg_envelope")
            c.execute("SELECT envelope.create_tenant('memlock_t'), envelope.grant_tenant('memlock_t', current_user)")
            with as_tenant(c, "memlock_t"):
                v = c.execute("SELECT envelope.decrypt_field(envelope.encrypt_field('still works'))").fetchone()[0]
                pool = c.execute("SELECT envelope.status()->'backend'->'key_pool'").fetchone()[0]
        return v, pool

    # The project's cluster runs under the postgres user's default limit (8 MB here): all locked.
    v, pool = pool_after_use(PORT_A)
    assert v == "still works"
    assert pool["mapped_bytes"] > 0 and pool["locked_bytes"] == pool["mapped_bytes"], pool
    # A cluster started with `ulimit -l 0`: nothing can be locked, everything still works.
    env = {"PGE_INSTANCE": "pg15-memlock", "PGE_PORT": "54318", "PGE_MEMLOCK_KB": "0"}
    sh("bash", str(ROOT / "scripts/cluster.sh"), "start", env=env)
    try:
        v, pool = pool_after_use(54318)
        assert v == "still works"
        assert pool["mapped_bytes"] > 0 and pool["locked_bytes"] == 0, pool
    finally:
        sh("bash", str(ROOT / "scripts/cluster.sh"), "stop", env=env)
