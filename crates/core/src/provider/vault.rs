//! `vault_transit`: HashiCorp Vault / OpenBao Transit. The root key never leaves the server:
//! tenant keys are sent to `transit/encrypt/<key>` and come back from `transit/decrypt/<key>`,
//! with the tenant (name and key id) bound as `associated_data` (the Transit key must be an
//! AEAD type such as `aes256-gcm96`).
//!
//! Options (`envelope.add_key_provider(name, 'vault_transit', options)`), none of them secret:
//!
//! | option | required | meaning |
//! |---|---|---|
//! | `url` | yes | `https://host:port` (plain `http://` only with `allow_insecure_http` and a loopback host) |
//! | `key` | yes | Transit key name |
//! | `hmac_key` | no | Transit key whose `hmac`/`verify` endpoints MAC audit checkpoints (default: `key`) |
//! | `mount` | no | Transit mount path (default `transit`) |
//! | `token_file` | one of | file holding a token (the vault-agent sink pattern); re-read on every call |
//! | `role_id_file` + `secret_id_file` | one of | AppRole: a login per key operation, the token held only for that operation (so it never needs renewing) |
//! | `approle_mount` | no | AppRole auth mount (default `approle`) |
//! | `ca_file` | no | PEM CA bundle for the server certificate (default: the webpki roots) |
//! | `namespace` | no | `X-Vault-Namespace` |
//! | `allow_insecure_http` | no | `true` to allow `http://` to 127.0.0.1/::1/localhost (development) |
//!
//! Inline secrets (`token`, `secret_id`, `password`, ...) are refused: credentials come from files.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use zeroize::Zeroize;

use super::{KeyContext, KeyProvider, ProviderError};
use crate::secret::SecretKey;
use crate::wrap::WrapAad;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// How the provider authenticates to Vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultAuth {
    TokenFile(PathBuf),
    AppRole { mount: String, role_id_file: PathBuf, secret_id_file: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultTransitOptions {
    pub url: String,
    pub key: String,
    /// The Transit key that MACs audit checkpoints (`hmac/<key>/sha2-256`); `key` by default.
    pub hmac_key: Option<String>,
    pub mount: String,
    pub auth: VaultAuth,
    pub ca_file: Option<PathBuf>,
    pub namespace: Option<String>,
    pub allow_insecure_http: bool,
}

const FORBIDDEN_INLINE: &[&str] = &["token", "secret_id", "secret", "password", "pin", "role_secret"];

fn opt_str<'a>(v: &'a Value, k: &str) -> Result<Option<&'a str>, ProviderError> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
        Some(_) => Err(ProviderError::Misconfigured(format!("option \"{k}\" must be a non-empty string"))),
    }
}

fn is_loopback(host: &str) -> bool {
    matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "::1")
}

