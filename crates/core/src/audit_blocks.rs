//! The audit trail's storage: several chained records per table row ("blocks").
//!
//! One heap tuple and one B-tree entry per record were 85% of the audit writer's CPU (the writer
//! alone, 8,000 queued records: 1.7-2.4 µs per record with the rows, 0.31 µs with the inserts
//! skipped; docs/benchmarks.md). The writer stores a batch's records as blocks: one row of
//! `envelope.audit_blocks` per block, the view `envelope.audit_log` showing one row per record.
//!
//! Two formats, told apart by the first byte; both are read forever, the writer writes the
//! second. What the chain hashes is the same in both: each record's canonical bytes
//! ([`crate::audit::Record::canonical`]), after the previous record's hash.
//!
//! **Format 1** (the first byte is 0: the high byte of a length under 16 MB). Per record:
//!
//! ```text
//! u32 big-endian length L | L bytes: the record's canonical bytes | 32 bytes: its hash
//! ```
//!
//! **Format 2, compact** (first byte [`COMPACT`]), then per record:
//!
//! ```text
//! varint mask        bit i: string field i (in STRING_FIELDS' order) differs from the previous
//!                    record's in this block and follows below; the first record's "previous"
//!                    is a record of empty strings and zeros
//! 7 zigzag varints   seq and at_us as differences from the previous record's, backend_pid as a
//!                    difference, statement_id, value_count, failure_count and duration_us whole
//! per set bit        varint length, UTF-8 bytes
//! 8 bytes            the first 8 bytes of the record's hash (a tag)
//! ```
//!
//! The strings a block repeats in every record (database, login, role, client, application,
//! tenant) are stored once per block, and the full hashes are not stored at all: each is
//! computed again when the block is read (the first record's previous hash is the row's
//! `prev_hash`, every later one's the record before it), and the tag tells which record a
//! careless edit changed. This takes nothing from the tamper evidence: the chain is the full
//! hashes, linked across blocks by the next row's `prev_hash` and certified by the signed
//! checkpoints; a forger who recomputes hashes defeats a stored hash as easily as a tag. A
//! record of the OLTP benchmark took ~220 bytes in format 1 and ~35 in format 2, and the bytes
//! were the writer's largest cost (their WAL, and the pages the table grows by:
//! docs/benchmarks.md).
//!
//! Nothing here is trusted when read back: [`read_block`] parses whatever bytes it is given
//! (never a panic, and at most [`MAX_DECODED_BYTES`] of records from one block, however they
//! were forged), and the chain's verification checks every hash.

use crate::audit::{chain_hash, Break, Chain, Record, RecordRef, Stored};

/// A block is closed once its bytes pass this size: with the row's other columns the tuple
/// stays under PostgreSQL's TOAST threshold (about 2,000 bytes), so it is neither compressed nor
/// moved out of line (a 7.4 kB block cost 60% more per record than a 1.9 kB one, measured):
/// about 45 records of the OLTP benchmark in format 2.
pub const BLOCK_BYTES: usize = 1_600;

/// The most bytes [`read_block`] parses: a block the writer makes is at most [`BLOCK_BYTES`]
/// plus one record (a queue slot holds 1,200 bytes; the writer's own records are a few hundred).
/// Anything larger was not written by the writer, and is reported unreadable instead of decoded
/// (decoding is done in memory outside PostgreSQL's allocator: a 1 GB argument to the SQL
/// decoder asked for about 8 GB, and a failed allocation aborts the server: insider review 45).
pub const MAX_BLOCK_BYTES: usize = 256 * 1024;

/// The most canonical bytes of records one block decodes to. A compact entry repeats the
/// previous record's strings for free, so a forged block of 256 kB could otherwise stand for
/// gigabytes (a long string, then thousands of 17-byte entries repeating it). A block the writer
/// makes decodes to at most ~100 records of at most ~1.2 kB.
pub const MAX_DECODED_BYTES: usize = 1 << 20;

