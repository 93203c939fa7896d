//! Field encryption under one data key (DEK): XAES-256-GCM with cached derived keys.
//!
//! XAES-256-GCM (C2SP, <https://c2sp.org/XAES-256-GCM>) takes a 192-bit nonce `N`, derives a
//! per-nonce AES-256-GCM key from the DEK and `N[0..12]` (NIST SP 800-108r1 counter-mode KDF with
//! AES-256 as the PRF, two AES block operations), then runs AES-256-GCM with nonce `N[12..24]`.
//! Random 192-bit nonces make nonce reuse a non-issue for any realistic volume per DEK.
//!
//! This module produces standard XAES-256-GCM output, with one deliberate choice about how nonces
//! are drawn: each backend picks a random 96-bit *prefix* `N[0..12]` per DEK and reuses it (and
//! the derived AES-GCM key schedule) for up to [`PREFIX_USE_LIMIT`] messages, each with a fresh
//! random 96-bit suffix `N[12..24]`. So:
//!
//! * every derived key sees at most 2^32 random 96-bit nonces, which is NIST SP 800-38D's bound
//!   for random nonces (collision probability below 2^-32); the count is exact because only this
//!   backend knows the prefix;
//! * prefixes are 96-bit random values, so distinct backends (or a backend after rollover) get
//!   distinct derived keys with overwhelming probability (2^-32 after 2^32 prefixes);
//! * the hot path costs one AES-256-GCM operation with a cached key schedule, no per-row key
//!   derivation; decryption caches derived keys by prefix, so rows written by the same backend
//!   share one derivation.
//!
//! Key commitment: the header carries `HMAC-SHA-256(DEK, "pg_envelope/v1/key-commitment")`,
//! computed once per DEK. Decryption refuses an envelope whose commitment does not match the DEK
//! before touching GCM, so one ciphertext cannot decrypt under two keys (GCM alone is not
//! committing). The per-message key is a deterministic function of the DEK and the nonce, so
//! committing to the DEK commits the message key too.

use rustc_hash::FxHashMap as HashMap;

use aes::Aes256;
use aes_gcm::aead::{inout::InOutBuf, AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use aes::cipher::BlockCipherEncrypt;
use hmac::{Hmac, Mac};
use rand_core::{CryptoRng, RngCore};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use crate::envelope::{self, Envelope, COMMITMENT_LEN, HEADER_LEN, NONCE_LEN, TAG_LEN};
use crate::secret::SecretKey;
use crate::secure::SecureBox;

/// Messages encrypted under one derived key before the backend draws a new prefix: 2^32.
pub const PREFIX_USE_LIMIT: u64 = 1 << 32;
/// Derived keys kept per DEK for decryption (rows written by distinct backends): 1,024, each
/// 624 bytes in a 1 KiB slot of the locked key pool (at most 1 MiB per data key), and each kept
/// only after a value under it authenticated. When full, one entry is evicted (an arbitrary one:
/// the prefixes are random, so is the choice); a miss costs one derivation (two AES blocks and a
/// key schedule, ~400 ns). Sized from the benchmark's 1,000-writer case (docs/benchmarks.md):
/// with 256 entries cleared when full, rows from 1,000 backends read in random order cost 1.67x
/// the one-writer decryption (CPU; 1.32x in instructions).
pub const DECRYPT_PREFIX_CACHE: usize = 1024;

const COMMITMENT_LABEL: &[u8] = b"pg_envelope/v1/key-commitment";

/// Why a decryption failed. Opaque on purpose, like `aead::Error`: wrong tenant, wrong context,
/// a tampered byte, truncation and a different key all look the same to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecryptError;

impl std::fmt::Display for DecryptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("decryption failed")
    }
}
impl std::error::Error for DecryptError {}

/// XAES-256-GCM key derivation for `key` and nonce prefix `n1`, for known-answer tests only.
#[doc(hidden)]
pub fn xaes_derive_for_test(key: &[u8; 32], n1: &[u8; 12]) -> Aes256Gcm {
    let k = DataKey::new(0, 0, &SecretKey::from_slice(key).expect("32 bytes"));
    DataKey::derive(&k.s.kdf, &k.s.k1, n1)
}

