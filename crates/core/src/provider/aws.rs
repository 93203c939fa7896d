//! `aws_kms`: AWS KMS (or a compatible endpoint) wraps tenant keys with `Encrypt` / `Decrypt`,
//! with an `EncryptionContext` naming the tenant and its key id; requests are signed with SigV4
//! by the maintained `aws-sigv4` crate.
//!
//! Options (`envelope.add_key_provider(name, 'aws_kms', options)`), none secret:
//!
//! | option | required | meaning |
//! |---|---|---|
//! | `key_id` | yes | key id, ARN or alias |
//! | `previous_key_ids` | no | comma-separated keys tenants may still be wrapped under while `rewrap_tenants` moves them to `key_id` |
//! | `mac_key_id` | no | an HMAC_256 key (`KeyUsage` `GENERATE_VERIFY_MAC`) that MACs audit checkpoints with `GenerateMac` (default: `key_id`, which must then be such a key) |
//! | `region` | yes | e.g. `us-east-1` |
//! | `endpoint` | no | override, e.g. `https://kms.eu-west-1.amazonaws.com` or a local emulator (`http` only with `allow_insecure_http` on loopback) |
//! | `credentials_file` | no | an AWS shared credentials file; without it the server's environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`) is used |
//! | `profile` | no | profile in the credentials file (default `default`) |
//! | `ca_file` | no | PEM CA bundle for the endpoint |
//! | `allow_insecure_http` | no | allow `http://` to a loopback endpoint (development) |

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use base64::Engine;
use serde_json::{json, Value};
use zeroize::Zeroize;

use super::{KeyContext, KeyProvider, ProviderError};
use crate::secret::SecretKey;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsKmsOptions {
    pub key_id: String,
    /// Keys tenants may still be wrapped under after `key_id` moved to a new key (root key
    /// rotation): unwrapping tries `key_id`, then these, until `rewrap_tenants` has moved every
    /// tenant; then they are removed and the old keys disabled.
    pub previous_key_ids: Vec<String>,
    /// The HMAC key for audit checkpoints (`GenerateMac`/`VerifyMac`); `key_id` by default.
    pub mac_key_id: Option<String>,
    pub region: String,
    pub endpoint: String,
    pub credentials_file: Option<PathBuf>,
    pub profile: String,
    pub ca_file: Option<PathBuf>,
    /// `PendingWindowInDays` for `ScheduleKeyDeletion` when a dedicated key is shredded (7–30).
    pub deletion_window_days: u32,
}

impl AwsKmsOptions {
    pub fn from_json(v: &Value) -> Result<Self, ProviderError> {
        let obj = v.as_object().ok_or_else(|| ProviderError::Misconfigured("options must be a JSON object".into()))?;
        for k in obj.keys() {
            if ["secret_access_key", "aws_secret_access_key", "session_token", "secret", "password"].contains(&k.as_str()) {
                return Err(ProviderError::Misconfigured(format!(
                    "option \"{k}\" would put a secret in the database; use \"credentials_file\" or the server's environment"
                )));
            }
            if !["key_id", "previous_key_ids", "mac_key_id", "region", "endpoint", "credentials_file", "profile", "ca_file", "allow_insecure_http", "deletion_window_days"].contains(&k.as_str()) {
                return Err(ProviderError::Misconfigured(format!("unknown option \"{k}\"")));
            }
        }
        let s = |k: &str| v.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
        let key_id = s("key_id").ok_or_else(|| ProviderError::Misconfigured("option \"key_id\" is required".into()))?;
        let region = s("region").ok_or_else(|| ProviderError::Misconfigured("option \"region\" is required".into()))?;
        if !region.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(ProviderError::Misconfigured("option \"region\" is not a region name".into()));
        }
        let endpoint = s("endpoint").unwrap_or_else(|| format!("https://kms.{region}.amazonaws.com"));
        let endpoint = endpoint.trim_end_matches('/').to_string();
        let insecure = v.get("allow_insecure_http").and_then(Value::as_bool).unwrap_or(false);
        if let Some(rest) = endpoint.strip_prefix("http://") {
            let host = rest.split('/').next().unwrap_or("");
            let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
            if !(insecure && matches!(host, "127.0.0.1" | "localhost" | "[::1]")) {
                return Err(ProviderError::Misconfigured(
                    "plain http is refused; use https, or set \"allow_insecure_http\": true for a loopback emulator".into(),
                ));
            }
        } else if !endpoint.starts_with("https://") {
            return Err(ProviderError::Misconfigured("option \"endpoint\" must start with https://".into()));
        }
        let path = |k: &str| -> Result<Option<PathBuf>, ProviderError> {
            match s(k) {
                None => Ok(None),
                Some(p) if p.starts_with('/') => Ok(Some(PathBuf::from(p))),
                Some(_) => Err(ProviderError::Misconfigured(format!("option \"{k}\" must be an absolute path"))),
            }
        };
        let previous_key_ids = s("previous_key_ids")
            .map(|l| l.split(',').map(|k| k.trim().to_string()).filter(|k| !k.is_empty()).collect())
            .unwrap_or_default();
        let deletion_window_days = match v.get("deletion_window_days") {
            None | Some(Value::Null) => 7,
            Some(n) => match n.as_u64() {
                Some(d @ 7..=30) => d as u32,
                _ => return Err(ProviderError::Misconfigured("option \"deletion_window_days\" must be a whole number of days from 7 to 30 (AWS KMS's bounds)".into())),
            },
        };
        Ok(AwsKmsOptions {
            deletion_window_days,
            key_id,
            previous_key_ids,
            mac_key_id: s("mac_key_id"),
            region,
            endpoint,
            credentials_file: path("credentials_file")?,
            profile: s("profile").unwrap_or_else(|| "default".into()),
            ca_file: path("ca_file")?,
        })
    }
}