/// The first byte of a format-2 (compact) block.
pub const COMPACT: u8 = 2;

/// Bytes of each record's hash a compact block keeps.
pub const TAG_BYTES: usize = 8;

/// The string fields in the order of the compact mask's bits: the ones that change from record
/// to record first, so that the mask mostly fits one byte.
const STRING_FIELDS: usize = 12;

fn strings<'a>(r: &RecordRef<'a>) -> [&'a str; STRING_FIELDS] {
    [
        r.kind,
        r.operation,
        r.tenant,
        r.key_versions,
        r.outcome,
        r.request_id,
        r.detail,
        r.current_role,
        r.session_user,
        r.application_name,
        r.client_addr,
        r.database,
    ]
}

fn strings_mut(r: &mut Record) -> [&mut String; STRING_FIELDS] {
    [
        &mut r.kind,
        &mut r.operation,
        &mut r.tenant,
        &mut r.key_versions,
        &mut r.outcome,
        &mut r.request_id,
        &mut r.detail,
        &mut r.current_role,
        &mut r.session_user,
        &mut r.application_name,
        &mut r.client_addr,
        &mut r.database,
    ]
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(u: u64) -> i64 {
    (u >> 1) as i64 ^ -((u & 1) as i64)
}

/// Whether two short strings are equal, compared inline (the writer compares a dozen fields per
/// record, almost all equal: calls to libc's `memcmp` were 14% of its CPU).
#[inline]
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let (mut x, mut y) = (a.chunks_exact(8), b.chunks_exact(8));
    for (p, q) in x.by_ref().zip(y.by_ref()) {
        if p != q {
            return false;
        }
    }
    x.remainder().iter().zip(y.remainder()).all(|(p, q)| p == q)
}

/// Appends `cur` as a compact entry after `prev` (the block's previous record, or an empty one).
/// Returns the mask: which string fields differ.
fn put_compact(out: &mut Vec<u8>, prev: &RecordRef<'_>, cur: &RecordRef<'_>, hash: &[u8; 32]) -> u64 {
    let (p, c) = (strings(prev), strings(cur));
    let mask = (0..STRING_FIELDS).filter(|&i| !same(p[i], c[i])).fold(0u64, |m, i| m | 1 << i);
    put_varint(out, mask);
    for v in [
        cur.seq.wrapping_sub(prev.seq),
        cur.at_us.wrapping_sub(prev.at_us),
        cur.backend_pid.wrapping_sub(prev.backend_pid),
        cur.statement_id,
        cur.value_count,
        cur.failure_count,
        cur.duration_us,
    ] {
        put_varint(out, zigzag(v));
    }
    for (i, s) in c.iter().enumerate() {
        if mask & 1 << i != 0 {
            put_varint(out, s.len() as u64);
            out.extend_from_slice(s.as_bytes());
        }
    }
    out.extend_from_slice(&hash[..TAG_BYTES]);
    mask
}

/// Copies `from` into `to`, reusing `to`'s string allocations (`Clone` would allocate anew):
/// the numbers, and the string fields `mask` names (the others are equal already).
fn copy_record(to: &mut Record, from: &Record, mask: u64) {
    to.seq = from.seq;
    to.at_us = from.at_us;
    to.backend_pid = from.backend_pid;
    to.statement_id = from.statement_id;
    to.value_count = from.value_count;
    to.failure_count = from.failure_count;
    to.duration_us = from.duration_us;
    let f = strings(&from.as_ref());
    for (i, t) in strings_mut(to).into_iter().enumerate() {
        if mask & 1 << i != 0 {
            t.clear();
            t.push_str(f[i]);
        }
    }
}

/// A record of empty strings and zeros (what a block's first compact entry is relative to).
fn reset_record(r: &mut Record) {
    let empty = Record::default();
    copy_record(r, &empty, u64::MAX);
}

