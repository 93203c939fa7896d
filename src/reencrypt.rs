//! Online re-encryption of stored values, SQL glue: the steps of `CALL envelope.reencrypt(...)`
//! (sql/reencrypt.sql) and the per-value functions its UPDATEs call.
//!
//! A job walks one column of one table in block ranges (`ctid` ranges, a TID range scan), one
//! committed batch per range: `UPDATE t SET col = envelope.reencrypt_value(col) WHERE ctid in
//! the range AND envelope.needs_reencryption(col)`. The job's row in `envelope.reencrypt_jobs`
//! is updated in the same transaction as its batch, so after a crash (kill -9, immediate
//! shutdown) the next `CALL` resumes exactly after the last committed batch. The caller needs
//! UPDATE on the column (checked when the job opens); the UPDATE itself runs as the table's
//! owner inside a security-restricted operation with the search path pinned, as VACUUM runs a
//! table's code (catalog::as_table_owner): the table's triggers and index expressions never run
//! with a key administrator's or superuser's rights. `row_security` is off for it, so a table
//! whose policies bind the owner gets an error instead of a silently partial job. It takes ROW
//! EXCLUSIVE on the table and row locks for one batch only. A row the application updates meanwhile is
//! re-evaluated by PostgreSQL (READ COMMITTED's EvalPlanQual): the new value is re-encrypted or,
//! being under the active version already, left alone; never overwritten with its old value.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

use crate::backend;
use crate::catalog;
use crate::error::{EnvelopeError, OrRaise, Result};
use crate::types::{ByteaOut, TextBytes};

thread_local! {
    /// The token of the re-encryption batch running in this backend (0: none). The batch's
    /// UPDATE passes it to the per-value functions as a bound parameter; code of the table's
    /// owner that runs inside the batch (triggers, index expressions) cannot see it, so it cannot
    /// use those functions as an oracle on other values.
    static BATCH_TOKEN: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
    /// The table and column the running batch's UPDATE re-encrypts (for blind_index_trigger).
    static BATCH_TARGET: std::cell::RefCell<Option<(u32, String)>> = const { std::cell::RefCell::new(None) };
}

/// While a re-encryption batch's UPDATE runs in this backend: the table (oid) and the column
/// it re-encrypts. That UPDATE changes no plaintext, so `blind_index_trigger` keeps the rows'
/// terms instead of computing them (it has no tenant there: the batch runs without one).
pub fn batch_target() -> Option<(pg_sys::Oid, String)> {
    if BATCH_TOKEN.with(|c| c.get()) == 0 {
        return None;
    }
    BATCH_TARGET.with(|t| t.borrow().as_ref().map(|(r, c)| (pg_sys::Oid::from(*r), c.clone())))
}

/// A batch in progress; the token is cleared on drop, also when an error unwinds through it.
struct BatchScope(i64);
impl BatchScope {
    fn enter() -> Self {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).unwrap_or_else(|e| EnvelopeError::Internal(format!("operating system random source failed: {e}")).raise());
        let t = (i64::from_le_bytes(b) & i64::MAX).max(1);
        BATCH_TOKEN.with(|c| c.set(t));
        BatchScope(t)
    }
}
impl Drop for BatchScope {
    fn drop(&mut self) {
        BATCH_TOKEN.with(|c| c.set(0));
        BATCH_TARGET.with(|t| t.borrow_mut().take());
    }
}

/// The per-value functions use a tenant's keys without a tenant grant: they work only for the
/// UPDATE of a batch a key administrator started (`reencrypt_batch` needs EXECUTE, which PUBLIC
/// lacks), identified by the batch's token, whichever role the UPDATE runs as.
fn require_batch(token: i64) {
    let current = BATCH_TOKEN.with(|c| c.get());
    if current == 0 || token != current {
        bad(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "pg_envelope: re-encryption functions run only inside CALL envelope.reencrypt".into(),
            Some("Use CALL envelope.reencrypt(table, column) (key administrators)."),
        )
        .raise()
    }
}

