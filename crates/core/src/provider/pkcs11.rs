//! `pkcs11`: a root key inside a PKCS#11 HSM (SoftHSM2 in tests), through `cryptoki`.
//!
//! The root key is a non-extractable AES-256 secret key found by label. Tenant keys are wrapped
//! with CKM_AES_GCM inside the HSM: a random 96-bit IV from the OS, the tenant binding as AAD,
//! a 128-bit tag. Stored form: `0x01 || iv (12) || ciphertext+tag (48)`.
//!
//! Options (`envelope.add_key_provider(name, 'pkcs11', options)`), none secret:
//!
//! | option | required | meaning |
//! |---|---|---|
//! | `module` | yes | absolute path of the PKCS#11 library |
//! | `token_label` | yes | label of the token (slot ids are not stable) |
//! | `key_label` | yes | label of the AES key |
//! | `mac_key_label` | no | label of a generic secret key (`CKA_SIGN`, `CKA_VERIFY`) that MACs audit checkpoints with `CKM_SHA256_HMAC` (default: `key_label`) |
//! | `pin_file` | yes | file holding the user PIN; read on every call, never stored |
//!
//! The library is loaded and initialised on the thread that makes the call, in the backend
//! process (never in the postmaster before fork), and finalised afterwards; a lost session is
//! therefore never reused. SoftHSM2 should run with `library.reset_on_fork = true`.

use std::path::PathBuf;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use serde_json::Value;
use zeroize::Zeroize;

use super::{KeyContext, KeyProvider, ProviderError};
use crate::secret::{SecretKey, KEY_LEN};
use crate::wrap::WrapAad;

const FORMAT: u8 = 0x01;
const WRAPPED_LEN: usize = 1 + 12 + KEY_LEN + 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Options {
    pub module: PathBuf,
    pub token_label: String,
    pub key_label: String,
    /// The HMAC key for audit checkpoints; `key_label` by default.
    pub mac_key_label: Option<String>,
    pub pin_file: PathBuf,
}

impl Pkcs11Options {
    pub fn from_json(v: &Value) -> Result<Self, ProviderError> {
        let obj = v.as_object().ok_or_else(|| ProviderError::Misconfigured("options must be a JSON object".into()))?;
        for k in obj.keys() {
            if ["pin", "so_pin", "password", "secret"].contains(&k.as_str()) {
                return Err(ProviderError::Misconfigured(format!(
                    "option \"{k}\" would put a secret in the database; use \"pin_file\""
                )));
            }
            if !["module", "token_label", "key_label", "mac_key_label", "pin_file"].contains(&k.as_str()) {
                return Err(ProviderError::Misconfigured(format!("unknown option \"{k}\"")));
            }
        }
        let get = |k: &str| -> Result<String, ProviderError> {
            v.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| ProviderError::Misconfigured(format!("option \"{k}\" is required")))
        };
        let path = |k: &str| -> Result<PathBuf, ProviderError> {
            let p = PathBuf::from(get(k)?);
            if !p.is_absolute() {
                return Err(ProviderError::Misconfigured(format!("option \"{k}\" must be an absolute path")));
            }
            Ok(p)
        };
        Ok(Pkcs11Options { module: path("module")?, token_label: get("token_label")?, key_label: get("key_label")?,
            mac_key_label: get("mac_key_label").ok(),
            pin_file: path("pin_file")?,
        })
    }
}

pub struct Pkcs11Provider {
    opts: Pkcs11Options,
}

fn ck(e: CkError, what: &str) -> ProviderError {
    match e {
        CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLocked | RvError::PinExpired | RvError::PinInvalid, _) => {
            ProviderError::Denied(format!("{what}: the HSM refused the PIN"))
        }
        CkError::Pkcs11(RvError::UserNotLoggedIn | RvError::KeyFunctionNotPermitted | RvError::KeyUnextractable, _) => {
            ProviderError::Denied(format!("{what}: {e}"))
        }
        CkError::LibraryLoading(_) => ProviderError::Misconfigured(format!("{what}: cannot load the PKCS#11 module: {e}")),
        other => ProviderError::Unavailable(format!("{what}: {other}")),
    }
}

