//! Wrapping one 256-bit key under another with AES-256-GCM.
//!
//! Used for data keys under their tenant key, and by the `local` provider for tenant keys under
//! the root key. Format (61 bytes):
//!
//! ```text
//! 0x01 (wrap format v1) || nonce (12, from the OS CSPRNG) || ciphertext (32) || tag (16)
//! ```
//!
//! The AAD is `0x01 || purpose-specific context` (tenant name, tenant key id, DEK version: see
//! [`WrapAad`]), so a wrapped key copied to another tenant or version fails to unwrap.
//!
//! Nonce bound: one wrapping key wraps at most a few keys per rotation (a tenant key wraps its
//! DEK versions; the root key wraps one tenant key per tenant and rotation), many orders of
//! magnitude below the 2^32 random-nonce limit of NIST SP 800-38D.

use aes_gcm::aead::{inout::InOutBuf, AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Tag};
use zeroize::Zeroize;

use crate::secret::{SecretKey, KEY_LEN};

pub const WRAP_VERSION_1: u8 = 0x01;
pub const WRAPPED_LEN: usize = 1 + 12 + KEY_LEN + 16;

/// What a wrapped key is bound to. Encoded unambiguously into the AAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrapAad<'a> {
    /// A tenant key (KEK) under the root key.
    TenantKey { tenant: &'a str, tenant_key_id: u32 },
    /// A data key (DEK) under its tenant key.
    DataKey { tenant: &'a str, tenant_key_id: u32, version: u32 },
    /// A blind-index key (search terms, [`crate::search`]) under its tenant key: a domain of
    /// its own, so a data key never unwraps as an index key or the other way round.
    IndexKey { tenant: &'a str, tenant_key_id: u32, version: u32 },
}

impl WrapAad<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![WRAP_VERSION_1];
        match *self {
            WrapAad::TenantKey { tenant, tenant_key_id } => {
                v.extend_from_slice(b"pg_envelope/v1/tenant-key\0");
                v.extend_from_slice(&tenant_key_id.to_be_bytes());
                v.extend_from_slice(&(tenant.len() as u32).to_be_bytes());
                v.extend_from_slice(tenant.as_bytes());
            }
            WrapAad::DataKey { tenant, tenant_key_id, version } | WrapAad::IndexKey { tenant, tenant_key_id, version } => {
                v.extend_from_slice(if matches!(self, WrapAad::DataKey { .. }) { b"pg_envelope/v1/data-key\0" } else { b"pg_envelope/v1/index-key\0" });
                v.extend_from_slice(&tenant_key_id.to_be_bytes());
                v.extend_from_slice(&version.to_be_bytes());
                v.extend_from_slice(&(tenant.len() as u32).to_be_bytes());
                v.extend_from_slice(tenant.as_bytes());
            }
        }
        v
    }
}

/// The wrapped key does not open under this key and context. Opaque on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnwrapError;

impl std::fmt::Display for UnwrapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("key unwrap failed")
    }
}
impl std::error::Error for UnwrapError {}

/// A tenant key's check value, stored next to its wrapped form: HMAC-SHA-256(KEK,
/// "pg_envelope/v1/tenant-key-check"). After every unwrap by a provider the value is compared, so
/// a KMS that hands back a different key under the same name fails closed instead of yielding
/// keys that decrypt into garbage.
pub fn tenant_key_check(kek: &SecretKey) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(kek.expose()).expect("any key length");
    mac.update(b"pg_envelope/v1/tenant-key-check");
    mac.finalize().into_bytes().into()
}

/// Wraps `key` under `wrapping_key`, bound to `aad`.
pub fn wrap_key(wrapping_key: &SecretKey, aad: &WrapAad<'_>, key: &SecretKey) -> Result<Vec<u8>, getrandom::Error> {
    let gcm = Aes256Gcm::new(wrapping_key.expose().into());
    let mut out = vec![0u8; WRAPPED_LEN];
    out[0] = WRAP_VERSION_1;
    getrandom::fill(&mut out[1..13])?;
    let (head, rest) = out.split_at_mut(13);
    let (body, tag_out) = rest.split_at_mut(KEY_LEN);
    let tag = gcm
        .encrypt_inout_detached(
            &crate::datakey::nonce_of(&head[1..13]),
            &aad.encode(),
            InOutBuf::new(key.expose(), body).expect("equal lengths"),
        )
        .expect("32 bytes is below the GCM limit");
    tag_out.copy_from_slice(&tag);
    Ok(out)
}

/// Unwraps a key produced by [`wrap_key`] with the same wrapping key and AAD.
pub fn unwrap_key(wrapping_key: &SecretKey, aad: &WrapAad<'_>, wrapped: &[u8]) -> Result<SecretKey, UnwrapError> {
    if wrapped.len() != WRAPPED_LEN || wrapped[0] != WRAP_VERSION_1 {
        return Err(UnwrapError);
    }
    let gcm = Aes256Gcm::new(wrapping_key.expose().into());
    let mut raw = [0u8; KEY_LEN];
    let result = gcm.decrypt_inout_detached(
        &crate::datakey::nonce_of(&wrapped[1..13]),
        &aad.encode(),
        InOutBuf::new(&wrapped[13..13 + KEY_LEN], &mut raw[..]).map_err(|_| UnwrapError)?,
        &Tag::try_from(&wrapped[13 + KEY_LEN..]).map_err(|_| UnwrapError)?,
    );
    match result {
        Ok(()) => Ok(SecretKey::from_bytes(&mut raw)),
        Err(_) => {
            raw.zeroize();
            Err(UnwrapError)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_round_trip_and_binding() {
        let root = SecretKey::generate().unwrap();
        let kek = SecretKey::generate().unwrap();
        let aad = WrapAad::TenantKey { tenant: "acme", tenant_key_id: 1 };
        let w = wrap_key(&root, &aad, &kek).unwrap();
        assert_eq!(w.len(), WRAPPED_LEN);
        let back = unwrap_key(&root, &aad, &w).unwrap();
        assert_eq!(back.expose(), kek.expose());
        let other_tenant = WrapAad::TenantKey { tenant: "globex", tenant_key_id: 1 };
        assert_eq!(unwrap_key(&root, &other_tenant, &w).err(), Some(UnwrapError));
        let other_id = WrapAad::TenantKey { tenant: "acme", tenant_key_id: 2 };
        assert!(unwrap_key(&root, &other_id, &w).is_err());
        let as_dek = WrapAad::DataKey { tenant: "acme", tenant_key_id: 1, version: 1 };
        assert!(unwrap_key(&root, &as_dek, &w).is_err());
        let wrong_root = SecretKey::generate().unwrap();
        assert!(unwrap_key(&wrong_root, &aad, &w).is_err());
        for i in 0..w.len() * 8 {
            let mut t = w.clone();
            t[i / 8] ^= 1 << (i % 8);
            assert!(unwrap_key(&root, &aad, &t).is_err(), "bit {i}");
        }
        assert!(unwrap_key(&root, &aad, &w[..WRAPPED_LEN - 1]).is_err());
    }
}
