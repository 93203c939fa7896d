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
use crate::error::{EnvelopeError, OrRaiseAudited, Result};

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
    match read_lockdown_file() {
        FileState::Absent => {}
        FileState::Locked(since, reason) => {
            LOCKDOWN.get().store(since.max(1), Ordering::Release);
            crate::log!("pg_envelope: the server starts in LOCKDOWN ({reason}); a superuser lifts it with SELECT envelope.lift_lockdown()");
        }
        FileState::Unreadable(e) => {
            // An emergency stop must not turn itself off on a read error: stay locked.
            LOCKDOWN.get().store(1, Ordering::Release);
            crate::warning!("pg_envelope: {LOCKDOWN_FILE} exists but cannot be read ({e}); the server starts in LOCKDOWN");
        }
    }
}

enum FileState {
    Absent,
    Locked(u64, String),
    Unreadable(String),
}

fn read_lockdown_file() -> FileState {
    match std::fs::read(LOCKDOWN_FILE) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let mut lines = text.splitn(2, '\n');
            let since = lines.next().and_then(|l| l.trim().parse::<u64>().ok()).unwrap_or(1);
            FileState::Locked(since, lines.next().unwrap_or("").trim_end().to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileState::Absent,
        Err(e) => FileState::Unreadable(e.to_string()),
    }
}

/// Whether the cluster is locked down (one atomic load: checked on every key use).
pub fn locked_down() -> bool {
    backend::PRELOADED.load(Ordering::Relaxed) && LOCKDOWN.get().load(Ordering::Acquire) != 0
}

/// `Err(Lockdown)` while the cluster is locked down: the one refusal every key path uses.
pub fn refuse_if_locked() -> Result<()> {
    if locked_down() {
        return Err(EnvelopeError::Lockdown { reason: lockdown_state().map(|(_, r, _)| r).unwrap_or_default() });
    }
    Ok(())
}

/// The flag itself, for loops on the key-provider thread that must stop at a lockdown.
pub fn lockdown_flag() -> Option<&'static AtomicU64> {
    backend::PRELOADED.load(Ordering::Relaxed).then(|| LOCKDOWN.get())
}

/// The lockdown for status() and errors: (since, reason, persisted in the data directory).
pub fn lockdown_state() -> Option<(u64, String, bool)> {
    if !locked_down() {
        return None;
    }
    let since = LOCKDOWN.get().load(Ordering::Acquire);
    Some(match read_lockdown_file() {
        FileState::Locked(_, r) => (since, r, true),
        FileState::Absent => (since, String::new(), false),
        FileState::Unreadable(e) => (since, format!("(the lockdown file cannot be read: {e})"), true),
    })
}

/// Serializes lockdown and lift across backends (an exclusive `flock` on a lock file next to
/// the lockdown file), so the flag and the file never disagree after concurrent calls.
struct FileLock(#[allow(dead_code)] std::fs::File); // held: the lock lives as long as the open file
impl FileLock {
    fn take() -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(format!("{LOCKDOWN_FILE}.lock"))?;
        // SAFETY: a valid descriptor; released when the file is closed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(FileLock(f))
    }
}

