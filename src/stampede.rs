//! The server-wide bound on concurrent calls to each key provider:
//! `envelope.max_concurrent_provider_calls` (stampede control, issue 16). The slot table is
//! `pg_envelope_core::stampede`; this module puts it in shared memory next to one condition
//! variable per provider bucket and makes every key-provider call take a slot.
//!
//! * A call takes a slot of its provider before it starts and gives it back when the call's
//!   helper thread ends (so a cancelled statement does not free its slot while its KMS request
//!   is still out). A provider that hangs holds only its own slots.
//! * With every slot of the provider taken the caller sleeps on the provider's condition
//!   variable (woken in arrival order when a call ends; a newcomer that finds a free slot takes
//!   it, so the order is roughly first come, first served), for at most `envelope.kms_timeout`;
//!   then the call fails with 58000 (`ProviderError::Busy`). It does **not** start outage mode
//!   (serving keys past their TTL): other callers' load must not stretch a revocation that the
//!   KMS would report (an insider review showed it could). Cancellation and `statement_timeout`
//!   end the wait. A provider is its database and name: one name in two databases is two
//!   providers.
//! * Slots of a process that died holding them are taken back by waiters (at most once a second
//!   each) and by the process's own exit callback.
//! * Without `shared_preload_libraries` there is no shared memory and no bound.

use std::sync::atomic::{AtomicPtr, Ordering};

use pg_envelope_core::stampede::{channel, provider_key, Slot, SlotStats, SlotTable, MAX_PROVIDERS};
use pg_envelope_core::ProviderError;
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::gucs;

#[repr(C)]
struct Shared {
    /// Wake-up channels: the waiters for a provider sleep on `cvs[channel(key)]`.
    cvs: [pg_sys::ConditionVariable; MAX_PROVIDERS],
    table: SlotTable,
}

static SHARED: AtomicPtr<Shared> = AtomicPtr::new(std::ptr::null_mut());
static mut PREV_SHMEM_REQUEST: Option<unsafe extern "C-unwind" fn()> = None;
static mut PREV_SHMEM_STARTUP: Option<unsafe extern "C-unwind" fn()> = None;

/// How often a waiter looks again without being woken (a slot freed by a cancelled call's
/// thread, or by a process that died, does not signal).
const POLL_MS: i64 = 250;

/// How often one waiter looks for slots of processes that died.
const RECLAIM_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// From `_PG_init` while shared_preload_libraries is processed.
pub fn register() {
    unsafe {
        PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request);
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(attach);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn request() {
    if let Some(prev) = PREV_SHMEM_REQUEST {
        prev();
    }
    pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Shared>());
}

#[pg_guard]
unsafe extern "C-unwind" fn attach() {
    if let Some(prev) = PREV_SHMEM_STARTUP {
        prev();
    }
    let mut found = false;
    // AddinShmemInitLock is MainLWLockArray[21] (as pgrx's own shared-memory types take it).
    let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
    pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
    let p = pg_sys::ShmemInitStruct(c"pg_envelope provider call slots".as_ptr(), std::mem::size_of::<Shared>(), &mut found)
        .cast::<Shared>();
    if !found {
        // All-zero is the slot table's initial state; the condition variable has its own init.
        std::ptr::write_bytes(p.cast::<u8>(), 0, std::mem::size_of::<Shared>());
        for i in 0..MAX_PROVIDERS {
            pg_sys::ConditionVariableInit(&raw mut (*p).cvs[i]);
        }
    }
    pg_sys::LWLockRelease(init_lock);
    SHARED.store(p, Ordering::Release);
}

fn shared() -> Option<&'static Shared> {
    let p = SHARED.load(Ordering::Acquire);
    // SAFETY: set once at startup to shared memory that lives as long as the process.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// A taken slot (or none, when there is no bound). Dropping it gives the slot back, on