impl VaultTransitOptions {
    /// Validates provider options. Errors name the option, never echo a value that could be secret.
    pub fn from_json(v: &Value) -> Result<Self, ProviderError> {
        let obj = v.as_object().ok_or_else(|| ProviderError::Misconfigured("options must be a JSON object".into()))?;
        for k in obj.keys() {
            if FORBIDDEN_INLINE.contains(&k.as_str()) {
                return Err(ProviderError::Misconfigured(format!(
                    "option \"{k}\" would put a secret in the database; use \"{k}_file\" (a path readable by the server)"
                )));
            }
            if ![
                "url",
                "key",
                "hmac_key",
                "mount",
                "token_file",
                "role_id_file",
                "secret_id_file",
                "approle_mount",
                "ca_file",
                "namespace",
                "allow_insecure_http",
            ]
            .contains(&k.as_str())
            {
                return Err(ProviderError::Misconfigured(format!("unknown option \"{k}\"")));
            }
        }
        let url = opt_str(v, "url")?.ok_or_else(|| ProviderError::Misconfigured("option \"url\" is required".into()))?;
        let url = url.trim_end_matches('/').to_string();
        let allow_insecure_http = match v.get("allow_insecure_http") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ProviderError::Misconfigured("option \"allow_insecure_http\" must be a boolean".into())),
        };
        let host = url.split("://").nth(1).unwrap_or("").split('/').next().unwrap_or("");
        let host_only = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
        if let Some(rest) = url.strip_prefix("http://") {
            let _ = rest;
            if !(allow_insecure_http && is_loopback(host_only)) {
                return Err(ProviderError::Misconfigured(
                    "plain http is refused; use https, or set \"allow_insecure_http\": true for a loopback development server".into(),
                ));
            }
        } else if !url.starts_with("https://") {
            return Err(ProviderError::Misconfigured("option \"url\" must start with https://".into()));
        }
        let key = opt_str(v, "key")?.ok_or_else(|| ProviderError::Misconfigured("option \"key\" is required".into()))?;
        let check_path = |name: &str, p: &str| -> Result<PathBuf, ProviderError> {
            let p = PathBuf::from(p);
            if !p.is_absolute() {
                return Err(ProviderError::Misconfigured(format!("option \"{name}\" must be an absolute path")));
            }
            Ok(p)
        };
        let safe_segment = |name: &str, s: &str| -> Result<String, ProviderError> {
            if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)) || s.contains("..") {
                return Err(ProviderError::Misconfigured(format!("option \"{name}\" has characters outside [A-Za-z0-9-_./]")));
            }
            Ok(s.trim_matches('/').to_string())
        };
        let auth = match (opt_str(v, "token_file")?, opt_str(v, "role_id_file")?, opt_str(v, "secret_id_file")?) {
            (Some(t), None, None) => VaultAuth::TokenFile(check_path("token_file", t)?),
            (None, Some(r), Some(sid)) => VaultAuth::AppRole {
                mount: safe_segment("approle_mount", opt_str(v, "approle_mount")?.unwrap_or("approle"))?,
                role_id_file: check_path("role_id_file", r)?,
                secret_id_file: check_path("secret_id_file", sid)?,
            },
            _ => {
                return Err(ProviderError::Misconfigured(
                    "give either \"token_file\", or both \"role_id_file\" and \"secret_id_file\" (AppRole)".into(),
                ))
            }
        };
        Ok(VaultTransitOptions {
            url,
            key: safe_segment("key", key)?,
            hmac_key: opt_str(v, "hmac_key")?.map(|k| safe_segment("hmac_key", k)).transpose()?,
            mount: safe_segment("mount", opt_str(v, "mount")?.unwrap_or("transit"))?,
            auth,
            ca_file: opt_str(v, "ca_file")?.map(|p| check_path("ca_file", p)).transpose()?,
            namespace: opt_str(v, "namespace")?.map(str::to_string),
            allow_insecure_http,
        })
    }
}

/// A rustls client configuration trusting exactly the certificates in `ca` (PEM).
pub(crate) fn client_config_with_ca(ca: &std::path::Path) -> Result<rustls::ClientConfig, ProviderError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .map_err(|e| ProviderError::Misconfigured(format!("cannot read ca_file \"{}\": {e}", ca.display())))?;
    for cert in certs {
        let cert = cert.map_err(|e| ProviderError::Misconfigured(format!("bad PEM in ca_file \"{}\": {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| ProviderError::Misconfigured(format!("bad certificate in ca_file \"{}\": {e}", ca.display())))?;
    }
    Ok(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
}

