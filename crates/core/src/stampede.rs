//! A cluster-wide bound on concurrent key-provider calls (stampede control).
//!
//! After a restart or a TTL expiry, hundreds of backends can need a tenant's keys at the same
//! moment. Each must unwrap them itself (unwrapped keys never go to shared memory, so calls
//! cannot be coalesced across backends), but they need not all call the KMS *at once*: a
//! backend takes a slot from a [`SlotTable`] that lives in shared memory before a provider call
//! and gives it back after; with every slot taken it waits (the pgrx crate sleeps on a condition
//! variable, FIFO, for at most `envelope.kms_timeout`).
//!
//! The table is plain atomics, so this module is tested with threads here, without PostgreSQL:
//! * `in_use` is the number of slots taken; it is only raised by a compare-and-swap that keeps it
//!   at most the cap, so no interleaving of acquirers can exceed the cap.
//! * `holders[i]` is the pid that holds slot `i` (0: free). A backend that died holding a slot
//!   (killed outside PostgreSQL's error handling) is found by its pid and its slot reclaimed.
//! * Lowering the cap (a reload) lets calls in flight finish; new ones wait until `in_use` is
//!   below the new cap.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

/// Most slots the table has (the largest `envelope.max_concurrent_provider_calls`).
pub const MAX_SLOTS: usize = 1024;

/// The shared-memory layout: counters and one holder word per slot. All-zero is the initial
/// state (shared memory is zeroed before use).
#[repr(C)]
pub struct SlotTable {
    in_use: AtomicU32,
    /// The most slots ever taken at once since the server started.
    peak: AtomicU32,
    /// Acquisitions (calls that went through the table).
    acquired: AtomicU64,
    /// Acquisitions that had to wait for a slot.
    waited: AtomicU64,
    /// Waits that ended at the timeout without a slot (the call was not made).
    timed_out: AtomicU64,
    /// Slots taken back from processes that died holding them.
    reclaimed: AtomicU64,
    holders: [AtomicI32; MAX_SLOTS],
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

/// A taken slot: its index in the table. Give it back with [`SlotTable::release`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a slot that is not released stays taken until its holder exits"]
pub struct Slot(usize);

impl Slot {
    pub fn index(&self) -> usize {
        self.0
    }
}

impl SlotTable {
    /// A zeroed table (for tests; in PostgreSQL the table is zeroed shared memory).
    pub fn new_boxed() -> Box<SlotTable> {
        // SAFETY: every field is an atomic integer (or an array of them), for which all-zero
        // bytes are a valid value.
        unsafe { Box::<SlotTable>::new_zeroed().assume_init() }
    }

