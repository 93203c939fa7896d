//! Direct calls to the few PostgreSQL functions on the per-value path that cannot raise an
//! ERROR, without pgrx's FFI guard.
//!
//! pgrx wraps every `pg_sys` call in a `sigsetjmp` guard so that a PostgreSQL `ERROR`
//! (a `longjmp`) becomes a Rust panic instead of jumping over Rust frames. That costs a few
//! nanoseconds per call, which `encrypt_field`/`decrypt_field` paid two or three times per value
//! (issue 6's profile: `sigsetjmp`/`__sigjmp_save`/`run_guarded` ≈ 4%). The functions below
//! never `ereport` — each is a read of backend-global state (PostgreSQL 15–18 sources:
//! `miscinit.c` GetUserId, `mbutils.c` GetDatabaseEncoding, `xact.c`
//! GetCurrentStatementStartTimestamp and the transaction-state predicates, `guc.c` GetConfigOption with
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
        #[link_name = "palloc_extended"]
        pub fn palloc_extended(size: usize, flags: c_int) -> *mut std::ffi::c_void;
        #[link_name = "GetCurrentStatementStartTimestamp"]
        pub fn get_current_statement_start_timestamp() -> pg_sys::TimestampTz;
        #[link_name = "IsTransactionState"]
        pub fn is_transaction_state() -> bool;
        #[link_name = "IsAbortedTransactionBlockState"]
        pub fn is_aborted_transaction_block_state() -> bool;
        #[link_name = "IsInParallelMode"]
        pub fn is_in_parallel_mode() -> bool;
        #[link_name = "ActiveSnapshotSet"]
        pub fn active_snapshot_set() -> bool;
        #[link_name = "RecoveryInProgress"]
        pub fn recovery_in_progress() -> bool;
        #[link_name = "pg_verify_mbstr"]
        pub fn pg_verify_mbstr(encoding: c_int, mbstr: *const c_char, len: c_int, no_error: bool) -> bool;
    }
}

/// Whether the server is a hot standby still in recovery (`xlog.c` RecoveryInProgress: a local
/// flag, and while it is set one read of shared memory; no error path, PostgreSQL 15-18). The
/// audit asks it per record pushed and per statement flushed, where pgrx's guard cost ~100
/// instructions a call.
#[inline]
pub fn recovery_in_progress() -> bool {
    // SAFETY: reads backend and shared-memory state; never raises.
    unsafe { raw::recovery_in_progress() }
}

/// The transaction-state predicates the audit's per-statement hooks ask (`xact.c`
/// IsTransactionState, IsAbortedTransactionBlockState, IsInParallelMode; `snapmgr.c`
/// ActiveSnapshotSet): reads of backend globals, no error path (PostgreSQL 15-18).
#[inline]
pub fn is_transaction_state() -> bool {
    // SAFETY: see above.
    unsafe { raw::is_transaction_state() }
}

#[inline]
pub fn is_aborted_transaction_block_state() -> bool {
    // SAFETY: see `is_transaction_state`.
    unsafe { raw::is_aborted_transaction_block_state() }
}

#[inline]
pub fn is_in_parallel_mode() -> bool {
    // SAFETY: see `is_transaction_state`.
    unsafe { raw::is_in_parallel_mode() }
}

#[inline]
pub fn active_snapshot_set() -> bool {
    // SAFETY: see `is_transaction_state`.
    unsafe { raw::active_snapshot_set() }
}

/// `palloc` without pgrx's guard, like [`palloc0`] but not zeroed: the caller writes every byte
/// before anything reads it (through raw pointers, never a slice over the fresh allocation).
#[inline]
pub fn palloc(size: usize) -> *mut std::ffi::c_void {
    const MAX_ALLOC_SIZE: usize = 0x3fff_ffff; // memutils.h MaxAllocSize
    if size <= MAX_ALLOC_SIZE {
        // SAFETY: a valid size and flags; CurrentMemoryContext is always set in a backend.
        let p = unsafe { raw::palloc_extended(size, pg_sys::MCXT_ALLOC_NO_OOM as c_int) };
        if !p.is_null() {
            return p;
        }
    }
    // SAFETY: guarded by pgrx: raises "out of memory" or "invalid memory alloc request size".
    unsafe { pg_sys::palloc(size) }
}

/// `palloc0(size)` in the current memory context without pgrx's guard: with
/// `MCXT_ALLOC_NO_OOM` an allocation failure returns NULL instead of raising an ERROR, and the
/// only other error (a size above `MaxAllocSize`) is excluded here, so nothing can `longjmp`.
/// Both cases fall back to the guarded `palloc0`, which raises PostgreSQL's own error.
#[inline]
pub fn palloc0(size: usize) -> *mut std::ffi::c_void {
    const MAX_ALLOC_SIZE: usize = 0x3fff_ffff; // memutils.h MaxAllocSize
    if size <= MAX_ALLOC_SIZE {
        // SAFETY: a valid size and flags; CurrentMemoryContext is always set in a backend.
        let p = unsafe { raw::palloc_extended(size, (pg_sys::MCXT_ALLOC_NO_OOM | pg_sys::MCXT_ALLOC_ZERO) as c_int) };
        if !p.is_null() {
            return p;
        }
    }
    // SAFETY: guarded by pgrx: raises "out of memory" or "invalid memory alloc request size".
    unsafe { pg_sys::palloc0(size) }
}

