//! The stored trail read back by heap scans of the extension's own tables, for `audit_verify`
//! and `audit_export`: no SQL, so nothing is resolved by name when they read it (no operator,
//! cast, function or index a superuser could add to, put in front of, or give a chosen object
//! id: insider review 58 inserted a json-to-text cast into `pg_cast` with an id below 16384,
//! which no check of additions can tell from a built-in one, and the SQL export's
//! `json_build_object(...)::text` took it).
//!
//! Each table is found by name in schema `envelope`, must be pg_envelope's own member, a heap
//! table with exactly the columns sql/audit.sql makes (names and types, in order; dropped
//! columns are skipped), and is read whole with the given snapshot: no index, no inheritance
//! child, no code of anyone's runs.

use pg_envelope_core::audit::Head;
use pg_envelope_core::audit_blocks::StoredBlock;
use pgrx::pg_sys;
use pgrx::prelude::*;

use super::trail::Checkpoint;
use super::writer::{AUDIT_BLOCK_NAMES, AUDIT_BLOCK_TYPES, AUDIT_CHECKPOINT_NAMES, AUDIT_CHECKPOINT_TYPES};

/// PostgreSQL's timestamps count microseconds from 2000-01-01.
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// One of the trail's tables, open for reading (under AccessShareLock, kept to the
/// transaction's end), with the attribute numbers of its columns in sql/audit.sql's order.
pub(super) struct Table {
    rel: pg_sys::Relation,
    cols: Vec<i32>,
}

impl Table {
    pub(super) fn blocks() -> Result<Table, String> {
        open(c"audit_blocks", &AUDIT_BLOCK_TYPES, &AUDIT_BLOCK_NAMES)
    }

    pub(super) fn checkpoints() -> Result<Table, String> {
        open(c"audit_checkpoints", &AUDIT_CHECKPOINT_TYPES, &AUDIT_CHECKPOINT_NAMES)
    }

    pub(super) fn oid(&self) -> pg_sys::Oid {
        // SAFETY: an open relation.
        unsafe { (*self.rel).rd_id }
    }

    /// Where to open this table again later in the same transaction ([`Table::again`]).
    pub(super) fn place(&self) -> Place {
        Place { relid: self.oid(), cols: self.cols.clone() }
    }

    /// The table opened at `place`, in the transaction that first opened and checked it (whose
    /// lock keeps it from being dropped, renamed or altered meanwhile).
    pub(super) fn again(place: &Place) -> Table {
        // SAFETY: a relation this transaction holds a lock on.
        Table { rel: unsafe { pg_sys::relation_open(place.relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE) }, cols: place.cols.clone() }
    }