/// Access key id, secret and optional session token; the secret is wiped on drop.
struct AwsCredentials {
    access_key_id: String,
    secret: String,
    session_token: Option<String>,
}

impl Drop for AwsCredentials {
    fn drop(&mut self) {
        self.secret.zeroize();
        if let Some(t) = self.session_token.as_mut() {
            t.zeroize();
        }
    }
}

pub struct AwsKmsProvider {
    opts: AwsKmsOptions,
    agent: ureq::Agent,
    timeout: Duration,
}

impl AwsKmsProvider {
    pub fn new(opts: AwsKmsOptions, timeout: Duration) -> Result<Self, ProviderError> {
        let mut builder = ureq::AgentBuilder::new().timeout_connect(timeout).timeout(timeout).redirects(0);
        if let Some(ca) = &opts.ca_file {
            builder = builder.tls_config(Arc::new(super::vault::client_config_with_ca(ca)?));
        }
        Ok(AwsKmsProvider { opts, agent: builder.build(), timeout })
    }

    fn credentials(&self) -> Result<AwsCredentials, ProviderError> {
        match &self.opts.credentials_file {
            None => {
                let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
                match (get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY")) {
                    (Some(access_key_id), Some(secret)) => {
                        Ok(AwsCredentials { access_key_id, secret, session_token: get("AWS_SESSION_TOKEN") })
                    }
                    _ => Err(ProviderError::NotConfigured(
                        "no credentials_file option and no AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the server's environment".into(),
                    )),
                }
            }
            Some(path) => {
                let shown = path.display();
                let mut text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => ProviderError::NotConfigured(format!("credentials_file \"{shown}\" does not exist")),
                    _ => ProviderError::Misconfigured(format!("cannot read credentials_file \"{shown}\": {}", e.kind())),
                })?;
                let parsed = parse_credentials(&text, &self.opts.profile);
                text.zeroize();
                parsed.ok_or_else(|| {
                    ProviderError::Misconfigured(format!(
                        "credentials_file \"{shown}\" has no aws_access_key_id/aws_secret_access_key in profile \"{}\"",
                        self.opts.profile
                    ))
                })
            }
        }
    }

    fn call(&self, target: &str, body: Value) -> Result<Value, ProviderError> {
        let creds = self.credentials()?;
        let identity = Credentials::new(
            creds.access_key_id.clone(),
            creds.secret.clone(),
            creds.session_token.clone(),
            None,
            "pg_envelope",
        )
        .into();
        let settings = SigningSettings::default();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.opts.region)
            .name("kms")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| ProviderError::Misconfigured(format!("SigV4 parameters: {e}")))?
            .into();
        let url = format!("{}/", self.opts.endpoint);
        let payload = super::body_bytes(body);
        let amz_target = format!("TrentService.{target}");
        let headers = [("content-type", "application/x-amz-json-1.1"), ("x-amz-target", amz_target.as_str())];
        let signable = SignableRequest::new("POST", &url, headers.iter().copied(), SignableBody::Bytes(&payload))
            .map_err(|e| ProviderError::Misconfigured(format!("SigV4 request: {e}")))?;
        let (instructions, _signature) =
            sign(signable, &params).map_err(|e| ProviderError::Misconfigured(format!("SigV4 signing: {e}")))?.into_parts();
        let mut req = self.agent.post(&url);
        for (k, v) in headers {
            req = req.set(k, v);
        }
        for (k, v) in instructions.headers() {
            req = req.set(k, v);
        }
        let where_ = format!("{} {}", self.opts.endpoint, target);
        let result = req.send_bytes(&payload);
        drop(payload);
        match result {
            Ok(resp) => super::read_json_wiped(resp).map_err(|e| ProviderError::Unavailable(format!("{where_}: unreadable response: {e}"))),
            Err(ureq::Error::Status(code, resp)) => {
                let v = resp.into_json::<Value>().unwrap_or(Value::Null);
                let (kind, msg) = super::answers::aws_error_parts(&v);
                Err(classify_error(code, &kind, &msg, target, &where_))
            }
            Err(ureq::Error::Transport(t)) => Err(super::vault::transport_error(&where_, &t, self.timeout)),
        }
    }

    fn context(ctx: &KeyContext<'_>) -> Value {
        json!({ "pg_envelope_tenant": ctx.tenant, "pg_envelope_tenant_key_id": ctx.tenant_key_id.to_string() })
    }
}

