//! The provider contract suite against real key servers. Ignored in the fast core tier; the
//! integration tier starts the servers (scripts/kms.sh) and runs
//! `cargo test -p pg_envelope_core --features vault,testing --test kms_contract -- --ignored`.
//! A missing server is a failure there, never a silent skip.
#![cfg(all(feature = "aws", feature = "pkcs11", feature = "testing"))]

use std::time::Duration;

use pg_envelope_core::provider::testing::provider_contract;
use pg_envelope_core::provider::aws::{AwsKmsOptions, AwsKmsProvider};
use pg_envelope_core::provider::pkcs11::{Pkcs11Options, Pkcs11Provider};
use pg_envelope_core::provider::vault::{VaultTransitOptions, VaultTransitProvider};

fn bao(key: &str) -> VaultTransitProvider {
    bao_with(serde_json::json!({ "key": key }))
}

/// The dev server's provider with the kms.sh token, plus `extra` options.
fn bao_with(extra: serde_json::Value) -> VaultTransitProvider {
    let state = std::env::var("PGE_STATE").unwrap_or_else(|_| "/var/lib/pg_envelope-dev".into());
    let mut opts = serde_json::json!({
        "url": std::env::var("BAO_ADDR").expect("BAO_ADDR: start OpenBao with scripts/kms.sh start-openbao"),
        "token_file": format!("{state}/openbao/token"),
        "ca_file": format!("{state}/openbao/ca.pem"),
    });
    opts.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    VaultTransitProvider::new(VaultTransitOptions::from_json(&opts).unwrap(), Duration::from_secs(5)).unwrap()
}

#[test]
#[ignore = "needs OpenBao: run by the integration tier"]
fn openbao_transit_passes_the_provider_contract() {
    provider_contract(&mut bao("pg-root"), &mut bao("pg-root-2"));
}

/// SoftHSM's library is initialised and finalised by every provider call; two tests doing that
/// on two threads of one process at once can spin for ever (seen in CI): one at a time.
static HSM_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn hsm(key_label: &str) -> Pkcs11Provider {
    let state = std::env::var("PGE_STATE").unwrap_or_else(|_| "/var/lib/pg_envelope-dev".into());
    assert!(std::env::var_os("SOFTHSM2_CONF").is_some(), "SOFTHSM2_CONF: run scripts/kms.sh start-softhsm");
    Pkcs11Provider::new(
        Pkcs11Options::from_json(&serde_json::json!({
            "module": "/usr/lib/softhsm/libsofthsm2.so",
            "token_label": "pg-envelope",
            "key_label": key_label,
            "pin_file": format!("{state}/softhsm/pin"),
        }))
        .unwrap(),
    )
}

#[test]
#[ignore = "needs SoftHSM2: run by the integration tier"]
fn softhsm_passes_the_provider_contract() {
    let _one_at_a_time = HSM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    provider_contract(&mut hsm("pg-kek"), &mut hsm("pg-kek-2"));
}

fn moto(key_var: &str, credentials: &str) -> AwsKmsProvider {
    let endpoint = std::env::var("MOTO_ENDPOINT").expect("MOTO_ENDPOINT: run scripts/kms.sh start-moto");
    AwsKmsProvider::new(
        AwsKmsOptions::from_json(&serde_json::json!({
            "key_id": std::env::var(key_var).unwrap(),
            "region": "us-east-1",
            "endpoint": endpoint,
            "allow_insecure_http": true,
            "credentials_file": credentials,
        }))
        .unwrap(),
        Duration::from_secs(5),
    )
    .unwrap()
}

#[test]
#[ignore = "needs moto: run by the integration tier"]
fn aws_kms_emulator_passes_the_provider_contract() {
    let creds = std::env::var("MOTO_CREDENTIALS").unwrap();
    provider_contract(&mut moto("MOTO_KEY_ID", &creds), &mut moto("MOTO_KEY_ID_2", &creds));
}

