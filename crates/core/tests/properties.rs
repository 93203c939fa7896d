//! Property tests: round trips for every size from 0 to 64 KiB, single-bit tampering anywhere
//! fails, and malformed input never panics.

use pg_envelope_core::{envelope_len, BackendRng, DataKey, Envelope, SecretKey, OVERHEAD};
use proptest::prelude::*;

fn key(b: u8) -> DataKey {
    DataKey::new(5, 2, &SecretKey::from_slice(&[b; 32]).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_any_size_tenant_and_context(
        pt in prop::collection::vec(any::<u8>(), 0..=65536),
        tenant in "[a-z0-9_-]{1,40}",
        context in prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
    ) {
        let mut rng = BackendRng::new();
        let mut k = key(1);
        let env = k.encrypt(&mut rng, &tenant, context.as_deref(), &pt);
        prop_assert_eq!(env.len(), envelope_len(pt.len()));
        prop_assert_eq!(env.len(), pt.len() + OVERHEAD);
        let back = k.decrypt(&tenant, context.as_deref(), &env).unwrap();
        prop_assert_eq!(back, pt);
    }

    #[test]
    fn any_single_bit_flip_fails(pt in prop::collection::vec(any::<u8>(), 0..256), bit in any::<prop::sample::Index>()) {
        let mut rng = BackendRng::new();
        let mut k = key(2);
        let mut env = k.encrypt(&mut rng, "t", Some(b"c"), &pt);
        let i = bit.index(env.len() * 8);
        env[i / 8] ^= 1 << (i % 8);
        prop_assert!(k.decrypt("t", Some(b"c"), &env).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Envelope::parse(&bytes);
        let mut k = key(3);
        prop_assert!(k.decrypt("t", None, &bytes).is_err());
    }

    #[test]
    fn valid_header_with_garbage_body_never_panics(tail in prop::collection::vec(any::<u8>(), 0..300)) {
        // Starts like a real v1 envelope for this key (right id, version, commitment).
        let mut rng = BackendRng::new();
        let mut k = key(4);
        let real = k.encrypt(&mut rng, "t", None, b"x");
        let mut forged = real[..42].to_vec();
        forged.extend_from_slice(&tail);
        prop_assert!(k.decrypt("t", None, &forged).is_err());
    }

    #[test]
    fn truncation_at_every_length_fails(pt in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut rng = BackendRng::new();
        let mut k = key(5);
        let env = k.encrypt(&mut rng, "t", None, &pt);
        for cut in 0..env.len() {
            prop_assert!(k.decrypt("t", None, &env[..cut]).is_err());
        }
    }
}

#[test]
fn every_bit_of_one_envelope() {
    // Exhaustive over one envelope: header, commitment, nonce, ciphertext and tag.
    let mut rng = BackendRng::new();
    let mut k = key(6);
    let env = k.encrypt(&mut rng, "acme", Some(b"users.ssn"), b"123-45-6789");
    for i in 0..env.len() * 8 {
        let mut t = env.clone();
        t[i / 8] ^= 1 << (i % 8);
        assert!(k.decrypt("acme", Some(b"users.ssn"), &t).is_err(), "bit {i} flipped still decrypts");
    }
}

#[test]
fn a_ciphertext_does_not_open_under_another_key_with_forged_header() {
    // Key commitment: even with the header rewritten to the other key's commitment,
    // decryption under a different key fails.
    let mut rng = BackendRng::new();
    let mut a = key(7);
    let b = key(8);
    let mut env = a.encrypt(&mut rng, "t", None, b"secret");
    env[10..42].copy_from_slice(b.commitment());
    let mut b = b;
    assert!(b.decrypt("t", None, &env).is_err());
    assert!(a.decrypt("t", None, &env).is_err());
}
