//! Key material.
//!
//! [`SecretKey`] follows rustls' `AeadKey`: the bytes are zeroized when the value is dropped,
//! there is no `Debug`, `Display`, `Clone` or serde implementation, and the only way to read
//! the bytes is the crate-private [`SecretKey::expose`]. Anything that would print a key fails to
//! compile instead.

use rand_core::{CryptoRng, RngCore};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of every symmetric key in the hierarchy (root, tenant key, data key): 256 bits.
pub const KEY_LEN: usize = 32;

/// A 256-bit symmetric key. Zeroized on drop; cannot be printed, cloned or serialized.
pub struct SecretKey {
    bytes: [u8; KEY_LEN],
}

impl SecretKey {
    /// Takes ownership of `bytes` and zeroizes the caller's copy.
    pub fn from_bytes(bytes: &mut [u8; KEY_LEN]) -> Self {
        let key = SecretKey { bytes: *bytes };
        bytes.zeroize();
        key
    }

    /// Copies a key out of a slice; `None` when the length is not [`KEY_LEN`].
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; KEY_LEN] = bytes.try_into().ok()?;
        let mut arr = arr;
        Some(Self::from_bytes(&mut arr))
    }

    /// A fresh key from the operating system's CSPRNG. Keys are generated rarely (a tenant,
    /// a rotation), so they always come straight from the OS, never from a user-space generator.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; KEY_LEN];
        getrandom::fill(&mut bytes)?;
        Ok(Self::from_bytes(&mut bytes))
    }

    /// A key from a caller-supplied CSPRNG (tests and deterministic fixtures).
    pub fn generate_with<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rng.fill_bytes(&mut bytes);
        Self::from_bytes(&mut bytes)
    }

    /// The raw bytes, for the AEAD and key-wrapping code in this crate and for providers.
    pub(crate) fn expose(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
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
    fn drop_zeroizes_in_place() {
        // Drop the key in place inside a MaybeUninit slot and look at the bytes it leaves behind.
        let mut slot = std::mem::MaybeUninit::<SecretKey>::uninit();
        slot.write(SecretKey::from_slice(&[0xAB; KEY_LEN]).unwrap());
        unsafe {
            std::ptr::drop_in_place(slot.as_mut_ptr());
            let bytes = std::slice::from_raw_parts(slot.as_ptr() as *const u8, KEY_LEN);
            assert!(bytes.iter().all(|&b| b == 0), "key bytes survived drop");
        }
    }
}