#[test]
#[ignore = "needs moto: run by the integration tier"]
fn aws_kms_emulator_checks_signatures() {
    use pg_envelope_core::{KeyContext, KeyProvider, ProviderError, SecretKey};
    let bad = std::env::var("MOTO_CREDENTIALS").unwrap().replace("credentials", "bad-credentials");
    let err = moto("MOTO_KEY_ID", &bad)
        .wrap_tenant_key(&KeyContext { tenant: "t", tenant_key_id: 1 }, &SecretKey::generate().unwrap())
        .unwrap_err();
    assert!(matches!(err, ProviderError::Denied(ref m) if m.contains("403")), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Root-key rotation: `current_root_version`, `root_version_of`, `rewrap_tenant_key`.
// Each test makes its own Transit key / KMS keys, so the keys the other tests use never rotate.

use pg_envelope_core::{KeyContext, KeyProvider, ProviderError, SecretKey};
use serde_json::{json, Value};

fn state_dir() -> String {
    std::env::var("PGE_STATE").unwrap_or_else(|_| "/var/lib/pg_envelope-dev".into())
}

/// A name no other run uses: `<prefix>-<16 hex digits>`.
fn fresh_name(prefix: &str) -> String {
    format!("{prefix}-{:016x}", getrandom::u64().unwrap())
}

/// OpenBao administration with the dev server's root token (kms.sh keeps it in
/// `$PGE_STATE/openbao/root-token`, root-only): what an operator does, not the provider.
struct BaoAdmin {
    agent: ureq::Agent,
    url: String,
    root_token: String,
}

impl BaoAdmin {
    fn new() -> Self {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let state = state_dir();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(format!("{state}/openbao/ca.pem")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        let root_token = std::fs::read_to_string(format!("{state}/openbao/root-token"))
            .expect("the OpenBao root token: run scripts/kms.sh start-openbao (as root)")
            .trim()
            .to_string();
        BaoAdmin {
            agent: ureq::AgentBuilder::new().tls_config(std::sync::Arc::new(tls)).build(),
            url: std::env::var("BAO_ADDR").expect("BAO_ADDR: start OpenBao with scripts/kms.sh start-openbao"),
            root_token,
        }
    }

    /// `(HTTP status, answer)`; a refusal is an answer too.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let req = self.agent.request(method, &format!("{}/v1/{path}", self.url)).set("X-Vault-Token", &self.root_token);
        let r = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match r {
            Ok(resp) => (resp.status(), resp.into_json().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(code, resp)) => (code, resp.into_json().unwrap_or(Value::Null)),
            Err(e) => panic!("OpenBao {method} {path}: {e}"),
        }
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (code, v) = self.call(method, path, body);
        assert!((200..300).contains(&code), "OpenBao {method} {path}: HTTP {code} {v}");
        v
    }

    fn create_key(&self, name: &str) {
        self.ok("POST", &format!("transit/keys/{name}"), Some(json!({"type": "aes256-gcm96"})));
    }

    /// Best effort: the dev server keeps everything in memory anyway.
    fn delete_key(&self, name: &str) {
        self.call("POST", &format!("transit/keys/{name}/config"), Some(json!({"deletion_allowed": true})));
        self.call("DELETE", &format!("transit/keys/{name}"), None);
    }
}

/// A tenant key and its bytes (to look for them in wrapped forms).
fn known_key() -> ([u8; 32], SecretKey) {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).unwrap();
    (raw, SecretKey::from_slice(&raw).unwrap())
}

/// Same key: compared through the public check value (the key bytes are not public).
fn same(a: &SecretKey, b: &SecretKey) -> bool {
    pg_envelope_core::wrap::tenant_key_check(a) == pg_envelope_core::wrap::tenant_key_check(b)
}

fn ctx(tenant: &str, tenant_key_id: u32) -> KeyContext<'_> {
    KeyContext { tenant, tenant_key_id }
}

