//! The audit trail, SQL glue (sql/audit.sql has the tables; crates/core/src/audit.rs the chain).
//!
//! * Backends aggregate encryptions and decryptions **per statement** (per tenant, role and
//!   operation: a count, the key versions, failures with their SQLSTATE, the duration) and push
//!   one record per aggregate into a queue in shared memory when the statement is over (at the
//!   next statement's first key use, or at the end of the transaction, committed or not), so a
//!   rolled-back decryption is recorded. Key-management operations push one record each.
//! * The one writer is the maintenance worker (src/worker.rs): it drains the queue, assigns the
//!   gapless sequence and the hash chain, and appends to `envelope.audit_blocks` (read through the view `envelope.audit_log`) in the database
//!   named by `envelope.database`; it checkpoints the chain's head with a MAC.
//! * Fail closed: with `envelope.audit` on, a key use is refused (57P03, see [`health`]) when the queue is full or the writer has not drained it for
//!   `envelope.audit_max_delay`, unless `envelope.audit_fail_closed` is off (then a WARNING, and
//!   the loss is counted).

pub mod alerts;
mod catalog_facts;
pub mod export;
pub mod hooks;
pub mod limit;
mod stored;
pub mod trail;
pub mod writer;

pub use writer::Writer;

use std::cell::RefCell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use pg_envelope_core::audit::{Record, RecordRef};
use pgrx::prelude::*;
use pgrx::PgLwLock;

use crate::error::{EnvelopeError, Result};
use crate::gucs;

/// Records the queue holds: `envelope.audit_queue_size` (16,384 by default, ~20 MB of shared
/// memory), fixed by the postmaster when it sizes shared memory (`request_slots`: at least 4
/// slots per process the server may run, see `pg_envelope_core::ring::capacity_for`); every
/// process it starts inherits the value. The writer needs a small share of a CPU (a seventh of a core
/// at 35,000 records a second) but gets it in slices: on a machine whose cores are all busy
/// with client backends, the scheduler runs it every few tens of milliseconds, and 2,048 slots
/// filled in 60 ms at that rate (backends then waited for room: 0.83x the TPS of audit off in
/// an 8-client pgbench on 2 cores); stalls of the writer in the operating system (150-300 ms)
/// filled 8,192 (see `gucs::audit_queue_size`).
static SLOT_COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The queue's size in records (see [`SLOT_COUNT`]).
pub fn slots() -> usize {
    SLOT_COUNT.load(Ordering::Relaxed)
}
/// A record's largest canonical form: ten strings cut at 64 bytes, the tenant at 255, the
/// detail at 200, eight integers, the lengths and the format byte (1,200 bytes).
const SLOT_BYTES: usize = 1200;

/// The queue's header. The slots live in a shared-memory region of their own ([`ring`]),
/// initialised in place: pgrx builds a `PgLwLock` value on the postmaster's stack, which a
/// 10 MB array overflows in a debug build. `write` and `read` are the ring's positions, only
/// ever accessed atomically and without the lock (`pg_envelope_core::ring`: pushes reserve a
/// slot with a compare-and-swap); the other fields are under the lock.
#[derive(Clone, Copy, Default)]
#[repr(C, align(8))]
pub struct Queue {
    write: u64,
    read: u64,
    /// Records queued plus slots promised to backends that push later (`ring::Ring::claim`):
    /// a statement's aggregate claims its slot before its first value is returned.
    claimed: u64,
    /// Records that could not be queued (full queue in warn mode), since the server started.
    pub dropped: u64,
    /// How many of `dropped` the writer has recorded in the chain (a `dropped` record each).
    pub dropped_recorded: u64,
    /// When the writer last drained (µs, PostgreSQL timestamp); 0: never.
    pub drained_at: i64,
    /// The newest checkpoint this server run made (sequence; when), and when one last failed.
    pub checkpoint_seq: i64,
    pub checkpointed_at: i64,
    pub checkpoint_failed_at: i64,
    /// 5 ms waits of backends for room in a full queue (back-pressure from a slow writer).
    pub waits: u64,
    /// The chain head the writer last committed in this server run (and the table's oid): a
    /// table that ends elsewhere was changed by someone else.
    pub head_seq: i64,
    pub head_hash: [u8; 32],
    pub head_relid: u32,
    /// The writer's transaction that committed the head (a REPEATABLE READ verification asks
    /// whether that commit is in its snapshot: insider review 58).
    pub head_xid: u32,
    /// The database the writer committed in (`envelope.database`): the head says nothing about
    /// the trail of any other database.
    pub head_dboid: u32,
    /// The transaction that dropped pg_envelope in this server run, and its database (insider
    /// review 60): only a committed DROP EXTENSION makes a new trail table a new chain.
    /// The (sub)transaction's own id: a DROP inside a savepoint that was rolled back is no drop
    /// (insider review 61 dropped and rolled back to a savepoint, then swapped the trail). With
    /// the dropped extension's oid (a new installation has another).
    pub ext_drop_xid: u32,
    pub ext_drop_dboid: u32,
    pub ext_drop_extoid: u32,
    /// The trail table the dropped extension owned (the writer's last): a real drop drops it.
    pub ext_drop_relid: u32,
    /// The extension that owned the writer's table when the writer took it.
    pub head_extoid: u32,
    /// The drop of the writer's table itself (insider review 63): the dropping (sub)transaction
    /// and the extension the table was a member of at that moment. A real DROP EXTENSION drops
    /// its member tables first, in the same command; a table taken out of the extension and
    /// dropped by hand has no owner.
    pub head_table_drop_xid: u32,
    pub head_table_drop_owner: u32,
    /// Blocks of records the writer appended (committed) in this server run.
    pub blocks_direct: u64,
}

unsafe impl pgrx::shmem::PGRXSharedMemory for Queue {}
// (`read` and `write` are the lock-free ring's positions, accessed as `AtomicU64`s: see `ring`.)
const _: () = assert!(std::mem::offset_of!(Queue, read) % 8 == 0 && std::mem::offset_of!(Queue, write) % 8 == 0 && std::mem::offset_of!(Queue, claimed) % 8 == 0);

pub static QUEUE: PgLwLock<Queue> = unsafe { PgLwLock::new(c"pg_envelope_audit_queue") };

/// One slot: a canonical record. Its place in the ring's laps and when it was queued are in a
/// packed array of their own (`Meta`, at the start of the region: see `pg_envelope_core::ring`).
type Slot = pg_envelope_core::ring::Slot<SLOT_BYTES>;
type Meta = pg_envelope_core::ring::Meta;

/// The slots' headers, then the slots: the headers' size keeps the slots aligned (any count
/// of 16-byte headers that is a multiple of 4 fills whole cache lines, and `capacity_for`
/// rounds the count to one).
fn meta_bytes() -> usize {
    slots() * std::mem::size_of::<Meta>()
}
fn region() -> usize {
    meta_bytes() + slots() * std::mem::size_of::<Slot>()
}
const _: () = assert!(std::mem::size_of::<Meta>() * 4 % 64 == 0 && std::mem::size_of::<Meta>() * 4 % std::mem::align_of::<Slot>() == 0);
static SLOTS_PTR: std::sync::atomic::AtomicPtr<u8> = std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
static mut PREV_SHMEM_REQUEST: Option<unsafe extern "C-unwind" fn()> = None;
static mut PREV_OBJECT_ACCESS: pg_sys::object_access_hook_type = None;
static mut PREV_SHMEM_STARTUP: Option<unsafe extern "C-unwind" fn()> = None;

pub fn register() {
    pgrx::pg_shmem_init!(QUEUE);
    limit::register();
    unsafe {
        PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request_slots);
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(attach_slots);
        PREV_OBJECT_ACCESS = pg_sys::object_access_hook;
        pg_sys::object_access_hook = Some(note_extension_drop);
    }
}