/// The 96-bit GCM nonce from a 12-byte slice (callers slice exactly 12 bytes).
pub(crate) fn nonce_of(bytes: &[u8]) -> Nonce<aes_gcm::aead::consts::U12> {
    Nonce::try_from(bytes).expect("12-byte GCM nonce")
}

/// Compares two key commitments without a data-dependent branch. The commitment is public (it
/// is in every envelope), so this is defence in depth; it folds 64-bit words rather than bytes
/// because `subtle`'s per-byte optimisation barrier cost ~10% of a short decryption.
fn commitments_equal(a: &[u8; COMMITMENT_LEN], b: &[u8; COMMITMENT_LEN]) -> bool {
    let mut diff = 0u64;
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        let x = u64::from_ne_bytes(x.try_into().expect("8 bytes"));
        let y = u64::from_ne_bytes(y.try_into().expect("8 bytes"));
        diff |= x ^ y;
    }
    bool::from(diff.ct_eq(&0))
}

struct EncryptState {
    prefix: [u8; 12],
    gcm: Aes256Gcm,
    remaining: u64,
}

/// Everything of a DEK that is key material (the KDF schedule, K1, the derived AES-GCM keys),
/// kept in the key pool: never in a core dump, wiped on drop, moved by pointer.
struct KeyState {
    kdf: Aes256,
    k1: [u8; 16],
    enc: Option<EncryptState>,
    /// Derived keys for decryption, each in its own pool slot so that the map growing or being
    /// cleared never leaves a key schedule behind in freed heap memory.
    dec: HashMap<[u8; 12], SecureBox<Aes256Gcm>>,
    aad: Vec<u8>,
    derivations: u64,
}

impl Drop for KeyState {
    fn drop(&mut self) {
        self.k1.zeroize();
        // `kdf`, `enc.gcm` and the `dec` schedules zeroize themselves on drop, and the pool
        // wipes the whole slot afterwards.
    }
}

/// One unwrapped data key, ready to encrypt and decrypt fields. Holds only expanded key
/// schedules (in the key pool, see [`crate::secure`]) and the public commitment; the raw DEK
/// bytes are wiped as soon as the schedules are built. No `Debug`, no `Clone`.
pub struct DataKey {
    tenant_key_id: u32,
    version: u32,
    commitment: [u8; COMMITMENT_LEN],
    s: SecureBox<KeyState>,
}

impl DataKey {
    pub fn new(tenant_key_id: u32, version: u32, dek: &SecretKey) -> Self {
        let raw = dek.expose();
        let kdf = Aes256::new(raw.into());
        // K1 = dbl(AES-256_K(0^128)), as in CMAC subkey generation (XAES-256-GCM step 1).
        let mut l = aes::Block::default();
        kdf.encrypt_block(&mut l);
        let mut k1 = [0u8; 16];
        let mut msb = 0u8;
        for i in (0..16).rev() {
            let next = l[i] >> 7;
            k1[i] = (l[i] << 1) | msb;
            msb = next;
        }
        k1[15] ^= msb * 0b1000_0111;
        l.as_mut_slice().zeroize();

        let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(raw).expect("HMAC takes any key length");
        mac.update(COMMITMENT_LABEL);
        let commitment: [u8; COMMITMENT_LEN] = mac.finalize().into_bytes().into();

        let s = SecureBox::new(KeyState {
            kdf,
            k1,
            enc: None,
            dec: HashMap::default(),
            aad: Vec::with_capacity(HEADER_LEN + 64),
            derivations: 0,
        });
        k1.zeroize();
        DataKey { tenant_key_id, version, commitment, s }
    }