    /// Every row visible to `snapshot`, in the heap's order, given to `f` (valid only during the
    /// call).
    unsafe fn scan(&self, snapshot: pg_sys::Snapshot, mut f: impl FnMut(Row<'_>)) {
        // SAFETY: a heap scan of an open heap relation with a live snapshot; each tuple is used
        // before the next is fetched. A plain sequential scan (no synchronized start: the
        // caller sorts anyway, and a scan starting mid-table is harder to reason about).
        unsafe {
            let flags = pg_sys::ScanOptions::SO_TYPE_SEQSCAN | pg_sys::ScanOptions::SO_ALLOW_STRAT | pg_sys::ScanOptions::SO_ALLOW_PAGEMODE;
            let scan = pg_sys::heap_beginscan(self.rel, snapshot, 0, std::ptr::null_mut(), std::ptr::null_mut(), flags);
            loop {
                let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
                if tuple.is_null() {
                    break;
                }
                f(Row { table: self, tuple });
            }
            pg_sys::heap_endscan(scan);
        }
    }

    /// The row at `tid` if `snapshot` sees it, given to `f`.
    unsafe fn fetch<T>(&self, snapshot: pg_sys::Snapshot, tid: pg_sys::ItemPointerData, f: impl FnOnce(Row<'_>) -> T) -> Option<T> {
        // SAFETY: heap_fetch pins the tuple's buffer when it is visible; it is read, then the
        // pin is released.
        unsafe {
            let mut tuple: pg_sys::HeapTupleData = std::mem::zeroed();
            tuple.t_self = tid;
            let mut buffer: pg_sys::Buffer = pg_sys::InvalidBuffer as pg_sys::Buffer;
            if !pg_sys::heap_fetch(self.rel, snapshot, &mut tuple, &mut buffer, false) {
                return None;
            }
            let out = f(Row { table: self, tuple: &mut tuple });
            pg_sys::ReleaseBuffer(buffer);
            Some(out)
        }
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        // SAFETY: opened by `open`; the lock stays to the transaction's end.
        unsafe { pg_sys::relation_close(self.rel, pg_sys::NoLock as pg_sys::LOCKMODE) }
    }
}

/// A [`Table`] checked and opened earlier in this transaction.
pub(super) struct Place {
    relid: pg_sys::Oid,
    cols: Vec<i32>,
}

/// `envelope.<name>` opened, when it is pg_envelope's heap table with exactly these columns.
fn open(name: &std::ffi::CStr, types: &[pg_sys::Oid], names: &[&[u8]]) -> Result<Table, String> {
    let what = || format!("envelope.{}", name.to_string_lossy());
    // SAFETY: catalog-cache lookups by name and oid; the relation is opened under a share lock
    // and closed by `Table`'s drop (or at the transaction's end on an error).
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"envelope".as_ptr(), true);
        let relid = if ns == pg_sys::InvalidOid { pg_sys::InvalidOid } else { pg_sys::get_relname_relid(name.as_ptr(), ns) };
        if relid == pg_sys::InvalidOid || !super::trail::is_extension_member(relid.to_u32()) {
            return Err(format!("{} is missing or is not pg_envelope's table", what()));
        }
        let mut table = Table { rel: pg_sys::relation_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE), cols: Vec::new() };
        let form = &*(*table.rel).rd_rel;
        if form.relkind != pg_sys::RELKIND_RELATION as std::ffi::c_char || form.relam != pg_sys::HEAP_TABLE_AM_OID {
            return Err(format!("{} is not a heap table", what()));
        }
        let attrs = pgrx::PgTupleDesc::from_pg_unchecked((*table.rel).rd_att);
        let live: Vec<(i32, &pg_sys::FormData_pg_attribute)> =
            (0..attrs.len()).filter_map(|i| attrs.get(i).map(|a| (i as i32 + 1, a))).filter(|(_, a)| !a.attisdropped).collect();
        let ok = live.len() == types.len()
            && live.iter().zip(types.iter().zip(names)).all(|((_, a), (ty, n))| {
                a.atttypid == *ty && a.atttypmod == -1 && std::ffi::CStr::from_ptr(a.attname.data.as_ptr()).to_bytes() == *n
            });
        if !ok {
            return Err(format!("{} does not have exactly the extension's columns (names and types)", what()));
        }
        table.cols = live.iter().map(|(n, _)| *n).collect();
        Ok(table)
    }
}

/// A row of a [`Table`] during a scan or fetch.
struct Row<'a> {
    table: &'a Table,
    tuple: pg_sys::HeapTuple,
}

impl Row<'_> {
    fn datum(&self, col: usize) -> Option<pg_sys::Datum> {
        let mut isnull = false;
        // SAFETY: a tuple of the table, an attribute number of its descriptor.
        let d = unsafe { pg_sys::heap_getattr(self.tuple, self.table.cols[col], (*self.table.rel).rd_att, &mut isnull) };
        (!isnull).then_some(d)
    }
    fn int8(&self, col: usize) -> i64 {
        // SAFETY: an int8 column (checked when the table was opened).
        self.datum(col).and_then(|d| unsafe { i64::from_datum(d, false) }).unwrap_or(0)
    }
    /// A timestamptz column in microseconds since the Unix epoch (`None`: NULL or infinite).
    fn time(&self, col: usize) -> Option<i64> {
        // SAFETY: a timestamptz column (an int8 datum).
        let raw = self.datum(col).and_then(|d| unsafe { i64::from_datum(d, false) })?;
        (raw != i64::MAX && raw != i64::MIN).then(|| raw.checked_add(PG_EPOCH_US)).flatten()
    }
    /// A bytea or text column's bytes (detoasted, copied).
    fn bytes(&self, col: usize) -> Vec<u8> {
        // SAFETY: a varlena column (bytea or text); pgrx detoasts and copies it.
        self.datum(col).and_then(|d| unsafe { Vec::<u8>::from_datum(d, false) }).unwrap_or_default()
    }
    fn text(&self, col: usize) -> String {
        String::from_utf8_lossy(&self.bytes(col)).into_owned()
    }
    fn tid(&self) -> pg_sys::ItemPointerData {
        // SAFETY: a tuple from a scan.
        unsafe { (*self.tuple).t_self }
    }
}