/// Notes, in shared memory, the transaction that drops pg_envelope (see `Queue::ext_drop_xid`):
/// the writer and `audit_verify` take a trail table other than the one the writer last committed
/// to for a new chain only when that transaction committed (insider review 60 made a swapped-in
/// empty trail pass for a new installation by reshaping everything else a check could look at).
#[pg_guard]
unsafe extern "C-unwind" fn note_extension_drop(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: std::ffi::c_int,
    arg: *mut std::ffi::c_void,
) {
    unsafe {
        if let Some(prev) = PREV_OBJECT_ACCESS {
            prev(access, class_id, object_id, sub_id, arg);
        }
        // The writer's table dropped: by whose membership (read before its dependency rows go).
        if access == pg_sys::ObjectAccessType::OAT_DROP && class_id == pg_sys::RelationRelationId && sub_id == 0 {
            let (head_relid, head_dboid) = {
                let q = QUEUE.share();
                (q.head_relid, q.head_dboid)
            };
            if head_relid != 0 && head_relid == object_id.to_u32() && head_dboid == pg_sys::MyDatabaseId.to_u32() {
                let owner = pg_sys::getExtensionOfObject(pg_sys::RelationRelationId, object_id).to_u32();
                let xid = pg_sys::GetCurrentTransactionId().into_inner();
                let mut q = QUEUE.exclusive();
                q.head_table_drop_xid = xid;
                q.head_table_drop_owner = owner;
            }
        }
        if access == pg_sys::ObjectAccessType::OAT_DROP
            && class_id.to_u32() == 3079 // pg_extension
            && object_id == pg_sys::get_extension_oid(c"pg_envelope".as_ptr(), true)
        {
            // Only the extension that owns the table the writer last committed to in this
            // database: a row named pg_envelope inserted into pg_extension and dropped by real
            // DDL was noted as a drop while the real extension and its trail stayed (insider
            // review 62).
            let (head_relid, head_dboid, head_extoid, table_drop_xid, table_drop_owner) = {
                let q = QUEUE.share();
                (q.head_relid, q.head_dboid, q.head_extoid, q.head_table_drop_xid, q.head_table_drop_owner)
            };
            // A real DROP EXTENSION drops its member tables first, in this same command: the
            // writer's table was dropped by this (sub)transaction while a member of this very
            // extension, the one that owned it when the writer took it. (Review 62 dropped a
            // fake pg_extension row named pg_envelope; review 63 took the table out of the
            // extension and dropped it by hand first.)
            if head_relid != 0
                && head_dboid == pg_sys::MyDatabaseId.to_u32()
                && !(table_drop_xid == pg_sys::GetCurrentTransactionId().into_inner()
                    && table_drop_owner == object_id.to_u32()
                    && head_extoid == object_id.to_u32())
            {
                return;
            }
            // The subtransaction's own id: it counts as committed only when it and every parent
            // committed (a savepoint rolled back aborts it).
            let xid = pg_sys::GetCurrentTransactionId().into_inner();
            let mut q = QUEUE.exclusive();
            q.ext_drop_xid = xid;
            q.ext_drop_dboid = pg_sys::MyDatabaseId.to_u32();
            q.ext_drop_extoid = object_id.to_u32();
            q.ext_drop_relid = head_relid;
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn request_slots() {
    if let Some(prev) = PREV_SHMEM_REQUEST {
        prev();
    }
    // Here, not in `_PG_init`: MaxBackends is known by now (PostgreSQL 15 added this hook for
    // that), and the processes the postmaster starts inherit the value. At least 4 slots per
    // process, so that the per-backend share of claims (half the queue over MaxBackends, at
    // least 2: `claims_per_backend`) keeps every session at once below half the queue
    // (insider review 64: 512 sessions idle in their transactions held all of a 1,024-slot
    // queue and refused everyone else's key use).
    let max_backends = pg_sys::MaxBackends.max(1) as usize;
    let slots = pg_envelope_core::ring::capacity_for(gucs::audit_queue_size(), max_backends);
    if slots != gucs::audit_queue_size() {
        crate::log!(
            "pg_envelope audit: envelope.audit_queue_size {} is {slots} here (a multiple of 4, and at least 4 slots per process the server may run, {max_backends}, so that every session at once holds at most half the queue)",
            gucs::audit_queue_size()
        );
    }
    SLOT_COUNT.store(slots, Ordering::Relaxed);
    pg_sys::RequestAddinShmemSpace(region());
}

#[pg_guard]
unsafe extern "C-unwind" fn attach_slots() {
    if let Some(prev) = PREV_SHMEM_STARTUP {
        prev();
    }
    let mut found = false;
    // AddinShmemInitLock is MainLWLockArray[21] (as pgrx's own shared-memory types take it).
    let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
    pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
    let p = pg_sys::ShmemInitStruct(c"pg_envelope audit slots".as_ptr(), region(), &mut found);
    // (PostgreSQL aligns shared-memory allocations to cache lines.)
    assert!(p as usize % std::mem::align_of::<Meta>() == 0, "audit slots misaligned");
    if !found {
        // All zeros is a valid slot; then the slots are numbered for a ring at position 0 (the
        // header's positions start at 0 too: pgrx zero-initialises it in the same startup).
        std::ptr::write_bytes(p.cast::<u8>(), 0, region());
        pg_envelope_core::ring::init(std::slice::from_raw_parts(p.cast::<Meta>(), slots()));
    }
    pg_sys::LWLockRelease(init_lock);
    SLOTS_PTR.store(p.cast(), Ordering::Release);
}

/// The queue's lock taken and released without pgrx's guard, for the rare paths of a push (a
/// record counted as dropped; the push itself and the health check take no lock, see [`ring`]:
/// pgrx's guarded `share()`/`exclusive()` cost ~400 instructions a round). `LWLockAcquire` raises only past 200 locks held
/// and `LWLockRelease` only for a lock not held; these sections hold one lock and call nothing
/// that can raise (byte copies, compares, `GetCurrentTimestamp`), so no `longjmp` crosses them.
/// An error after the guard is dropped is no different from pgrx's; a Rust panic inside one
/// releases the lock in `drop`.
mod fast_lock {
    use super::*;

    mod raw {
        use super::*;
        extern "C" {
            #[link_name = "LWLockAcquire"]
            pub fn lwlock_acquire(lock: *mut pg_sys::LWLock, mode: pg_sys::LWLockMode::Type) -> bool;
            #[link_name = "LWLockRelease"]
            pub fn lwlock_release(lock: *mut pg_sys::LWLock);
            #[link_name = "GetCurrentTimestamp"]
            pub fn get_current_timestamp() -> pg_sys::TimestampTz;
        }
    }

    /// The lock and the header of [`QUEUE`], found once per process through pgrx's own guarded
    /// accessors (the tranche lookup can raise; it is done in a normal call path).
    static LOCK: std::sync::atomic::AtomicPtr<pg_sys::LWLock> = std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
    static DATA: std::sync::atomic::AtomicPtr<Queue> = std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

    fn parts() -> (*mut pg_sys::LWLock, *mut Queue) {
        let (l, d) = (LOCK.load(Ordering::Relaxed), DATA.load(Ordering::Relaxed));
        if !l.is_null() {
            return (l, d);
        }
        // SAFETY: the tranche pgrx registered for QUEUE (pg_shmem_init!), by its name.
        let l = unsafe { &raw mut (*pg_sys::GetNamedLWLockTranche(QUEUE.name().as_ptr())).lock };
        let d = {
            let g = QUEUE.share();
            (&*g as *const Queue).cast_mut()
        };
        DATA.store(d, Ordering::Relaxed);
        LOCK.store(l, Ordering::Relaxed);
        (l, d)
    }

    pub struct Guard {
        lock: *mut pg_sys::LWLock,
        data: *mut Queue,
    }

    impl Guard {
        pub fn exclusive() -> Guard {
            Self::take(pg_sys::LWLockMode::LW_EXCLUSIVE)
        }
        fn take(mode: pg_sys::LWLockMode::Type) -> Guard {
            let (lock, data) = parts();
            // SAFETY: QUEUE's lock; see the module doc for why no guard is needed.
            unsafe { raw::lwlock_acquire(lock, mode) };
            Guard { lock, data }
        }
        pub fn get_mut(&mut self) -> &mut Queue {
            // SAFETY: the header in shared memory, written under the exclusive lock.
            unsafe { &mut *self.data }
        }
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            // SAFETY: taken in `take`.
            unsafe { raw::lwlock_release(self.lock) };
        }
    }

    /// The queue's header in shared memory (found once per process).
    pub fn header() -> *mut Queue {
        parts().1
    }

    /// `GetCurrentTimestamp()` without the guard (`gettimeofday`: no error path).
    #[inline]
    pub fn now() -> pg_sys::TimestampTz {
        // SAFETY: no error path.
        unsafe { raw::get_current_timestamp() }
    }
}

/// The queue as a lock-free ring (`pg_envelope_core::ring`) over the header's positions and
/// the slots' region. Pushes reserve a slot with one compare-and-swap and publish it; the
/// writer alone peeks and consumes. (Until the fourth session of issue 13 a push took the
/// queue's exclusive lock for its copy: on a machine with more runnable processes than cores a
/// holder preempted in its copy made every pushing backend wait, and the lock's cache line
/// moved between cores twice per push.)
fn ring() -> pg_envelope_core::ring::Ring<'static, SLOT_BYTES> {
    let base = SLOTS_PTR.load(Ordering::Acquire);
    assert!(!base.is_null(), "audit slots not attached");
    let q = fast_lock::header();
    // SAFETY: the slots' region and the header live as long as the process (shared memory);
    // the positions are 8-byte aligned (asserted above) and only ever accessed atomically. The
    // region (cache-line aligned, as PostgreSQL allocates shared memory) holds `slots()` headers,
    // then as many slots (`meta_bytes` keeps the slots aligned).
    unsafe {
        pg_envelope_core::ring::Ring::new(
            pg_envelope_core::ring::Positions {
                write: AtomicU64::from_ptr(&raw mut (*q).write),
                read: AtomicU64::from_ptr(&raw mut (*q).read),
                claimed: AtomicU64::from_ptr(&raw mut (*q).claimed),
            },
            std::slice::from_raw_parts(base.cast::<Meta>(), slots()),
            std::slice::from_raw_parts(base.add(meta_bytes()).cast::<Slot>(), slots()),
        )
    }
}

fn now_ts() -> i64 {
    fast_lock::now()
}

/// Whether auditing is on (and possible: shared memory exists).
#[inline]
pub fn enabled() -> bool {
    gucs::AUDIT.get() && crate::backend::PRELOADED.load(Ordering::Relaxed)
}

/// Whether new records can be recorded now: the queue has room and the writer keeps up.
pub fn health() -> std::result::Result<(), String> {
    if crate::nothrow::recovery_in_progress() {
        return Err("this server is a hot standby: the audit trail cannot be written here (with envelope.audit_fail_closed off, records go to this server's log instead, unchained)".into());
    }
    // No lock: the ring's positions and the oldest slot's time are atomics (a shared lock per
    // statement, on top of the push, made the backends of a busy server wait for each other).
    // The oldest record's time can only read older than it is (see `oldest_pushed_at`), which
    // errs towards refusing; it is written again only after the writer consumed it, i.e. after
    // the writer made progress.
    let r = ring();
    // Full: every slot holds a record or is promised to one (a statement that used keys and
    // pushes its record when it ends).
    if r.claimed() >= slots() as u64 {
        wait_for_room();
        if r.claimed() >= slots() as u64 {
            return Err(format!("the audit queue is full ({} records waiting for the writer, or promised to statements in progress)", slots()));
        }
    }
    let oldest = r.oldest_pushed_at();
    if let Some(oldest) = oldest {
        let late = now_ts() - oldest;
        if late > gucs::audit_max_delay_s() * 1_000_000 {
            return Err(format!("the audit writer has not recorded events for {} s (the maintenance worker in envelope.database)", late / 1_000_000));
        }
    }
    Ok(())
}

/// Refuses key use while records cannot be recorded (fail closed), or warns once per statement
/// (`envelope.audit_fail_closed = off`).
pub fn check_can_record() -> Result<()> {
    let stmt = crate::nothrow::statement_start();
    // Once per statement (the check reads the queue without its lock, but the clock and the
    // fallback when it looks full cost more than this compare).
    if CHECKED.with(|c| c.replace(stmt)) == stmt {
        return Ok(());
    }
    if let Err(why) = health() {
        CHECKED.with(|c| c.set(0));
        if gucs::AUDIT_FAIL_CLOSED.get() {
            return Err(EnvelopeError::AuditUnavailable { reason: why });
        }
        WARNED.with(|w| {
            if w.replace(stmt) != stmt {
                crate::warning!("pg_envelope: key use is not being audited: {why} (envelope.audit_fail_closed is off)");
            }
        });
    }
    Ok(())
}

thread_local! {
    static WARNED: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
    static CHECKED: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
}

/// Sets the writer's latch: it drains at once rather than at its next 200 ms tick.
pub fn wake_writer() {
    let procno = crate::worker::STATUS.share().procno;
    if procno >= 0 {
        // SAFETY: a valid index into ProcGlobal->allProcs (set by the worker for itself, cleared
        // at its exit); SetLatch on another process's latch is what PostgreSQL itself does.
        unsafe { pg_sys::SetLatch(&raw mut (*(*pg_sys::ProcGlobal).allProcs.add(procno as usize)).procLatch) };
    }
}

/// Records waiting in the queue (0 without shared memory).
pub fn queued_now() -> u64 {
    if crate::backend::PRELOADED.load(Ordering::Relaxed) {
        queued()
    } else {
        0
    }
}

/// The audit settings as the worker sees them, to record their changes at a reload.
const AUDIT_SETTINGS: &[&std::ffi::CStr] = &[
    c"envelope.audit",
    c"envelope.audit_fail_closed",
    c"envelope.audit_max_delay",
    c"envelope.audit_checkpoint_interval",
    c"envelope.audit_checkpoint_provider",
];

pub fn settings_snapshot() -> Vec<String> {
    AUDIT_SETTINGS.iter().map(|n| setting(n)).collect()
}

/// A setting's current value as text ("" when unset); no error path.
fn setting(name: &std::ffi::CStr) -> String {
    crate::nothrow::config_option(name).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

/// `application_name` as the session has it now (the variable behind the setting: read per
/// statement, so no lookup by name).
fn application_name() -> String {
    let mut s = String::new();
    application_name_into(&mut s);
    s
}

/// [`application_name`] into `into` (its allocation reused).
fn application_name_into(into: &mut String) {
    into.clear();
    // SAFETY: PostgreSQL's GUC variable: NULL or a NUL-terminated string it owns.
    let p = unsafe { pg_sys::application_name };
    if !p.is_null() {
        into.push_str(&unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy());
    }
}

/// `envelope.request_id` as the application set it ("" when unset).
fn request_id() -> String {
    let mut s = String::new();
    request_id_into(&mut s);
    s
}

/// [`request_id`] into `into` (its allocation reused).
fn request_id_into(into: &mut String) {
    into.clear();
    if let Some(c) = gucs::REQUEST_ID.get() {
        into.push_str(&c.to_string_lossy());
    }
}

/// In the worker, after a reload of the configuration: what the writer remembered per hour is
/// read again (the TimeZone, the alert settings).
pub fn config_reloaded() {
    alerts::forget_hour_memo();
}

/// After a configuration reload in the worker: one `config` record per audit setting that
/// changed (turning auditing off included: that record is written before the writer stops).
pub fn record_setting_changes(before: &[String]) {
    if !crate::backend::PRELOADED.load(Ordering::Relaxed) {
        return;
    }
    let after = settings_snapshot();
    for (i, (b, a)) in before.iter().zip(after.iter()).enumerate() {
        if b != a {
            let name = AUDIT_SETTINGS[i].to_string_lossy();
            let mut r = base_record("config", String::new());
            r.operation = "setting_changed".into();
            r.detail = format!("{name}: {b} -> {a}");
            r.value_count = 1;
            r.outcome = "ok".into();
            crate::log!("pg_envelope audit: {name} changed from {b} to {a}");
            push(r);
        }
    }
}

fn queued() -> u64 {
    ring().queued()
}

/// A full queue: wake the writer and wait for room, up to one second (a burst of short
/// statements can outrun the writer's tick; it must not fail statements while the writer works).
fn wait_for_room() -> bool {
    wait_for(|| ring().claimed() < slots() as u64)
}

/// Slots this backend claimed and has not pushed yet (its statements' aggregates, its
/// transaction's key-management records). None is held after a transaction ends.
static HELD: AtomicU64 = AtomicU64::new(0);

/// Changes [`HELD`] without a locked instruction: only the backend's one thread touches it, and
/// a locked add right after a push waited for the record's stores to cold slot lines to drain
/// (56% of a push's time in an 8-client OLTP profile).
fn held_add(n: u64) {
    HELD.store(HELD.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

fn held_sub(n: u64) {
    HELD.store(HELD.load(Ordering::Relaxed).wrapping_sub(n), Ordering::Relaxed);
}

/// Claims `n` slots of the queue for records pushed later (`ring::Ring::claim`).
fn claim(n: u64) -> bool {
    let ok = ring().claim(n);
    if ok {
        held_add(n);
    }
    ok
}

/// Gives back what this backend still holds (at a transaction's end nothing should be left; a
/// session ending in the middle of an aggregate's update leaves its claim).
fn release_held() {
    let n = HELD.load(Ordering::Relaxed);
    HELD.store(0, Ordering::Relaxed);
    if n > 0 {
        ring().unclaim(n);
    }
}

/// Whether this backend has records of the current transaction to push: claims, aggregates,
/// key-management records. The transaction's end pushes them also when auditing was turned off
/// in the meantime: left behind, a later transaction pushed them with its own outcome (review
/// 43: a `create_tenant` rolled back after a reload turned auditing off was recorded `ok` by
/// the next transaction once auditing was back on).
pub fn pending() -> bool {
    HELD.load(Ordering::Relaxed) > 0
        || KEY_OPS.with(|k| k.try_borrow().map_or(true, |k| !k.is_empty()))
        || ACC.with(|a| a.try_borrow().map_or(true, |a| !a.entries.is_empty()))
}

/// Waits up to one second for `done`, waking the writer every 5 ms.
fn wait_for(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if done() {
            return true;
        }
        wake_writer();
        QUEUE.exclusive().waits += 1;
        unsafe { pg_sys::pg_usleep(5_000) };
        // Not at a transaction's end (an ERROR there would nest in the abort), and not while a
        // statement's records are being pushed: a cancel, a statement_timeout or a terminate
        // there unwound the flush and lost the records of a statement the client already had,
        // uncounted (insider review 27). A flush waits at most a second per record, then counts
        // the record as dropped; interrupts are serviced after it.
        if !AT_END.with(|e| e.get()) && !FLUSHING.with(|f| f.get()) {
            pgrx::check_for_interrupts!();
        }
    }
    done()
}

/// Pushes one record, waking the writer when the queue fills up. A full queue (after waiting for
/// room) counts the record as dropped and says so in the log.
pub fn push(r: Record) {
    push_ref(r.as_ref(), false, false);
}

/// [`push`] from an error callback (`emit_log_hook`): no waiting for room, no interrupt check,
/// no log line (none of them is allowed while an error is being reported).
pub fn push_in_error_path(r: Record) {
    push_ref(r.as_ref(), true, false);
}

thread_local! {
    /// The encoding buffer, reused (a push from the error path while it is in use gets its own).
    static ENCODED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// `claimed`: the record uses a slot this backend claimed earlier (it has one for sure);
/// otherwise it claims one now.
fn push_ref(r: RecordRef<'_>, error_path: bool, claimed: bool) {
    let r = r.truncated(64, 200);
    if crate::nothrow::recovery_in_progress() {
        // A hot standby cannot write the trail: the record goes to its server log (unchained),
        // which is what envelope.audit_fail_closed = off means there (see health()).
        if !error_path {
            crate::log!("pg_envelope audit (standby, not chained): {}", record_json(&r.to_record()));
        }
        if claimed {
            release_one();
        }
        return;
    }
    ENCODED.with(|buf| match buf.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            r.canonical_into(&mut buf);
            push_bytes(&buf, error_path, claimed);
        }
        Err(_) => {
            let mut own = Vec::with_capacity(256);
            r.canonical_into(&mut own);
            push_bytes(&own, error_path, claimed);
        }
    });
}

/// Set in the maintenance worker: the queue's only reader never waits for room in it.
static IS_WRITER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn this_process_is_the_writer() {
    IS_WRITER.store(true, Ordering::Relaxed);
}

fn release_one() {
    if HELD.load(Ordering::Relaxed) > 0 {
        held_sub(1);
        ring().unclaim(1);
    }
}

fn push_bytes(bytes: &[u8], error_path: bool, claimed: bool) {
    // The writer's own pushes (a reload's setting changes) find room or are counted as dropped:
    // waiting for room, it would wait for itself.
    let no_wait = error_path || IS_WRITER.load(Ordering::Relaxed);
    let dropped = || {
        fast_lock::Guard::exclusive().get_mut().dropped += 1;
        if !error_path {
            crate::log!("pg_envelope: an audit record was dropped (queue full); status()->'audit'->'dropped' counts them");
        }
    };
    // A record without a claim claims its slot now (waiting for room, up to a second, unless it
    // may not wait); one that finds none is counted as dropped.
    if !claimed && !(claim(1) || (!no_wait && wait_for(|| claim(1)))) {
        dropped();
        return;
    }
    // No lock: one compare-and-swap reserves the slot (see `ring`). A claimed slot is always
    // free; `Full` would mean a claim was lost (counted, never silent).
    match ring().push(bytes, now_ts()) {
        Ok(n) => {
            held_sub(1);
            if n >= slots() as u64 / 4 {
                wake_writer();
            }
        }
        Err(_) => {
            release_one();
            dropped();
        }
    }
}

/// A record as one JSON object (the standby's log lines).
fn record_json(r: &Record) -> String {
    serde_json::json!({
        "at_us": r.at_us, "kind": r.kind, "database": r.database, "session_user": r.session_user,
        "current_role": r.current_role, "client_addr": r.client_addr, "application_name": r.application_name,
        "backend_pid": r.backend_pid, "statement_id": r.statement_id, "request_id": r.request_id, "tenant": r.tenant,
        "key_versions": r.key_versions, "operation": r.operation, "value_count": r.value_count,
        "failure_count": r.failure_count, "outcome": r.outcome, "duration_us": r.duration_us, "detail": r.detail,
    })
    .to_string()
}

/// Up to `max` queued records, oldest first, without removing them; with the position after them.
///
/// Only the positions are read under the queue's lock; the records are parsed after it is
/// released (parsing 2,000 of them under it kept every pushing backend waiting for a
/// millisecond or two per batch). That is safe because the slots from `read` to `write` are
/// never written while they are queued: a push writes at `write` and only when the queue is not
/// full, and `read` moves only when this process (the one reader) calls [`consumed`]; the
/// lock's acquire orders the reads after the pushes that the positions count.
///
/// The records are parsed in place into `batch[..n]` (its records, and their strings'
/// allocations, kept from batch to batch: see `Record::read_canonical`; nothing is moved). Returns
/// `n`, the position after the last record taken, and how many were unreadable.
pub fn peek_into(max: usize, batch: &mut Vec<Record>) -> (usize, u64, u64) {
    let r = ring();
    let mut n = 0;
    let mut bad = 0;
    // SAFETY: the writer process is the ring's only reader.
    let upto = unsafe {
        r.peek(max, |bytes| {
            if n == batch.len() {
                batch.push(Record::default());
            }
            if batch[n].read_canonical(bytes) {
                n += 1;
            } else {
                bad += 1;
            }
        })
    };
    (n, upto, bad)
}

/// After the records up to `upto` are committed: free their slots.
pub fn consumed(upto: u64) {
    // SAFETY: the writer process is the ring's only reader; `upto` came from its `peek`.
    unsafe { ring().consume(upto) };
    QUEUE.exclusive().drained_at = now_ts();
}

// ---------------------------------------------------------------------------------------------
// Per-statement aggregation in the backend.

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Encrypt,
    Decrypt,
    /// Blind-index terms made (envelope.blind_index: a use of the tenant's index key).
    Search,
}

const MAX_ENTRIES: usize = 16;

struct Entry {
    op: Op,
    tenant: String,
    role: pg_sys::Oid,
    role_name: String,
    application_name: String,
    request_id: String,
    versions: Vec<u32>,
    count: i64,
    failures: i64,
    failure_code: Option<String>,
    /// Whether the tenant exists (as far as this backend's tenant directory knows; a name that
    /// is no tenant is summarised as `*` past the failure limit, see [`limit`]).
    tenant_exists: bool,
    /// Whether the entry holds a claimed slot of the queue for its record (taken with its first
    /// success: no value is returned before its record is sure to find room).
    claimed: bool,
    /// When the first value was handled (PostgreSQL timestamp), and the coarse monotonic clock
    /// then and at the last value (a precise clock per value costs more than the rest).
    first_ts: i64,
    first: std::time::Instant,
    last: std::time::Instant,
}

#[derive(Default)]
struct Acc {
    stmt: i64,
    entries: Vec<Entry>,
    /// Flushed entries kept for their allocations (a statement's entry is four strings and a
    /// vector: allocating and freeing them was a fifth of the audit's cost per statement).
    spare: Vec<Entry>,
    /// The flushed record's key versions, formatted ("1,3"), reused.
    versions: String,
}

/// At most this many flushed entries are kept for reuse.
const SPARE_ENTRIES: usize = 8;

thread_local! {
    static ACC: RefCell<Acc> = RefCell::new(Acc::default());
    /// The backend's statement counter: (the statement start it was last given for, its id).
    static STATEMENT_ID: std::cell::Cell<(i64, i64)> = const { std::cell::Cell::new((0, 0)) };
}

/// The 5-character SQLSTATE of an error.
fn sqlstate(e: &EnvelopeError) -> String {
    let code = e.code() as i32;
    (0..5).map(|i| (((code >> (6 * i)) & 0x3F) as u8 + b'0') as char).collect()
}

// ---------------------------------------------------------------------------------------------
// The per-value fast path.
//
// A statement's first value goes the slow way (the health check, an aggregate entry with the
// names, the clock). Once it succeeded, the path is armed for that statement, operation, role,
// tenant and key version, and each further value like it only bumps `HOT_PENDING`: no
// thread-local, no `RefCell`, no clock read (the aggregate's last-value time is the key cache's
// last clock reading, taken for the TTL check anyway). The pending count is folded into the
// entry before anything else reads or changes the aggregate: the next slow note (another
// tenant, role, version, or a failure) and the flush. Process statics, not thread-locals: a
// backend runs SQL functions on one thread (pgrx refuses others), and a thread-local in a
// `dlopen`ed library costs a `__tls_get_addr` call per access.

use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicUsize};

