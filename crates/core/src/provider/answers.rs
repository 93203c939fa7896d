//! What the HTTP key servers answer, read without any I/O: the JSON body, then the fields each
//! call needs, and the error classification from a status and a body. The providers
//! (`vault.rs`, `aws.rs`) call these on what the server sent; the fuzz target
//! `provider_answers` (crate::fuzzing) calls them on arbitrary bytes. A key server is outside
//! the database's trust boundary: whatever it answers must end in a value or an error, never a
//! panic, and an error message keeps at most [`DETAIL_CHARS`] characters of the server's text.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::Value;

use super::ProviderError;
use crate::secret::SecretKey;

/// Most characters of a server's own error text kept in an error message.
pub const DETAIL_CHARS: usize = 160;

/// Largest answer body read (1 MiB); anything longer is cut there and fails to parse.
pub const MAX_BODY: u64 = 1 << 20;

/// A body as JSON: blank (an HTTP 204) is `null`.
pub fn parse_body(buf: &[u8]) -> Result<Value, serde_json::Error> {
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(buf)
}

fn shortened(s: &str) -> String {
    s.chars().take(DETAIL_CHARS).collect()
}

/// Transit's first error string (`{"errors": ["..."]}`), shortened; empty when there is none.
pub fn transit_detail(v: &Value) -> String {
    v["errors"][0].as_str().map(shortened).unwrap_or_default()
}

/// A non-2xx answer to a Transit call on the provider's key (`op`: encrypt, decrypt, keys).
pub fn transit_error(where_: &str, op: &str, code: u16, v: &Value) -> ProviderError {
    // Vault's error strings carry no secrets; keep the first one, shortened.
    let detail = transit_detail(v);
    match code {
        401 | 403 => ProviderError::Denied(format!(
            "{where_}: HTTP {code} (token invalid, expired or not allowed{}) {detail}",
            if op == "keys" { "; reading the key's latest version needs \"read\" on this path" } else { "" }
        )),
        // A key version below min_decryption_version: say so, it is not a wrong key.
        400 if detail.contains("disallowed by policy") => ProviderError::Denied(format!(
            "{where_}: HTTP 400 {detail} (the Transit key's min_decryption_version excludes the version this tenant key is wrapped under: lower it, rewrap, raise it again)"
        )),
        // A deleted key (a shredded tenant's key read from a backup): not a wrong ciphertext.
        400 | 404 if detail.contains("key not found") => {
            ProviderError::Denied(format!("{where_}: HTTP {code} {detail} (the Transit key does not exist: deleted, or never created)"))
        }
        // A ciphertext that does not open: another key, another tenant binding, altered.
        400 if op == "decrypt" => ProviderError::UnwrapFailed,
        429 | 500..=599 => ProviderError::Unavailable(format!("{where_}: HTTP {code} {detail}")),
        _ => ProviderError::Misconfigured(format!("{where_}: HTTP {code} {detail}")),
    }
}

/// `transit/encrypt`'s `data.ciphertext` (`vault:v<n>:...`), as stored.
pub fn transit_ciphertext(v: &Value) -> Result<Vec<u8>, ProviderError> {
    let ct = v["data"]["ciphertext"]
        .as_str()
        .filter(|s| s.starts_with("vault:v"))
        .ok_or_else(|| ProviderError::Unavailable("transit/encrypt returned no ciphertext".into()))?;
    Ok(ct.as_bytes().to_vec())
}

/// `transit/decrypt`'s `data.plaintext`: a 32-byte key in base64. The parsed answer is wiped.
pub fn transit_plaintext_key(v: &mut Value) -> Result<SecretKey, ProviderError> {
    let key = v["data"]["plaintext"].as_str().ok_or(ProviderError::UnwrapFailed).and_then(super::key_from_base64);
    super::wipe_json(v);
    key
}

/// `transit/keys/<key>`'s `data.latest_version` as `v<n>`; `None` when absent or 0.
pub fn transit_latest_version(v: &Value) -> Option<String> {
    v["data"]["latest_version"].as_u64().filter(|&n| n > 0).map(|n| format!("v{n}"))
}

/// `transit/hmac`'s `data.hmac` (`vault:v<n>:...`).
pub fn transit_hmac(v: &Value) -> Option<&str> {
    v["data"]["hmac"].as_str().filter(|s| s.starts_with("vault:v"))
}

/// `transit/verify`'s `data.valid`.
pub fn transit_valid(v: &Value) -> Option<bool> {
    v["data"]["valid"].as_bool()
}

/// An AWS KMS error body: the exception's short name (`__type` after any `#`) and its message
/// (`message` or `Message`), shortened.
pub fn aws_error_parts(v: &Value) -> (String, String) {
    let kind = shortened(v["__type"].as_str().unwrap_or("").rsplit('#').next().unwrap_or(""));
    let msg = shortened(v["message"].as_str().or(v["Message"].as_str()).unwrap_or(""));
    (kind, msg)
}

/// An AppRole login's `auth.client_token` (a secret). The parsed answer is wiped; the caller
/// keeps the token in a type that wipes it.
pub fn approle_token(v: &mut Value) -> Option<String> {
    let token = v["auth"]["client_token"].as_str().filter(|t| !t.is_empty()).map(str::to_string);
    super::wipe_json(v);
    token
}

