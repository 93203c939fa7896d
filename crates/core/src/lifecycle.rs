//! Key lifecycle steps that need no PostgreSQL: making a new data key version under a tenant key.
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
}

impl std::fmt::Display for LifecycleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LifecycleError::Random(e) => write!(f, "operating system random source failed: {e}"),
            LifecycleError::KeyCheckMismatch => f.write_str("the tenant key does not match its check value"),
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
    use subtle::ConstantTimeEq;
    if !bool::from(wrap::tenant_key_check(kek).as_slice().ct_eq(expected_check)) {
        return Err(LifecycleError::KeyCheckMismatch);
    }
    let dek = SecretKey::generate().map_err(|e| LifecycleError::Random(e.to_string()))?;
    let aad = WrapAad::DataKey { tenant, tenant_key_id, version };
    wrap::wrap_key(kek, &aad, &dek).map_err(|e| LifecycleError::Random(e.to_string()))
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
    fn a_different_tenant_key_is_refused() {
        let kek = SecretKey::generate().unwrap();
        let other = SecretKey::generate().unwrap();
        let check = wrap::tenant_key_check(&other);
        assert_eq!(new_wrapped_data_key(&kek, &check, "acme", 1, 2), Err(LifecycleError::KeyCheckMismatch));
    }
}
