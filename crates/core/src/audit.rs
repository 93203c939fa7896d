//! The audit chain: canonical records, the hash chain over them, its verification, and signed
//! checkpoints of its head. No PostgreSQL here: the SQL layer feeds records in sequence order.
//!
//! * Each record has a gapless sequence number assigned by the one writer, and a hash
//!   `SHA-256("pg_envelope audit chain v1" || previous hash || canonical bytes)`; the first
//!   record's previous hash is 32 zero bytes. Editing, deleting, inserting or reordering a record
//!   breaks the chain at that record; [`verify`] names the first break.
//! * A truncated tail leaves a valid chain: it is caught by a **checkpoint**, the head
//!   `(sequence, hash)` MACed with a key the database does not hold in the clear (through the key
//!   provider) and written outside the table too (server log, KMS audit log). [`verify`] compares
//!   the chain with the newest checkpoint it is given.
//! * The canonical encoding is versioned and unambiguous: a version byte, integers as 8-byte
//!   big-endian, strings as a 4-byte big-endian length and their UTF-8 bytes, in a fixed order.
//!   Never plaintext, key bytes, parameters or query text: the fields are metadata.

use sha2::{Digest, Sha256};

const CHAIN_DOMAIN: &[u8] = b"pg_envelope audit chain v1";
const CHECKPOINT_DOMAIN: &[u8] = b"pg_envelope audit checkpoint v1";
const FORMAT: u8 = 1;

/// The hash before the first record.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// One audit record. Strings are metadata only (names, addresses, SQLSTATEs, ids).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub seq: i64,
    /// Microseconds since the Unix epoch (UTC).
    pub at_us: i64,
    /// `key_op`, `encrypt`, `decrypt`, `search`, `alert`, `audit_read`, `config`, `dropped`, and the
    /// writer's own `tamper`, `chain_restart` (record 1 of a new table) and `writer_start` (a start
    /// on a tail no checkpoint covered), ...
    pub kind: String,
    pub database: String,
    pub session_user: String,
    pub current_role: String,
    pub client_addr: String,
    pub application_name: String,
    pub backend_pid: i64,
    /// The backend's statement counter (with the pid: which statement).
    pub statement_id: i64,
    /// `envelope.request_id` as the application set it (an id, never a secret by contract).
    pub request_id: String,
    pub tenant: String,
    /// Data key versions involved, comma-separated ascending ("1,2").
    pub key_versions: String,
    /// The function or operation: `decrypt`, `encrypt`, `suspend_tenant`, ...
    pub operation: String,
    pub value_count: i64,
    pub failure_count: i64,
    /// `ok`, or the SQLSTATE of the failure.
    pub outcome: String,
    pub duration_us: i64,
    /// Non-secret detail (the reason of a suspension, an alert's rule).
    pub detail: String,
}

fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A [`Record`]'s fields borrowed: what a backend encodes for the queue without building an
/// owned record (a dozen `String`s allocated, copied and freed per statement were a third of
/// the audit's cost per statement). One encoder serves both: [`Record::canonical`] is this.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub seq: i64,
    pub at_us: i64,
    pub kind: &'a str,
    pub database: &'a str,
    pub session_user: &'a str,
    pub current_role: &'a str,
    pub client_addr: &'a str,
    pub application_name: &'a str,
    pub backend_pid: i64,
    pub statement_id: i64,
    pub request_id: &'a str,
    pub tenant: &'a str,
    pub key_versions: &'a str,
    pub operation: &'a str,
    pub value_count: i64,
    pub failure_count: i64,
    pub outcome: &'a str,
    pub duration_us: i64,
    pub detail: &'a str,
}

/// Tenant names are kept whole in records (up to the 255 bytes a name may have): cut to the
/// other fields' 64 bytes, two tenants sharing a prefix were one tenant in the trail, the hourly
/// counts and the alerts (insider review 27).
pub const MAX_TENANT: usize = 255;

/// `s` cut to at most `n` bytes at a character boundary.
pub fn cut_str(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = n;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[..i]
}

impl<'a> RecordRef<'a> {
    /// The fields cut as [`Record::truncate_fields`] cuts them.
    pub fn truncated(self, max: usize, max_detail: usize) -> Self {
        RecordRef {
            kind: cut_str(self.kind, max),
            database: cut_str(self.database, max),
            session_user: cut_str(self.session_user, max),
            current_role: cut_str(self.current_role, max),
            client_addr: cut_str(self.client_addr, max),
            application_name: cut_str(self.application_name, max),
            request_id: cut_str(self.request_id, max),
            tenant: cut_str(self.tenant, MAX_TENANT),
            key_versions: cut_str(self.key_versions, max),
            operation: cut_str(self.operation, max),
            outcome: cut_str(self.outcome, max),
            detail: cut_str(self.detail, max_detail),
            ..self
        }
    }

