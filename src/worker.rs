//! The project's one background worker: scheduled key maintenance (src/maintenance.rs).
//!
//! Registered by `_PG_init` when pg_envelope is in `shared_preload_libraries` and
//! `envelope.database` is not empty. It connects to that database as the bootstrap superuser,
//! starts only once recovery has finished (nothing on a hot standby; after a promotion it
//! starts), is restarted by the postmaster 10 s after a crash, re-reads the configuration on
//! SIGHUP and stops at SIGTERM between two steps (a key-provider call in flight is bounded by
//! `envelope.kms_timeout`). Every step runs in its own transaction, so a failure rolls back that
//! step only; it is logged, kept as the last error (`envelope.status()`, `maintenance_status()`),
//! and retried at the next run. Re-encryption jobs run as the role that queued them.
//!
//! Revocation, shredding and the audit writer (later issues) are meant to run in this worker too.

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::{PgLwLock, PgTryBuilder};

use crate::maintenance::{self, Work};
use crate::{catalog, gucs};

/// What the worker reports about itself, in shared memory.
#[derive(Clone, Copy)]
pub struct WorkerStatus {
    pub pid: i32,
    /// The worker's index in ProcGlobal->allProcs (its latch wakes it: the audit queue); -1: none.
    pub procno: i32,
    pub started_at: i64,
    pub last_run_at: i64,
    pub last_error_at: i64,
    pub runs: u64,
    pub rotations: u64,
    pub rewrapped: u64,
    pub reencrypted: u64,
    pub error_len: u16,
    pub error: [u8; 256],
}

impl Default for WorkerStatus {
    fn default() -> Self {
        WorkerStatus {
            pid: 0,
            procno: -1,
            started_at: 0,
            last_run_at: 0,
            last_error_at: 0,
            runs: 0,
            rotations: 0,
            rewrapped: 0,
            reencrypted: 0,
            error_len: 0,
            error: [0; 256],
        }
    }
}

unsafe impl pgrx::shmem::PGRXSharedMemory for WorkerStatus {}

pub static STATUS: PgLwLock<WorkerStatus> = unsafe { PgLwLock::new(c"pg_envelope_worker") };

impl WorkerStatus {
    pub fn last_error(&self) -> Option<String> {
        (self.error_len > 0).then(|| String::from_utf8_lossy(&self.error[..self.error_len as usize]).into_owned())
    }
}

/// Registers the worker (from `_PG_init`, while shared_preload_libraries is processed).
pub fn register() {
    pgrx::pg_shmem_init!(STATUS);
    if gucs::database().is_none() {
        return;
    }
    BackgroundWorkerBuilder::new("pg_envelope maintenance")
        .set_type("pg_envelope maintenance")
        .set_function("pg_envelope_worker_main")
        .set_library("pg_envelope")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(10)))
        .load();
}

/// How long the worker works on one re-encryption job per run.
const JOB_SLICE: Duration = Duration::from_secs(60);

/// A bound on lock waits of one batch of a queued job (lock_timeout is checked by the lock
/// manager itself, so setting it is enough).
fn job_timeouts() -> String {
    format!("SELECT pg_catalog.set_config('lock_timeout', '{}ms', true)", lock_bound_ms(60_000))
}

fn now() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

fn shutdown_requested() -> bool {
    // SAFETY: sig_atomic_t flags set by signal handlers.
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) != 0 || std::ptr::read_volatile(&raw const pg_sys::ProcDiePending) != 0 }
}

unsafe extern "C-unwind" fn clear_pid(_code: i32, _arg: pg_sys::Datum) {
    let mut s = STATUS.exclusive();
    s.pid = 0;
    s.procno = -1;
}

// timeout.h is not in pgrx's bindings. STATEMENT_TIMEOUT is 3 in every supported major.
extern "C-unwind" {
    fn enable_timeout_after(id: std::ffi::c_int, delay_ms: std::ffi::c_int);
    fn disable_timeout(id: std::ffi::c_int, keep_indicator: bool);
    /// PostgreSQL's SIGTERM handler for backends (tcop/postgres.c).
    #[link_name = "die"]
    fn postgres_die(signal: std::ffi::c_int);
}
const STATEMENT_TIMEOUT: std::ffi::c_int = 3;
/// Longest a batch of a queued job may run (a trigger that sleeps must not stop the worker).
const JOB_STATEMENT_TIMEOUT_MS: std::ffi::c_int = 5 * 60 * 1000;

