//! A bounded ring of byte records with many writers and one reader, over memory the caller
//! provides: PostgreSQL shared memory in the extension (the audit queue, where every backend
//! pushes and the audit writer alone reads), a `Vec` in the tests.
//!
//! No lock: a writer reserves the slot at the write position with one compare-and-swap, copies
//! its record in and publishes it by storing the slot's sequence number (release); the reader
//! takes published slots in order and stops at the first one that is reserved but not yet
//! published (acquire). A slot is handed back to the writers by storing the sequence number of
//! its next lap. This is Dmitry Vyukov's bounded MPMC queue with a single consumer. What it
//! buys over a lock around the copy: a writer preempted in the middle of its copy holds up no
//! other writer (only the reader, for that one slot), where a preempted lock holder made every
//! pushing backend of a busy server wait for it.
//!
//! **Layout.** Each slot's sequence number and push time ([`Meta`], 16 bytes) live in an array of
//! their own, apart from the records' bytes ([`Slot`]): a push first reads its slot's sequence
//! number, and with it at the head of a 1.2 KB slot that read was a miss to memory on every push
//! (the slot was last touched by the reader a lap, 8,192 records, earlier: 83% of the push's
//! time in an 8-client OLTP profile), as was the health check's read of the oldest slot's time.
//! Packed four to a cache line (128 KB for 8,192 slots), they stay in the caches the pushing
//! backends and the reader share. The records' bytes are only written by a push (no load waits
//! for them) and read once by the reader.
//!
//! Between the reservation and the publication a writer only copies bytes and stores two
//! integers: nothing there can fail or unwind, so a reserved slot is always published (a
//! process killed in between takes the server down with it: PostgreSQL reinitialises shared
//! memory after a backend crash).
//!
//! **Claims.** A writer may need to know that its record will find room *before* it does the
//! work the record describes (the audit: a statement may decrypt only if its record is sure to
//! be queued later). [`Ring::claim`] promises slots; every push must be covered by a claim
//! (made just before, or long before). The count of claims (`claimed`: records queued plus
//! slots promised and not pushed yet) never exceeds the capacity, so a claimed push always
//! finds its slot free: a push turns one promise into one queued record (the count does not
//! change), and only [`Ring::consume`] lowers it, after it handed the slots back.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A slot's place in the ring's laps and its record's time, kept apart from the record (see
/// "Layout" above). All zeros is valid (as shared memory is created); [`init`] then numbers them.
#[repr(C, align(16))]
pub struct Meta {
    /// `pos` when free for the write position `pos`; `pos + 1` once the record written at
    /// `pos` is published; `pos + capacity` again once the reader consumed it.
    seq: AtomicU64,
    /// When the record was pushed (the caller's clock), for the reader's age checks.
    pushed_at: AtomicI64,
}

/// One slot's record: up to `N` bytes. All zeros is valid.
#[repr(C, align(8))]
pub struct Slot<const N: usize> {
    len: UnsafeCell<u32>,
    data: UnsafeCell<[u8; N]>,
}

// SAFETY: `len` and `data` are written only by the writer that reserved the slot and read only
// by the reader after the publication (release/acquire on the slot's `Meta::seq`).
unsafe impl<const N: usize> Sync for Slot<N> {}

/// The two positions and the claims, kept by the caller (in the extension: fields of the
/// queue's header in shared memory). The positions only ever grow.
pub struct Positions<'a> {
    pub write: &'a AtomicU64,
    pub read: &'a AtomicU64,
    /// Records queued plus slots claimed and not pushed yet (see [`Ring::claim`]).
    pub claimed: &'a AtomicU64,
}

/// Why a push did not store its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// Every slot holds a record the reader has not consumed yet.
    Full,
    /// The record is longer than a slot.
    TooLong,
}

/// The number of slots a ring gets when `setting` are asked for and up to `writers` processes
/// may claim: at least 4 per writer (a caller that lets each writer hold up to half the ring
/// over `writers`, but never fewer than 2, then keeps all of them together below half the
/// ring), rounded down to a multiple of 4 (the headers then fill whole cache lines).
pub fn capacity_for(setting: usize, writers: usize) -> usize {
    setting.max(4 * writers.max(1)) / 4 * 4
}

