//! Key lifecycle steps that need no PostgreSQL: making a new data key version under a tenant key,
//! and re-wrapping every data key under a new tenant key (tenant key rotation).
//!
//! The SQL layer (src/lifecycle.rs) reads and locks the tenant's rows, unwraps the tenant key
//! through its provider, and stores what these functions return.

use crate::secret::SecretKey;
use crate::wrap::{self, WrapAad};

/// Why a lifecycle step failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LifecycleError {
    /// The operating system's random source failed.
    Random(String),
    /// The tenant key does not match its stored check value.
    KeyCheckMismatch,
    /// A stored data key does not unwrap under the tenant key (the key tables were altered).
    CorruptDataKey { version: u32 },
    /// A stored blind-index key does not unwrap under the tenant key.
    CorruptIndexKey { version: u32 },
}

impl std::fmt::Display for LifecycleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LifecycleError::Random(e) => write!(f, "operating system random source failed: {e}"),
            LifecycleError::KeyCheckMismatch => f.write_str("the tenant key does not match its check value"),
            LifecycleError::CorruptDataKey { version } => {
                write!(f, "data key version {version} does not unwrap under its tenant key")
            }
            LifecycleError::CorruptIndexKey { version } => {
                write!(f, "blind-index key version {version} does not unwrap under its tenant key")
            }
        }
    }
}
impl std::error::Error for LifecycleError {}

/// A fresh data key, version `version`, wrapped under the tenant key (bound to tenant, tenant key
/// id and version, like every DEK). The raw DEK lives only in the key pool and is dropped here.
pub fn new_wrapped_data_key(
    kek: &SecretKey,
    expected_check: &[u8],
    tenant: &str,
    tenant_key_id: u32,
    version: u32,
) -> Result<Vec<u8>, LifecycleError> {
    new_wrapped_key(kek, expected_check, &WrapAad::DataKey { tenant, tenant_key_id, version })
}

/// A new blind-index key (version `version` of `tenant`), wrapped under the tenant key.
pub fn new_wrapped_index_key(
    kek: &SecretKey,
    expected_check: &[u8],
    tenant: &str,
    tenant_key_id: u32,
    version: u32,
) -> Result<Vec<u8>, LifecycleError> {
    new_wrapped_key(kek, expected_check, &WrapAad::IndexKey { tenant, tenant_key_id, version })
}

/// A fresh random key wrapped under `kek` with `aad`, after checking that `kek` is the tenant key
/// whose check value is `expected_check`.
fn new_wrapped_key(kek: &SecretKey, expected_check: &[u8], aad: &WrapAad<'_>) -> Result<Vec<u8>, LifecycleError> {
    use subtle::ConstantTimeEq;
    if !bool::from(wrap::tenant_key_check(kek).as_slice().ct_eq(expected_check)) {
        return Err(LifecycleError::KeyCheckMismatch);
    }
    let key = SecretKey::generate().map_err(|e| LifecycleError::Random(e.to_string()))?;
    wrap::wrap_key(kek, aad, &key).map_err(|e| LifecycleError::Random(e.to_string()))
}

/// The blind-index keys re-wrapped from `old_kek` to `new_kek` (a tenant key rotation): the same
/// keys, so every stored term still matches.
pub fn rewrap_index_keys(
    old_kek: &SecretKey,
    new_kek: &SecretKey,
    tenant: &str,
    tenant_key_id: u32,
    keys: &[crate::cache::WrappedDek],
) -> Result<Vec<crate::cache::WrappedDek>, LifecycleError> {
    keys.iter()
        .map(|k| {
            let aad = WrapAad::IndexKey { tenant, tenant_key_id, version: k.version };
            let key = wrap::unwrap_key(old_kek, &aad, &k.wrapped).map_err(|_| LifecycleError::CorruptIndexKey { version: k.version })?;
            let wrapped = wrap::wrap_key(new_kek, &aad, &key).map_err(|e| LifecycleError::Random(e.to_string()))?;
            Ok(crate::cache::WrappedDek { version: k.version, wrapped })
        })
        .collect()
}