/// A snapshot for reading the trail as it is now, at any isolation level (it sees everything
/// committed before this call: what the writer committed, and what anyone removed; a REPEATABLE
/// READ transaction's snapshot may be older than either). Registered; unregistered on drop (at
/// an error's abort, the resource owner releases it).
pub(super) struct Snapshot(pg_sys::Snapshot);

impl Snapshot {
    pub(super) fn latest() -> Snapshot {
        // SAFETY: GetLatestSnapshot's result is static storage: registered (copied) at once.
        Snapshot(unsafe { pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot()) })
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        // SAFETY: registered by `now`.
        unsafe { pg_sys::UnregisterSnapshot(self.0) }
    }
}

/// Every stored block, in sequence order (by `first_seq`).
pub(super) fn blocks(table: &Table, snapshot: pg_sys::Snapshot) -> Vec<StoredBlock> {
    let mut out = Vec::new();
    // SAFETY: a scan of an open table with a registered snapshot.
    unsafe {
        table.scan(snapshot, |r| {
            out.push(StoredBlock {
                first_seq: r.int8(0),
                last_seq: r.int8(1),
                first_at_us: r.time(2).unwrap_or(0),
                last_at_us: r.time(3).unwrap_or(0),
                prev_hash: r.bytes(4).try_into().unwrap_or([0xff; 32]),
                bytes: r.bytes(5),
            })
        })
    };
    out.sort_by_key(|b| (b.first_seq, b.last_seq));
    out
}

/// Where a stored block is, for reading it later ([`block_at`]).
#[derive(Clone, Copy)]
pub(super) struct BlockRef {
    pub first_seq: i64,
    pub last_seq: i64,
    tid: pg_sys::ItemPointerData,
}

/// The stored blocks' labels and places, in sequence order (only the two leading fixed-width
/// columns are read: a large trail costs 24 bytes a block here).
pub(super) fn block_refs(table: &Table, snapshot: pg_sys::Snapshot) -> Vec<BlockRef> {
    let mut out = Vec::new();
    // SAFETY: a scan of an open table with a live snapshot.
    unsafe { table.scan(snapshot, |r| out.push(BlockRef { first_seq: r.int8(0), last_seq: r.int8(1), tid: r.tid() })) };
    out.sort_by_key(|b| (b.first_seq, b.last_seq));
    out
}

/// The block `at` points to, as `snapshot` sees it (`None`: gone, which a snapshot held since
/// [`block_refs`] does not allow).
pub(super) fn block_at(table: &Table, snapshot: pg_sys::Snapshot, at: &BlockRef) -> Option<([u8; 32], Vec<u8>)> {
    // SAFETY: a fetch from an open table with a live snapshot.
    unsafe { table.fetch(snapshot, at.tid, |r| (r.bytes(4).try_into().unwrap_or([0xff; 32]), r.bytes(5))) }
}

/// One stored checkpoint, every column.
pub(super) struct CheckpointRow {
    pub seq: i64,
    pub hash: Vec<u8>,
    pub at_us: i64,
    pub at: Option<i64>,
    pub method: String,
    pub provider: String,
    pub key_name: String,
    pub mac: Vec<u8>,
}

impl CheckpointRow {
    /// As `audit_verify` checks it: a hash that is not 32 bytes reads as all `0xff` (it matches
    /// no record and no MAC).
    pub(super) fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            head: Head { seq: self.seq, hash: self.hash.clone().try_into().unwrap_or([0xff; 32]) },
            at_us: self.at_us,
            provider: self.provider.clone(),
            mac: self.mac.clone(),
        }
    }
}

/// Every stored checkpoint, in order of sequence and time.
pub(super) fn checkpoints(table: &Table, snapshot: pg_sys::Snapshot) -> Vec<CheckpointRow> {
    let mut out = Vec::new();
    // SAFETY: a scan of an open table with a live snapshot.
    unsafe {
        table.scan(snapshot, |r| {
            out.push(CheckpointRow {
                seq: r.int8(0),
                hash: r.bytes(1),
                at_us: r.int8(2),
                at: r.time(3),
                method: r.text(4),
                provider: r.text(5),
                key_name: r.text(6),
                mac: r.bytes(7),
            })
        })
    };
    out.sort_by_key(|c| (c.seq, c.at_us));
    out
}

impl Snapshot {
    pub(super) fn raw(&self) -> pg_sys::Snapshot {
        self.0
    }
}
