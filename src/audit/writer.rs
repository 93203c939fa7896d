//! The audit writer, run by the maintenance worker: drains the shared-memory queue into
//! `envelope.audit_blocks` (the gapless sequence and the hash chain, read through the view `envelope.audit_log`), and checkpoints the chain's
//! head with a MAC made inside the key server.

use pg_envelope_core::audit::{Chain, Head, Record, Stored};
use pg_envelope_core::audit_blocks::{Block, Blocks};
use pg_envelope_core::provider::CheckpointMac;
use pgrx::prelude::*;
use std::sync::atomic::Ordering;

use super::{base_record, now_ts, peek, pg_to_unix_us, QUEUE};
use crate::catalog::spi_err;
use crate::error::{EnvelopeError, Result};
use crate::gucs;

/// Records per batch (one transaction): 2,000 (was 500; a batch's fixed costs, the commit's WAL
/// flush, the hourly counts' upsert and the relation lookups, are shared by four times as many).
pub const BATCH: usize = 2000;

/// The writer's state between batches: the chain's head and the last checkpointed head.
#[derive(Default)]
pub struct Writer {
    head: Option<Head>,
    checkpointed: Option<(i64, i64)>,
    /// The oid of the audit_blocks table the head belongs to.
    relid: u32,
    /// A retention record was written: checkpoint the new head at once.
    pub force_checkpoint: bool,
    /// The writer's own records (alerts raised by a batch), chained at the start of the next
    /// batch: never pushed through the queue, whose only reader is this process (waiting there
    /// for room while the queue is full waited on itself: a second per alert, and dropped).
    pending: Vec<Record>,
    /// How many of `pending` the batch in progress took (removed once it committed), and the
    /// alerts it raised (pending once it committed; forgotten if it failed: the batch is
    /// written again and raises them again).
    pending_taken: usize,
    raised: Vec<Record>,
    /// Records counted as dropped that the batch in progress records in the chain (added to
    /// the shared `dropped_recorded` once it committed).
    dropped_taken: u64,
    /// The failure summaries the batch in progress took from shared memory (freed once it
    /// committed, put back if it failed: see `limit`), and whether the overflow was among them.
    summaries_taken: Vec<usize>,
    overflow_taken: bool,
    /// Summaries a previous writer process took were put back (once per process).
    untaken: bool,
    /// Records of the last batch, given back to be parsed into again (their strings keep their
    /// allocations: see `Record::read_canonical`).
    pool: Vec<Record>,
    /// The batch's blocks (their buffers kept from batch to batch).
    blocks: Blocks,
    /// Blocks the batch in progress appended (direct, through the executor): counted in
    /// shared memory once it committed.
    appended: (u64, u64),
    /// What runs code on every appended block (see [`insert_code`]) as the trail last named it
    /// (committed), and as the batch in progress names it.
    insert_code: Option<Vec<String>>,
    insert_code_taken: Option<Vec<String>>,
    /// The last look at it (see [`INSERT_CODE_STALE`]).
    insert_code_now: Option<Vec<String>>,
}

/// Set by the relation cache's invalidation of `audit_blocks` (or of every relation) and by any
/// change to `pg_proc`: the writer looks at what runs code on its inserts again (see
/// [`insert_code`]). Process-local: only the writer reads it.
static INSERT_CODE_STALE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
static WRITER_RELID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Relation cache invalidation (see [`INSERT_CODE_STALE`]).
pub fn on_relcache_changed(relid: pg_sys::Oid) {
    let ours = WRITER_RELID.load(Ordering::Relaxed);
    if ours != 0 && (relid == pg_sys::InvalidOid || relid.to_u32() == ours) {
        INSERT_CODE_STALE.store(true, Ordering::Relaxed);
    }
}

/// A `pg_proc` change (see [`INSERT_CODE_STALE`]).
pub unsafe extern "C-unwind" fn on_proc_changed(_arg: pg_sys::Datum, _cacheid: std::ffi::c_int, _hash: u32) {
    if WRITER_RELID.load(Ordering::Relaxed) != 0 {
        INSERT_CODE_STALE.store(true, Ordering::Relaxed);
    }
}

pub(super) fn hash32(v: Vec<u8>) -> Result<[u8; 32]> {
    v.try_into().map_err(|_| EnvelopeError::Internal("an audit hash is not 32 bytes".into()))
}