/// One block being built or written.
#[derive(Debug, Default)]
pub struct Block {
    pub first_seq: i64,
    pub last_seq: i64,
    /// Microseconds since the Unix epoch of its first and last records.
    pub first_at_us: i64,
    pub last_at_us: i64,
    /// The hash before its first record.
    pub prev_hash: [u8; 32],
    /// The format byte and the entries (see the module's documentation).
    pub bytes: Vec<u8>,
    pub records: usize,
    /// The queue position of its last record (where the writer was; not hashed).
    pub queue_pos: u64,
    /// Its last record (the next entry is written as the difference from it).
    last: Record,
}

/// A batch's blocks, their buffers kept from batch to batch.
#[derive(Debug, Default)]
pub struct Blocks {
    blocks: Vec<Block>,
    used: usize,
}

impl Block {
    /// The block as a row of the table holds it (what [`records_of`] reads back).
    pub fn to_stored(&self) -> StoredBlock {
        StoredBlock {
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            first_at_us: self.first_at_us,
            last_at_us: self.last_at_us,
            prev_hash: self.prev_hash,
            bytes: self.bytes.clone(),
        }
    }
}

impl Blocks {
    /// Empties the list (the buffers are kept).
    pub fn clear(&mut self) {
        self.used = 0;
    }

    /// The blocks of this batch.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks[..self.used]
    }

    /// Appends `record` to the chain and to the last block (a new one when the last is full);
    /// `pos` is its queue position. Returns it stored.
    pub fn push(&mut self, chain: &mut Chain, mut record: Record, pos: u64) -> Stored {
        let prev_hash = chain.head().hash;
        let hash = self.push_in_place(chain, &mut record, pos);
        Stored { record, prev_hash, hash }
    }

    /// [`Blocks::push`] without moving the record (see [`Chain::append_in_place`]): assigns its
    /// sequence number and returns its hash.
    pub fn push_in_place(&mut self, chain: &mut Chain, record: &mut Record, pos: u64) -> [u8; 32] {
        let open = self.used > 0 && self.blocks[self.used - 1].bytes.len() < BLOCK_BYTES;
        if !open {
            if self.used == self.blocks.len() {
                self.blocks.push(Block { bytes: Vec::with_capacity(BLOCK_BYTES + 512), ..Block::default() });
            }
            let b = &mut self.blocks[self.used];
            b.bytes.clear();
            b.bytes.push(COMPACT);
            b.records = 0;
            b.prev_hash = chain.head().hash;
            reset_record(&mut b.last);
            self.used += 1;
        }
        let b = &mut self.blocks[self.used - 1];
        let hash = chain.append_in_place(record);
        let changed = put_compact(&mut b.bytes, &b.last.as_ref(), &record.as_ref(), &hash);
        copy_record(&mut b.last, record, changed);
        if b.records == 0 {
            b.first_seq = record.seq;
            b.first_at_us = record.at_us;
        }
        b.last_seq = record.seq;
        b.last_at_us = record.at_us;
        b.records += 1;
        b.queue_pos = pos;
        hash
    }
}

/// One parsed format-1 entry: the record's canonical bytes, its hash as stored, the rest.
fn entry(bytes: &[u8]) -> Option<(&[u8], [u8; 32], &[u8])> {
    let (len, rest) = bytes.split_at_checked(4)?;
    let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
    let (canonical, rest) = rest.split_at_checked(len)?;
    let (hash, rest) = rest.split_at_checked(32)?;
    Some((canonical, hash.try_into().ok()?, rest))
}

/// What [`read_block`] found.
#[derive(Debug, Default)]
pub struct Read {
    pub records: Vec<Stored>,
    /// Where bytes that are not entries start (`None`: the block parsed to its end).
    pub unreadable_at: Option<usize>,
}

