//! Backend-local state: the key cache, the nonce generator, and the shared invalidation epoch.
//!
//! A PostgreSQL backend is one single-threaded process, so the state lives in a thread-local
//! owned by the backend's main thread. It is created on first use (after the postmaster forked
//! this backend, so the nonce generator is seeded here) and wiped at backend exit.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use pg_envelope_core::provider::aws::{AwsKmsOptions, AwsKmsProvider};
use pg_envelope_core::provider::common::CommonOptions;
use pg_envelope_core::provider::pkcs11::{Pkcs11Options, Pkcs11Provider};
use pg_envelope_core::provider::vault::{VaultTransitOptions, VaultTransitProvider};
use pg_envelope_core::{
    BackendRng, CacheEntry, DataKey, Envelope, Freshness, KeyCache, KeyProvider, LocalProvider, ProviderError, TenantKeys, VersionState,
};
use pgrx::prelude::*;
use pgrx::PgAtomic;

use crate::catalog;
use crate::error::{EnvelopeError, Result};
use crate::gucs;
use crate::main_thread::MainThread;

/// Bumped (after commit) by every change to keys or grants; a backend that sees a new value
/// drops its whole cache before its next key use. Lives in shared memory.
pub static EPOCH: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_envelope_epoch") };
/// Set in `_PG_init` when loaded through shared_preload_libraries (shared memory exists).
pub static PRELOADED: AtomicBool = AtomicBool::new(false);
/// Bumped by a syscache callback whenever this backend learns that role memberships or roles
/// changed (`GRANT`/`REVOKE role`, `DROP ROLE`, ...). The per-tenant "last role that passed the
/// grant check" memo is forgotten then, so a revoked membership takes effect when PostgreSQL's
/// own privilege checks see it (at the next transaction or lock), not after the cache TTL.
static ROLES_GENERATION: AtomicU64 = AtomicU64::new(0);

