//! Key material.
//!
//! [`SecretKey`] follows rustls' `AeadKey`: the bytes are zeroized when the value is dropped,
//! there is no `Debug`, `Display`, `Clone` or serde implementation, and the only way to read
//! the bytes is the crate-private [`SecretKey::expose`]. Anything that would print a key fails to
//! compile instead.

use rand_core::{CryptoRng, RngCore};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::secure::SecureBox;

/// Length of every symmetric key in the hierarchy (root, tenant key, data key): 256 bits.
pub const KEY_LEN: usize = 32;

/// A 256-bit symmetric key. Zeroized on drop; cannot be printed, cloned or serialized.
pub struct SecretKey {
    bytes: SecureBox<[u8; KEY_LEN]>,
}

impl SecretKey {
    /// Takes ownership of `bytes` and zeroizes the caller's copy.
    pub fn from_bytes(bytes: &mut [u8; KEY_LEN]) -> Self {
        let key = SecretKey {
            bytes: SecureBox::filled_with(|b| {
                b.copy_from_slice(bytes);
                Ok::<(), std::convert::Infallible>(())
            })
            .unwrap_or_else(|e| match e {}),
        };
        bytes.zeroize();
        key
    }

    /// Copies a key out of a slice; `None` when the length is not [`KEY_LEN`].
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != KEY_LEN {
            return None;
        }
        let b = SecureBox::filled_with(|b| {
            b.copy_from_slice(bytes);
            Ok::<(), std::convert::Infallible>(())
        })
        .unwrap_or_else(|e| match e {});
        Some(SecretKey { bytes: b })
    }

    /// A fresh key from the operating system's CSPRNG. Keys are generated rarely (a tenant,
    /// a rotation), so they always come straight from the OS, never from a user-space generator.
    pub fn generate() -> Result<Self, getrandom::Error> {
        Ok(SecretKey { bytes: SecureBox::filled_with(|b| getrandom::fill(b))? })
    }

    /// A key from a caller-supplied CSPRNG (tests and deterministic fixtures).
    pub fn generate_with<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let bytes = SecureBox::filled_with(|b| {
            rng.fill_bytes(b);
            Ok::<(), std::convert::Infallible>(())
        })
        .unwrap_or_else(|e| match e {});
        SecretKey { bytes }
    }

    /// The raw bytes, for the AEAD and key-wrapping code in this crate and for providers.
    pub(crate) fn expose(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        // SecureBox wipes its slot too; this keeps the contract visible here.
        self.bytes.zeroize();
    }
}

impl ZeroizeOnDrop for SecretKey {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_bytes_wipes_the_source() {
        let mut raw = [7u8; KEY_LEN];
        let k = SecretKey::from_bytes(&mut raw);
        assert_eq!(raw, [0u8; KEY_LEN]);
        assert_eq!(k.expose(), &[7u8; KEY_LEN]);
    }

    #[test]
    fn from_slice_rejects_wrong_lengths() {
        assert!(SecretKey::from_slice(&[1u8; 31]).is_none());
        assert!(SecretKey::from_slice(&[1u8; 33]).is_none());
        assert!(SecretKey::from_slice(&[1u8; 32]).is_some());
    }

    #[test]
    fn generated_keys_differ() {
        let a = SecretKey::generate().unwrap();
        let b = SecretKey::generate().unwrap();
        assert_ne!(a.expose(), b.expose());
    }

    #[test]
    fn drop_zeroizes_the_pool_slot() {
        // A pattern no other test uses. Tests run on parallel threads sharing the process-wide
        // pool: another test's key may take the freed slot between the drop and the check (a
        // flaky CI failure when the check was "all zeros"), so the check is "the old key is
        // gone", which another key overwriting the slot cannot fake unless it is this pattern.
        let pattern: [u8; KEY_LEN] = core::array::from_fn(|i| 0xC3 ^ (i as u8).wrapping_mul(37));
        let k = SecretKey::from_slice(&pattern).unwrap();
        let p = k.expose().as_ptr();
        drop(k);
        // The slot stays mapped (the pool never unmaps small slots).
        let bytes = unsafe { std::slice::from_raw_parts(p, KEY_LEN) };
        assert!(!bytes.windows(8).any(|w| pattern.windows(8).any(|q| q == w)), "key bytes survived drop");
    }

    #[test]
    fn a_moved_key_leaves_no_copy_in_its_old_place() {
        // Moving a SecretKey moves a pointer: the struct itself holds no key byte.
        assert_eq!(std::mem::size_of::<SecretKey>(), std::mem::size_of::<usize>());
    }
}
