//! Where key material lives: a small pool of pages that are excluded from core dumps
//! (`MADV_DONTDUMP`), locked in RAM where `RLIMIT_MEMLOCK` allows (`mlock`), and wiped when a
//! value is dropped; and a stack wipe for the frames that built keys.
//!
//! Every value holding key bytes or an expanded key schedule ([`crate::SecretKey`], the
//! per-DEK state of [`crate::DataKey`] and its derived AES-GCM keys) is a [`SecureBox`]: moving
//! it moves a pointer, so no move leaves a copy of a key behind in the heap, and freeing a slot
//! zeroes it. Building a key schedule still happens in stack frames (Rust returns values through
//! the stack); those frames are wiped by [`wipe_stack`] after key work: the key-provider helper
//! thread wipes its own stack before it exits (glibc caches thread stacks for reuse), and the
//! SQL layer wipes the backend's stack at the end of every transaction that used keys.

use std::alloc::Layout;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Size classes of pool slots (bytes); larger values get their own mapping.
const CLASSES: [usize; 7] = [64, 128, 256, 512, 1024, 2048, 4096];
/// Pages are mapped this many bytes at a time.
const CHUNK: usize = 64 * 1024;

struct Pool {
    /// Current chunk being carved: (base, used bytes).
    current: Option<(usize, usize)>,
    free: [Vec<usize>; CLASSES.len()],
    /// Every chunk mapped (they are never unmapped), for [`wipe_pool`].
    chunks: Vec<usize>,
    /// Values too large for a class, each in a mapping of its own: (base, length).
    large: Vec<(usize, usize)>,
}

static POOL: Mutex<Pool> =
    Mutex::new(Pool { current: None, free: [const { Vec::new() }; CLASSES.len()], chunks: Vec::new(), large: Vec::new() });

static MAPPED_BYTES: AtomicU64 = AtomicU64::new(0);
static LOCKED_BYTES: AtomicU64 = AtomicU64::new(0);
static LIVE_VALUES: AtomicU64 = AtomicU64::new(0);

/// Facts about the pool, for `envelope.status()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes mapped for key material (all excluded from core dumps).
    pub mapped_bytes: u64,
    /// Of those, bytes locked in RAM (`mlock`); less than mapped when RLIMIT_MEMLOCK is small.
    pub locked_bytes: u64,
    /// Key-holding values alive now.
    pub live_values: u64,
}

pub fn pool_stats() -> PoolStats {
    PoolStats {
        mapped_bytes: MAPPED_BYTES.load(Ordering::Relaxed),
        locked_bytes: LOCKED_BYTES.load(Ordering::Relaxed),
        live_values: LIVE_VALUES.load(Ordering::Relaxed),
    }
}

/// Maps `len` bytes (a multiple of the page size) for key material. Panics only if the
/// operating system refuses anonymous memory altogether.
fn map(len: usize) -> usize {
    // SAFETY: an anonymous private mapping; the result is checked.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            panic!("pg_envelope: cannot map memory for key material");
        }
        // Never in a core dump. Best effort: on kernels without MADV_DONTDUMP it fails and the
        // pages are still wiped on drop.
        #[cfg(target_os = "linux")]
        libc::madvise(p, len, libc::MADV_DONTDUMP);
        // Never in swap, where RLIMIT_MEMLOCK allows; a clean fallback when it does not.
        if libc::mlock(p, len) == 0 {
            LOCKED_BYTES.fetch_add(len as u64, Ordering::Relaxed);
        }
        MAPPED_BYTES.fetch_add(len as u64, Ordering::Relaxed);
        p as usize
    }
}

fn class_of(layout: Layout) -> Option<usize> {
    let need = layout.size().max(layout.align()).max(1);
    CLASSES.iter().position(|&c| c >= need)
}

fn page_round(n: usize) -> usize {
    n.div_ceil(4096) * 4096
}

fn alloc(layout: Layout) -> NonNull<u8> {
    let Some(class) = class_of(layout) else {
        let len = page_round(layout.size());
        let base = map(len);
        POOL.lock().unwrap_or_else(|e| e.into_inner()).large.push((base, len));
        return NonNull::new(base as *mut u8).expect("mapped");
    };
    let size = CLASSES[class];
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = pool.free[class].pop() {
        return NonNull::new(p as *mut u8).expect("pool slot");
    }
    let (base, used) = match pool.current {
        Some((base, used)) if used.next_multiple_of(size) + size <= CHUNK => (base, used.next_multiple_of(size)),
        _ => {
            let base = map(CHUNK);
            pool.chunks.push(base);
            (base, 0)
        }
    };
    pool.current = Some((base, used + size));
    NonNull::new((base + used) as *mut u8).expect("pool slot")
}

