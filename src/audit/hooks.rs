//! What happens around the key functions and the audit trail, recorded from PostgreSQL's hooks:
//!
//! * **Reads of the audit trail** (`ExecutorCheckPerms_hook`): every statement that reads an
//!   audit table (`SELECT`, `COPY ... TO`, a view or function over them, `pg_dump`) gets an
//!   `audit_read` record, whoever runs it, superusers included. The hook runs after PostgreSQL's
//!   own permission checks passed.
//! * **Refusals** (`emit_log_hook`): a role without EXECUTE on a key-management function, or
//!   without SELECT on an audit table, gets PostgreSQL's 42501 before any of our code runs; the
//!   hook turns that error into a `key_op` / `audit_read` record with the outcome `42501`. Errors
//!   our own functions raise are recorded by [`crate::error::OrRaise`]'s audited variant.
//!
//! The hook code reads no catalog in the error path: names come from what the executor hook
//! cached for the statement (the session, the current role).

use std::cell::{Cell, RefCell};
use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

/// The key-management and audit functions whose refusals are recorded.
const AUDITED_FUNCTIONS: &[&str] = &[
    "add_key_provider", "verify_provider", "create_tenant", "grant_tenant", "revoke_tenant", "rewrap_tenant",
    "rewrap_tenants_start", "rewrap_tenants_batch", "rotate_data_key", "rotate_tenant_key", "disable_data_key",
    "enable_data_key", "destroy_data_key", "suspend_tenant", "resume_tenant", "lockdown", "lift_lockdown",
    "schedule_shred", "cancel_shred", "confirm_shred", "audit_verify", "audit_prune", "audit_export",
];

/// The audit tables (and the view `audit_log` over `audit_blocks`): reads are recorded.
const AUDIT_TABLES: &[&CStr] = &[c"audit_log", c"audit_blocks", c"audit_checkpoints", c"audit_alerts", c"audit_hourly"];

static mut PREV_PERMS: pg_sys::ExecutorCheckPerms_hook_type = None;
static mut PREV_EMIT: pg_sys::emit_log_hook_type = None;
static mut PREV_PARSE: pg_sys::post_parse_analyze_hook_type = None;

