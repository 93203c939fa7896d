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
//! only its own slots, never the slots other tenants' providers need.
//!
//! The table is plain atomics, so this module is tested with threads here, without PostgreSQL:
//! * A provider (by a 32-bit hash of its name) owns a bucket; a bucket's `in_use` is only raised
//!   by a compare-and-swap that keeps it at most the cap, so no interleaving of acquirers can
//!   exceed the cap for one provider. Two names with the same hash, or providers beyond
//!   [`MAX_PROVIDERS`], share a bucket (and its bound): stricter, never looser.
//! * `holders[i]` is the pid that holds slot `i` and its bucket (0: free). A backend that died
//!   holding a slot (killed outside PostgreSQL's error handling) is found by its pid and its slot
//!   reclaimed.
//! * Lowering the cap (a reload) lets calls in flight finish; new ones wait until the bucket is
//!   below the new cap.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Most calls in flight at once across all providers (and the largest cap).
pub const MAX_SLOTS: usize = 1024;

/// Providers with a bucket of their own; more share the last bucket.
pub const MAX_PROVIDERS: usize = 64;

#[repr(C)]
struct Bucket {
    /// The provider's key (0: bucket unused).
    key: AtomicU32,
    in_use: AtomicU32,
}

/// The shared-memory layout. All-zero is the initial state (shared memory is zeroed before use).
#[repr(C)]
pub struct SlotTable {
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
    buckets: [Bucket; MAX_PROVIDERS],
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

    /// The provider's bucket (whose waiters to wake after the release).
    pub fn bucket(&self) -> usize {
        word_bucket(self.word)
    }
}

/// The key of a provider name (FNV-1a, never 0).
pub fn provider_key(name: &str) -> u32 {
    let h = name.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193));
    h.max(1)
}

fn word(pid: i32, bucket: usize) -> u64 {
    ((pid as u32 as u64) << 32) | (bucket as u64 + 1)
}

fn word_pid(w: u64) -> i32 {
    (w >> 32) as u32 as i32
}

fn word_bucket(w: u64) -> usize {
    ((w & 0xffff_ffff) as usize).saturating_sub(1).min(MAX_PROVIDERS - 1)
}

impl SlotTable {
    /// A zeroed table (for tests; in PostgreSQL the table is zeroed shared memory).
    pub fn new_boxed() -> Box<SlotTable> {
        // SAFETY: every field is an atomic integer (or an array of them, or of structs of
        // them), for which all-zero bytes are a valid value.
        unsafe { Box::<SlotTable>::new_zeroed().assume_init() }
    }

    /// The bucket of provider `key`: its own, a new one, or the last (shared) one. Waiters for
    /// a provider sleep on their bucket's condition variable (one per bucket, in the pgrx crate).
    pub fn bucket(&self, key: u32) -> usize {
        for (i, b) in self.buckets.iter().enumerate().take(MAX_PROVIDERS - 1) {
            match b.key.load(Ordering::Acquire) {
                k if k == key => return i,
                0 => match b.key.compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return i,
                    Err(k) if k == key => return i,
                    Err(_) => continue,
                },
                _ => continue,
            }
        }
        MAX_PROVIDERS - 1
    }

    /// Takes a slot for `pid` to call provider `key` if fewer than `cap` calls to it are in
    /// flight (`cap` is clamped to 1..=MAX_SLOTS) and the table has room.
    pub fn try_acquire(&self, pid: i32, key: u32, cap: u32) -> Option<Slot> {
        let cap = cap.clamp(1, MAX_SLOTS as u32);
        let b = self.bucket(key);
        let count = &self.buckets[b].in_use;
        let mut n = count.load(Ordering::Acquire);
        loop {
            if n >= cap {
                return None;
            }
            match count.compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => n = now,
            }
        }
        let w = word(pid, b);
        for (i, h) in self.holders.iter().enumerate() {
            if h.load(Ordering::Relaxed) == 0 && h.compare_exchange(0, w, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                let total = self.in_use.fetch_add(1, Ordering::AcqRel) + 1;
                self.peak.fetch_max(total, Ordering::Relaxed);
                self.acquired.fetch_add(1, Ordering::Relaxed);
                return Some(Slot { index: i, word: w });
            }
        }
        // MAX_SLOTS calls in flight across all providers: wait like a full bucket.
        count.fetch_sub(1, Ordering::AcqRel);
        None
    }

    /// Gives the slot back. Returns false (and changes nothing) if it was reclaimed meanwhile.
    pub fn release(&self, slot: Slot) -> bool {
        if self.holders[slot.index].compare_exchange(slot.word, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            self.buckets[word_bucket(slot.word)].in_use.fetch_sub(1, Ordering::AcqRel);
            self.in_use.fetch_sub(1, Ordering::AcqRel);
            true
        } else {
            false
        }
    }

    /// Frees every slot held by a pid for which `alive` is false (a process that died holding
    /// it). Returns how many were freed.
    pub fn reclaim(&self, alive: impl Fn(i32) -> bool) -> u32 {
        let mut freed = 0;
        for h in &self.holders {
            let w = h.load(Ordering::Acquire);
            if w == 0 || alive(word_pid(w)) {
                continue;
            }
            if h.compare_exchange(w, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                self.buckets[word_bucket(w)].in_use.fetch_sub(1, Ordering::AcqRel);
                self.in_use.fetch_sub(1, Ordering::AcqRel);
                freed += 1;
            }
        }
        self.reclaimed.fetch_add(freed as u64, Ordering::Relaxed);
        freed
    }

    /// Calls in flight to provider `key` now.
    pub fn in_use_for(&self, key: u32) -> u32 {
        self.buckets.iter().find(|b| b.key.load(Ordering::Acquire) == key).map_or(0, |b| b.in_use.load(Ordering::Relaxed))
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
        let keys = [provider_key("bao"), provider_key("aws")];
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
        let (bao, aws) = (provider_key("bao"), provider_key("aws"));
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
        let k = provider_key("bao");
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
        let k = provider_key("bao");
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
    fn providers_beyond_the_table_share_the_last_bucket() {
        let t = SlotTable::new_boxed();
        let held: Vec<_> = (0..MAX_PROVIDERS as u32 - 1).map(|i| t.try_acquire(1, 1000 + i, 1).unwrap()).collect();
        let x = t.try_acquire(2, 5000, 1).expect("the shared bucket");
        assert!(t.try_acquire(3, 6000, 1).is_none(), "another overflow provider shares the bound");
        assert!(t.release(x));
        assert!(t.try_acquire(3, 6000, 1).is_some());
        drop(held);
    }

    #[test]
    fn the_table_never_holds_more_than_max_slots() {
        let t = SlotTable::new_boxed();
        let n = (0..MAX_SLOTS as u32 + 10).filter_map(|i| t.try_acquire(1, provider_key(&format!("p{}", i % 40)), u32::MAX)).count();
        assert_eq!(n, MAX_SLOTS);
        assert_eq!(t.stats().in_use as usize, MAX_SLOTS);
    }

    #[test]
    fn the_cap_is_clamped_and_keys_are_never_zero() {
        let t = SlotTable::new_boxed();
        let k = provider_key("");
        assert_ne!(k, 0);
        assert!(t.try_acquire(1, k, 0).is_some(), "a cap of 0 is treated as 1 here (0 = no table is the caller's choice)");
        assert!(t.try_acquire(2, k, 0).is_none());
    }
}