#[test]
#[ignore = "needs OpenBao: run by the integration tier"]
fn openbao_root_key_rotation_rewraps_under_the_newest_version() {
    let admin = BaoAdmin::new();
    // Inside the provider token's `pg-root*` policy, and used by no other test.
    let name = fresh_name("pg-root-rotate-test");
    admin.create_key(&name);
    let mut p = bao(&name);
    let (c, moved, renumbered) = (ctx("rotating-tenant", 7), ctx("other-tenant", 7), ctx("rotating-tenant", 8));
    assert!(!p.rewraps_inside_kms(), "Transit's rewrap cannot keep associated_data: the provider decrypts and encrypts");

    assert_eq!(p.current_root_version().unwrap().as_deref(), Some("v1"));
    let (raw, kek) = known_key();
    let old = p.wrap_tenant_key(&c, &kek).unwrap();
    assert_eq!(p.root_version_of(&old).as_deref(), Some("v1"));

    // The operator rotates the root key; the provider sees the new version.
    admin.ok("POST", &format!("transit/keys/{name}/rotate"), None);
    assert_eq!(p.current_root_version().unwrap().as_deref(), Some("v2"));
    assert_eq!(p.root_version_of(&old).as_deref(), Some("v1"), "due for a rewrap");

    let new = p.rewrap_tenant_key(&c, &old).unwrap();
    assert_eq!(p.root_version_of(&new).as_deref(), Some("v2"));
    assert!(same(&p.unwrap_tenant_key(&c, &new).unwrap(), &kek));
    assert!(!new.windows(32).any(|w| w == raw), "the rewrapped form contains the key");

    // The binding is kept: a rewrap for another tenant or key id fails, and so does the result
    // for another tenant; garbage and altered blobs fail the same way.
    assert_eq!(p.rewrap_tenant_key(&moved, &old), Err(ProviderError::UnwrapFailed));
    assert_eq!(p.rewrap_tenant_key(&renumbered, &old), Err(ProviderError::UnwrapFailed));
    assert_eq!(p.unwrap_tenant_key(&moved, &new).map(|_| ()), Err(ProviderError::UnwrapFailed));
    let mut altered = old.clone();
    let last = altered.len() - 2;
    altered[last] ^= 0x01;
    assert_eq!(p.rewrap_tenant_key(&c, &altered), Err(ProviderError::UnwrapFailed));
    assert_eq!(p.rewrap_tenant_key(&c, b"vault:v1:AAAA"), Err(ProviderError::UnwrapFailed));
    assert_eq!(p.rewrap_tenant_key(&c, b"not transit"), Err(ProviderError::UnwrapFailed));

    // The operator retires v1: the rewrapped key still unwraps, the old blob no longer does.
    admin.ok("POST", &format!("transit/keys/{name}/config"), Some(json!({"min_decryption_version": 2})));
    assert!(same(&p.unwrap_tenant_key(&c, &new).unwrap(), &kek));
    // The old blob is refused by policy, and the error says so (not "wrong key").
    let refused = |r: Result<(), ProviderError>| matches!(r, Err(ProviderError::Denied(m)) if m.contains("min_decryption_version"));
    assert!(refused(p.unwrap_tenant_key(&c, &old).map(|_| ())));
    assert!(refused(p.rewrap_tenant_key(&c, &old).map(|_| ())));
    // Rewrapping what is already current is harmless: a fresh ciphertext under v2.
    let again = p.rewrap_tenant_key(&c, &new).unwrap();
    assert_ne!(again, new);
    assert_eq!(p.root_version_of(&again).as_deref(), Some("v2"));
    assert!(same(&p.unwrap_tenant_key(&c, &again).unwrap(), &kek));
    admin.delete_key(&name);
}

#[test]
#[ignore = "needs OpenBao: run by the integration tier"]
fn openbao_current_root_version_refused_or_missing_is_an_error() {
    let admin = BaoAdmin::new();
    // Outside the token's `pg-root*` policy: the read is refused (403), and that is an error.
    let outside = fresh_name("pg-rotate-test-outside-policy");
    admin.create_key(&outside);
    match bao(&outside).current_root_version() {
        Err(ProviderError::Denied(m)) => assert!(m.contains("403") && m.contains("read"), "{m}"),
        other => panic!("expected Denied, got {other:?}"),
    }
    admin.delete_key(&outside);
    // Inside the policy but absent: a configuration error, not "unknown".
    let missing = fresh_name("pg-root-rotate-test-missing");
    assert!(matches!(bao(&missing).current_root_version(), Err(ProviderError::Misconfigured(_))));
}

/// Pins what OpenBao's `transit/rewrap` does with `associated_data` (2.7.2): it does not know
/// the parameter, ignores it, and decrypts without associated data. So it cannot rewrap a bound
/// tenant key (the reason the provider decrypts and encrypts instead), and it rewraps an unbound
/// ciphertext into an unbound one. If this test fails, the server has learnt the parameter:
/// switch `VaultTransitProvider::rewrap_tenant_key` to `rewrap` (and add `transit/rewrap/...`
/// to the policy in scripts/kms.sh).
#[test]
#[ignore = "needs OpenBao: run by the integration tier"]
fn openbao_rewrap_endpoint_ignores_associated_data() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let admin = BaoAdmin::new();
    let name = fresh_name("pg-root-rotate-test-rewrap");
    admin.create_key(&name);
    let c = ctx("rewrap-probe", 1);
    let bound = bao(&name).wrap_tenant_key(&c, &SecretKey::generate().unwrap()).unwrap();
    admin.ok("POST", &format!("transit/keys/{name}/rotate"), None);
    let aad = pg_envelope_core::wrap::WrapAad::TenantKey { tenant: c.tenant, tenant_key_id: c.tenant_key_id }.encode();
    let rewrap = |ciphertext: &str| {
        admin.call("POST", &format!("transit/rewrap/{name}"), Some(json!({"ciphertext": ciphertext, "associated_data": b64.encode(&aad)})))
    };

    // A bound ciphertext with the right associated data: refused.
    let (code, v) = rewrap(std::str::from_utf8(&bound).unwrap());
    assert_eq!(code, 400, "{v}");
    assert!(v["errors"][0].as_str().unwrap_or("").contains("message authentication failed"), "{v}");

    // An unbound ciphertext: rewrapped, with a warning that associated_data was ignored, and
    // the result is still unbound (it decrypts without associated data, not with it).
    let plain = b64.encode(b"not a key, just a probe");
    let unbound = admin.ok("POST", &format!("transit/encrypt/{name}"), Some(json!({"plaintext": plain})))["data"]["ciphertext"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, v) = rewrap(&unbound);
    assert_eq!(code, 200, "{v}");
    assert!(v["warnings"].to_string().contains("associated_data"), "no 'ignored associated_data' warning: {v}");
    let out = v["data"]["ciphertext"].as_str().unwrap().to_string();
    assert!(out.starts_with("vault:v2:"), "{out}");
    let (code, _) = admin.call("POST", &format!("transit/decrypt/{name}"), Some(json!({"ciphertext": out, "associated_data": b64.encode(&aad)})));
    assert_eq!(code, 400, "the rewrapped ciphertext gained a binding");
    let back = admin.ok("POST", &format!("transit/decrypt/{name}"), Some(json!({"ciphertext": out})));
    assert_eq!(back["data"]["plaintext"].as_str(), Some(plain.as_str()));
    admin.delete_key(&name);
}

