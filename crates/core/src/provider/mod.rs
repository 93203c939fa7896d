//! Key providers: where the root key lives.
//!
//! A provider wraps and unwraps tenant keys (KEKs) under a root key that, for real KMSs and
//! HSMs, never leaves the key server. Every implementation binds the tenant (name and key id)
//! to the wrapped bytes: as AES-GCM associated data, a Transit `associated_data`, an AWS
//! `EncryptionContext`, and so on. A wrapped key moved to another tenant must fail to unwrap.
//!
//! Errors carry only non-secret detail (paths, modes, HTTP statuses, provider names), never key
//! bytes, tokens or PINs; they are safe to show in an error message.

#[cfg(feature = "vault")]
pub mod answers;
pub mod common;
pub mod local;
pub mod policy;
#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "pkcs11")]
pub mod pkcs11;
#[cfg(feature = "vault")]
pub mod vault;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use crate::secret::SecretKey;

/// A key returned by a KMS in base64 (Transit's `plaintext`, KMS's `Plaintext`); the decoded
/// buffer is wiped. Anything that is not 32 bytes of base64 is an unwrap failure.
#[cfg(feature = "vault")]
pub(crate) fn key_from_base64(b64: &str) -> Result<SecretKey, ProviderError> {
    use base64::Engine;
    let mut raw = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| ProviderError::UnwrapFailed)?;
    let key = SecretKey::from_slice(&raw).ok_or(ProviderError::UnwrapFailed);
    zeroize::Zeroize::zeroize(&mut raw);
    key
}

/// Reads a KMS answer (at most 1 MiB) into a buffer that is wiped after parsing. The answer to
/// a decrypt carries the tenant key (in base64): with [`wipe_json`] on the parsed value, no copy
/// made by this crate outlives the call. (The TLS library's own record buffers are out of reach;
/// see docs/threat-model.md.)
#[cfg(feature = "vault")]
pub(crate) fn read_json_wiped(resp: ureq::Response) -> std::io::Result<serde_json::Value> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(4096);
    let r = resp.into_reader().take(answers::MAX_BODY).read_to_end(&mut buf);
    // An empty answer (HTTP 204 to a DELETE) is null.
    let parsed = r.and_then(|_| answers::parse_body(&buf).map_err(std::io::Error::other));
    zeroize::Zeroize::zeroize(&mut buf);
    parsed
}

/// Overwrites every string in a JSON value (request bodies with a key, decrypt answers) before
/// it is dropped.
#[cfg(feature = "vault")]
pub(crate) fn wipe_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) => zeroize::Zeroize::zeroize(s),
        serde_json::Value::Array(a) => a.iter_mut().for_each(wipe_json),
        serde_json::Value::Object(o) => o.values_mut().for_each(wipe_json),
        _ => {}
    }
}

/// Serializes a request body into a buffer the caller wipes after sending.
#[cfg(feature = "vault")]
pub(crate) fn body_bytes(mut body: serde_json::Value) -> zeroize::Zeroizing<Vec<u8>> {
    let bytes = zeroize::Zeroizing::new(serde_json::to_vec(&body).expect("JSON values serialize"));
    wipe_json(&mut body);
    bytes
}

/// What a tenant key is bound to when it is wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyContext<'a> {
    pub tenant: &'a str,
    pub tenant_key_id: u32,
}

/// Failures of a key provider. Messages are safe to log: no secret ever goes into them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderError {
    /// The provider is not set up (no root key file configured, unknown provider kind).
    NotConfigured(String),
    /// The provider's configuration is unsafe or invalid (file mode, key length, options).
    Misconfigured(String),
    /// The key server or file could not be reached or read right now; may succeed later.
    Unavailable(String),
    /// The provider refused the operation (permissions, authentication).
    Denied(String),
    /// No call was made: every call slot of the provider stayed taken for `envelope.kms_timeout`
    /// (stampede control). Unlike [`ProviderError::Unavailable`] it never starts serving cached
    /// keys past their TTL: other callers' load must not stretch a revocation the KMS reports.
    Busy(String),
    /// The wrapped key does not open with this root key and tenant binding: a different root
    /// key, a wrapped key copied from another tenant, or tampering. Opaque on purpose.
    UnwrapFailed,
}

impl std::fmt::Display for ProviderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProviderError::NotConfigured(m) => write!(f, "key provider not configured: {m}"),
            ProviderError::Misconfigured(m) => write!(f, "key provider misconfigured: {m}"),
            ProviderError::Unavailable(m) => write!(f, "key provider unavailable: {m}"),
            ProviderError::Denied(m) => write!(f, "key provider refused the request: {m}"),
            ProviderError::Busy(m) => write!(f, "key provider busy: {m}"),
            ProviderError::UnwrapFailed => f.write_str(
                "the tenant key does not unwrap with this provider's root key (wrong root key, or the wrapped key was altered or moved)",
            ),
        }
    }
}
impl std::error::Error for ProviderError {}

/// An audit checkpoint's MAC made inside the key server, and the (non-secret) name of the key
/// that made it, e.g. `transit/pg-audit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointMac {
    pub key: String,
    pub mac: Vec<u8>,
}