/// The statement the fast path is armed for, at the index of its operation (`op_code`;
/// [`DISARMED`] at every other index, and at all of them when disarmed): one load and compare
/// per value, the operation being a constant at each call site. Armed only after the
/// statement's `check_can_record` passed, so it also stands for that check.
static HOT_STMT: [AtomicI64; 4] = [const { AtomicI64::new(DISARMED) }; 4];
/// No statement's start time (`DT_NOBEGIN`, which `GetCurrentStatementStartTimestamp` never
/// returns; 0, a process's value before its first statement, would have been one: review 66).
const DISARMED: i64 = i64::MIN;
static HOT_ROLE: AtomicU32 = AtomicU32::new(0);
static HOT_VERSION: AtomicU32 = AtomicU32::new(0);
/// The entry's own copy of the tenant name (its `String`'s buffer, alive until the flush, which
/// disarms first): compared by content, since the setting's string can be freed and another
/// tenant's name allocated at the same address within a statement (`set_config` per row).
static HOT_TENANT: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static HOT_TENANT_LEN: AtomicUsize = AtomicUsize::new(usize::MAX);
static HOT_ENTRY: AtomicUsize = AtomicUsize::new(0);
/// Values counted by the fast path and not yet folded into entry `HOT_ENTRY`. A plain cell, not
/// an atomic: only the backend's one thread touches it, and an atomic add is a locked
/// read-modify-write on every value.
static HOT_PENDING: Pending = Pending(std::cell::UnsafeCell::new(0));