/// Registered in `_PG_init` for the `AUTHMEMROLEMEM` and `AUTHOID` syscaches.
pub unsafe extern "C-unwind" fn on_roles_changed(_arg: pg_sys::Datum, _cache_id: std::ffi::c_int, _hash: u32) {
    ROLES_GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// What the end of the transaction and of the statement must wipe: [`STACK`] (this transaction
/// used or built keys) and [`REGISTERS`] (keys were used since the SIMD registers were last
/// wiped), and how deep the stack was at the deepest key use since the last stack wipe. One
/// static for all: every key use sets them (a static, not a thread-local: see `main_thread`).
struct KeysUsed {
    flags: std::cell::Cell<u8>,
    /// The lowest stack pointer a key use ran at (`usize::MAX`: none since the last wipe). A
    /// statement can use keys hundreds of kilobytes below the transaction's end (a recursive
    /// PL/pgSQL function, a deep plan): the wipe reaches that far (insider review 66: a derived
    /// key's schedule left 600 KB down the stack by a decryption 150 calls deep).
    deepest: std::cell::Cell<usize>,
}
static KEYS_USED: MainThread<KeysUsed> =
    MainThread::new(KeysUsed { flags: std::cell::Cell::new(0), deepest: std::cell::Cell::new(usize::MAX) });
const STACK: u8 = 1;
const REGISTERS: u8 = 2;

/// Marks the transaction as one whose end must wipe the stack (down to here at least), and the
/// statement as one whose end must wipe the SIMD registers.
#[inline]
pub fn note_keys_used() {
    ensure_exit_wipe();
    let sp = pg_envelope_core::secure::stack_pointer();
    KEYS_USED.with(|k| {
        k.flags.set(STACK | REGISTERS);
        if sp < k.deepest.get() {
            k.deepest.set(sp);
        }
    });
}

/// Clears `flag` and says whether it was set.
fn take_keys_used(flag: u8) -> bool {
    KEYS_USED.with(|k| {
        let v = k.flags.get();
        k.flags.set(v & !flag);
        v & flag != 0
    })
}

/// Whether `flag` is set, leaving it set.
fn keys_used_pending(flag: u8) -> bool {
    KEYS_USED.with(|k| k.flags.get() & flag != 0)
}

/// The deepest stack pointer of a key use since the last call (see [`KeysUsed::deepest`]).
fn take_deepest_key_use() -> usize {
    KEYS_USED.with(|k| k.deepest.replace(usize::MAX))
}

/// [`take_deepest_key_use`], leaving it recorded.
fn peek_deepest_key_use() -> usize {
    KEYS_USED.with(|k| k.deepest.get())
}

/// At the end of a statement that used keys (ExecutorEnd, ProcessUtility): zero the SIMD
/// registers. AES-NI and SHA code leaves round keys and MAC states in them, and a backend idle
/// in a transaction keeps them there: a signal (an invalidation catch-up, a wake-up for a
/// revocation) makes the kernel save the registers into a signal frame on the stack, where the
/// key material then stays until the transaction's end wipes the stack (found by
/// test_key_memory.py: a derived key's round keys on the stack of a backend idle in a
/// REPEATABLE READ transaction, after a suspension woke it). A few nanoseconds per statement.
pub fn after_statement() {
    if take_keys_used(REGISTERS) {
        pg_envelope_core::secure::wipe_vector_registers();
    }
}

static mut PREV_EXECUTOR_END: pg_sys::ExecutorEnd_hook_type = None;
static mut PREV_EXECUTOR_RUN: pg_sys::ExecutorRun_hook_type = None;

/// Installs the ExecutorRun and ExecutorEnd hooks (from `_PG_init`), keeping whatever hooks
/// were there before. ExecutorRun returns after every Execute message and FETCH (the extended
/// protocol keeps the portal, and so delays ExecutorEnd, until the next statement or the
/// transaction's end: a backend idle in a transaction would wait there with keys in its
/// registers).
pub fn install_statement_hooks() {
    // SAFETY: _PG_init runs once per process, before any statement.
    unsafe {
        PREV_EXECUTOR_END = pg_sys::ExecutorEnd_hook;
        pg_sys::ExecutorEnd_hook = Some(executor_end);
        PREV_EXECUTOR_RUN = pg_sys::ExecutorRun_hook;
        pg_sys::ExecutorRun_hook = Some(executor_run);
    }
}

#[cfg(not(feature = "pg18"))]
#[pg_guard]
unsafe extern "C-unwind" fn executor_run(
    query_desc: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
    execute_once: bool,
) {
    ensure_exit_wipe();
    unsafe {
        match PREV_EXECUTOR_RUN {
            Some(prev) => prev(query_desc, direction, count, execute_once),
            None => pg_sys::standard_ExecutorRun(query_desc, direction, count, execute_once),
        }
    }
    after_statement();
}

#[cfg(feature = "pg18")]
#[pg_guard]
unsafe extern "C-unwind" fn executor_run(query_desc: *mut pg_sys::QueryDesc, direction: pg_sys::ScanDirection::Type, count: u64) {
    ensure_exit_wipe();
    unsafe {
        match PREV_EXECUTOR_RUN {
            Some(prev) => prev(query_desc, direction, count),
            None => pg_sys::standard_ExecutorRun(query_desc, direction, count),
        }
    }
    after_statement();
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_end(query_desc: *mut pg_sys::QueryDesc) {
    unsafe {
        match PREV_EXECUTOR_END {
            Some(prev) => prev(query_desc),
            None => pg_sys::standard_ExecutorEnd(query_desc),
        }
    }
    after_statement();
}

/// Registered in `_PG_init` (so every backend inherits it): at the end of a transaction that
/// used keys, wipe the stack below this shallow frame, where the executor's frames built derived
/// keys, unwrapped data keys or ran AES-GCM. No copy of a key outlives the transaction on the
/// stack, whether it committed or failed.
pub unsafe extern "C-unwind" fn on_xact_end(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    let ended = matches!(event, XACT_EVENT_COMMIT | XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_COMMIT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE);
    // A transaction that changed keys or grants and aborted: this backend may have cached what
    // it saw of its own uncommitted changes (a data key version that now exists nowhere, a grant
    // that never was). Forget everything; the next use reloads committed state.
    if matches!(event, XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT) && KEYS_CHANGED.with(|k| k.get()) {
        forget_everything();
    }
    if matches!(event, XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT) {
        crate::catalog::forget_pinned_at_abort(None);
    }
    if ended {
        KEYS_CHANGED.with(|k| k.set(false));
        drop_stale_keys();
        // (Also after auditing was turned off mid-transaction: what was counted or done while it
        // was on is pushed with this transaction's outcome.)
        if crate::audit::enabled() || (PRELOADED.load(Ordering::Relaxed) && crate::audit::pending()) {
            crate::audit::at_transaction_end(matches!(event, XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT | XACT_EVENT_PREPARE));
        }
    }
    if ended {
        // SAFETY: reads SPI's state; no error path.
        if unsafe { pg_sys::SPI_inside_nonatomic_context() } {
            // A COMMIT or ROLLBACK inside a procedure (CALL, DO): this callback can run deeper
            // than the frames that used keys (nested CALLs before the COMMIT), and what they left
            // lies above it, among the procedure's live frames (insider review 67: a derived key
            // found 30 KiB above such a callback). What is below is wiped now; the flags stay for
            // the end of the top-level statement's transaction, above every frame of the call.
            if keys_used_pending(STACK) {
                pg_envelope_core::secure::wipe_stack_below(peek_deepest_key_use());
            }
        } else if take_keys_used(STACK) {
            pg_envelope_core::secure::wipe_stack_below(take_deepest_key_use());
        }
    }
}

/// pg_envelope's tables (sql/*.sql): a transaction holding more than a read lock on any of them
/// (it changed or locked rows: `FOR UPDATE` takes ROW SHARE) cannot be prepared. Kept in step
/// with the schema by `test_lifecycle.py` (the list must name every table of `envelope`).
pub const ENVELOPE_TABLES: &[&std::ffi::CStr] = &[
    c"audit_alerts",
    c"audit_blocks",
    c"audit_canaries",
    c"audit_checkpoints",
    c"audit_hourly",
    c"blind_index_purposes",
    c"data_keys",
    c"grant_anchor",
    c"index_keys",
    c"key_providers",
    c"reencrypt_jobs",
    c"rewrap_jobs",
    c"rotation_policy",
    c"tenant_grants",
    c"tenants",
];

/// Registered in `_PG_init`: PREPARE TRANSACTION is refused for a transaction that wrote or
/// row-locked any of pg_envelope's tables. A prepared transaction keeps its locks past its
/// session and a restart until someone runs COMMIT or ROLLBACK PREPARED: one that held a
/// tenant's row (a rewrap batch), a job's row or a key row blocked suspensions, shreds,
/// rotations and the maintenance worker (review 41), and key changes committed elsewhere are
/// never announced to other backends. The functions that change keys also refuse by
/// themselves ([`refuse_prepare`]); this catches every other path, whatever function took
/// the lock. Encrypting and decrypting only read these tables, so an application's
/// two-phase transactions that use keys are unaffected.
#[pg_guard]
pub unsafe extern "C-unwind" fn refuse_prepare_holding_envelope_locks(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    if event != pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE {
        return;
    }
    let ns = pg_sys::get_namespace_oid(c"envelope".as_ptr(), true);
    if ns == pg_sys::InvalidOid {
        return;
    }
    for name in ENVELOPE_TABLES {
        let relid = pg_sys::get_relname_relid(name.as_ptr(), ns);
        if relid == pg_sys::InvalidOid {
            continue;
        }
        // SET_LOCKTAG_RELATION (storage/lock.h).
        let tag = pg_sys::LOCKTAG {
            locktag_field1: pg_sys::MyDatabaseId.to_u32(),
            locktag_field2: relid.to_u32(),
            locktag_field3: 0,
            locktag_field4: 0,
            locktag_type: pg_sys::LockTagType::LOCKTAG_RELATION as u8,
            locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
        };
        for mode in pg_sys::RowShareLock..=pg_sys::AccessExclusiveLock {
            #[cfg(not(feature = "pg18"))]
            let held = pg_sys::LockHeldByMe(&tag, mode as pg_sys::LOCKMODE);
            #[cfg(feature = "pg18")]
            let held = pg_sys::LockHeldByMe(&tag, mode as pg_sys::LOCKMODE, false);
            if held {
                EnvelopeError::PrepareAfterKeyChange.raise();
            }
        }
    }
}

/// Registered in `_PG_init`: `ROLLBACK TO SAVEPOINT` over a key or grant change forgets what
/// this backend cached since, like an aborted transaction (see [`on_xact_end`]).
pub unsafe extern "C-unwind" fn on_subxact_end(
    event: pg_sys::SubXactEvent::Type,
    my: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB && KEYS_CHANGED.with(|k| k.get()) {
        forget_everything();
    }
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        crate::catalog::forget_pinned_at_abort(Some(my));
        crate::audit::at_subtransaction_abort(my);
    }
}

thread_local! {
    /// Set when this transaction changed keys or grants (`invalidate_after_commit`).
    static KEYS_CHANGED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Drops every cached key (wiped), tenant directory entry and role memo of this backend.
fn forget_everything() {
    BACKEND.with(|cell| {
        if let Ok(mut slot) = cell.try_borrow_mut() {
            if let Some(b) = slot.as_mut() {
                b.cache.clear();
                b.directory.clear();
                b.privs.clear();
            }
        }
    });
}

/// The OID of `envelope.grant_anchor` in this database, once known (0 before).
static ANCHOR_OID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

pub fn note_anchor_oid(oid: pg_sys::Oid) {
    ANCHOR_OID.store(oid.to_u32(), Ordering::Relaxed);
}

/// The OID of `envelope.tenants` in this database, once known (0 before).
static TENANTS_OID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
/// Bumped by the relcache callback when `envelope.tenants` is invalidated: every key change
/// sends that invalidation with its commit ([`invalidate_after_commit`]), and it travels in the
/// WAL, so a hot standby's backends drop their keys at their next call after replaying a
/// suspension, shred or revocation (they never see the primary's shared-memory epoch).
static CATALOG_GENERATION: AtomicU64 = AtomicU64::new(0);

pub fn note_tenants_oid(oid: pg_sys::Oid) {
    TENANTS_OID.store(oid.to_u32(), Ordering::Relaxed);
}

/// Registered in `_PG_init` as a relcache callback: a change of `envelope.grant_anchor`'s
/// privileges (`DROP OWNED BY`, a hand-made `REVOKE`) or a full reset makes grants stale; an
/// invalidation of `envelope.tenants` (a key change committed here or replayed on a standby)
/// makes cached keys stale, and they are dropped here unless the cache is in use (this runs
/// inside any lock acquisition, also in the middle of pg_envelope's own code: then the next key
/// use drops them).
pub unsafe extern "C-unwind" fn on_relcache_changed(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    crate::audit::hooks::on_relcache_changed(relid);
    crate::audit::alerts::on_relcache_changed(relid);
    let anchor = ANCHOR_OID.load(Ordering::Relaxed);
    if relid == pg_sys::InvalidOid || (anchor != 0 && relid.to_u32() == anchor) {
        ROLES_GENERATION.fetch_add(1, Ordering::Relaxed);
    }
    let tenants = TENANTS_OID.load(Ordering::Relaxed);
    if relid == pg_sys::InvalidOid || (tenants != 0 && relid.to_u32() == tenants) {
        CATALOG_GENERATION.fetch_add(1, Ordering::Relaxed);
        drop_stale_keys();
    } else if crate::revocation::locked_down() {
        drop_stale_keys();
    }
}

/// Whether this backend's cached keys are stale (a key change committed elsewhere, replayed on
/// a standby, or a lockdown), without touching the cache.
fn keys_stale(b: &Backend) -> bool {
    current_epoch() != b.epoch_seen || CATALOG_GENERATION.load(Ordering::Relaxed) != b.catalog_generation_seen || crate::revocation::locked_down()
}

/// At every transaction end (from [`on_xact_end`]): drop stale keys now rather than at the next
/// key use. An idle backend signalled by [`signal_backends`] runs an empty transaction to catch
/// up with invalidations, so it gets here within milliseconds of a revocation's commit and no
/// revoked key stays in its memory while it waits for its client.
fn drop_stale_keys() {
    BACKEND.with(|cell| {
        if let Ok(mut slot) = cell.try_borrow_mut() {
            if let Some(b) = slot.as_mut() {
                if !b.cache.is_empty() && keys_stale(b) {
                    b.cache.clear();
                    b.directory.clear();
                    b.names.clear();
                }
            }
        }
    });
}

/// Makes every backend of this database (or of all databases) drop stale keys now: an
/// invalidation message for `envelope.tenants` sent at once (not with a transaction: this runs
/// after the commit, so its receivers read committed state), then [`signal_backends`]. An idle
/// backend runs an empty transaction and drops its keys at its end ([`on_xact_end`]); a backend
/// idle *inside* a transaction processes the message ([`on_relcache_changed`]), which drops them
/// too. (The transactional invalidation of [`invalidate_after_commit`] is sent after the commit
/// callbacks, too late for the signal.)
pub fn wake_backends(all_databases: bool) {
    let tenants = TENANTS_OID.load(Ordering::Relaxed);
    if tenants != 0 {
        // SAFETY: a plain relcache invalidation message, as CacheInvalidateRelcache builds it.
        unsafe {
            let mut msg: pg_sys::SharedInvalidationMessage = std::mem::zeroed();
            msg.rc.id = pg_sys::SHAREDINVALRELCACHE_ID as i8;
            msg.rc.dbId = if all_databases { pg_sys::InvalidOid } else { pg_sys::MyDatabaseId };
            msg.rc.relId = pg_sys::Oid::from(tenants);
            pg_sys::SendSharedInvalidMessages(&msg, 1);
        }
    }
    signal_backends(all_databases);
}

/// Sends PROCSIG_CATCHUP_INTERRUPT to every other server process of this database (or of every
/// database): an idle backend handles it by running an empty transaction, which ends in
/// [`on_xact_end`] and drops its stale keys. Busy backends handle it when they go idle; their
/// next key use sees the change anyway. The same signal PostgreSQL itself sends to backends that
/// fall behind on invalidations, so it is safe for every process that receives it.
pub fn signal_backends(all_databases: bool) {
    // SAFETY: ProcGlobal is set up before any backend runs; reading pid and databaseId without
    // a lock may see a slot being reused, which only means a spurious (harmless) signal or a
    // missed one for a backend that has just started (and holds no key). SendProcSignal checks
    // the pid against its own slots.
    unsafe {
        let hdr = pg_sys::ProcGlobal;
        if hdr.is_null() {
            return;
        }
        let me = pg_sys::MyProcPid;
        let db = pg_sys::MyDatabaseId;
        for i in 0..(*hdr).allProcCount as usize {
            let proc_ = (*hdr).allProcs.add(i);
            let pid = std::ptr::read_volatile(&(*proc_).pid);
            if pid == 0 || pid == me {
                continue;
            }
            let pdb = std::ptr::read_volatile(&(*proc_).databaseId);
            if pdb == pg_sys::InvalidOid || (!all_databases && pdb != db) {
                continue;
            }
            pg_sys::SendProcSignal(pid, pg_sys::ProcSignalReason::PROCSIG_CATCHUP_INTERRUPT, -1);
        }
    }
}

/// What the SQL layer keeps next to a tenant's cached keys.
pub struct TenantMeta {
    pub provider: String,
    /// The last role that passed the grant check with these keys: repeated calls by the same
    /// role skip it (the hot path). Forgotten on any epoch move or role change.
    pub last_allowed_role: pg_sys::Oid,
    /// The provider's own `max_key_age`, if shorter than the server's.
    pub max_age_cap: Option<std::time::Duration>,
}

/// A tenant as the grant check and the header checks see it: no key material. Read under a
/// fresh snapshot, dropped with the key cache on every epoch move and on role changes.
struct DirEntry {
    id: u32,
    grantees: Vec<pg_sys::Oid>,
    last_allowed_role: pg_sys::Oid,
    refusal: Option<catalog::Refusal>,
}

/// At most this many tenant names (including names that do not exist) are remembered.
const DIRECTORY_LIMIT: usize = 4096;

pub struct Backend {
    pub cache: KeyCache<TenantMeta>,
    pub epoch_seen: u64,
    pub roles_generation_seen: u64,
    pub catalog_generation_seen: u64,
    /// Provider calls per provider name, since the backend started.
    pub provider_calls: HashMap<String, u64>,
    /// Tenant name -> key id and grantees (`None`: no such tenant).
    directory: HashMap<String, Option<DirEntry>>,
    /// Role -> the roles whose privileges it has (PostgreSQL's privilege rule, no superuser shortcut).
    privs: HashMap<pg_sys::Oid, Vec<pg_sys::Oid>>,
    /// Tenant key id -> tenant name, for key administration by envelope header (re-encryption).
    names: HashMap<u32, Option<String>>,
    /// `envelope.key_cache_ttl` as last applied to the cache (the setting's raw value: compared
    /// on every key use, converted only when it changed).
    ttl_setting_seen: i32,
    /// The coarse clock's last reading and the `Instant` made of it ([`Backend::now`]).
    clock_seen: (std::time::Duration, Option<Instant>),
}

/// This backend's key state (a static, not a thread-local: see `main_thread`).
static BACKEND: MainThread<RefCell<Option<Backend>>> = MainThread::new(RefCell::new(None));

/// Whether a tenant of that name exists (this backend's tenant directory, read on a miss and
/// cached, negative answers included), for the audit of failures. Never said to the caller.
/// False when it cannot be told (the backend's state in use, a catalog read that failed).
pub fn tenant_exists(tenant: &str) -> bool {
    if BACKEND.with(|cell| cell.try_borrow_mut().is_err()) {
        return false;
    }
    // The epoch first, as for key use: a name looked up before its tenant was created must not
    // stay "no tenant" (insider review 30).
    with_backend(|b| {
        b.check_epoch();
        b.directory_entry(tenant).is_ok_and(|e| e.is_some())
    })
}

/// Runs `f` with this backend's state, creating it on first use.
pub fn with_backend<R>(f: impl FnOnce(&mut Backend) -> R) -> R {
    BACKEND.with(|cell| {
        let mut slot = cell.borrow_mut();
        let b = slot.get_or_insert_with(|| {
            ensure_exit_wipe();
            Backend {
            cache: KeyCache::new(gucs::key_cache_ttl()),
            epoch_seen: current_epoch(),
            roles_generation_seen: ROLES_GENERATION.load(Ordering::Relaxed),
            catalog_generation_seen: CATALOG_GENERATION.load(Ordering::Relaxed),
            provider_calls: HashMap::new(),
            directory: HashMap::new(),
            privs: HashMap::new(),
            names: HashMap::new(),
            ttl_setting_seen: gucs::KEY_CACHE_TTL_S.get(),
            clock_seen: (std::time::Duration::ZERO, None),
            }
        });
        f(b)
    })
}

/// Registers [`on_proc_exit`] in this process, once (first when its key state is made). Not in
/// `_PG_init`: with `shared_preload_libraries` that runs in the postmaster, and every backend
/// forgets the postmaster's exit callbacks (`on_exit_reset` in `InitPostmasterChild`); the key
/// state was a thread-local until the tenth session, whose destructor `exit()` ran, and is now a
/// static, which nothing drops (insider review 66: a backend exited with its data keys and
/// derived keys unwiped).
///
/// Also called on every key use (`note_keys_used`) and before every statement (the ExecutorRun
/// and ProcessUtility hooks): a process can fill the key pool without making key state first
/// (`create_tenant` in a fresh session unwraps the root key on the provider thread), and a
/// FATAL exit then left it unwiped (insider review 68). One compare of `MyProcPid` when done.
#[inline(always)]
pub fn ensure_exit_wipe() {
    // SAFETY: reads a backend global, set in every process before any statement.
    let pid = unsafe { pg_sys::MyProcPid };
    if EXIT_WIPE_REGISTERED_IN.load(Ordering::Relaxed) != pid {
        register_exit_wipe(pid);
    }
}

/// The process whose exit callbacks hold [`on_proc_exit`] (0: none yet). A forked child reads
/// its parent's pid here, never its own: it registers again.
static EXIT_WIPE_REGISTERED_IN: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

#[cold]
#[inline(never)]
fn register_exit_wipe(pid: i32) {
    EXIT_WIPE_REGISTERED_IN.store(pid, Ordering::Relaxed);
    unsafe { pg_sys::on_proc_exit(Some(on_proc_exit), pg_sys::Datum::from(0)) };
}

/// Drops every cached key (zeroizing it).
pub fn wipe() {
    BACKEND.with(|cell| {
        if let Ok(mut slot) = cell.try_borrow_mut() {
            if let Some(b) = slot.as_mut() {
                b.cache.clear();
            }
        }
    });
}

/// At process exit: the cached keys dropped, then the whole key pool zeroed, whatever holds its
/// slots. A FATAL error (a terminated backend, a lost client) exits from inside `with_backend`,
/// where the key state is borrowed and cannot be cleared, and keys being unwrapped then are not
/// in the cache yet (insider review 67).
pub unsafe extern "C-unwind" fn on_proc_exit(_code: i32, _arg: pg_sys::Datum) {
    wipe();
    pg_envelope_core::secure::wipe_pool();
}

fn current_epoch() -> u64 {
    if PRELOADED.load(Ordering::Relaxed) {
        EPOCH.get().load(Ordering::Acquire)
    } else {
        0
    }
}

/// Announces a committed change of keys or grants to every backend. Called from a commit
/// callback, so an aborted change announces nothing and a committed one is visible to the
/// catalog reads that follow the bump.
pub fn bump_epoch() {
    if PRELOADED.load(Ordering::Relaxed) {
        EPOCH.get().fetch_add(1, Ordering::AcqRel);
    }
}

/// Refuses PREPARE TRANSACTION in this transaction (registered once per transaction): for
/// transactions that locked a tenant or changed keys.
pub fn refuse_prepare() {
    thread_local! { static ARMED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) }; }
    if ARMED.with(|a| a.replace(true)) {
        return;
    }
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::PrePrepare, || {
        ARMED.with(|a| a.set(false));
        EnvelopeError::PrepareAfterKeyChange.raise();
    });
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, || ARMED.with(|a| a.set(false)));
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Abort, || ARMED.with(|a| a.set(false)));
}