    /// Appends the canonical bytes (format 1) to `out`.
    pub fn canonical_into(&self, out: &mut Vec<u8>) {
        out.push(FORMAT);
        put_i64(out, self.seq);
        put_i64(out, self.at_us);
        for s in [self.kind, self.database, self.session_user, self.current_role, self.client_addr, self.application_name] {
            put_str(out, s);
        }
        put_i64(out, self.backend_pid);
        put_i64(out, self.statement_id);
        for s in [self.request_id, self.tenant, self.key_versions, self.operation] {
            put_str(out, s);
        }
        put_i64(out, self.value_count);
        put_i64(out, self.failure_count);
        put_str(out, self.outcome);
        put_i64(out, self.duration_us);
        put_str(out, self.detail);
    }

    /// An owned copy.
    pub fn to_record(&self) -> Record {
        Record {
            seq: self.seq,
            at_us: self.at_us,
            kind: self.kind.into(),
            database: self.database.into(),
            session_user: self.session_user.into(),
            current_role: self.current_role.into(),
            client_addr: self.client_addr.into(),
            application_name: self.application_name.into(),
            backend_pid: self.backend_pid,
            statement_id: self.statement_id,
            request_id: self.request_id.into(),
            tenant: self.tenant.into(),
            key_versions: self.key_versions.into(),
            operation: self.operation.into(),
            value_count: self.value_count,
            failure_count: self.failure_count,
            outcome: self.outcome.into(),
            duration_us: self.duration_us,
            detail: self.detail.into(),
        }
    }
}

impl Record {
    /// The fields borrowed.
    pub fn as_ref(&self) -> RecordRef<'_> {
        RecordRef {
            seq: self.seq,
            at_us: self.at_us,
            kind: &self.kind,
            database: &self.database,
            session_user: &self.session_user,
            current_role: &self.current_role,
            client_addr: &self.client_addr,
            application_name: &self.application_name,
            backend_pid: self.backend_pid,
            statement_id: self.statement_id,
            request_id: &self.request_id,
            tenant: &self.tenant,
            key_versions: &self.key_versions,
            operation: &self.operation,
            value_count: self.value_count,
            failure_count: self.failure_count,
            outcome: &self.outcome,
            duration_us: self.duration_us,
            detail: &self.detail,
        }
    }

    /// The canonical bytes the chain hashes (format 1).
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        self.as_ref().canonical_into(&mut out);
        out
    }

    /// Parses [`Record::canonical`] bytes (the shared-memory queue carries records in this
    /// form). `None` for anything else: never a panic, whatever the bytes.
    pub fn from_canonical(b: &[u8]) -> Option<Record> {
        let mut rec = Record::default();
        rec.read_canonical(b).then_some(rec)
    }

    /// [`Record::from_canonical`] into this record, reusing its strings' allocations (the audit
    /// writer parses thousands of records a second: a `String` per field was a sixth of its CPU,
    /// in `malloc` and `free`). False for a malformed record (the fields are then unspecified).
    pub fn read_canonical(&mut self, b: &[u8]) -> bool {
        struct R<'a>(&'a [u8]);
        impl R<'_> {
            fn i64(&mut self) -> Option<i64> {
                let (h, t) = self.0.split_at_checked(8)?;
                self.0 = t;
                Some(i64::from_be_bytes(h.try_into().ok()?))
            }
            fn s(&mut self, into: &mut String) -> Option<()> {
                let (h, t) = self.0.split_at_checked(4)?;
                let n = u32::from_be_bytes(h.try_into().ok()?) as usize;
                let (v, t) = t.split_at_checked(n)?;
                self.0 = t;
                into.clear();
                into.push_str(std::str::from_utf8(v).ok()?);
                Some(())
            }
        }
        let read = |r: &mut R<'_>, rec: &mut Record| -> Option<()> {
            rec.seq = r.i64()?;
            rec.at_us = r.i64()?;
            r.s(&mut rec.kind)?;
            r.s(&mut rec.database)?;
            r.s(&mut rec.session_user)?;
            r.s(&mut rec.current_role)?;
            r.s(&mut rec.client_addr)?;
            r.s(&mut rec.application_name)?;
            rec.backend_pid = r.i64()?;
            rec.statement_id = r.i64()?;
            r.s(&mut rec.request_id)?;
            r.s(&mut rec.tenant)?;
            r.s(&mut rec.key_versions)?;
            r.s(&mut rec.operation)?;
            rec.value_count = r.i64()?;
            rec.failure_count = r.i64()?;
            r.s(&mut rec.outcome)?;
            rec.duration_us = r.i64()?;
            r.s(&mut rec.detail)?;
            r.0.is_empty().then_some(())
        };
        match b.split_first() {
            Some((&FORMAT, rest)) => read(&mut R(rest), self).is_some(),
            _ => false,
        }
    }

    /// Shortens every string field to at most `max` bytes (at a character boundary), `detail` to
    /// `max_detail`: a record must fit a queue slot.
    pub fn truncate_fields(&mut self, max: usize, max_detail: usize) {
        fn cut(s: &mut String, n: usize) {
            let keep = cut_str(s, n).len();
            s.truncate(keep);
        }
        for f in [
            &mut self.kind,
            &mut self.database,
            &mut self.session_user,
            &mut self.current_role,
            &mut self.client_addr,
            &mut self.application_name,
            &mut self.request_id,
            &mut self.key_versions,
            &mut self.operation,
            &mut self.outcome,
        ] {
            cut(f, max);
        }
        cut(&mut self.detail, max_detail);
        cut(&mut self.tenant, MAX_TENANT);
    }

    /// This record's hash after `prev`.
    pub fn hash(&self, prev: &[u8; 32]) -> [u8; 32] {
        self.hash_with(prev, &mut Vec::with_capacity(256))
    }

    /// [`Record::hash`] with the canonical bytes encoded into `scratch` (cleared first): the
    /// writer hashes thousands of records a second without an allocation each.
    pub fn hash_with(&self, prev: &[u8; 32], scratch: &mut Vec<u8>) -> [u8; 32] {
        scratch.clear();
        self.as_ref().canonical_into(scratch);
        chain_hash(prev, scratch)
    }
}