/// AWS KMS administration for the tests (create, disable, describe keys), signed with SigV4 as
/// the `pg-envelope` IAM user that kms.sh created in moto.
struct KmsAdmin {
    agent: ureq::Agent,
    endpoint: String,
    access_key_id: String,
    secret: String,
}

impl KmsAdmin {
    fn new() -> Self {
        let text = std::fs::read_to_string(std::env::var("MOTO_CREDENTIALS").unwrap()).unwrap();
        let get = |k: &str| {
            text.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(key, _)| key.trim() == k)
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_else(|| panic!("{k} in MOTO_CREDENTIALS"))
        };
        KmsAdmin {
            agent: ureq::Agent::new(),
            endpoint: std::env::var("MOTO_ENDPOINT").expect("MOTO_ENDPOINT: run scripts/kms.sh start-moto"),
            access_key_id: get("aws_access_key_id"),
            secret: get("aws_secret_access_key"),
        }
    }

    fn call(&self, target: &str, body: Value) -> Value {
        use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
        let identity = aws_credential_types::Credentials::new(&self.access_key_id, &self.secret, None, None, "test").into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region("us-east-1")
            .name("kms")
            .time(std::time::SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let url = format!("{}/", self.endpoint);
        let payload = serde_json::to_vec(&body).unwrap();
        let amz_target = format!("TrentService.{target}");
        let headers = [("content-type", "application/x-amz-json-1.1"), ("x-amz-target", amz_target.as_str())];
        let signable = SignableRequest::new("POST", &url, headers.iter().copied(), SignableBody::Bytes(&payload)).unwrap();
        let (instructions, _) = sign(signable, &params).unwrap().into_parts();
        let mut req = self.agent.post(&url);
        for (k, v) in headers {
            req = req.set(k, v);
        }
        for (k, v) in instructions.headers() {
            req = req.set(k, v);
        }
        match req.send_bytes(&payload) {
            Ok(resp) => resp.into_json().unwrap(),
            Err(e) => panic!("KMS {target}: {e}"),
        }
    }

    fn create_key(&self, description: &str) -> String {
        self.call("CreateKey", json!({"Description": description}))["KeyMetadata"]["KeyId"].as_str().unwrap().to_string()
    }
}

fn moto_key(key_id: &str) -> AwsKmsProvider {
    moto_key_as(key_id, &std::env::var("MOTO_CREDENTIALS").unwrap())
}

fn moto_key_as(key_id: &str, credentials: &str) -> AwsKmsProvider {
    AwsKmsProvider::new(
        AwsKmsOptions::from_json(&json!({
            "key_id": key_id,
            "region": "us-east-1",
            "endpoint": std::env::var("MOTO_ENDPOINT").expect("MOTO_ENDPOINT: run scripts/kms.sh start-moto"),
            "allow_insecure_http": true,
            "credentials_file": credentials,
        }))
        .unwrap(),
        Duration::from_secs(5),
    )
    .unwrap()
}