/// Re-encrypts a stored `encrypt_field` value (bytea) under its tenant's active data key, with
/// the same context (NULL: no context, like `encrypt_field`). NULL stays NULL. The tenant comes
/// from the header; no tenant grant is needed. Only for the UPDATE of a re-encryption batch (its
/// token). The plaintext never leaves this call. Not STRICT: a NULL context must not make the
/// result NULL.
#[pg_extern(volatile, parallel_unsafe)]
fn reencrypt_value(value: Option<&[u8]>, context: Option<TextBytes>, batch_token: Option<i64>) -> Option<ByteaOut> {
    require_batch(batch_token.unwrap_or(0));
    let value = value?;
    // The context's bytes in the database encoding, as `encrypt_field` bound them (not `&str`,
    // which refuses non-UTF-8 text: a LATIN1 context could not be re-encrypted; review 35).
    let ctx = context.as_ref().map(|c| c.0);
    if ctx.is_some_and(|c| c.starts_with(crate::api::RESERVED_CONTEXT_PREFIX)) {
        EnvelopeError::ReservedContext.raise();
    }
    Some(ByteaOut(backend::reencrypt_to(value, ctx).or_raise()))
}

/// Whether a stored value is under a data key version other than its tenant's active one.
/// One C function for bytea and every encrypted type (declared by hand in sql/reencrypt.sql).
/// Only for the UPDATE of a re-encryption batch (its token).
#[pg_extern(volatile, parallel_unsafe, strict)]
fn needs_reencryption(value: &[u8], batch_token: i64) -> bool {
    require_batch(batch_token);
    backend::needs_reencryption(value).or_raise()
}

/// For the typed `reencrypt_value` (src/types.rs).
pub fn check_in_batch(token: i64) {
    require_batch(token)
}

/// Values of one column per tenant and data key version, read from headers (no key, no grant).
/// The scan runs as the table's owner in a security-restricted operation (like a batch), so the
/// table's policies or a view's functions never run with the caller's rights; the caller needs
/// SELECT on the column. Values that are not pg_envelope ciphertexts are counted with version
/// NULL. Key administrators.
#[pg_extern(volatile, parallel_unsafe)]
fn column_key_versions_of(
    tbl: pg_sys::Oid,
    col: &str,
) -> TableIterator<
    'static,
    (
        name!(tenant, Option<String>),
        name!(tenant_key_id, Option<i32>),
        name!(version, Option<i32>),
        name!(state, Option<String>),
        name!(values, i64),
    ),
> {
    TableIterator::new(column_key_versions_impl(tbl, col).or_raise())
}

type VersionCount = (Option<String>, Option<i32>, Option<i32>, Option<String>, i64);

fn column_key_versions_impl(tbl: pg_sys::Oid, col: &str) -> Result<Vec<VersionCount>> {
    use PgSqlErrorCode::*;
    let target = checked_target(tbl, col, None)?;
    if !target.can_select {
        return Err(bad(
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("pg_envelope: permission denied to read column \"{col}\" of {}", target.table),
            None,
        ));
    }
    let c = quote_ident(col);
    let sql = format!(
        "SELECT h, count(*) FROM (SELECT envelope.key_header(t.{c}) AS h FROM ONLY {} AS t WHERE t.{c} IS NOT NULL) x GROUP BY h ORDER BY h",
        target.table
    );
    let counts = catalog::as_table_owner(tbl, || catalog::header_counts(&sql))?;
    catalog::name_versions(counts)
}

/// The checks every re-encryption entry point makes of its target: a plain table without
/// inheritance children (partitions and children are done one by one), the column bytea or an
/// encrypted type (or a domain over one).
fn checked_target(tbl: pg_sys::Oid, col: &str, context_column: Option<&str>) -> Result<catalog::ReencryptTarget> {
    use PgSqlErrorCode::*;
    let target = catalog::reencrypt_target(tbl, col, context_column)?
        .ok_or_else(|| bad(ERRCODE_UNDEFINED_TABLE, format!("pg_envelope: no table with oid {}", tbl.to_u32()), None))?;
    match target.relkind {
        'r' if target.has_children => {
            return Err(bad(
                ERRCODE_WRONG_OBJECT_TYPE,
                format!("pg_envelope: {} has inheritance children", target.table),
                Some("Run it for the parent and for each child: it reads and updates ONLY the table named."),
            ))
        }
        'r' => {}
        'p' => {
            return Err(bad(
                ERRCODE_WRONG_OBJECT_TYPE,
                format!("pg_envelope: {} is a partitioned table", target.table),
                Some("Run it for each partition: CALL envelope.reencrypt('<partition>', '<column>')."),
            ))
        }
        _ => return Err(bad(ERRCODE_WRONG_OBJECT_TYPE, format!("pg_envelope: {} is not a table", target.table), None)),
    }
    match target.column_kind.as_deref() {
        None => Err(bad(ERRCODE_UNDEFINED_COLUMN, format!("pg_envelope: column \"{col}\" of {} does not exist", target.table), None)),
        Some("bytea") | Some("encrypted") => Ok(target),
        Some(other) => Err(bad(
            ERRCODE_DATATYPE_MISMATCH,
            format!("pg_envelope: column \"{col}\" of {} is of type {other}, not an encrypted type or bytea", target.table),
            Some("Only columns written by pg_envelope can be re-encrypted."),
        )),
    }
}