/// Parses a stored block (either format) whose first record follows `prev_hash`. Never panics:
/// bytes that are not entries (a block edited by hand) end the parse at their offset.
///
/// A record's `hash` is the hash stored with it: in format 1 the 32 stored bytes; in format 2
/// the hash computed from its bytes when its tag matches, and otherwise the tag followed by the
/// rest of the computed hash (so that verification reports that record as altered, as it
/// would a format-1 record whose stored hash does not match). The next record chains from that
/// value: after a record edited in a format-2 block, the records after it in the block show
/// altered hashes too (its original hash is not stored to chain from); verification reports the
/// first.
pub fn read_block(prev_hash: [u8; 32], bytes: &[u8]) -> Read {
    let mut out = Read::default();
    // Larger than any block the writer makes, or empty (the writer never stores a block without
    // records, in either format: one emptied by hand must show in the view and the export, not
    // vanish from them: insider review 51).
    if bytes.len() > MAX_BLOCK_BYTES || bytes.is_empty() || bytes == [COMPACT] {
        out.unreadable_at = Some(0);
        return out;
    }
    if bytes.first() == Some(&COMPACT) {
        read_compact(prev_hash, bytes, &mut out);
        return out;
    }
    let mut prev = prev_hash;
    let mut rest = bytes;
    let mut decoded = 0usize;
    while !rest.is_empty() {
        let Some((canonical, hash, tail)) = entry(rest) else {
            out.unreadable_at = Some(bytes.len() - rest.len());
            break;
        };
        let record = Record::from_canonical(canonical);
        decoded += canonical.len();
        let Some(record) = record.filter(|_| decoded <= MAX_DECODED_BYTES) else {
            out.unreadable_at = Some(bytes.len() - rest.len());
            break;
        };
        out.records.push(Stored { record, prev_hash: prev, hash });
        prev = hash;
        rest = tail;
    }
    out
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    /// A varint in its shortest form only (a longer one for the same number, `80 00` for 0, is
    /// not what the writer writes: accepted, it would let the stored bytes change while the
    /// records they decode to, and so every check, stay the same: insider review 51).
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for (i, &b) in self.0.iter().enumerate().take(10) {
            if i == 9 && b > 1 {
                return None; // more than 64 bits
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return None; // not the shortest form
                }
                self.0 = &self.0[i + 1..];
                return Some(v);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (h, t) = self.0.split_at_checked(n)?;
        self.0 = t;
        Some(h)
    }
}

/// One compact entry into `cur` (which holds the previous record). `None`: not an entry.
fn read_compact_entry(c: &mut Cursor<'_>, cur: &mut Record) -> Option<[u8; TAG_BYTES]> {
    let mask = c.varint()?;
    if mask >> STRING_FIELDS != 0 {
        return None;
    }
    let mut n = [0i64; 7];
    for v in &mut n {
        *v = unzigzag(c.varint()?);
    }
    cur.seq = cur.seq.wrapping_add(n[0]);
    cur.at_us = cur.at_us.wrapping_add(n[1]);
    cur.backend_pid = cur.backend_pid.wrapping_add(n[2]);
    [cur.statement_id, cur.value_count, cur.failure_count, cur.duration_us] = [n[3], n[4], n[5], n[6]];
    for (i, s) in strings_mut(cur).into_iter().enumerate() {
        if mask & 1 << i != 0 {
            let len = usize::try_from(c.varint()?).ok()?;
            let v = std::str::from_utf8(c.take(len)?).ok()?;
            // A string the mask names must differ from the previous record's: the writer names
            // only those, and the block's bytes are then the one encoding of its records.
            if same(s, v) {
                return None;
            }
            s.clear();
            s.push_str(v);
        }
    }
    c.take(TAG_BYTES)?.try_into().ok()
}