/// The chain's hash of a record's canonical bytes after `prev`.
pub fn chain_hash(prev: &[u8; 32], canonical: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(CHAIN_DOMAIN);
    h.update(prev);
    h.update(canonical);
    h.finalize().into()
}

/// A stored record: the record, and the previous hash and hash the writer stored with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub record: Record,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// The head of the chain (last sequence number and its hash), as a checkpoint certifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub seq: i64,
    pub hash: [u8; 32],
}

/// The message a checkpoint's MAC (or signature) covers.
pub fn checkpoint_message(head: &Head, at_us: i64) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 48);
    m.extend_from_slice(CHECKPOINT_DOMAIN);
    m.extend_from_slice(&head.seq.to_be_bytes());
    m.extend_from_slice(&head.hash);
    m.extend_from_slice(&at_us.to_be_bytes());
    m
}

/// Why the chain does not verify, at the first record where it breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Break {
    /// A sequence number is missing (a record was deleted) or out of place.
    Gap { expected: i64, found: i64 },
    /// The same sequence number twice (a record was inserted).
    Duplicate { seq: i64 },
    /// The record's stored previous hash is not the previous record's hash (reordered, or a
    /// record before it was replaced along with its hash).
    Link { seq: i64 },
    /// The record's content does not give its stored hash (edited).
    Altered { seq: i64 },
    /// The chain ends before (or differs from) a checkpoint's head: its tail was truncated or
    /// rewritten.
    Truncated { checkpoint_seq: i64, last_seq: i64 },
    /// The chain has the checkpoint's sequence number with another hash.
    CheckpointMismatch { seq: i64 },
    /// A stored block's bytes after record `after_seq` (0: at its start) are not records.
    Unreadable { after_seq: i64 },
    /// A stored block's labels (first and last sequence numbers, times) are not those of the
    /// records it holds.
    Mislabelled { first_seq: i64 },
    /// The kept records start after a checkpoint, but no `audit_prune` record names that
    /// checkpoint as where the kept chain starts: the records before were deleted by hand.
    Unpruned { first_seq: i64 },
    /// Record `seq` is the writer's own `tamper` record: it found the chain's head changed by
    /// someone else (rows added or removed at the tail), and continued from what it found. The
    /// chain from there on may hash correctly; what was there before is gone (insider review 53).
    TamperRecorded { seq: i64 },
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Break::Gap { expected, found } => write!(f, "record {expected} is missing (the next record is {found}): deleted"),
            Break::Duplicate { seq } => write!(f, "record {seq} appears twice: inserted"),
            Break::Link { seq } => write!(f, "record {seq} does not follow the record before it: reordered or replaced"),
            Break::Altered { seq } => write!(f, "record {seq} does not match its hash: altered"),
            Break::Truncated { checkpoint_seq, last_seq } => {
                write!(f, "the chain ends at record {last_seq}, before the checkpoint at record {checkpoint_seq}: truncated")
            }
            Break::CheckpointMismatch { seq } => write!(f, "record {seq} does not have the hash its checkpoint certified: rewritten"),
            Break::Unreadable { after_seq } => write!(f, "the stored block after record {after_seq} holds bytes that are not records: altered"),
            Break::Unpruned { first_seq } => {
                write!(f, "the records before record {first_seq} are gone and no audit_prune record covered by a checkpoint says so: deleted (or a prune whose checkpoint is not written yet, or was not before a restart: prune again)")
            }
            Break::TamperRecorded { seq } => {
                write!(f, "record {seq} is the writer's tamper record: the chain's head was changed outside the writer (records added or removed at its tail)")
            }
            Break::Mislabelled { first_seq } => {
                write!(f, "the stored block of records from {first_seq} is labelled with other sequence numbers or times: altered")
            }
        }
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Records checked (up to the first break).
    pub records: u64,
    /// The last good record.
    pub head: Option<Head>,
    pub first_break: Option<Break>,
}