/// Like [`invalidate_after_commit`], for changes that take a right away (suspension, shred,
/// revocation, a disabled or destroyed version): at commit, idle backends of this database are
/// also woken to drop their cached keys at once ([`signal_backends`]).
pub fn revoke_after_commit() {
    WAKE_IDLE.with(|w| w.set(true));
    invalidate_after_commit();
}

thread_local! {
    /// Set by [`revoke_after_commit`]: the commit signals idle backends.
    static WAKE_IDLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Registers [`bump_epoch`] for the end of the current transaction (once per transaction)
/// and drops this backend's own cache right away. The transaction also invalidates
/// `envelope.tenants` in the relation cache: that message is sent with the commit, and written
/// to the WAL, which is how hot standbys learn of the change ([`on_relcache_changed`]).
pub fn invalidate_after_commit() {
    thread_local! { static REGISTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) }; }
    KEYS_CHANGED.with(|k| k.set(true));
    if let Ok(oid) = catalog::tenants_oid() {
        note_tenants_oid(oid);
        // SAFETY: inside a transaction; the relation exists (the OID was just read).
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(oid) };
    }
    with_backend(|b| {
        b.cache.clear();
        b.directory.clear();
    });
    // Other backends learn of the change from the epoch bumped at this backend's commit. A
    // prepared transaction commits elsewhere (COMMIT PREPARED), so no bump would follow: refuse
    // to prepare rather than let a revocation go unannounced.
    refuse_prepare();
    if !REGISTERED.with(|r| r.replace(true)) {
        // A key change that was under way when a lockdown began does not commit.
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::PreCommit, || {
            if let Err(e) = crate::revocation::refuse_if_locked() {
                e.raise();
            }
        });
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, || {
            bump_epoch();
            REGISTERED.with(|r| r.set(false));
            if WAKE_IDLE.with(|w| w.replace(false)) {
                wake_backends(false);
            }
        });
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Abort, || {
            REGISTERED.with(|r| r.set(false));
            WAKE_IDLE.with(|w| w.set(false));
        });
    }
}