/// Numbers the slots of a ring that starts at position 0 (after the region was zeroed).
pub fn init(meta: &[Meta]) {
    for (i, m) in meta.iter().enumerate() {
        m.seq.store(i as u64, Ordering::Relaxed);
        m.pushed_at.store(0, Ordering::Relaxed);
    }
}

/// The ring: positions, and the slots' headers and records (the capacity is the number of
/// slots).
pub struct Ring<'a, const N: usize> {
    pos: Positions<'a>,
    meta: &'a [Meta],
    slots: &'a [Slot<N>],
}

impl<'a, const N: usize> Ring<'a, N> {
    pub fn new(pos: Positions<'a>, meta: &'a [Meta], slots: &'a [Slot<N>]) -> Self {
        assert!(!slots.is_empty(), "a ring needs slots");
        assert_eq!(meta.len(), slots.len(), "one header per slot");
        Ring { pos, meta, slots }
    }

    fn slot(&self, pos: u64) -> (&Meta, &Slot<N>) {
        let i = (pos % self.slots.len() as u64) as usize;
        (&self.meta[i], &self.slots[i])
    }

    /// Promises `n` slots to the caller, who pushes that many records later (each push uses
    /// one claim). False, and nothing claimed, when that would promise more slots than the
    /// ring has free: records queued plus claims outstanding never exceed the capacity.
    pub fn claim(&self, n: u64) -> bool {
        let cap = self.slots.len() as u64;
        // Acquire: a claim made possible by `consume` sees the slots it handed back.
        self.pos.claimed.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| (c + n <= cap).then_some(c + n)).is_ok()
    }

    /// Gives back `n` claims that will not be pushed.
    pub fn unclaim(&self, n: u64) {
        let _ = self.pos.claimed.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |c| Some(c.saturating_sub(n)));
    }

    /// Records queued plus claims outstanding (the capacity: nothing more can be claimed).
    pub fn claimed(&self) -> u64 {
        self.pos.claimed.load(Ordering::Acquire)
    }

    /// Stores `bytes` (any writer, any thread or process). The caller holds a claim for it
    /// ([`Ring::claim`]), which the push uses up; without one, `Full` may come back. Returns how
    /// many records were queued after this one went in (an upper bound: the reader may have
    /// consumed some).
    pub fn push(&self, bytes: &[u8], now: i64) -> Result<u64, PushError> {
        if bytes.len() > N {
            return Err(PushError::TooLong);
        }
        let mut pos = self.pos.write.load(Ordering::Relaxed);
        loop {
            let (meta, slot) = self.slot(pos);
            let seq = meta.seq.load(Ordering::Acquire);
            let lap = seq.wrapping_sub(pos) as i64;
            if lap == 0 {
                // Free for this position: reserve it.
                match self.pos.write.compare_exchange_weak(pos, pos + 1, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => {
                        // SAFETY: this writer owns the slot until it stores `seq` below: no
                        // other writer reserves `pos` again, and the reader waits for `pos + 1`.
                        unsafe {
                            (&mut *slot.data.get())[..bytes.len()].copy_from_slice(bytes);
                            *slot.len.get() = bytes.len() as u32;
                        }
                        meta.pushed_at.store(now, Ordering::Relaxed);
                        meta.seq.store(pos + 1, Ordering::Release);
                        let read = self.pos.read.load(Ordering::Relaxed);
                        return Ok((pos + 1).saturating_sub(read));
                    }
                    Err(now_at) => pos = now_at,
                }
            } else if lap < 0 {
                // The slot still holds the record of the previous lap: the ring is full.
                return Err(PushError::Full);
            } else {
                // Another writer reserved this position first.
                pos = self.pos.write.load(Ordering::Relaxed);
            }
        }
    }

    /// Records reserved or published and not consumed yet. `read` is loaded before `write`, so
    /// the count can only be over-estimated (a ring that looks full may just have been drained).
    pub fn queued(&self) -> u64 {
        let r = self.pos.read.load(Ordering::Acquire);
        let w = self.pos.write.load(Ordering::Acquire);
        w.saturating_sub(r)
    }

    /// How many records the reader consumed since the ring was made.
    pub fn read_position(&self) -> u64 {
        self.pos.read.load(Ordering::Acquire)
    }

    /// When the oldest record not yet consumed was pushed (`None`: nothing queued, or the
    /// oldest slot is reserved but not published yet: its writer is copying it right now, and
    /// its time field still holds the previous lap's, 0 on the first lap; reading that made a
    /// health check see a writer hours late: review 42).
    pub fn oldest_pushed_at(&self) -> Option<i64> {
        let r = self.pos.read.load(Ordering::Acquire);
        let w = self.pos.write.load(Ordering::Acquire);
        if w <= r {
            return None;
        }
        let (meta, _) = self.slot(r);
        (meta.seq.load(Ordering::Acquire) == r + 1).then(|| meta.pushed_at.load(Ordering::Relaxed))
    }

    /// The reader: calls `f` with each published record from the read position on, in order, up
    /// to `max` of them, stopping at the first slot not published yet. Returns the position
    /// after the last record given to `f`. Nothing is consumed: see [`Ring::consume`].
    ///
    /// # Safety
    /// Only one reader may call `peek` and `consume` (the audit writer process).
    pub unsafe fn peek(&self, max: usize, mut f: impl FnMut(&[u8])) -> u64 {
        let read = self.pos.read.load(Ordering::Acquire);
        let mut pos = read;
        while pos - read < max as u64 {
            let (meta, slot) = self.slot(pos);
            if meta.seq.load(Ordering::Acquire) != pos + 1 {
                break;
            }
            // SAFETY: published (acquire above pairs with the writer's release) and not handed
            // back yet: no writer touches it until `consume` moves past it.
            let data = unsafe { &(&*slot.data.get())[..(*slot.len.get() as usize).min(N)] };
            f(data);
            pos += 1;
        }
        pos
    }

    /// The reader: hands the slots before `upto` back to the writers. `upto` must not pass a
    /// position [`Ring::peek`] returned.
    ///
    /// # Safety
    /// Only one reader may call `peek` and `consume`.
    pub unsafe fn consume(&self, upto: u64) {
        let read = self.pos.read.load(Ordering::Relaxed);
        let cap = self.slots.len() as u64;
        for pos in read..upto {
            let (meta, _) = self.slot(pos);
            debug_assert_eq!(meta.seq.load(Ordering::Relaxed), pos + 1, "consumed a slot that was not published");
            meta.seq.store(pos + cap, Ordering::Release);
        }
        if upto > read {
            self.pos.read.store(upto, Ordering::Release);
            // After the slots are handed back (release: a claim that reads the lower count sees
            // them free). Saturating: a push without a claim must not wrap the count into "full
            // for ever".
            self.unclaim(upto - read);
        }
    }
}