/// Walks `records` (in the order stored, expected ascending by sequence) starting after
/// `start` (`None`: from sequence 1 and [`GENESIS`]; after a retention, the checkpoint the pruned
/// range ended at), checking sequence, link and hash of each. Every checkpoint in `checkpoints`
/// must match the record at its sequence; the chain must reach the newest one (whose MAC the
/// caller verified), or its tail was truncated.
pub fn verify(records: impl IntoIterator<Item = Stored>, start: Option<Head>, checkpoints: &[Head]) -> Verified {
    verify_stored(records.into_iter().map(Ok), start, checkpoints)
}

/// [`verify`] over what the storage gave back: a record, or a break found in the storage
/// itself (a block that does not parse, or whose labels do not match its records), reported
/// where it is met unless the chain broke before it.
pub fn verify_stored(records: impl IntoIterator<Item = Result<Stored, Break>>, start: Option<Head>, checkpoints: &[Head]) -> Verified {
    // `None`: nothing can follow (the sequence reached i64::MAX; only a forged row gets there).
    let (mut expected, mut prev) = match start {
        Some(h) => (h.seq.checked_add(1), h.hash),
        None => (Some(1), GENESIS),
    };
    let by_seq: std::collections::BTreeMap<i64, Vec<[u8; 32]>> = checkpoints.iter().fold(Default::default(), |mut m, c| {
        m.entry(c.seq).or_insert_with(Vec::new).push(c.hash);
        m
    });
    let newest = checkpoints.iter().map(|c| c.seq).max();
    let mut head = start;
    let mut n = 0u64;
    let mut brk = None;
    for s in records {
        let s = match s {
            Ok(s) => s,
            Err(b) => {
                brk = Some(b);
                break;
            }
        };
        let seq = s.record.seq;
        if Some(seq) != expected {
            brk = Some(if head.is_some_and(|h| h.seq == seq) {
                Break::Duplicate { seq }
            } else {
                Break::Gap { expected: expected.unwrap_or(i64::MAX), found: seq }
            });
            break;
        }
        if s.prev_hash != prev {
            brk = Some(Break::Link { seq });
            break;
        }
        if s.record.hash(&prev) != s.hash {
            brk = Some(Break::Altered { seq });
            break;
        }
        if by_seq.get(&seq).is_some_and(|hs| hs.iter().any(|h| *h != s.hash)) {
            brk = Some(Break::CheckpointMismatch { seq });
            break;
        }
        prev = s.hash;
        head = Some(Head { seq, hash: s.hash });
        expected = seq.checked_add(1);
        n += 1;
    }
    if brk.is_none() {
        if let Some(c) = newest {
            let last = head.map_or(0, |h| h.seq);
            if last < c {
                brk = Some(Break::Truncated { checkpoint_seq: c, last_seq: last });
            }
        }
    }
    Verified { records: n, head, first_break: brk }
}