/// The current tenant from the tenant setting, or `TenantUnset`. Borrowed from the GUC; no copy.
#[inline(always)]
pub fn current_tenant() -> Result<&'static str> {
    let name = gucs::tenant_setting_name();
    let unset = || EnvelopeError::TenantUnset { setting: name.to_string_lossy().into_owned() };
    // A name that is not UTF-8 (non-ASCII in a LATIN1 database) can name no tenant: every
    // tenant name is UTF-8. Say so rather than calling the setting unset.
    let bytes = crate::nothrow::tenant_setting_value(name).ok_or_else(unset)?.to_bytes();
    let s = pg_envelope_core::text::utf8_str(bytes).map_err(|_| EnvelopeError::InvalidTenantName)?;
    if s.is_empty() {
        return Err(unset());
    }
    Ok(s)
}

/// Builds a provider from its catalog row. Providers are cheap to build and keep no secret
/// between calls (the local provider and the token file are read on each use), so none is
/// cached; a rotated token file is picked up at once.
pub fn provider_for(name: &str, kind: &str, options_json: &str) -> Result<Box<dyn KeyProvider>> {
    // No key-provider call in a lockdown (tenant creation, rotations, rewraps, verification).
    crate::revocation::refuse_if_locked()?;
    provider_for_any_state(name, kind, options_json)
}

/// A provider for the audit trail's checkpoints: built in a lockdown too (a lockdown stops key
/// use, not the record of it).
pub fn build_audit_provider(name: &str) -> Result<Box<dyn KeyProvider>> {
    let (kind, options) =
        catalog::provider_row(name)?.ok_or_else(|| EnvelopeError::ProviderUnknown { provider: name.to_string() })?;
    provider_for_any_state(name, &kind, &options)
}

fn provider_for_any_state(name: &str, kind: &str, options_json: &str) -> Result<Box<dyn KeyProvider>> {
    let not_configured = |m: String| EnvelopeError::Provider { provider: name.to_string(), error: ProviderError::NotConfigured(m) };
    let fail = |error| EnvelopeError::Provider { provider: name.to_string(), error };
    // The options every kind shares (key_cache_ttl, max_key_age, dedicated) are taken out; the
    // rest goes to the kind's own parser.
    let v: serde_json::Value = serde_json::from_str(options_json).map_err(|_| not_configured("options are not valid JSON".into()))?;
    let (_, v) = CommonOptions::split(&v).map_err(fail)?;
    if kind != "local" {
        check_provider_options(name, &v)?;
    }
    match kind {
        "local" => match gucs::local_root_key_file() {
            Some(path) => Ok(Box::new(LocalProvider::new(path))),
            None => Err(not_configured("envelope.local_root_key_file is not set".into())),
        },
        "vault_transit" => {
            let opts = VaultTransitOptions::from_json(&v).map_err(fail)?;
            Ok(Box::new(VaultTransitProvider::new(opts, gucs::kms_timeout()).map_err(fail)?))
        }
        "aws_kms" => {
            let opts = AwsKmsOptions::from_json(&v).map_err(fail)?;
            Ok(Box::new(AwsKmsProvider::new(opts, gucs::kms_timeout()).map_err(fail)?))
        }
        "pkcs11" => {
            Ok(Box::new(Pkcs11Provider::new(Pkcs11Options::from_json(&v).map_err(fail)?)))
        }
        other => Err(not_configured(format!("provider kind \"{other}\" is not supported by this build"))),
    }
}

/// The options every provider kind shares, from a provider's options (defaults when they do
/// not parse: `provider_for` refuses such a provider anyway).
pub fn common_options(options_json: &str) -> CommonOptions {
    serde_json::from_str::<serde_json::Value>(options_json)
        .ok()
        .and_then(|v| CommonOptions::split(&v).ok())
        .map(|(c, _)| c)
        .unwrap_or_default()
}

/// Files and modules named by a provider's options must be allowed by postgresql.conf
/// (`envelope.credential_dirs`, `envelope.pkcs11_modules`). Checked at registration and every
/// time a provider is built from its row.
pub fn check_provider_options(name: &str, options: &serde_json::Value) -> Result<()> {
    let pairs: Vec<(&str, &str)> = options
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| v.as_str().map(|s| (k.as_str(), s))).collect())
        .unwrap_or_default();
    pg_envelope_core::provider::policy::check_options(pairs, &gucs::credential_dirs(), &gucs::pkcs11_modules()).map_err(|e| {
        EnvelopeError::ProviderOptionNotAllowed { provider: name.to_string(), option: e.option, setting: e.setting }
    })
}

pub fn build_provider(name: &str) -> Result<Box<dyn KeyProvider>> {
    let (kind, options) =
        catalog::provider_row(name)?.ok_or_else(|| EnvelopeError::ProviderUnknown { provider: name.to_string() })?;
    provider_for(name, &kind, &options)
}