struct Pending(std::cell::UnsafeCell<i64>);
// SAFETY: read and written only on the backend's thread: the SQL functions that count values
// (pgrx's thread check refuses any other) and the flush they and the backend's hooks call.
unsafe impl Sync for Pending {}
impl Pending {
    #[inline]
    fn bump(&self) {
        // SAFETY: see the `Sync` impl: no other thread, and no reference is held across calls.
        unsafe { *self.0.get() += 1 }
    }
    fn take(&self) -> i64 {
        // SAFETY: as for `bump`.
        unsafe { std::mem::take(&mut *self.0.get()) }
    }
}

fn op_code(op: Op) -> u8 {
    match op {
        Op::Encrypt => 1,
        Op::Decrypt => 2,
        Op::Search => 3,
    }
}

/// Before a key use: whether the per-value fast path is armed for this statement and operation
/// (`Ok(true)`: the statement's check passed already); otherwise the fail-closed check, whose
/// refusal is noted (recorded once the writer is back: nothing is silently lost) and returned.
#[inline(always)]
pub fn begin(op: Op) -> Result<bool> {
    if fast_armed(op) {
        return Ok(true);
    }
    begin_slow(op)?;
    Ok(false)
}

#[inline(never)]
fn begin_slow(op: Op) -> Result<()> {
    check_can_record().inspect_err(|e| {
        note(op, crate::backend::current_tenant().ok(), 0, Some(e));
    })
}

