//! The backend's own state in plain statics instead of `thread_local!`.
//!
//! A PostgreSQL backend runs every SQL function, hook and callback on its one thread. In this
//! `dlopen`ed library each `thread_local!` access is a call to `__tls_get_addr` (~11
//! instructions), and decrypting one value made three of them (the backend's key state, the
//! key-use flags, the tenant setting's record: issue 15, docs/benchmarks.md). State that only
//! that thread touches lives in a [`MainThread`] static instead, used exactly as a thread-local
//! (`X.with(|v| ..)`, with the same `Cell`/`RefCell` inside).
//!
//! The one other thread a backend starts (`backend::interruptible`, the key-provider call) runs
//! provider code only: it never reaches these statics (pgrx also refuses PostgreSQL calls from
//! it). Debug builds assert the thread on every access.

/// A value only the backend's main thread uses.
pub struct MainThread<T>(T);

// SAFETY: only the backend's main thread touches the value (see the module comment; checked in
// debug builds), so no two threads ever share it.
unsafe impl<T> Sync for MainThread<T> {}

impl<T> MainThread<T> {
    pub const fn new(value: T) -> Self {
        MainThread(value)
    }

    /// Runs `f` with the value, as `LocalKey::with` does.
    #[inline(always)]
    pub fn with<R>(&'static self, f: impl FnOnce(&T) -> R) -> R {
        debug_assert!(on_main_thread(), "pg_envelope: backend state used off the backend's thread");
        f(&self.0)
    }
}

/// Whether this is the process's main thread (its thread id is the process id).
fn on_main_thread() -> bool {
    #[cfg(target_os = "linux")]
    // SAFETY: plain system calls without arguments.
    return unsafe { libc::gettid() == libc::getpid() };
    #[cfg(not(target_os = "linux"))]
    true
}