#[test]
#[ignore = "needs moto: run by the integration tier"]
fn aws_kms_emulator_root_key_rotation_reencrypts_to_the_new_key() {
    let admin = KmsAdmin::new();
    // Two keys of this test's own: the "old" root key and the one it rotates to.
    let old_id = admin.create_key(&fresh_name("pg-rotate-test-old"));
    let new_id = admin.create_key(&fresh_name("pg-rotate-test-new"));
    let (mut before, mut after) = (moto_key(&old_id), moto_key(&new_id));
    let (c, moved, renumbered) = (ctx("rotating-tenant", 7), ctx("other-tenant", 7), ctx("rotating-tenant", 8));
    assert!(after.rewraps_inside_kms());

    let (raw, kek) = known_key();
    let old = before.wrap_tenant_key(&c, &kek).unwrap();
    // The version is the configured key id; the caller records it at wrap time (the blob does
    // not say, and root_version_of answers with the configured key id whatever the blob).
    let recorded = before.current_root_version().unwrap();
    assert_eq!(recorded.as_deref(), Some(old_id.as_str()));
    assert_eq!(before.root_version_of(&old), recorded);

    // The operator points the provider's key_id at the new key.
    assert_eq!(after.current_root_version().unwrap().as_deref(), Some(new_id.as_str()));
    assert_ne!(after.current_root_version().unwrap(), recorded, "due for a rewrap");
    // Decrypt is pinned to key_id: the new provider does not open blobs of the old key.
    assert_eq!(after.unwrap_tenant_key(&c, &old).map(|_| ()), Err(ProviderError::UnwrapFailed));

    let new = after.rewrap_tenant_key(&c, &old).unwrap();
    assert_eq!(after.root_version_of(&new).as_deref(), Some(new_id.as_str()));
    assert!(same(&after.unwrap_tenant_key(&c, &new).unwrap(), &kek));
    assert_eq!(before.unwrap_tenant_key(&c, &new).map(|_| ()), Err(ProviderError::UnwrapFailed), "not under the new key");
    assert!(!new.windows(32).any(|w| w == raw), "the rewrapped form contains the key");

    // The binding is kept: ReEncrypt with another tenant's context fails, and the result does
    // not open for another tenant; garbage and altered blobs fail the same way.
    assert_eq!(after.rewrap_tenant_key(&moved, &old), Err(ProviderError::UnwrapFailed));
    assert_eq!(after.rewrap_tenant_key(&renumbered, &old), Err(ProviderError::UnwrapFailed));
    assert_eq!(after.unwrap_tenant_key(&moved, &new).map(|_| ()), Err(ProviderError::UnwrapFailed));
    let mut altered = old.clone();
    let last = altered.len() - 1;
    altered[last] ^= 0x01;
    assert_eq!(after.rewrap_tenant_key(&c, &altered), Err(ProviderError::UnwrapFailed));
    assert_eq!(after.rewrap_tenant_key(&c, b"not a KMS ciphertext blob"), Err(ProviderError::UnwrapFailed));
    // A policy that does not allow ReEncrypt is a denial, not a bad blob (moto answers HTTP 403;
    // real KMS 400 AccessDeniedException "... is not authorized to perform: kms:ReEncryptFrom").
    let encrypt_only = std::env::var("MOTO_CREDENTIALS").unwrap().replace("credentials", "encrypt-only-credentials");
    let denied = moto_key_as(&new_id, &encrypt_only).rewrap_tenant_key(&c, &old);
    assert!(matches!(denied, Err(ProviderError::Denied(_))), "{denied:?}");

    // The operator disables the old key: the rewrapped key still unwraps, and through the
    // rotated provider the old blob does not.
    admin.call("DisableKey", json!({"KeyId": old_id}));
    let state = admin.call("DescribeKey", json!({"KeyId": old_id}))["KeyMetadata"]["KeyState"].clone();
    assert_eq!(state, "Disabled");
    assert!(same(&after.unwrap_tenant_key(&c, &new).unwrap(), &kek));
    assert_eq!(after.unwrap_tenant_key(&c, &old).map(|_| ()), Err(ProviderError::UnwrapFailed));
    // Real KMS refuses any use of a disabled key (DisabledException). moto 5.2.5 only records
    // the state: Decrypt and ReEncrypt with a disabled key still succeed there.
    match before.unwrap_tenant_key(&c, &old) {
        Err(ProviderError::Denied(m)) => assert!(m.contains("DisabledException"), "{m}"),
        Ok(k) => {
            assert!(same(&k, &kek));
            eprintln!("note: this KMS emulator does not enforce DisableKey (moto 5.2.5 does not)");
        }
        Err(e) => panic!("unexpected error for a disabled key: {e:?}"),
    }
    admin.call("ScheduleKeyDeletion", json!({"KeyId": old_id, "PendingWindowInDays": 7}));
    admin.call("ScheduleKeyDeletion", json!({"KeyId": new_id, "PendingWindowInDays": 7}));
}