/// Returns a slot (already wiped by the caller) to the pool.
fn free(p: NonNull<u8>, layout: Layout) {
    match class_of(layout) {
        Some(class) => {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            pool.free[class].push(p.as_ptr() as usize);
        }
        None => {
            let len = page_round(layout.size());
            let base = p.as_ptr() as usize;
            POOL.lock().unwrap_or_else(|e| e.into_inner()).large.retain(|&(b, _)| b != base);
            // SAFETY: a mapping of exactly this length made by `map`.
            unsafe { libc::munmap(p.as_ptr().cast(), len) };
            MAPPED_BYTES.fetch_sub(len as u64, Ordering::Relaxed);
        }
    }
}

/// Zeroes every byte of the pool, live values included: for a process about to exit, whose
/// values may still be held by frames that will never drop them (an exit from inside a
/// borrow). Nothing may use a pool value afterwards (it would read zeros).
pub fn wipe_pool() {
    let pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    for &base in &pool.chunks {
        wipe_bytes(base as *mut u8, CHUNK);
    }
    for &(base, len) in &pool.large {
        wipe_bytes(base as *mut u8, len);
    }
}

/// Overwrites `len` bytes at `p` with zeros in a way the compiler may not elide.
fn wipe_bytes(p: *mut u8, len: usize) {
    // SAFETY: callers pass a live allocation of at least `len` bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(p, len) };
    zeroize::Zeroize::zeroize(bytes);
}

/// A value in the key pool: never in a core dump, locked in RAM where allowed, wiped on drop,
/// moved by pointer. Deliberately no `Debug`, `Clone` or `Display`.
pub struct SecureBox<T> {
    ptr: NonNull<T>,
    _owns: PhantomData<T>,
}

// SAFETY: a SecureBox owns its T like a Box does.
unsafe impl<T: Send> Send for SecureBox<T> {}
unsafe impl<T: Sync> Sync for SecureBox<T> {}

impl<T> SecureBox<T> {
    /// Moves `value` into the pool. The caller's copy is whatever the compiler left in its
    /// stack frame: wipe the stack after building keys ([`wipe_stack`]).
    pub fn new(value: T) -> Self {
        let layout = Layout::new::<T>();
        let p = alloc(layout).cast::<T>();
        // SAFETY: a fresh, suitably aligned slot of at least size_of::<T>() bytes.
        unsafe { p.as_ptr().write(value) };
        LIVE_VALUES.fetch_add(1, Ordering::Relaxed);
        SecureBox { ptr: p, _owns: PhantomData }
    }
}

impl<const N: usize> SecureBox<[u8; N]> {
    /// A zeroed byte array filled in place by `fill`, so the bytes exist only in the pool.
    pub fn filled_with<E>(fill: impl FnOnce(&mut [u8; N]) -> Result<(), E>) -> Result<Self, E> {
        let mut b = SecureBox::new([0u8; N]);
        fill(&mut b)?;
        Ok(b)
    }
}

impl<T> Deref for SecureBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: initialised in `new`, alive until drop.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for SecureBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as above; &mut self gives exclusive access.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for SecureBox<T> {
    fn drop(&mut self) {
        let layout = Layout::new::<T>();
        // SAFETY: the value is initialised and dropped exactly once; then its bytes are wiped
        // (also whatever its own Drop did not zeroize: padding, plain fields) and the slot freed.
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
            wipe_bytes(self.ptr.as_ptr().cast(), layout.size());
        }
        LIVE_VALUES.fetch_sub(1, Ordering::Relaxed);
        free(self.ptr.cast(), layout);
    }
}

/// Runs `f` in a frame of its own, then wipes the stack below the caller (and the vector
/// registers). `f` must not be inlined into the caller: its locals (a key schedule built by value,
/// a key read from a file) would then live in the caller's frame, above the wiped area.
pub fn run_then_wipe<R>(f: impl FnOnce() -> R) -> R {
    #[inline(never)]
    fn call<R>(f: impl FnOnce() -> R) -> R {
        std::hint::black_box(f())
    }
    let r = call(f);
    wipe_stack();
    r
}

/// Bytes [`wipe_stack`] clears below the caller's frame.
pub const STACK_WIPE_BYTES: usize = 128 * 1024;

