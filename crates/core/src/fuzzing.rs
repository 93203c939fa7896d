//! Entry points for coverage-guided fuzzing (`fuzz/`, cargo-fuzz with libFuzzer) and for the
//! corpus replay test that runs in the core tier on stable Rust. Each takes untrusted bytes and
//! must return without panicking, whatever they are; the checks inside are properties that hold
//! for every input (a parsed value re-encodes to the same bytes, a decryption of bytes that were
//! not made with the key fails, a term round-trips through its text form).
//!
//! Parsers covered: envelopes (header, v1/v2 layouts) and their decryption, wrapped keys (the
//! DEK/KEK/index-key wrapping), blind-index terms (binary and text forms), purpose names and
//! normalisations, numeric canonicalisation, text normalisation, provider options (Transit, AWS
//! KMS, PKCS#11 JSON), AWS credentials files, durations and the local provider's key file.
//! Provider *responses* are parsed inside the providers' HTTP calls and are not reachable here
//! (docs/testing.md says so).

use crate::datakey::DataKey;
use crate::envelope::Envelope;
use crate::search::{IndexKey, Normalization, Term, Value, ValueKind};
use crate::secret::SecretKey;
use crate::wrap::{self, WrapAad};

/// The fuzz targets by name (the directory names of `fuzz/corpus/`).
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("envelope", envelope),
    ("wrapped_key", wrapped_key),
    ("term", term),
    ("search_value", search_value),
    ("provider_options", provider_options),
    ("text_inputs", text_inputs),
    ("typed_text", typed_text),
    ("provider_answers", provider_answers),
    ("audit_records", audit_records),
    ("jsonb", jsonb),
];

fn key(b: u8) -> SecretKey {
    SecretKey::from_slice(&[b; 32]).expect("32 bytes")
}

/// An envelope from untrusted bytes: parsed, then decrypted with the key that made the seeds
/// (so that mutated inputs with an intact commitment reach the derived-key cache and GCM): under
/// the seeds' tenant it may succeed (an unmodified seed); under any other tenant, or with the
/// wrong key, it fails, leaves a zeroed buffer and never panics.
pub fn envelope(data: &[u8]) {
    let Ok(env) = Envelope::parse(data) else { return };
    assert!(env.plaintext_len() < data.len());
    let mut dek = DataKey::new(env.tenant_key_id, env.dek_version, &key(1));
    let mut out = vec![0u8; env.plaintext_len()];
    let _ = dek.decrypt_into(SEED_TENANT, None, &env, &mut out);
    out.fill(0);
    assert!(dek.decrypt_into("fuzz", None, &env, &mut out).is_err(), "bound to its tenant");
    assert!(out.iter().all(|&b| b == 0), "a failed decryption leaves no output");
    // The encrypted types' contexts (a one-byte code in v3's associated data, the string in v1
    // and v2): a seed made under one opens under that one only.
    for ctx in [&b"pg_envelope/type/int8"[..], b"pg_envelope/type/numeric", b"pg_envelope/type/"] {
        out.fill(0);
        if dek.decrypt_into(SEED_TENANT, Some(ctx), &env, &mut out).is_err() {
            assert!(out.iter().all(|&b| b == 0), "a failed decryption leaves no output");
        }
    }
    let mut other = DataKey::new(env.tenant_key_id, env.dek_version, &key(7));
    assert!(other.decrypt(SEED_TENANT, Some(b"ctx"), data).is_err());
}

/// The tenant and key (`key(1)`) the envelope seeds were made with.
const SEED_TENANT: &str = "acme";