#[test]
#[ignore = "needs SoftHSM2: run by the integration tier"]
fn softhsm_rewrap_is_unwrap_and_wrap_under_the_configured_label() {
    let _one_at_a_time = HSM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (mut p, mut other) = (hsm("pg-kek"), hsm("pg-kek-2"));
    let (c, moved) = (ctx("rotating-tenant", 7), ctx("other-tenant", 7));
    assert!(!p.rewraps_inside_kms());
    assert_eq!(p.current_root_version().unwrap().as_deref(), Some("pg-kek"));
    let (raw, kek) = known_key();
    let old = p.wrap_tenant_key(&c, &kek).unwrap();
    assert_eq!(p.root_version_of(&old), None, "the blob does not name its key");
    let new = p.rewrap_tenant_key(&c, &old).unwrap();
    assert_ne!(new, old, "a fresh IV");
    assert!(!new.windows(32).any(|w| w == raw));
    assert!(same(&p.unwrap_tenant_key(&c, &new).unwrap(), &kek));
    assert_eq!(p.rewrap_tenant_key(&moved, &old), Err(ProviderError::UnwrapFailed));
    // One label per provider: moving tenants to a new key is unwrap with the old provider and
    // wrap with the new one; the new provider alone cannot open the old blob.
    assert_eq!(other.rewrap_tenant_key(&c, &old), Err(ProviderError::UnwrapFailed));
    let moved_key = other.wrap_tenant_key(&c, &p.unwrap_tenant_key(&c, &old).unwrap()).unwrap();
    assert!(same(&other.unwrap_tenant_key(&c, &moved_key).unwrap(), &kek));
}

