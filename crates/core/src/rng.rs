//! The per-process nonce generator.
//!
//! Nonces come from ChaCha20 (`rand_chacha`) seeded with 256 bits from the operating system
//! (`getrandom`). It is seeded lazily, on first use, inside the process that uses it: a
//! PostgreSQL backend seeds its own generator after the postmaster forked it, so two backends
//! never share a stream. The postmaster never draws from it (`_PG_init` does not touch it).
//!
//! As a second line of defence, a `pthread_atfork` child handler bumps a process-wide
//! generation counter; a generator seeded before a fork notices the change on its next use and
//! reseeds from the OS. Checking costs one relaxed atomic load per call, no syscall.
//!
//! One OS call per row would cost 3-4x the AES work (measured on the target machine), which is
//! why rows draw from this generator instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRng, RngCore, SeedableRng};

static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);
static ATFORK: Once = Once::new();

extern "C" fn after_fork_in_child() {
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
}

fn register_fork_handler() {
    ATFORK.call_once(|| unsafe {
        // Failure only means no handler is installed; lazy seeding still protects the common case.
        let _ = libc::pthread_atfork(None, None, Some(after_fork_in_child));
    });
}

/// A CSPRNG for nonces, seeded from the OS in the process that uses it; reseeds after `fork`.
pub struct BackendRng {
    inner: Option<(ChaCha20Rng, u64)>,
    reseeds: u64,
}

impl Default for BackendRng {
    fn default() -> Self {
        Self::new()
    }
}

impl BackendRng {
    /// An unseeded generator: nothing is drawn from the OS until the first nonce is needed.
    pub const fn new() -> Self {
        BackendRng { inner: None, reseeds: 0 }
    }

    /// A uniform `u32` (for retry jitter).
    pub fn random_u32(&mut self) -> u32 {
        self.rng().next_u32()
    }

    /// How many times this generator has seeded itself from the OS (1 after first use).
    pub fn seed_count(&self) -> u64 {
        self.reseeds
    }

    fn rng(&mut self) -> &mut ChaCha20Rng {
        let generation = FORK_GENERATION.load(Ordering::Relaxed);
        let stale = !matches!(&self.inner, Some((_, g)) if *g == generation);
        if stale {
            register_fork_handler();
            let mut seed = [0u8; 32];
            // No fallback: without OS entropy there is no safe nonce, so fail loudly.
            getrandom::fill(&mut seed).expect("pg_envelope: the operating system's random source failed");
            // Re-read: the handler may have been registered just now.
            let generation = FORK_GENERATION.load(Ordering::Relaxed);
            self.inner = Some((ChaCha20Rng::from_seed(seed), generation));
            zeroize::Zeroize::zeroize(&mut seed);
            self.reseeds += 1;
        }
        &mut self.inner.as_mut().expect("seeded above").0
    }
}

impl RngCore for BackendRng {
    fn next_u32(&mut self) -> u32 {
        self.rng().next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.rng().next_u64()
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        self.rng().fill_bytes(dst)
    }
}

impl CryptoRng for BackendRng {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazily_seeded_once() {
        let mut r = BackendRng::new();
        assert_eq!(r.seed_count(), 0);
        let mut a = [0u8; 24];
        let mut b = [0u8; 24];
        r.fill_bytes(&mut a);
        r.fill_bytes(&mut b);
        assert_eq!(r.seed_count(), 1);
        assert_ne!(a, b);
    }

    #[test]
    fn two_generators_do_not_share_a_stream() {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        BackendRng::new().fill_bytes(&mut a);
        BackendRng::new().fill_bytes(&mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn reseeds_in_a_forked_child() {
        let mut r = BackendRng::new();
        let mut parent_first = [0u8; 16];
        r.fill_bytes(&mut parent_first);
        let mut fds = [0i32; 2];
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // Child: draw the "next" bytes and send them to the parent together with the seed count.
            let mut next = [0u8; 16];
            r.fill_bytes(&mut next);
            let mut msg = [0u8; 17];
            msg[..16].copy_from_slice(&next);
            msg[16] = r.seed_count() as u8;
            unsafe {
                libc::write(fds[1], msg.as_ptr() as *const _, msg.len());
                libc::_exit(0);
            }
        }
        let mut msg = [0u8; 17];
        let n = unsafe { libc::read(fds[0], msg.as_mut_ptr() as *mut _, msg.len()) };
        assert_eq!(n, 17);
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        let mut parent_next = [0u8; 16];
        r.fill_bytes(&mut parent_next);
        assert_eq!(msg[16], 2, "child must reseed after fork");
        assert_ne!(&msg[..16], &parent_next[..], "child repeated the parent's stream");
    }
}