/// Zeroes [`STACK_WIPE_BYTES`] of stack below the caller: the frames of functions it called
/// before (key schedules built and returned by value, keys read from files or KMS answers) are
/// overwritten. Like libsodium's `sodium_stackzero`. Call it from a frame at or above the ones
/// that handled keys; costs a few microseconds.
#[inline(never)]
pub fn wipe_stack() {
    wipe_stack_n::<STACK_WIPE_BYTES>();
    wipe_vector_registers();
}

/// Zeroes the SIMD registers of the calling thread. AES-NI and CLMUL code keeps round keys and
/// the GHASH key in them, and nothing else may overwrite all of them for a long time (an idle
/// backend's registers end up in a core dump's thread notes). The registers are caller-saved in
/// the C ABI, so declaring them clobbered is all the compiler needs.
#[inline(never)]
pub fn wipe_vector_registers() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: only clobbers caller-saved registers, declared as such.
    unsafe {
        if std::arch::is_x86_feature_detected!("avx") {
            std::arch::asm!("vzeroall", clobber_abi("C"), options(nostack, preserves_flags));
            // vzeroall leaves the AVX-512 registers 16-31 alone, and AES code built for VAES or
            // AVX-512 keeps round keys there. (Found on a machine with AVX-512:
            // test_key_memory.py saw a derived key's round keys in the signal frame the kernel
            // saved on an idle backend's stack.)
            if std::arch::is_x86_feature_detected!("avx512f") {
                wipe_avx512_upper();
            }
        } else {
            std::arch::asm!(
                "xorps xmm0, xmm0", "xorps xmm1, xmm1", "xorps xmm2, xmm2", "xorps xmm3, xmm3",
                "xorps xmm4, xmm4", "xorps xmm5, xmm5", "xorps xmm6, xmm6", "xorps xmm7, xmm7",
                "xorps xmm8, xmm8", "xorps xmm9, xmm9", "xorps xmm10, xmm10", "xorps xmm11, xmm11",
                "xorps xmm12, xmm12", "xorps xmm13, xmm13", "xorps xmm14, xmm14", "xorps xmm15, xmm15",
                clobber_abi("C"),
                options(nostack, preserves_flags)
            );
        }
    }
}

/// Zeroes zmm16-zmm31 (callers check that the CPU has AVX-512F).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline(never)]
unsafe fn wipe_avx512_upper() {
    // SAFETY: only writes registers, declared as outputs.
    unsafe {
        std::arch::asm!(
            "vpxord zmm16, zmm16, zmm16", "vpxord zmm17, zmm17, zmm17", "vpxord zmm18, zmm18, zmm18", "vpxord zmm19, zmm19, zmm19",
            "vpxord zmm20, zmm20, zmm20", "vpxord zmm21, zmm21, zmm21", "vpxord zmm22, zmm22, zmm22", "vpxord zmm23, zmm23, zmm23",
            "vpxord zmm24, zmm24, zmm24", "vpxord zmm25, zmm25, zmm25", "vpxord zmm26, zmm26, zmm26", "vpxord zmm27, zmm27, zmm27",
            "vpxord zmm28, zmm28, zmm28", "vpxord zmm29, zmm29, zmm29", "vpxord zmm30, zmm30, zmm30", "vpxord zmm31, zmm31, zmm31",
            out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _, out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
            out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _, out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
            options(nostack, preserves_flags)
        );
    }
}

/// The stack pointer (an address in the caller's frame where the architecture has no
/// instruction for it): what [`wipe_stack_below`] is told of the deepest key use.
#[inline(always)]
pub fn stack_pointer() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        let sp: usize;
        // SAFETY: reads a register.
        unsafe { std::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags)) };
        sp
    }
    #[cfg(target_arch = "aarch64")]
    {
        let sp: usize;
        // SAFETY: reads a register.
        unsafe { std::arch::asm!("mov {}, sp", out(reg) sp, options(nomem, nostack, preserves_flags)) };
        sp
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let here = 0u8;
        std::hint::black_box(&here) as *const u8 as usize
    }
}

/// Most bytes [`wipe_stack_below`] clears when the stack's size is unlimited, or when
/// `RLIMIT_STACK` cannot be read: PostgreSQL keeps its own depth under `max_stack_depth`, at most
/// the stack's limit less 512 kB, and a superuser may raise it to anything under an unlimited
/// stack (insider review 67: a key used 77 MB down with `max_stack_depth = 200MB`).
pub const STACK_WIPE_MAX: usize = 64 * 1024 * 1024;

/// The stack's size limit (`RLIMIT_STACK`), or `None` when it is unlimited or unknown.
fn stack_limit() -> Option<usize> {
    // SAFETY: a valid rlimit pointer.
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    if unsafe { libc::getrlimit(libc::RLIMIT_STACK, &mut rl) } != 0 || rl.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    usize::try_from(rl.rlim_cur).ok()
}