/// Runs `f` in a transaction of its own; an error aborts that transaction only and comes back
/// as its message.
fn in_transaction<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe + std::panic::RefUnwindSafe) -> Result<R, String> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let r = PgTryBuilder::new(|| Ok(f()))
        .catch_others(|e| {
            Err(match e {
                pg_sys::panic::CaughtError::PostgresError(r) | pg_sys::panic::CaughtError::ErrorReport(r) => r.message().to_string(),
                pg_sys::panic::CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
            })
        })
        .execute();
    unsafe {
        match &r {
            Ok(_) => {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            Err(_) => pg_sys::AbortCurrentTransaction(),
        }
    }
    r
}

fn record_error(what: &str) {
    // The audit writer retries every 200 ms: the same error is logged at most once a minute.
    thread_local! { static LAST: std::cell::RefCell<(String, i64)> = const { std::cell::RefCell::new((String::new(), 0)) }; }
    let t = now();
    let repeat = LAST.with(|l| {
        let mut l = l.borrow_mut();
        let repeat = l.0 == what && t - l.1 < 60_000_000;
        if !repeat {
            *l = (what.to_string(), t);
        }
        repeat
    });
    if !repeat {
        crate::log!("pg_envelope maintenance: {what}");
    }
    let mut s = STATUS.exclusive();
    let bytes = what.as_bytes();
    let n = bytes.len().min(s.error.len());
    s.error[..n].copy_from_slice(&bytes[..n]);
    s.error_len = n as u16;
    s.last_error_at = now();
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_envelope_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP);
    // SIGTERM: PostgreSQL's own handler (`die`), so a shutdown or pg_terminate_backend ends the
    // worker at the next interrupt check, also in the middle of a batch (a trigger sleeping in a
    // queued job included); the postmaster restarts it 10 s later unless the server is stopping.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(postgres_die));
        #[cfg(feature = "pg18")]
        pg_sys::pqsignal_be(pg_sys::SIGTERM as i32, Some(postgres_die));
        pg_sys::on_shmem_exit(Some(clear_pid), pg_sys::Datum::from(0));
    }
    let Some(db) = gucs::database() else { return };
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    // Every statement of this session resolves names in pg_catalog first (and never in a schema a
    // user controls); jobs cannot change this (they run in GUC nest levels that are undone).
    if let Err(m) = in_transaction(|| Spi::run("SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', false)")) {
        record_error(&m);
    }
    {
        let mut s = STATUS.exclusive();
        s.pid = unsafe { pg_sys::MyProcPid };
        // SAFETY: MyProc is this process's entry in the ProcGlobal array.
        s.procno = unsafe { pg_sys::MyProc.offset_from((*pg_sys::ProcGlobal).allProcs) } as i32;
        s.started_at = now();
    }
    crate::log!("pg_envelope maintenance worker started in database \"{db}\"");
    // The writer's own reads of the trail (the chain's head, the alert baselines) are not
    // audit_reads: suppressed around its batches and checkpoints only (see `drain_audit`), not
    // for the whole process, whose other work (re-encryption jobs) runs user code such as a
    // table's triggers, whose reads of the trail are recorded as anyone's (insider review 50).
    crate::audit::this_process_is_the_writer();
    loop {
        if shutdown_requested() {
            break;
        }
        drain_audit();
        run_once();
        // Sleep out the naptime: the latch is also set for reasons of no interest here
        // (invalidation catch-up signals), which must not make the worker run early.
        let slept_from = std::time::Instant::now();
        let mut deadline = slept_from + gucs::maintenance_naptime();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            // With auditing on, the queue is drained every 200 ms between maintenance runs.
            let slice = if crate::audit::enabled() { left.min(Duration::from_millis(200)) } else { left };
            if !BackgroundWorker::wait_latch(Some(slice)) || shutdown_requested() {
                // (wait_latch services interrupts: a SIGTERM usually ends the process inside it.)
                STATUS.exclusive().pid = 0;
                return;
            }
            if BackgroundWorker::sighup_received() {
                let before = crate::audit::settings_snapshot();
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                crate::audit::record_setting_changes(&before);
                crate::audit::config_reloaded();
                // A shorter naptime applies to the nap in progress.
                deadline = deadline.min(slept_from + gucs::maintenance_naptime());
            }
            drain_audit();
        }
    }
    STATUS.exclusive().pid = 0;
}

thread_local! {
    static WRITER: std::cell::RefCell<crate::audit::Writer> = std::cell::RefCell::new(crate::audit::Writer::default());
}