    /// Takes a slot for `pid` if fewer than `cap` are taken (`cap` is clamped to 1..=MAX_SLOTS).
    pub fn try_acquire(&self, pid: i32, cap: u32) -> Option<Slot> {
        let cap = cap.clamp(1, MAX_SLOTS as u32);
        let mut n = self.in_use.load(Ordering::Acquire);
        loop {
            if n >= cap {
                return None;
            }
            match self.in_use.compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => n = now,
            }
        }
        self.peak.fetch_max(n + 1, Ordering::Relaxed);
        self.acquired.fetch_add(1, Ordering::Relaxed);
        // `in_use` counted us in, so at most MAX_SLOTS - 1 others hold a slot: a free holder
        // word exists. Another acquirer may take the one we look at first; keep looking.
        loop {
            for (i, h) in self.holders.iter().enumerate() {
                if h.load(Ordering::Relaxed) == 0 && h.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    return Some(Slot(i));
                }
            }
            std::hint::spin_loop();
        }
    }

    /// Gives the slot back. Returns false (and changes nothing) if it was reclaimed meanwhile.
    pub fn release(&self, slot: Slot, pid: i32) -> bool {
        if self.holders[slot.0].compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
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
            let p = h.load(Ordering::Acquire);
            if p == 0 || alive(p) {
                continue;
            }
            if h.compare_exchange(p, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                self.in_use.fetch_sub(1, Ordering::AcqRel);
                freed += 1;
            }
        }
        self.reclaimed.fetch_add(freed as u64, Ordering::Relaxed);
        freed
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
    fn never_more_than_the_cap_at_once_under_contention() {
        let table: Arc<SlotTable> = Arc::from(SlotTable::new_boxed());
        let inside = Arc::new(AtomicU32::new(0));
        let worst = Arc::new(AtomicU32::new(0));
        let cap = 3;
        let threads: Vec<_> = (1..=8)
            .map(|pid| {
                let (table, inside, worst) = (table.clone(), inside.clone(), worst.clone());
                std::thread::spawn(move || {
                    let mut calls = 0;
                    while calls < 300 {
                        let Some(slot) = table.try_acquire(pid, cap) else {
                            std::thread::yield_now();
                            continue;
                        };
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        worst.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                        assert!(table.release(slot, pid));
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
        assert!(worst.load(Ordering::SeqCst) <= cap, "{} calls at once with a cap of {cap}", worst.load(Ordering::SeqCst));
        assert!(s.peak <= cap && s.peak >= 1);
    }

    #[test]
    fn a_full_table_refuses_until_a_slot_is_released() {
        let t = SlotTable::new_boxed();
        let a = t.try_acquire(10, 2).unwrap();
        let b = t.try_acquire(11, 2).unwrap();
        assert_ne!(a.index(), b.index());
        assert!(t.try_acquire(12, 2).is_none());
        assert!(t.release(a, 10));
        let c = t.try_acquire(12, 2).unwrap();
        assert_eq!(t.stats().in_use, 2);
        assert!(t.release(b, 11) && t.release(c, 12));
        assert_eq!(t.stats().in_use, 0);
    }

    #[test]
    fn lowering_the_cap_lets_calls_in_flight_finish_and_holds_new_ones() {
        let t = SlotTable::new_boxed();
        let held: Vec<_> = (1..=4).map(|p| (t.try_acquire(p, 4).unwrap(), p)).collect();
        assert!(t.try_acquire(9, 2).is_none(), "4 in flight, cap lowered to 2");
        let mut held = held.into_iter();
        for _ in 0..2 {
            let (s, p) = held.next().unwrap();
            assert!(t.release(s, p));
            assert!(t.try_acquire(9, 2).is_none(), "still at or above the new cap");
        }
        let (s, p) = held.next().unwrap();
        assert!(t.release(s, p));
        assert!(t.try_acquire(9, 2).is_some());
    }

    #[test]
    fn a_dead_holders_slot_is_reclaimed_and_its_late_release_changes_nothing() {
        let t = SlotTable::new_boxed();
        let dead = t.try_acquire(100, 2).unwrap();
        let live = t.try_acquire(200, 2).unwrap();
        assert!(t.try_acquire(300, 2).is_none());
        let is_alive = |pid| pid != 100;
        assert_eq!(t.reclaim(is_alive), 1);
        assert_eq!(t.stats().reclaimed, 1);
        let s = t.try_acquire(300, 2).expect("the dead holder's slot is free again");
        assert_eq!(s.index(), dead.index());
        // A late release by the "dead" pid (had it been alive after all) must not free 300's slot.
        assert!(!t.release(dead, 100));
        assert_eq!(t.stats().in_use, 2);
        assert!(t.release(live, 200) && t.release(s, 300));
    }

    #[test]
    fn the_cap_is_clamped() {
        let t = SlotTable::new_boxed();
        assert!(t.try_acquire(1, 0).is_some(), "a cap of 0 is treated as 1 here (0 = no table is the caller's choice)");
        assert!(t.try_acquire(2, 0).is_none());
        assert!(t.try_acquire(3, u32::MAX).is_some(), "a cap above the table's size is the table's size");
    }
}