    pub fn tenant_key_id(&self) -> u32 {
        self.tenant_key_id
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    /// The public key commitment (also usable as a key check value for this DEK).
    pub fn commitment(&self) -> &[u8; COMMITMENT_LEN] {
        &self.commitment
    }
    /// Per-nonce-prefix key derivations this DEK has performed (encrypt rollovers and decrypt
    /// cache misses). Exposed for tests and benchmarks.
    pub fn derivations(&self) -> u64 {
        self.s.derivations
    }

    /// XAES-256-GCM key derivation for nonce prefix `n1` (C2SP XAES-256-GCM, steps 2-3).
    fn derive(kdf: &Aes256, k1: &[u8; 16], n1: &[u8; 12]) -> Aes256Gcm {
        let mut key = [0u8; 32];
        for (half, counter) in [(0usize, 1u8), (16, 2)] {
            let mut m = [0u8; 16];
            m[..4].copy_from_slice(&[0, counter, b'X', 0]);
            m[4..].copy_from_slice(n1);
            for i in 0..16 {
                m[i] ^= k1[i];
            }
            let block: &mut aes::Block = (&mut m).into();
            kdf.encrypt_block(block);
            key[half..half + 16].copy_from_slice(&m);
            m.zeroize();
        }
        let gcm = Aes256Gcm::new((&key).into());
        key.zeroize();
        gcm
    }

    /// Encrypts `plaintext` into `out`, which must be exactly
    /// [`envelope::envelope_len`]`(plaintext.len())` bytes long.
    #[inline(always)]
    pub fn encrypt_into<R: RngCore + CryptoRng>(
        &mut self,
        rng: &mut R,
        tenant: &str,
        context: Option<&[u8]>,
        plaintext: &[u8],
        out: &mut [u8],
    ) {
        self.encrypt_parts_into(rng, tenant, context, [plaintext], out)
    }

    /// Encrypts the concatenation of `parts` into `out` (exactly [`envelope::envelope_len`] of
    /// their total length), without a buffer for the concatenation: the parts are copied into
    /// the envelope's body and encrypted there in place (one part is encrypted from where it
    /// is). `encrypted_jsonb` seals its marker and the document this way.
    pub fn encrypt_parts_into<R: RngCore + CryptoRng, const N: usize>(
        &mut self,
        rng: &mut R,
        tenant: &str,
        context: Option<&[u8]>,
        parts: [&[u8]; N],
        out: &mut [u8],
    ) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        assert_eq!(out.len(), envelope::envelope_len(len), "output buffer length");
        let st: &mut KeyState = &mut self.s;
        let state = match &mut st.enc {
            Some(s) if s.remaining > 0 => s,
            slot => {
                let mut prefix = [0u8; 12];
                rng.fill_bytes(&mut prefix);
                let gcm = Self::derive(&st.kdf, &st.k1, &prefix);
                st.derivations += 1;
                slot.insert(EncryptState { prefix, gcm, remaining: PREFIX_USE_LIMIT })
            }
        };
        state.remaining -= 1;

        let (header, rest) = out.split_at_mut(HEADER_LEN);
        let (nonce, rest) = rest.split_at_mut(NONCE_LEN);
        let (body, tag_out) = rest.split_at_mut(len);
        envelope::write_header(header, self.tenant_key_id, self.version, &self.commitment);
        nonce[..12].copy_from_slice(&state.prefix);
        rng.fill_bytes(&mut nonce[12..]);
        let aad = envelope::build_aad(&mut st.aad, &header[..envelope::AAD_HEADER_LEN_V2], tenant, context);
        let buf = match parts.as_slice() {
            [one] => InOutBuf::new(one, body).expect("equal lengths"),
            _ => {
                let mut at = 0;
                for p in parts {
                    body[at..at + p.len()].copy_from_slice(p);
                    at += p.len();
                }
                InOutBuf::from(body)
            }
        };
        let tag = state
            .gcm
            .encrypt_inout_detached(&nonce_of(&nonce[12..]), aad, buf)
            .expect("plaintext below the GCM length limit");
        tag_out.copy_from_slice(&tag);
    }

    /// Convenience wrapper around [`DataKey::encrypt_into`].
    pub fn encrypt<R: RngCore + CryptoRng>(
        &mut self,
        rng: &mut R,
        tenant: &str,
        context: Option<&[u8]>,
        plaintext: &[u8],
    ) -> Vec<u8> {
        let mut out = vec![0u8; envelope::envelope_len(plaintext.len())];
        self.encrypt_into(rng, tenant, context, plaintext, &mut out);
        out
    }