/// A wrapped key from untrusted bytes, under each kind of associated data; a genuine wrapping
/// with one byte changed never unwraps.
pub fn wrapped_key(data: &[u8]) {
    let k = key(3);
    for aad in [
        WrapAad::TenantKey { tenant: "fuzz", tenant_key_id: 1 },
        WrapAad::DataKey { tenant: "fuzz", tenant_key_id: 1, version: 1 },
        WrapAad::IndexKey { tenant: "fuzz", tenant_key_id: 1, version: 1 },
    ] {
        // Parsed and authenticated or refused; the seeds are genuine wrappings under `k`.
        let _ = wrap::unwrap_key(&k, &aad, data);
    }
    // And a genuine wrapping with one byte changed (the first byte of the input picks which).
    if let Some(&i) = data.first() {
        let aad = WrapAad::DataKey { tenant: "fuzz", tenant_key_id: 1, version: 1 };
        let mut w = wrap::wrap_key(&k, &aad, &key(4)).expect("wrap");
        let n = w.len();
        w[i as usize % n] ^= data.get(1).copied().unwrap_or(1).max(1);
        assert!(wrap::unwrap_key(&k, &aad, &w).is_err());
    }
}

/// A blind-index term in its binary form and in its text form.
pub fn term(data: &[u8]) {
    if let Ok(t) = Term::from_bytes(data) {
        assert_eq!(&t.to_bytes()[..], data, "binary form round-trips");
        assert_eq!(Term::from_text(&t.to_text()).map(|u| u.to_bytes()), Ok(t.to_bytes()));
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(t) = Term::from_text(s) {
            assert_eq!(Term::from_bytes(&t.to_bytes()).map(|u| u.to_bytes()), Ok(t.to_bytes()));
        }
    }
}

/// A value to index: every normalisation and value kind, terms under a fixed key; purposes
/// and names parsed from the input too.
pub fn search_value(data: &[u8]) {
    let ik = IndexKey::from_secret_key(key(5));
    let (head, rest) = data.split_at(data.len().min(1));
    let purpose = std::str::from_utf8(rest.get(..rest.len().min(40)).unwrap_or_default()).unwrap_or("p");
    let _ = Normalization::parse(purpose);
    let _ = ValueKind::parse(purpose);
    let n = Normalization::ALL[head.first().copied().unwrap_or(0) as usize % Normalization::ALL.len()];
    if let Ok(s) = std::str::from_utf8(rest) {
        let _ = crate::search::normalize_text(n, s);
        let _ = crate::search::canonical_numeric(s);
        if let Ok(tk) = ik.term_key(purpose, n, ValueKind::Text) {
            if let Ok(t) = tk.term(1, &Value::Text(s)) {
                // Deterministic: the same value, the same term.
                assert_eq!(tk.term(1, &Value::Text(s)).map(|u| u.to_bytes()), Ok(t.to_bytes()));
            }
        }
        if let Ok(tk) = ik.term_key("fuzz.numeric", Normalization::None, ValueKind::Numeric) {
            let _ = tk.term(1, &Value::Numeric(s));
        }
    }
    if let Ok(tk) = ik.term_key("fuzz.bytea", n, ValueKind::Bytea) {
        let _ = tk.term(2, &Value::Bytea(rest));
    }
    if rest.len() >= 8 {
        let i = i64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        for (kind, v) in [(ValueKind::Int8, Value::Int8(i)), (ValueKind::Timestamp, Value::Timestamptz(i)), (ValueKind::Date, Value::Date(i as i32))] {
            if let Ok(tk) = ik.term_key("fuzz.fixed", Normalization::None, kind) {
                let _ = tk.term(1, &v);
            }
        }
    }
}

/// Provider options as a superuser would register them (JSON), for every provider kind
/// (a no-op in a build without providers).
pub fn provider_options(data: &[u8]) {
    #[cfg(any(feature = "vault", feature = "pkcs11"))]
    {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
        let _ = crate::provider::common::CommonOptions::split(&v);
        #[cfg(feature = "vault")]
        let _ = crate::provider::vault::VaultTransitOptions::from_json(&v);
        #[cfg(all(feature = "aws", feature = "vault"))]
        let _ = crate::provider::aws::AwsKmsOptions::from_json(&v);
        #[cfg(feature = "pkcs11")]
        let _ = crate::provider::pkcs11::Pkcs11Options::from_json(&v);
    }
    #[cfg(not(any(feature = "vault", feature = "pkcs11")))]
    let _ = data;
}