thread_local! {
    static SUPPRESS: Cell<u32> = const { Cell::new(0) };
    /// The audit tables' oids in this database (resolved when the extension exists here).
    static RELS: Cell<Option<[u32; 5]>> = const { Cell::new(None) };
    /// The current role's oid and name as of the last statement start (for the error path).
    static ROLE: RefCell<Vec<(u32, String)>> = const { RefCell::new(Vec::new()) };
    static IN_EMIT: Cell<bool> = const { Cell::new(false) };
    /// What the current role may not do among the extension's audited objects, for
    /// [`emit_log`]'s filter: (role oid, the PRIVS_GENERATION it was computed at, audit tables
    /// lacking SELECT as bits in AUDIT_TABLES order, audited functions lacking EXECUTE as bits
    /// in AUDITED_FUNCTIONS order).
    static PRIVS: Cell<Option<(u32, u64, u8, u32)>> = const { Cell::new(None) };
    /// The refusal records' rate limit: (start of the current one-second window, records in it).
    static REFUSAL_LIMIT: Cell<(Option<std::time::Instant>, u32)> = const { Cell::new((None, 0)) };
    /// Refusals over the limit, not yet recorded: (role name, kind, object, count). Written as
    /// one record each at the next refusal after the window, after the next statement's parse
    /// once the window has passed, or when the backend exits.
    static SUPPRESSED: RefCell<Vec<(String, &'static str, String, u64)>> = const { RefCell::new(Vec::new()) };
    static EXIT_FLUSH: Cell<bool> = const { Cell::new(false) };
}

/// Refusal records a backend may write per second (see [`emit_log`]).
const REFUSALS_PER_SECOND: u32 = 10;

/// Bumped when privileges may have changed (functions' ACLs, roles and memberships, the audit
/// tables): the filter is computed again after the next statement is parsed.
static PRIVS_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Syscache callback (pg_proc, pg_authid, pg_auth_members; registered in `_PG_init`).
pub unsafe extern "C-unwind" fn on_privileges_changed(_arg: pg_sys::Datum, _cache_id: std::ffi::c_int, _hash: u32) {
    PRIVS_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// The current [`PRIVS_GENERATION`] (also keys the role-name cache, `backend::role_name`).
#[inline]
pub fn privileges_generation() -> u64 {
    PRIVS_GENERATION.load(std::sync::atomic::Ordering::Relaxed)
}

pub fn register() {
    unsafe {
        PREV_PERMS = pg_sys::ExecutorCheckPerms_hook;
        pg_sys::ExecutorCheckPerms_hook = Some(check_perms);
        PREV_EMIT = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(emit_log);
        PREV_PARSE = pg_sys::post_parse_analyze_hook;
        pg_sys::post_parse_analyze_hook = Some(post_parse);
    }
}

/// After every statement is parsed (before any refusal, where the catalog may be read): in a
/// database with the extension, note the role and which of the extension's audited objects it
/// may not use. A hook around the executor's start would be simpler, but a Rust frame there
/// re-raises PostgreSQL's errors (losing their message ids), so the filter is kept ready here.
#[pg_guard]
unsafe extern "C-unwind" fn post_parse(pstate: *mut pg_sys::ParseState, query: *mut pg_sys::Query, jstate: *mut pg_sys::JumbleState) {
    if let Some(prev) = PREV_PARSE {
        prev(pstate, query, jstate);
    }
    if !super::enabled()
        || SUPPRESS.with(|s| s.get()) != 0
        || !crate::nothrow::is_transaction_state()
        || crate::nothrow::is_aborted_transaction_block_state()
        || crate::nothrow::is_in_parallel_mode()
        // Catalog caches only (no snapshot needed): every statement, utility ones included
        // (a COPY as a session's first statement, a pooler's SET ROLE: third review).
        || audit_rels().is_none()
    {
        return;
    }
    super::prime_session();
    note_role_name();
    flush_suppressed(false);
    // Statements that need no snapshot (SET, BEGIN, ...) go no further: taking one here would
    // fix a REPEATABLE READ transaction's snapshot too early.
    if !crate::nothrow::active_snapshot_set() {
        return;
    }
    super::alerts::preload_canaries();
    let role = crate::nothrow::current_user_id().to_u32();
    let generation = PRIVS_GENERATION.load(std::sync::atomic::Ordering::Relaxed);
    if PRIVS.with(|p| p.get()).is_some_and(|(r, g, _, _)| r == role && g == generation) {
        return;
    }
    let (tables, functions) = lacking_privileges();
    PRIVS.with(|p| p.set(Some((role, generation, tables, functions))));
}

/// The audit tables the current role may not SELECT and the audited functions it may not
/// EXECUTE (any overload), as bits.
fn lacking_privileges() -> (u8, u32) {
    let tables: Vec<String> = AUDIT_TABLES.iter().filter_map(|t| t.to_str().ok()).map(String::from).collect();
    let functions: Vec<String> = AUDITED_FUNCTIONS.iter().map(|f| f.to_string()).collect();
    let found = without_read_records(|| {
        Spi::connect(|c| {
            let row = c
                .select(
                    "SELECT coalesce((SELECT pg_catalog.array_agg(c.relname::text) FROM pg_catalog.pg_class c
                                       WHERE c.relnamespace OPERATOR(pg_catalog.=) 'envelope'::pg_catalog.regnamespace
                                         AND c.relname::text OPERATOR(pg_catalog.=) ANY ($1)
                                         AND NOT pg_catalog.has_table_privilege(c.oid, 'SELECT')), '{}'),
                            coalesce((SELECT pg_catalog.array_agg(DISTINCT p.proname::text) FROM pg_catalog.pg_proc p
                                       WHERE p.pronamespace OPERATOR(pg_catalog.=) 'envelope'::pg_catalog.regnamespace
                                         AND p.proname::text OPERATOR(pg_catalog.=) ANY ($2)
                                         AND NOT pg_catalog.has_function_privilege(p.oid, 'EXECUTE')), '{}')",
                    None,
                    &[tables.into(), functions.into()],
                )?
                .first();
            Ok::<_, pgrx::spi::Error>((row.get::<Vec<String>>(1)?.unwrap_or_default(), row.get::<Vec<String>>(2)?.unwrap_or_default()))
        })
    });
    let Ok((t, f)) = found else { return (0, 0) };
    let tbits = AUDIT_TABLES.iter().enumerate().filter(|(_, n)| t.iter().any(|x| n.to_str().is_ok_and(|n| n == x))).fold(0u8, |m, (i, _)| m | 1 << i);
    let fbits = AUDITED_FUNCTIONS.iter().enumerate().filter(|(_, n)| f.iter().any(|x| x == **n)).fold(0u32, |m, (i, _)| m | 1 << i);
    (tbits, fbits)
}