fn bad(code: PgSqlErrorCode, message: String, hint: Option<&str>) -> EnvelopeError {
    EnvelopeError::BadRequest { code, message, hint: hint.map(str::to_string) }
}

/// Opens a re-encryption job for one column, or resumes the open one; returns its id. Checks
/// the table (a plain table), the column (bytea, or an encrypted type or a domain over one),
/// the context (bytea columns only: a constant or a column) and the caller's UPDATE privilege.
#[pg_extern(volatile, parallel_unsafe)]
fn reencrypt_open(
    tbl: Option<pg_sys::Oid>,
    col: Option<&str>,
    context: default!(Option<TextBytes>, "NULL"),
    context_column: default!(Option<&str>, "NULL"),
    batch_rows: default!(Option<i32>, 10000),
    queued: default!(Option<bool>, false),
) -> i64 {
    // The job row keeps a constant context as UTF-8 text; a context that is not (non-ASCII in
    // a LATIN1 database) is refused clearly, and context_column takes any bytes.
    let context = match context.as_ref().map(|c| std::str::from_utf8(c.0)) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(_)) => bad(
            PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            "pg_envelope: a constant re-encryption context must be UTF-8 text".into(),
            Some("Put the context in a column and give context_column instead: it is read as the column's bytes."),
        )
        .raise(),
    };
    let (Some(tbl), Some(col), Some(batch_rows), Some(queued)) = (tbl, col, batch_rows, queued) else {
        bad(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "pg_envelope: table, column, batch_rows and queued must not be NULL".into(),
            None,
        )
        .raise()
    };
    open_impl(tbl, col, context, context_column, batch_rows, queued).or_raise()
}

fn open_impl(tbl: pg_sys::Oid, col: &str, context: Option<&str>, context_column: Option<&str>, batch_rows: i32, queued: bool) -> Result<i64> {
    use PgSqlErrorCode::*;
    if context.is_some() && context_column.is_some() {
        return Err(bad(ERRCODE_INVALID_PARAMETER_VALUE, "pg_envelope: give either context or context_column, not both".into(), None));
    }
    if !(1..=10_000_000).contains(&batch_rows) {
        return Err(bad(ERRCODE_INVALID_PARAMETER_VALUE, "pg_envelope: batch_rows must be between 1 and 10000000".into(), None));
    }
    let target = checked_target(tbl, col, context_column)?;
    let typed = target.column_kind.as_deref() == Some("encrypted");
    if typed && (context.is_some() || context_column.is_some()) {
        return Err(bad(
            ERRCODE_INVALID_PARAMETER_VALUE,
            format!("pg_envelope: column \"{col}\" is of an encrypted type; its values have no context of yours"),
            Some("Give context or context_column only for bytea columns written by encrypt_field(value, context)."),
        ));
    }
    if context.is_some_and(|c| c.as_bytes().starts_with(crate::api::RESERVED_CONTEXT_PREFIX)) {
        return Err(EnvelopeError::ReservedContext);
    }
    if let Some(cc) = context_column {
        if !target.context_column_exists {
            return Err(bad(ERRCODE_UNDEFINED_COLUMN, format!("pg_envelope: column \"{cc}\" of {} does not exist", target.table), None));
        }
    }
    if !target.can_update {
        return Err(bad(
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("pg_envelope: permission denied to update column \"{col}\" of {}", target.table),
            Some("Re-encryption needs UPDATE on the column; its batches then run as the table owner (which, on a table with FORCE ROW LEVEL SECURITY, needs BYPASSRLS)."),
        ));
    }
    // Two callers opening a job of one column at once: the second one's insert waits for the
    // first one's and then finds it (a job that finished meanwhile: a new one; bounded).
    for _ in 0..3 {
        if let Some(open) = catalog::open_reencrypt_job(tbl, col)? {
            if open.context.as_deref() != context || open.context_column.as_deref() != context_column {
                return Err(bad(
                    ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("pg_envelope: re-encryption job {} of this column is open with another context", open.id),
                    Some("Finish it with the same arguments, or cancel it: SELECT envelope.cancel_reencrypt(<job>)."),
                ));
            }
            if !queued {
                catalog::set_reencrypt_job_running(open.id)?;
            }
            crate::notice!("pg_envelope: resuming re-encryption job {} of {}.{} at block {}", open.id, target.table, col, open.next_block);
            return Ok(open.id);
        }
        let per_block = target.rows_per_block.max(1.0);
        let batch_blocks = ((batch_rows as f64) / per_block).ceil().clamp(1.0, 1_000_000.0) as i32;
        if let Some(job) = catalog::insert_reencrypt_job(tbl, &target.table, col, context, context_column, batch_blocks, queued)? {
            return Ok(job);
        }
    }
    Err(bad(
        ERRCODE_T_R_SERIALIZATION_FAILURE,
        "pg_envelope: re-encryption jobs of this column were opened and finished concurrently".into(),
        Some("Run it again."),
    ))
}