/// After a key use begun with [`begin`]: counted on the fast path when it is like the armed one,
/// else noted (a failure with its error). False: a success whose record found no room in the
/// queue (fail closed): the caller must not return the value, but [`no_room`].
#[inline(always)]
#[must_use]
pub fn finish(op: Op, armed: bool, tenant: Option<&str>, version: u32, err: Option<&EnvelopeError>) -> bool {
    (armed && err.is_none() && note_fast(tenant, version)) || finish_slow(op, tenant, version, err)
}

/// [`finish`] for a key use that failed with `err`: the error to return (`err`, or
/// [`no_room`] when its record found no room).
#[cold]
#[inline(never)]
pub fn finished_failure(op: Op, tenant: Option<&str>, version: u32, err: EnvelopeError) -> EnvelopeError {
    if finish_slow(op, tenant, version, Some(&err)) {
        err
    } else {
        no_room()
    }
}

/// The error of a key use whose record found no room (see [`finish`]).
pub fn no_room() -> EnvelopeError {
    EnvelopeError::AuditUnavailable { reason: format!("the audit queue has no room for this statement's record ({} records waiting for the writer, or promised to statements in progress)", slots()) }
}

#[inline(never)]
fn finish_slow(op: Op, tenant: Option<&str>, version: u32, err: Option<&EnvelopeError>) -> bool {
    let current;
    let tenant = match tenant {
        Some(t) => Some(t),
        None => {
            current = crate::backend::current_tenant().ok();
            current
        }
    };
    note(op, tenant, version, err)
}

/// Whether the fast path is armed for this statement and operation: then the statement's
/// `check_can_record` has passed and need not run again.
#[inline]
pub fn fast_armed(op: Op) -> bool {
    let stmt = crate::nothrow::statement_start();
    HOT_STMT[op_code(op) as usize].load(Ordering::Relaxed) == stmt
}

/// After a successful key use on an armed path: counts it and returns true when it is like the
/// armed one (same role, tenant and version); false leaves it to [`note`].
#[inline]
pub fn note_fast(tenant: Option<&str>, version: u32) -> bool {
    let Some(tenant) = tenant else { return false };
    if HOT_VERSION.load(Ordering::Relaxed) != version
        // The role whose grant the key use just checked (with_tenant_keys), not a second call.
        || HOT_ROLE.load(Ordering::Relaxed) != crate::backend::KEYS_ROLE.load(Ordering::Relaxed)
        || HOT_TENANT_LEN.load(Ordering::Relaxed) != tenant.len()
    {
        return false;
    }
    let p = HOT_TENANT.load(Ordering::Relaxed);
    debug_assert!(!p.is_null());
    // SAFETY: the length matched, so the path is armed (`disarm` sets HOT_TENANT_LEN to
    // usize::MAX, which no name's length equals: this holds even when the key use in between
    // disarmed it, e.g. a cache reload whose queries flushed): `p` is the buffer of the armed
    // entry's tenant `String` (HOT_TENANT_LEN bytes), which lives until the flush; the flush
    // disarms before it drops the entries.
    if !pg_envelope_core::audit::same_bytes(unsafe { std::slice::from_raw_parts(p, tenant.len()) }, tenant.as_bytes()) {
        return false;
    }
    HOT_PENDING.bump();
    true
}

fn disarm() {
    for s in &HOT_STMT {
        s.store(DISARMED, Ordering::Relaxed);
    }
    HOT_TENANT.store(std::ptr::null_mut(), Ordering::Relaxed);
    HOT_TENANT_LEN.store(usize::MAX, Ordering::Relaxed);
}

/// Folds the fast path's pending count into its entry.
fn fold(a: &mut Acc) {
    let n = HOT_PENDING.take();
    if n > 0 {
        if let Some(e) = a.entries.get_mut(HOT_ENTRY.load(Ordering::Relaxed)) {
            e.count += n;
            e.last = crate::backend::last_cache_now();
        }
    }
}

