//! Direct calls to the few PostgreSQL functions on the per-value path that cannot raise an
//! ERROR, without pgrx's FFI guard.
//!
//! pgrx wraps every `pg_sys` call in a `sigsetjmp` guard so that a PostgreSQL `ERROR`
//! (a `longjmp`) becomes a Rust panic instead of jumping over Rust frames. That costs a few
//! nanoseconds per call, which `encrypt_field`/`decrypt_field` paid two or three times per value
//! (issue 6's profile: `sigsetjmp`/`__sigjmp_save`/`run_guarded` ≈ 4%). The functions below
//! never `ereport` — each is a read of backend-global state (PostgreSQL 15–18 sources:
//! `miscinit.c` GetUserId, `mbutils.c` GetDatabaseEncoding, `guc.c` GetConfigOption with
//! `missing_ok = true` and `restrict_privileged = false`, which skips both of its error paths
//! and formats non-string settings into a static buffer) — so no guard is needed. Like every
//! PostgreSQL call, they must run on the backend's main thread.

use std::ffi::{c_char, c_int, CStr};

use pgrx::pg_sys;

mod raw {
    use super::*;
    extern "C" {
        #[link_name = "GetUserId"]
        pub fn get_user_id() -> pg_sys::Oid;
        #[link_name = "GetDatabaseEncoding"]
        pub fn get_database_encoding() -> c_int;
        #[link_name = "InSecurityRestrictedOperation"]
        pub fn in_security_restricted_operation() -> bool;
        #[link_name = "GetConfigOption"]
        pub fn get_config_option(name: *const c_char, missing_ok: bool, restrict_privileged: bool) -> *const c_char;
    }
}

/// The current effective role (`GetUserId()`).
#[inline]
pub fn current_user_id() -> pg_sys::Oid {
    // SAFETY: returns a backend global; no error path.
    unsafe { raw::get_user_id() }
}

/// The current database's encoding (`GetDatabaseEncoding()`).
#[inline]
pub fn database_encoding() -> c_int {
    // SAFETY: returns a backend global; no error path.
    unsafe { raw::get_database_encoding() }
}

/// A setting's current value, or None when it does not exist
/// (`GetConfigOption(name, missing_ok = true, restrict_privileged = false)`).
///
/// The returned string is PostgreSQL's own copy: valid until the setting changes, which cannot
/// happen while the caller (a SQL function evaluating one value) uses it.
#[inline]
pub fn config_option(name: &CStr) -> Option<&'static CStr> {
    // SAFETY: with missing_ok and without restrict_privileged, GetConfigOption has no error path.
    let p = unsafe { raw::get_config_option(name.as_ptr(), true, false) };
    if p.is_null() {
        None
    } else {
        // SAFETY: a NUL-terminated string owned by the GUC machinery.
        Some(unsafe { CStr::from_ptr(p) })
    }
}

/// Whether the backend runs a security-restricted operation (`InSecurityRestrictedOperation()`:
/// ANALYZE, index builds, REFRESH MATERIALIZED VIEW, CLUSTER, VACUUM's index work, ... run as
/// the table owner with this flag set).
#[inline]
pub fn in_security_restricted_operation() -> bool {
    // SAFETY: reads a backend global; no error path.
    unsafe { raw::in_security_restricted_operation() }
}