/// One audit step (see [`audit_step`]); also called between the batches of long maintenance
/// items, so a re-encryption job never holds the trail back past `envelope.audit_max_delay`.
fn drain_audit() {
    WRITER.with(|w| {
        if let Ok(mut w) = w.try_borrow_mut() {
            crate::audit::hooks::without_read_records(|| audit_step(&mut w));
        }
    });
}

/// A lock wait bound for maintenance work: `default_ms`, or half of `envelope.audit_max_delay`
/// when auditing is on (the trail is not drained while the worker waits for a lock).
fn lock_bound_ms(default_ms: i64) -> i64 {
    if crate::audit::enabled() {
        default_ms.min(gucs::audit_max_delay_s() * 500)
    } else {
        default_ms
    }
}

/// The audit writer: drains the shared-memory queue into envelope.audit_blocks, batch by batch,
/// each in its own transaction; a batch's slots are freed only after it committed. Also on a
/// standby? No: it cannot write (records wait, and key use there fails closed or warns).
fn audit_step(writer: &mut crate::audit::Writer) {
    // With auditing off, what is still queued (the record of turning it off) is written too.
    if !(crate::audit::enabled() || crate::audit::queued_now() > 0) || unsafe { pg_sys::RecoveryInProgress() } {
        return;
    }
    loop {
        let w = std::panic::AssertUnwindSafe(&mut *writer);
        let r = in_transaction(move || {
            let w = w;
            if !catalog::extension_installed() {
                return Err(crate::error::EnvelopeError::Internal(
                    "audit: pg_envelope is not installed in envelope.database, so audit records cannot be written".into(),
                ));
            }
            w.0.write_batch()
        });
        match r {
            Ok(Ok((n, upto))) => {
                writer.committed();
                crate::audit::consumed(upto);
                if n < crate::audit::writer::BATCH {
                    break;
                }
            }
            Ok(Err(e)) => {
                writer.reset();
                record_error(&e.message());
                return;
            }
            Err(m) => {
                writer.reset();
                record_error(&m);
                return;
            }
        }
    }
    audit_checkpoint(writer);
}

/// The checkpoint, in a transaction of its own: a KMS that is down delays checkpoints (retried
/// every 10 s, logged at most once a minute), never the records.
fn audit_checkpoint(writer: &mut crate::audit::Writer) {
    let failed_at = crate::audit::QUEUE.share().checkpoint_failed_at;
    let force = writer.force_checkpoint;
    if failed_at != 0 && now() - failed_at < 10_000_000 {
        return;
    }
    let w = std::panic::AssertUnwindSafe(&mut *writer);
    let r = in_transaction(move || {
        let w = w;
        w.0.checkpoint(force)
    });
    let err = match r {
        Ok(Ok(_)) => {
            writer.force_checkpoint = false;
            crate::audit::QUEUE.exclusive().checkpoint_failed_at = 0;
            return;
        }
        Ok(Err(e)) => e.message(),
        Err(m) => m,
    };
    crate::audit::QUEUE.exclusive().checkpoint_failed_at = now();
    record_error(&format!("audit checkpoint: {err}"));
}

/// One maintenance run: find due work, do each item in its own transaction(s).
fn run_once() {
    // Nothing on a standby; nothing in a lockdown (no key may be used).
    if unsafe { pg_sys::RecoveryInProgress() } || crate::revocation::locked_down() {
        return;
    }
    let due = in_transaction(|| {
        if !catalog::extension_installed() {
            return Ok(None);
        }
        let mut warnings = Vec::new();
        maintenance::due_work(&mut warnings).map(|w| Some((w, warnings)))
    });
    let work = match due {
        Ok(Ok(Some((work, warnings)))) => {
            for w in warnings {
                record_error(&w);
            }
            work
        }
        Ok(Ok(None)) => Vec::new(),
        Ok(Err(e)) => {
            record_error(&e.message());
            Vec::new()
        }
        Err(m) => {
            record_error(&m);
            Vec::new()
        }
    };
    let mut failed = false;
    for w in work {
        if shutdown_requested() {
            return;
        }
        if let Err(m) = run_item(&w) {
            failed = true;
            record_error(&m);
        }
    }
    let mut s = STATUS.exclusive();
    s.runs += 1;
    s.last_run_at = now();
    if !failed && s.last_error_at < s.last_run_at - 24 * 3600 * 1_000_000 {
        s.error_len = 0;
    }
}

fn flatten<T>(r: Result<crate::error::Result<T>, String>) -> Result<T, String> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.message()),
        Err(m) => Err(m),
    }
}

