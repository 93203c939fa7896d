//! `envelope.audit_export(from_seq)`: the trail as JSON lines, for SIEMs and the offline verifier
//! (`scripts/audit-verify.py`). The lines are built in Rust (`pg_envelope_core::audit_export`)
//! from the blocks as `audit_verify` decodes them, read by heap scans (`stored`): the first, SQL,
//! export resolved its casts and operators by name at every call, and a cast inserted into
//! `pg_cast` with a chosen low object id (insider review 58) rewrote or cut it while every check
//! passed. Nothing here is resolved by name but the two tables, which must be the extension's own.
//!
//! Order: the records from the start (the record after the newest checkpoint before `from_seq`)
//! in sequence order, a block's unreadable bytes as an `unreadable` line after its readable
//! records; then every checkpoint from the one at the start's previous record on; then the
//! trailer, which also carries what the audit writer had committed (from shared memory): the
//! offline verifier holds the export to it. The blocks' places are read first (24 bytes each)
//! with the latest snapshot (the trail as it is when the export starts, at any isolation
//! level), each block is read and decoded when its lines are due: a large trail is not held in
//! memory.
//!
//! Privileges are the caller's, as for a query: SELECT on `audit_blocks` and
//! `audit_checkpoints` (the table or every column); row-level security that applies to the
//! caller refuses the export (an export holds every record or is refused). The read is
//! recorded (`audit_read`, operation `audit_export`, with the number of records).

use std::collections::VecDeque;

use pg_envelope_core::audit_blocks::read_block;
use pg_envelope_core::audit_export as lines;
use pgrx::pg_sys;
use pgrx::prelude::*;

use super::stored::{self, BlockRef, Table};
use super::{base_record, enabled, prime_session, push};
use crate::error::{EnvelopeError, OrRaise, Result};

/// VOLATILE: it reads the clock for its trailer, and every call is a recorded read. Not STRICT:
/// a NULL `from_seq` is an error, not an empty export.
#[pg_extern(volatile, parallel_unsafe)]
fn audit_export(from_seq: default!(Option<i64>, 1)) -> TableIterator<'static, (name!(line, String),)> {
    TableIterator::new(Export::start(from_seq).or_raise().map(|l| (l,)))
}

struct Export {
    start: i64,
    table: stored::Place,
    blocks: std::vec::IntoIter<BlockRef>,
    pending: VecDeque<String>,
    checkpoints: std::vec::IntoIter<String>,
    trailer: Option<String>,
}

impl Export {
    fn start(from_seq: Option<i64>) -> Result<Export> {
        let from_seq = from_seq.ok_or_else(|| EnvelopeError::BadRequest {
            code: pgrx::PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            message: "pg_envelope: audit_export's from_seq must not be NULL".into(),
            hint: Some("1 exports the whole trail.".into()),
        })?;
        let refused = |reason: String| EnvelopeError::AuditExportRefused { reason, rls: false };
        let blocks_table = Table::blocks().map_err(refused)?;
        let checkpoints_table = Table::checkpoints().map_err(refused)?;
        for (table, name) in [(&blocks_table, c"audit_blocks"), (&checkpoints_table, c"audit_checkpoints")] {
            may_read(table.oid(), name)?;
        }
        // What the writer had committed, read before the trail (review 61: an export that is
        // not held to it showed a tail rewritten and re-chained while the writer was held up,
        // and the offline verifier, which sees only the file, said intact). A table other than
        // the one the writer committed to is refused (audit_verify names it).
        // (Without the library preloaded there is no writer: `committed_head` says none.)
        let writer_head = super::trail::committed_head().map_err(refused)?.map(|(h, _)| h);
        // The trail as it is now, read with the latest snapshot (it holds the writer's commit
        // of that head, at any isolation level); blocks are fetched later with a new latest
        // snapshot each: append-only, one seen here stays, unless someone removes it, which
        // shows as an unreadable line.
        let latest = stored::Snapshot::latest();
        let snapshot = latest.raw();
        let cps = stored::checkpoints(&checkpoints_table, snapshot);
        let refs = stored::block_refs(&blocks_table, snapshot);
        let start = lines::export_start(from_seq, cps.iter().map(|c| c.seq));
        let head_seq = refs.iter().map(|b| b.last_seq).max();
        let refs: Vec<BlockRef> = refs.into_iter().filter(|b| b.last_seq >= start).collect();
        let records: i64 = refs.iter().map(|b| b.last_seq.saturating_sub(b.first_seq.max(start)).saturating_add(1).max(0)).fold(0i64, |a, n| a.saturating_add(n));
        let checkpoints: Vec<String> = cps
            .iter()
            .filter(|c| c.seq >= start - 1)
            .map(|c| {
                lines::checkpoint_line(&lines::CheckpointRow {
                    seq: c.seq,
                    hash: &c.hash,
                    at_us_column: c.at,
                    at_us: c.at_us,
                    method: &c.method,
                    provider: &c.provider,
                    key_name: &c.key_name,
                    mac: &c.mac,
                })
            })
            .collect();
        drop(latest);
        // And after it, with a second's grace for the moment between the writer's commit and
        // its publishing the head: records past what the writer committed were not written by
        // it (the offline verifier reports them).
        let committed_seq = writer_head.map(|h| {
            let newest = head_seq.unwrap_or(0);
            let mut seq = h.seq;
            for _ in 0..20 {
                seq = super::trail::committed_head().ok().flatten().map_or(seq, |(c, _)| c.seq.max(seq));
                if seq >= newest {
                    break;
                }
                // SAFETY: a sleep that services interrupts.
                unsafe { pg_sys::pg_usleep(50_000) };
            }
            seq
        });
        let writer = writer_head.as_ref().zip(committed_seq).map(|(h, committed_seq)| lines::WriterHead { head_seq: h.seq, head_hash: &h.hash, committed_seq });
        let trailer = lines::trailer_line(start, head_seq, now_unix_us(), &current_database(), writer);
        if enabled() {
            prime_session();
            let mut r = base_record("audit_read", crate::backend::role_name(crate::nothrow::current_user_id()));
            r.operation = "audit_export".into();
            r.detail = format!("envelope.audit_blocks,envelope.audit_checkpoints from record {start}");
            r.value_count = records;
            r.outcome = "ok".into();
            push(r);
        }
        Ok(Export { start, table: blocks_table.place(), blocks: refs.into_iter(), pending: VecDeque::new(), checkpoints: checkpoints.into_iter(), trailer: Some(trailer) })
    }