/// A tenant key rotation, ready to store: the new tenant key's check value and every data key
/// re-wrapped under it. The new tenant key itself is returned for the provider to wrap; the
/// caller drops it (wiping it) as soon as that is done.
pub struct RotatedTenantKey {
    pub new_kek: SecretKey,
    pub key_check: [u8; 32],
    pub deks: Vec<crate::cache::WrappedDek>,
}

/// Makes a new tenant key and re-wraps every data key version under it, each still bound to
/// (tenant, tenant key id, version). The old tenant key must match `expected_check`; every data
/// key must unwrap under it, or nothing is returned (a half-rotated tenant cannot be stored).
/// The data keys themselves do not change, so no stored value needs re-encryption.
pub fn rotate_tenant_key(
    old_kek: &SecretKey,
    expected_check: &[u8],
    tenant: &str,
    tenant_key_id: u32,
    deks: &[crate::cache::WrappedDek],
) -> Result<RotatedTenantKey, LifecycleError> {
    use subtle::ConstantTimeEq;
    if !bool::from(wrap::tenant_key_check(old_kek).as_slice().ct_eq(expected_check)) {
        return Err(LifecycleError::KeyCheckMismatch);
    }
    let new_kek = SecretKey::generate().map_err(|e| LifecycleError::Random(e.to_string()))?;
    let mut out = Vec::with_capacity(deks.len());
    for d in deks {
        let aad = WrapAad::DataKey { tenant, tenant_key_id, version: d.version };
        let dek = wrap::unwrap_key(old_kek, &aad, &d.wrapped).map_err(|_| LifecycleError::CorruptDataKey { version: d.version })?;
        let wrapped = wrap::wrap_key(&new_kek, &aad, &dek).map_err(|e| LifecycleError::Random(e.to_string()))?;
        out.push(crate::cache::WrappedDek { version: d.version, wrapped });
    }
    let key_check = wrap::tenant_key_check(&new_kek);
    Ok(RotatedTenantKey { new_kek, key_check, deks: out })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datakey::DataKey;
    use crate::rng::BackendRng;

    #[test]
    fn a_new_version_unwraps_under_its_binding_only() {
        let kek = SecretKey::generate().unwrap();
        let check = wrap::tenant_key_check(&kek);
        let w = new_wrapped_data_key(&kek, &check, "acme", 7, 2).unwrap();
        let dek = wrap::unwrap_key(&kek, &WrapAad::DataKey { tenant: "acme", tenant_key_id: 7, version: 2 }, &w).unwrap();
        assert!(wrap::unwrap_key(&kek, &WrapAad::DataKey { tenant: "acme", tenant_key_id: 7, version: 1 }, &w).is_err());
        assert!(wrap::unwrap_key(&kek, &WrapAad::DataKey { tenant: "globex", tenant_key_id: 7, version: 2 }, &w).is_err());
        // It encrypts as version 2, and two rotations give different keys.
        let mut k = DataKey::new(7, 2, &dek);
        let env = k.encrypt(&mut BackendRng::new(), "acme", None, b"x");
        assert_eq!(crate::envelope::Envelope::parse(&env).unwrap().dek_version, 2);
        let w2 = new_wrapped_data_key(&kek, &check, "acme", 7, 3).unwrap();
        let dek2 = wrap::unwrap_key(&kek, &WrapAad::DataKey { tenant: "acme", tenant_key_id: 7, version: 3 }, &w2).unwrap();
        assert_ne!(DataKey::new(7, 3, &dek2).commitment(), k.commitment());
    }

    #[test]
    fn index_keys_have_their_own_wrapping_domain_and_survive_a_tenant_key_rotation() {
        use crate::cache::WrappedDek;
        let kek = SecretKey::generate().unwrap();
        let check = wrap::tenant_key_check(&kek);
        let w = new_wrapped_index_key(&kek, &check, "acme", 7, 1).unwrap();
        let aad = WrapAad::IndexKey { tenant: "acme", tenant_key_id: 7, version: 1 };
        let k = wrap::unwrap_key(&kek, &aad, &w).unwrap();
        // Not a data key, and a data key is not an index key.
        assert!(wrap::unwrap_key(&kek, &WrapAad::DataKey { tenant: "acme", tenant_key_id: 7, version: 1 }, &w).is_err());
        let d = new_wrapped_data_key(&kek, &check, "acme", 7, 1).unwrap();
        assert!(wrap::unwrap_key(&kek, &aad, &d).is_err());
        let new_kek = SecretKey::generate().unwrap();
        let r = rewrap_index_keys(&kek, &new_kek, "acme", 7, &[WrappedDek { version: 1, wrapped: w.clone() }]).unwrap();
        let k2 = wrap::unwrap_key(&new_kek, &aad, &r[0].wrapped).unwrap();
        let term = |k: SecretKey| {
            crate::search::IndexKey::from_secret_key(k)
                .term_key("p", crate::search::Normalization::None, crate::search::ValueKind::Int8)
                .unwrap()
                .term(1, &crate::search::Value::Int8(5))
                .unwrap()
        };
        assert_eq!(term(k), term(k2), "the same key: stored terms still match");
        assert!(wrap::unwrap_key(&kek, &aad, &r[0].wrapped).is_err());
        assert_eq!(
            rewrap_index_keys(&new_kek, &kek, "acme", 7, &[WrappedDek { version: 1, wrapped: w }]).err(),
            Some(LifecycleError::CorruptIndexKey { version: 1 })
        );
        assert_eq!(new_wrapped_index_key(&new_kek, &check, "acme", 7, 2), Err(LifecycleError::KeyCheckMismatch));
    }

    #[test]
    fn a_different_tenant_key_is_refused() {
        let kek = SecretKey::generate().unwrap();
        let other = SecretKey::generate().unwrap();
        let check = wrap::tenant_key_check(&other);
        assert_eq!(new_wrapped_data_key(&kek, &check, "acme", 1, 2), Err(LifecycleError::KeyCheckMismatch));
    }

    #[test]
    fn a_tenant_key_rotation_rewraps_every_data_key_and_keeps_them() {
        use crate::cache::WrappedDek;
        let kek = SecretKey::generate().unwrap();
        let check = wrap::tenant_key_check(&kek);
        let deks: Vec<WrappedDek> = (1..=3)
            .map(|v| WrappedDek { version: v, wrapped: new_wrapped_data_key(&kek, &check, "acme", 7, v).unwrap() })
            .collect();
        let r = rotate_tenant_key(&kek, &check, "acme", 7, &deks).unwrap();
        assert_ne!(r.key_check, check, "a new tenant key");
        assert_eq!(wrap::tenant_key_check(&r.new_kek), r.key_check);
        for (old, new) in deks.iter().zip(&r.deks) {
            let aad = WrapAad::DataKey { tenant: "acme", tenant_key_id: 7, version: old.version };
            let a = wrap::unwrap_key(&kek, &aad, &old.wrapped).unwrap();
            let b = wrap::unwrap_key(&r.new_kek, &aad, &new.wrapped).unwrap();
            // The same data key: values encrypted before the rotation still decrypt.
            assert_eq!(DataKey::new(7, old.version, &a).commitment(), DataKey::new(7, old.version, &b).commitment());
            assert!(wrap::unwrap_key(&kek, &aad, &new.wrapped).is_err(), "no longer under the old tenant key");
        }
        // A wrong old key or a damaged data key: nothing to store.
        let other = SecretKey::generate().unwrap();
        assert!(matches!(rotate_tenant_key(&other, &check, "acme", 7, &deks), Err(LifecycleError::KeyCheckMismatch)));
        let mut bad = deks.clone();
        bad[1].wrapped[20] ^= 1;
        assert!(matches!(rotate_tenant_key(&kek, &check, "acme", 7, &bad), Err(LifecycleError::CorruptDataKey { version: 2 })));
    }
}