/// whichever thread drops it; it does not wake a waiter (only the backend's main thread may
/// touch the condition variable): [`provider_call`] does that.
pub struct CallSlot {
    slot: Option<Slot>,
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        if let (Some(slot), Some(s)) = (self.slot.take(), shared()) {
            s.table.release(slot);
        }
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[pg_guard]
unsafe extern "C-unwind" fn release_own_slots(_code: i32, _arg: pg_sys::Datum) {
    if let Some(s) = shared() {
        let me = pg_sys::MyProcPid;
        s.table.reclaim(|p| p != me);
    }
}

thread_local! {
    static EXIT_HOOK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Takes a slot for one call to `provider`, waiting up to `envelope.kms_timeout` for one.
pub fn acquire(provider: &str) -> Result<CallSlot, ProviderError> {
    let cap = gucs::max_concurrent_provider_calls();
    let Some(s) = shared().filter(|_| cap > 0) else {
        return Ok(CallSlot { slot: None });
    };
    let pid = unsafe { pg_sys::MyProcPid };
    if !EXIT_HOOK.get() {
        unsafe { pg_sys::on_shmem_exit(Some(release_own_slots), pg_sys::Datum::from(0)) };
        EXIT_HOOK.set(true);
    }
    let key = provider_key(unsafe { pg_sys::MyDatabaseId }.to_u32(), provider);
    if let Some(slot) = s.table.try_acquire(pid, key, cap) {
        return Ok(CallSlot { slot: Some(slot) });
    }
    s.table.note_wait();
    let timeout = gucs::kms_timeout();
    let started = std::time::Instant::now();
    let mut reclaimed_at = started;
    let cv = (&raw const s.cvs[channel(key, MAX_PROVIDERS)]).cast_mut();
    unsafe { pg_sys::ConditionVariablePrepareToSleep(cv) };
    let got = loop {
        if let Some(slot) = s.table.try_acquire(pid, key, cap) {
            break Some(slot);
        }
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            break None;
        }
        let ms = (left.as_millis() as i64).clamp(1, POLL_MS);
        // Services interrupts: a cancel or statement_timeout ends the wait with its error
        // (the transaction's abort cancels the sleep).
        let timed_out = unsafe { pg_sys::ConditionVariableTimedSleep(cv, ms as _, pg_sys::PG_WAIT_EXTENSION) };
        if timed_out && reclaimed_at.elapsed() >= RECLAIM_EVERY {
            s.table.reclaim(alive);
            reclaimed_at = std::time::Instant::now();
        }
    };
    unsafe { pg_sys::ConditionVariableCancelSleep() };
    match got {
        Some(slot) => Ok(CallSlot { slot: Some(slot) }),
        None => {
            s.table.note_timeout();
            if s.table.in_use_for(key) < cap {
                return Err(ProviderError::Busy(format!(
                    "all {} provider call slots of the server (every provider, every database) stayed taken for {} ms: many providers are slow or hung",
                    pg_envelope_core::stampede::MAX_SLOTS,
                    timeout.as_millis()
                )));
            }
            Err(ProviderError::Busy(format!(
                "all {cap} call slots of key provider \"{}\" (envelope.max_concurrent_provider_calls) stayed taken for {} ms: the provider is slow or overloaded",
                crate::error::shown(provider),
                timeout.as_millis()
            )))
        }
    }
}

/// Wakes the longest waiter on a channel, if any (after a call gave its slot back).
fn wake_one(channel: usize) {
    if let Some(s) = shared() {
        unsafe { pg_sys::ConditionVariableSignal((&raw const s.cvs[channel]).cast_mut()) };
    }
}

/// One call to key provider `provider` (its registered name): takes a slot, runs `f` on the
/// interruptible helper thread (which gives the slot back when `f` returns), then wakes the next
/// waiter. `Err` only when no slot came free within `envelope.kms_timeout` (`f` did not run).
pub fn provider_call<R: Send + 'static>(provider: &str, f: impl FnOnce() -> R + Send + 'static) -> Result<R, ProviderError> {
    let slot = acquire(provider)?;
    let wake = slot.slot.is_some().then(|| channel(provider_key(unsafe { pg_sys::MyDatabaseId }.to_u32(), provider), MAX_PROVIDERS));
    let r = crate::backend::interruptible(move || {
        let r = f();
        drop(slot);
        r
    });
    if let Some(c) = wake {
        wake_one(c);
    }
    Ok(r)
}

/// The table's counters for `status()`; None without shared memory.
pub fn stats() -> Option<SlotStats> {
    shared().map(|s| s.table.stats())
}