/// A ring's headers and slots on the heap, numbered for position 0 (tests and benchmarks; the
/// extension places them in shared memory).
pub fn heap_slots<const N: usize>(count: usize) -> (Vec<Meta>, Vec<Slot<N>>) {
    let meta: Vec<Meta> = (0..count).map(|_| Meta { seq: AtomicU64::new(0), pushed_at: AtomicI64::new(0) }).collect();
    let slots: Vec<Slot<N>> = (0..count).map(|_| Slot { len: UnsafeCell::new(0), data: UnsafeCell::new([0; N]) }).collect();
    init(&meta);
    (meta, slots)
}

#[cfg(test)]
mod tests {
    #[test]
    fn capacity_leaves_half_the_ring_to_records_whatever_the_writers() {
        for (setting, writers) in [(1024, 1), (1024, 256), (1024, 257), (1024, 600), (16384, 222), (1027, 10), (4096, 5000)] {
            let n = super::capacity_for(setting, writers);
            assert_eq!(n % 4, 0, "{setting} {writers}");
            assert!(n >= setting / 4 * 4, "never below the setting (rounded): {setting} {writers} {n}");
            // Each writer may hold max(2, n / 2 / writers) claims: together at most half.
            let share = (n / 2 / writers).max(2);
            assert!(share * writers <= n / 2, "{setting} {writers} {n}");
        }
        assert_eq!(super::capacity_for(1027, 10), 1024);
        assert_eq!(super::capacity_for(1024, 600), 2400);
    }

    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    struct Owned<const N: usize> {
        write: AtomicU64,
        read: AtomicU64,
        claimed: AtomicU64,
        meta: Vec<Meta>,
        slots: Vec<Slot<N>>,
    }