/// A transport failure as a provider error: the URL (never holding credentials) and the cause
/// (refused, timed out, TLS certificate not trusted...), never headers or bodies.
pub(crate) fn transport_error(where_: &str, t: &ureq::Transport, timeout: Duration) -> ProviderError {
    let timed_out = std::error::Error::source(t)
        .and_then(|c| c.downcast_ref::<std::io::Error>())
        .is_some_and(|io| matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
    if timed_out {
        return ProviderError::Unavailable(format!("{where_}: timed out after {} ms (envelope.kms_timeout)", timeout.as_millis()));
    }
    let cause = std::error::Error::source(t).map(|c| c.to_string()).unwrap_or_default();
    ProviderError::Unavailable(format!("{where_}: {}{}{}", t.kind(), if cause.is_empty() { "" } else { ": " }, cause))
}

struct ZeroizingString(String);
impl Drop for ZeroizingString {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

pub struct VaultTransitProvider {
    opts: VaultTransitOptions,
    agent: ureq::Agent,
    timeout: Duration,
    /// An AppRole login's token, kept for the rest of this key operation only.
    session_token: Option<ZeroizingString>,
}

impl VaultTransitProvider {
    pub fn new(opts: VaultTransitOptions, timeout: Duration) -> Result<Self, ProviderError> {
        let mut builder = ureq::AgentBuilder::new().timeout_connect(timeout).timeout(timeout).redirects(0);
        if let Some(ca) = &opts.ca_file {
            builder = builder.tls_config(Arc::new(client_config_with_ca(ca)?));
        }
        Ok(VaultTransitProvider { opts, agent: builder.build(), timeout, session_token: None })
    }

    /// A secret read from a file (token, role id, secret id): trimmed, wiped from our buffers.
    fn read_secret_file(what: &str, path: &std::path::Path) -> Result<String, ProviderError> {
        let shown = path.display();
        let mut raw = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ProviderError::NotConfigured(format!("{what} \"{shown}\" does not exist")),
            std::io::ErrorKind::PermissionDenied => {
                ProviderError::Misconfigured(format!("{what} \"{shown}\" is not readable by the server's OS user"))
            }
            _ => ProviderError::Unavailable(format!("cannot read {what} \"{shown}\": {e}")),
        })?;
        let value = String::from_utf8(raw.clone()).map(|s| s.trim().to_string());
        raw.zeroize();
        match value {
            Ok(t) if !t.is_empty() && t.chars().all(|c| c.is_ascii_graphic()) => Ok(t),
            _ => Err(ProviderError::Misconfigured(format!("{what} \"{shown}\" does not hold a value"))),
        }
    }

    /// The token for this operation: from the token file, or an AppRole login (cached for the
    /// life of this provider value, i.e. one key operation).
    fn token(&mut self) -> Result<String, ProviderError> {
        if let Some(t) = &self.session_token {
            return Ok(t.0.clone());
        }
        match self.opts.auth.clone() {
            VaultAuth::TokenFile(path) => Self::read_secret_file("token_file", &path),
            VaultAuth::AppRole { mount, role_id_file, secret_id_file } => {
                let role_id = ZeroizingString(Self::read_secret_file("role_id_file", &role_id_file)?);
                let secret_id = ZeroizingString(Self::read_secret_file("secret_id_file", &secret_id_file)?);
                let url = format!("{}/v1/auth/{}/login", self.opts.url, mount);
                let mut req = self.agent.post(&url).set("X-Vault-Request", "true");
                if let Some(ns) = &self.opts.namespace {
                    req = req.set("X-Vault-Namespace", ns);
                }
                let where_ = format!("{} auth/{}/login", self.opts.url, mount);
                // The request body holds the secret id: serialized into a buffer wiped after sending.
                let body = super::body_bytes(json!({ "role_id": role_id.0, "secret_id": secret_id.0 }));
                let sent = req.set("Content-Type", "application/json").send_bytes(&body);
                drop(body);
                let mut v: Value = match sent {
                    // The answer holds a token: read into a wiped buffer, the parsed value wiped below.
                    Ok(resp) => super::read_json_wiped(resp)
                        .map_err(|e| ProviderError::Unavailable(format!("{where_}: unreadable response: {e}")))?,
                    Err(ureq::Error::Status(code @ (400 | 401 | 403), _)) => {
                        return Err(ProviderError::Denied(format!("{where_}: HTTP {code} (AppRole login refused)")))
                    }
                    Err(ureq::Error::Status(code, _)) => return Err(ProviderError::Unavailable(format!("{where_}: HTTP {code}"))),
                    Err(ureq::Error::Transport(t)) => return Err(transport_error(&where_, &t, self.timeout)),
                };
                let token = super::answers::approle_token(&mut v)
                    .ok_or_else(|| ProviderError::Unavailable(format!("{where_}: no client_token in the response")))?;
                self.session_token = Some(ZeroizingString(token.clone()));
                Ok(token)
            }
        }
    }

    fn post(&mut self, op: &str, body: Value) -> Result<Value, ProviderError> {
        self.call("POST", op, Some(body))
    }

    /// One Transit call on this provider's key: `POST <mount>/<op>/<key>` with a JSON body
    /// (wiped after sending), or `GET <mount>/<op>/<key>` without one. The answer is read into a
    /// wiped buffer; the caller wipes the parsed value where it holds a key.
    fn call(&mut self, method: &str, op: &str, body: Option<Value>) -> Result<Value, ProviderError> {
        let path = format!("{}/{}", op, self.opts.key);
        let where_ = format!("{} {}/{}", self.opts.url, self.opts.mount, op);
        let (code, v) = self.raw(method, &path, &where_, body)?;
        if (200..300).contains(&code) {
            return Ok(v);
        }
        Err(super::answers::transit_error(&where_, op, code, &v))
    }

    /// One request to `<url>/v1/<mount>/<path>`: the HTTP status and the JSON answer (`null`
    /// for an empty one), whatever the status; only a transport failure is an error.
    fn raw(&mut self, method: &str, path: &str, where_: &str, body: Option<Value>) -> Result<(u16, Value), ProviderError> {
        let mut token = self.token()?;
        let url = format!("{}/v1/{}/{}", self.opts.url, self.opts.mount, path);
        let mut req = self.agent.request(method, &url).set("X-Vault-Token", &token).set("X-Vault-Request", "true");
        if let Some(ns) = &self.opts.namespace {
            req = req.set("X-Vault-Namespace", ns);
        }
        let result = match body {
            Some(body) => {
                let body = super::body_bytes(body);
                let r = req.set("Content-Type", "application/json").send_bytes(&body);
                drop(body);
                r
            }
            None => req.call(),
        };
        token.zeroize();
        match result {
            Ok(resp) => {
                let code = resp.status();
                super::read_json_wiped(resp)
                    .map(|v| (code, v))
                    .map_err(|e| ProviderError::Unavailable(format!("{where_}: unreadable response: {e}")))
            }
            Err(ureq::Error::Status(code, resp)) => Ok((code, resp.into_json::<Value>().unwrap_or(Value::Null))),
            Err(ureq::Error::Transport(t)) => Err(transport_error(where_, &t, self.timeout)),
        }
    }

    /// A status other than 2xx as an error, for the key-management calls of `destroy_root_key`.
    fn admin_error(where_: &str, code: u16, v: &Value) -> ProviderError {
        let detail = super::answers::transit_detail(v);
        match code {
            401 | 403 => ProviderError::Denied(format!(
                "{where_}: HTTP {code} (the token's policy must allow \"update\" on <mount>/keys/<key>/config and \"delete\" on <mount>/keys/<key>) {detail}"
            )),
            429 | 500..=599 => ProviderError::Unavailable(format!("{where_}: HTTP {code} {detail}")),
            _ => ProviderError::Misconfigured(format!("{where_}: HTTP {code} {detail}")),
        }
    }
}