/// When the current statement started (`GetCurrentStatementStartTimestamp()`): what the
/// per-statement audit aggregate and the per-statement decryption cap key on.
#[inline]
pub fn statement_start() -> pg_sys::TimestampTz {
    // SAFETY: returns a backend global (xact.c stmtStartTimestamp); no error path.
    unsafe { raw::get_current_statement_start_timestamp() }
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

/// Whether `s` is valid in `encoding` with no NUL byte (`mbutils.c` pg_verify_mbstr with
/// `noError = true`: its only error path is skipped; PostgreSQL 15-18).
#[inline]
pub fn verify_mbstr(encoding: c_int, s: &[u8]) -> bool {
    let Ok(len) = c_int::try_from(s.len()) else { return false };
    // SAFETY: a valid encoding (the database's) and a readable slice of `len` bytes.
    unsafe { raw::pg_verify_mbstr(encoding, s.as_ptr().cast(), len, true) }
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

/// The tenant setting's current value, like [`config_option`], without the name lookup on every
/// call where PostgreSQL's GUC table allows it.
///
/// PostgreSQL 15 finds a setting by binary search over its ~400 settings with a case-insensitive
/// compare: about 700 instructions, a quarter of `encrypt_field`'s own cost on a short value
/// (callgrind, docs/benchmarks.md). The setting's record does not move while it exists, and its
/// value is read through the record's `variable` pointer at every call, so a `SET`,
/// `set_config()`, `SET LOCAL` rolled back, `RESET` or a function's `SET` clause is seen at once
/// exactly as `GetConfigOption` would see it: only the *lookup* is remembered, never the value.
/// A record is freed or moved only when a library is loaded that defines settings (a
/// placeholder replaced by the real definition, the table re-sorted or grown, placeholders
/// removed by `MarkGUCPrefixReserved`); each of these changes the table's array, its length or
/// the entry at the remembered index, which is checked on every call before the record is used.
/// PostgreSQL 16+ keeps settings in a hash table with no such cheap check: there the lookup is
/// `GetConfigOption` on every call (a hash probe, much cheaper than 15's binary search).
#[inline]
pub fn tenant_setting_value(name: &CStr) -> Option<&'static CStr> {
    #[cfg(feature = "pg15")]
    {
        if let Some(v) = guc15::cached_value(name) {
            return v;
        }
    }
    config_option(name)
}

#[cfg(feature = "pg15")]
mod guc15 {
    use super::*;
    use std::cell::RefCell;

    mod raw {
        use super::*;
        extern "C" {
            #[link_name = "get_guc_variables"]
            pub fn get_guc_variables() -> *mut *mut pg_sys::config_generic;
            #[link_name = "GetNumConfigOptions"]
            pub fn get_num_config_options() -> c_int;
        }
    }

    /// The result of the last search: the table it searched (array and length) and, when the
    /// setting was found as a string setting, its record and index. A setting that was not found
    /// or is not a string is remembered too (answered by `GetConfigOption`) until the table
    /// changes, which it does when the setting is first `SET` (a placeholder is added).
    struct Found {
        name: Vec<u8>,
        table: *mut *mut pg_sys::config_generic,
        len: c_int,
        index: usize,
        record: *mut pg_sys::config_string,
        record_name: *const c_char,
    }

    /// (A static, not a thread-local: see `main_thread`.)
    static FOUND: crate::main_thread::MainThread<RefCell<Option<Found>>> = crate::main_thread::MainThread::new(RefCell::new(None));

    /// `Some(value)` when the remembered record is still the setting's; `None` to fall back to
    /// `GetConfigOption` (not found, not a string setting, or the table changed and the setting
    /// is not in it).
    #[inline]
    pub(super) fn cached_value(name: &CStr) -> Option<Option<&'static CStr>> {
        FOUND.with(|f| {
            let mut f = f.borrow_mut();
            // SAFETY: reads of backend globals, no error path.
            let (table, len) = unsafe { (raw::get_guc_variables(), raw::get_num_config_options()) };
            let valid = |x: &Found| {
                x.table == table
                    && x.len == len
                    && pg_envelope_core::text::short_eq(&x.name, name.to_bytes())
                    && (x.record.is_null()
                        // SAFETY: index < len: inside the table.
                        || (unsafe { *table.add(x.index) } == x.record.cast()
                            // SAFETY: the entry is the remembered record, so it is alive.
                            && unsafe { (*x.record).gen_.name } == x.record_name))
            };
            if !f.as_ref().is_some_and(valid) {
                *f = Some(find(name, table, len));
            }
            let x = f.as_ref().expect("just set");
            if x.record.is_null() {
                return None;
            }
            // SAFETY: a live string setting's record; its variable points at the current value
            // (NULL when the setting has none), owned by the GUC machinery.
            let p = unsafe { *(*x.record).variable };
            Some(if p.is_null() { None } else { Some(unsafe { CStr::from_ptr(p) }) })
        })
    }

    /// A linear search with PostgreSQL's rule for setting names (ASCII case-insensitive): the
    /// slow path, taken once per backend and again only after the table changes.
    fn find(name: &CStr, table: *mut *mut pg_sys::config_generic, len: c_int) -> Found {
        let want = name.to_bytes();
        let mut found = Found { name: want.to_vec(), table, len, index: 0, record: std::ptr::null_mut(), record_name: std::ptr::null() };
        if table.is_null() {
            return found;
        }
        for index in 0..len.max(0) as usize {
            // SAFETY: index < len; every entry is a live record with a NUL-terminated name.
            let rec = unsafe { *table.add(index) };
            let rec_name = unsafe { CStr::from_ptr((*rec).name) };
            if rec_name.to_bytes().eq_ignore_ascii_case(want) {
                // SAFETY: as above.
                if unsafe { (*rec).vartype } == pg_sys::config_type::PGC_STRING {
                    found.index = index;
                    found.record = rec.cast();
                    found.record_name = unsafe { (*rec).name };
                }
                break;
            }
        }
        found
    }
}