impl Writer {
    /// The chain head from the table. Compared with the head this server's writer last
    /// committed (kept in shared memory): a difference means rows were added or removed by
    /// someone else (a superuser with the triggers off, or DROP/CREATE EXTENSION), which the
    /// next batch records as a `tamper` or `chain_restart` record before anything else. The
    /// table never tells the writer which queued records to skip (a forged row could hide them):
    /// queue slots are freed only after the writer's own commit.
    fn load_head(&mut self) -> Result<Option<String>> {
        let row = Spi::connect(|c| {
            // The last block's last record (its bytes are read back: a block whose last entry
            // does not parse gives a head that matches nothing, recorded as tampering).
            let t = c
                .select("SELECT last_seq, prev_hash, records FROM envelope.audit_blocks ORDER BY first_seq DESC LIMIT 1", None, &[])
                .map_err(spi_err)?;
            if t.is_empty() {
                return Ok::<_, EnvelopeError>(None);
            }
            let r = t.first();
            let prev: [u8; 32] = r.get::<Vec<u8>>(2).map_err(spi_err)?.unwrap_or_default().try_into().unwrap_or([0xff; 32]);
            let bytes = r.get::<Vec<u8>>(3).map_err(spi_err)?.unwrap_or_default();
            let last = pg_envelope_core::audit_blocks::read_block(prev, &bytes).records.pop();
            let seq = r.get::<i64>(1).map_err(spi_err)?.unwrap_or(0);
            Ok(Some((seq, last.filter(|s| s.record.seq == seq).map_or(vec![0xff; 32], |s| s.hash.to_vec()))))
        })?;
        let table = match row {
            None => Head { seq: 0, hash: pg_envelope_core::audit::GENESIS },
            Some((seq, hash)) => Head { seq, hash: hash32(hash)? },
        };
        self.head = Some(table);
        let (committed_seq, committed_hash, committed_relid) = {
            let q = QUEUE.share();
            (q.head_seq, q.head_hash, q.head_relid)
        };
        if committed_seq == 0 && committed_relid == 0 {
            return Ok(None); // nothing written by this server run yet
        }
        if committed_relid != self.relid {
            return Ok(Some(format!(
                "the audit table was replaced (DROP/CREATE EXTENSION?): the previous chain ended at record {committed_seq} (hash {})",
                hex(&committed_hash)
            )));
        }
        if table.seq != committed_seq || table.hash != committed_hash {
            return Ok(Some(format!(
                "the chain's head changed outside the writer: it wrote up to record {committed_seq} (hash {}), the table ends at record {} (hash {})",
                hex(&committed_hash),
                table.seq,
                hex(&table.hash)
            )));
        }
        Ok(None)
    }

    /// After the batch's transaction committed: the head this server's writer stands behind.
    pub fn committed(&mut self) {
        if let Some(code) = self.insert_code_taken.take() {
            self.insert_code = Some(code);
        }
        let taken = std::mem::take(&mut self.pending_taken).min(self.pending.len());
        self.pending.drain(..taken);
        self.pending.append(&mut self.raised);
        let dropped = std::mem::take(&mut self.dropped_taken);
        super::limit::release(&std::mem::take(&mut self.summaries_taken), std::mem::take(&mut self.overflow_taken), true);
        if let Some(h) = self.head {
            let mut q = QUEUE.exclusive();
            q.dropped_recorded += dropped;
            q.head_seq = h.seq;
            q.head_hash = h.hash;
            q.head_relid = self.relid;
            let (direct, executor) = std::mem::take(&mut self.appended);
            q.blocks_direct += direct;
            q.blocks_executor += executor;
        }
    }