impl VaultTransitProvider {
    fn hmac_key(&self) -> &str {
        self.opts.hmac_key.as_deref().unwrap_or(&self.opts.key)
    }

    /// A status other than 2xx from `hmac`/`verify` as an error.
    fn mac_error(where_: &str, code: u16, v: &Value) -> ProviderError {
        let detail = super::answers::transit_detail(v);
        match code {
            401 | 403 => ProviderError::Denied(format!(
                "{where_}: HTTP {code} (the token's policy must allow \"update\" on <mount>/hmac/<key>/* and <mount>/verify/<key>/*) {detail}"
            )),
            400 | 404 if detail.contains("not found") => ProviderError::NotConfigured(format!("{where_}: HTTP {code} {detail} (no such Transit key)")),
            429 | 500..=599 => ProviderError::Unavailable(format!("{where_}: HTTP {code} {detail}")),
            _ => ProviderError::Misconfigured(format!("{where_}: HTTP {code} {detail}")),
        }
    }
}

/// The key version in a Transit ciphertext: `v3` from `vault:v3:<base64>`.
pub(crate) fn transit_version(wrapped: &[u8]) -> Option<u32> {
    let rest = std::str::from_utf8(wrapped).ok()?.strip_prefix("vault:v")?;
    let (digits, _) = rest.split_once(':')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u32>().ok().filter(|v| *v > 0)
}

