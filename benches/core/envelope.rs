//! Core benchmarks: envelope encrypt/decrypt from 16 B to 64 KiB against bare AES-256-GCM with
//! a cached key (the floor), envelope parsing, the cache-hit path, and the per-prefix XAES key
//! derivation (paid once per backend per DEK on encrypt, once per distinct writer on decrypt).

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes_gcm::aead::{inout::InOutBuf, AeadInOut, KeyInit};
use aes_gcm::Aes256Gcm;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pg_envelope_core::provider::testing::InsecureTestProvider;
use pg_envelope_core::wrap::{self, WrapAad};
use pg_envelope_core::{BackendRng, DataKey, Envelope, KeyCache, KeyContext, KeyProvider, SecretKey, TenantRecord, WrappedDek};
use rand_core::RngCore;

const SIZES: [usize; 7] = [16, 64, 256, 1024, 4096, 16384, 65536];

fn configure() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(30)
}

fn encrypt(c: &mut Criterion) {
    let mut g = c.benchmark_group("encrypt");
    let mut rng = BackendRng::new();
    let mut dek = DataKey::new(1, 1, &SecretKey::from_slice(&[1u8; 32]).unwrap());
    let floor = Aes256Gcm::new((&[2u8; 32]).into());
    for size in SIZES {
        let pt = vec![0x5Au8; size];
        let mut out = vec![0u8; pg_envelope_core::envelope_len(size)];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("envelope", size), &size, |b, _| {
            b.iter(|| dek.encrypt_into(&mut rng, "tenant-0042", None, black_box(&pt), &mut out))
        });
        let mut body = vec![0u8; size];
        g.bench_with_input(BenchmarkId::new("floor_aes256gcm", size), &size, |b, _| {
            b.iter(|| {
                let mut nonce = [0u8; 12];
                rng.fill_bytes(&mut nonce);
                let n = aes_gcm::Nonce::<aes_gcm::aead::consts::U12>::from(nonce);
                black_box(floor.encrypt_inout_detached(&n, b"", InOutBuf::new(black_box(&pt), &mut body).unwrap()).unwrap())
            })
        });
    }
    g.finish();
}

fn decrypt(c: &mut Criterion) {
    let mut g = c.benchmark_group("decrypt");
    let mut rng = BackendRng::new();
    let mut dek = DataKey::new(1, 1, &SecretKey::from_slice(&[1u8; 32]).unwrap());
    for size in SIZES {
        let env = dek.encrypt(&mut rng, "tenant-0042", None, &vec![0x5Au8; size]);
        let mut out = vec![0u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("envelope", size), &size, |b, _| {
            b.iter(|| {
                let parsed = Envelope::parse(black_box(&env)).unwrap();
                dek.decrypt_into("tenant-0042", None, &parsed, &mut out).unwrap()
            })
        });
    }
    g.finish();
}

