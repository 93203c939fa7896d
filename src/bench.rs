//! Benchmark-only SQL functions, compiled only with `--features bench-floor` (never in a
//! release build: `scripts/bench.sh` installs such a build for the run and reinstalls the normal
//! one afterwards). They give the benchmarks a floor and a CPU clock.

#[pgrx::pg_schema]
mod envelope_bench {
    use std::cell::RefCell;

    use aes_gcm::aead::{inout::InOutBuf, AeadInOut, KeyInit};
    use aes_gcm::{Aes256Gcm, Tag};
    use pg_envelope_core::BackendRng;
    use pgrx::prelude::*;
    use rand_core::RngCore;

    thread_local! {
        /// A fixed, publicly known key: this is a speed floor, not encryption.
        static FLOOR: RefCell<(Aes256Gcm, BackendRng)> =
            RefCell::new((Aes256Gcm::new((&[7u8; 32]).into()), BackendRng::new()));
    }

    /// Bare AES-256-GCM with a cached key and an in-process nonce, authenticating `aad`:
    /// nonce || ciphertext || tag. Inlined into each floor, so the plain floor compiles as it did
    /// with its own body (its `aad` is a constant empty slice).
    #[inline(always)]
    fn seal(data: &[u8], aad: &[u8]) -> Vec<u8> {
        FLOOR.with(|f| {
            let (gcm, rng) = &mut *f.borrow_mut();
            let mut out = vec![0u8; 12 + data.len() + 16];
            rng.fill_bytes(&mut out[..12]);
            let (nonce, rest) = out.split_at_mut(12);
            let (body, tag_out) = rest.split_at_mut(data.len());
            let nonce = aes_gcm::Nonce::<aes_gcm::aead::consts::U12>::try_from(&nonce[..]).unwrap();
            let tag = gcm.encrypt_inout_detached(&nonce, aad, InOutBuf::new(data, body).unwrap()).unwrap();
            tag_out.copy_from_slice(&tag);
            out
        })
    }

    /// The inverse of [`seal`].
    #[inline(always)]
    fn open(data: &[u8], aad: &[u8]) -> Vec<u8> {
        FLOOR.with(|f| {
            let (gcm, _) = &*f.borrow();
            if data.len() < 28 {
                error!("too short");
            }
            let nonce = aes_gcm::Nonce::<aes_gcm::aead::consts::U12>::try_from(&data[..12]).unwrap();
            let ct = &data[12..data.len() - 16];
            let tag = Tag::try_from(&data[data.len() - 16..]).unwrap();
            let mut out = vec![0u8; ct.len()];
            gcm.decrypt_inout_detached(&nonce, aad, InOutBuf::new(ct, &mut out).unwrap(), &tag)
                .unwrap_or_else(|_| error!("floor decrypt failed"));
            out
        })
    }

    /// Bare AES-256-GCM with a cached key and an in-process nonce: nonce || ciphertext || tag.
    #[pg_extern(volatile, parallel_safe)]
    fn aes_gcm_floor(data: &[u8]) -> Vec<u8> {
        seal(data, b"")
    }

    /// The inverse of `aes_gcm_floor`.
    #[pg_extern(immutable, parallel_safe)]
    fn aes_gcm_floor_decrypt(data: &[u8]) -> Vec<u8> {
        open(data, b"")
    }

    /// Associated data as long as a v3 envelope's for an 8-byte tenant name and no context
    /// (10 header bytes, the name's 4-byte length, the name, the context flag): the floor of
    /// the format's cryptographic work, for telling the format's cost from the code's.
    #[cfg(feature = "bench-floor-aad")]
    const FORMAT_AAD: &[u8; 23] = b"\x03\x01\0\0\0\x01\0\0\0\x01\0\0\0\x08bench_t0\0";

    /// `aes_gcm_floor` authenticating [`FORMAT_AAD`] too. Only with `--features bench-floor-aad`:
    /// a second call site of aes-gcm's functions changes how `aes_gcm_floor` itself is compiled.
    #[cfg(feature = "bench-floor-aad")]
    #[pg_extern(volatile, parallel_safe)]
    fn aes_gcm_floor_aad(data: &[u8]) -> Vec<u8> {
        seal(data, FORMAT_AAD)
    }

    /// The inverse of `aes_gcm_floor_aad`.
    #[cfg(feature = "bench-floor-aad")]
    #[pg_extern(immutable, parallel_safe)]
    fn aes_gcm_floor_aad_decrypt(data: &[u8]) -> Vec<u8> {
        open(data, FORMAT_AAD)
    }

    thread_local! {
        /// HMAC-SHA-256 keyed once with a fixed, public key: the floor of a search term.
        static HMAC_FLOOR: hmac::Hmac<sha2::Sha256> =
            <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(&[9u8; 32]).unwrap();
    }

    /// A bare pre-keyed HMAC-SHA-256 of the bytes, cut to 16 bytes (what a blind-index term
    /// computes, without keys per tenant, normalisation or checks).
    #[pg_extern(immutable, parallel_safe)]
    fn hmac_floor(data: &[u8]) -> Vec<u8> {
        use hmac::Mac;
        HMAC_FLOOR.with(|h| {
            let mut m = h.clone();
            m.update(data);
            m.finalize().into_bytes()[..16].to_vec()
        })
    }

    /// This backend's user + system CPU time in nanoseconds (getrusage RUSAGE_SELF).
    #[pg_extern(volatile, parallel_unsafe)]
    fn backend_cpu_ns() -> i64 {
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let ns = |t: libc::timeval| t.tv_sec as i64 * 1_000_000_000 + t.tv_usec as i64 * 1_000;
        ns(ru.ru_utime) + ns(ru.ru_stime)
    }
}