/// A root of trust that wraps and unwraps tenant keys.
pub trait KeyProvider: Send {
    /// The provider kind, as used in `envelope.add_key_provider(name, kind, ...)`: `local`, ...
    fn kind(&self) -> &'static str;
    /// Non-secret facts about the provider for `envelope.status()` (e.g. the key file path).
    fn describe(&self) -> Vec<(&'static str, String)>;
    /// Wraps a fresh tenant key under the root key, bound to `ctx`.
    fn wrap_tenant_key(&mut self, ctx: &KeyContext<'_>, key: &SecretKey) -> Result<Vec<u8>, ProviderError>;
    /// Unwraps a tenant key. Each call is one "root-key unwrap" (one KMS round trip for remote
    /// providers); the key cache exists to keep their number at one per tenant per TTL.
    fn unwrap_tenant_key(&mut self, ctx: &KeyContext<'_>, wrapped: &[u8]) -> Result<SecretKey, ProviderError>;

    /// The root key version a wrapped tenant key was made under, where the provider can tell
    /// without a KMS call (Transit: `v3` from `vault:v3:...`). AWS KMS: the key id configured
    /// now, whatever the blob (its blobs do not name their key portably); PKCS#11 and local:
    /// `None`. Where the blob does not say, the caller must record the version it wrapped under
    /// ([`KeyProvider::current_root_version`] at wrap time). `None`: unknown. Never secret.
    fn root_version_of(&self, _wrapped: &[u8]) -> Option<String> {
        None
    }

    /// The newest root key version the provider would wrap under now (Transit: the key's
    /// `latest_version`, one KMS call; AWS KMS: the configured key id; PKCS#11: the configured
    /// key label; local: `None`). A tenant whose `root_version_of` differs is due for a rewrap.
    fn current_root_version(&mut self) -> Result<Option<String>, ProviderError> {
        Ok(None)
    }

    /// Re-wraps a tenant key under the newest root key version, bound to the same `ctx`.
    /// Through the KMS's own re-encrypt primitive where it has one that keeps the binding (AWS
    /// `ReEncrypt`), so the tenant key never leaves the KMS in the clear; otherwise unwrap and
    /// wrap again in this process (the default; Transit too, whose `rewrap` cannot open a
    /// ciphertext bound with `associated_data`). A blob that does not unwrap for `ctx` fails
    /// with [`ProviderError::UnwrapFailed`].
    fn rewrap_tenant_key(&mut self, ctx: &KeyContext<'_>, wrapped: &[u8]) -> Result<Vec<u8>, ProviderError> {
        let key = self.unwrap_tenant_key(ctx, wrapped)?;
        self.wrap_tenant_key(ctx, &key)
    }

    /// Whether [`KeyProvider::rewrap_tenant_key`] keeps the tenant key inside the KMS.
    fn rewraps_inside_kms(&self) -> bool {
        false
    }

    /// Destroys the root key in the key server, for crypto-shredding the one tenant a
    /// `dedicated` provider serves: afterwards no copy of a tenant key wrapped under it (in a
    /// backup, a dump, a replica) can be unwrapped. Transit: allow deletion, delete the key (all
    /// its versions). AWS KMS: `ScheduleKeyDeletion` of `key_id` and every `previous_key_ids`
    /// entry (KMS waits out its pending window; the key is unusable from the call on). PKCS#11:
    /// `C_DestroyObject`. Idempotent: a key already gone (or already pending deletion) is
    /// success. Returns what happened, for the shred report; never secret.
    fn destroy_root_key(&mut self) -> Result<String, ProviderError> {
        Err(ProviderError::Misconfigured(format!("the {} provider cannot destroy its root key", self.kind())))
    }

    /// HMAC-SHA-256 of an audit checkpoint message (the chain head) with a key that never
    /// leaves the key server, so that whoever rewrites the audit tables cannot re-sign their
    /// head without a KMS call, which the KMS's own audit log records. Transit: `hmac/<key>`;
    /// AWS KMS: `GenerateMac` (an HMAC_256 key); PKCS#11: `CKM_SHA256_HMAC` in the token;
    /// local: an HKDF subkey of the root key file (development only). The message is public
    /// (sequence, hash, time): nothing secret is sent.
    fn checkpoint_mac(&mut self, _message: &[u8]) -> Result<CheckpointMac, ProviderError> {
        Err(ProviderError::Misconfigured(format!("the {} provider cannot authenticate audit checkpoints", self.kind())))
    }

    /// Checks a MAC made by [`KeyProvider::checkpoint_mac`] (inside the key server where it
    /// has a verify call). `Ok(false)`: the MAC does not match; an error: the question could not
    /// be asked (never reported as a mismatch).
    fn verify_checkpoint_mac(&mut self, _message: &[u8], _mac: &[u8]) -> Result<bool, ProviderError> {
        Err(ProviderError::Misconfigured(format!("the {} provider cannot authenticate audit checkpoints", self.kind())))
    }
}