/// [`wipe_stack`] down to [`STACK_WIPE_BYTES`] below `deepest` (a [`stack_pointer`] read at the
/// deepest point that used keys), or below the caller if that is deeper: key material left by
/// frames far below the caller (a decryption inside a deeply recursive function) is
/// overwritten too. `deepest` must be an address this thread's stack reached (`usize::MAX`:
/// none), so the pages down there exist and the area stays within the stack's limit.
#[inline(never)]
pub fn wipe_stack_below(deepest: usize) {
    let extra = stack_pointer().saturating_sub(deepest);
    // Within the stack's limit (the pages down to `deepest` exist: the thread reached it), or
    // as deep as the key use itself when the stack is unlimited.
    let cap = match stack_limit() {
        Some(limit) => limit,
        None => STACK_WIPE_MAX.max(extra + STACK_WIPE_BYTES),
    };
    wipe_stack_chunks((extra + STACK_WIPE_BYTES).min(cap));
    wipe_vector_registers();
}

/// Zeroes `bytes` (rounded up to whole chunks) below the caller, one 64 KiB frame at a time.
#[inline(never)]
fn wipe_stack_chunks(bytes: usize) {
    const CHUNK: usize = 64 * 1024;
    let mut area = std::mem::MaybeUninit::<[u8; CHUNK]>::uninit();
    // SAFETY: writes CHUNK bytes into a CHUNK-byte local.
    unsafe { std::ptr::write_bytes(area.as_mut_ptr().cast::<u8>(), 0, CHUNK) };
    std::hint::black_box(&mut area);
    if bytes > CHUNK {
        wipe_stack_chunks(bytes - CHUNK);
    }
    // Kept alive past the call above: the recursion is not a tail call, so each frame sits below
    // the last one.
    std::hint::black_box(&mut area);
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
}