/// Small text formats: durations, path lists, the local provider's key file, AWS credentials.
pub fn text_inputs(data: &[u8]) {
    let _ = crate::provider::local::parse_key_material_for_fuzzing(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = crate::provider::common::parse_duration(s);
        let _ = crate::provider::policy::parse_path_list(s);
        #[cfg(feature = "aws")]
        let _ = crate::provider::aws::parse_credentials_for_fuzzing(s, "default");
    }
}

/// The encrypted types' text input (`pge1:<base64>`, what COPY and pg_dump carry): accepted
/// only when it is the canonical printing of a well-formed envelope. (Their binary input is the
/// envelope parser, fuzzed by [`envelope`].)
pub fn typed_text(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Some(bytes) = crate::envelope::parse_text_form(s) {
        assert!(Envelope::parse(&bytes).is_ok());
        assert_eq!(crate::envelope::text_form(&bytes), s, "the text form round-trips");
    }
}

/// What the HTTP key servers answer (OpenBao/Vault Transit, AWS KMS): the body parsed as the
/// providers parse it, then every field reader and error classification over it, as success
/// and as every error status (a no-op in a build without providers). Server text in an error
/// stays short; a key that is not 32 bytes of base64 is an unwrap failure.
pub fn provider_answers(data: &[u8]) {
    #[cfg(feature = "vault")]
    {
        use crate::provider::answers as a;
        if let Some(v) = crate::provider::vault::transit_version(data) {
            assert!(v > 0);
        }
        let Ok(v) = a::parse_body(&data[..data.len().min(a::MAX_BODY as usize)]) else { return };
        let bounded = |e: crate::ProviderError| {
            let m = e.to_string();
            assert!(m.chars().count() <= 600, "an error message quoting too much of the answer: {} chars", m.chars().count());
        };
        let _ = a::transit_ciphertext(&v);
        let _ = a::transit_latest_version(&v);
        let _ = a::transit_hmac(&v);
        let _ = a::transit_valid(&v);
        if let Ok(k) = a::transit_plaintext_key(&mut v.clone()) {
            assert_eq!(k.expose().len(), crate::KEY_LEN);
        }
        let _ = a::approle_token(&mut v.clone());
        for op in ["encrypt", "decrypt", "keys"] {
            for code in [400, 401, 403, 404, 429, 500, 503] {
                bounded(a::transit_error("https://127.0.0.1:8200 transit/op", op, code, &v));
            }
        }
        #[cfg(feature = "aws")]
        {
            let (kind, msg) = a::aws_error_parts(&v);
            assert!(msg.chars().count() <= a::DETAIL_CHARS);
            for target in ["Encrypt", "Decrypt", "ReEncrypt", "GenerateMac", "VerifyMac", "DescribeKey", "ScheduleKeyDeletion"] {
                for code in [400, 401, 403, 429, 500] {
                    bounded(crate::provider::aws::classify_error(code, &kind, &msg, target, "https://127.0.0.1:4566 target"));
                }
            }
            let _ = a::aws_ciphertext_blob(&v, "Encrypt");
            let _ = a::aws_mac(&v);
            let _ = a::aws_mac_valid(&v);
            if let Ok(k) = a::aws_plaintext_key(&mut v.clone()) {
                assert_eq!(k.expose().len(), crate::KEY_LEN);
            }
        }
    }
    #[cfg(not(feature = "vault"))]
    let _ = data;
}