fn read_compact(prev_hash: [u8; 32], bytes: &[u8], out: &mut Read) {
    let mut c = Cursor(&bytes[1..]);
    let mut cur = Record::default();
    let mut canonical = Vec::with_capacity(256);
    let mut prev = prev_hash;
    let mut decoded = 0usize;
    while !c.0.is_empty() {
        let at = bytes.len() - c.0.len();
        let Some(tag) = read_compact_entry(&mut c, &mut cur) else {
            out.unreadable_at = Some(at);
            return;
        };
        canonical.clear();
        cur.as_ref().canonical_into(&mut canonical);
        decoded += canonical.len();
        if decoded > MAX_DECODED_BYTES {
            out.unreadable_at = Some(at);
            return;
        }
        let mut hash = chain_hash(&prev, &canonical);
        hash[..TAG_BYTES].copy_from_slice(&tag);
        out.records.push(Stored { record: cur.clone(), prev_hash: prev, hash });
        prev = hash;
    }
}

/// A stored block's row as the verifier reads it.
#[derive(Debug, Clone)]
pub struct StoredBlock {
    pub first_seq: i64,
    pub last_seq: i64,
    pub first_at_us: i64,
    pub last_at_us: i64,
    pub prev_hash: [u8; 32],
    pub bytes: Vec<u8>,
}