impl KeyProvider for VaultTransitProvider {
    fn kind(&self) -> &'static str {
        "vault_transit"
    }

    fn describe(&self) -> Vec<(&'static str, String)> {
        vec![
            ("url", self.opts.url.clone()),
            ("mount", self.opts.mount.clone()),
            ("key", self.opts.key.clone()),
            (
                "auth",
                match &self.opts.auth {
                    VaultAuth::TokenFile(p) => format!("token_file {}", p.display()),
                    VaultAuth::AppRole { mount, role_id_file, .. } => format!("approle {mount} ({})", role_id_file.display()),
                },
            ),
        ]
    }

    fn wrap_tenant_key(&mut self, ctx: &KeyContext<'_>, key: &SecretKey) -> Result<Vec<u8>, ProviderError> {
        let aad = WrapAad::TenantKey { tenant: ctx.tenant, tenant_key_id: ctx.tenant_key_id }.encode();
        let mut pt = B64.encode(key.expose());
        let body = json!({ "plaintext": pt, "associated_data": B64.encode(aad) });
        pt.zeroize();
        let v = self.post("encrypt", body)?;
        super::answers::transit_ciphertext(&v)
    }

    fn unwrap_tenant_key(&mut self, ctx: &KeyContext<'_>, wrapped: &[u8]) -> Result<SecretKey, ProviderError> {
        let ct = std::str::from_utf8(wrapped)
            .ok()
            .filter(|s| s.starts_with("vault:v"))
            .ok_or(ProviderError::UnwrapFailed)?;
        let aad = WrapAad::TenantKey { tenant: ctx.tenant, tenant_key_id: ctx.tenant_key_id }.encode();
        let mut v = self.post("decrypt", json!({ "ciphertext": ct, "associated_data": B64.encode(aad) }))?;
        // The answer's body buffer was wiped after parsing; the parsed strings are wiped too.
        super::answers::transit_plaintext_key(&mut v)
    }

    /// `v3` from `vault:v3:...`; `None` for anything that is not a Transit ciphertext.
    fn root_version_of(&self, wrapped: &[u8]) -> Option<String> {
        transit_version(wrapped).map(|v| format!("v{v}"))
    }

    /// `v<latest_version>` of the Transit key (`GET <mount>/keys/<key>`: metadata only, no key
    /// material). The token's policy needs `read` on that path; a refusal is
    /// [`ProviderError::Denied`], never a silent "unknown".
    fn current_root_version(&mut self) -> Result<Option<String>, ProviderError> {
        let v = self.call("GET", "keys", None)?;
        match super::answers::transit_latest_version(&v) {
            Some(version) => Ok(Some(version)),
            None => Err(ProviderError::Unavailable(format!("{}/keys/{}: no latest_version in the answer", self.opts.mount, self.opts.key))),
        }
    }

    /// Decrypts (bound to `ctx`) and encrypts again (bound to `ctx`, under the key's newest
    /// version): two Transit calls, the tenant key in this process in between, as on every
    /// unwrap.
    ///
    /// Not `transit/rewrap`: OpenBao's rewrap (2.7.2) has no `associated_data` parameter, nor
    /// has HashiCorp Vault's (hashicorp/vault issues 29532 and 31791; pull request 31842 would
    /// add it). It ignores one (a success answer warns "Endpoint ignored
    /// these unrecognized parameters: [associated_data]") and decrypts without associated data,
    /// so a tenant key wrapped here, which is always bound, fails with HTTP 400 "cipher: message
    /// authentication failed", for the right tenant as for the wrong one. (It would rewrap a
    /// ciphertext made without associated data, into one still without: a binding-free key.)
    /// The `kms_contract` test `openbao_rewrap_endpoint_ignores_associated_data` pins that
    /// behaviour, so a server that learns `associated_data` on rewrap shows up there.
    fn rewrap_tenant_key(&mut self, ctx: &KeyContext<'_>, wrapped: &[u8]) -> Result<Vec<u8>, ProviderError> {
        let key = self.unwrap_tenant_key(ctx, wrapped)?;
        self.wrap_tenant_key(ctx, &key)
    }

    /// `false`: see [`VaultTransitProvider::rewrap_tenant_key`].
    fn rewraps_inside_kms(&self) -> bool {
        false
    }

    /// `POST <mount>/keys/<key>/config {"deletion_allowed": true}`, then `DELETE
    /// <mount>/keys/<key>` (every version of the key), then a read that must answer 404. A key
    /// that is already gone is success.
    fn destroy_root_key(&mut self) -> Result<String, ProviderError> {
        let key_path = format!("keys/{}", self.opts.key);
        let shown = format!("{}/{}", self.opts.mount, key_path);
        let where_ = format!("{} {}", self.opts.url, shown);
        let (code, v) = self.raw("GET", &key_path, &where_, None)?;
        if code == 404 {
            return Ok(format!("Transit key {shown} does not exist (already deleted)"));
        }
        if !(200..300).contains(&code) {
            return Err(Self::admin_error(&where_, code, &v));
        }
        let versions = v["data"]["latest_version"].as_u64().unwrap_or(0);
        let (code, v) = self.raw("POST", &format!("{key_path}/config"), &format!("{where_}/config"), Some(json!({"deletion_allowed": true})))?;
        if !(200..300).contains(&code) {
            return Err(Self::admin_error(&format!("{where_}/config"), code, &v));
        }
        let (code, v) = self.raw("DELETE", &key_path, &where_, None)?;
        if !(200..300).contains(&code) && code != 404 {
            return Err(Self::admin_error(&where_, code, &v));
        }
        let (code, v) = self.raw("GET", &key_path, &where_, None)?;
        if code != 404 {
            let _ = v;
            return Err(ProviderError::Unavailable(format!("{where_}: the key still answers (HTTP {code}) after DELETE")));
        }
        Ok(format!("Transit key {shown} deleted with its {versions} version(s)"))
    }

    /// `POST <mount>/hmac/<hmac_key>/sha2-256`: Transit's HMAC with the key's own HMAC key,
    /// which never leaves the server. The MAC is Transit's string (`vault:v1:<base64>`).
    fn checkpoint_mac(&mut self, message: &[u8]) -> Result<super::CheckpointMac, ProviderError> {
        let key = self.hmac_key().to_string();
        let shown = format!("{}/{}", self.opts.mount, key);
        let where_ = format!("{} {}/hmac/{}", self.opts.url, self.opts.mount, key);
        let (code, v) = self.raw("POST", &format!("hmac/{key}/sha2-256"), &where_, Some(json!({ "input": B64.encode(message) })))?;
        if !(200..300).contains(&code) {
            return Err(Self::mac_error(&where_, code, &v));
        }
        let mac = super::answers::transit_hmac(&v)
            .ok_or_else(|| ProviderError::Unavailable(format!("{where_}: no hmac in the answer")))?;
        Ok(super::CheckpointMac { key: shown, mac: mac.as_bytes().to_vec() })
    }

    /// `POST <mount>/verify/<hmac_key>/sha2-256` with the MAC: Transit answers `valid`.
    fn verify_checkpoint_mac(&mut self, message: &[u8], mac: &[u8]) -> Result<bool, ProviderError> {
        let Some(hmac) = std::str::from_utf8(mac).ok().filter(|s| s.starts_with("vault:v")) else {
            return Ok(false);
        };
        let key = self.hmac_key().to_string();
        let where_ = format!("{} {}/verify/{}", self.opts.url, self.opts.mount, key);
        let (code, v) =
            self.raw("POST", &format!("verify/{key}/sha2-256"), &where_, Some(json!({ "input": B64.encode(message), "hmac": hmac })))?;
        match code {
            200..=299 => super::answers::transit_valid(&v).ok_or_else(|| ProviderError::Unavailable(format!("{where_}: no \"valid\" in the answer"))),
            // A malformed MAC, or one of a key version that no longer exists.
            400 if !v["errors"][0].as_str().unwrap_or("").contains("not found") => Ok(false),
            _ => Err(Self::mac_error(&where_, code, &v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_validated_and_secrets_refused() {
        let ok = json!({"url": "https://127.0.0.1:8200", "key": "pg-root", "token_file": "/etc/t"});
        let o = VaultTransitOptions::from_json(&ok).unwrap();
        assert_eq!(o.mount, "transit");
        for (bad, needle) in [
            (json!({"url": "https://h", "key": "k", "token_file": "/t", "token": "s.abc"}), "token_file"),
            (json!({"url": "http://10.0.0.1:8200", "key": "k", "token_file": "/t", "allow_insecure_http": true}), "plain http"),
            (json!({"url": "http://127.0.0.1:8200", "key": "k", "token_file": "/t"}), "plain http"),
            (json!({"url": "https://h", "key": "../k", "token_file": "/t"}), "characters"),
            (json!({"url": "https://h", "key": "k", "token_file": "relative"}), "absolute"),
            (json!({"url": "https://h", "key": "k"}), "token_file"),
            (json!({"url": "https://h", "key": "k", "token_file": "/t", "role_id_file": "/r", "secret_id_file": "/s"}), "either"),
            (json!({"url": "https://h", "key": "k", "role_id_file": "/r"}), "either"),
            (json!({"url": "https://h", "key": "k", "token_file": "/t", "bogus": 1}), "unknown"),
        ] {
            let e = VaultTransitOptions::from_json(&bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
            assert!(!e.contains("s.abc"), "error echoes a secret: {e}");
        }
        let dev = json!({"url": "http://127.0.0.1:8200", "key": "k", "token_file": "/t", "allow_insecure_http": true});
        assert!(VaultTransitOptions::from_json(&dev).is_ok());
    }

    #[test]
    fn root_version_is_read_from_the_ciphertext_prefix() {
        let o = VaultTransitOptions::from_json(&json!({"url": "https://127.0.0.1:8200", "key": "k", "token_file": "/t"})).unwrap();
        let p = VaultTransitProvider::new(o, Duration::from_secs(1)).unwrap();
        assert_eq!(p.root_version_of(b"vault:v1:AAAA").as_deref(), Some("v1"));
        assert_eq!(p.root_version_of(b"vault:v42:AAAA").as_deref(), Some("v42"));
        for bad in [&b"vault:v:AAAA"[..], b"vault:v3", b"vault:vx:AA", b"vault:v-1:AA", b"vault:v0:AA", b"vault:v+3:AA", b"v3:AA", b"", b"\xffvault:v1:"] {
            assert_eq!(p.root_version_of(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        assert!(!p.rewraps_inside_kms());
    }
}