/// Audit records and the chain walk. The first byte picks what the rest is:
/// * 0: canonical record bytes (the shared-memory queue's form): a parsed record prints back
///   to the same bytes;
/// * 1: a recipe: a genuine chain of 1–16 records, one tampering (edit, delete, duplicate, swap,
///   truncate under a checkpoint) chosen by the bytes; `verify` must report a break exactly when
///   the stored chain differs from the genuine one;
/// * 3: the bytes of a stored block, as a superuser could write them (either format): they
///   parse without a panic and decode to at most `MAX_DECODED_BYTES`;
/// * 4: a recipe: a genuine chain of 1–64 records with strings from the bytes, stored as
///   compact blocks: read back, it is the same chain;
/// * otherwise: arbitrary stored rows (sequence numbers, hashes), start and checkpoints, as a
///   superuser could write them into the table: `verify` must return, never panic.
pub fn audit_records(data: &[u8]) {
    use crate::audit::{verify, Chain, Head, Record, Stored};
    let Some((&mode, rest)) = data.split_first() else { return };
    let i64_at = |b: &[u8], i: usize| -> i64 {
        let mut w = [0u8; 8];
        for (k, x) in w.iter_mut().enumerate() {
            *x = b.get(i * 8 + k).copied().unwrap_or(0);
        }
        i64::from_be_bytes(w)
    };
    let hash_at = |b: &[u8], i: usize| -> [u8; 32] { std::array::from_fn(|k| b.get(i * 32 + k).copied().unwrap_or(0)) };
    match mode {
        0 => {
            if let Some(r) = Record::from_canonical(rest) {
                assert_eq!(r.canonical(), rest, "canonical bytes round-trip");
            }
        }
        1 => {
            let n = 1 + rest.first().map_or(0, |b| b % 16) as usize;
            let op = rest.get(1).copied().unwrap_or(0) % 6;
            let at = rest.get(2).map_or(0, |b| *b as usize % n);
            let text = String::from_utf8_lossy(rest.get(3..).unwrap_or_default()).into_owned();
            let mut chain = Chain::after(None);
            let genuine: Vec<Stored> = (0..n)
                .map(|i| chain.append(Record { kind: "decrypt".into(), tenant: text.clone(), value_count: i as i64, ..Record::default() }))
                .collect();
            let head = chain.head();
            let mut rows = genuine.clone();
            let mut checkpoints = vec![];
            match op {
                0 => rows[at].record.detail.push_str(if text.is_empty() { "x" } else { &text }),
                1 => {
                    rows.remove(at);
                    checkpoints.push(head);
                }
                2 => rows.insert(at, rows[at].clone()),
                3 if n > 1 => rows.swap(at, (at + 1) % n),
                4 => {
                    rows.truncate(at);
                    checkpoints.push(head);
                }
                _ => checkpoints.push(head),
            }
            let v = verify(rows.clone(), None, &checkpoints);
            assert_eq!(v.first_break.is_some(), rows != genuine, "op {op} at {at} of {n}: {:?}", v.first_break);
            if rows == genuine {
                assert_eq!(v.records, n as u64);
                assert_eq!(v.head, Some(head));
            }
        }
        3 => {
            let r = crate::audit_blocks::read_block(hash_at(rest, 0), rest);
            let decoded: usize = r.records.iter().map(|s| s.record.canonical().len()).sum();
            assert!(decoded <= crate::audit_blocks::MAX_DECODED_BYTES);
        }
        4 => {
            let n = 1 + rest.first().map_or(0, |b| b % 64) as usize;
            let parts: Vec<String> = String::from_utf8_lossy(rest.get(1..).unwrap_or_default()).split(',').map(str::to_owned).collect();
            let part = |i: usize| parts.get(i % parts.len().max(1)).cloned().unwrap_or_default();
            let mut chain = Chain::after(None);
            let mut plain = Chain::after(None);
            let mut blocks = crate::audit_blocks::Blocks::default();
            let mut genuine = Vec::new();
            for i in 0..n {
                let r = Record {
                    at_us: i64_at(rest, i) ^ i as i64,
                    kind: part(i),
                    tenant: part(i / 2),
                    detail: part(i * 7),
                    backend_pid: i64_at(rest, i + 1),
                    value_count: i as i64 - 3,
                    ..Record::default()
                };
                genuine.push(plain.append(r.clone()));
                blocks.push(&mut chain, r, i as u64);
            }
            let stored: Vec<_> = blocks.blocks().iter().map(crate::audit_blocks::Block::to_stored).collect();
            let read: Vec<Stored> = crate::audit_blocks::records_of(stored).map(|r| r.expect("a genuine block reads")).collect();
            assert_eq!(read, genuine);
        }
        _ => {
            let n = rest.len() / 72;
            let rows: Vec<Stored> = (0..n.min(64))
                .map(|i| {
                    let b = &rest[i * 72..i * 72 + 72];
                    Stored { record: Record { seq: i64_at(b, 0), ..Record::default() }, prev_hash: hash_at(&b[8..], 0), hash: hash_at(&b[40..], 0) }
                })
                .collect();
            let tail = &rest[n * 72..];
            let start = (tail.len() >= 40).then(|| Head { seq: i64_at(tail, 0), hash: hash_at(&tail[8..], 0) });
            let checkpoints: Vec<Head> = tail.get(40..).unwrap_or_default().chunks(40).map(|c| Head { seq: i64_at(c, 0), hash: hash_at(c.get(8..).unwrap_or_default(), 0) }).collect();
            let v = verify(rows, start, &checkpoints);
            assert!(v.records <= n as u64);
        }
    }
}