    /// Authenticates and decrypts `env` into `out` (exactly `env.plaintext_len()` bytes).
    /// On any failure `out` is zeroed and the error is opaque.
    ///
    /// `#[inline]` so that it (and aes-gcm's generic CTR and GHASH code under it) is compiled in
    /// the calling crate, as `encrypt_into` (generic) is: compiled in this crate, the same
    /// aes-gcm code came out ~840 instructions slower per 1 KiB value and ~140 per short one
    /// under callgrind (issue 15; docs/benchmarks.md, 2026-12-06).
    #[inline]
    pub fn decrypt_into(
        &mut self,
        tenant: &str,
        context: Option<&[u8]>,
        env: &Envelope<'_>,
        out: &mut [u8],
    ) -> Result<(), DecryptError> {
        if out.len() != env.plaintext_len()
            || env.tenant_key_id != self.tenant_key_id
            || env.dek_version != self.version
            || !commitments_equal(env.commitment, &self.commitment)
        {
            out.zeroize();
            return Err(DecryptError);
        }
        let prefix: &[u8; 12] = env.nonce[..12].try_into().map_err(|_| DecryptError)?;
        let st: &mut KeyState = &mut self.s;
        let aad = envelope::build_aad(&mut st.aad, env.aad_header(), tenant, context);
        let nonce = nonce_of(&env.nonce[12..]);
        let tag = Tag::from(*env.tag);
        debug_assert_eq!(env.tag.len(), TAG_LEN);
        // One call site of the decryption, whichever key it uses.
        let mut fresh: Option<SecureBox<Aes256Gcm>> = None;
        let gcm: &Aes256Gcm = match &st.enc {
            Some(s) if &s.prefix == prefix => &s.gcm,
            _ => match st.dec.get(prefix) {
                Some(gcm) => gcm,
                None => {
                    // A writer not seen yet: derive its key, and keep it only once a value
                    // under it has authenticated, so forged envelopes (any prefix passes the
                    // public commitment check) cannot evict real writers' keys or fill the
                    // locked pool.
                    st.derivations += 1;
                    fresh.insert(SecureBox::new(Self::derive(&st.kdf, &st.k1, prefix)))
                }
            },
        };
        let r = match InOutBuf::new(env.ciphertext, &mut *out) {
            Ok(buf) => gcm.decrypt_inout_detached(&nonce, aad, buf, &tag).map_err(|_| DecryptError),
            Err(_) => Err(DecryptError),
        };
        if let (Some(gcm), true) = (fresh, r.is_ok()) {
            if st.dec.len() >= DECRYPT_PREFIX_CACHE {
                if let Some(victim) = st.dec.keys().next().copied() {
                    st.dec.remove(&victim); // SecureBox wipes the key schedule
                }
            }
            st.dec.insert(*prefix, gcm);
        }
        if r.is_err() {
            out.zeroize();
        }
        r
    }

    /// Convenience wrapper: parse, then [`DataKey::decrypt_into`].
    pub fn decrypt(
        &mut self,
        tenant: &str,
        context: Option<&[u8]>,
        envelope_bytes: &[u8],
    ) -> Result<Vec<u8>, DecryptError> {
        let env = Envelope::parse(envelope_bytes).map_err(|_| DecryptError)?;
        let mut out = vec![0u8; env.plaintext_len()];
        self.decrypt_into(tenant, context, &env, &mut out)?;
        Ok(out)
    }

