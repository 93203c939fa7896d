//! The audit trail's storage: several chained records per table row ("blocks").
//!
//! One heap tuple and one B-tree entry per record were 85% of the audit writer's CPU (the writer
//! alone, 8,000 queued records: 1.7-2.4 µs per record with the rows, 0.31 µs with the inserts
//! skipped; docs/benchmarks.md). The writer now stores a batch's records as blocks of a few
//! records each: one row of `envelope.audit_blocks` per block, the view `envelope.audit_log`
//! showing one row per record as before.
//!
//! A block's bytes are its records' entries, in sequence order, each
//!
//! ```text
//! u32 big-endian length L | L bytes: the record's canonical bytes (the ones the chain hashes) | 32 bytes: its hash
//! ```
//!
//! The first entry's previous hash is the block row's `prev_hash`; every later entry's is the
//! hash of the entry before it. Nothing here is trusted when read back: [`read_block`] parses
//! whatever bytes it is given (never a panic), and the chain's verification checks every hash.

use crate::audit::{Break, Chain, Record, Stored};

/// A block is closed once its bytes pass this size: with the row's other columns the tuple
/// stays under PostgreSQL's TOAST threshold (about 2,000 bytes), so it is neither compressed nor
/// moved out of line (a 7.4 kB block cost 60% more per record than a 1.9 kB one, measured),
/// about 7 records of ~230 bytes.
pub const BLOCK_BYTES: usize = 1_600;

/// The most bytes [`read_block`] parses: a block the writer makes is at most [`BLOCK_BYTES`]
/// plus one record (a queue slot holds 1,200 bytes; the writer's own records are a few hundred).
/// Anything larger was not written by the writer, and is reported unreadable instead of decoded
/// (decoding is done in memory outside PostgreSQL's allocator: a 1 GB argument to the SQL
/// decoder asked for about 8 GB, and a failed allocation aborts the server: insider review 45).
pub const MAX_BLOCK_BYTES: usize = 256 * 1024;

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
    /// The entries (see the module's documentation).
    pub bytes: Vec<u8>,
    pub records: usize,
    /// The queue position of its last record (where the writer was; not hashed).
    pub queue_pos: u64,
}

/// A batch's blocks, their buffers kept from batch to batch.
#[derive(Debug, Default)]
pub struct Blocks {
    blocks: Vec<Block>,
    used: usize,
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
    pub fn push(&mut self, chain: &mut Chain, record: Record, pos: u64) -> Stored {
        let open = self.used > 0 && self.blocks[self.used - 1].bytes.len() < BLOCK_BYTES;
        if !open {
            if self.used == self.blocks.len() {
                self.blocks.push(Block { bytes: Vec::with_capacity(BLOCK_BYTES + 512), ..Block::default() });
            }
            let b = &mut self.blocks[self.used];
            b.bytes.clear();
            b.records = 0;
            b.prev_hash = chain.head().hash;
            self.used += 1;
        }
        let b = &mut self.blocks[self.used - 1];
        let s = chain.append_entry(record, &mut b.bytes);
        if b.records == 0 {
            b.first_seq = s.record.seq;
            b.first_at_us = s.record.at_us;
        }
        b.last_seq = s.record.seq;
        b.last_at_us = s.record.at_us;
        b.records += 1;
        b.queue_pos = pos;
        s
    }
}

/// One parsed entry: the record, its canonical bytes' hash as stored.
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

/// Parses a stored block whose first record follows `prev_hash`. Never panics: bytes that are
/// not entries (a block edited by hand) end the parse at their offset.
pub fn read_block(prev_hash: [u8; 32], bytes: &[u8]) -> Read {
    let mut out = Read::default();
    if bytes.len() > MAX_BLOCK_BYTES {
        out.unreadable_at = Some(0);
        return out;
    }
    let mut prev = prev_hash;
    let mut rest = bytes;
    while !rest.is_empty() {
        let Some((canonical, hash, tail)) = entry(rest) else {
            out.unreadable_at = Some(bytes.len() - rest.len());
            break;
        };
        let Some(record) = Record::from_canonical(canonical) else {
            out.unreadable_at = Some(bytes.len() - rest.len());
            break;
        };
        out.records.push(Stored { record, prev_hash: prev, hash });
        prev = hash;
        rest = tail;
    }
    out
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
        blocks
            .blocks()
            .iter()
            .map(|b| StoredBlock {
                first_seq: b.first_seq,
                last_seq: b.last_seq,
                first_at_us: b.first_at_us,
                last_at_us: b.last_at_us,
                prev_hash: b.prev_hash,
                bytes: b.bytes.clone(),
            })
            .collect()
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
        assert!(blocks.blocks().len() > 5 && blocks.blocks().len() < 30, "{} blocks", blocks.blocks().len());
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

    #[test]
    fn tampered_blocks_break_the_chain_where_they_were_changed() {
        let (blocks, all) = build(40);
        let cp = [Head { seq: 40, hash: all[39].hash }];
        let run = |f: &dyn Fn(&mut Vec<StoredBlock>)| {
            let mut s = stored(&blocks);
            f(&mut s);
            verify_stored(records_of(s), None, &cp).first_break
        };
        // A byte of the second block's first record (its value_count's last byte).
        let second = stored(&blocks)[1].first_seq;
        let edited = run(&|s| {
            let b = &mut s[1].bytes;
            let len = u32::from_be_bytes(b[..4].try_into().unwrap()) as usize;
            let record = Record::from_canonical(&b[4..4 + len]).unwrap();
            let mut changed = record.clone();
            changed.value_count += 1;
            let mut bytes = changed.canonical();
            assert_eq!(bytes.len(), len);
            b[4..4 + len].swap_with_slice(&mut bytes);
        });
        assert_eq!(edited, Some(Break::Altered { seq: second }));
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
        // A record removed from inside a block: the next one's link breaks.
        let removed = run(&|s| {
            let b = &mut s[1].bytes;
            let len = u32::from_be_bytes(b[..4].try_into().unwrap()) as usize;
            b.drain(..4 + len + 32);
            s[1].first_seq += 1;
        });
        assert_eq!(removed, Some(Break::Gap { expected: second, found: second + 1 }));
        // The tail's last block dropped: the checkpoint sees it.
        let last_first = stored(&blocks).last().unwrap().first_seq;
        assert_eq!(run(&|s| { s.pop(); }), Some(Break::Truncated { checkpoint_seq: 40, last_seq: last_first - 1 }));
        // Unchanged: no break.
        assert_eq!(run(&|_| {}), None);
    }

    #[test]
    fn any_bytes_parse_without_a_panic() {
        let (blocks, _) = build(5);
        let good = &blocks.blocks()[0].bytes;
        for cut in 0..good.len() {
            let r = read_block(GENESIS, &good[..cut]);
            assert!(r.unreadable_at.is_some() || cut == 0 || !r.records.is_empty());
        }
        let mut x = good.clone();
        x[0] = 0xff; // a length of ~4 GB
        assert_eq!(read_block(GENESIS, &x).unreadable_at, Some(0));
        // Larger than any block the writer makes: not decoded at all.
        let big: Vec<u8> = good.iter().copied().cycle().take(MAX_BLOCK_BYTES + 1).collect();
        let r = read_block(GENESIS, &big);
        assert!(r.records.is_empty() && r.unreadable_at == Some(0));
        let mut state = 0x1234_5678_u64;
        for _ in 0..2_000 {
            let n = (state % 300) as usize;
            let bytes: Vec<u8> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = read_block(GENESIS, &bytes);
        }
    }
}