/// Runs a key-provider call on a helper thread and waits for it while servicing interrupts, so
/// pg_cancel_backend and statement_timeout end a hung KMS call within ~50 ms (a blocking HTTP
/// client never checks for interrupts by itself). The helper has every signal blocked (PostgreSQL's
/// handlers must run on the main thread), touches no PostgreSQL state, and is abandoned on
/// cancellation; it ends by itself within envelope.kms_timeout.
pub fn interruptible<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    note_keys_used();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let spawned = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let h = std::thread::Builder::new().name("pg_envelope-kms".into()).spawn(move || {
            // Key bytes and schedules pass through this thread's frames (root key file, KMS
            // answers, unwrapping); glibc keeps exited threads' stacks for reuse, so they are
            // wiped before the thread leaves. What `r` holds lives in the key pool (pointers here).
            let r = pg_envelope_core::secure::run_then_wipe(f);
            let _ = tx.send(r);
        });
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        h
    };
    if spawned.is_err() {
        EnvelopeError::Internal("could not start the key-provider thread".into()).raise();
    }
    loop {
        match rx.recv_timeout(std::time::Duration::from_millis(20)) {
            Ok(r) => return r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                pgrx::check_for_interrupts!();
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                EnvelopeError::Internal("the key-provider thread failed".into()).raise()
            }
        }
    }
}

/// A role's name (`oid N` for a dropped role). The last few are kept (a catalog lookup per audit
/// record was a twelfth of a statement's audit cost), dropped when pg_authid changes (the
/// syscache callback behind `crate::audit::hooks::privileges_generation`: a rename committed
/// anywhere is seen at the next statement, as the lookup itself would see it).
pub fn role_name(role: pg_sys::Oid) -> String {
    let mut s = String::new();
    role_name_into(role, &mut s);
    s
}

/// [`role_name`] into `into` (its allocation reused: the audit asks once per statement).
pub fn role_name_into(role: pg_sys::Oid, into: &mut String) {
    thread_local! {
        static NAMES: RefCell<(u64, Vec<(pg_sys::Oid, String)>)> = const { RefCell::new((u64::MAX, Vec::new())) };
    }
    into.clear();
    let generation = crate::audit::hooks::privileges_generation();
    let cached = NAMES.with(|n| {
        let n = n.borrow();
        if n.0 != generation {
            return false;
        }
        match n.1.iter().find(|(o, _)| *o == role) {
            Some((_, name)) => {
                into.push_str(name);
                true
            }
            None => false,
        }
    });
    if cached {
        return;
    }
    let name = role_name_uncached(role);
    into.push_str(&name);
    NAMES.with(|n| {
        let mut n = n.borrow_mut();
        if n.0 != generation {
            *n = (generation, Vec::new());
        }
        if n.1.len() >= 8 {
            n.1.remove(0);
        }
        n.1.push((role, name));
    });
}