/// Notes one encryption or decryption (or its failure) of the current statement. A success is
/// counted only once its aggregate holds a claimed slot for the record (review 42: the
/// statement's check passed at its first value, but the record, pushed when the statement
/// ends, could then find the queue full and be lost, counted). False: no slot could be claimed
/// within a second and auditing fails closed; the value is counted as failed (57P03) and must
/// not be returned.
pub fn note(op: Op, tenant: Option<&str>, version: u32, err: Option<&EnvelopeError>) -> bool {
    let stmt = crate::nothrow::statement_start();
    let role = crate::nothrow::current_user_id();
    let now = crate::backend::cache_now();
    // Whether a failure's tenant exists, looked up (once per name and backend: the tenant
    // directory caches it) before the aggregate is borrowed: a value that fails before its
    // tenant is looked up (a truncated or forged envelope) must keep a real tenant's name past
    // the per-statement cap and the failure limit (insider review 29). A success's tenant exists.
    let exists = match (err, tenant) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(_), Some(t)) => t.is_empty() || crate::backend::tenant_exists(t),
    };
    // Set when a success found no slot to claim: (entry, whether 57P03 is the entry's code
    // because of it).
    let mut no_room = None;
    ACC.with(|a| {
        let Ok(mut a) = a.try_borrow_mut() else { return };
        fold(&mut a);
        disarm();
        if a.stmt != stmt {
            flush_acc(&mut a);
            a.stmt = stmt;
        }
        let tenant = tenant.unwrap_or("");
        // The common case: the same operation, role and tenant as the statement's first entry.
        let hit = match a.entries.first() {
            Some(e) if e.op == op && e.role == role && e.tenant == tenant => Some(0),
            _ => a.entries.iter().position(|e| e.op == op && e.role == role && e.tenant == tenant),
        };
        // At most MAX_ENTRIES aggregates per statement for failures under names that are no
        // tenant: past that (a statement that tries one made-up tenant per value to flood the
        // queue), further ones share one entry, tenant "*". A success, or a failure under a
        // tenant that exists, always keeps its tenant (their number is bounded by the tenants
        // there are): sixteen cheap failures under made-up names must not hide a real tenant's
        // decryptions (insider review 27) or probes (review 29) as "*".
        let (hit, tenant) = match hit {
            None if err.is_some() && !exists && a.entries.len() >= MAX_ENTRIES => {
                (a.entries.iter().position(|e| e.op == op && e.role == role && e.tenant == "*"), "*")
            }
            h => (h, tenant),
        };
        // A success needing a claim (a new aggregate, or the first success of one that so far
        // only failed) while this backend holds its share of claims (a statement that went
        // through many tenants or roles): the statement's aggregates so far are pushed now, as
        // a part of it, into the slots they claimed, and it goes on with new ones (review 43:
        // the share was first checked only for new aggregates, and one role held the whole
        // queue through aggregates that had failed first).
        let needs_claim = err.is_none() && hit.is_none_or(|i| !a.entries[i].claimed);
        let hit = if needs_claim && HELD.load(Ordering::Relaxed) >= claims_per_backend() {
            flush_acc(&mut a);
            None
        } else {
            hit
        };
        let idx = match hit {
            Some(i) => i,
            None => new_entry(&mut a, op, tenant, role, exists, now),
        };
        let e = &mut a.entries[idx];
        e.count += 1;
        e.last = now;
        if version != 0 && !e.versions.contains(&version) {
            e.versions.push(version);
        }
        if let Some(err) = err {
            e.failures += 1;
            if e.failure_code.is_none() {
                e.failure_code = Some(sqlstate(err));
            }
        } else {
            // The record's slot, claimed with the entry's first success (a hot standby claims
            // nothing: its records go to its log, see push_ref).
            if !e.claimed && !crate::nothrow::recovery_in_progress() {
                if claim(1) {
                    e.claimed = true;
                } else {
                    // No room: counted as a refusal until a slot is claimed (settle_no_room).
                    e.failures += 1;
                    let set_code = e.failure_code.is_none();
                    if set_code {
                        e.failure_code = Some("57P03".into());
                    }
                    no_room = Some((idx, set_code));
                    return;
                }
            }
            if e.tenant != "*" && !e.tenant.is_empty() {
                // A success under a named tenant: the statement's next values like this one take
                // the fast path (the caller passed check_can_record for this statement).
                HOT_ROLE.store(role.to_u32(), Ordering::Relaxed);
                HOT_VERSION.store(version, Ordering::Relaxed);
                HOT_TENANT.store(e.tenant.as_ptr().cast_mut(), Ordering::Relaxed);
                HOT_TENANT_LEN.store(e.tenant.len(), Ordering::Relaxed);
                HOT_ENTRY.store(idx, Ordering::Relaxed);
                // Disarmed above (`disarm`): only this operation's index is set.
                HOT_STMT[op_code(op) as usize].store(stmt, Ordering::Relaxed);
            }
        }
    });
    match no_room {
        None => true,
        Some((idx, set_code)) => settle_no_room(idx, set_code),
    }
}

/// Most claims a backend holds for its current statement's aggregates before it pushes them (a
/// part of the statement, same statement id) and goes on with new ones: half the queue shared
/// by every process the server may run (`MaxBackends`: 33 with the default 100 connections; at
/// least 2, at most 256). Each aggregate holds its slot until it is pushed: a statement going
/// through thousands of tenants (a role granted them all, the tenant set per row), left idle in
/// its transaction or kept running, would otherwise hold a slot per tenant, and a few such
/// sessions could claim the whole queue and refuse every other session's key use. Bounded so,
/// every session at once holds at most half the queue; the other half is only ever taken by
/// records the writer drains.
fn claims_per_backend() -> u64 {
    // SAFETY: a global PostgreSQL sets once at startup, before any backend runs SQL.
    let backends = unsafe { pg_sys::MaxBackends }.max(1) as u64;
    (slots() as u64 / 2 / backends).clamp(2, 256)
}

/// A new aggregate of the current statement; its index.
fn new_entry(a: &mut Acc, op: Op, tenant: &str, role: pg_sys::Oid, exists: bool, now: std::time::Instant) -> usize {
    // Names are resolved now, not at the flush: that may run in an aborted transaction, where
    // the catalog cannot be read.
    prime_session();
    let mut e = a.spare.pop().unwrap_or_else(|| Entry {
        op,
        tenant: String::new(),
        role,
        role_name: String::new(),
        application_name: String::new(),
        request_id: String::new(),
        versions: Vec::new(),
        count: 0,
        failures: 0,
        failure_code: None,
        tenant_exists: false,
        claimed: false,
        first_ts: 0,
        first: now,
        last: now,
    });
    e.op = op;
    e.tenant.clear();
    e.tenant.push_str(tenant);
    e.role = role;
    crate::backend::role_name_into(role, &mut e.role_name);
    // As they are when the keys are used, not when the record is flushed (a later SET LOCAL
    // in the same transaction must not relabel it).
    application_name_into(&mut e.application_name);
    request_id_into(&mut e.request_id);
    e.versions.clear();
    e.count = 0;
    e.failures = 0;
    e.failure_code = None;
    e.tenant_exists = exists && tenant != "*";
    e.claimed = false;
    e.first_ts = now_ts();
    e.first = now;
    e.last = now;
    a.entries.push(e);
    a.entries.len() - 1
}

/// A success whose aggregate found no slot to claim: waits for room (up to a second,
/// interruptibly: no borrow is held here), then counts the value as the success it is, or
/// leaves it counted as refused (57P03, fail closed) and returns false.
#[cold]
fn settle_no_room(idx: usize, set_code: bool) -> bool {
    let got = wait_for(|| claim(1));
    let fail_closed = gucs::AUDIT_FAIL_CLOSED.get();
    let mut kept = false;
    ACC.with(|a| {
        if let Ok(mut a) = a.try_borrow_mut() {
            if let Some(e) = a.entries.get_mut(idx) {
                if got || !fail_closed {
                    e.failures -= 1;
                    if set_code {
                        e.failure_code = None;
                    }
                }
                e.claimed |= got;
                kept = got;
            }
        }
    });
    if got && !kept {
        release_one();
    }
    if got {
        return true;
    }
    if fail_closed {
        return false;
    }
    let stmt = crate::nothrow::statement_start();
    WARNED.with(|w| {
        if w.replace(stmt) != stmt {
            crate::warning!("pg_envelope: key use is not being audited: the audit queue is full (envelope.audit_fail_closed is off)");
        }
    });
    true
}

/// The id of the statement that started at `stmt` (its start timestamp): the backend's
/// statement counter moves once per statement that is recorded, whichever of its records asks
/// first (review 44: the counter moved only when an aggregate was pushed, so a key operation
/// and the next statement's decryption, in one transaction, shared an id).
fn statement_id_for(stmt: i64) -> i64 {
    STATEMENT_ID.with(|c| {
        let (at, id) = c.get();
        if id != 0 && at == stmt {
            id
        } else {
            c.set((stmt, id + 1));
            id + 1
        }
    })
}