/// `Encrypt`'s or `ReEncrypt`'s (`op`) `CiphertextBlob` (base64), decoded.
pub fn aws_ciphertext_blob(v: &Value, op: &str) -> Result<Vec<u8>, ProviderError> {
    let blob = v["CiphertextBlob"].as_str().ok_or_else(|| ProviderError::Unavailable(format!("{op} returned no CiphertextBlob")))?;
    B64.decode(blob).map_err(|_| ProviderError::Unavailable(format!("{op} returned a malformed CiphertextBlob")))
}

/// `GenerateMac`'s `Mac`: 32 bytes in base64, and the `KeyId` that made it (if named).
pub fn aws_mac(v: &Value) -> Option<(Vec<u8>, Option<&str>)> {
    let mac = v["Mac"].as_str().and_then(|m| B64.decode(m).ok()).filter(|m| m.len() == 32)?;
    Some((mac, v["KeyId"].as_str()))
}

/// `VerifyMac`'s `MacValid`: only an explicit `true` is valid.
pub fn aws_mac_valid(v: &Value) -> bool {
    v["MacValid"].as_bool() == Some(true)
}

/// `Decrypt`'s `Plaintext`: a 32-byte key in base64. The parsed answer is wiped.
pub fn aws_plaintext_key(v: &mut Value) -> Result<SecretKey, ProviderError> {
    let key = v["Plaintext"].as_str().ok_or(ProviderError::UnwrapFailed).and_then(super::key_from_base64);
    super::wipe_json(v);
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_transit_decrypt_answer_gives_the_key_and_is_wiped() {
        let mut v = json!({"data": {"plaintext": B64.encode([7u8; 32])}});
        let k = transit_plaintext_key(&mut v).unwrap();
        assert_eq!(k.expose(), &[7u8; 32]);
        assert_eq!(v["data"]["plaintext"], "", "the parsed answer is wiped");
        for bad in [json!({"data": {"plaintext": B64.encode([7u8; 31])}}), json!({"data": {"plaintext": 5}}), json!(null), json!({"data": {"plaintext": "!!"}})] {
            let mut bad = bad;
            assert_eq!(transit_plaintext_key(&mut bad).err(), Some(ProviderError::UnwrapFailed));
        }
    }

    #[test]
    fn server_error_text_is_shortened() {
        let long = "x".repeat(5000);
        match transit_error("https://bao transit/encrypt", "encrypt", 500, &json!({"errors": [long]})) {
            ProviderError::Unavailable(m) => assert!(m.len() < 300, "{}", m.len()),
            e => panic!("{e:?}"),
        }
        let (kind, msg) = aws_error_parts(&json!({"__type": "com.amazonaws.kms#DisabledException", "message": "y".repeat(999)}));
        assert_eq!(kind, "DisabledException");
        assert_eq!(msg.chars().count(), DETAIL_CHARS);
    }

    #[test]
    fn transit_status_decides_denied_unavailable_or_a_bad_ciphertext() {
        // What the key cache does with each: Denied and UnwrapFailed are definitive (a cached
        // entry past its TTL is evicted, never served stale); Unavailable is transient (served
        // degraded within envelope.max_key_age, retried with backoff).
        let e = |op: &str, code: u16, msg: &str| transit_error("w", op, code, &json!({"errors": [msg]}));
        for code in [401, 403] {
            for op in ["decrypt", "encrypt", "keys", "rewrap"] {
                assert!(matches!(e(op, code, "permission denied"), ProviderError::Denied(_)), "{op} {code}");
            }
        }
        assert!(matches!(e("decrypt", 400, "requested version for decryption is disallowed by policy"), ProviderError::Denied(_)));
        assert!(matches!(e("decrypt", 404, "encryption key not found"), ProviderError::Denied(_)));
        assert!(matches!(e("encrypt", 400, "encryption key not found"), ProviderError::Denied(_)));
        assert_eq!(e("decrypt", 400, "cipher: message authentication failed"), ProviderError::UnwrapFailed);
        for code in [429, 500, 502, 503, 504, 599] {
            for op in ["decrypt", "encrypt"] {
                assert!(matches!(e(op, code, "busy"), ProviderError::Unavailable(_)), "{op} {code}");
            }
        }
        // Anything else is a configuration problem, said as such (not a transient outage that
        // would serve stale keys, not a wrong ciphertext).
        for (op, code) in [("encrypt", 400), ("decrypt", 404), ("keys", 405), ("decrypt", 412)] {
            assert!(matches!(e(op, code, "something else"), ProviderError::Misconfigured(_)), "{op} {code}");
        }
    }

    #[test]
    fn transit_answers_are_checked() {
        assert!(transit_ciphertext(&json!({"data": {"ciphertext": "AAAA"}})).is_err(), "not a Transit ciphertext");
        assert_eq!(transit_ciphertext(&json!({"data": {"ciphertext": "vault:v2:AAAA"}})).unwrap(), b"vault:v2:AAAA");
        assert_eq!(transit_latest_version(&json!({"data": {"latest_version": 3}})).as_deref(), Some("v3"));
        assert_eq!(transit_latest_version(&json!({"data": {"latest_version": 0}})), None);
        assert_eq!(transit_error("w", "decrypt", 400, &json!({"errors": ["cipher: message authentication failed"]})), ProviderError::UnwrapFailed);
        assert!(matches!(transit_error("w", "decrypt", 400, &json!({"errors": ["encryption key not found"]})), ProviderError::Denied(_)));
        assert_eq!(parse_body(b" \n").unwrap(), Value::Null);
        assert!(parse_body(b"{").is_err());
    }
}
