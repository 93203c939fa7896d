//! A server-wide bound on concurrent calls to each key provider (stampede control).
//!
//! After a restart or a TTL expiry, hundreds of backends can need a tenant's keys at the same
//! moment. Each must unwrap them itself (unwrapped keys never go to shared memory, so calls
//! cannot be coalesced across backends), but they need not all call the KMS *at once*: a
//! backend takes a slot from a [`SlotTable`] that lives in shared memory before a provider call
//! and gives it back after; with every slot of that provider taken it waits (the pgrx crate
//! sleeps on a condition variable, FIFO, for at most `envelope.kms_timeout`).
//!
//! The bound is **per provider**: a KMS that hangs (a customer's, in bring-your-own-key) holds
//! only its own slots, never the slots other providers need. A provider is identified by a
//! 64-bit hash of its database and name ([`provider_key`]).
//!
//! The table is plain atomics, so this module is tested with threads here, without PostgreSQL:
//! * A short spin lock (a few hundred nanoseconds per call, not per value) guards the buckets: a
//!   provider with calls in flight owns exactly one bucket (its key and count), found or claimed
//!   under the lock, so two providers never share a bound and one provider never has two. A
//!   bucket whose count falls to 0 can be claimed by another provider. There is a bucket per
//!   slot ([`MAX_BUCKETS`] = [`MAX_SLOTS`]), so buckets never run out before slots do: only
//!   [`MAX_SLOTS`] calls in flight across all providers make a caller of another provider wait
//!   (an insider review filled the 64 buckets of an earlier layout with 64 hung providers and
//!   blocked every other provider of every database).
//! * `holders[i]` is the pid that holds slot `i` and its bucket (0: free). A backend that died
//!   holding a slot (killed outside PostgreSQL's error handling) is found by its pid and its slot
//!   reclaimed.
//! * Lowering the cap (a reload) lets calls in flight finish; new ones wait until the provider is
//!   below the new cap.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Most calls in flight at once across all providers (and the largest cap).
pub const MAX_SLOTS: usize = 1024;

/// Most providers with calls in flight at once: one per slot, so never the limit.
pub const MAX_BUCKETS: usize = MAX_SLOTS;

/// Wait channels (condition variables in the pgrx crate); providers hash onto them
/// ([`channel`]), and a waiter woken for another provider on its channel simply re-checks.
pub const MAX_PROVIDERS: usize = 64;

#[repr(C)]
struct Bucket {
    /// The provider's key (meaningful while `in_use` > 0).
    key: AtomicU64,
    in_use: AtomicU32,
}

/// The shared-memory layout. All-zero is the initial state (shared memory is zeroed before use).
#[repr(C)]
pub struct SlotTable {
    /// The spin lock over `buckets` and `holders`.
    lock: AtomicBool,
    /// Calls in flight, all providers.
    in_use: AtomicU32,
    /// The most calls in flight at once (all providers) since the server started.
    peak: AtomicU32,
    /// Acquisitions (calls that went through the table).
    acquired: AtomicU64,
    /// Acquisitions that had to wait for a slot.
    waited: AtomicU64,
    /// Waits that ended at the timeout without a slot (the call was not made).
    timed_out: AtomicU64,
    /// Slots taken back from processes that died holding them.
    reclaimed: AtomicU64,
    buckets: [Bucket; MAX_BUCKETS],
    /// `pid << 32 | bucket + 1` of the holder of each slot; 0: free.
    holders: [AtomicU64; MAX_SLOTS],
}

/// What `status()` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotStats {
    pub in_use: u32,
    pub peak: u32,
    pub acquired: u64,
    pub waited: u64,
    pub timed_out: u64,
    pub reclaimed: u64,
}

/// A taken slot. Give it back with [`SlotTable::release`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a slot that is not released stays taken until its holder exits"]
pub struct Slot {
    index: usize,
    word: u64,
}

impl Slot {
    pub fn index(&self) -> usize {
        self.index
    }
}