/// The records of stored blocks (in the order given, expected ascending), for
/// [`crate::audit::verify_stored`]: each block's records, then a break if its bytes did not
/// all parse or its labels differ from its records (`first_seq`, `last_seq` and the times are
/// what lookups, retention and time-range queries use).
pub fn records_of(blocks: impl IntoIterator<Item = StoredBlock>) -> impl Iterator<Item = Result<Stored, Break>> {
    blocks.into_iter().flat_map(|b| {
        let read = read_block(b.prev_hash, &b.bytes);
        let mislabelled = match (read.records.first(), read.records.last()) {
            (Some(f), Some(l)) => {
                f.record.seq != b.first_seq || l.record.seq != b.last_seq || f.record.at_us != b.first_at_us || l.record.at_us != b.last_at_us
            }
            _ => true,
        };
        let after = read.records.last().map_or(b.first_seq.saturating_sub(1), |s| s.record.seq);
        let tail = if read.unreadable_at.is_some() {
            Some(Err(Break::Unreadable { after_seq: after }))
        } else if mislabelled {
            Some(Err(Break::Mislabelled { first_seq: read.records.first().map_or(b.first_seq, |s| s.record.seq) }))
        } else {
            None
        };
        read.records.into_iter().map(Ok).chain(tail)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{verify, verify_stored, Head, GENESIS};

    fn rec(i: i64) -> Record {
        Record {
            at_us: 1_700_000_000_000_000 + i,
            kind: "decrypt".into(),
            database: "app".into(),
            session_user: "alice".into(),
            current_role: "alice".into(),
            client_addr: "127.0.0.1".into(),
            application_name: "psql".into(),
            backend_pid: 4242,
            statement_id: i,
            tenant: format!("tenant_{i}"),
            key_versions: "1".into(),
            operation: "decrypt".into(),
            value_count: 10 * i,
            outcome: "ok".into(),
            ..Record::default()
        }
    }

    fn stored(blocks: &Blocks) -> Vec<StoredBlock> {
        blocks.blocks().iter().map(Block::to_stored).collect()
    }

    fn build(n: i64) -> (Blocks, Vec<Stored>) {
        let mut chain = Chain::after(None);
        let mut blocks = Blocks::default();
        let mut all = Vec::new();
        for i in 0..n {
            all.push(blocks.push(&mut chain, rec(i), i as u64));
        }
        (blocks, all)
    }

    #[test]
    fn blocks_hold_the_chain_the_records_make() {
        let (blocks, all) = build(100);
        assert!(blocks.blocks().len() > 1 && blocks.blocks().len() < 10, "{} blocks", blocks.blocks().len());
        for b in blocks.blocks() {
            assert!(b.bytes.len() < BLOCK_BYTES + 400, "a block stays small: {}", b.bytes.len());
        }
        // The same chain as appending one by one, read back in order.
        let mut plain = Chain::after(None);
        let expected: Vec<Stored> = (0..100).map(|i| plain.append(rec(i))).collect();
        assert_eq!(all, expected);
        let read: Vec<Stored> = records_of(stored(&blocks)).map(|r| r.unwrap()).collect();
        assert_eq!(read, expected);
        let v = verify(read, None, &[Head { seq: 100, hash: expected[99].hash }]);
        assert_eq!(v.first_break, None);
        assert_eq!(v.records, 100);
    }

    #[test]
    fn a_reused_builder_starts_each_batch_after_the_head() {
        let mut chain = Chain::after(None);
        let mut blocks = Blocks::default();
        let mut kept = Vec::new();
        for batch in 0..3 {
            blocks.clear();
            for i in 0..20 {
                blocks.push(&mut chain, rec(batch * 20 + i), 0);
            }
            kept.extend(stored(&blocks));
        }
        let v = verify_stored(records_of(kept), None, &[chain.head()]);
        assert_eq!((v.first_break, v.records), (None, 60));
    }

    /// The same records written as format-1 blocks (what the writer wrote before format 2).
    fn stored_format_1(records: &[Stored], per_block: usize) -> Vec<StoredBlock> {
        let mut chain = Chain::after(None);
        records
            .chunks(per_block)
            .map(|c| {
                let prev_hash = chain.head().hash;
                let mut bytes = Vec::new();
                for s in c {
                    chain.append_entry(s.record.clone(), &mut bytes);
                }
                StoredBlock {
                    first_seq: c[0].record.seq,
                    last_seq: c[c.len() - 1].record.seq,
                    first_at_us: c[0].record.at_us,
                    last_at_us: c[c.len() - 1].record.at_us,
                    prev_hash,
                    bytes,
                }
            })
            .collect()
    }

    #[test]
    fn format_1_blocks_still_read_and_a_trail_may_mix_both() {
        let (blocks, all) = build(60);
        let old = stored_format_1(&all[..30], 7);
        assert!(old.iter().all(|b| b.bytes[0] == 0));
        let read: Vec<Stored> = records_of(old.clone()).map(|r| r.unwrap()).collect();
        assert_eq!(read, all[..30]);
        // Old blocks, then new ones continuing the chain.
        let mut chain = Chain::after(Some(Head { seq: all[29].record.seq, hash: all[29].hash }));
        let mut newer = Blocks::default();
        for s in &all[30..] {
            newer.push(&mut chain, s.record.clone(), 0);
        }
        let mixed: Vec<StoredBlock> = old.into_iter().chain(stored(&newer)).collect();
        let v = verify_stored(records_of(mixed), None, &[Head { seq: 60, hash: all[59].hash }]);
        assert_eq!((v.first_break, v.records), (None, 60));
        drop(blocks);
    }

    #[test]
    fn compact_blocks_store_repeated_strings_once() {
        let (blocks, all) = build(100);
        let stored_bytes: usize = blocks.blocks().iter().map(|b| b.bytes.len()).sum();
        let canonical: usize = all.iter().map(|s| 4 + s.record.canonical().len() + 32).sum();
        // rec(i): a new tenant name and counts per record, the rest repeated.
        assert!(stored_bytes * 3 < canonical, "{stored_bytes} bytes stored for {canonical} in format 1");
        assert!(blocks.blocks().iter().all(|b| b.bytes[0] == COMPACT));
        // A record of the OLTP benchmark's shape: everything but the counters repeated.
        let mut chain = Chain::after(None);
        let mut b = Blocks::default();
        for i in 0..40 {
            let mut r = rec(0);
            r.statement_id = 100_000 + i;
            r.backend_pid = 4242 + i % 8;
            r.at_us += 37 * i;
            b.push(&mut chain, r, 0);
        }
        let per = b.blocks()[0].bytes.len() / b.blocks()[0].records;
        assert!(per < 24, "{per} bytes per record");
    }

    #[test]
    fn a_forged_block_cannot_decode_to_more_than_the_bound() {
        // One record with a 60 kB detail, then entries that repeat it: 16 bytes each.
        let mut bytes = vec![COMPACT];
        let mut big = rec(1);
        big.detail = "x".repeat(60_000);
        put_compact(&mut bytes, &Record::default().as_ref(), &big.as_ref(), &[0; 32]);
        let mut rest = vec![0u8, 2, 0, 0, 0, 0, 0, 0];
        rest.extend_from_slice(&[0; TAG_BYTES]);
        while bytes.len() + rest.len() < MAX_BLOCK_BYTES {
            bytes.extend_from_slice(&rest);
        }
        let r = read_block(GENESIS, &bytes);
        assert!(r.unreadable_at.is_some());
        let decoded: usize = r.records.iter().map(|s| s.record.canonical().len()).sum();
        assert!(decoded <= MAX_DECODED_BYTES, "{decoded}");
        assert!(r.records.len() < 20, "{}", r.records.len());
    }

    #[test]
    fn tampered_blocks_break_the_chain_where_they_were_changed() {
        let (blocks, all) = build(300);
        assert!(blocks.blocks().len() > 4);
        let cp = [Head { seq: 300, hash: all[299].hash }];
        let run = |f: &dyn Fn(&mut Vec<StoredBlock>)| {
            let mut s = stored(&blocks);
            f(&mut s);
            verify_stored(records_of(s), None, &cp).first_break
        };
        // Re-encodes a block's records as a forger would, keeping each record's stored tag.
        let rewrite = |b: &mut StoredBlock, f: &dyn Fn(&mut Vec<Stored>)| {
            let mut records = read_block(b.prev_hash, &b.bytes).records;
            f(&mut records);
            let mut bytes = vec![COMPACT];
            let mut prev = Record::default();
            for s in &records {
                put_compact(&mut bytes, &prev.as_ref(), &s.record.as_ref(), &s.hash);
                prev = s.record.clone();
            }
            b.bytes = bytes;
            b.first_seq = records.first().map_or(0, |s| s.record.seq);
            b.first_at_us = records.first().map_or(0, |s| s.record.at_us);
        };
        // The second block's second record's value_count.
        let second = stored(&blocks)[1].first_seq;
        assert_eq!(run(&|s| rewrite(&mut s[1], &|r| r[1].record.value_count += 1)), Some(Break::Altered { seq: second + 1 }));
        // The same with its tag replaced by the new record's (the next record's link breaks):
        // only a forger who recomputes every later hash gets past this, and then the
        // checkpoint or the next block's prev_hash stops them.
        let relinked = run(&|s| {
            rewrite(&mut s[1], &|r| {
                r[1].record.value_count += 1;
                r[1].hash = r[1].record.hash(&r[0].hash);
            })
        });
        assert_eq!(relinked, Some(Break::Altered { seq: second + 2 }));
        // Garbage in place of the entries.
        assert_eq!(run(&|s| s[1].bytes.truncate(10)), Some(Break::Unreadable { after_seq: second - 1 }));
        // A whole block deleted.
        let third = stored(&blocks)[2].first_seq;
        assert_eq!(run(&|s| { s.remove(1); }), Some(Break::Gap { expected: second, found: third }));
        // Two blocks swapped.
        assert_eq!(run(&|s| s.swap(1, 2)), Some(Break::Gap { expected: second, found: third }));
        // A label changed (what retention and lookups go by).
        assert_eq!(run(&|s| s[1].last_seq += 1), Some(Break::Mislabelled { first_seq: second }));
        assert_eq!(run(&|s| s[1].first_at_us -= 1), Some(Break::Mislabelled { first_seq: second }));
        // A record removed from inside a block, the block re-encoded: the next one's link breaks.
        assert_eq!(run(&|s| rewrite(&mut s[1], &|r| { r.remove(0); })), Some(Break::Gap { expected: second, found: second + 1 }));
        // A record inserted twice, and two swapped.
        assert_eq!(run(&|s| rewrite(&mut s[1], &|r| r.insert(1, r[0].clone()))), Some(Break::Duplicate { seq: second }));
        assert_eq!(run(&|s| rewrite(&mut s[1], &|r| r.swap(1, 2))), Some(Break::Gap { expected: second + 1, found: second + 2 }));
        // The tail's last block dropped: the checkpoint sees it.
        let last_first = stored(&blocks).last().unwrap().first_seq;
        assert_eq!(run(&|s| { s.pop(); }), Some(Break::Truncated { checkpoint_seq: 300, last_seq: last_first - 1 }));
        // Re-encoded unchanged: no break.
        assert_eq!(run(&|s| rewrite(&mut s[1], &|_| {})), None);
        assert_eq!(run(&|_| {}), None);
    }

    #[test]
    fn any_bytes_parse_without_a_panic() {
        let (blocks, all) = build(5);
        for good in [blocks.blocks()[0].bytes.clone(), stored_format_1(&all, 5).remove(0).bytes] {
            for cut in 0..good.len() {
                let r = read_block(GENESIS, &good[..cut]);
                assert!(r.unreadable_at.is_some() || !r.records.is_empty());
            }
            // Larger than any block the writer makes: not decoded at all.
            let big: Vec<u8> = good.iter().copied().cycle().take(MAX_BLOCK_BYTES + 1).collect();
            let r = read_block(GENESIS, &big);
            assert!(r.records.is_empty() && r.unreadable_at == Some(0));
        }
        let mut x = stored_format_1(&all, 5).remove(0).bytes;
        x[0] = 0xff; // a length of ~4 GB
        assert_eq!(read_block(GENESIS, &x).unreadable_at, Some(0));
        // A varint longer than 64 bits, a mask with unknown bits, a string longer than the block,
        // a varint not in its shortest form (`80 00` for 0), a string the mask names that equals
        // the previous record's (here the empty kind of the record before the first).
        for bad in [
            &[COMPACT, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f][..],
            &[COMPACT, 0x80, 0x40],
            &[COMPACT, 1, 2, 0, 0, 0, 0, 0, 0, 0x7f],
            &[COMPACT, 0x80, 0x00, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[COMPACT, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ] {
            let r = read_block(GENESIS, bad);
            assert_eq!((r.records.len(), r.unreadable_at), (0, Some(1)), "{bad:?}");
        }
        // Empty blocks of either format: unreadable, not nothing.
        for empty in [&[][..], &[COMPACT]] {
            let r = read_block(GENESIS, empty);
            assert_eq!((r.records.len(), r.unreadable_at), (0, Some(0)), "{empty:?}");
        }
        // The writer's own blocks are in the one encoding the reader accepts.
        let (many, _) = build(300);
        for b in many.blocks() {
            assert!(read_block(b.prev_hash, &b.bytes).unreadable_at.is_none());
        }
        let mut state = 0x1234_5678_u64;
        for round in 0..4_000 {
            let n = (state % 300) as usize;
            let mut bytes: Vec<u8> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            if round % 2 == 0 && !bytes.is_empty() {
                bytes[0] = COMPACT;
            }
            let _ = read_block(GENESIS, &bytes);
        }
    }

    #[test]
    fn short_strings_compare_as_strings_do() {
        let words = ["", "a", "ab", "postgres", "postgres1", "postgret", "application_name", "application_namf", "127.0.0.1"];
        for a in words {
            for b in words {
                assert_eq!(same(a, b), a == b, "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn varints_round_trip_at_their_edges() {
        for v in [0i64, 1, -1, 63, -64, 64, i64::MAX, i64::MIN, 1 << 35, -(1 << 35)] {
            let mut out = Vec::new();
            put_varint(&mut out, zigzag(v));
            assert!(out.len() <= 10);
            let mut c = Cursor(&out);
            assert_eq!(c.varint().map(unzigzag), Some(v));
            assert!(c.0.is_empty());
        }
    }
}