impl Pkcs11Provider {
    pub fn new(opts: Pkcs11Options) -> Self {
        Pkcs11Provider { opts }
    }

    fn pin(&self) -> Result<AuthPin, ProviderError> {
        let shown = self.opts.pin_file.display();
        let mut raw = std::fs::read(&self.opts.pin_file).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ProviderError::NotConfigured(format!("pin_file \"{shown}\" does not exist")),
            std::io::ErrorKind::PermissionDenied => {
                ProviderError::Misconfigured(format!("pin_file \"{shown}\" is not readable by the server's OS user"))
            }
            _ => ProviderError::Unavailable(format!("cannot read pin_file \"{shown}\": {e}")),
        })?;
        let pin = String::from_utf8(raw.clone()).map(|s| s.trim_end_matches(['\n', '\r']).to_string());
        raw.zeroize();
        match pin {
            Ok(p) if !p.is_empty() => Ok(AuthPin::from(p)),
            _ => Err(ProviderError::Misconfigured(format!("pin_file \"{shown}\" does not hold a PIN"))),
        }
    }

    /// Loads and initialises the module, finds the token, logs in (read-write session when
    /// `rw`), and runs `f`. Everything is finalised when it returns.
    fn with_token<R>(&self, rw: bool, f: impl FnOnce(&Session) -> Result<R, ProviderError>) -> Result<R, ProviderError> {
        let pin = self.pin()?;
        let p11 = Pkcs11::new(&self.opts.module).map_err(|e| ck(e, "load"))?;
        match p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) => {}
            Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(ck(e, "initialize")),
        }
        let slot = p11
            .get_slots_with_token()
            .map_err(|e| ck(e, "list slots"))?
            .into_iter()
            .find(|s| p11.get_token_info(*s).map(|i| i.label().trim_end() == self.opts.token_label).unwrap_or(false))
            .ok_or_else(|| ProviderError::NotConfigured(format!("no token labelled \"{}\"", self.opts.token_label)))?;
        let session = if rw { p11.open_rw_session(slot) } else { p11.open_ro_session(slot) }.map_err(|e| ck(e, "open session"))?;
        session.login(UserType::User, Some(&pin)).map_err(|e| ck(e, "login"))?;
        let r = f(&session);
        let _ = session.logout();
        drop(session);
        let _ = p11.finalize();
        r
    }

    /// The secret keys labelled `key_label` on the token.
    fn find_keys(&self, session: &Session) -> Result<Vec<ObjectHandle>, ProviderError> {
        Self::find_labelled(session, &self.opts.key_label)
    }

    fn find_labelled(session: &Session, label: &str) -> Result<Vec<ObjectHandle>, ProviderError> {
        session
            .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Label(label.as_bytes().to_vec())])
            .map_err(|e| ck(e, "find key"))
    }

    /// [`Pkcs11Provider::with_token`] with the one HMAC key for audit checkpoints.
    fn with_mac_key<R>(&self, f: impl FnOnce(&Session, ObjectHandle) -> Result<R, ProviderError>) -> Result<R, ProviderError> {
        let label = self.opts.mac_key_label.as_deref().unwrap_or(&self.opts.key_label);
        self.with_token(false, |session| match Self::find_labelled(session, label)?.as_slice() {
            [k] => f(session, *k),
            [] => Err(ProviderError::NotConfigured(format!("no secret key labelled \"{label}\""))),
            _ => Err(ProviderError::Misconfigured(format!("several keys are labelled \"{label}\""))),
        })
    }

    /// [`Pkcs11Provider::with_token`] with the one key labelled `key_label`.
    fn with_key<R>(&self, f: impl FnOnce(&Session, ObjectHandle) -> Result<R, ProviderError>) -> Result<R, ProviderError> {
        self.with_token(false, |session| {
            let key = match self.find_keys(session)?.as_slice() {
                [k] => *k,
                [] => return Err(ProviderError::NotConfigured(format!("no secret key labelled \"{}\"", self.opts.key_label))),
                _ => return Err(ProviderError::Misconfigured(format!("several keys are labelled \"{}\"", self.opts.key_label))),
            };
            f(session, key)
        })
    }
}