fn write_lockdown_file(since: u64, reason: &str) -> std::io::Result<()> {
    let tmp = format!("{LOCKDOWN_FILE}.{}.tmp", std::process::id());
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

/// Characters that could forge or reorder log lines and messages: controls, Unicode line and
/// paragraph separators, and format characters (bidi overrides, zero-width).
fn is_forging(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{FEFF}')
        || ('\u{200B}'..='\u{200F}').contains(&c)
        || ('\u{202A}'..='\u{202E}').contains(&c)
        || ('\u{2060}'..='\u{206F}').contains(&c)
        || ('\u{FFF9}'..='\u{FFFB}').contains(&c)
}

fn check_reason(reason: &str) -> Result<()> {
    let n = reason.chars().count();
    if reason.trim().is_empty() || n > 200 || reason.chars().any(is_forging) {
        return Err(EnvelopeError::BadRequest {
            code: pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            message: "pg_envelope: a reason is 1 to 200 characters, without control or format characters".into(),
            hint: Some("Say why, for the next administrator: it is shown in status(), in the server log and in the errors users get.".into()),
        });
    }
    Ok(())
}

/// Refuses every use of the tenant's keys in every backend from the commit on (57000).
/// Returns whether the tenant was not suspended before. Key administrators.
#[pg_extern(volatile, parallel_unsafe)]
fn suspend_tenant(tenant: &str, reason: &str) -> bool {
    suspend_impl(tenant, Some(reason)).or_raise_audited("suspend_tenant", tenant)
}

/// Lifts a suspension (from the commit on). Returns whether the tenant was suspended.
#[pg_extern(volatile, parallel_unsafe)]
fn resume_tenant(tenant: &str) -> bool {
    suspend_impl(tenant, None).or_raise_audited("resume_tenant", tenant)
}

fn suspend_impl(tenant: &str, reason: Option<&str>) -> Result<bool> {
    if let Some(r) = reason {
        check_reason(r)?;
    }
    let t = catalog::lock_tenant(tenant)?.ok_or_else(|| EnvelopeError::TenantUnknown { tenant: tenant.to_string() })?;
    if reason.is_none() {
        // A scheduled shred holds its own suspension: cancel_shred lifts both. A shredded tenant
        // has no keys to resume.
        match &t.refusal {
            Some(catalog::Refusal::Shredded { at }) => {
                return Err(EnvelopeError::BadRequest {
                    code: pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    message: format!("pg_envelope: tenant \"{}\" was crypto-shredded on {at} and cannot be resumed", crate::error::shown(tenant)),
                    hint: None,
                })
            }
            Some(catalog::Refusal::Suspended { shred_after: Some(after), .. }) => {
                return Err(EnvelopeError::BadRequest {
                    code: pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    message: format!("pg_envelope: tenant \"{}\" is scheduled for crypto-shredding after {after}", crate::error::shown(tenant)),
                    hint: Some(format!("SELECT envelope.cancel_shred('{}') cancels the shred and lifts its suspension.", crate::error::shown(tenant))),
                })
            }
            _ => {}
        }
    }
    let changed = catalog::set_suspension(t.id, reason)?;
    crate::audit::key_op(
        if reason.is_some() { "suspend_tenant" } else { "resume_tenant" },
        tenant,
        &format!("{}{}", reason.unwrap_or(""), if changed { "" } else { " (no change)" }),
        false,
    );
    if !changed {
        let who = crate::error::shown(&catalog::current_role_name());
        match reason {
            Some(r) => crate::log!("pg_envelope: tenant \"{}\" suspension requested by {who}, already suspended: {r}", crate::error::shown(tenant)),
            None => crate::log!("pg_envelope: tenant \"{}\" resume requested by {who}, not suspended", crate::error::shown(tenant)),
        }
    }
    if changed {
        if reason.is_some() {
            backend::revoke_after_commit();
        } else {
            backend::invalidate_after_commit();
        }
        // In the server log (the audit trail is issue 13); in effect once the transaction commits.
        let who = crate::error::shown(&catalog::current_role_name());
        match reason {
            Some(r) => crate::log!("pg_envelope: tenant \"{}\" suspended by {who} (at commit): {r}", crate::error::shown(tenant)),
            None => crate::log!("pg_envelope: tenant \"{}\" resumed by {who} (at commit)", crate::error::shown(tenant)),
        }
    }
    Ok(changed)
}

/// Locks the whole cluster down at once: every backend of every database drops its cached keys
/// at its next call and all key use (and every key-provider call) is refused with 57000 until a
/// superuser calls `lift_lockdown()`. Survives a restart. Not undone by a rollback. Key
/// administrators. Returns whether it was not locked down before.
#[pg_extern(volatile, parallel_unsafe)]
fn lockdown(reason: &str) -> bool {
    lockdown_impl(reason).or_raise_audited("lockdown", "")
}

fn lockdown_impl(reason: &str) -> Result<bool> {
    check_reason(reason)?;
    if !backend::PRELOADED.load(Ordering::Relaxed) {
        return Err(EnvelopeError::NotPreloaded);
    }
    let who = crate::error::shown(&catalog::current_role_name());
    let _serial = FileLock::take().ok();
    let was = locked_down();
    if was && matches!(read_lockdown_file(), FileState::Locked(..) | FileState::Unreadable(_)) {
        return Ok(false);
    }
    let since = if was {
        LOCKDOWN.get().load(Ordering::Acquire)
    } else {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(1).max(1)
    };
    // The flag first: an emergency stop must not fail because the disk is full. Then the file,
    // so that a restart does not end it; if that fails, say so loudly.
    LOCKDOWN.get().store(since, Ordering::Release);
    backend::with_backend(|b| b.cache.clear());
    // Idle backends of every database drop their keys now, not at their next call.
    backend::wake_backends(true);
    crate::log!("pg_envelope: LOCKDOWN by {who}: {reason}");
    crate::audit::key_op("lockdown", "", reason, true);
    if let Err(e) = write_lockdown_file(since, &format!("{reason} (by {who})")) {
        crate::warning!(
            "pg_envelope: the lockdown is in effect but could not be saved in the data directory ({e}): a restart would end it; fix the cause and call envelope.lockdown() again"
        );
    }
    Ok(!was)
}

/// Ends a lockdown at once. Superusers only, whatever EXECUTE grants say: a key administrator
/// can stop everything but not restart it. Returns whether the cluster was locked down.
#[pg_extern(volatile, parallel_unsafe)]
fn lift_lockdown() -> bool {
    lift_impl().or_raise_audited("lift_lockdown", "")
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
    let _serial = FileLock::take().ok();
    let was = locked_down();
    remove_lockdown_file().map_err(|e| EnvelopeError::Internal(format!("could not remove {LOCKDOWN_FILE}: {e}")))?;
    LOCKDOWN.get().store(0, Ordering::Release);
    if was {
        crate::log!("pg_envelope: lockdown lifted by {}", crate::error::shown(&catalog::current_role_name()));
    }
    crate::audit::key_op("lift_lockdown", "", if was { "" } else { "(not locked down)" }, true);
    Ok(was)
}