/// An `encrypted_jsonb` internal-form body from untrusted bytes (the first byte picks the byte
/// order it is read in): refused, or accepted only if PostgreSQL's reader (the model's) reads it
/// within bounds and PostgreSQL's writer would have written exactly these bytes, in that order,
/// and the rewrite into this machine's order is that document's native form. In this machine's
/// order the check must also agree with `model::reference_accepts` both ways.
pub fn jsonb(data: &[u8]) {
    use crate::jsonb::{check_foreign, model, utf8_string, Order};
    let Some((&sel, body)) = data.split_first() else { return };
    let order = if sel & 1 == 0 { Order::Little } else { Order::Big };
    let mut b = body.to_vec();
    let accepted = check_foreign(&mut b, order, &mut utf8_string).is_ok();
    // The path for containers of at most 32 children and the general one: the same verdict,
    // the same rewrite (compiled for the fuzzer and the core tier's replay only).
    #[cfg(any(test, fuzzing))]
    {
        crate::jsonb::GENERAL_ONLY.with(|g| g.set(true));
        let mut g = body.to_vec();
        let general = check_foreign(&mut g, order, &mut utf8_string).is_ok();
        crate::jsonb::GENERAL_ONLY.with(|g| g.set(false));
        assert_eq!(accepted, general, "the small-container path and the general path disagree");
        if accepted {
            assert_eq!(g, b, "the two paths rewrite differently");
        }
    }
    if order == Order::HOST {
        // A second opinion by another route (read, check the document, write back): a wrong
        // refusal shows here as well as a wrong acceptance.
        assert_eq!(accepted, model::reference_accepts(body, &mut utf8_string), "the check and the reference disagree");
    }
    if accepted {
        let v = model::decode(&b).expect("an accepted body reads within bounds");
        assert_eq!(model::encode(&v, Order::HOST), b, "an accepted body is canonical");
        assert_eq!(model::encode(&v, order), body, "and was canonical in its own byte order");
    }
}