    /// The next block's lines into `pending`.
    fn read_next_block(&mut self, at: &BlockRef) {
        // (Opened again for each block: nothing is held between the calls PostgreSQL makes; the
        // lock taken by the first call is held to the transaction's end.)
        let table = Table::again(&self.table);
        let latest = stored::Snapshot::latest();
        let Some((prev_hash, bytes)) = stored::block_at(&table, latest.raw(), at) else {
            // Removed since the export began (the trail is append-only: by hand, or a retention
            // that deleted it): said rather than skipped.
            self.pending.push_back(lines::unreadable_line(at.first_seq));
            return;
        };
        let read = read_block(prev_hash, &bytes);
        let mut unreadable = read.unreadable_at.is_some();
        for s in &read.records {
            if !lines::displayable(s) {
                unreadable = true;
                break;
            }
            if s.record.seq >= self.start {
                self.pending.push_back(lines::record_line(s));
            }
        }
        if unreadable {
            self.pending.push_back(lines::unreadable_line(at.first_seq));
        }
    }
}

impl Iterator for Export {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            if let Some(l) = self.pending.pop_front() {
                return Some(l);
            }
            match self.blocks.next() {
                Some(at) => self.read_next_block(&at),
                None => return self.checkpoints.next().or_else(|| self.trailer.take()),
            }
        }
    }
}

/// Raises PostgreSQL's own permission error unless the current role may SELECT from the table
/// (or every column of it), and refuses when row-level security applies to it.
fn may_read(relid: pg_sys::Oid, name: &std::ffi::CStr) -> Result<()> {
    // SAFETY: privilege lookups by oid; aclcheck_error raises PostgreSQL's 42501, which the
    // refusal hook records like any refused read of the trail.
    unsafe {
        let role = pg_sys::GetUserId();
        let select = pg_sys::ACL_SELECT as pg_sys::AclMode;
        if pg_sys::pg_class_aclcheck(relid, role, select) != pg_sys::AclResult::ACLCHECK_OK
            && pg_sys::pg_attribute_aclcheck_all(relid, role, select, pg_sys::AclMaskHow::ACLMASK_ALL) != pg_sys::AclResult::ACLCHECK_OK
        {
            pg_sys::aclcheck_error(pg_sys::AclResult::ACLCHECK_NO_PRIV, pg_sys::ObjectType::OBJECT_TABLE, name.as_ptr());
        }
        if pg_sys::check_enable_rls(relid, pg_sys::InvalidOid, false) == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32 {
            return Err(EnvelopeError::AuditExportRefused {
                reason: format!("row-level security on envelope.{} applies to this role", name.to_string_lossy()),
                rls: true,
            });
        }
    }
    Ok(())
}

fn current_database() -> String {
    // SAFETY: the database's name by its oid (a palloc'd copy).
    unsafe {
        let p = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if p.is_null() { String::new() } else { std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned() }
    }
}

/// The clock now (as `clock_timestamp()`), in microseconds since the Unix epoch.
fn now_unix_us() -> i64 {
    // SAFETY: reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }.saturating_add(946_684_800_000_000)
}