/// Appends records to a chain: the one writer's state.
#[derive(Debug, Clone)]
pub struct Chain {
    head: Head,
    scratch: Vec<u8>,
}

impl Chain {
    /// A chain continuing after `head` (`None`: empty).
    pub fn after(head: Option<Head>) -> Self {
        Chain { head: head.unwrap_or(Head { seq: 0, hash: GENESIS }), scratch: Vec::with_capacity(1024) }
    }

    pub fn head(&self) -> Head {
        self.head
    }

    /// [`Chain::append`] that also writes the record as a block entry at the end of `out` (see
    /// [`crate::audit_blocks`]): the canonical bytes are encoded once, into the block, and hashed
    /// there.
    pub fn append_entry(&mut self, mut record: Record, out: &mut Vec<u8>) -> Stored {
        record.seq = self.head.seq + 1;
        let prev = self.head.hash;
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        record.as_ref().canonical_into(out);
        let len = u32::try_from(out.len() - at - 4).expect("an audit record is far below 4 GB");
        out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        let hash = chain_hash(&prev, &out[at + 4..]);
        out.extend_from_slice(&hash);
        self.head = Head { seq: record.seq, hash };
        Stored { record, prev_hash: prev, hash }
    }

    /// Assigns the next sequence number to `record` and returns it stored.
    pub fn append(&mut self, mut record: Record) -> Stored {
        let prev = self.head.hash;
        let hash = self.append_in_place(&mut record);
        Stored { record, prev_hash: prev, hash }
    }

    /// [`Chain::append`] without moving the record (the writer chains a batch of records where
    /// they were parsed: moving each ~400-byte `Record` into and out of a `Stored` was a fifth
    /// of its CPU): assigns the next sequence number and returns the record's hash (the previous
    /// hash is the head before the call).
    pub fn append_in_place(&mut self, record: &mut Record) -> [u8; 32] {
        record.seq = self.head.seq + 1;
        let hash = record.hash_with(&self.head.hash, &mut self.scratch);
        self.head = Head { seq: record.seq, hash };
        hash
    }
}

/// The `audit_prune` record's detail: the anchor first (details are cut at 200 bytes, and
/// verifiers look for it), then the range removed and the newest removed record's time, then
/// the retention asked for only if all of it fits (insider review 64: cut, `older than
/// 00:00:30` read as `older than 00:00`).
pub fn prune_detail(seq: i64, cp_hash: &str, first: i64, newest: &str, older_than: &str) -> String {
    let mut d = format!("the kept chain starts after checkpoint {seq} (hash {cp_hash}); removed {first}..{seq}, newest {newest}");
    let retention = format!("; older than {older_than}");
    if d.len() + retention.len() <= 200 {
        d.push_str(&retention);
    }
    d
}

