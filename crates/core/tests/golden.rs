//! Golden envelopes: bytes produced by each format version (v1, v2, v3), checked into the
//! repository. Every later version of pg_envelope must still open them, through the whole chain
//! root key -> wrapped tenant key -> wrapped DEK -> envelope.
//!
//! To add vectors after a deliberate format addition (never to change existing ones):
//! `PGE_REGENERATE_GOLDEN=1 cargo test -p pg_envelope_core --test golden` writes
//! `tests/golden/generated.txt` in the current format; review it and append new lines to the
//! file of that version (a new version gets a new file).

use std::collections::HashMap;

use pg_envelope_core::wrap::{self, WrapAad};
use pg_envelope_core::{DataKey, Envelope, SecretKey};
use rand_core::SeedableRng;

const GOLDEN: &[(u8, &str)] = &[
    (1, include_str!("golden/v1.txt")),
    (2, include_str!("golden/v2.txt")),
    (3, include_str!("golden/v3.txt")),
];

fn fields(line: &str) -> HashMap<&str, &str> {
    line.split_whitespace().skip(1).filter_map(|kv| kv.split_once('=')).collect()
}

fn ctx(v: &str) -> Option<Vec<u8>> {
    (v != "-").then(|| hex::decode(v).unwrap())
}

#[test]
fn every_golden_envelope_still_decrypts() {
    for &(format, text) in GOLDEN {
        let n = check_golden_file(format, text);
        assert!(n >= 6, "golden file v{format} has {n} chains");
    }
}

#[test]
fn new_envelopes_are_written_in_the_current_format() {
    let dek = SecretKey::from_slice(&[9u8; 32]).unwrap();
    let mut rng = rand_chacha::ChaCha20Rng::from_seed([1u8; 32]);
    let env = DataKey::new(1, 1, &dek).encrypt(&mut rng, "t", None, b"x");
    assert_eq!(env[0], pg_envelope_core::envelope::CURRENT_VERSION);
    assert_eq!(GOLDEN.last().unwrap().0, pg_envelope_core::envelope::CURRENT_VERSION, "the current format has golden vectors");
}

fn check_golden_file(format: u8, text: &str) -> usize {
    let mut n = 0;
    for line in text.lines().filter(|l| l.starts_with("chain ")) {
        let f = fields(line);
        let root = SecretKey::from_slice(&hex::decode(f["root"]).unwrap()).unwrap();
        let tenant = f["tenant"];
        let id: u32 = f["tenant_key_id"].parse().unwrap();
        let version: u32 = f["dek_version"].parse().unwrap();
        let kek = wrap::unwrap_key(&root, &WrapAad::TenantKey { tenant, tenant_key_id: id }, &hex::decode(f["wrapped_kek"]).unwrap())
            .expect("golden tenant key unwraps");
        let dek = wrap::unwrap_key(
            &kek,
            &WrapAad::DataKey { tenant, tenant_key_id: id, version },
            &hex::decode(f["wrapped_dek"]).unwrap(),
        )
        .expect("golden DEK unwraps");
        let mut key = DataKey::new(id, version, &dek);
        let envelope = hex::decode(f["envelope"]).unwrap();
        let parsed = Envelope::parse(&envelope).unwrap();
        assert_eq!((parsed.version, parsed.tenant_key_id, parsed.dek_version), (format, id, version));
        let context = ctx(f["context"]);
        let pt = key.decrypt(tenant, context.as_deref(), &envelope).expect("golden envelope decrypts");
        assert_eq!(hex::encode(pt), f["plaintext"]);
        // And it is bound: the other context choice fails.
        let other = if context.is_some() { None } else { Some(&b""[..]) };
        assert!(key.decrypt(tenant, other, &envelope).is_err());
        // The versions differ in their AAD (v1 authenticates the commitment, v3 binds the
        // encrypted types' contexts as one byte): the same bytes relabelled as any other version
        // must not open (the version byte itself is authenticated).
        for other in [1u8, 2, 3].into_iter().filter(|&v| v != format) {
            let mut relabelled = envelope.clone();
            relabelled[0] = other;
            assert!(key.decrypt(tenant, context.as_deref(), &relabelled).is_err(), "v{format} relabelled v{other}");
        }
        n += 1;
    }
    n
}

#[test]
fn regenerate_golden_vectors_on_request() {
    if std::env::var_os("PGE_REGENERATE_GOLDEN").is_none() {
        return;
    }
    let mut rng = rand_chacha::ChaCha20Rng::from_seed([42u8; 32]);
    let root_bytes = [0x11u8; 32];
    let root = SecretKey::from_slice(&root_bytes).unwrap();
    let cases: &[(&str, u32, u32, Option<&[u8]>, &[u8])] = &[
        ("acme", 7, 1, None, b""),
        ("acme", 7, 1, None, b"x"),
        ("acme", 7, 1, Some(b"users.email"), b"alice@example.com"),
        ("acme", 7, 3, Some(b""), b"empty context, not no context"),
        ("globex", 12, 2, None, "ünïcödé ✓ 日本".as_bytes()),
        ("globex", 12, 2, Some(b"orders.note"), &[0xA5; 1000]),
        // The encrypted types' contexts (bound as one-byte type codes from v3 on).
        ("acme", 7, 1, Some(b"pg_envelope/type/text"), b"typed text"),
        ("acme", 7, 1, Some(b"pg_envelope/type/int8"), &42i64.to_be_bytes()),
        ("globex", 12, 2, Some(b"pg_envelope/type/timestamptz"), &830_000_000_000_000i64.to_be_bytes()),
        ("globex", 12, 2, Some(b"pg_envelope/type/jsonb"), br#"{"a": 1}"#),
        // Appended to v3 only: every type code is pinned by a vector.
        ("acme", 7, 1, Some(b"pg_envelope/type/bytea"), b"\x00\x01typed bytes"),
        ("acme", 7, 1, Some(b"pg_envelope/type/numeric"), &[0, 1, 0, 0, 0, 0, 0, 0, 0, 42]),
        ("globex", 12, 2, Some(b"pg_envelope/type/date"), &9_000i32.to_be_bytes()),
    ];
    let mut out = format!(
        "# generated in format v{}; review, then append new lines to that version's file\n",
        pg_envelope_core::envelope::CURRENT_VERSION
    );
    for (tenant, id, version, context, pt) in cases {
        let kek = SecretKey::generate_with(&mut rng);
        let dek = SecretKey::generate_with(&mut rng);
        let wrapped_kek = wrap::wrap_key(&root, &WrapAad::TenantKey { tenant, tenant_key_id: *id }, &kek).unwrap();
        let wrapped_dek =
            wrap::wrap_key(&kek, &WrapAad::DataKey { tenant, tenant_key_id: *id, version: *version }, &dek).unwrap();
        let env = DataKey::new(*id, *version, &dek).encrypt(&mut rng, tenant, *context, pt);
        out.push_str(&format!(
            "chain root={} tenant={} tenant_key_id={} dek_version={} wrapped_kek={} wrapped_dek={} context={} plaintext={} envelope={}\n",
            hex::encode(root_bytes),
            tenant,
            id,
            version,
            hex::encode(wrapped_kek),
            hex::encode(wrapped_dek),
            context.map(hex::encode).unwrap_or_else(|| "-".into()),
            hex::encode(pt),
            hex::encode(env)
        ));
    }
    std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/generated.txt"), out).unwrap();
}