    /// One batch: up to [`BATCH`] queued records appended in the caller's transaction. Returns how
    /// many, and the queue position to free once the transaction committed.
    pub fn write_batch(&mut self) -> Result<(usize, u64)> {
        // The table the head was read from: after DROP EXTENSION and CREATE EXTENSION the chain
        // starts again at 1 in the new table.
        let relid = unsafe {
            let ns = pg_sys::get_namespace_oid(c"envelope".as_ptr(), true);
            if ns == pg_sys::InvalidOid { 0 } else { pg_sys::get_relname_relid(c"audit_blocks".as_ptr(), ns).to_u32() }
        };
        if relid != 0 && !super::trail::is_extension_member(relid) {
            return Err(EnvelopeError::Internal(
                "audit: envelope.audit_blocks is not pg_envelope's table (it was replaced): the records stay queued; see envelope.audit_verify()".into(),
            ));
        }
        if relid == 0 {
            return Err(EnvelopeError::Internal(
                "audit: envelope.audit_blocks does not exist in envelope.database (pg_envelope there is older than 0.2.0: ALTER EXTENSION pg_envelope UPDATE)".into(),
            ));
        }
        if relid != self.relid {
            super::alerts::forget_hour_memo();
            self.head = None;
            self.checkpointed = None;
            self.relid = relid;
        }
        let mut alarm = None;
        if self.head.is_none() {
            alarm = self.load_head()?;
        }
        // Failure summaries held back by the limit (see `limit`) once their second has passed:
        // taken, not removed, until this batch committed (a failed batch, or a writer that
        // exits inside it, leaves them to the next: insider review 29).
        if !self.untaken {
            super::limit::untake_all();
            self.untaken = true;
        }
        // (What a previous batch took was freed by `committed` or put back by `reset`.)
        let (summaries, taken, overflow) = super::limit::take_due();
        self.summaries_taken = taken;
        self.overflow_taken = overflow;
        // Records counted as dropped since the last such record: the count joins the chain (it
        // was only in shared memory and the server log, and gone at the next restart).
        let (dropped, dropped_recorded) = {
            let q = QUEUE.share();
            (q.dropped, q.dropped_recorded)
        };
        self.dropped_taken = dropped.saturating_sub(dropped_recorded);
        let (records, upto, bad) = peek(BATCH, &mut self.pool);
        if records.is_empty() && bad == 0 && alarm.is_none() && self.pending.is_empty() && self.dropped_taken == 0 && summaries.is_empty() {
            return Ok((0, upto));
        }
        let first_pos = upto - records.len() as u64 - bad;
        let mut chain = Chain::after(self.head);
        let started = unsafe { pg_sys::PgStartTime };
        let mut rows: Vec<Stored> = Vec::with_capacity(records.len() + 2);
        let blocks = &mut self.blocks;
        blocks.clear();
        if let Some(why) = alarm {
            crate::warning!("pg_envelope audit: {why}");
            let mut r = base_record(if why.starts_with("the audit table was replaced") { "chain_restart" } else { "tamper" }, String::new());
            r.operation = "writer".into();
            r.outcome = "alert".into();
            r.detail = why;
            rows.push(blocks.push(&mut chain, r, first_pos.saturating_sub(1)));
        }
        // Code that will see this batch's blocks, named in the chain in front of them whenever
        // it changed since the trail last named it (and at the writer's first batch). Added by
        // the writer itself, not queued: a full queue cannot drop it (review 47).
        // (The table's lock first, the one the insert takes anyway: a trigger, index or
        // constraint cannot be added between this look and the insert.)
        unsafe { pg_sys::LockRelationOid(pg_sys::Oid::from(relid), pg_sys::RowExclusiveLock as pg_sys::LOCKMODE) };
        // Looked up again only after an invalidation of the table (a trigger, index or
        // constraint added or dropped) or of any function (a trigger's body replaced): the
        // query per batch cost more than the rest of the writer (8.8 µs per transaction of the
        // OLTP mix against 2.7).
        WRITER_RELID.store(relid, Ordering::Relaxed);
        if INSERT_CODE_STALE.swap(false, Ordering::Relaxed) || self.insert_code_now.is_none() {
            match insert_code() {
                Ok(c) => self.insert_code_now = Some(c),
                Err(e) => {
                    INSERT_CODE_STALE.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        let code = self.insert_code_now.clone().unwrap_or_default();
        if self.insert_code.as_ref() != Some(&code) && !(self.insert_code.is_none() && code.is_empty()) {
            crate::log!("pg_envelope audit: code that sees every appended block of envelope.audit_blocks: {}", if code.is_empty() { "none".to_string() } else { code.join("; ") });
            let n = code.len();
            let lines: Vec<String> = if code.is_empty() { vec!["none any more".into()] } else { code.iter().enumerate().map(|(i, d)| format!("{}/{n} {d}", i + 1)).collect() };
            for line in lines {
                let mut r = base_record("config", String::new());
                r.operation = "audit_insert_code".into();
                r.value_count = n as i64;
                r.outcome = "ok".into();
                r.detail = line;
                rows.push(blocks.push(&mut chain, r, first_pos.saturating_sub(1)));
            }
        }
        self.insert_code_taken = Some(code);
        // The writer's own records of the previous batch (its alerts), before the queue's.
        self.pending_taken = self.pending.len();
        rows.extend(self.pending.iter().cloned().map(|r| blocks.push(&mut chain, r, first_pos.saturating_sub(1))));
        rows.extend(summaries.into_iter().map(|r| blocks.push(&mut chain, r, first_pos.saturating_sub(1))));
        rows.extend(records.into_iter().enumerate().map(|(i, r)| blocks.push(&mut chain, r, first_pos + i as u64)));
        if bad > 0 {
            let mut r = base_record("dropped", String::new());
            r.detail = format!("{bad} unreadable record(s) in the audit queue");
            r.outcome = "dropped".into();
            rows.push(blocks.push(&mut chain, r, upto - 1));
        }
        if self.dropped_taken > 0 {
            let mut r = base_record("dropped", String::new());
            r.operation = "queue".into();
            r.value_count = self.dropped_taken as i64;
            r.outcome = "dropped".into();
            r.detail = format!(
                "{} audit record(s) counted as dropped since the previous such record (queue full past the wait, or a session ending while its records were updated); their contents are lost",
                self.dropped_taken
            );
            rows.push(blocks.push(&mut chain, r, upto.saturating_sub(1)));
        }
        // Appended the way COPY appends (see `insert_direct`), unless the table was changed so
        // that only the executor inserts correctly (see `direct_insert_possible`): then one
        // INSERT per batch through SPI.
        let n_blocks = blocks.blocks().len() as u64;
        self.appended = if unsafe { insert_direct(relid, blocks.blocks(), started) }? {
            (n_blocks, 0)
        } else {
            insert_spi(blocks.blocks(), started)?;
            (0, n_blocks)
        };
        self.head = Some(chain.head());
        // Hourly counts and alerts (same transaction); alert records join the chain next batch.
        self.raised = super::alerts::evaluate(rows.iter())?;
        if rows.iter().any(|s| s.record.operation == "audit_prune") {
            self.force_checkpoint = true;
        }
        let n = rows.len();
        // (Bounded: a batch's records and the few the writer adds.)
        self.pool.extend(rows.into_iter().map(|s| s.record).take((BATCH + 16).saturating_sub(self.pool.len())));
        Ok((n, upto))
    }

    /// Forgets the head (after a failed transaction: re-read next time).
    pub fn reset(&mut self) {
        self.head = None;
        self.insert_code_taken = None;
        INSERT_CODE_STALE.store(true, Ordering::Relaxed);
        self.appended = (0, 0);
        self.pending_taken = 0;
        self.dropped_taken = 0;
        super::limit::release(&std::mem::take(&mut self.summaries_taken), std::mem::take(&mut self.overflow_taken), false);
        self.raised.clear();
        super::alerts::forget_hour_memo();
    }

    /// Signs the head if it moved and the interval passed (or `force`: a retention record was
    /// just written): a row in `audit_checkpoints` and a LOG line, the server log's copy outside
    /// the table. The MAC is made by `envelope.audit_checkpoint_provider`'s key inside its KMS or
    /// HSM, so the KMS's own audit log witnesses every checkpoint. Runs in a transaction of its
    /// own after the batch: a KMS outage delays checkpoints, never the records.
    pub fn checkpoint(&mut self, force: bool) -> Result<Option<i64>> {
        let Some(head) = self.head.filter(|h| h.seq > 0) else { return Ok(None) };
        let now = pg_to_unix_us(now_ts());
        if let Some((seq, at)) = self.checkpointed {
            if seq == head.seq || (!force && now - at < gucs::audit_checkpoint_interval_s() * 1_000_000) {
                return Ok(None);
            }
        }
        let provider = gucs::audit_checkpoint_provider();
        let mac = checkpoint_mac(&provider, &head, now)?;
        Spi::run_with_args(
            "INSERT INTO envelope.audit_checkpoints (seq, hash, at_us, at, method, provider, key_name, mac)
             VALUES ($1, $2, $3, pg_catalog.to_timestamp($3::float8 / 1e6), 'hmac-sha256', $4, $5, $6)",
            &[head.seq.into(), head.hash.to_vec().into(), now.into(), provider.as_str().into(), mac.key.as_str().into(), mac.mac.clone().into()],
        )
        .map_err(spi_err)?;
        crate::log!(
            "pg_envelope audit checkpoint: seq={} hash={} at_us={now} provider={provider} mac={} database={} key={}",
            head.seq,
            hex(&head.hash),
            hex(&mac.mac),
            crate::gucs::database().unwrap_or_default(),
            mac.key
        );
        self.checkpointed = Some((head.seq, now));
        let mut q = QUEUE.exclusive();
        q.checkpoint_seq = head.seq;
        q.checkpointed_at = now_ts();
        Ok(Some(head.seq))
    }
}

pub(super) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The checkpoint MAC of `head` by `provider` (a registered provider, built in a lockdown too),
/// on a helper thread that services interrupts (a hung KMS call ends with envelope.kms_timeout).
pub(super) fn checkpoint_mac(provider: &str, head: &Head, at_us: i64) -> Result<CheckpointMac> {
    let mut p = crate::backend::build_audit_provider(provider)?;
    let msg = pg_envelope_core::audit::checkpoint_message(head, at_us);
    crate::stampede::provider_call(provider, move || p.checkpoint_mac(&msg))
        .and_then(|r| r)
        .map_err(|error| EnvelopeError::Provider { provider: provider.to_string(), error })
}

/// Whether `mac` is `provider`'s MAC of the checkpoint (asked of the KMS where it has a verify call).
pub(super) fn checkpoint_mac_valid(provider: &str, head: &Head, at_us: i64, mac: Vec<u8>) -> Result<bool> {
    let mut p = crate::backend::build_audit_provider(provider)?;
    let msg = pg_envelope_core::audit::checkpoint_message(head, at_us);
    crate::stampede::provider_call(provider, move || p.verify_checkpoint_mac(&msg, &mac))
        .and_then(|r| r)
        .map_err(|error| EnvelopeError::Provider { provider: provider.to_string(), error })
}

/// The columns of `envelope.audit_blocks`, in order, as `sql/audit.sql` creates them.
const AUDIT_BLOCK_TYPES: [pg_sys::Oid; 8] = {
    use pg_sys::{BYTEAOID as B, INT8OID as I, TIMESTAMPTZOID as TS};
    [I, I, TS, TS, B, B, I, I]
};

/// Whether the blocks can be appended without the executor and give the same table as an
/// INSERT: a plain table with exactly the columns of `sql/audit.sql`, no CHECK constraints, no
/// rules, no INSERT triggers (a DBA's trigger that forwards blocks fires, through the executor
/// path), and only plain immediate indexes (no expressions, predicates or exclusion).
unsafe fn direct_insert_possible(rel: pg_sys::Relation, ind: *mut pg_sys::ResultRelInfo) -> bool {
    unsafe {
        let form = &*(*rel).rd_rel;
        let desc = (*rel).rd_att;
        // A heap (heap_multi_insert writes heap pages: a table moved to another access method
        // goes through the executor).
        if form.relkind != pg_sys::RELKIND_RELATION as std::ffi::c_char
            || form.relam != pg_sys::HEAP_TABLE_AM_OID
            || !(*rel).rd_rules.is_null()
            || (*desc).natts != AUDIT_BLOCK_TYPES.len() as i32
        {
            return false;
        }
        let constr = (*desc).constr;
        if !constr.is_null() && ((*constr).num_check > 0 || (*constr).has_generated_stored) {
            return false;
        }
        // (PgTupleDesc: the attribute array's layout differs between PostgreSQL 15 and 18.)
        let attrs = pgrx::PgTupleDesc::from_pg_unchecked(desc);
        for (i, want) in AUDIT_BLOCK_TYPES.iter().enumerate() {
            match attrs.get(i) {
                // (No type modifier: a `timestamptz(0)` would be rounded by an INSERT, not here.)
                Some(a) if !a.attisdropped && a.atttypid == *want && a.atttypmod == -1 && a.attgenerated == 0 => {}
                _ => return false,
            }
        }
        let t = (*rel).trigdesc;
        if !t.is_null() {
            let t = &*t;
            if t.trig_insert_before_row
                || t.trig_insert_after_row
                || t.trig_insert_instead_row
                || t.trig_insert_before_statement
                || t.trig_insert_after_statement
                || t.trig_insert_new_table
            {
                return false;
            }
        }
        let ind = &*ind;
        for i in 0..ind.ri_NumIndices as usize {
            let info = &**ind.ri_IndexRelationInfo.add(i);
            let index = &**ind.ri_IndexRelationDescs.add(i);
            if !info.ii_Expressions.is_null()
                || !info.ii_Predicate.is_null()
                || !info.ii_ExclusionOps.is_null()
                || !(*index.rd_index).indimmediate
            {
                return false;
            }
        }
        true
    }
}

/// Appends `rows` the way COPY does: the tuples formed here, `heap_multi_insert` (one buffer
/// lookup and one WAL record per page instead of per row), then
/// each index entry pointing at the TID the heap insert gave the row's slot. No parse, plan or
/// tuplestore of unnested arrays per batch. Returns false, having written nothing, when the table
/// does not allow it (see [`direct_insert_possible`]).
///
/// (The TIDs are taken from the slots, which `heap_multi_insert` sets in every case, not from
/// the formed tuples: a row it had to TOAST is inserted as a copy. PostgreSQL's own
/// CatalogTuplesMultiInsertWithInfo reads the tuple's.)
unsafe fn insert_direct(relid: u32, rows: &[Block], started: i64) -> Result<bool> {
    unsafe {
        let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(pg_sys::Oid::from(relid), lock);
        let ind = pg_sys::CatalogOpenIndexes(rel);
        if !direct_insert_possible(rel, ind) {
            pg_sys::CatalogCloseIndexes(ind);
            pg_sys::table_close(rel, lock);
            return Ok(false);
        }
        let int = pg_sys::Datum::from;
        // The row's text and bytea values, built in one reused buffer (heap_form_tuple copies
        // them into the tuple): no palloc and no guarded call per value.
        let mut texts = Varlenas::default();
        // PostgreSQL's timestamps count microseconds from 2000-01-01.
        const PG_EPOCH_US: i64 = 946_684_800_000_000;
        // Everything below is palloc'd in the batch's transaction: freed at its commit.
        let desc = (*rel).rd_att;
        let mut nulls = [false; 8];
        // Slots reused chunk by chunk (each slot pins the tuple descriptor with the resource
        // owner, whose release searches its list: one slot per row made a batch of 2,000 rows
        // quadratic).
        const CHUNK: usize = 128;
        let mut slots: Vec<*mut pg_sys::TupleTableSlot> =
            (0..rows.len().min(CHUNK)).map(|_| pg_sys::MakeSingleTupleTableSlot(desc, &raw const pg_sys::TTSOpsHeapTuple)).collect();
        let indexes = &*ind;
        let mut ivalues = [pg_sys::Datum::from(0usize); pg_sys::INDEX_MAX_KEYS as usize];
        let mut inulls = [false; pg_sys::INDEX_MAX_KEYS as usize];
        for chunk in rows.chunks(CHUNK) {
            for (blk, &slot) in chunk.iter().zip(&slots) {
                texts.clear();
                // Every value in first (the buffer may grow), then their datums.
                let offsets = [texts.push(&blk.prev_hash), texts.push(&blk.bytes)];
                let [prev_hash, records] = offsets.map(|o| texts.datum(o));
                // In the column order of `sql/audit.sql` (checked by `direct_insert_possible`).
                let mut values: [pg_sys::Datum; 8] = [
                    int(blk.first_seq),
                    int(blk.last_seq),
                    int(blk.first_at_us - PG_EPOCH_US),
                    int(blk.last_at_us - PG_EPOCH_US),
                    prev_hash,
                    records,
                    int(started),
                    int(blk.queue_pos as i64),
                ];
                let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
                // The slot owns the tuple (so heap_multi_insert does not copy it; freed when
                // the slot is cleared or dropped).
                pg_sys::ExecStoreHeapTuple(tuple, slot, true);
            }
            // Without a bulk-insert state: its ring of 256 kB of buffers made the writer write
            // and WAL-flush its own pages as it reused them.
            pg_sys::heap_multi_insert(rel, slots.as_mut_ptr(), chunk.len() as i32, pg_sys::GetCurrentCommandId(true), 0, std::ptr::null_mut());
            for &slot in &slots[..chunk.len()] {
                for i in 0..indexes.ri_NumIndices as usize {
                    let info = *indexes.ri_IndexRelationInfo.add(i);
                    let index = *indexes.ri_IndexRelationDescs.add(i);
                    // An index being built concurrently (or left behind by a failed concurrent
                    // build) is not ready for inserts: skipped, as PostgreSQL's insert paths do
                    // (inserting into it failed every batch: insider review 31).
                    if !(*info).ii_ReadyForInserts {
                        continue;
                    }
                    // Plain column indexes only (checked above): no executor state needed.
                    pg_sys::FormIndexDatum(info, slot, std::ptr::null_mut(), ivalues.as_mut_ptr(), inulls.as_mut_ptr());
                    let unique =
                        if (*(*index).rd_index).indisunique { pg_sys::IndexUniqueCheck::UNIQUE_CHECK_YES } else { pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO };
                    pg_sys::index_insert(index, ivalues.as_mut_ptr(), inulls.as_mut_ptr(), &raw mut (*slot).tts_tid, rel, unique, false, info);
                }
                pg_sys::ExecClearTuple(slot);
            }
        }
        for slot in slots {
            pg_sys::ExecDropSingleTupleTableSlot(slot);
        }
        pg_sys::CatalogCloseIndexes(ind);
        // The lock is held to the end of the transaction, as an INSERT holds it.
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        Ok(true)
    }
}

/// Varlena values (4-byte headers, 4-byte aligned) laid out in one buffer of 8-byte words.
#[derive(Default)]
struct Varlenas {
    words: Vec<u64>,
    len: usize,
}

impl Varlenas {
    fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends `b` as a varlena; returns its byte offset (valid until the next `clear`; the
    /// datums are taken with [`Varlenas::datum`] once every value is in).
    fn push(&mut self, b: &[u8]) -> usize {
        let off = self.len.next_multiple_of(4);
        let end = off + 4 + b.len();
        self.words.resize(end.div_ceil(8).max(self.words.len()), 0);
        let total = u32::try_from(4 + b.len()).expect("audit values are cut far below 1 GB");
        // SET_VARSIZE_4B: the length in the upper 30 bits on little-endian machines.
        #[cfg(target_endian = "little")]
        let header = total << 2;
        #[cfg(target_endian = "big")]
        let header = total & 0x3FFF_FFFF;
        // SAFETY: `words` holds at least `end` bytes.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.words.len() * 8) };
        bytes[off..off + 4].copy_from_slice(&header.to_ne_bytes());
        bytes[off + 4..end].copy_from_slice(b);
        self.len = end;
        off
    }

    fn datum(&self, off: usize) -> pg_sys::Datum {
        // SAFETY: an offset `push` returned, inside the buffer.
        pg_sys::Datum::from(unsafe { self.words.as_ptr().cast::<u8>().add(off) })
    }
}

/// What runs user code on, or sees, every block the writer appends to `envelope.audit_blocks`,
/// beyond the extension's own table and primary key: INSERT triggers (with a digest of their
/// function's source, so a replaced body counts as a change), CHECK and foreign-key
/// constraints, indexes other than the primary key (an operator class's support function sees
/// every value), generated columns and a table access method other than heap. One line each,
/// sorted. Insider reviews 46 and 47: a trigger, a CHECK constraint's function or a custom hash
/// operator class could copy the whole trail elsewhere with no read of the trail to record.
/// The writer does not refuse them (forwarding blocks by a trigger is a legitimate DBA choice)
/// but names them in the trail itself: see [`Writer::batch`].
fn insert_code() -> Result<Vec<String>> {
    Spi::connect(|c| {
        let t = c
            .select(
                "WITH rel AS (SELECT 'envelope.audit_blocks'::pg_catalog.regclass AS oid)
                 SELECT d FROM (
                   SELECT pg_catalog.format('trigger %I (%s, %s, source md5 %s)', t.tgname, t.tgfoid::pg_catalog.regprocedure,
                            CASE WHEN t.tgenabled = 'D' THEN 'disabled' ELSE 'enabled' END, pg_catalog.md5(coalesce(p.prosrc, ''))) AS d
                     FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid, rel
                    WHERE t.tgrelid = rel.oid AND (t.tgtype & 4) <> 0
                   UNION ALL
                   SELECT pg_catalog.format('constraint %I: %s', k.conname, pg_catalog.pg_get_constraintdef(k.oid))
                     FROM pg_catalog.pg_constraint k, rel
                    WHERE k.conrelid = rel.oid AND k.contype NOT IN ('p', 'n')
                   UNION ALL
                   SELECT pg_catalog.format('index %s', pg_catalog.pg_get_indexdef(i.indexrelid))
                     FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid, rel
                    WHERE i.indrelid = rel.oid
                      AND NOT (i.indisprimary AND i.indnatts = 1 AND i.indkey[0] = 1 AND i.indexprs IS NULL AND i.indpred IS NULL
                               AND ic.relam = (SELECT oid FROM pg_catalog.pg_am WHERE amname = 'btree')
                               AND i.indclass[0] = (SELECT o.oid FROM pg_catalog.pg_opclass o
                                                      WHERE o.opcname = 'int8_ops' AND o.opcnamespace = 'pg_catalog'::pg_catalog.regnamespace
                                                        AND o.opcmethod = (SELECT oid FROM pg_catalog.pg_am WHERE amname = 'btree')))
                   UNION ALL
                   SELECT pg_catalog.format('generated column %I: %s', a.attname, pg_catalog.pg_get_expr(ad.adbin, ad.adrelid))
                     FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum, rel
                    WHERE a.attrelid = rel.oid AND a.attgenerated <> ''
                   UNION ALL
                   SELECT pg_catalog.format('table access method %s', am.amname)
                     FROM pg_catalog.pg_class cl JOIN pg_catalog.pg_am am ON am.oid = cl.relam, rel
                    WHERE cl.oid = rel.oid AND am.amname <> 'heap'
                 ) x ORDER BY d",
                None,
                &[],
            )
            .map_err(spi_err)?;
        let mut out = Vec::new();
        for r in t {
            out.push(r.get::<String>(1).map_err(spi_err)?.unwrap_or_default());
        }
        Ok(out)
    })
}

/// The executor path: one INSERT per batch (arrays unnested).
fn insert_spi(blocks: &[Block], started: i64) -> Result<()> {
    // A rule on the table (DO INSTEAD INSERT INTO elsewhere) would count the diverted rows as
    // stored: refused, the records stay queued (insider review 46).
    // (pg_rewrite, not relhasrules: that stays true after DROP RULE until a VACUUM.)
    if Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite WHERE ev_class = 'envelope.audit_blocks'::pg_catalog.regclass)")
        .map_err(spi_err)?
        .unwrap_or(true)
    {
        return Err(EnvelopeError::Internal(
            "audit: envelope.audit_blocks has a rule: the writer does not append through rules (they can divert the trail); the records stay queued".into(),
        ));
    }
    let col_i64 = |f: &dyn Fn(&Block) -> i64| blocks.iter().map(f).collect::<Vec<i64>>();
    let col_bytes = |f: &dyn Fn(&Block) -> &[u8]| blocks.iter().map(|b| f(b).to_vec()).collect::<Vec<Vec<u8>>>();
    let args: Vec<pgrx::datum::DatumWithOid> = vec![
        col_i64(&|b| b.first_seq).into(),
        col_i64(&|b| b.last_seq).into(),
        col_i64(&|b| b.first_at_us).into(),
        col_i64(&|b| b.last_at_us).into(),
        col_bytes(&|b| &b.prev_hash).into(),
        col_bytes(&|b| &b.bytes).into(),
        started.into(),
        col_i64(&|b| b.queue_pos as i64).into(),
    ];
    let inserted = Spi::connect_mut(|c| {
        c.update(
            "INSERT INTO envelope.audit_blocks
             SELECT u.first_seq, u.last_seq, pg_catalog.to_timestamp(0) + u.first_us * interval '1 microsecond',
                    pg_catalog.to_timestamp(0) + u.last_us * interval '1 microsecond', u.prev, u.records, $7, u.pos
               FROM ROWS FROM (pg_catalog.unnest($1::int8[]), pg_catalog.unnest($2::int8[]), pg_catalog.unnest($3::int8[]),
                               pg_catalog.unnest($4::int8[]), pg_catalog.unnest($5::bytea[]), pg_catalog.unnest($6::bytea[]),
                               pg_catalog.unnest($8::int8[]))
                    AS u(first_seq, last_seq, first_us, last_us, prev, records, pos)",
            None,
            &args,
        )
        .map(|t| t.len())
        .map_err(spi_err)
    })?;
    // A BEFORE INSERT trigger that returns NULL (or a rule) would drop blocks without an error:
    // the batch fails instead, its records stay queued (insider review 45).
    if inserted != blocks.len() {
        return Err(EnvelopeError::Internal(format!(
            "audit: {inserted} of {} blocks were stored in envelope.audit_blocks (a trigger or rule on it dropped or added rows); the records stay queued",
            blocks.len()
        )));
    }
    Ok(())
}