/// The `local` provider's checkpoint key: HKDF-SHA-256 of the root key with a fixed label.
/// **Development only**, like the provider: whoever holds the root key file can forge
/// checkpoints. Real providers MAC inside the KMS.
pub fn local_checkpoint_mac(root: &crate::SecretKey, message: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let hk = hkdf::Hkdf::<Sha256>::new(Some(b"pg_envelope/v1/audit-checkpoint"), root.expose());
    let mut k = zeroize::Zeroizing::new([0u8; 32]);
    hk.expand(b"hmac-sha256", &mut k[..]).expect("32 bytes is a valid HKDF output length");
    let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&k[..]).expect("any key length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Whether two byte strings of the same length are equal, without a call to `memcmp` for the
/// short strings tenant names usually are (the per-value fast path of the pgrx crate compares
/// the statement's tenant with the armed one for every value: `memcmp` was ~30 instructions of
/// the ~95 auditing added per value). Overlapping word reads inside both slices; longer than 16
/// bytes falls back to `==`. Panics if the lengths differ.
#[inline]
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    assert_eq!(a.len(), b.len());
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // SAFETY: every read below lies within both slices (n >= 8: [0, 8) and [n-8, n); n >= 4:
    // [0, 4) and [n-4, n)); read_unaligned has no alignment requirement.
    unsafe {
        if n > 16 {
            a == b
        } else if n >= 8 {
            let x = (pa as *const u64).read_unaligned() ^ (pb as *const u64).read_unaligned();
            let y = (pa.add(n - 8) as *const u64).read_unaligned() ^ (pb.add(n - 8) as *const u64).read_unaligned();
            x | y == 0
        } else if n >= 4 {
            let x = (pa as *const u32).read_unaligned() ^ (pb as *const u32).read_unaligned();
            let y = (pa.add(n - 4) as *const u32).read_unaligned() ^ (pb.add(n - 4) as *const u32).read_unaligned();
            x | y == 0
        } else {
            // 0..=3 bytes: positions 0, n/2 and n-1 cover all of them.
            n == 0 || (a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1])
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_prune_detail_keeps_the_anchor_whole_and_the_retention_whole_or_not_at_all() {
        let hash = "ab".repeat(32);
        let short = super::prune_detail(931, &hash, 919, "2026-12-06T11:35:44.202872+00:00", "00:00:30");
        assert!(short.starts_with(&format!("the kept chain starts after checkpoint 931 (hash {hash}); removed 919..931, newest 2026-12-06T11:35:44.202872+00:00")));
        assert!(short.ends_with("; older than 00:00:30"), "{short}");
        assert!(short.len() <= 200);
        // Large sequence numbers: no room for the retention, which is left out, not cut.
        let long = super::prune_detail(315_050_123, &hash, 1, "2026-12-06T11:35:44.202872+00:00", "1 year 2 mons 3 days 04:05:06");
        assert!(long.contains("the kept chain starts after checkpoint 315050123 (hash"), "{long}");
        assert!(!long.contains("older than"), "{long}");
        assert!(long.len() <= 200, "{}", long.len());
    }

    #[test]
    fn same_bytes_is_equality_for_every_length_and_every_differing_byte() {
        for n in 0..40usize {
            let a: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
            assert!(super::same_bytes(&a, &a.clone()), "equal, length {n}");
            for i in 0..n {
                for bit in [0x01u8, 0x80] {
                    let mut b = a.clone();
                    b[i] ^= bit;
                    assert!(!super::same_bytes(&a, &b), "length {n}, byte {i} differs");
                }
            }
        }
    }

    use super::*;

    fn rec(i: i64) -> Record {
        Record {
            at_us: 1_700_000_000_000_000 + i,
            kind: "decrypt".into(),
            database: "app".into(),
            session_user: "app".into(),
            current_role: "app".into(),
            client_addr: "127.0.0.1".into(),
            application_name: "psql".into(),
            backend_pid: 4242,
            statement_id: i,
            request_id: format!("req-{i}"),
            tenant: "acme".into(),
            key_versions: "1".into(),
            operation: "decrypt".into(),
            value_count: 10_000,
            failure_count: 0,
            outcome: "ok".into(),
            duration_us: 1234,
            detail: String::new(),
            ..Record::default()
        }
    }

    #[test]
    fn a_borrowed_record_encodes_and_cuts_exactly_as_the_owned_one() {
        // Long and multi-byte fields (cuts landing inside a character), empty ones, every field
        // different so a swapped field would show.
        let long = "é".repeat(80) + "x";
        for (i, f) in ["", "a", "ab€", long.as_str()].into_iter().enumerate() {
            let mut r = rec(i as i64);
            r.seq = 7 + i as i64;
            r.kind = format!("k{f}");
            r.database = format!("d{f}");
            r.session_user = format!("s{f}");
            r.current_role = format!("r{f}");
            r.client_addr = format!("c{f}");
            r.application_name = format!("a{f}");
            r.request_id = format!("q{f}");
            r.tenant = format!("t{f}");
            r.key_versions = format!("v{f}");
            r.operation = format!("o{f}");
            r.outcome = format!("u{f}");
            r.detail = format!("x{f}{f}{f}");
            let mut owned = r.clone();
            owned.truncate_fields(64, 200);
            let borrowed = r.as_ref().truncated(64, 200);
            let mut out = Vec::new();
            borrowed.canonical_into(&mut out);
            assert_eq!(out, owned.canonical(), "field set {i}");
            assert_eq!(borrowed.to_record(), owned);
            assert_eq!(Record::from_canonical(&out).as_ref(), Some(&owned));
        }
    }

    fn chain(n: i64) -> Vec<Stored> {
        let mut c = Chain::after(None);
        (1..=n).map(|i| c.append(rec(i))).collect()
    }

    #[test]
    fn an_intact_chain_verifies_to_its_head() {
        let rows = chain(50);
        let v = verify(rows.clone(), None, &[]);
        assert_eq!(v.first_break, None);
        assert_eq!(v.records, 50);
        assert_eq!(v.head, Some(Head { seq: 50, hash: rows[49].hash }));
        // Verifying a suffix from a trusted head gives the same head.
        let v2 = verify(rows[20..].to_vec(), Some(Head { seq: 20, hash: rows[19].hash }), &[]);
        assert_eq!((v2.first_break, v2.head), (None, v.head));
    }

    #[test]
    fn every_tampering_is_found_at_its_record() {
        let rows = chain(10);
        // Edited content (hash kept).
        let mut t = rows.clone();
        t[4].record.value_count = 1;
        assert_eq!(verify(t, None, &[]).first_break, Some(Break::Altered { seq: 5 }));
        // Edited content with a recomputed hash: the next record's link breaks.
        let mut t = rows.clone();
        t[4].record.tenant = "globex".into();
        t[4].hash = t[4].record.hash(&t[4].prev_hash);
        assert_eq!(verify(t, None, &[]).first_break, Some(Break::Link { seq: 6 }));
        // Deleted.
        let mut t = rows.clone();
        t.remove(3);
        assert_eq!(verify(t, None, &[]).first_break, Some(Break::Gap { expected: 4, found: 5 }));
        // Inserted (a copy of a record).
        let mut t = rows.clone();
        t.insert(3, rows[2].clone());
        assert_eq!(verify(t, None, &[]).first_break, Some(Break::Duplicate { seq: 3 }));
        // Reordered (two records swapped, sequence numbers renumbered to look gapless).
        let mut t = rows.clone();
        t.swap(5, 6);
        t[5].record.seq = 6;
        t[6].record.seq = 7;
        assert_eq!(verify(t, None, &[]).first_break, Some(Break::Link { seq: 6 }));
        // Truncated tail: a valid chain, caught by the checkpoint.
        let checkpoint = Some(Head { seq: 10, hash: rows[9].hash });
        assert_eq!(verify(rows[..7].to_vec(), None, checkpoint.as_slice()).first_break, Some(Break::Truncated { checkpoint_seq: 10, last_seq: 7 }));
        // A tail rewritten from record 9 on (a forged record 9 and 10 with valid hashes).
        let mut c = Chain::after(Some(Head { seq: 8, hash: rows[7].hash }));
        let mut t = rows[..8].to_vec();
        let mut forged = rec(9);
        forged.value_count = 1;
        t.push(c.append(forged));
        t.push(c.append(rec(10)));
        assert_eq!(verify(t.clone(), None, &[]).first_break, None, "a rewritten tail is a valid chain");
        assert_eq!(verify(t, None, checkpoint.as_slice()).first_break, Some(Break::CheckpointMismatch { seq: 10 }));
        // An intact chain passes its checkpoint.
        assert_eq!(verify(rows.clone(), None, checkpoint.as_slice()).first_break, None);
        // An older checkpoint the rewritten tail no longer matches (the newest checkpoint row
        // deleted with it): caught at that checkpoint.
        let older = [Head { seq: 10, hash: rows[9].hash }, Head { seq: 5, hash: rows[4].hash }];
        let mut c = Chain::after(Some(Head { seq: 4, hash: rows[3].hash }));
        let mut t = rows[..4].to_vec();
        let mut forged = rec(5);
        forged.value_count = 99;
        t.push(c.append(forged));
        assert_eq!(verify(t, None, &older[1..]).first_break, Some(Break::CheckpointMismatch { seq: 5 }));
        // After a retention: the kept records start after the checkpoint the pruned range ended at.
        let anchor = Head { seq: 5, hash: rows[4].hash };
        assert_eq!(verify(rows[5..].to_vec(), Some(anchor), &older).first_break, None);
        assert_eq!(verify(rows[6..].to_vec(), Some(anchor), &older).first_break, Some(Break::Gap { expected: 6, found: 7 }));
    }

    #[test]
    fn the_encoding_is_unambiguous_and_covers_every_field() {
        let a = rec(1);
        let base = a.hash(&GENESIS);
        // Moving a character between adjacent string fields changes the hash.
        let mut b = a.clone();
        b.database = "ap".into();
        b.session_user = "papp".into();
        assert_ne!(b.hash(&GENESIS), base);
        // Every field counts.
        let edits: Vec<Box<dyn Fn(&mut Record)>> = vec![
            Box::new(|r| r.seq += 1),
            Box::new(|r| r.at_us += 1),
            Box::new(|r| r.kind.push('x')),
            Box::new(|r| r.current_role.push('x')),
            Box::new(|r| r.client_addr.push('x')),
            Box::new(|r| r.application_name.push('x')),
            Box::new(|r| r.backend_pid += 1),
            Box::new(|r| r.statement_id += 1),
            Box::new(|r| r.request_id.push('x')),
            Box::new(|r| r.tenant.push('x')),
            Box::new(|r| r.key_versions.push('x')),
            Box::new(|r| r.operation.push('x')),
            Box::new(|r| r.value_count += 1),
            Box::new(|r| r.failure_count += 1),
            Box::new(|r| r.outcome.push('x')),
            Box::new(|r| r.duration_us += 1),
            Box::new(|r| r.detail.push('x')),
        ];
        for (i, e) in edits.iter().enumerate() {
            let mut r = a.clone();
            e(&mut r);
            assert_ne!(r.hash(&GENESIS), base, "field edit {i} not covered");
        }
        // And the previous hash counts.
        assert_ne!(a.hash(&[1u8; 32]), base);
    }

    #[test]
    fn canonical_bytes_parse_back_and_garbage_does_not() {
        let mut r = rec(3);
        r.detail = "ünïcode détail".into();
        assert_eq!(Record::from_canonical(&r.canonical()), Some(r.clone()));
        // Into a record that held another one (the writer reuses them): the same record.
        let mut used = Record { kind: "a much longer kind than any".into(), detail: "x".repeat(300), seq: 9, ..Record::default() };
        assert!(used.read_canonical(&r.canonical()));
        assert_eq!(used, r);
        assert!(!used.read_canonical(&r.canonical()[..10]));
        let b = r.canonical();
        for n in 0..b.len() {
            assert_eq!(Record::from_canonical(&b[..n]), None, "truncated at {n}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert_eq!(Record::from_canonical(&longer), None);
        let mut v2 = b.clone();
        v2[0] = 2;
        assert_eq!(Record::from_canonical(&v2), None);
        // A huge length prefix is refused, not allocated.
        let mut huge = vec![1u8];
        huge.extend_from_slice(&[0u8; 16]);
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(Record::from_canonical(&huge), None);
        // A tenant name is kept whole up to 255 bytes (two tenants sharing a 64-byte prefix
        // stay two tenants), cut past that.
        let mut t = r.clone();
        t.tenant = "q".repeat(64) + "-victim";
        t.truncate_fields(64, 200);
        assert_eq!(t.tenant, "q".repeat(64) + "-victim");
        assert_eq!(t.as_ref().truncated(64, 200).tenant, t.tenant);
        t.tenant = "q".repeat(300);
        t.truncate_fields(64, 200);
        assert_eq!(t.tenant.len(), 255);
        // Truncation keeps characters whole.
        let mut t = r.clone();
        t.detail = "ééééé".into();
        t.truncate_fields(64, 3);
        assert_eq!(t.detail, "é");
    }

    #[test]
    fn golden_hash_pins_the_format() {
        // A change to the canonical encoding or the domain string breaks every stored chain:
        // this value must never change (add a format 2 instead). It was computed independently
        // of this code, in Python (struct.pack(">q"/">I") per field, hashlib.sha256), from the
        // description in the module documentation.
        let h = rec(1).hash(&GENESIS);
        let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, GOLDEN_RECORD_1_HASH);
    }

    const GOLDEN_RECORD_1_HASH: &str = "b49bb428db015329d298f985c8c737fe006c4ab190973818bb04ca2f2dbe7aac";

    #[test]
    fn local_checkpoint_mac_depends_on_root_head_and_time() {
        let root = crate::SecretKey::from_slice(&[7u8; 32]).unwrap();
        let other = crate::SecretKey::from_slice(&[8u8; 32]).unwrap();
        let head = Head { seq: 10, hash: [3u8; 32] };
        let m = checkpoint_message(&head, 99);
        let mac = local_checkpoint_mac(&root, &m);
        assert_eq!(mac, local_checkpoint_mac(&root, &m));
        assert_ne!(mac, local_checkpoint_mac(&other, &m));
        assert_ne!(mac, local_checkpoint_mac(&root, &checkpoint_message(&Head { seq: 11, ..head }, 99)));
        assert_ne!(mac, local_checkpoint_mac(&root, &checkpoint_message(&head, 100)));
        // The MAC key is derived, not the root key itself.
        use hmac::{Hmac, Mac};
        let mut direct = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&[7u8; 32]).unwrap();
        direct.update(&m);
        assert_ne!(mac, <[u8; 32]>::from(direct.finalize().into_bytes()));
    }
}