    impl<const N: usize> Owned<N> {
        fn new(count: usize) -> Self {
            let (meta, slots) = heap_slots(count);
            Owned { write: AtomicU64::new(0), read: AtomicU64::new(0), claimed: AtomicU64::new(0), meta, slots }
        }
        fn ring(&self) -> Ring<'_, N> {
            Ring::new(Positions { write: &self.write, read: &self.read, claimed: &self.claimed }, &self.meta, &self.slots)
        }
    }

    /// A push as the extension makes it: a claim, then the push.
    fn claim_push<const N: usize>(r: &Ring<'_, N>, bytes: &[u8], now: i64) -> Result<u64, PushError> {
        if !r.claim(1) {
            return Err(PushError::Full);
        }
        r.push(bytes, now).inspect_err(|_| r.unclaim(1))
    }

    #[test]
    fn claims_keep_room_for_the_records_they_promise() {
        let o = Owned::<8>::new(4);
        let r = o.ring();
        // Three slots promised (say, to statements that decrypt now and push their records later).
        assert!(r.claim(2) && r.claim(1));
        assert!(!r.claim(2), "only one slot is not promised");
        // Others may take the one slot left, and no more.
        assert_eq!(claim_push(&r, b"other", 1), Ok(1));
        assert_eq!(claim_push(&r, b"more", 1), Err(PushError::Full));
        assert_eq!(r.claimed(), 4);
        // The promised records all go in, whenever they come.
        for i in 0..3u8 {
            r.push(&[i], 2).expect("a promised slot");
        }
        assert_eq!((r.queued(), r.claimed()), (4, 4));
        // Consuming gives the room back; a claim given back without a push too.
        assert_eq!(drain(&r, 2).len(), 2);
        assert_eq!(r.claimed(), 2);
        assert!(r.claim(2));
        r.unclaim(1);
        assert_eq!(r.claimed(), 3);
        r.push(b"x", 3).unwrap();
        assert_eq!(drain(&r, 10).len(), 3);
        assert_eq!((r.queued(), r.claimed()), (0, 0));
        // A count cannot wrap below zero (a push without a claim, then its consumption).
        r.push(b"no claim", 4).unwrap();
        drain(&r, 10);
        assert_eq!(r.claimed(), 0);
        assert!(r.claim(4) && !r.claim(1));
    }

    fn drain<const N: usize>(r: &Ring<'_, N>, max: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        // SAFETY: one reader (this thread).
        let upto = unsafe { r.peek(max, |b| out.push(b.to_vec())) };
        unsafe { r.consume(upto) };
        out
    }

    #[test]
    fn records_come_out_in_order_and_whole_and_a_full_ring_refuses() {
        let o = Owned::<16>::new(4);
        let r = o.ring();
        assert_eq!(r.oldest_pushed_at(), None);
        for i in 0..4u8 {
            assert_eq!(claim_push(&r, &[i; 5][..i as usize + 1], 100 + i as i64), Ok(i as u64 + 1));
        }
        assert_eq!(claim_push(&r, b"x", 200), Err(PushError::Full));
        assert_eq!(r.push(&[0; 17], 200), Err(PushError::TooLong));
        assert_eq!(r.queued(), 4);
        assert_eq!(r.oldest_pushed_at(), Some(100));
        // A peek without consume gives the same records again.
        let mut seen = 0;
        assert_eq!(unsafe { r.peek(10, |_| seen += 1) }, 4);
        assert_eq!(seen, 4);
        assert_eq!(drain(&r, 2), vec![vec![0], vec![1, 1]]);
        assert_eq!(r.oldest_pushed_at(), Some(102));
        // Room again, and the ring wraps (positions only grow).
        assert_eq!(claim_push(&r, b"wrap", 300), Ok(3));
        assert_eq!(claim_push(&r, b"wrap2", 301), Ok(4));
        assert_eq!(claim_push(&r, b"no", 302), Err(PushError::Full));
        assert_eq!(drain(&r, 100), vec![vec![2, 2, 2], vec![3, 3, 3, 3], b"wrap".to_vec(), b"wrap2".to_vec()]);
        assert_eq!(r.queued(), 0);
        assert_eq!(r.oldest_pushed_at(), None);
        assert_eq!(o.write.load(Ordering::Relaxed), 6);
        // An empty record and a record of exactly a slot's size.
        claim_push(&r, b"", 1).unwrap();
        claim_push(&r, &[7; 16], 1).unwrap();
        assert_eq!(drain(&r, 100), vec![vec![], vec![7; 16]]);
    }

    #[test]
    fn a_reserved_but_unpublished_slot_holds_the_reader_back_not_the_writers() {
        let o = Owned::<8>::new(4);
        let r = o.ring();
        claim_push(&r, b"a", 1).unwrap();
        // A writer that reserved position 1 and has not published yet (simulated by moving the
        // write position by hand, as its compare-and-swap would).
        o.write.store(2, Ordering::Relaxed);
        claim_push(&r, b"c", 3).unwrap(); // another writer is not held up
        assert_eq!(drain(&r, 100), vec![b"a".to_vec()]); // the reader stops before position 1
        // The oldest slot is not published: no age is read from it (its time is a lap old).
        assert_eq!(r.queued(), 2);
        assert_eq!(r.oldest_pushed_at(), None);
        // The late writer publishes: the reader continues, in position order.
        let s = &o.slots[1];
        unsafe {
            (&mut *s.data.get())[..1].copy_from_slice(b"b");
            *s.len.get() = 1;
        }
        o.meta[1].seq.store(2, Ordering::Release);
        assert_eq!(drain(&r, 100), vec![b"b".to_vec(), b"c".to_vec()]);
    }

    /// Many writers and one reader at full speed: every record arrives once, whole, and each
    /// writer's records in the order it pushed them.
    #[test]
    fn concurrent_writers_lose_duplicate_and_reorder_nothing() {
        const WRITERS: usize = 8;
        const EACH: u32 = 50_000;
        let o = Arc::new(Owned::<64>::new(32));
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (o, done) = (o.clone(), done.clone());
            std::thread::spawn(move || {
                let r = o.ring();
                let mut next = [0u32; WRITERS];
                let mut total = 0u64;
                loop {
                    let finished = done.load(Ordering::Acquire);
                    let mut got = 0;
                    let upto = unsafe {
                        r.peek(usize::MAX, |b| {
                            // writer id, counter, then a filler derived from both.
                            let w = b[0] as usize;
                            let n = u32::from_le_bytes(b[1..5].try_into().unwrap());
                            assert_eq!(n, next[w], "writer {w}: out of order or lost");
                            let fill = (n as usize + w) % 50;
                            assert_eq!(b.len(), 5 + fill);
                            assert!(b[5..].iter().all(|&x| x == (n as u8) ^ (w as u8)), "torn record");
                            next[w] += 1;
                            got += 1;
                        })
                    };
                    unsafe { r.consume(upto) };
                    total += got;
                    if finished && got == 0 && r.queued() == 0 {
                        break;
                    }
                    if got == 0 {
                        std::thread::yield_now();
                    }
                }
                assert!(next.iter().all(|&n| n == EACH), "{next:?}");
                total
            })
        };
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let o = o.clone();
                std::thread::spawn(move || {
                    let r = o.ring();
                    let mut full = 0u64;
                    for n in 0..EACH {
                        let fill = (n as usize + w) % 50;
                        let mut rec = vec![w as u8];
                        rec.extend_from_slice(&n.to_le_bytes());
                        rec.extend(std::iter::repeat_n((n as u8) ^ (w as u8), fill));
                        // Claimed first, as the extension does: a claimed push always finds
                        // its slot (the reader hands slots back before it lowers the count).
                        while !r.claim(1) {
                            full += 1;
                            std::thread::yield_now();
                        }
                        r.push(&rec, n as i64).expect("a claimed push found no free slot");
                    }
                    full
                })
            })
            .collect();
        let fulls: u64 = writers.into_iter().map(|t| t.join().unwrap()).sum();
        done.store(true, Ordering::Release);
        assert_eq!(reader.join().unwrap(), WRITERS as u64 * EACH as u64);
        eprintln!("writers found the ring full {fulls} times");
    }
}