/// Runs `f` without recording its reads of the audit tables (audit_verify records one read of
/// its own; the writer reads the chain's head).
pub fn without_read_records<R>(f: impl FnOnce() -> R) -> R {
    struct Undo;
    impl Drop for Undo {
        fn drop(&mut self) {
            SUPPRESS.with(|s| s.set(s.get().saturating_sub(1)));
        }
    }
    SUPPRESS.with(|s| s.set(s.get() + 1));
    let _undo = Undo;
    f()
}

/// From the relcache callback: an audit table changed or went (DROP EXTENSION): resolve again.
pub fn on_relcache_changed(relid: pg_sys::Oid) {
    RELS.with(|r| {
        if let Some(rels) = r.get() {
            if relid == pg_sys::InvalidOid || rels.contains(&relid.to_u32()) {
                r.set(None);
                PRIVS_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
}

fn audit_rels() -> Option<[u32; 5]> {
    if let Some(r) = RELS.with(|r| r.get()) {
        return Some(r);
    }
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"envelope".as_ptr(), true);
        if ns == pg_sys::InvalidOid {
            return None;
        }
        let mut rels = [0u32; 5];
        for (i, name) in AUDIT_TABLES.iter().enumerate() {
            rels[i] = pg_sys::get_relname_relid(name.as_ptr(), ns).to_u32();
        }
        if rels[0] == 0 {
            return None;
        }
        // The extension's own table, not a look-alike: anyone with CREATE on a database can make
        // a schema `envelope` with a table `audit_log` (an insider review did, and every
        // statement in that database then failed looking for the extension).
        let ext = pg_sys::get_extension_oid(c"pg_envelope".as_ptr(), true);
        if ext == pg_sys::InvalidOid || pg_sys::getExtensionOfObject(pg_sys::RelationRelationId, pg_sys::Oid::from(rels[0])) != ext {
            return None;
        }
        RELS.with(|r| r.set(Some(rels)));
        Some(rels)
    }
}

fn remember_role() {
    super::prime_session();
    super::alerts::preload_canaries();
    note_role_name();
}

/// Keeps the current role's name for the error path (the last 16 roles seen: a pooled
/// connection's SET ROLE, SECURITY DEFINER owners).
fn note_role_name() {
    let role = crate::nothrow::current_user_id();
    ROLE.with(|r| {
        let mut r = r.borrow_mut();
        if !r.iter().any(|(o, _)| *o == role.to_u32()) {
            if r.len() >= 16 {
                r.remove(0);
            }
            r.push((role.to_u32(), crate::backend::role_name(role)));
        }
    });
}

fn role_for_error_path() -> String {
    let role = crate::nothrow::current_user_id().to_u32();
    ROLE.with(|r| r.borrow().iter().find(|(o, _)| *o == role).map(|(_, n)| n.clone())).unwrap_or_else(|| format!("oid {role}"))
}

/// Writes the refusals counted over the rate limit, one record per role, kind and object.
/// `in_error_path`: from emit_log or the exit callback (no waiting for room). Outside them
/// only once the limit's window has passed.
fn flush_suppressed(in_error_path: bool) {
    if SUPPRESSED.with(|s| s.try_borrow().map_or(true, |s| s.is_empty())) {
        return;
    }
    if !in_error_path && REFUSAL_LIMIT.with(|l| l.get().0.is_some_and(|w| w.elapsed() < std::time::Duration::from_secs(1))) {
        return;
    }
    let Ok(pending) = SUPPRESSED.with(|s| s.try_borrow_mut().map(|mut s| std::mem::take(&mut *s))) else { return };
    for (role, kind, name, count) in pending {
        let mut r = refusal_record(kind, role, name, count);
        r.detail = format!("{}{count} refusals in this session recorded as one (over the limit of {REFUSALS_PER_SECOND} records a second)",
                           if r.detail.is_empty() { String::new() } else { format!("{}; ", r.detail) });
        if in_error_path {
            super::push_in_error_path(r);
        } else {
            super::push(r);
        }
    }
}

/// A refusal record: `key_op` names the function as its operation, `audit_read` the table in
/// its detail; `count` refusals with the outcome 42501.
fn refusal_record(kind: &str, role: String, name: String, count: u64) -> super::Record {
    let mut r = super::base_record(kind, role);
    if kind == "key_op" {
        r.operation = name;
    } else {
        r.operation = "select".into();
        r.detail = name;
    }
    r.value_count = count as i64;
    r.failure_count = count as i64;
    r.outcome = "42501".into();
    r
}

/// Registers (once per process) the exit callback that writes the refusals the rate limit held
/// back.
pub(crate) fn ensure_exit_flush() {
    if !EXIT_FLUSH.with(|f| f.replace(true)) {
        unsafe { pg_sys::before_shmem_exit(Some(flush_at_exit), pg_sys::Datum::from(0)) };
    }
}

/// At backend exit: what was counted over the limit is written, not lost.
unsafe extern "C-unwind" fn flush_at_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    if IN_EMIT.with(|e| e.get()) {
        return;
    }
    let _ = std::panic::catch_unwind(|| flush_suppressed(true));
}

/// The audit tables among `(relid, required permissions, checked as another role)`, when one is
/// read.
fn tables_read(rels: impl Iterator<Item = (pg_sys::Oid, u64, bool)>) -> Option<String> {
    let mut read: Vec<&'static str> = Vec::new();
    let mut blocks_directly = false;
    let mut audit = None;
    for (relid, perms, as_other) in rels {
        if perms & pg_sys::ACL_SELECT as u64 == 0 {
            continue;
        }
        let Some(ours) = audit.get_or_insert_with(audit_rels) else { return None };
        if let Some(i) = ours.iter().position(|&o| o != 0 && o == relid.to_u32()) {
            let name = AUDIT_TABLES[i].to_str().unwrap_or("");
            blocks_directly |= name == "audit_blocks" && !as_other;
            if !read.contains(&name) {
                read.push(name);
            }
        }
    }
    // audit_log's own read of its table (checked as the view's owner) is the view's read; the
    // table named in the statement itself, or read through another view, is recorded too
    // (insider review 45).
    if read.contains(&"audit_log") && !blocks_directly {
        read.retain(|n| *n != "audit_blocks");
    }
    (!read.is_empty()).then(|| read.iter().map(|n| format!("envelope.{n}")).collect::<Vec<_>>().join(","))
}

fn record_read(tables: String) {
    super::prime_session();
    let mut r = super::base_record("audit_read", crate::backend::role_name(crate::nothrow::current_user_id()));
    r.operation = "select".into();
    r.detail = tables;
    r.value_count = 1;
    r.outcome = "ok".into();
    super::push(r);
}

unsafe fn list_ptrs(l: *mut pg_sys::List) -> impl Iterator<Item = *mut std::ffi::c_void> {
    let n = if l.is_null() { 0 } else { (*l).length as usize };
    (0..n).map(move |i| (*(*l).elements.add(i)).ptr_value)
}

#[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
#[pg_guard]
unsafe extern "C-unwind" fn check_perms(range_table: *mut pg_sys::List, ereport: bool) -> bool {
    let ok = match PREV_PERMS {
        Some(prev) => prev(range_table, ereport),
        None => true,
    };
    // Only where the extension is installed (its audit tables exist): a database without it
    // (postgres, template1, a monitoring database) is not touched, and must not fail.
    // (Parallel workers too: a query a function runs inside a worker is seen only there. The
    // audit tables are never scanned in parallel (parallel_workers = 0, the decoder PARALLEL
    // RESTRICTED: sql/audit.sql), so workers do not repeat the leader's reads. Skipping the
    // worker's check of the plan the leader sent, by executor depth, let functions run during
    // the worker's plan start-up (partition pruning) read the trail unrecorded: reviews 45, 46.)
    if ok && super::enabled() && SUPPRESS.with(|s| s.get()) == 0 && audit_rels().is_some() {
        remember_role();
        let rels = list_ptrs(range_table).map(|p| p.cast::<pg_sys::RangeTblEntry>()).filter_map(|rte| {
            ((*rte).rtekind == pg_sys::RTEKind::RTE_RELATION)
                .then(|| ((*rte).relid, (*rte).requiredPerms as u64, (*rte).checkAsUser != pg_sys::InvalidOid))
        });
        if let Some(t) = tables_read(rels) {
            record_read(t);
        }
    }
    ok
}

#[cfg(any(feature = "pg16", feature = "pg17", feature = "pg18"))]
#[pg_guard]
unsafe extern "C-unwind" fn check_perms(range_table: *mut pg_sys::List, perm_infos: *mut pg_sys::List, ereport: bool) -> bool {
    let ok = match PREV_PERMS {
        Some(prev) => prev(range_table, perm_infos, ereport),
        None => true,
    };
    // Only where the extension is installed (its audit tables exist): a database without it
    // (postgres, template1, a monitoring database) is not touched, and must not fail.
    // (Parallel workers too: a query a function runs inside a worker is seen only there. The
    // audit tables are never scanned in parallel (parallel_workers = 0, the decoder PARALLEL
    // RESTRICTED: sql/audit.sql), so workers do not repeat the leader's reads. Skipping the
    // worker's check of the plan the leader sent, by executor depth, let functions run during
    // the worker's plan start-up (partition pruning) read the trail unrecorded: reviews 45, 46.)
    if ok && super::enabled() && SUPPRESS.with(|s| s.get()) == 0 && audit_rels().is_some() {
        remember_role();
        let rels = list_ptrs(perm_infos)
            .map(|p| p.cast::<pg_sys::RTEPermissionInfo>())
            .map(|pi| ((*pi).relid, (*pi).requiredPerms as u64, (*pi).checkAsUser != pg_sys::InvalidOid));
        if let Some(t) = tables_read(rels) {
            record_read(t);
        }
    }
    ok
}

/// PostgreSQL's refusals of EXECUTE on a key-management function and of SELECT on an audit
/// table, as records. In the error path: no catalog access, no error, no log line.
#[pg_guard]
unsafe extern "C-unwind" fn emit_log(edata: *mut pg_sys::ErrorData) {
    if let Some(prev) = PREV_EMIT {
        prev(edata);
    }
    if edata.is_null()
        || (*edata).elevel < pg_sys::PGERROR as i32
        || (*edata).sqlerrcode != pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE as i32
        || (*edata).message_id.is_null()
        || (*edata).message.is_null()
        || IN_EMIT.with(|e| e.get())
        || !super::enabled()
    {
        return;
    }
    // PostgreSQL's own ACL refusal, not a look-alike: an error with the same text raised by
    // PL/pgSQL (RAISE ... USING ERRCODE = '42501') in a trigger could otherwise frame the role
    // running the statement (third review). Re-raised errors keep their origin.
    if (*edata).funcname.is_null() || CStr::from_ptr((*edata).funcname).to_bytes() != b"aclcheck_error" {
        return;
    }
    // Only in a database where the extension is installed (resolved after each statement's
    // parse): a refusal elsewhere names nothing of ours (second review: records forged from
    // other databases).
    if RELS.with(|r| r.get()).is_none() {
        return;
    }
    let id = CStr::from_ptr((*edata).message_id).to_bytes();
    let message = CStr::from_ptr((*edata).message).to_string_lossy();
    // The untranslated message id, or (when a Rust hook re-raised the error on its way out, as
    // pgrx does around the utility and executor hooks: DO, EXECUTE, cursors, COPY, functions;
    // found by the third review) the English text itself. A translated, re-raised refusal is
    // not recognised (lc_messages other than English, which only a superuser sets: documented).
    let (is_function, is_table) = (
        id == b"permission denied for function %s" || message.starts_with("permission denied for function "),
        id == b"permission denied for table %s"
            || id == b"permission denied for view %s"
            || message.starts_with("permission denied for table ")
            || message.starts_with("permission denied for view "),
    );
    // The message names the object only. When the role's privileges on the extension's objects
    // are known and current (computed after a parse), a refusal on an object of ours that the
    // role may use is its own look-alike: not recorded. Otherwise (a SECURITY DEFINER owner, a
    // role set since the last parse) the refusal is recorded: it is PostgreSQL's, in this
    // database, of an object named like ours, and it names the role that got it.
    let role = crate::nothrow::current_user_id().to_u32();
    let generation = PRIVS_GENERATION.load(std::sync::atomic::Ordering::Relaxed);
    let (lack_tables, lack_functions) = PRIVS
        .with(|p| p.get())
        .filter(|p| p.0 == role && p.1 == generation)
        .map_or((u8::MAX, u32::MAX), |p| (p.2, p.3));
    let (kind, name) = if is_function {
        // The longest known name in the (possibly translated) message.
        match AUDITED_FUNCTIONS
            .iter()
            .enumerate()
            .filter(|(i, f)| lack_functions & (1 << i) != 0 && message.contains(**f))
            .max_by_key(|(_, f)| f.len())
        {
            Some((_, f)) => ("key_op", f.to_string()),
            None => return,
        }
    } else if is_table {
        match AUDIT_TABLES
            .iter()
            .enumerate()
            .filter(|(i, _)| lack_tables & (1 << i) != 0)
            .filter_map(|(_, t)| t.to_str().ok())
            .filter(|t| message.contains(*t))
            .max_by_key(|t| t.len())
        {
            Some(t) => ("audit_read", format!("envelope.{t}")),
            None => return,
        }
    } else {
        return;
    };
    IN_EMIT.with(|e| e.set(true));
    let _ = std::panic::catch_unwind(|| {
        let role_name = role_for_error_path();
        // At most REFUSALS_PER_SECOND refusal records a second per backend (a role with nothing
        // but CONNECT wrote 950,000 in 20 s and filled the queue: third review). The refusals
        // over the limit are counted per role and object and written as one record each later
        // (flush_suppressed), also when the backend exits.
        let allowed = REFUSAL_LIMIT.with(|l| {
            let (mut window, mut n) = l.get();
            if window.is_none_or(|w| w.elapsed() >= std::time::Duration::from_secs(1)) {
                window = Some(std::time::Instant::now());
                n = 0;
            }
            let ok = n < REFUSALS_PER_SECOND;
            l.set((window, if ok { n + 1 } else { n }));
            ok
        });
        if !allowed {
            let _ = SUPPRESSED.with(|s| {
                s.try_borrow_mut().map(|mut s| {
                    let at = s.iter().position(|e| e.0 == role_name && e.1 == kind && e.2 == name);
                    match at {
                        Some(i) => s[i].3 += 1,
                        None if s.len() < 64 => s.push((role_name.clone(), kind, name.clone(), 1)),
                        // Beyond 64 distinct objects: counted with the last.
                        None => {
                            if let Some(e) = s.last_mut() {
                                e.3 += 1;
                            }
                        }
                    }
                })
            });
            ensure_exit_flush();
            return;
        }
        flush_suppressed(true);
        super::push_in_error_path(refusal_record(kind, role_name, name, 1));
    });
    IN_EMIT.with(|e| e.set(false));
}
