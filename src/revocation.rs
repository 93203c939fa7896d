//! Revocation at the tenant and system scopes, SQL glue (the credential scope is
//! `revoke_tenant`, the version scope `disable_data_key`).
//!
//! * `suspend_tenant(tenant, reason)` / `resume_tenant(tenant)`: transactional. At commit the
//!   shared epoch moves, so every backend drops its cached keys at its next call and reloads;
//!   a suspended tenant's keys are never loaded again (catalog::load_tenant refuses) and every
//!   key use fails with 57000 naming the suspension.
//! * `lockdown(reason)` / `lift_lockdown()`: the whole cluster, every database. Immediate (not
//!   transactional: an emergency stop must not wait for, or be undone by, the caller's
//!   transaction). A flag in shared memory, checked on every key use, which then drops every
//!   cached key of the backend; persisted in `$PGDATA/pg_envelope.lockdown` (written durably), read
//!   back at server start, so a restart is no way out. Key administrators may lock down; only
//!   superusers may lift it.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::prelude::*;
use pgrx::PgAtomic;

use crate::backend;
use crate::catalog;
use crate::error::{EnvelopeError, OrRaise, Result};

/// Seconds since the Unix epoch when the lockdown began; 0: none.
pub static LOCKDOWN: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_envelope_lockdown") };

/// The lockdown file, relative to the data directory (every server process runs there).
const LOCKDOWN_FILE: &str = "pg_envelope.lockdown";

static mut PREV_SHMEM_STARTUP: Option<unsafe extern "C-unwind" fn()> = None;

/// Registers the flag (from `_PG_init`, while shared_preload_libraries is processed) and a
/// shared-memory startup step that restores a persisted lockdown at every server start and
/// after crash reinitialisation.
pub fn register() {
    pgrx::pg_shmem_init!(LOCKDOWN);
    unsafe {
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(restore_lockdown);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn restore_lockdown() {
    if let Some(prev) = PREV_SHMEM_STARTUP {
        prev();
    }
    if let Some((since, _)) = read_lockdown_file() {
        LOCKDOWN.get().store(since.max(1), Ordering::Release);
    }
}

fn read_lockdown_file() -> Option<(u64, String)> {
    let text = std::fs::read_to_string(LOCKDOWN_FILE).ok()?;
    let mut lines = text.splitn(2, '\n');
    let since = lines.next()?.trim().parse::<u64>().ok().unwrap_or(1);
    Some((since, lines.next().unwrap_or("").trim_end().to_string()))
}

/// Whether the cluster is locked down (one atomic load: checked on every key use).
pub fn locked_down() -> bool {
    backend::PRELOADED.load(Ordering::Relaxed) && LOCKDOWN.get().load(Ordering::Acquire) != 0
}

/// The lockdown for status(): (since, reason).
pub fn lockdown_state() -> Option<(u64, String)> {
    if !locked_down() {
        return None;
    }
    let since = LOCKDOWN.get().load(Ordering::Acquire);
    Some((since, read_lockdown_file().map(|(_, r)| r).unwrap_or_default()))
}

fn write_lockdown_file(since: u64, reason: &str) -> std::io::Result<()> {
    let tmp = format!("{LOCKDOWN_FILE}.tmp");
    {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        writeln!(f, "{since}")?;
        writeln!(f, "{reason}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, LOCKDOWN_FILE)?;
    std::fs::File::open(".")?.sync_all()
}

fn remove_lockdown_file() -> std::io::Result<()> {
    match std::fs::remove_file(LOCKDOWN_FILE) {
        Ok(()) => std::fs::File::open(".")?.sync_all(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn check_reason(reason: &str) -> Result<()> {
    if reason.trim().is_empty() || reason.len() > 500 || reason.chars().any(|c| c.is_control()) {
        return Err(EnvelopeError::BadRequest {
            code: pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            message: "pg_envelope: a reason is 1 to 500 characters without control characters".into(),
            hint: Some("Say why, for the next administrator (it is shown in status() and in the errors)".into()),
        });
    }
    Ok(())
}

/// Refuses every use of the tenant's keys in every backend from the commit on (57000).
/// Returns whether the tenant was not suspended before. Key administrators.
#[pg_extern(volatile, parallel_unsafe)]
fn suspend_tenant(tenant: &str, reason: &str) -> bool {
    suspend_impl(tenant, Some(reason)).or_raise()
}

/// Lifts a suspension (from the commit on). Returns whether the tenant was suspended.
#[pg_extern(volatile, parallel_unsafe)]
fn resume_tenant(tenant: &str) -> bool {
    suspend_impl(tenant, None).or_raise()
}

fn suspend_impl(tenant: &str, reason: Option<&str>) -> Result<bool> {
    if let Some(r) = reason {
        check_reason(r)?;
    }
    let t = catalog::lock_tenant(tenant)?.ok_or_else(|| EnvelopeError::TenantUnknown { tenant: tenant.to_string() })?;
    let changed = catalog::set_suspension(t.id, reason)?;
    if changed {
        backend::invalidate_after_commit();
    }
    Ok(changed)
}

/// Locks the whole cluster down at once: every backend of every database drops its cached keys
/// at its next call and all key use (and every key-provider call) is refused with 57000 until a
/// superuser calls `lift_lockdown()`. Survives a restart. Not undone by a rollback. Key
/// administrators. Returns whether it was not locked down before.
#[pg_extern(volatile, parallel_unsafe)]
fn lockdown(reason: &str) -> bool {
    lockdown_impl(reason).or_raise()
}

fn lockdown_impl(reason: &str) -> Result<bool> {
    check_reason(reason)?;
    if !backend::PRELOADED.load(Ordering::Relaxed) {
        return Err(EnvelopeError::NotPreloaded);
    }
    if locked_down() {
        return Ok(false);
    }
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(1).max(1);
    let who = crate::error::shown(&catalog::current_role_name());
    // Durable first: a crash right after this call must come back locked down.
    write_lockdown_file(since, &format!("{reason} (by {who})"))
        .map_err(|e| EnvelopeError::Internal(format!("could not write {LOCKDOWN_FILE} in the data directory: {e}")))?;
    LOCKDOWN.get().store(since, Ordering::Release);
    backend::with_backend(|b| b.cache.clear());
    pgrx::log!("pg_envelope: LOCKDOWN by {who}: {reason}");
    Ok(true)
}

/// Ends a lockdown at once. Superusers only, whatever EXECUTE grants say: a key administrator
/// can stop everything but not restart it. Returns whether the cluster was locked down.
#[pg_extern(volatile, parallel_unsafe)]
fn lift_lockdown() -> bool {
    lift_impl().or_raise()
}

fn lift_impl() -> Result<bool> {
    if !unsafe { pg_sys::superuser() } {
        return Err(EnvelopeError::BadRequest {
            code: pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            message: "pg_envelope: only superusers may lift a lockdown".into(),
            hint: Some("Key administrators can lock down but not lift it (docs/design-decisions.md).".into()),
        });
    }
    if !backend::PRELOADED.load(Ordering::Relaxed) {
        return Err(EnvelopeError::NotPreloaded);
    }
    let was = locked_down();
    remove_lockdown_file().map_err(|e| EnvelopeError::Internal(format!("could not remove {LOCKDOWN_FILE}: {e}")))?;
    LOCKDOWN.get().store(0, Ordering::Release);
    if was {
        pgrx::log!("pg_envelope: lockdown lifted by {}", crate::error::shown(&catalog::current_role_name()));
    }
    Ok(was)
}