/// The key of a provider: FNV-1a (64-bit) of its database's oid and its name. (A collision of
/// two providers' keys would make them share a bound: about 2^-64 per pair.)
pub fn provider_key(database: u32, name: &str) -> u64 {
    database
        .to_be_bytes()
        .iter()
        .chain(name.as_bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Which of `n` wake-up channels (condition variables) the waiters for `key` sleep on.
pub fn channel(key: u64, n: usize) -> usize {
    (key % n.max(1) as u64) as usize
}

fn word(pid: i32, bucket: usize) -> u64 {
    ((pid as u32 as u64) << 32) | (bucket as u64 + 1)
}

fn word_pid(w: u64) -> i32 {
    (w >> 32) as u32 as i32
}

fn word_bucket(w: u64) -> usize {
    ((w & 0xffff_ffff) as usize).saturating_sub(1).min(MAX_BUCKETS - 1)
}

struct Locked<'a>(&'a AtomicBool);
impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl SlotTable {
    /// A zeroed table (for tests; in PostgreSQL the table is zeroed shared memory).
    pub fn new_boxed() -> Box<SlotTable> {
        // SAFETY: every field is an atomic integer or boolean (or an array of them, or of structs
        // of them), for which all-zero bytes are a valid value.
        unsafe { Box::<SlotTable>::new_zeroed().assume_init() }
    }

    fn lock(&self) -> Locked<'_> {
        let mut spins = 0u32;
        while self.lock.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            spins += 1;
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        Locked(&self.lock)
    }

    /// Takes a slot for `pid` to call provider `key` if fewer than `cap` calls to it are in
    /// flight (`cap` is clamped to 1..=MAX_SLOTS) and the table has room.
    pub fn try_acquire(&self, pid: i32, key: u64, cap: u32) -> Option<Slot> {
        let cap = cap.clamp(1, MAX_SLOTS as u32);
        let _g = self.lock();
        let live = |b: &Bucket| b.in_use.load(Ordering::Relaxed) > 0;
        let b = match self.buckets.iter().position(|b| live(b) && b.key.load(Ordering::Relaxed) == key) {
            Some(i) if self.buckets[i].in_use.load(Ordering::Relaxed) >= cap => return None,
            Some(i) => i,
            None => {
                let i = self.buckets.iter().position(|b| !live(b))?;
                self.buckets[i].key.store(key, Ordering::Relaxed);
                i
            }
        };
        let w = word(pid, b);
        let (i, h) = self.holders.iter().enumerate().find(|(_, h)| h.load(Ordering::Relaxed) == 0)?;
        h.store(w, Ordering::Relaxed);
        self.buckets[b].in_use.fetch_add(1, Ordering::Relaxed);
        let total = self.in_use.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(total, Ordering::Relaxed);
        self.acquired.fetch_add(1, Ordering::Relaxed);
        Some(Slot { index: i, word: w })
    }

    fn free(&self, w: u64) {
        self.buckets[word_bucket(w)].in_use.fetch_sub(1, Ordering::Relaxed);
        self.in_use.fetch_sub(1, Ordering::Relaxed);
    }

    /// Gives the slot back. Returns false (and changes nothing) if it was reclaimed meanwhile.
    pub fn release(&self, slot: Slot) -> bool {
        let _g = self.lock();
        let h = &self.holders[slot.index];
        if h.load(Ordering::Relaxed) != slot.word {
            return false;
        }
        h.store(0, Ordering::Relaxed);
        self.free(slot.word);
        true
    }

    /// Frees every slot held by a pid for which `alive` is false (a process that died holding
    /// it). Returns how many were freed. (`alive` is asked outside the lock.)
    pub fn reclaim(&self, alive: impl Fn(i32) -> bool) -> u32 {
        let dead: Vec<(usize, u64)> = self
            .holders
            .iter()
            .enumerate()
            .map(|(i, h)| (i, h.load(Ordering::Acquire)))
            .filter(|&(_, w)| w != 0 && !alive(word_pid(w)))
            .collect();
        if dead.is_empty() {
            return 0;
        }
        let _g = self.lock();
        let mut freed = 0;
        for (i, w) in dead {
            if self.holders[i].load(Ordering::Relaxed) == w {
                self.holders[i].store(0, Ordering::Relaxed);
                self.free(w);
                freed += 1;
            }
        }
        self.reclaimed.fetch_add(freed as u64, Ordering::Relaxed);
        freed
    }

    /// Every slot of the table is taken (all providers together).
    pub fn is_full(&self) -> bool {
        self.in_use.load(Ordering::Relaxed) as usize >= MAX_SLOTS
    }

    /// Calls in flight to provider `key` now.
    pub fn in_use_for(&self, key: u64) -> u32 {
        let _g = self.lock();
        self.buckets
            .iter()
            .find(|b| b.in_use.load(Ordering::Relaxed) > 0 && b.key.load(Ordering::Relaxed) == key)
            .map_or(0, |b| b.in_use.load(Ordering::Relaxed))
    }

    pub fn note_wait(&self) {
        self.waited.fetch_add(1, Ordering::Relaxed);
    }

    pub fn note_timeout(&self) {
        self.timed_out.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> SlotStats {
        SlotStats {
            in_use: self.in_use.load(Ordering::Relaxed),
            peak: self.peak.load(Ordering::Relaxed),
            acquired: self.acquired.load(Ordering::Relaxed),
            waited: self.waited.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            reclaimed: self.reclaimed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn never_more_than_the_cap_per_provider_under_contention() {
        let table: Arc<SlotTable> = Arc::from(SlotTable::new_boxed());
        let cap = 3;
        let keys = [provider_key(5, "bao"), provider_key(5, "aws")];
        let inside: Arc<[AtomicU32; 2]> = Arc::new(Default::default());
        let worst: Arc<[AtomicU32; 2]> = Arc::new(Default::default());
        let threads: Vec<_> = (1..=8)
            .map(|pid| {
                let (table, inside, worst) = (table.clone(), inside.clone(), worst.clone());
                std::thread::spawn(move || {
                    let p = pid as usize % 2;
                    let mut calls = 0;
                    while calls < 300 {
                        let Some(slot) = table.try_acquire(pid, keys[p], cap) else {
                            std::thread::yield_now();
                            continue;
                        };
                        let now = inside[p].fetch_add(1, Ordering::SeqCst) + 1;
                        worst[p].fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside[p].fetch_sub(1, Ordering::SeqCst);
                        assert!(table.release(slot));
                        calls += 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = table.stats();
        assert_eq!(s.acquired, 8 * 300);
        assert_eq!(s.in_use, 0);
        for p in 0..2 {
            let w = worst[p].load(Ordering::SeqCst);
            assert!(w <= cap, "{w} calls at once to one provider with a cap of {cap}");
        }
        assert!(s.peak <= 2 * cap && s.peak >= 1);
    }

    #[test]
    fn a_full_provider_refuses_until_a_slot_is_released_and_others_are_not_affected() {
        let t = SlotTable::new_boxed();
        let (bao, aws) = (provider_key(5, "bao"), provider_key(5, "aws"));
        let a = t.try_acquire(10, bao, 2).unwrap();
        let b = t.try_acquire(11, bao, 2).unwrap();
        assert_ne!(a.index(), b.index());
        assert!(t.try_acquire(12, bao, 2).is_none(), "bao is full");
        let other = t.try_acquire(13, aws, 2).expect("a hung provider does not hold another's slots");
        assert_eq!(t.in_use_for(bao), 2);
        assert!(t.release(a));
        let c = t.try_acquire(12, bao, 2).unwrap();
        assert_eq!(t.stats().in_use, 3);
        assert!(t.release(b) && t.release(c) && t.release(other));
        assert_eq!(t.stats().in_use, 0);
        assert_eq!(t.in_use_for(bao), 0);
    }

    #[test]
    fn lowering_the_cap_lets_calls_in_flight_finish_and_holds_new_ones() {
        let t = SlotTable::new_boxed();
        let k = provider_key(5, "bao");
        let held: Vec<_> = (1..=4).map(|p| t.try_acquire(p, k, 4).unwrap()).collect();
        assert!(t.try_acquire(9, k, 2).is_none(), "4 in flight, cap lowered to 2");
        let mut held = held.into_iter();
        for _ in 0..2 {
            assert!(t.release(held.next().unwrap()));
            assert!(t.try_acquire(9, k, 2).is_none(), "still at or above the new cap");
        }
        assert!(t.release(held.next().unwrap()));
        assert!(t.try_acquire(9, k, 2).is_some());
    }

    #[test]
    fn a_dead_holders_slot_is_reclaimed_and_its_late_release_changes_nothing() {
        let t = SlotTable::new_boxed();
        let k = provider_key(5, "bao");
        let dead = t.try_acquire(100, k, 2).unwrap();
        let live = t.try_acquire(200, k, 2).unwrap();
        assert!(t.try_acquire(300, k, 2).is_none());
        assert_eq!(t.reclaim(|pid| pid != 100), 1);
        assert_eq!(t.stats().reclaimed, 1);
        let s = t.try_acquire(300, k, 2).expect("the dead holder's slot is free again");
        assert_eq!(s.index(), dead.index());
        // A late release by the "dead" pid (had it been alive after all) must not free 300's slot.
        assert!(!t.release(dead));
        assert_eq!(t.in_use_for(k), 2);
        assert!(t.release(live) && t.release(s));
        assert_eq!(t.stats().in_use, 0);
    }

    #[test]
    fn one_name_in_two_databases_is_two_providers() {
        let t = SlotTable::new_boxed();
        let (a, b) = (provider_key(16384, "kms"), provider_key(16385, "kms"));
        assert_ne!(a, b);
        let held = t.try_acquire(1, b, 1).unwrap();
        assert!(t.try_acquire(2, b, 1).is_none());
        assert!(t.try_acquire(3, a, 1).is_some(), "the other database's provider has its own bound");
        assert!(t.release(held));
    }

    #[test]
    fn buckets_are_reused_and_never_shared() {
        let t = SlotTable::new_boxed();
        // Many providers over time, one at a time: each drained bucket is reused.
        for i in 0..10 * MAX_BUCKETS as u32 {
            let s = t.try_acquire(1, provider_key(1, &format!("p{i}")), 1).unwrap();
            assert!(t.release(s));
        }
        // More providers in flight at once than there are wait channels (64 hung providers
        // once blocked every other one): each has its own bound and bucket.
        let held: Vec<_> = (0..MAX_BUCKETS as u32 - 1).map(|i| t.try_acquire(1, provider_key(2, &format!("q{i}")), 1).unwrap()).collect();
        assert!(t.try_acquire(2, provider_key(2, "q0"), 1).is_none(), "q0 is at its cap");
        assert!(!t.is_full());
        let last = t.try_acquire(2, provider_key(2, "last"), 1).expect("the last slot has a bucket too");
        assert!(t.is_full());
        assert!(t.try_acquire(2, provider_key(2, "new"), 1).is_none(), "every slot taken: wait");
        assert!(t.release(last));
        let mut held = held.into_iter();
        assert!(t.release(held.next().unwrap()));
        assert!(t.try_acquire(2, provider_key(2, "new"), 1).is_some(), "a drained bucket is claimed");
        assert!(t.try_acquire(3, provider_key(2, "q1"), 1).is_none(), "q1 still has its own full bucket");
    }

    #[test]
    fn the_table_never_holds_more_than_max_slots() {
        let t = SlotTable::new_boxed();
        let n = (0..MAX_SLOTS as u32 + 10).filter_map(|i| t.try_acquire(1, provider_key(1, &format!("p{}", i % 40)), u32::MAX)).count();
        assert_eq!(n, MAX_SLOTS);
        assert_eq!(t.stats().in_use as usize, MAX_SLOTS);
    }

    #[test]
    fn the_cap_is_clamped() {
        let t = SlotTable::new_boxed();
        let k = provider_key(0, "");
        assert!(t.try_acquire(1, k, 0).is_some(), "a cap of 0 is treated as 1 here (0 = no table is the caller's choice)");
        assert!(t.try_acquire(2, k, 0).is_none());
    }
}
