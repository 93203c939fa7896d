//! The provider contract suite against real key servers. Ignored in the fast core tier; the
//! integration tier starts the servers (scripts/kms.sh) and runs
//! `cargo test -p pg_envelope_core --features vault,testing --test kms_contract -- --ignored`.
//! A missing server is a failure there, never a silent skip.
#![cfg(all(feature = "vault", feature = "pkcs11", feature = "testing"))]

use std::time::Duration;

use pg_envelope_core::provider::testing::provider_contract;
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