fn role_name_uncached(role: pg_sys::Oid) -> String {
    unsafe {
        let p = pg_sys::GetUserNameFromId(role, true);
        if p.is_null() {
            format!("oid {}", role.to_u32())
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

impl Backend {
    /// Drops whatever a committed key or grant change (the shared epoch) or a role change (the
    /// syscache callback) may have made stale. The epoch is read *before* anything is reloaded,
    /// and reloads read under a fresh snapshot, so nothing cached is older than the epoch seen.
    #[inline(always)]
    fn check_epoch(&mut self) {
        let e = current_epoch();
        let c = CATALOG_GENERATION.load(Ordering::Relaxed);
        if e != self.epoch_seen || c != self.catalog_generation_seen {
            self.cache.clear();
            self.directory.clear();
            self.names.clear();
            self.epoch_seen = e;
            self.catalog_generation_seen = c;
        }
        let g = ROLES_GENERATION.load(Ordering::Relaxed);
        if g != self.roles_generation_seen {
            for meta in self.cache.metas_mut() {
                meta.last_allowed_role = pg_sys::InvalidOid;
            }
            self.directory.clear();
            self.privs.clear();
            self.roles_generation_seen = g;
        }
        let ttl = gucs::KEY_CACHE_TTL_S.get();
        if ttl != self.ttl_setting_seen {
            self.cache.set_ttl(gucs::key_cache_ttl());
            self.ttl_setting_seen = ttl;
        }
    }

    /// The tenant's directory entry (key id, grantees), read on a miss. `None`: no such tenant.
    fn directory_entry(&mut self, tenant: &str) -> Result<Option<&mut DirEntry>> {
        if !self.directory.contains_key(tenant) {
            // (Each miss: after DROP and CREATE EXTENSION the table has a new oid.)
            note_tenants_oid(catalog::tenants_oid()?);
            let d = catalog::tenant_directory(tenant)?;
            // No tenant's name is longer than 255 bytes (create_tenant refuses it): such names
            // are not remembered as absent (a role made its backend hold 1 MB per name, up to
            // DIRECTORY_LIMIT of them: insider review 30).
            if d.is_none() && tenant.len() > 255 {
                return Ok(None);
            }
            if self.directory.len() >= DIRECTORY_LIMIT {
                self.directory.clear();
            }
            self.directory.insert(
                tenant.to_string(),
                d.map(|d| DirEntry { id: d.id, grantees: d.grantees, last_allowed_role: pg_sys::InvalidOid, refusal: d.refusal }),
            );
        }
        Ok(self.directory.get_mut(tenant).and_then(|e| e.as_mut()))
    }

    /// The tenant key id of a tenant, for header-only checks (no key), as far as `role` may know
    /// it: when it holds the tenant's grant or may read `envelope.tenants`. Otherwise `None`, as
    /// for a tenant that does not exist: the answer must not confirm that a tenant exists.
    pub fn visible_tenant_key_id(&mut self, tenant: &str, role: pg_sys::Oid) -> Result<Option<u32>> {
        self.check_epoch();
        let Some(id) = self.directory_entry(tenant)?.map(|e| e.id) else { return Ok(None) };
        match self.authorize(tenant, role) {
            Ok(_) => Ok(Some(id)),
            Err(EnvelopeError::TenantDenied { .. }) => Ok(catalog::can_list_tenants(role)?.then_some(id)),
            Err(e) => Err(e),
        }
    }

    /// Whether `role` may use the tenant's keys: it has the privileges of a granted role (by
    /// PostgreSQL's rule for privileges, without the superuser shortcut). Reads no key and
    /// changes nothing in the key cache, so a denied role cannot evict another role's keys.
    pub fn authorize(&mut self, tenant: &str, role: pg_sys::Oid) -> Result<u32> {
        let Some(entry) = self.directory.get_mut(tenant).and_then(|e| e.as_mut()) else {
            return Err(EnvelopeError::TenantUnknown { tenant: tenant.to_string() });
        };
        if entry.last_allowed_role == role {
            return Ok(entry.id);
        }
        if !self.privs.contains_key(&role) {
            let p = catalog::roles_with_privs_of(role)?;
            self.privs.insert(role, p);
        }
        let privs = &self.privs[&role];
        if entry.grantees.iter().any(|g| privs.contains(g)) {
            entry.last_allowed_role = role;
            Ok(entry.id)
        } else {
            Err(EnvelopeError::TenantDenied { tenant: tenant.to_string(), role: role_name(role) })
        }
    }

    /// [`Backend::authorize`] after loading the directory entry and checking the epoch.
    pub fn check_grant(&mut self, tenant: &str, role: pg_sys::Oid) -> Result<u32> {
        self.check_epoch();
        // The directory entry and the role's privileges as of one moment.
        catalog::one_snapshot(|| self.check_grant_now(tenant, role))
    }

    fn check_grant_now(&mut self, tenant: &str, role: pg_sys::Oid) -> Result<u32> {
        if self.directory_entry(tenant)?.is_none() {
            // Only roles that may list tenants learn that a name does not exist; to others an
            // unknown tenant looks like one they hold no grant for (no tenant-name oracle).
            return Err(if catalog::can_list_tenants(role)? {
                EnvelopeError::TenantUnknown { tenant: tenant.to_string() }
            } else {
                EnvelopeError::TenantDenied { tenant: tenant.to_string(), role: role_name(role) }
            });
        }
        self.authorize(tenant, role)
    }

    /// Runs `f` with the tenant's keys, loading them (one root-key unwrap) on a miss, after
    /// checking that the current role may use them. The hot path (fresh entry, same role as the
    /// last call) costs one hash lookup.
    pub fn with_tenant_keys<R>(&mut self, tenant: &str, f: impl FnOnce(&mut TenantKeys) -> Result<R>) -> Result<R> {
        if !PRELOADED.load(Ordering::Relaxed) {
            return Err(EnvelopeError::NotPreloaded);
        }
        self.refuse_in_lockdown()?;
        self.check_epoch();
        // ANALYZE, CREATE INDEX, REFRESH MATERIALIZED VIEW, CLUSTER and the like run as the table
        // owner in a security-restricted operation: keys are never used there, so no maintenance
        // path can write a decrypted value into statistics, an index or a materialized view.
        if crate::nothrow::in_security_restricted_operation() {
            return Err(EnvelopeError::RestrictedOperation);
        }
        let role = crate::nothrow::current_user_id();
        KEYS_ROLE.store(role.to_u32(), Ordering::Relaxed);
        let now = self.now();
        note_keys_used();
        if let Some(entry) = self.cache.fresh_hit(tenant, now) {
            if entry.meta.last_allowed_role == role {
                return f(&mut entry.keys);
            }
        }
        // The grant, the tenant's state and its keys as of one moment (review 36: read at three,
        // a call could see a state that never existed).
        let keys = catalog::one_snapshot(move || {
            // The grant check comes first: a denial never touches the key cache or the provider.
            self.check_grant(tenant, role)?;
            // A suspended or shredded tenant (committed suspensions and shreds move the epoch,
            // which emptied the cache).
            if let Some(refusal) = self.directory.get(tenant).and_then(|e| e.as_ref()).and_then(|e| e.refusal.as_ref()) {
                return Err(refusal.error(tenant));
            }
            self.tenant_keys_slow(tenant, role, true, now)
        })?;
        f(keys)
    }

    /// Runs `f` with the keys of the tenant whose key id an envelope header names, for key
    /// administration (re-encryption): no tenant grant is checked, and none is recorded, so a
    /// later call by a role without the grant still meets the grant check. Only functions that
    /// never return plaintext use this, and only key administrators may execute them. The epoch
    /// and the TTL hold as for [`Backend::with_tenant_keys`].
    pub fn with_tenant_keys_by_id<R>(&mut self, tenant_key_id: u32, f: impl FnOnce(&str, &mut TenantKeys) -> Result<R>) -> Result<R> {
        if !PRELOADED.load(Ordering::Relaxed) {
            return Err(EnvelopeError::NotPreloaded);
        }
        self.refuse_in_lockdown()?;
        self.check_epoch();
        // Allowed inside a security-restricted operation (unlike `with_tenant_keys`): re-encryption
        // batches run as the table owner inside one, and this path never returns plaintext.
        note_keys_used();
        if !self.names.contains_key(&tenant_key_id) {
            let n = catalog::tenant_name_by_id(tenant_key_id)?;
            if self.names.len() >= DIRECTORY_LIMIT {
                self.names.clear();
            }
            self.names.insert(tenant_key_id, n);
        }
        let Some(name) = self.names[&tenant_key_id].clone() else {
            return Err(EnvelopeError::TenantKeyIdUnknown { tenant_key_id });
        };
        let now = self.now();
        if let Some(entry) = self.cache.fresh_hit(&name, now) {
            return f(&name, &mut entry.keys);
        }
        let keys = self.tenant_keys_slow(&name, pg_sys::InvalidOid, false, now)?;
        f(&name, keys)
    }

    /// [`cache_now`] for the key paths: the last reading is kept here, in the state they already
    /// hold, rather than in a thread-local of its own (one `__tls_get_addr` call fewer per
    /// value); [`cache_now`] still records each new reading for [`last_cache_now`].
    #[cfg(target_os = "linux")]
    #[inline]
    fn now(&mut self) -> Instant {
        let c = coarse_clock();
        if let (l, Some(i)) = self.clock_seen {
            if l == c && c != std::time::Duration::MAX {
                return i;
            }
        }
        let i = instant_of(c);
        self.clock_seen = (c, Some(i));
        i
    }

    #[cfg(not(target_os = "linux"))]
    fn now(&mut self) -> Instant {
        cache_now()
    }

    /// In a lockdown every key use is refused, and the first refusal drops every cached key.
    #[inline]
    fn refuse_in_lockdown(&mut self) -> Result<()> {
        if crate::revocation::locked_down() {
            return self.refuse_locked();
        }
        Ok(())
    }

    #[cold]
    fn refuse_locked(&mut self) -> Result<()> {
        let r = crate::revocation::refuse_if_locked();
        if r.is_err() && !self.cache.is_empty() {
            self.cache.clear();
        }
        r
    }

    /// Everything but the hot path: a stale or missing entry, or a role not checked yet.
    /// `granted`: the caller checked `role`'s grant (recorded for the hot path); otherwise
    /// nothing about roles is recorded.
    fn tenant_keys_slow(&mut self, tenant: &str, role: pg_sys::Oid, granted: bool, now: Instant) -> Result<&mut TenantKeys> {
        let entry = match self.cache.freshness(tenant, now) {
            Freshness::Fresh => self.cache.hit(tenant).expect("fresh entry present"),
            Freshness::Stale { age } => self.refresh_stale(tenant, now, age)?,
            Freshness::Missing => {
                if let Some(f) = self.cache.cold_failure(tenant, now) {
                    // Backing off: fail at once rather than wait for the KMS again on every row.
                    return Err(EnvelopeError::Provider {
                        provider: f.provider.clone(),
                        error: ProviderError::Unavailable(format!(
                            "not retried for another {} ms after: {}",
                            f.retry_at.saturating_duration_since(now).as_millis(),
                            f.error
                        )),
                    });
                }
                match self.load_keys(tenant, now) {
                    Ok((keys, meta, ttl_cap)) => {
                        // A lockdown that began while the provider answered: the keys are dropped.
                        self.refuse_in_lockdown()?;
                        self.cache.insert_loaded_capped(tenant, keys, meta, ttl_cap)
                    }
                    Err((e, Some((provider, transient)))) => {
                        let r = rand_u32();
                        self.cache.record_cold_failure(tenant, &provider, now, transient, r);
                        return Err(e);
                    }
                    Err((e, None)) => return Err(e),
                }
            }
        };
        if granted {
            entry.meta.last_allowed_role = role;
        }
        Ok(&mut entry.keys)
    }

    /// A cached tenant past its TTL: reload it; if the provider is unreachable, keep serving the
    /// cached keys (degraded, with a WARNING once per statement) until `envelope.max_key_age`
    /// after the last successful unwrap, retrying with backoff. Any other failure (denied,
    /// different key, revoked grant) evicts the keys and fails closed.
    fn refresh_stale(&mut self, tenant: &str, now: Instant, age: std::time::Duration) -> Result<&mut CacheEntry<TenantMeta>> {
        let max_age = match self.cache.peek_mut(tenant).and_then(|e| e.meta.max_age_cap) {
            Some(cap) => cap.min(gucs::max_key_age()),
            None => gucs::max_key_age(),
        };
        let backing_off = self
            .cache
            .peek_mut(tenant)
            .and_then(|e| e.degraded.as_ref())
            .is_some_and(|d| now < d.retry_at);
        if age < max_age && backing_off {
            return Ok(self.serve_degraded(tenant));
        }
        match self.load_keys(tenant, now) {
            Ok((keys, meta, ttl_cap)) => Ok(self.cache.insert_loaded_capped(tenant, keys, meta, ttl_cap)),
            Err((_, Some((_, transient)))) if age < max_age => {
                let r = rand_u32();
                self.cache.mark_degraded(tenant, now, transient.to_string(), r);
                Ok(self.serve_degraded(tenant))
            }
            Err((e, _)) => {
                self.cache.evict(tenant);
                Err(e)
            }
        }
    }

    fn serve_degraded(&mut self, tenant: &str) -> &mut CacheEntry<TenantMeta> {
        let stmt = crate::nothrow::statement_start();
        let e = self.cache.hit(tenant).expect("stale entry present");
        if let Some(d) = e.degraded.as_mut() {
            if d.warned != stmt {
                d.warned = stmt;
                crate::warning!(
                    "pg_envelope: key provider \"{}\" is unreachable; tenant \"{}\" is served from keys cached {} s ago (degraded until envelope.max_key_age): {}",
                    e.meta.provider,
                    tenant,
                    e.keys.loaded_at().elapsed().as_secs(),
                    d.last_error
                );
            }
        }
        e
    }

    /// Reads the tenant's row and unwraps its keys through its provider on a
    /// helper thread. On failure returns the error and, when it is transient (the provider could
    /// not be reached), the provider error for backoff bookkeeping.
    fn load_keys(
        &mut self,
        tenant: &str,
        now: Instant,
    ) -> std::result::Result<(TenantKeys, TenantMeta, Option<std::time::Duration>), (EnvelopeError, Option<(String, ProviderError)>)> {
        let row = catalog::load_tenant(tenant)
            .map_err(|e| (e, None))?
            .ok_or_else(|| (EnvelopeError::TenantUnknown { tenant: tenant.to_string() }, None))?;
        let mut provider = provider_for(&row.provider, &row.provider_kind, &row.provider_options).map_err(|e| (e, None))?;
        let common = common_options(&row.provider_options);
        *self.provider_calls.entry(row.provider.clone()).or_default() += 1;
        let record = row.record;
        // One slot of envelope.max_concurrent_provider_calls (src/stampede.rs); none free within
        // envelope.kms_timeout fails closed with 58000 (it does not start outage mode).
        let loaded = crate::stampede::provider_call(&row.provider, move || TenantKeys::load(provider.as_mut(), &record, now))
            .unwrap_or_else(|p| Err(pg_envelope_core::LoadError::Provider(p)));
        match loaded {
            // The role is recorded by the caller once its grant is known to be checked.
            Ok(keys) => Ok((
                keys,
                TenantMeta { provider: row.provider, last_allowed_role: pg_sys::InvalidOid, max_age_cap: common.max_key_age },
                common.key_cache_ttl,
            )),
            Err(e) => {
                self.cache.record_failed_unwrap();
                let transient = match &e {
                    pg_envelope_core::LoadError::Provider(p @ ProviderError::Unavailable(_)) => Some((row.provider.clone(), p.clone())),
                    _ => None,
                };
                Err((EnvelopeError::from_load(tenant, &row.provider, e), transient))
            }
        }
    }
}

/// The key cache's clock: `CLOCK_MONOTONIC_COARSE` (kernel-tick resolution, a plain read of the
/// vDSO page) mapped onto `Instant`. A precise `Instant::now()` on every value cost ~6% of a
/// short encryption; TTLs of seconds to hours and backoffs of a second or more do not need
/// better than a few milliseconds. Never behind the real clock by more than one tick.
#[cfg(target_os = "linux")]
pub fn cache_now() -> Instant {
    instant_of(coarse_clock())
}

/// CLOCK_MONOTONIC_COARSE; `Duration::MAX` if it cannot be read.
#[cfg(target_os = "linux")]
#[inline]
fn coarse_clock() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec pointer; CLOCK_MONOTONIC_COARSE exists on every Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if rc != 0 {
        return std::time::Duration::MAX;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The `Instant` of a coarse reading `c` (`Instant::now()` if the clock could not be read),
/// recorded as the last reading.
#[cfg(target_os = "linux")]
fn instant_of(c: std::time::Duration) -> Instant {
    thread_local! {
        static BASE: (Instant, std::time::Duration) = (Instant::now(), coarse_clock());
    }
    if c == std::time::Duration::MAX {
        return Instant::now();
    }
    LAST_READING.with(|last| {
        if let (l, Some(i)) = last.get() {
            if l == c {
                return i;
            }
        }
        let i = BASE.with(|&(base, base_coarse)| base + c.saturating_sub(base_coarse));
        last.set((c, Some(i)));
        i
    })
}

#[cfg(not(target_os = "linux"))]
pub fn cache_now() -> Instant {
    let i = Instant::now();
    LAST_READING.with(|l| l.set((std::time::Duration::ZERO, Some(i))));
    i
}

thread_local! {
    /// [`cache_now`]'s last reading and the Instant made of it: the coarse clock moves every few
    /// milliseconds, so most calls reuse the Instant instead of computing it again.
    static LAST_READING: std::cell::Cell<(std::time::Duration, Option<Instant>)> = const { std::cell::Cell::new((std::time::Duration::ZERO, None)) };
}

/// The key cache's last clock reading, without reading the clock (the audit fast path's time of
/// its last value: every key use reads the clock for the TTL check first).
pub fn last_cache_now() -> Instant {
    LAST_READING.with(|l| l.get().1).unwrap_or_else(cache_now)
}

fn rand_u32() -> u32 {
    BACKEND_RNG.with(|r| r.borrow_mut().random_u32())
}

/// A buffer an envelope or a plaintext is written into: a palloc'd varlena handed to PostgreSQL
/// without another copy, or a wiped buffer for the typed decoders.
pub trait OutBuf: Sized {
    /// A buffer of `len` zero bytes (zeroed, not left uninitialised: the decryption writes it
    /// through a slice, and a slice over uninitialised memory is not sound Rust; see
    /// `nothrow::palloc` and docs/design-decisions.md, "Backend state in process statics").
    fn zeroed(len: usize) -> Self;
    fn bytes_mut(&mut self) -> &mut [u8];
    /// Whether the decrypted plaintext is one the caller may use (`encrypted_jsonb` checks its
    /// document here, and parses a text-form one); asked before the decryption is audited, so
    /// that a refusal is recorded as a failure (`MalformedJsonb`), and so is an error
    /// PostgreSQL raised meanwhile (`Refusal::Raised`, rethrown after it is recorded: insider
    /// review 71). A refusing buffer wipes what it holds.
    #[inline(always)]
    fn accept(&mut self) -> std::result::Result<(), Refusal> {
        Ok(())
    }
    /// Wipes everything the buffer holds (a value that will not be returned).
    fn discard(&mut self) {
        zeroize::Zeroize::zeroize(self.bytes_mut());
    }
}

/// Why [`OutBuf::accept`] refused a plaintext.
pub enum Refusal {
    /// Not a value pg_envelope writes (`MalformedJsonb`).
    Malformed,
    /// PostgreSQL raised this error meanwhile: recorded, then rethrown as it is.
    Raised(pgrx::pg_sys::panic::CaughtError),
}

/// The SQLSTATE of a caught error, whatever raised it.
fn caught_sqlstate(e: &pgrx::pg_sys::panic::CaughtError) -> PgSqlErrorCode {
    use pgrx::pg_sys::panic::CaughtError::*;
    match e {
        PostgresError(r) | ErrorReport(r) | RustPanic { ereport: r, .. } => r.sql_error_code(),
    }
}

/// [`OutBuf::accept`] without auditing: a refusal as `MalformedJsonb`, an error rethrown.
#[inline(always)]
fn accepted<B: OutBuf>(mut b: B) -> Result<B> {
    match b.accept() {
        Ok(()) => Ok(b),
        Err(Refusal::Malformed) => Err(EnvelopeError::MalformedJsonb),
        Err(Refusal::Raised(e)) => e.rethrow(),
    }
}


/// Encrypts for the current tenant into a new `B`. Audited per statement when `envelope.audit`
/// is on (src/audit.rs).
#[inline(always)]
pub fn encrypt_to<B: OutBuf>(plaintext: &[u8], context: Option<&[u8]>) -> Result<B> {
    encrypt_parts_to([plaintext], context)
}

/// [`encrypt_to`] of the concatenation of `parts`, made in the envelope itself
/// (`DataKey::encrypt_parts_into`): no buffer holds the joined plaintext.
pub fn encrypt_parts_to<B: OutBuf, const N: usize>(plaintext: [&[u8]; N], context: Option<&[u8]>) -> Result<B> {
    if !crate::audit::enabled() {
        return encrypt_inner(plaintext, context, &mut 0, &mut None);
    }
    let (mut version, mut tenant) = (0, None);
    let op = crate::audit::Op::Encrypt;
    let armed = crate::audit::begin(op)?;
    // Matched at once (see decrypt_to).
    match encrypt_inner(plaintext, context, &mut version, &mut tenant) {
        Ok(b) => {
            if !crate::audit::finish(op, armed, tenant, version, None) {
                return Err(crate::audit::no_room());
            }
            Ok(b)
        }
        Err(e) => Err(crate::audit::finished_failure(op, tenant, version, e)),
    }
}

fn encrypt_inner<B: OutBuf, const N: usize>(
    plaintext: [&[u8]; N],
    context: Option<&[u8]>,
    version: &mut u32,
    tenant_out: &mut Option<&'static str>,
) -> Result<B> {
    let limit = gucs::max_value_size();
    let tenant = current_tenant()?;
    *tenant_out = Some(tenant);
    let len: usize = plaintext.iter().map(|p| p.len()).sum();
    if len > limit {
        return Err(EnvelopeError::TooLarge { size: len, limit });
    }
    with_backend(|b| {
        b.with_tenant_keys(tenant, |keys| {
            let dek: &mut DataKey = keys.active();
            *version = dek.version();
            let mut out = B::zeroed(pg_envelope_core::envelope_len(len));
            BACKEND_RNG.with(|r| {
                dek.encrypt_parts_into(&mut *r.borrow_mut(), tenant, context, plaintext, out.bytes_mut())
            });
            Ok(out)
        })
    })
}

thread_local! {
    /// (statement start, values decrypted in it) for `envelope.max_decrypts_per_statement`.
    static DECRYPTED_IN_STATEMENT: std::cell::Cell<(i64, i64)> = const { std::cell::Cell::new((0, 0)) };
}

/// Counts one decryption against `envelope.max_decrypts_per_statement`: refused past the cap
/// (the statement fails; rows a streaming client already received, as with COPY TO STDOUT or a
/// row-limited Execute, stay received: at most the cap's worth).
fn count_against_cap(cap: i64) -> Result<()> {
    // The count lives in this process: a parallel worker (reached through a user's PARALLEL SAFE
    // wrapper, which the planner inlines after choosing a parallel plan) would start from zero,
    // and the workers together would decrypt up to (workers + 1) x the limit. Refused there.
    // SAFETY: reads a backend global (access/parallel.h IsParallelWorker()).
    if unsafe { pg_sys::ParallelWorkerNumber } >= 0 {
        return Err(EnvelopeError::DecryptCapInParallelWorker { limit: cap });
    }
    let stmt = crate::nothrow::statement_start();
    DECRYPTED_IN_STATEMENT.with(|c| {
        let (s, n) = c.get();
        let n = if s == stmt { n + 1 } else { 1 };
        c.set((stmt, n));
        if n > cap {
            Err(EnvelopeError::DecryptCapReached { limit: cap })
        } else {
            Ok(())
        }
    })
}

/// The role of the last [`Backend::with_tenant_keys`] call (whose grant it checked), for the
/// audit's per-value fast path: every successful encryption, decryption and search term went
/// through that call just before, so this is the role the value is counted under, read
/// without a second call into PostgreSQL.
pub static KEYS_ROLE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The nonce generator, kept apart from the cache so both can be borrowed at once (a static,
/// not a thread-local: see `main_thread`).
static BACKEND_RNG: MainThread<RefCell<BackendRng>> = MainThread::new(RefCell::new(BackendRng::new()));

/// Decrypts for the current tenant into a new `B`. Every failure is the same opaque error.
/// Audited per statement when `envelope.audit` is on (src/audit.rs).
pub fn decrypt_to<B: OutBuf>(envelope: &[u8], context: Option<&[u8]>) -> Result<B> {
    let cap = gucs::MAX_DECRYPTS_PER_STATEMENT.get();
    if cap > 0 {
        if let Err(e) = count_against_cap(cap as i64) {
            if crate::audit::enabled() {
                let _ = crate::audit::note(crate::audit::Op::Decrypt, current_tenant().ok(), 0, Some(&e));
            }
            return Err(e);
        }
    }
    if !crate::audit::enabled() {
        return decrypt_inner(envelope, context, &mut 0, &mut None).and_then(accepted);
    }
    let (mut version, mut tenant) = (0, None);
    let op = crate::audit::Op::Decrypt;
    let armed = crate::audit::begin(op)?;
    // Matched at once, not kept as a `Result` and looked at again: a `Result<B>` is 80 bytes
    // (the error's size), and the success path is a few dozen instructions.
    match decrypt_inner::<B>(envelope, context, &mut version, &mut tenant) {
        Ok(mut b) => {
            match b.accept() {
                Ok(()) => {}
                Err(Refusal::Malformed) => return Err(crate::audit::finished_failure(op, tenant, version, EnvelopeError::MalformedJsonb)),
                Err(Refusal::Raised(e)) => {
                    let code = caught_sqlstate(&e);
                    let _ = crate::audit::finished_failure(op, tenant, version, EnvelopeError::Raised { code });
                    e.rethrow()
                }
            }
            if !crate::audit::finish(op, armed, tenant, version, None) {
                // Fail closed: the value's record has no room, the value is not returned.
                b.discard();
                return Err(crate::audit::no_room());
            }
            crate::audit::alerts::check_canary(envelope, tenant);
            Ok(b)
        }
        Err(e) => Err(crate::audit::finished_failure(op, tenant, version, e)),
    }
}

#[inline(always)]
fn decrypt_inner<B: OutBuf>(envelope: &[u8], context: Option<&[u8]>, version: &mut u32, tenant_out: &mut Option<&'static str>) -> Result<B> {
    let env = Envelope::parse(envelope).map_err(|_| EnvelopeError::DecryptFailed)?;
    *version = env.dek_version;
    let tenant = current_tenant()?;
    *tenant_out = Some(tenant);
    with_backend(|b| {
        b.with_tenant_keys(tenant, |keys| {
            if env.tenant_key_id != keys.tenant_key_id() {
                return Err(EnvelopeError::DecryptFailed);
            }
            let dek = match keys.version(env.dek_version) {
                Some(dek) => dek,
                None => return Err(unusable_version(tenant, keys, env.dek_version)),
            };
            let mut out = B::zeroed(env.plaintext_len());
            dek.decrypt_into(tenant, context, &env, out.bytes_mut())
                .map_err(|_| EnvelopeError::DecryptFailed)?;
            Ok(out)
        })
    })
}

/// The error for a value under a version whose key is not loaded: disabled or destroyed (clear
/// errors, for a role that holds the tenant's grant), or the opaque failure for anything else.
fn unusable_version(tenant: &str, keys: &TenantKeys, version: u32) -> EnvelopeError {
    match keys.version_state(version) {
        Some(VersionState::Disabled) => EnvelopeError::DataKeyDisabled { tenant: tenant.to_string(), version },
        Some(VersionState::Destroyed) => EnvelopeError::DataKeyDestroyed { tenant: tenant.to_string(), version },
        None => EnvelopeError::DecryptFailed,
    }
}

/// Whether a stored value is under a data key version other than its tenant's active one (read
/// from its header; the tenant comes from the header too). Key administration only.
pub fn needs_reencryption(envelope: &[u8]) -> Result<bool> {
    let env = Envelope::parse(envelope).map_err(|_| EnvelopeError::NotAnEnvelope)?;
    match with_backend(|b| b.with_tenant_keys_by_id(env.tenant_key_id, |_, keys| Ok(env.dek_version != keys.active_version()))) {
        // A shredded tenant's values can never be re-encrypted: nothing to do, and a column that
        // holds some must not stall the re-encryption of every other tenant's values.
        Err(EnvelopeError::TenantShredded { .. }) => Ok(false),
        r => r,
    }
}

/// Re-encrypts a stored value under its tenant's active data key, with the same context: the
/// tenant comes from the header, no grant is checked (key administration only) and the
/// plaintext lives only in a wiped buffer inside this call.
pub fn reencrypt_to<B: OutBuf>(envelope: &[u8], context: Option<&[u8]>) -> Result<B> {
    let env = Envelope::parse(envelope).map_err(|_| EnvelopeError::NotAnEnvelope)?;
    with_backend(|b| {
        b.with_tenant_keys_by_id(env.tenant_key_id, |tenant, keys| {
            let dek = match keys.version(env.dek_version) {
                Some(dek) => dek,
                None => return Err(unusable_version(tenant, keys, env.dek_version)),
            };
            let mut plain = zeroize::Zeroizing::new(vec![0u8; env.plaintext_len()]);
            dek.decrypt_into(tenant, context, &env, &mut plain).map_err(|_| EnvelopeError::DecryptFailed)?;
            let mut out = B::zeroed(pg_envelope_core::envelope_len(plain.len()));
            let active = keys.active();
            BACKEND_RNG.with(|r| active.encrypt_into(&mut *r.borrow_mut(), tenant, context, &plain, out.bytes_mut()));
            Ok(out)
        })
    })
}

/// Number of times this backend's nonce generator seeded itself from the OS.
pub fn rng_seed_count() -> u64 {
    BACKEND_RNG.with(|r| r.borrow().seed_count())
}