/// Before a key-management record of the current statement takes its id: the aggregates of an
/// earlier statement still held (pushed otherwise at the next key use or the transaction's end)
/// are pushed first, so statement ids follow the statements' order.
fn flush_earlier_statement() {
    let stmt = crate::nothrow::statement_start();
    ACC.with(|a| {
        if let Ok(mut a) = a.try_borrow_mut() {
            if a.stmt != stmt && !a.entries.is_empty() {
                flush_acc(&mut a);
                a.stmt = stmt;
            }
        }
    });
}

/// Pushes what the current statement did (at transaction end, before a new statement, and in
/// parts while it runs, see [`claims_per_backend`]).
fn flush_acc(a: &mut Acc) {
    fold(a);
    disarm();
    if a.entries.is_empty() {
        return;
    }
    // No interrupt is serviced until every entry is pushed or counted as dropped (see
    // wait_for_room).
    struct Flushing(bool);
    impl Drop for Flushing {
        fn drop(&mut self) {
            FLUSHING.with(|f| f.set(self.0));
        }
    }
    let _flushing = Flushing(FLUSHING.with(|f| f.replace(true)));
    // A statement's parts share its id (see `statement_id_for`).
    let statement_id = statement_id_for(a.stmt);
    // Encoded from borrowed fields (no owned Record: its dozen Strings were a third of the
    // audit's cost per statement).
    let session = session();
    let (database, session_user, client_addr) = session.as_deref().map(|(d, u, c)| (d.as_str(), u.as_str(), c.as_str())).unwrap_or_default();
    let mut entries = std::mem::take(&mut a.entries);
    let mut versions = std::mem::take(&mut a.versions);
    for e in entries.iter_mut() {
        if e.count > 0 && e.failures == e.count && !limit::allowed(e.role) {
            limit::hold(&limit::Failure {
                op: op_code(e.op),
                database,
                login: session_user,
                role: &e.role_name,
                outcome: e.failure_code.as_deref().unwrap_or(""),
                tenant: &e.tenant,
                tenant_exists: e.tenant_exists,
                values: e.count,
            });
            continue;
        }
        e.versions.sort_unstable();
        versions.clear();
        for (i, v) in e.versions.iter().enumerate() {
            if i > 0 {
                versions.push(',');
            }
            push_decimal(&mut versions, *v);
        }
        let partial;
        let outcome = match (&e.failure_code, e.failures == e.count) {
            (None, _) => "ok",
            (Some(c), true) => c.as_str(),
            (Some(c), false) => {
                partial = format!("partial:{c}");
                partial.as_str()
            }
        };
        let kind = match e.op {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Search => "search",
        };
        push_ref(
            RecordRef {
                seq: 0,
                at_us: pg_to_unix_us(e.first_ts),
                kind,
                database,
                session_user,
                current_role: &e.role_name,
                client_addr,
                application_name: &e.application_name,
                backend_pid: unsafe { pg_sys::MyProcPid } as i64,
                statement_id,
                request_id: &e.request_id,
                tenant: &e.tenant,
                key_versions: &versions,
                operation: kind,
                value_count: e.count,
                failure_count: e.failures,
                outcome,
                duration_us: e.last.saturating_duration_since(e.first).as_micros() as i64,
                detail: "",
            },
            false,
            std::mem::take(&mut e.claimed),
        );
    }
    // The entries' allocations are kept for the next statement's (a few: one statement's many
    // tenants or roles must not keep their names for the backend's life).
    let keep = SPARE_ENTRIES.saturating_sub(a.spare.len());
    a.spare.extend(entries.drain(..).take(keep));
    entries.clear();
    a.entries = entries;
    a.versions = versions;
    flush_failure_summaries();
}

/// Appends `v` in decimal (what `write!("{v}")` gives, without the formatting machinery: once
/// per audit record).
fn push_decimal(out: &mut String, mut v: u32) {
    let mut buf = [0u8; 10];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    // ASCII digits only.
    out.push_str(std::str::from_utf8(&buf[i..]).unwrap_or_default());
}

/// On a hot standby (no writer): the failure summaries that are due, into this backend's server
/// log. On a primary the writer takes them (see [`limit`]).
pub fn flush_failure_summaries() {
    if crate::nothrow::recovery_in_progress() {
        let (records, taken, overflow) = limit::take_due();
        for r in records {
            push(r);
        }
        limit::release(&taken, overflow, true);
    }
}

thread_local! {
    /// Key-management records of the current transaction, pushed at its end with its outcome,
    /// each with the subtransaction that made it (a `ROLLBACK TO SAVEPOINT` over it marks it
    /// rolled back: the transaction's commit does not make it happen).
    static KEY_OPS: RefCell<Vec<(Record, pg_sys::SubTransactionId)>> = const { RefCell::new(Vec::new()) };
}

/// How many of `KEY_OPS` have a claimed slot (claimed at PRE_COMMIT).
static KEY_OPS_CLAIMED: KeyOpsClaimed = KeyOpsClaimed(std::cell::Cell::new(0));
struct KeyOpsClaimed(std::cell::Cell<u64>);
// SAFETY: touched only on the backend's one thread (transaction callbacks).
unsafe impl Sync for KeyOpsClaimed {}
impl KeyOpsClaimed {
    fn get(&self) -> u64 {
        self.0.get()
    }
    fn set(&self, n: u64) {
        self.0.set(n)
    }
}

/// Before the transaction commits, the queue must have room for all of its key-management
/// records (pushed in the commit callback, where nothing can fail any more and interrupts are
/// held: a batch re-wrapping hundreds of tenant keys against a nearly full queue committed with
/// most of its records counted as dropped, and its COMMIT sat for a second per record,
/// deaf to cancel and terminate: review 42). At PRE_COMMIT the transaction can still abort:
/// it waits for room (up to a second, interruptibly), then fails closed with 57P03 (or warns,
/// with `envelope.audit_fail_closed` off). Registered once per transaction.
fn room_for_key_ops_at_pre_commit() {
    thread_local! { static ARMED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) }; }
    if ARMED.with(|a| a.replace(true)) {
        return;
    }
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::PreCommit, || {
        ARMED.with(|a| a.set(false));
        let wanted = (KEY_OPS.with(|k| k.borrow().len()) as u64).saturating_sub(KEY_OPS_CLAIMED.get());
        if wanted == 0 || !enabled() || crate::nothrow::recovery_in_progress() {
            return;
        }
        // Claimed, not just seen free: other backends' records cannot take the room between
        // this check and the commit callback's pushes (review 42's residual).
        // More than half the queue is refused outright (review 44: up to all 8,192 slots could
        // be claimed by one transaction, refusing every other session's key use meanwhile).
        // The wait services interrupts (at PRE_COMMIT the transaction can still abort).
        if wanted <= slots() as u64 / 2 && wait_for(|| claim(wanted)) {
            KEY_OPS_CLAIMED.set(KEY_OPS_CLAIMED.get() + wanted);
            return;
        }
        let mut why = format!("the audit queue has no room for this transaction's {wanted} key-management record(s)");
        if wanted > slots() as u64 / 2 {
            why.push_str(&format!("; a transaction can record at most about {} key-management operations: split it", slots() / 2));
        }
        if gucs::AUDIT_FAIL_CLOSED.get() {
            EnvelopeError::AuditUnavailable { reason: why }.raise();
        }
        crate::warning!("pg_envelope: key use is not being audited: {why} (envelope.audit_fail_closed is off)");
    });
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, || ARMED.with(|a| a.set(false)));
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Abort, || ARMED.with(|a| a.set(false)));
}

/// `ROLLBACK TO SAVEPOINT` (or a PL/pgSQL exception block) undid subtransaction `sub` and every
/// subtransaction inside it: their key operations did not happen, whatever the transaction
/// does next. (Subtransaction ids grow within a transaction, and a subtransaction that began
/// after `sub` while `sub` was open is inside it.)
pub fn at_subtransaction_abort(sub: pg_sys::SubTransactionId) {
    KEY_OPS.with(|k| {
        if let Ok(mut ops) = k.try_borrow_mut() {
            for (r, made_in) in ops.iter_mut() {
                if *made_in >= sub {
                    r.outcome = "rolled back".into();
                }
            }
        }
    });
}