fn misc(c: &mut Criterion) {
    let mut rng = BackendRng::new();
    let mut dek = DataKey::new(1, 1, &SecretKey::from_slice(&[1u8; 32]).unwrap());
    let env = dek.encrypt(&mut rng, "t", None, b"0123456789abcdef");
    c.bench_function("parse_envelope", |b| b.iter(|| Envelope::parse(black_box(&env)).unwrap().plaintext_len()));
    c.bench_function("xaes_prefix_derivation", |b| {
        let mut prefix = [0u8; 12];
        b.iter(|| {
            prefix[0] = prefix[0].wrapping_add(1);
            black_box(pg_envelope_core::datakey::xaes_derive_for_test(&[3u8; 32], &prefix))
        })
    });
    // The cache-hit path: look up a tenant among 100 and encrypt 16 bytes.
    let mut p = InsecureTestProvider::new();
    let mut cache: KeyCache = KeyCache::new(Duration::from_secs(3600));
    let now = Instant::now();
    let names: Vec<String> = (0..100).map(|i| format!("tenant-{i:04}")).collect();
    for (i, name) in names.iter().enumerate() {
        let kek = SecretKey::generate().unwrap();
        let id = i as u32 + 1;
        let wrapped_tenant_key = p.wrap_tenant_key(&KeyContext { tenant: name, tenant_key_id: id }, &kek).unwrap();
        let dek = SecretKey::generate().unwrap();
        let aad = WrapAad::DataKey { tenant: name, tenant_key_id: id, version: 1 };
        let rec = TenantRecord {
            tenant: name.clone(),
            tenant_key_id: id,
            wrapped_tenant_key,
            tenant_key_check: Some(wrap::tenant_key_check(&kek)),
            active_dek_version: 1,
            deks: vec![WrappedDek { version: 1, wrapped: wrap::wrap_key(&kek, &aad, &dek).unwrap() }],
            unusable: vec![],
            index_keys: vec![],
            active_index_version: 0,
        };
        cache.load(&mut p, &rec, (), now).unwrap();
    }
    let mut out = vec![0u8; pg_envelope_core::envelope_len(16)];
    let mut i = 0usize;
    c.bench_function("cache_hit_encrypt_16B_100_tenants", |b| {
        b.iter(|| {
            i = (i + 1) % 100;
            let e = cache.get(&names[i], now).unwrap();
            e.keys.active().encrypt_into(&mut rng, &names[i], None, b"0123456789abcdef", &mut out)
        })
    });
    let root = SecretKey::generate().unwrap();
    let kek = SecretKey::generate().unwrap();
    let aad = WrapAad::TenantKey { tenant: "t", tenant_key_id: 1 };
    let w = wrap::wrap_key(&root, &aad, &kek).unwrap();
    c.bench_function("unwrap_key", |b| b.iter(|| wrap::unwrap_key(&root, &aad, black_box(&w)).unwrap()));
    // What a transaction that used keys pays at its end (128 KiB of stack + vector registers).
    c.bench_function("wipe_stack_128KiB", |b| b.iter(pg_envelope_core::secure::wipe_stack));
}

/// AES-256-GCM implementations side by side, seal and open, with no AAD and with 32 bytes of AAD
/// (an envelope's header, tenant and context): aes-gcm (RustCrypto, what the extension uses) and
/// ring (BoringSSL's assembly). docs/design-decisions.md records the choice these figures made.
fn aead_impl(c: &mut Criterion) {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    let mut g = c.benchmark_group("aead_impl");
    let rc = Aes256Gcm::new((&[2u8; 32]).into());
    let rk = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[2u8; 32]).unwrap());
    for size in [16usize, 64, 1024, 16384] {
        for aad_len in [0usize, 32] {
            let aad = vec![0xA5u8; aad_len];
            let pt = vec![0x5Au8; size];
            let mut body = vec![0u8; size];
            let n = aes_gcm::Nonce::<aes_gcm::aead::consts::U12>::from([3u8; 12]);
            g.bench_function(format!("aes-gcm_seal/{size}/aad{aad_len}"), |b| {
                b.iter(|| black_box(rc.encrypt_inout_detached(&n, &aad, InOutBuf::new(black_box(&pt), &mut body).unwrap()).unwrap()))
            });
            let tag = rc.encrypt_inout_detached(&n, &aad, InOutBuf::new(&pt, &mut body).unwrap()).unwrap();
            let ct = body.clone();
            let mut out = vec![0u8; size];
            g.bench_function(format!("aes-gcm_open/{size}/aad{aad_len}"), |b| {
                b.iter(|| rc.decrypt_inout_detached(&n, &aad, InOutBuf::new(black_box(&ct), &mut out).unwrap(), &tag).unwrap())
            });
            let mut buf = pt.clone();
            g.bench_function(format!("ring_seal/{size}/aad{aad_len}"), |b| {
                b.iter(|| {
                    buf.copy_from_slice(black_box(&pt));
                    black_box(rk.seal_in_place_separate_tag(Nonce::assume_unique_for_key([3u8; 12]), Aad::from(&aad), &mut buf).unwrap())
                })
            });
            let mut sealed = pt.clone();
            let rtag = rk.seal_in_place_separate_tag(Nonce::assume_unique_for_key([3u8; 12]), Aad::from(&aad), &mut sealed).unwrap();
            sealed.extend_from_slice(rtag.as_ref());
            let mut work = sealed.clone();
            g.bench_function(format!("ring_open/{size}/aad{aad_len}"), |b| {
                b.iter(|| {
                    work.copy_from_slice(black_box(&sealed));
                    black_box(rk.open_in_place(Nonce::assume_unique_for_key([3u8; 12]), Aad::from(&aad), &mut work).unwrap().len())
                })
            });
        }
    }
    g.finish();
}

criterion_group! { name = benches; config = configure(); targets = encrypt, decrypt, misc, aead_impl }
criterion_main!(benches);
