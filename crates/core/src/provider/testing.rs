//! A provider for tests that OFFERS NO SECURITY.
//!
//! Its "root key" is a constant compiled into this crate, known to everyone who can read the
//! source. It exists so that unit tests can count root-key unwraps and inject failures without a
//! file or a key server. It is only compiled for tests or with the `testing` feature, and the
//! extension never offers it as a provider kind.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{KeyContext, KeyProvider, ProviderError};
use crate::secret::SecretKey;
use crate::wrap::{self, WrapAad};

const PUBLICLY_KNOWN_ROOT_KEY: [u8; 32] = *b"pg_envelope-insecure-test-root!!";

/// Counts calls; can be told to fail, as an unreachable KMS would.
#[derive(Default)]
pub struct InsecureTestProvider {
    pub unwraps: Arc<AtomicU64>,
    pub wraps: Arc<AtomicU64>,
    pub fail_with: Option<ProviderError>,
}

impl InsecureTestProvider {
    pub fn new() -> Self {
        Self::default()
    }
    fn root() -> SecretKey {
        SecretKey::from_slice(&PUBLICLY_KNOWN_ROOT_KEY).expect("32 bytes")
    }
}

impl KeyProvider for InsecureTestProvider {
    fn kind(&self) -> &'static str {
        "insecure_test"
    }
    fn describe(&self) -> Vec<(&'static str, String)> {
        vec![("security", "none: the root key is a public constant (tests only)".into())]
    }
    fn wrap_tenant_key(&mut self, ctx: &KeyContext<'_>, key: &SecretKey) -> Result<Vec<u8>, ProviderError> {
        if let Some(e) = &self.fail_with {
            return Err(e.clone());
        }
        self.wraps.fetch_add(1, Ordering::Relaxed);
        let aad = WrapAad::TenantKey { tenant: ctx.tenant, tenant_key_id: ctx.tenant_key_id };
        wrap::wrap_key(&Self::root(), &aad, key).map_err(|e| ProviderError::Unavailable(e.to_string()))
    }
    fn unwrap_tenant_key(&mut self, ctx: &KeyContext<'_>, wrapped: &[u8]) -> Result<SecretKey, ProviderError> {
        if let Some(e) = &self.fail_with {
            return Err(e.clone());
        }
        self.unwraps.fetch_add(1, Ordering::Relaxed);
        let aad = WrapAad::TenantKey { tenant: ctx.tenant, tenant_key_id: ctx.tenant_key_id };
        wrap::unwrap_key(&Self::root(), &aad, wrapped).map_err(|_| ProviderError::UnwrapFailed)
    }
}

/// The provider contract: every real provider must pass it (run from each provider's tests
/// against its real server). `other` must be the same kind of provider with a different root key.
pub fn provider_contract(p: &mut dyn KeyProvider, other: &mut dyn KeyProvider) {
    let kek = SecretKey::generate().unwrap();
    let ctx = KeyContext { tenant: "contract-tenant", tenant_key_id: 41 };
    let wrapped = p.wrap_tenant_key(&ctx, &kek).expect("wrap");
    assert!(!wrapped.windows(32).any(|w| w == kek.expose()), "wrapped form contains the key");
    let again = p.wrap_tenant_key(&ctx, &kek).expect("wrap twice");
    assert_ne!(wrapped, again, "wrapping must be randomized");
    let back = p.unwrap_tenant_key(&ctx, &wrapped).expect("unwrap");
    assert_eq!(back.expose(), kek.expose(), "round trip");
    // Bound to the tenant name and to the key id.
    let moved = KeyContext { tenant: "other-tenant", tenant_key_id: 41 };
    assert!(p.unwrap_tenant_key(&moved, &wrapped).is_err(), "unwrapped for another tenant");
    let renumbered = KeyContext { tenant: "contract-tenant", tenant_key_id: 42 };
    assert!(p.unwrap_tenant_key(&renumbered, &wrapped).is_err(), "unwrapped under another key id");
    // Tampering, truncation and garbage fail cleanly.
    let mut t = wrapped.clone();
    let mid = t.len() / 2;
    t[mid] ^= 0x01;
    assert!(p.unwrap_tenant_key(&ctx, &t).is_err(), "tampered");
    assert!(p.unwrap_tenant_key(&ctx, &wrapped[..wrapped.len() - 1]).is_err(), "truncated");
    assert!(p.unwrap_tenant_key(&ctx, b"").is_err(), "empty");
    assert!(p.unwrap_tenant_key(&ctx, &[0u8; 200]).is_err(), "garbage");
    // A different root key cannot unwrap it.
    assert!(other.unwrap_tenant_key(&ctx, &wrapped).is_err(), "unwrapped under another root key");
    // Errors never echo key material.
    if let Err(e) = other.unwrap_tenant_key(&ctx, &wrapped) {
        let msg = e.to_string();
        assert!(!msg.as_bytes().windows(8).any(|w| kek.expose().windows(8).any(|k| k == w)));
    }
}

/// The audit-checkpoint contract: a provider's MAC verifies for its message and key only.
/// `other` holds a different key. Run against every provider that offers checkpoints.
pub fn checkpoint_contract(p: &mut dyn KeyProvider, other: &mut dyn KeyProvider) {
    let m1 = crate::audit::checkpoint_message(&crate::audit::Head { seq: 42, hash: [7u8; 32] }, 1_700_000_000_000_000);
    let a = p.checkpoint_mac(&m1).expect("checkpoint_mac");
    assert!(!a.key.is_empty(), "the MAC names its key");
    assert!(!a.mac.is_empty());
    assert!(p.verify_checkpoint_mac(&m1, &a.mac).expect("verify"), "a MAC verifies for its message");
    // HMAC: the same message gives the same MAC (a checkpoint can be re-checked offline).
    assert_eq!(p.checkpoint_mac(&m1).unwrap().mac, a.mac);
    let m2 = crate::audit::checkpoint_message(&crate::audit::Head { seq: 43, hash: [7u8; 32] }, 1_700_000_000_000_000);
    assert!(!p.verify_checkpoint_mac(&m2, &a.mac).unwrap(), "another head does not verify");
    let mut bad = a.mac.clone();
    let i = bad.len() - 3;
    bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
    assert!(!p.verify_checkpoint_mac(&m1, &bad).unwrap(), "an altered MAC does not verify");
    assert!(!p.verify_checkpoint_mac(&m1, b"").unwrap(), "an empty MAC does not verify");
    let b = other.checkpoint_mac(&m1).expect("checkpoint_mac (other key)");
    assert_ne!(a.key, b.key);
    assert!(!p.verify_checkpoint_mac(&m1, &b.mac).unwrap(), "another key's MAC does not verify");
}
