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
    let state = std::env::var("PGE_STATE").unwrap_or_else(|_| "/var/lib/pg_envelope-dev".into());
    let opts = VaultTransitOptions::from_json(&serde_json::json!({
        "url": std::env::var("BAO_ADDR").expect("BAO_ADDR: start OpenBao with scripts/kms.sh start-openbao"),
        "key": key,
        "token_file": format!("{state}/openbao/token"),
        "ca_file": format!("{state}/openbao/ca.pem"),
    }))
    .unwrap();
    VaultTransitProvider::new(opts, Duration::from_secs(5)).unwrap()
}

#[test]
#[ignore = "needs OpenBao: run by the integration tier"]
fn openbao_transit_passes_the_provider_contract() {
    provider_contract(&mut bao("pg-root"), &mut bao("pg-root-2"));
}

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