    #[cfg(test)]
    pub(crate) fn exhaust_prefix_for_test(&mut self) {
        if let Some(s) = &mut self.s.enc {
            s.remaining = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::BackendRng;

    #[test]
    fn commitment_comparison_sees_every_bit() {
        let a = [0x5au8; COMMITMENT_LEN];
        assert!(commitments_equal(&a, &a));
        for bit in 0..COMMITMENT_LEN * 8 {
            let mut b = a;
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(!commitments_equal(&a, &b), "bit {bit}");
        }
    }

    fn key(b: u8) -> SecretKey {
        SecretKey::from_slice(&[b; 32]).unwrap()
    }

    #[test]
    fn round_trip_with_and_without_context() {
        let mut rng = BackendRng::new();
        let mut k = DataKey::new(7, 1, &key(1));
        let e = k.encrypt(&mut rng, "acme", None, b"hello");
        assert_eq!(k.decrypt("acme", None, &e).unwrap(), b"hello");
        let e = k.encrypt(&mut rng, "acme", Some(b"users.email"), b"hello");
        assert_eq!(k.decrypt("acme", Some(b"users.email"), &e).unwrap(), b"hello");
        assert_eq!(k.decrypt("acme", None, &e), Err(DecryptError));
        assert_eq!(k.decrypt("acme", Some(b"users.ssn"), &e), Err(DecryptError));
        assert_eq!(k.decrypt("globex", Some(b"users.email"), &e), Err(DecryptError));
    }

    /// Values from more writers (nonce prefixes) than the cache holds: every one decrypts, the
    /// cache stays at its bound, and a full cache evicts one entry per miss instead of emptying
    /// itself (rereading the most recent writers costs no derivation).
    #[test]
    fn decrypt_prefix_cache_is_bounded_and_evicts_one_entry() {
        let mut rng = BackendRng::new();
        let k1 = key(9);
        let writers = DECRYPT_PREFIX_CACHE + 200;
        let values: Vec<Vec<u8>> = (0..writers)
            .map(|i| DataKey::new(1, 1, &k1).encrypt(&mut rng, "t", None, format!("v{i}").as_bytes()))
            .collect();
        let mut reader = DataKey::new(1, 1, &k1);
        for (i, v) in values.iter().enumerate() {
            assert_eq!(reader.decrypt("t", None, v).unwrap(), format!("v{i}").as_bytes());
        }
        assert_eq!(reader.s.dec.len(), DECRYPT_PREFIX_CACHE);
        assert_eq!(reader.derivations(), writers as u64);
        // The last writer's key is still cached: no new derivation.
        reader.decrypt("t", None, values.last().unwrap()).unwrap();
        assert_eq!(reader.derivations(), writers as u64);
        // Of the last 100 writers, most are still cached (a clear-all would keep none of
        // those written before the last clear).
        let before = reader.derivations();
        for v in &values[writers - 100..] {
            reader.decrypt("t", None, v).unwrap();
        }
        assert!(reader.derivations() - before < 50, "{} derivations", reader.derivations() - before);
        // A forged value (a genuine one with another nonce prefix: it passes the public
        // commitment check) is refused and its derived key is not kept.
        let cached: Vec<[u8; 12]> = reader.s.dec.keys().copied().collect();
        for i in 0..300u32 {
            let mut forged = values[0].clone();
            forged[42..46].copy_from_slice(&i.to_be_bytes());
            forged[46] ^= 0x5a;
            assert!(reader.decrypt("t", None, &forged).is_err());
        }
        let mut after: Vec<[u8; 12]> = reader.s.dec.keys().copied().collect();
        let mut before_keys = cached.clone();
        after.sort();
        before_keys.sort();
        assert_eq!(after, before_keys, "forged prefixes neither added nor evicted anything");
    }

    #[test]
    fn prefix_is_reused_until_the_limit_then_rolls_over() {
        let mut rng = BackendRng::new();
        let mut k = DataKey::new(1, 1, &key(2));
        let a = k.encrypt(&mut rng, "t", None, b"x");
        let b = k.encrypt(&mut rng, "t", None, b"x");
        assert_eq!(a[42..54], b[42..54], "same backend, same prefix");
        assert_ne!(a[54..66], b[54..66], "fresh suffix per message");
        assert_eq!(k.derivations(), 1);
        k.exhaust_prefix_for_test();
        let c = k.encrypt(&mut rng, "t", None, b"x");
        assert_ne!(a[42..54], c[42..54], "new prefix after the use limit");
        assert_eq!(k.derivations(), 2);
        // All three still decrypt (the old prefix is derived again on demand).
        let mut other = DataKey::new(1, 1, &key(2));
        for e in [&a, &b, &c] {
            assert_eq!(other.decrypt("t", None, e).unwrap(), b"x");
        }
        assert_eq!(other.derivations(), 2);
    }

    #[test]
    fn output_is_standard_xaes_256_gcm() {
        use xaes_256_gcm::aead::{Aead, Payload};
        use xaes_256_gcm::Xaes256Gcm;
        let mut rng = BackendRng::new();
        let mut k = DataKey::new(3, 9, &key(5));
        let e = k.encrypt(&mut rng, "acme", Some(b"ctx"), b"interop");
        let env = Envelope::parse(&e).unwrap();
        let mut aad = Vec::new();
        let aad = envelope::build_aad(&mut aad, env.aad_header(), "acme", Some(b"ctx")).to_vec();
        let reference = Xaes256Gcm::new((&[5u8; 32]).into());
        let mut ct = env.ciphertext.to_vec();
        ct.extend_from_slice(env.tag);
        let pt = reference
            .decrypt(&xaes_256_gcm::Nonce::from(*env.nonce), Payload { msg: &ct, aad: &aad })
            .unwrap();
        assert_eq!(pt, b"interop");
    }

    /// Parts sealed in the envelope itself give exactly the envelope of their concatenation
    /// (same key, same random stream), which the reference XAES-256-GCM opens; one part, and
    /// three with an empty one, too.
    #[test]
    fn parts_seal_the_concatenation() {
        use rand_chacha::rand_core::SeedableRng;
        let joined = |parts: &[&[u8]]| parts.concat();
        let cases: [&[&[u8]]; 3] = [&[b"\x00\x01", b"{\"a\": 1}"], &[b"one part"], &[b"ab", b"", b"cd"]];
        for parts in cases {
            let seal = |f: &dyn Fn(&mut DataKey, &mut rand_chacha::ChaCha20Rng, &mut [u8])| {
                let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(11);
                let mut k = DataKey::new(3, 9, &key(5));
                let mut out = vec![0xEEu8; envelope::envelope_len(joined(parts).len())];
                f(&mut k, &mut rng, &mut out);
                out
            };
            let whole = seal(&|k, rng, out| k.encrypt_into(rng, "acme", Some(b"ctx"), &joined(parts), out));
            let split = match parts.len() {
                1 => seal(&|k, rng, out| k.encrypt_parts_into(rng, "acme", Some(b"ctx"), [parts[0]], out)),
                2 => seal(&|k, rng, out| k.encrypt_parts_into(rng, "acme", Some(b"ctx"), [parts[0], parts[1]], out)),
                _ => seal(&|k, rng, out| k.encrypt_parts_into(rng, "acme", Some(b"ctx"), [parts[0], parts[1], parts[2]], out)),
            };
            assert_eq!(split, whole, "{parts:?}");
            let mut k = DataKey::new(3, 9, &key(5));
            assert_eq!(k.decrypt("acme", Some(b"ctx"), &split).unwrap(), joined(parts));
        }
    }

    #[test]
    fn commitment_binds_the_key() {
        let mut rng = BackendRng::new();
        let mut a = DataKey::new(1, 1, &key(1));
        let mut b = DataKey::new(1, 1, &key(2));
        assert_ne!(a.commitment(), b.commitment());
        let e = a.encrypt(&mut rng, "t", None, b"secret");
        assert_eq!(b.decrypt("t", None, &e), Err(DecryptError));
    }

    #[test]
    fn failed_decrypt_leaves_no_plaintext_in_the_buffer() {
        let mut rng = BackendRng::new();
        let mut k = DataKey::new(1, 1, &key(1));
        let mut e = k.encrypt(&mut rng, "t", None, b"canary-canary");
        let last = e.len() - 1;
        e[last] ^= 1;
        let env = Envelope::parse(&e).unwrap();
        let mut out = vec![0xEEu8; env.plaintext_len()];
        assert!(k.decrypt_into("t", None, &env, &mut out).is_err());
        assert!(out.iter().all(|&b| b == 0));
    }
}

