//! The one plaintext guard that must act before a statement runs: `CREATE INDEX CONCURRENTLY`.
//!
//! The event trigger of sql/plaintext_guards.sql refuses, at `ddl_command_end`, indexes whose
//! expressions or predicate read an encrypted column, by raising an error that rolls the
//! statement back. A concurrent index build commits its first phases before that point, so the
//! error would leave the index behind, invalid but maintained by every write: granted sessions
//! would compute plaintext into it. So a concurrent build with expressions or a predicate on a
//! table that has encrypted columns is refused before it starts (0A000); a plain `CREATE INDEX`
//! is checked by the event trigger as usual.

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgList;

static mut PREVIOUS: pg_sys::ProcessUtility_hook_type = None;

/// Installs the hook (from `_PG_init`), keeping whatever hook was there before.
pub fn install() {
    // SAFETY: _PG_init runs once per process, before any statement.
    unsafe {
        PREVIOUS = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

/// Whether the table has a column of an encrypted type (or a domain over one, an array of one,
/// a composite containing one): the same closure the event trigger uses.
fn has_encrypted_columns(relid: pg_sys::Oid) -> bool {
    Spi::get_one_with_args::<bool>(
        "WITH RECURSIVE enc(typ) AS (
             SELECT t.oid FROM pg_catalog.pg_type t
               JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_type'::pg_catalog.regclass AND d.objid = t.oid AND d.deptype = 'e'
               JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_envelope'
              WHERE t.typname LIKE 'encrypted\\_%'
             UNION
             SELECT t.oid FROM pg_catalog.pg_type t, enc
              WHERE t.typbasetype = enc.typ OR t.typelem = enc.typ
                 OR (t.typrelid <> 0 AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                                                  WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND a.atttypid = enc.typ)))
         SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                         WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.atttypid IN (SELECT typ FROM enc))",
        &[relid.into()],
    )
    // Fail closed: if the check cannot run, the concurrent build does not either.
    .unwrap_or_else(|e| crate::error::EnvelopeError::Internal(format!("catalog query failed: {e}")).raise())
    .unwrap_or(false)
}

/// A concurrent index with expressions or a predicate on a table with encrypted columns.
unsafe fn refused_concurrent_index(stmt: *mut pg_sys::Node) -> bool {
    if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_IndexStmt {
        return false;
    }
    let idx = stmt as *mut pg_sys::IndexStmt;
    if !(*idx).concurrent {
        return false;
    }
    let params = PgList::<pg_sys::IndexElem>::from_pg((*idx).indexParams);
    let has_expression = params.iter_ptr().any(|e| !e.is_null() && !(*e).expr.is_null());
    if (*idx).whereClause.is_null() && !has_expression {
        return false;
    }
    let relid = pg_sys::RangeVarGetRelidExtended(
        (*idx).relation,
        pg_sys::NoLock as pg_sys::LOCKMODE,
        pg_sys::RVROption::RVR_MISSING_OK,
        None,
        std::ptr::null_mut(),
    );
    relid != pg_sys::InvalidOid && has_encrypted_columns(relid)
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    crate::backend::ensure_exit_wipe();
    if refused_concurrent_index((*pstmt).utilityStmt) {
        pgrx::pg_sys::panic::ErrorReport::new(
            pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "pg_envelope: CREATE INDEX CONCURRENTLY with expressions or a predicate is not supported on a table with encrypted columns",
            "pg_envelope",
        )
        .set_detail("pg_envelope checks what such an index reads when it is created; a concurrent build commits before that check and could not be undone.")
        .set_hint("Use CREATE INDEX without CONCURRENTLY.")
        .report(pgrx::PgLogLevel::ERROR);
    }
    match PREVIOUS {
        Some(prev) => prev(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
        None => pg_sys::standard_ProcessUtility(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
    }
    // COPY, CALL, DO and the like use keys outside the executor's end.
    crate::backend::after_statement();
}