/// Runs the next batch of a re-encryption job in the caller's transaction; returns how many
/// values it re-encrypted, or -1 when the job is finished (done or cancelled).
#[pg_extern(volatile, parallel_unsafe)]
fn reencrypt_batch(job: i64) -> i64 {
    batch_impl(job).or_raise()
}

pub fn batch_impl(job: i64) -> Result<i64> {
    use PgSqlErrorCode::*;
    let caller = crate::nothrow::current_user_id();
    let j = catalog::lock_reencrypt_job(job)?
        .ok_or_else(|| bad(ERRCODE_UNDEFINED_OBJECT, format!("pg_envelope: no re-encryption job {job}"), None))?;
    if j.requested_by != caller && !unsafe { pg_sys::superuser() } {
        return Err(bad(
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("pg_envelope: re-encryption job {job} belongs to another role"),
            Some("A job runs as the role that opened it."),
        ));
    }
    if j.state != "running" && j.state != "queued" {
        return Ok(-1);
    }
    if !catalog::role_may_run_job(j.requested_by, j.relid, &j.column)? {
        // Marked failed (not raised): a job whose role lost its rights must not block other work.
        let m = format!(
            "the role of re-encryption job {job} may no longer update column \"{}\" or run re-encryption (EXECUTE on envelope.reencrypt_batch)",
            j.column
        );
        catalog::fail_reencrypt_job(job, &m)?;
        crate::warning!("pg_envelope: {m}; the job is marked failed");
        return Ok(-1);
    }
    let Some(qualified) = catalog::qualified_table(j.relid)? else {
        catalog::fail_reencrypt_job(job, "the table no longer exists")?;
        return Ok(-1);
    };
    // The column may have changed since the job opened (dropped, another type, children added).
    let typed = match checked_target(j.relid, &j.column, j.context_column.as_deref()) {
        Ok(t) => t.column_kind.as_deref() == Some("encrypted"),
        Err(e) => {
            let m = e.message();
            catalog::fail_reencrypt_job(job, &m)?;
            crate::warning!("pg_envelope: re-encryption job {job} failed: {m}");
            return Ok(-1);
        }
    };
    let col = quote_ident(&j.column);
    // A pass ends at the table's size when it started: rows its own updates move to new blocks
    // are under the active version already, and anything else behind the cursor (rows moved by
    // concurrent updates, appended by transactions older than the rotation) is caught by the
    // count at the end of the pass, which starts another pass.
    let current = catalog::relation_blocks(j.relid)?;
    let nblocks = j.pass_blocks.unwrap_or(current).min(current);
    if j.next_block >= nblocks {
        // End of a pass. Concurrent updates of other columns can move a row not yet visited
        // (with its value under an old version) behind the cursor; count what is left (headers
        // only) and make another pass over the table if anything is.
        let scope = BatchScope::enter();
        let remaining = catalog::run_reencrypt_count(
            j.relid,
            &format!("SELECT count(*) FROM ONLY {qualified} AS t WHERE t.{col} IS NOT NULL AND envelope.needs_reencryption(t.{col}, $1)"),
            scope.0,
        )?;
        drop(scope);
        if remaining > 0 && j.pass < MAX_PASSES {
            catalog::restart_reencrypt_pass(job, current)?;
            crate::notice!(
                "pg_envelope: re-encryption job {job} of {qualified}.{}: {remaining} values still under old versions (moved by concurrent updates); pass {} starts",
                j.column,
                j.pass + 1
            );
            return Ok(0);
        }
        catalog::finish_reencrypt_job(job, nblocks, remaining)?;
        if remaining > 0 {
            crate::warning!(
                "pg_envelope: re-encryption job {job} of {qualified}.{} ended after {MAX_PASSES} passes with {remaining} values still under old versions (the table is being updated heavily); CALL envelope.reencrypt again",
                j.column
            );
        } else {
            crate::notice!(
                "pg_envelope: re-encryption job {job} of {qualified}.{} is done: {} values re-encrypted, none left under old versions",
                j.column,
                j.values_done
            );
        }
        return Ok(-1);
    }
    let lo = j.next_block;
    let hi = lo + j.batch_blocks as i64;
    let upper = (hi < nblocks).then_some(hi);
    // $1: the batch token; $2: the constant context. Typed values have no context argument.
    let ctx = match (&j.context, &j.context_column) {
        _ if typed => String::new(),
        (Some(_), _) => ", $2".to_string(),
        (None, Some(cc)) => format!(", t.{}::pg_catalog.text", quote_ident(cc)),
        (None, None) => ", NULL".to_string(),
    };
    let mut sql = format!(
        "UPDATE ONLY {qualified} AS t SET {col} = envelope.reencrypt_value(t.{col}{ctx}, $1) \
         WHERE t.ctid >= '({lo},0)'::pg_catalog.tid"
    );
    if let Some(hi) = upper {
        sql.push_str(&format!(" AND t.ctid < '({hi},0)'::pg_catalog.tid"));
    }
    sql.push_str(&format!(" AND t.{col} IS NOT NULL AND envelope.needs_reencryption(t.{col}, $1)"));
    let n = {
        let scope = BatchScope::enter();
        BATCH_TARGET.with(|t| *t.borrow_mut() = Some((j.relid.to_u32(), j.column.clone())));
        catalog::run_reencrypt_update(j.relid, &sql, scope.0, j.context.as_deref())?
    };
    let done = j.values_done + n;
    let next = upper.unwrap_or(nblocks);
    if n > 0 {
        // One record per batch (the values are re-encrypted under each row's own tenant).
        crate::audit::key_op(
            "reencrypt_batch",
            "",
            &format!("job {job}: {qualified}.{} blocks {lo}..{next}: {n} values re-encrypted", j.column),
            false,
        );
    }
    let (rate, eta) = catalog::advance_reencrypt_job(job, next, nblocks, n)?;
    let pct = if nblocks > 0 { 100.0 * next as f64 / nblocks as f64 } else { 100.0 };
    crate::notice!(
        "pg_envelope: re-encryption job {job} of {qualified}.{}: {done} values re-encrypted, block {next} of {nblocks} ({pct:.0}%), {rate:.0} values/s{}",
        j.column,
        eta.map(|s| format!(", about {} left", human_duration(s))).unwrap_or_default()
    );
    Ok(n)
}

/// Passes over the table before a job gives up on values that concurrent updates keep moving.
const MAX_PASSES: i32 = 3;

fn human_duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s < 120 {
        format!("{s} s")
    } else if s < 7200 {
        format!("{} min", s / 60)
    } else {
        format!("{:.1} h", s as f64 / 3600.0)
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Cancels an open re-encryption job: its next batch does nothing and it is marked cancelled.
/// What was committed stays re-encrypted. Returns whether a job was open.
#[pg_extern(volatile, parallel_unsafe)]
fn cancel_reencrypt(job: i64) -> bool {
    catalog::cancel_reencrypt_job(job).or_raise()
}