/// Runs `f` with `lock_timeout` bounded for this transaction: a tenant row held by another
/// session (a prepared transaction, a long key change) fails this item instead of stalling every
/// later one; it is retried at the next run.
fn bounded<R>(f: impl FnOnce() -> R) -> R {
    let _ = Spi::run(&format!("SET LOCAL lock_timeout = '{}ms'", lock_bound_ms(10_000)));
    f()
}

fn run_item(w: &Work) -> Result<(), String> {
    match w {
        Work::Shred(tenant) => {
            let t = tenant.clone();
            if flatten(in_transaction(move || bounded(|| crate::shred::shred_if_due_impl(&t))))? {
                crate::log!("pg_envelope maintenance: tenant \"{}\" crypto-shredded", crate::error::shown(tenant));
            }
            // The dedicated root key, if any, in its own transaction after the shred committed.
            let t = tenant.clone();
            flatten(in_transaction(move || bounded(|| crate::shred::destroy_root_key_impl(&t))))?;
            Ok(())
        }
        Work::CompactKeyTables => {
            if let n @ 1.. = flatten(in_transaction(|| bounded(crate::shred::compact_impl)))? {
                crate::log!("pg_envelope maintenance: key tables rewritten after {n} shred(s)");
            }
            Ok(())
        }
        Work::DestroyRootKey(tenant) => {
            let t = tenant.clone();
            flatten(in_transaction(move || bounded(|| crate::shred::destroy_root_key_impl(&t))))?;
            Ok(())
        }
        Work::Rotate(tenant) => {
            let t = tenant.clone();
            if let Some(v) = flatten(in_transaction(move || bounded(|| maintenance::rotate_if_due(&t))))? {
                crate::log!("pg_envelope maintenance: rotated the data key of tenant \"{}\" to version {v}", crate::error::shown(tenant));
                STATUS.exclusive().rotations += 1;
            }
            Ok(())
        }
        Work::Rewrap(provider) => {
            let p = provider.clone();
            // Bounded lock waits, as every other item: a transaction holding a tenant's row (an
            // open key change, a forgotten session) stalled the worker here, and with it every
            // due shred, rotation and the audit trail (review 41).
            let job = flatten(in_transaction(move || bounded(|| crate::lifecycle::rewrap_start_impl(&p))))?;
            loop {
                if shutdown_requested() {
                    return Ok(());
                }
                let n = flatten(in_transaction(move || bounded(|| crate::lifecycle::rewrap_batch_impl(job, 100))))?;
                if n == 0 {
                    crate::log!("pg_envelope maintenance: rewrap job {job} of provider \"{provider}\" is done");
                    return Ok(());
                }
                STATUS.exclusive().rewrapped += n as u64;
                drain_audit();
            }
        }
        Work::Reencrypt { job, role } => {
            let (job, role) = (*job, *role);
            // A time slice per job and run, so one long job never delays rotations (which come
            // first in every run) or other jobs for long; it continues at the next run.
            let slice_end = std::time::Instant::now() + JOB_SLICE;
            loop {
                if shutdown_requested() || std::time::Instant::now() >= slice_end {
                    return Ok(());
                }
                // As the role that queued the job (whose UPDATE privilege is checked), in a GUC
                // nest level undone afterwards, with a statement timeout; the batch itself runs
                // as the table's owner in a security-restricted operation (catalog::as_table_owner).
                let n = flatten(in_transaction(move || {
                    let (old, ctx, nest) = unsafe {
                        let mut old = pg_sys::InvalidOid;
                        let mut ctx = 0;
                        pg_sys::GetUserIdAndSecContext(&mut old, &mut ctx);
                        let nest = pg_sys::NewGUCNestLevel();
                        (old, ctx, nest)
                    };
                    // A background worker has no client protocol loop to arm statement_timeout:
                    // arm it here (the transaction's abort disarms it on error).
                    let r = Spi::run(&job_timeouts()).map_err(|e| crate::error::EnvelopeError::Internal(e.to_string())).and_then(|_| {
                        unsafe {
                            enable_timeout_after(STATEMENT_TIMEOUT, JOB_STATEMENT_TIMEOUT_MS);
                            pg_sys::SetUserIdAndSecContext(role, ctx | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
                        }
                        crate::reencrypt::batch_impl(job)
                    });
                    unsafe {
                        disable_timeout(STATEMENT_TIMEOUT, false);
                        pg_sys::SetUserIdAndSecContext(old, ctx);
                        pg_sys::AtEOXact_GUC(false, nest);
                    }
                    r
                }))?;
                if n < 0 {
                    return Ok(());
                }
                STATUS.exclusive().reencrypted += n as u64;
                drain_audit();
            }
        }
    }
}