#[inline(never)]
fn wipe_stack_n<const N: usize>() {
    // A plain memset (vectorized: ~3 µs for 128 KiB, where zeroize's byte-wise volatile stores
    // take ~10x longer), kept by handing the area to `black_box`, which the compiler must assume
    // reads it.
    let mut area = std::mem::MaybeUninit::<[u8; N]>::uninit();
    // SAFETY: writes N bytes into an N-byte local.
    unsafe { std::ptr::write_bytes(area.as_mut_ptr().cast::<u8>(), 0, N) };
    std::hint::black_box(&mut area);
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value planted in zmm16 (and xmm7) is gone after `wipe_vector_registers`, on a CPU
    /// with AVX-512 (the test says so and passes trivially elsewhere).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn wipe_vector_registers_clears_the_avx512_upper_registers() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512 on this CPU: nothing to check");
            return;
        }
        #[target_feature(enable = "avx512f")]
        #[inline(never)]
        unsafe fn plant(p: *const u8) {
            // SAFETY: loads 64 readable bytes into zmm16.
            unsafe { std::arch::asm!("vmovdqu64 zmm16, [{p}]", p = in(reg) p, out("zmm16") _, options(nostack)) };
        }
        #[target_feature(enable = "avx512f")]
        #[inline(never)]
        unsafe fn read(p: *mut u8) {
            // SAFETY: stores zmm16 into 64 writable bytes.
            unsafe { std::arch::asm!("vmovdqu64 [{p}], zmm16", p = in(reg) p, options(nostack)) };
        }
        let pattern = vec![0x5au8; 64];
        let mut out = vec![0u8; 64];
        // SAFETY: the CPU has AVX-512F (checked above); the buffers hold 64 bytes.
        unsafe {
            plant(pattern.as_ptr());
            read(out.as_mut_ptr());
            assert_eq!(out, pattern, "the plant must be visible (nothing else used zmm16)");
            plant(pattern.as_ptr());
            wipe_vector_registers();
            read(out.as_mut_ptr());
        }
        assert_eq!(out, vec![0u8; 64]);
    }

    #[test]
    fn values_round_trip_and_slots_are_wiped_and_reused() {
        // A size class (2048) no other test uses: tests run on parallel threads sharing the
        // process-wide pool, and a key allocated by another test could take a freed 64-byte slot
        // between the drop and the check (a flaky failure seen in CI).
        let a = SecureBox::new([0xA5u8; 1500]);
        assert_eq!(a[0], 0xA5);
        let p = &*a as *const [u8; 1500] as usize;
        drop(a);
        // The freed slot holds none of the old value (it stays mapped: the pool never unmaps
        // small slots). Another test's thread may already have taken the slot and written its
        // own value, so the check is "no run of the old bytes", not "all zeros".
        let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, 1500) };
        assert!(!bytes.windows(16).any(|w| w.iter().all(|&b| b == 0xA5)), "slot not wiped");
        // And a free slot is reused for values of the same class: among the next few (another
        // test's thread may take a slot freed meanwhile, and put another on the free list first),
        // unless another thread took it (then it is not zeros).
        if bytes.iter().all(|&b| b == 0) {
            let mut held = Vec::new();
            let reused = (0..64).any(|_| {
                let b = SecureBox::new([1u8; 1500]);
                let q = &*b as *const [u8; 1500] as usize;
                held.push(b);
                q == p
            });
            assert!(reused || bytes.iter().any(|&x| x != 0), "a free slot of the class was not reused");
        }
    }

    #[test]
    fn large_values_get_their_own_mapping() {
        let before = pool_stats().mapped_bytes;
        let big = SecureBox::new([7u8; 10_000]);
        assert!(pool_stats().mapped_bytes >= before + 10_000);
        assert_eq!(big[9_999], 7);
        drop(big);
    }

    #[test]
    fn pool_pages_are_excluded_from_core_dumps() {
        let v = SecureBox::new([3u8; 64]);
        let addr = &*v as *const [u8; 64] as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_region = false;
        let mut found = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) {
                        in_region = lo <= addr && addr < hi;
                        continue;
                    }
                }
            }
            if in_region && line.starts_with("VmFlags:") {
                found = Some(line.split_whitespace().any(|f| f == "dd"));
            }
        }
        assert_eq!(found, Some(true), "pool page not marked MADV_DONTDUMP");
    }

    #[test]
    fn filled_with_builds_in_place() {
        let k = SecureBox::<[u8; 32]>::filled_with(|b| {
            b.fill(9);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(*k, [9u8; 32]);
    }

    #[test]
    fn stack_wipe_clears_a_dead_frame() {
        #[inline(never)]
        fn leave_secret() -> usize {
            let mut secret = [0x5Au8; 256];
            std::hint::black_box(&mut secret);
            secret.as_ptr() as usize
        }
        let addr = leave_secret();
        wipe_stack();
        // The dead frame lies below this one, inside the wiped area.
        let here = 0u8;
        let here_addr = &here as *const u8 as usize;
        assert!(addr < here_addr && here_addr - addr < STACK_WIPE_BYTES);
        let bytes: Vec<u8> = (0..256).map(|i| unsafe { std::ptr::read_volatile((addr + i) as *const u8) }).collect();
        assert!(!bytes.windows(8).any(|w| w.iter().all(|&b| b == 0x5A)), "the dead frame still holds the secret");
    }

    #[test]
    fn a_stack_wipe_reaches_a_dead_frame_far_below_the_caller() {
        // A key used 200 calls of ~2 KiB down (~400 KiB, far past STACK_WIPE_BYTES): the wipe
        // told of that depth clears it; the fixed-size wipe does not reach it.
        #[inline(never)]
        fn descend(n: usize, deepest: &mut usize) -> usize {
            let mut pad = [n as u8; 2048];
            std::hint::black_box(&mut pad);
            let addr = if n == 0 {
                let mut secret = [0xA5u8; 256];
                std::hint::black_box(&mut secret);
                *deepest = stack_pointer();
                secret.as_ptr() as usize
            } else {
                descend(n - 1, deepest)
            };
            std::hint::black_box(&mut pad);
            addr
        }
        let holds_secret = |addr: usize| {
            let bytes: Vec<u8> = (0..256).map(|i| unsafe { std::ptr::read_volatile((addr + i) as *const u8) }).collect();
            bytes.windows(8).any(|w| w.iter().all(|&b| b == 0xA5))
        };
        // Run on a thread of its own with a known, large stack.
        std::thread::Builder::new()
            .stack_size(8 << 20)
            .spawn(move || {
                let mut deepest = usize::MAX;
                let addr = descend(200, &mut deepest);
                assert!(stack_pointer() - addr > STACK_WIPE_BYTES, "the secret is not deep enough to test anything");
                wipe_stack();
                assert!(holds_secret(addr), "control: the fixed-size wipe already reached the secret");
                wipe_stack_below(deepest);
                assert!(!holds_secret(addr), "the dead frame far below still holds the secret");
                // Nothing recorded: the fixed size below the caller, as `wipe_stack`.
                wipe_stack_below(usize::MAX);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