/// A token file (0600, in a fresh directory) for a token with `policy` only.
fn bao_token_file(admin: &BaoAdmin, policy_name: &str, rules: &[(String, &str)]) -> (tempfile::TempDir, String) {
    let hcl: Vec<String> = rules.iter().map(|(p, caps)| format!("path \"{p}\" {{ capabilities = [{caps}] }}")).collect();
    admin.ok("PUT", &format!("sys/policies/acl/{policy_name}"), Some(json!({"policy": hcl.join("\n")})));
    let token = admin.ok("POST", "auth/token/create", Some(json!({"policies": [policy_name], "ttl": "10m", "no_default_policy": true})))
        ["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, token).unwrap();
    (dir, path.to_str().unwrap().to_string())
}

fn bao_with_token(key: &str, token_file: &str) -> VaultTransitProvider {
    let opts = VaultTransitOptions::from_json(&json!({
        "url": std::env::var("BAO_ADDR").unwrap(),
        "key": key,
        "token_file": token_file,
        "ca_file": format!("{}/openbao/ca.pem", state_dir()),
    }))
    .unwrap();
    VaultTransitProvider::new(opts, Duration::from_secs(5)).unwrap()
}

#[test]
#[ignore = "needs OpenBao: run by the integration tier"]
fn openbao_dedicated_root_key_is_deleted_and_nothing_unwraps_after() {
    let admin = BaoAdmin::new();
    let key = fresh_name("pg-shred-test");
    admin.create_key(&key);
    admin.ok("POST", &format!("transit/keys/{key}/rotate"), None); // two versions: both go
    let t = |p: &str| format!("transit/{p}");
    let wrap_rules = vec![
        (t(&format!("encrypt/{key}")), "\"update\""),
        (t(&format!("decrypt/{key}")), "\"update\""),
        (t(&format!("keys/{key}")), "\"read\""),
    ];
    // A token that may use the key but not delete it: the destruction is refused, clearly,
    // and the key keeps working.
    let (_d1, use_only) = bao_token_file(&admin, &format!("{key}-use"), &wrap_rules);
    let (_raw, kek) = known_key();
    let c = ctx("shredded-tenant", 9);
    let wrapped = bao_with_token(&key, &use_only).wrap_tenant_key(&c, &kek).unwrap();
    match bao_with_token(&key, &use_only).destroy_root_key() {
        Err(ProviderError::Denied(m)) => assert!(m.contains("delete") && m.contains("HTTP 403"), "{m}"),
        other => panic!("a token without delete must be refused: {other:?}"),
    }
    assert!(same(&bao_with_token(&key, &use_only).unwrap_tenant_key(&c, &wrapped).unwrap(), &kek));

    // With config + delete on this key alone: deleted, every version, and nothing unwraps.
    let mut rules = wrap_rules.clone();
    rules[2] = (t(&format!("keys/{key}")), "\"read\", \"delete\"");
    rules.push((t(&format!("keys/{key}/config")), "\"update\""));
    let (_d2, owner) = bao_token_file(&admin, &format!("{key}-owner"), &rules);
    let mut p = bao_with_token(&key, &owner);
    let what = p.destroy_root_key().unwrap();
    assert!(what.contains("deleted with its 2 version(s)"), "{what}");
    assert_eq!(admin.call("GET", &format!("transit/keys/{key}"), None).0, 404, "the key is gone from OpenBao");
    match p.unwrap_tenant_key(&c, &wrapped) {
        Err(ProviderError::Denied(m)) => assert!(m.contains("does not exist"), "{m}"),
        Err(e) => panic!("a deleted key must say so: {e:?}"),
        Ok(_) => panic!("a tenant key unwrapped after its root key was deleted"),
    }
    // Idempotent: a second call (a retry after a crash) is success, and says so.
    assert!(p.destroy_root_key().unwrap().contains("already deleted"));
    // A key created again under the same name is a new key: the old wrapping does not open.
    admin.create_key(&key);
    assert!(p.unwrap_tenant_key(&c, &wrapped).is_err());
    admin.delete_key(&key);
}

#[test]
#[ignore = "needs moto: run by the integration tier"]
fn aws_kms_emulator_dedicated_root_keys_are_scheduled_for_deletion() {
    let admin = KmsAdmin::new();
    let (current, previous) = (admin.create_key(&fresh_name("pg-shred-test")), admin.create_key(&fresh_name("pg-shred-test-old")));
    let mut p = AwsKmsProvider::new(
        AwsKmsOptions::from_json(&json!({
            "key_id": current, "previous_key_ids": previous, "deletion_window_days": 8,
            "region": "us-east-1", "endpoint": std::env::var("MOTO_ENDPOINT").unwrap(), "allow_insecure_http": true,
            "credentials_file": std::env::var("MOTO_CREDENTIALS").unwrap(),
        }))
        .unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    let what = p.destroy_root_key().unwrap();
    assert!(what.contains(&format!("AWS KMS key {current} pending deletion on ")), "{what}");
    assert!(what.contains(&format!("AWS KMS key {previous} pending deletion on ")), "previous keys too: {what}");
    for k in [&current, &previous] {
        let m = admin.call("DescribeKey", json!({"KeyId": k}))["KeyMetadata"].clone();
        assert_eq!(m["KeyState"], "PendingDeletion", "{m}");
    }
    // The encrypt-only user may not schedule deletions: a denial.
    let encrypt_only = std::env::var("MOTO_CREDENTIALS").unwrap().replace("credentials", "encrypt-only-credentials");
    let other = admin.create_key(&fresh_name("pg-shred-test-denied"));
    assert!(matches!(moto_key_as(&other, &encrypt_only).destroy_root_key(), Err(ProviderError::Denied(_))));
    // Idempotent: a second call (a retry after a crash) succeeds and the keys stay pending
    // deletion. (Real KMS answers KMSInvalidStateException, reported as "already pending
    // deletion"; moto reschedules. Real KMS also refuses Decrypt from now on, mapped to a
    // denial; moto 5.x does not enforce the state.)
    let again = p.destroy_root_key().unwrap();
    assert!(again.contains(&current) && again.contains(&previous), "{again}");
    for k in [&current, &previous] {
        assert_eq!(admin.call("DescribeKey", json!({"KeyId": k}))["KeyMetadata"]["KeyState"], "PendingDeletion");
    }
    admin.call("ScheduleKeyDeletion", json!({"KeyId": other, "PendingWindowInDays": 7}));
}

#[test]
#[ignore = "needs SoftHSM2: run by the integration tier"]
fn softhsm_dedicated_root_key_is_destroyed() {
    let _one_at_a_time = HSM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let label = fresh_name("pg-shred-test");
    let pin = std::fs::read_to_string(format!("{}/softhsm/pin", state_dir())).unwrap();
    let ok = std::process::Command::new("pkcs11-tool")
        .args(["--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label", "pg-envelope", "--login", "--pin", pin.trim()])
        .args(["--keygen", "--key-type", "AES:32", "--label", &label, "--sensitive", "--private", "--usage-decrypt", "--usage-wrap"])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let mut p = hsm(&label);
    let (_raw, kek) = known_key();
    let c = ctx("shredded-tenant", 3);
    let wrapped = p.wrap_tenant_key(&c, &kek).unwrap();
    assert!(same(&p.unwrap_tenant_key(&c, &wrapped).unwrap(), &kek));
    assert!(p.destroy_root_key().unwrap().contains("destroyed"));
    assert!(matches!(p.unwrap_tenant_key(&c, &wrapped), Err(ProviderError::NotConfigured(_))), "the key is gone from the token");
    assert!(p.destroy_root_key().unwrap().contains("already destroyed"));
    // The other keys on the token are untouched.
    assert_eq!(hsm("pg-kek").current_root_version().unwrap().as_deref(), Some("pg-kek"));
}

// ---------------------------------------------------------------------------------------------
// Audit checkpoints: a MAC made inside the key server (Transit hmac/verify, GenerateMac/VerifyMac,
// CKM_SHA256_HMAC), through the same contract as the local provider's.

use pg_envelope_core::provider::testing::checkpoint_contract;

fn bao_hmac(hmac_key: &str) -> VaultTransitProvider {
    bao_with(json!({ "key": "pg-root", "hmac_key": hmac_key }))
}

#[test]
#[ignore = "needs OpenBao: run by the integration tier"]
fn openbao_checkpoint_macs_stay_in_transit() {
    // pg-audit (the provider token's policy allows hmac/verify on it, scripts/kms.sh) against a
    // fresh hmac key reached with a token of its own.
    let admin = BaoAdmin::new();
    let other = fresh_name("pg-audit-other");
    admin.ok("POST", &format!("transit/keys/{other}"), Some(json!({"type": "hmac", "key_size": 32})));
    let (_dir, token) = bao_token_file(
        &admin,
        &fresh_name("pg-audit-policy"),
        &[(format!("transit/hmac/{other}/*"), "\"update\""), (format!("transit/verify/{other}/*"), "\"update\"")],
    );
    let mut other_p = VaultTransitProvider::new(
        VaultTransitOptions::from_json(&json!({
            "url": std::env::var("BAO_ADDR").unwrap(), "key": "pg-root", "hmac_key": other,
            "token_file": token, "ca_file": format!("{}/openbao/ca.pem", state_dir()),
        }))
        .unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    checkpoint_contract(&mut bao_hmac("pg-audit"), &mut other_p);
    let m = bao_hmac("pg-audit").checkpoint_mac(b"m").unwrap();
    assert!(String::from_utf8(m.mac).unwrap().starts_with("vault:v1:"), "Transit's own MAC form");
    // The provider's token may not MAC with a key its policy does not name: a refusal, not a
    // mismatch.
    let err = bao_hmac(&other).checkpoint_mac(b"m").unwrap_err();
    assert!(matches!(err, ProviderError::Denied(ref m) if m.contains("403")), "{err}");
    let err = bao_hmac(&other).verify_checkpoint_mac(b"m", b"vault:v1:AAAA").unwrap_err();
    assert!(matches!(err, ProviderError::Denied(_)), "{err}");
    admin.delete_key(&other);
}

#[test]
#[ignore = "needs moto: run by the integration tier"]
fn aws_kms_emulator_checkpoint_macs_use_generate_mac() {
    let admin = KmsAdmin::new();
    let mac_key = |id: &str| {
        AwsKmsProvider::new(
            AwsKmsOptions::from_json(&json!({
                "key_id": std::env::var("MOTO_KEY_ID").unwrap(), "mac_key_id": id, "region": "us-east-1",
                "endpoint": std::env::var("MOTO_ENDPOINT").unwrap(), "allow_insecure_http": true,
                "credentials_file": std::env::var("MOTO_CREDENTIALS").unwrap(),
            }))
            .unwrap(),
            Duration::from_secs(5),
        )
        .unwrap()
    };
    let other = admin.call("CreateKey", json!({"Description": "pg-audit-other", "KeySpec": "HMAC_256", "KeyUsage": "GENERATE_VERIFY_MAC"}))
        ["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_string();
    checkpoint_contract(&mut mac_key(&std::env::var("MOTO_MAC_KEY_ID").unwrap()), &mut mac_key(&other));
    // An encryption key cannot MAC: a configuration error that says what key is needed.
    let err = moto_key(&std::env::var("MOTO_KEY_ID").unwrap()).checkpoint_mac(b"m").unwrap_err();
    assert!(matches!(err, ProviderError::Misconfigured(ref m) if m.contains("HMAC_256")), "{err}");
    // (A disabled MAC key: real KMS refuses with DisabledException, mapped to Denied like every
    // disabled key; moto 5 still MACs with it, so that case is not exercised here.)
}

#[test]
#[ignore = "needs SoftHSM2: run by the integration tier"]
fn softhsm_checkpoint_macs_are_made_in_the_token() {
    let _one_at_a_time = HSM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let label = fresh_name("pg-audit-other");
    let pin = std::fs::read_to_string(format!("{}/softhsm/pin", state_dir())).unwrap();
    let ok = std::process::Command::new("pkcs11-tool")
        .args(["--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label", "pg-envelope", "--login", "--pin", pin.trim()])
        .args(["--keygen", "--key-type", "GENERIC:32", "--label", &label, "--sensitive", "--private", "--usage-sign"])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let with_mac_key = |l: &str| {
        Pkcs11Provider::new(
            Pkcs11Options::from_json(&json!({
                "module": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "pg-envelope", "key_label": "pg-kek",
                "mac_key_label": l, "pin_file": format!("{}/softhsm/pin", state_dir()),
            }))
            .unwrap(),
        )
    };
    checkpoint_contract(&mut with_mac_key("pg-audit"), &mut with_mac_key(&label));
    // The AES wrapping key is not an HMAC key: a configuration error, not a MAC.
    let err = hsm("pg-kek").checkpoint_mac(b"m").unwrap_err();
    assert!(matches!(err, ProviderError::Misconfigured(_) | ProviderError::Denied(_)), "{err}");
    let del = std::process::Command::new("pkcs11-tool")
        .args(["--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label", "pg-envelope", "--login", "--pin", pin.trim()])
        .args(["--delete-object", "--type", "secrkey", "--label", &label])
        .output()
        .unwrap();
    assert!(del.status.success(), "{}", String::from_utf8_lossy(&del.stderr));
}