#[cfg(test)]
mod tests {
    /// Replays every input kept in `fuzz/corpus/<target>/` and every crash reproducer in
    /// `fuzz/artifacts/<target>/` (CI runs this instead of fuzzing for long).
    #[test]
    fn corpus_replay() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
        let mut total = 0;
        for (name, f) in super::TARGETS {
            for dir in ["corpus", "artifacts"] {
                let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else { continue };
                for e in entries.flatten() {
                    let data = std::fs::read(e.path()).expect("readable corpus file");
                    f(&data);
                    total += 1;
                }
            }
        }
        assert!(total >= super::TARGETS.len(), "the corpus is missing ({total} inputs)");
        eprintln!("replayed {total} inputs");
    }

    /// Writes the seed inputs of `fuzz/corpus/` (run once by hand:
    /// `cargo test -p pg_envelope_core --features vault,aws,pkcs11 write_seed_corpus -- --ignored`).
    #[test]
    #[ignore]
    fn write_seed_corpus() {
        use crate::search::{IndexKey, Normalization, Value, ValueKind};
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
        let put = |target: &str, name: &str, data: &[u8]| {
            let d = root.join(target);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(format!("seed-{name}")), data).unwrap();
        };
        let mut rng = crate::rng::BackendRng::new();
        let mut dek = crate::DataKey::new(3, 2, &super::key(1));
        put("envelope", "short", &dek.encrypt(&mut rng, "acme", None, b"hello"));
        put("envelope", "context", &dek.encrypt(&mut rng, "acme", Some(b"users.email"), b"x"));
        put("envelope", "empty", &dek.encrypt(&mut rng, "acme", None, b""));
        put("envelope", "1k", &dek.encrypt(&mut rng, "acme", None, &[0x41; 1024]));
        for (name, env) in [("short", dek.encrypt(&mut rng, "acme", None, b"hello")), ("empty", dek.encrypt(&mut rng, "acme", None, b""))] {
            put("typed_text", name, crate::envelope::text_form(&env).as_bytes());
        }
        put("typed_text", "bad-padding", b"pge1:AAA");
        let key_b64 = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
        for (name, body) in [
            ("transit-decrypt", format!(r#"{{"data":{{"plaintext":"{key_b64}"}}}}"#)),
            ("transit-encrypt", r#"{"data":{"ciphertext":"vault:v3:AAAA"}}"#.to_string()),
            ("transit-keys", r#"{"data":{"latest_version":7}}"#.to_string()),
            ("transit-hmac", r#"{"data":{"hmac":"vault:v1:abcd"}}"#.to_string()),
            ("transit-verify", r#"{"data":{"valid":true}}"#.to_string()),
            ("transit-error", r#"{"errors":["1 error occurred:\n\t* encryption key not found\n\n"]}"#.to_string()),
            ("approle", r#"{"auth":{"client_token":"s.abcdef","lease_duration":60}}"#.to_string()),
            ("aws-decrypt", format!(r#"{{"KeyId":"arn:aws:kms:us-east-1:1:key/k","Plaintext":"{key_b64}"}}"#)),
            ("aws-encrypt", r#"{"CiphertextBlob":"AQIDBA==","KeyId":"k"}"#.to_string()),
            ("aws-mac", format!(r#"{{"Mac":"{key_b64}","KeyId":"k","MacAlgorithm":"HMAC_SHA_256"}}"#)),
            ("aws-error", r#"{"__type":"com.amazonaws.kms#DisabledException","message":"key is disabled"}"#.to_string()),
            ("empty", String::new()),
        ] {
            put("provider_answers", name, body.as_bytes());
        }
        put("provider_answers", "transit-ciphertext", b"vault:v12:AAAA");
        let rec = crate::audit::Record { seq: 1, kind: "decrypt".into(), tenant: "acme".into(), outcome: "ok".into(), ..Default::default() };
        put("audit_records", "canonical", &[&[0u8][..], &rec.canonical()].concat());
        for op in 0..6u8 {
            put("audit_records", &format!("tamper-{op}"), &[1, 5, op, 2, b'a', b'c', b'm', b'e']);
        }
        let mut rows = vec![2u8];
        rows.extend_from_slice(&1i64.to_be_bytes());
        rows.extend_from_slice(&[0u8; 64]);
        rows.extend_from_slice(&i64::MAX.to_be_bytes());
        rows.extend_from_slice(&[0u8; 32]);
        put("audit_records", "rows", &rows);
        put("audit_records", "block-recipe", b"\x04\x20decrypt,acme,ok,,x");
        {
            let mut chain = crate::audit::Chain::after(None);
            let mut blocks = crate::audit_blocks::Blocks::default();
            for i in 0..3 {
                blocks.push(&mut chain, crate::audit::Record { kind: "decrypt".into(), value_count: i, ..Default::default() }, 0);
            }
            put("audit_records", "block-compact", &[&[3u8][..], &blocks.blocks()[0].bytes].concat());
        }
        let k = super::key(3);
        for (i, aad) in [
            crate::wrap::WrapAad::TenantKey { tenant: "fuzz", tenant_key_id: 1 },
            crate::wrap::WrapAad::DataKey { tenant: "fuzz", tenant_key_id: 1, version: 1 },
        ]
        .iter()
        .enumerate()
        {
            put("wrapped_key", &format!("{i}"), &crate::wrap::wrap_key(&k, aad, &super::key(9)).unwrap());
        }
        let ik = IndexKey::from_secret_key(super::key(5));
        let t = ik.term_key("users.email", Normalization::NfkcCasefold, ValueKind::Text).unwrap().term(1, &Value::Text("A@x.test")).unwrap();
        put("term", "binary", &t.to_bytes());
        put("term", "text", t.to_text().as_bytes());
        for (i, v) in ["\x00users.email", "\x02Ａ＠Ｘ.test", "\x03+1 (555) 010-2030", "\x01e\u{301}", "\x00-12.3400e5"].iter().enumerate() {
            put("search_value", &format!("{i}"), v.as_bytes());
        }
        put("provider_options", "vault", br#"{"url": "https://127.0.0.1:8200", "key": "pg-root", "token_file": "/x/token", "ca_file": "/x/ca.pem", "key_cache_ttl": "5m"}"#);
        put("provider_options", "aws", br#"{"region": "us-east-1", "key_id": "alias/pg", "endpoint": "http://127.0.0.1:5000", "credentials_file": "/x/creds", "max_key_age": "1h", "dedicated": true}"#);
        put("provider_options", "pkcs11", br#"{"module": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "pg", "key_label": "root", "pin_file": "/x/pin"}"#);
        put("text_inputs", "duration", b"90s");
        put("text_inputs", "paths", b"/var/lib/a, /etc/b");
        put("text_inputs", "hexkey", b"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n");
        put("text_inputs", "creds", b"[default]\naws_access_key_id = AKIAFUZZ\naws_secret_access_key = s3cr3t\n");
    }

    /// Writes the `jsonb` target's seeds (run once by hand: `cargo test -p pg_envelope_core
    /// write_jsonb_seed_corpus -- --ignored`; deterministic).
    #[test]
    #[ignore]
    fn write_jsonb_seed_corpus() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
        let put = |target: &str, name: &str, data: &[u8]| {
            let d = root.join(target);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(format!("seed-{name}")), data).unwrap();
        };
        {
            use crate::jsonb::model::{encode, Numeric, Value};
            use crate::jsonb::Order;
            let num = |w, ds: u16, d: &[u16]| {
                let mut n = Numeric { negative: w < 0, weight: w, dscale: ds, digits: d.to_vec() };
                n.dscale = ds.max(n.min_dscale());
                Value::Num(n)
            };
            let docs = [
                ("object", Value::Object(vec![(b"a".to_vec(), Value::Array(vec![num(0, 0, &[1]), num(0, 1, &[2, 5000])])), (b"bc".to_vec(), Value::Str("✓".into()))])),
                ("scalar", Value::Str(b"x".to_vec())),
                ("numbers", Value::Array((0..40).map(|i| num(i - 20, (i * 3) as u16, &[1 + i as u16 * 97])).collect())),
                ("nested", Value::Array(vec![Value::Object(vec![(b"k".to_vec(), Value::Array(vec![Value::Null, Value::Bool(true), Value::Bool(false)]))])])),
            ];
            for (name, v) in docs {
                for (sel, order) in [(0u8, Order::Little), (1u8, Order::Big)] {
                    put("jsonb", &format!("{name}-{sel}"), &[vec![sel], encode(&v, order)].concat());
                }
            }
        }
    }
}