/// Records a key-management operation: one record, pushed when the transaction ends (outcome
/// `ok` at commit, `rolled back` at abort). `immediate`: for non-transactional operations
/// (lockdown), pushed now with outcome `ok`.
pub fn key_op(operation: &str, tenant: &str, detail: &str, immediate: bool) {
    if !enabled() {
        return;
    }
    // Fail closed for key management too (a lockdown and its lifting excepted: an emergency
    // measure must work while the trail is down; they are recorded once it is back). And no
    // PREPARE TRANSACTION: the record's outcome would be decided later, out of our sight.
    if !matches!(operation, "lockdown" | "lift_lockdown") {
        if let Err(e) = check_can_record() {
            e.raise();
        }
        crate::backend::refuse_prepare();
    }
    prime_session();
    let mut r = base_record("key_op", crate::backend::role_name(crate::nothrow::current_user_id()));
    r.operation = operation.to_string();
    r.tenant = tenant.to_string();
    r.detail = detail.to_string();
    r.value_count = 1;
    flush_earlier_statement();
    r.statement_id = statement_id_for(crate::nothrow::statement_start());
    if immediate {
        r.outcome = "ok".into();
        push(r);
    } else {
        // SAFETY: no error path (reads the current transaction state).
        let sub = unsafe { pg_sys::GetCurrentSubTransactionId() };
        KEY_OPS.with(|k| k.borrow_mut().push((r, sub)));
        room_for_key_ops_at_pre_commit();
    }
}

/// Records a key-management call that failed with `err` (refused: not a key administrator, a
/// suspended tenant, a bad argument...), at once: the transaction is about to abort.
pub fn refused(operation: &str, tenant: &str, err: &EnvelopeError) {
    if !enabled() {
        return;
    }
    prime_session();
    let mut r = base_record("key_op", crate::backend::role_name(crate::nothrow::current_user_id()));
    r.operation = operation.to_string();
    r.tenant = tenant.to_string();
    r.value_count = 1;
    r.failure_count = 1;
    r.outcome = sqlstate(err);
    flush_earlier_statement();
    r.statement_id = statement_id_for(crate::nothrow::statement_start());
    push(r);
}

/// At transaction end: the statement's aggregates, then the key operations with the outcome.
pub fn at_transaction_end(committed: bool) {
    AT_END.with(|e| e.set(true));
    let flushed = ACC.with(|a| match a.try_borrow_mut() {
        Ok(mut a) => {
            flush_acc(&mut a);
            true
        }
        Err(_) => false,
    });
    if !flushed {
        // Only a FATAL raised while the aggregate was being updated (proc_exit runs this from
        // inside that frame): the statement's records cannot be read here. Counted and said,
        // never silent.
        {
            let mut g = fast_lock::Guard::exclusive();
            g.get_mut().dropped += 1;
        }
        crate::log!("pg_envelope: the audit records of the current statement could not be written (the session ended while they were being updated); status()->'audit'->'dropped' counts them");
    }
    // On a standby, failure summaries held back by the limit, once their second has passed.
    flush_failure_summaries();
    let ops: Vec<(Record, pg_sys::SubTransactionId)> = KEY_OPS.with(|k| k.borrow_mut().drain(..).collect());
    for (mut r, _) in ops {
        if r.outcome.is_empty() {
            r.outcome = if committed { "ok".into() } else { "rolled back".into() };
        }
        let claimed = KEY_OPS_CLAIMED.get() > 0;
        if claimed {
            KEY_OPS_CLAIMED.set(KEY_OPS_CLAIMED.get() - 1);
        }
        // What was rolled back changed nothing: without a claimed slot its records find room
        // or are counted as dropped, without waiting (a transaction refused at PRE_COMMIT for
        // want of room would otherwise wait a second per record here, interrupts held).
        push_ref(r.as_ref(), !committed && !claimed, claimed);
    }
    KEY_OPS_CLAIMED.set(0);
    // With auditing off the writer drains only at its naptime: what this transaction pushed would
    // wait there (lost at a restart), and, once auditing is back on, make the next statements'
    // check see a writer that fell behind (review 44).
    if !enabled() {
        wake_writer();
    }
    // Nothing is held past a transaction's end (a session ending while an aggregate was being
    // updated, above, leaves that aggregate's claim).
    release_held();
    AT_END.with(|e| e.set(false));
}

thread_local! {
    static AT_END: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Set while a statement's aggregates are pushed (see [`wait_for_room`]).
    static FLUSHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// PostgreSQL timestamps count from 2000-01-01; the chain uses the Unix epoch.
fn pg_to_unix_us(ts: i64) -> i64 {
    ts + 946_684_800_000_000
}

thread_local! {
    /// The session's database, login and client (shared, not copied, into each record).
    static SESSION: RefCell<Option<std::rc::Rc<(String, String, String)>>> = const { RefCell::new(None) };
    static SESSION_GENERATION: std::cell::Cell<u64> = const { std::cell::Cell::new(u64::MAX) };
}

fn session() -> Option<std::rc::Rc<(String, String, String)>> {
    SESSION.with(|s| s.borrow().clone())
}

/// Reads the session's database, login and client once (catalog access: in a live transaction).
pub(crate) fn prime_session() {
    // Read again after a pg_authid change (the login role renamed, and another role given its
    // old name: insider review 27), as the role names of the records are.
    let generation = hooks::privileges_generation();
    if SESSION_GENERATION.with(|g| g.replace(generation)) != generation {
        SESSION.with(|s| s.borrow_mut().take());
    }
    SESSION.with(|s| {
        s.borrow_mut().get_or_insert_with(|| unsafe {
                let db = pg_sys::get_database_name(pg_sys::MyDatabaseId);
                let db = if db.is_null() { String::new() } else { std::ffi::CStr::from_ptr(db).to_string_lossy().into_owned() };
                // inet_client_addr(): NULL over a Unix socket (and in background workers).
                let client = pgrx::direct_function_call::<pgrx::Inet>(pg_sys::inet_client_addr, &[])
                    .map(|i| i.0)
                    .unwrap_or_else(|| if pg_sys::MyProcPort.is_null() { "[internal]".into() } else { "[local]".into() });
                // The authenticated login: SET SESSION AUTHORIZATION cannot hide who connected.
                std::rc::Rc::new((db, crate::backend::role_name(pg_sys::GetAuthenticatedUserId()), client))
        });
    });
}

/// A record with who and where: database, session user, the role, client address, application
/// name, pid and the application's request id. Reads no catalog (see [`prime_session`]).
fn base_record(kind: &str, current_role: String) -> Record {
    let (database, session_user, client) = session().map(|s| (*s).clone()).unwrap_or_default();
    Record {
        at_us: pg_to_unix_us(now_ts()),
        kind: kind.to_string(),
        database,
        session_user,
        current_role,
        client_addr: client,
        application_name: application_name(),
        backend_pid: unsafe { pg_sys::MyProcPid } as i64,
        request_id: request_id(),
        ..Record::default()
    }
}

pub fn status_json() -> serde_json::Value {
    if !crate::backend::PRELOADED.load(Ordering::Relaxed) {
        return serde_json::json!({ "enabled": false });
    }
    let (dropped, drained_at, checkpoint_seq, checkpointed_at, checkpoint_failed_at, waits, blocks_written) = {
        let q = QUEUE.share();
        (q.dropped, q.drained_at, q.checkpoint_seq, q.checkpointed_at, q.checkpoint_failed_at, q.waits, q.blocks_direct)
    };
    let queued = queued();
    // Slots claimed by statements and transactions in progress for records they push later.
    let promised = ring().claimed().saturating_sub(queued);
    let records_written = ring().read_position();
    let ago = |t: i64| (t != 0).then(|| (now_ts() - t) as f64 / 1e6);
    serde_json::json!({
        "enabled": enabled(),
        "fail_closed": gucs::AUDIT_FAIL_CLOSED.get(),
        "queued": queued,
        "queue_size": slots(),
        "promised": promised,
        "dropped": dropped,
        "queue_full_waits": waits,
        "records_written": records_written,
        "blocks_written": blocks_written,
        "seconds_since_drain": ago(drained_at),
        "checkpoint_provider": gucs::audit_checkpoint_provider(),
        "last_checkpoint_seq": (checkpoint_seq != 0).then_some(checkpoint_seq),
        "seconds_since_checkpoint": ago(checkpointed_at),
        "seconds_since_checkpoint_failure": ago(checkpoint_failed_at),
        "recording": health().err().unwrap_or_else(|| "ok".into()),
    })
}