/// [`parse_credentials`] for the fuzz targets (crate::fuzzing).
pub fn parse_credentials_for_fuzzing(text: &str, profile: &str) -> bool {
    parse_credentials(text, profile).is_some()
}

fn parse_credentials(text: &str, profile: &str) -> Option<AwsCredentials> {
    let mut in_profile = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') && line.ends_with(']') {
            let name = line[1..line.len() - 1].trim();
            in_profile = name == profile || name == format!("profile {profile}");
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_string();
            match k.trim() {
                "aws_access_key_id" => id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    Some(AwsCredentials { access_key_id: id?, secret: secret?, session_token: token })
}

impl KeyProvider for AwsKmsProvider {
    fn kind(&self) -> &'static str {
        "aws_kms"
    }

    fn describe(&self) -> Vec<(&'static str, String)> {
        let mut d = vec![("endpoint", self.opts.endpoint.clone()), ("region", self.opts.region.clone()), ("key_id", self.opts.key_id.clone())];
        if !self.opts.previous_key_ids.is_empty() {
            d.push(("previous_key_ids", self.opts.previous_key_ids.join(",")));
        }
        d
    }

    fn wrap_tenant_key(&mut self, ctx: &KeyContext<'_>, key: &SecretKey) -> Result<Vec<u8>, ProviderError> {
        let mut pt = B64.encode(key.expose());
        let body = json!({ "KeyId": self.opts.key_id, "Plaintext": pt, "EncryptionContext": Self::context(ctx) });
        pt.zeroize();
        let v = self.call("Encrypt", body)?;
        super::answers::aws_ciphertext_blob(&v, "Encrypt")
    }

    fn unwrap_tenant_key(&mut self, ctx: &KeyContext<'_>, wrapped: &[u8]) -> Result<SecretKey, ProviderError> {
        if wrapped.is_empty() || wrapped.len() > 6144 {
            return Err(ProviderError::UnwrapFailed);
        }
        // Pinned to our keys: `key_id`, then (during a root key rotation) the previous ones.
        let keys: Vec<String> = std::iter::once(self.opts.key_id.clone()).chain(self.opts.previous_key_ids.iter().cloned()).collect();
        let mut last = ProviderError::UnwrapFailed;
        for key_id in keys {
            let body = json!({ "KeyId": key_id, "CiphertextBlob": B64.encode(wrapped), "EncryptionContext": Self::context(ctx) });
            match self.call("Decrypt", body) {
                Ok(mut v) => return super::answers::aws_plaintext_key(&mut v),
                Err(ProviderError::UnwrapFailed) => last = ProviderError::UnwrapFailed,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// The configured `key_id`, whatever the blob. An AWS KMS ciphertext blob names its key
    /// only in an undocumented format, so this cannot tell which key (or key material) a blob
    /// was made under: the caller must record the version it wrapped under (this value, or
    /// [`KeyProvider::current_root_version`], at wrap time) and compare that, not this.
    fn root_version_of(&self, _wrapped: &[u8]) -> Option<String> {
        Some(self.opts.key_id.clone())
    }

    /// The configured `key_id` (no KMS call). Rotating the root key means pointing `key_id`
    /// at a new KMS key; the material rotation AWS does inside one key (`EnableKeyRotation`)
    /// needs no rewrap: KMS keeps all older key material.
    fn current_root_version(&mut self) -> Result<Option<String>, ProviderError> {
        Ok(Some(self.opts.key_id.clone()))
    }

    /// `ReEncrypt` to the configured `key_id`, with the tenant's encryption context as both
    /// source and destination context: KMS decrypts with the key the blob names (after a
    /// `key_id` change, the old key) and encrypts under `key_id`, and the tenant key never
    /// leaves KMS. A blob bound to another tenant or key id fails ([`ProviderError::UnwrapFailed`]).
    /// The caller needs `kms:ReEncryptFrom` on the old key and `kms:ReEncryptTo` on the new
    /// one; once every tenant is rewrapped, the old key can be disabled.
    ///
    /// No `SourceKeyId` is sent (the provider does not know the old key), so KMS decrypts with
    /// any key the blob names that the caller may `ReEncryptFrom`: scope that permission to
    /// your own keys (unlike `Decrypt`, which is pinned to `key_id`).
    fn rewrap_tenant_key(&mut self, ctx: &KeyContext<'_>, wrapped: &[u8]) -> Result<Vec<u8>, ProviderError> {
        if wrapped.is_empty() || wrapped.len() > 6144 {
            return Err(ProviderError::UnwrapFailed);
        }
        let context = Self::context(ctx);
        let body = json!({
            "CiphertextBlob": B64.encode(wrapped),
            "SourceEncryptionContext": context,
            "DestinationKeyId": self.opts.key_id,
            "DestinationEncryptionContext": context,
        });
        let v = self.call("ReEncrypt", body)?;
        super::answers::aws_ciphertext_blob(&v, "ReEncrypt")
    }

    /// `true`: `ReEncrypt` runs inside KMS.
    fn rewraps_inside_kms(&self) -> bool {
        true
    }

    /// `ScheduleKeyDeletion` of `key_id` and of every `previous_key_ids` entry, with
    /// `deletion_window_days` (default 7, AWS's minimum). From the call on, KMS refuses every
    /// use of the key (`KMSInvalidStateException`); it deletes the key material when the window
    /// ends. Until then `CancelKeyDeletion` (in KMS, by whoever may call it) would bring it back:
    /// the report says when the window ends. A key already pending deletion is success.
    fn destroy_root_key(&mut self) -> Result<String, ProviderError> {
        let mut done = Vec::new();
        let keys: Vec<String> = std::iter::once(self.opts.key_id.clone()).chain(self.opts.previous_key_ids.iter().cloned()).collect();
        for key in keys {
            let body = json!({ "KeyId": key, "PendingWindowInDays": self.opts.deletion_window_days });
            match self.call("ScheduleKeyDeletion", body) {
                Ok(v) => done.push(format!(
                    "AWS KMS key {key} pending deletion{}",
                    v["DeletionDate"].as_f64().map(|t| format!(" on {}", utc_date(t as i64))).unwrap_or_default()
                )),
                Err(e @ (ProviderError::Misconfigured(_) | ProviderError::Denied(_)))
                    if e.to_string().contains("KMSInvalidStateException") || e.to_string().contains("NotFoundException") =>
                {
                    let d = self.call("DescribeKey", json!({ "KeyId": key }));
                    match d.as_ref().map(|d| d["KeyMetadata"]["KeyState"].as_str().unwrap_or("")) {
                        Ok("PendingDeletion") => done.push(format!("AWS KMS key {key} already pending deletion")),
                        Err(ProviderError::Misconfigured(m)) if m.contains("NotFoundException") => {
                            done.push(format!("AWS KMS key {key} does not exist (already deleted)"))
                        }
                        _ => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(done.join("; "))
    }

    /// `GenerateMac` (HMAC_SHA_256) with `mac_key_id`: the HMAC key never leaves KMS, and
    /// CloudTrail records each call.
    fn checkpoint_mac(&mut self, message: &[u8]) -> Result<super::CheckpointMac, ProviderError> {
        let key = self.opts.mac_key_id.clone().unwrap_or_else(|| self.opts.key_id.clone());
        let v = self.call("GenerateMac", json!({ "KeyId": key, "MacAlgorithm": "HMAC_SHA_256", "Message": B64.encode(message) }))?;
        let (mac, key_id) = super::answers::aws_mac(&v)
            .ok_or_else(|| ProviderError::Unavailable(format!("{} GenerateMac: no 32-byte Mac in the answer", self.opts.endpoint)))?;
        Ok(super::CheckpointMac { key: format!("aws-kms {}", key_id.unwrap_or(&key)), mac })
    }

    /// `VerifyMac`: KMS answers `MacValid`, or `KMSInvalidMacException` for a MAC that does not
    /// match.
    fn verify_checkpoint_mac(&mut self, message: &[u8], mac: &[u8]) -> Result<bool, ProviderError> {
        let key = self.opts.mac_key_id.clone().unwrap_or_else(|| self.opts.key_id.clone());
        let body = json!({ "KeyId": key, "MacAlgorithm": "HMAC_SHA_256", "Message": B64.encode(message), "Mac": B64.encode(mac) });
        match self.call("VerifyMac", body) {
            Ok(v) => Ok(super::answers::aws_mac_valid(&v)),
            Err(ProviderError::UnwrapFailed) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// `YYYY-MM-DD` (UTC) of a Unix time, for reports.
fn utc_date(secs: i64) -> String {
    let (y, m, d) = crate::audit_export::civil_from_days(secs.div_euclid(86400));
    format!("{y:04}-{m:02}-{d:02}")
}


/// Maps a KMS error answer to a provider error. Server messages are quoted only for
/// configuration errors: an authentication failure's message can quote the canonical request.
pub(crate) fn classify_error(code: u16, kind: &str, msg: &str, target: &str, where_: &str) -> ProviderError {
    match (code, kind) {
        (_, "InvalidCiphertextException" | "IncorrectKeyException") => ProviderError::UnwrapFailed,
        // "The ciphertext refers to a customer master key that does not exist ... or you
        // are not allowed to access": how KMS (and moto) answer a ciphertext that is
        // not one of theirs. A policy denial says "... is not authorized to perform".
        (400, "AccessDeniedException") if matches!(target, "Decrypt" | "ReEncrypt") && !msg.contains("not authorized to perform") => {
            ProviderError::UnwrapFailed
        }
        (_, "UnrecognizedClientException" | "InvalidSignatureException" | "AccessDeniedException" | "ExpiredTokenException")
        // No server message here: a signature-mismatch message can quote the canonical
        // request, which would include a session token.
        | (401 | 403, _) => ProviderError::Denied(format!("{where_}: HTTP {code} {kind}")),
        // The key's owner disabled it or scheduled its deletion (bring-your-own-key revocation,
        // a shredded tenant's key read from a backup): a refusal, never served from a stale cache.
        (_, "DisabledException" | "KMSInvalidStateException") => ProviderError::Denied(format!("{where_}: {kind} {msg}")),
        (_, "NotFoundException") => ProviderError::Misconfigured(format!("{where_}: {kind} {msg}")),
        // VerifyMac's "this MAC does not match": an answer, not a failure (see verify_checkpoint_mac).
        (_, "KMSInvalidMacException") => ProviderError::UnwrapFailed,
        (_, "InvalidKeyUsageException") if matches!(target, "GenerateMac" | "VerifyMac") => ProviderError::Misconfigured(format!(
            "{where_}: {kind}: audit checkpoints need an HMAC key (KeySpec HMAC_256, KeyUsage GENERATE_VERIFY_MAC) as \"mac_key_id\""
        )),
        (429 | 500..=599, _) | (_, "ThrottlingException" | "KMSInternalException" | "DependencyTimeoutException") => {
            ProviderError::Unavailable(format!("{where_}: HTTP {code} {kind}"))
        }
        _ => ProviderError::Misconfigured(format!("{where_}: HTTP {code} {kind} {msg}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_denial_on_decrypt_is_denied_not_a_bad_ciphertext() {
        let w = "https://kms.example Decrypt";
        let foreign = "The ciphertext refers to a customer master key that does not exist, does not exist in this region, or you are not allowed to access.";
        assert_eq!(classify_error(400, "AccessDeniedException", foreign, "Decrypt", w), ProviderError::UnwrapFailed);
        let denial = "User: arn:aws:iam::123456789012:user/db is not authorized to perform: kms:Decrypt on resource: arn:aws:kms:us-east-1:123456789012:key/k because no identity-based policy allows the kms:Decrypt action";
        match classify_error(400, "AccessDeniedException", denial, "Decrypt", w) {
            ProviderError::Denied(m) => assert!(!m.contains("arn:"), "no server message in a denial: {m}"),
            other => panic!("expected Denied, got {other:?}"),
        }
        assert!(matches!(classify_error(400, "AccessDeniedException", denial, "Encrypt", w), ProviderError::Denied(_)));
        assert_eq!(classify_error(400, "InvalidCiphertextException", "", "Decrypt", w), ProviderError::UnwrapFailed);
        assert!(matches!(classify_error(400, "ThrottlingException", "", "Decrypt", w), ProviderError::Unavailable(_)));
        assert!(matches!(classify_error(503, "", "", "Decrypt", w), ProviderError::Unavailable(_)));
        assert!(matches!(classify_error(403, "", "<xml>", "Decrypt", w), ProviderError::Denied(_)));
    }

    #[test]
    fn reencrypt_errors_and_root_versions() {
        let w = "https://kms.example ReEncrypt";
        let foreign = "The ciphertext refers to a customer master key that does not exist, does not exist in this region, or you are not allowed to access.";
        assert_eq!(classify_error(400, "AccessDeniedException", foreign, "ReEncrypt", w), ProviderError::UnwrapFailed);
        assert_eq!(classify_error(400, "InvalidCiphertextException", "", "ReEncrypt", w), ProviderError::UnwrapFailed);
        let denial = "User: arn:aws:iam::123456789012:user/db is not authorized to perform: kms:ReEncryptTo on resource: arn:aws:kms:us-east-1:123456789012:key/k";
        assert!(matches!(classify_error(400, "AccessDeniedException", denial, "ReEncrypt", w), ProviderError::Denied(_)));
        assert!(matches!(classify_error(400, "DisabledException", "key is disabled", "ReEncrypt", w), ProviderError::Denied(_)));

        let o = AwsKmsOptions::from_json(&json!({"key_id": "alias/pg-root", "region": "us-east-1"})).unwrap();
        let mut p = AwsKmsProvider::new(o, Duration::from_secs(1)).unwrap();
        assert_eq!(p.current_root_version().unwrap().as_deref(), Some("alias/pg-root"));
        assert_eq!(p.root_version_of(b"anything").as_deref(), Some("alias/pg-root"));
        assert!(p.rewraps_inside_kms());
        assert_eq!(p.rewrap_tenant_key(&KeyContext { tenant: "t", tenant_key_id: 1 }, b""), Err(ProviderError::UnwrapFailed));
    }

    #[test]
    fn dates_for_reports() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(1_796_601_600), "2026-12-07");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
    }

    #[test]
    fn options_and_credentials_file() {
        assert!(AwsKmsOptions::from_json(&json!({"key_id": "k", "region": "us-east-1", "secret_access_key": "SECRET"}))
            .unwrap_err()
            .to_string()
            .contains("credentials_file"));
        assert!(AwsKmsOptions::from_json(&json!({"key_id": "k", "region": "us-east-1", "endpoint": "http://10.0.0.1:5000"})).is_err());
        let o = AwsKmsOptions::from_json(&json!({"key_id": "k", "region": "eu-west-1"})).unwrap();
        assert_eq!(o.endpoint, "https://kms.eu-west-1.amazonaws.com");
        let c = parse_credentials("[default]\naws_access_key_id = A\n[other]\naws_access_key_id=B\naws_secret_access_key=S\n", "other").unwrap();
        assert_eq!((c.access_key_id.as_str(), c.secret.as_str()), ("B", "S"));
        assert!(parse_credentials("[default]\naws_access_key_id = A\n", "default").is_none());
    }
}