impl KeyProvider for Pkcs11Provider {
    fn kind(&self) -> &'static str {
        "pkcs11"
    }

    fn describe(&self) -> Vec<(&'static str, String)> {
        vec![
            ("module", self.opts.module.display().to_string()),
            ("token_label", self.opts.token_label.clone()),
            ("key_label", self.opts.key_label.clone()),
        ]
    }

    fn wrap_tenant_key(&mut self, ctx: &KeyContext<'_>, key: &SecretKey) -> Result<Vec<u8>, ProviderError> {
        let aad = WrapAad::TenantKey { tenant: ctx.tenant, tenant_key_id: ctx.tenant_key_id }.encode();
        let mut iv = [0u8; 12];
        getrandom::fill(&mut iv).map_err(|e| ProviderError::Unavailable(format!("OS random source: {e}")))?;
        let iv_copy = iv;
        let ct = self.with_key(|s, k| {
            let params = GcmParams::new(&mut iv, &aad, 128u64.into()).map_err(|e| ck(e, "GCM parameters"))?;
            s.encrypt(&Mechanism::AesGcm(params), k, key.expose()).map_err(|e| ck(e, "encrypt"))
        })?;
        if ct.len() != KEY_LEN + 16 {
            return Err(ProviderError::Unavailable("the HSM returned a ciphertext of unexpected length".into()));
        }
        let mut out = Vec::with_capacity(WRAPPED_LEN);
        out.push(FORMAT);
        out.extend_from_slice(&iv_copy);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn unwrap_tenant_key(&mut self, ctx: &KeyContext<'_>, wrapped: &[u8]) -> Result<SecretKey, ProviderError> {
        if wrapped.len() != WRAPPED_LEN || wrapped[0] != FORMAT {
            return Err(ProviderError::UnwrapFailed);
        }
        let aad = WrapAad::TenantKey { tenant: ctx.tenant, tenant_key_id: ctx.tenant_key_id }.encode();
        let mut iv: [u8; 12] = wrapped[1..13].try_into().map_err(|_| ProviderError::UnwrapFailed)?;
        let mut pt = self.with_key(|s, k| {
            let params = GcmParams::new(&mut iv, &aad, 128u64.into()).map_err(|e| ck(e, "GCM parameters"))?;
            match s.decrypt(&Mechanism::AesGcm(params), k, &wrapped[13..]) {
                Ok(pt) => Ok(pt),
                // SoftHSM reports a bad tag as a general error; any decrypt failure of a
                // well-formed blob means "not this key / not this tenant / altered".
                Err(CkError::Pkcs11(
                    RvError::GeneralError | RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange,
                    _,
                )) => Err(ProviderError::UnwrapFailed),
                Err(e) => Err(ck(e, "decrypt")),
            }
        })?;
        let key = SecretKey::from_slice(&pt).ok_or(ProviderError::UnwrapFailed);
        pt.zeroize();
        key
    }

    /// `None`: the stored form (`0x01 || iv || ciphertext+tag`) does not name the HSM key, so
    /// the caller must record the label it wrapped under.
    fn root_version_of(&self, _wrapped: &[u8]) -> Option<String> {
        None
    }

    /// The configured `key_label` (no HSM call). Rotating the root key means a new key under
    /// a new label and a provider pointing at it.
    fn current_root_version(&mut self) -> Result<Option<String>, ProviderError> {
        Ok(Some(self.opts.key_label.clone()))
    }

    /// `C_DestroyObject` on every secret key labelled `key_label` on the token (a read-write
    /// session). A token without such a key is success (already destroyed). An HSM that marks
    /// the key `CKA_DESTROYABLE = false` refuses: a denial, reported as such.
    fn destroy_root_key(&mut self) -> Result<String, ProviderError> {
        self.with_token(true, |session| {
            let keys = self.find_keys(session)?;
            if keys.is_empty() {
                return Ok(format!("PKCS#11 key \"{}\" on token \"{}\" does not exist (already destroyed)", self.opts.key_label, self.opts.token_label));
            }
            for k in &keys {
                session.destroy_object(*k).map_err(|e| match e {
                    CkError::Pkcs11(RvError::ActionProhibited, _) => ProviderError::Denied(format!("destroy key: the HSM forbids destroying \"{}\" (CKA_DESTROYABLE false)", self.opts.key_label)),
                    e => ck(e, "destroy key"),
                })?;
            }
            if !self.find_keys(session)?.is_empty() {
                return Err(ProviderError::Unavailable(format!("the key \"{}\" is still on the token after C_DestroyObject", self.opts.key_label)));
            }
            Ok(format!("PKCS#11 key \"{}\" on token \"{}\" destroyed", self.opts.key_label, self.opts.token_label))
        })
    }

    /// `CKM_SHA256_HMAC` with `mac_key_label` inside the token (`C_Sign`).
    fn checkpoint_mac(&mut self, message: &[u8]) -> Result<super::CheckpointMac, ProviderError> {
        let label = self.opts.mac_key_label.clone().unwrap_or_else(|| self.opts.key_label.clone());
        let mac = self.with_mac_key(|s, k| {
            s.sign(&Mechanism::Sha256Hmac, k, message).map_err(|e| match e {
                CkError::Pkcs11(RvError::KeyTypeInconsistent | RvError::KeyFunctionNotPermitted | RvError::MechanismInvalid, _) => {
                    ProviderError::Misconfigured(format!(
                        "sign: the key \"{label}\" cannot make an HMAC-SHA-256 (audit checkpoints need a generic secret key with CKA_SIGN): {e}"
                    ))
                }
                e => ck(e, "sign"),
            })
        })?;
        Ok(super::CheckpointMac { key: format!("pkcs11 {}/{}", self.opts.token_label, label), mac })
    }

    /// `C_Verify` inside the token: a wrong MAC is `CKR_SIGNATURE_INVALID` (or `_LEN_RANGE`).
    fn verify_checkpoint_mac(&mut self, message: &[u8], mac: &[u8]) -> Result<bool, ProviderError> {
        self.with_mac_key(|s, k| match s.verify(&Mechanism::Sha256Hmac, k, message, mac) {
            Ok(()) => Ok(true),
            Err(CkError::Pkcs11(RvError::SignatureInvalid | RvError::SignatureLenRange, _)) => Ok(false),
            Err(e) => Err(ck(e, "verify")),
        })
    }

    // rewrap_tenant_key: the trait's default (unwrap, then wrap again in this process). This
    // provider sees one key, so a rewrap re-wraps under the same label with a fresh IV; moving
    // tenants to a new label is unwrap with the old provider and wrap with the new one. An
    // in-HSM rewrap (C_UnwrapKey into a session object, C_WrapKey under the new key) would need
    // CKM_AES_GCM for wrapping, which SoftHSM2 (2.6.1) does not offer (only CKM_AES_KEY_WRAP
    // and _PAD, which bind no associated data). rewraps_inside_kms: the default, false.
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn options_refuse_inline_pins() {
        let e = Pkcs11Options::from_json(&json!({"module": "/m.so", "token_label": "t", "key_label": "k", "pin": "1234"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pin_file") && !e.contains("1234"), "{e}");
        assert!(Pkcs11Options::from_json(&json!({"module": "m.so", "token_label": "t", "key_label": "k", "pin_file": "/p"})).is_err());
        assert!(Pkcs11Options::from_json(&json!({"module": "/m.so", "token_label": "t", "key_label": "k", "pin_file": "/p"})).is_ok());
    }

    #[test]
    fn root_versions_are_the_label_and_unknown() {
        let o = Pkcs11Options::from_json(&json!({"module": "/m.so", "token_label": "t", "key_label": "pg-kek", "pin_file": "/p"})).unwrap();
        let mut p = Pkcs11Provider::new(o);
        assert_eq!(p.current_root_version().unwrap().as_deref(), Some("pg-kek"));
        assert_eq!(p.root_version_of(&[FORMAT; WRAPPED_LEN]), None);
        assert!(!p.rewraps_inside_kms());
    }
}
