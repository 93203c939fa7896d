//! Envelope formats v1, v2 and v3: the bytes stored for every encrypted value.
//!
//! All versions have the same layout; they differ only in the associated data (AAD). New
//! values are written as v3; v1 and v2 values are read forever.
//!
//! ```text
//! offset  length  field
//! 0       1       format version            0x03 (0x02 for v2, 0x01 for v1)
//! 1       1       algorithm                 0x01 = XAES-256-GCM, HMAC-SHA-256 key commitment
//! 2       4       tenant key id             u32, big-endian
//! 6       4       data key (DEK) version    u32, big-endian
//! 10      32      key commitment            HMAC-SHA-256(DEK, "pg_envelope/v1/key-commitment")
//! 42      24      nonce                     XAES-256-GCM 192-bit nonce
//! 66      n       ciphertext                n = plaintext length
//! 66+n    16      GCM tag
//! ```
//!
//! The additional authenticated data (AAD) is
//! `header[0..H] || u32be(len(tenant)) || tenant || 0x00` without a context, or
//! `... || 0x01 || u32be(len(context)) || context` with one, so a ciphertext moved to another
//! tenant or another context fails to decrypt, and a NULL context differs from an empty one.
//! `H` is 10 in v2 and v3 (version, algorithm, key id, DEK version) and 42 in v1 (the same plus
//! the commitment). The commitment needs no GCM authentication: it is compared with the DEK's own
//! commitment before GCM runs, so a changed commitment fails anyway, and leaving it out of the
//! AAD saves two GHASH blocks per value (about 8% of a short value's cost).
//!
//! v3 binds the encrypted types' contexts (`pg_envelope/type/<base type>`, exactly one of
//! [`TYPE_CODES`]) as `0x02 || code` instead of `0x01 || u32be(len) || context`: one byte
//! instead of 25-32, one or two GHASH blocks less per typed value. Every other context, and
//! every context in v1 and v2, is bound as before. The encoding stays unambiguous: the flag byte
//! (0, 1, 2) says which form follows, each form is injective, and a context has one form per
//! version. Callers cannot encrypt under `pg_envelope/` contexts (the SQL layer refuses them),
//! so a type code is only ever bound by the encrypted types.
//! `docs/envelope-format.md` is the normative description; golden envelopes in
//! `crates/core/tests/golden/` pin it.

/// Format version byte of v1 envelopes (read, never written any more).
pub const VERSION_1: u8 = 0x01;
/// Format version byte of v2 envelopes (read, never written any more).
pub const VERSION_2: u8 = 0x02;
/// Format version byte of v3 envelopes (written by this version): v2 with the encrypted types'
/// contexts bound as one-byte codes.
pub const VERSION_3: u8 = 0x03;
/// The version new envelopes are written in.
pub const CURRENT_VERSION: u8 = VERSION_3;
/// Header bytes authenticated as AAD in v2 and v3: version, algorithm, tenant key id, DEK version.
pub const AAD_HEADER_LEN_V2: usize = 10;
/// Algorithm byte: XAES-256-GCM with an HMAC-SHA-256 key commitment in the header.
pub const ALG_XAES_256_GCM_HMAC_COMMIT: u8 = 0x01;

pub const COMMITMENT_LEN: usize = 32;
pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
/// Header bytes before the nonce (version, algorithm, key id, DEK version, commitment).
pub const HEADER_LEN: usize = 1 + 1 + 4 + 4 + COMMITMENT_LEN;
/// Bytes an envelope adds to the plaintext.
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;

/// The structural failure of an envelope that does not parse. Deliberately says nothing about
/// which byte was wrong; callers turn it into the same opaque decryption error as a bad tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedEnvelope;

/// A parsed, not yet authenticated, view of an envelope.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// Format version: [`VERSION_1`], [`VERSION_2`] or [`VERSION_3`].
    pub version: u8,
    pub tenant_key_id: u32,
    pub dek_version: u32,
    pub commitment: &'a [u8; COMMITMENT_LEN],
    pub nonce: &'a [u8; NONCE_LEN],
    header: &'a [u8; HEADER_LEN],
    pub ciphertext: &'a [u8],
    pub tag: &'a [u8; TAG_LEN],
}

impl<'a> Envelope<'a> {
    /// Parses the layout. Never panics, whatever the input; authenticity is checked later by
    /// [`crate::DataKey::decrypt`].
    pub fn parse(bytes: &'a [u8]) -> Result<Self, MalformedEnvelope> {
        if bytes.len() < OVERHEAD {
            return Err(MalformedEnvelope);
        }
        if !matches!(bytes[0], VERSION_1 | VERSION_2 | VERSION_3) || bytes[1] != ALG_XAES_256_GCM_HMAC_COMMIT {
            return Err(MalformedEnvelope);
        }
        let (header, rest) = bytes.split_at(HEADER_LEN);
        let (nonce, rest) = rest.split_at(NONCE_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let header: &[u8; HEADER_LEN] = header.try_into().map_err(|_| MalformedEnvelope)?;
        Ok(Envelope {
            version: bytes[0],
            tenant_key_id: u32::from_be_bytes(header[2..6].try_into().map_err(|_| MalformedEnvelope)?),
            dek_version: u32::from_be_bytes(header[6..10].try_into().map_err(|_| MalformedEnvelope)?),
            commitment: header[10..HEADER_LEN].try_into().map_err(|_| MalformedEnvelope)?,
            nonce: nonce.try_into().map_err(|_| MalformedEnvelope)?,
            header,
            ciphertext,
            tag: tag.try_into().map_err(|_| MalformedEnvelope)?,
        })
    }

    /// The part of the header authenticated in the AAD: all of it in v1, everything but the
    /// commitment in v2 and v3.
    pub fn aad_header(&self) -> &'a [u8] {
        match self.version {
            VERSION_1 => &self.header[..],
            _ => &self.header[..AAD_HEADER_LEN_V2],
        }
    }

    /// Length of the plaintext this envelope decrypts to.
    pub fn plaintext_len(&self) -> usize {
        self.ciphertext.len()
    }
}

/// Length of the envelope for a plaintext of `plaintext_len` bytes.
pub const fn envelope_len(plaintext_len: usize) -> usize {
    plaintext_len + OVERHEAD
}

/// Writes the header of a new (v3) envelope into `out[..HEADER_LEN]`.
pub(crate) fn write_header(
    out: &mut [u8],
    tenant_key_id: u32,
    dek_version: u32,
    commitment: &[u8; COMMITMENT_LEN],
) {
    out[0] = CURRENT_VERSION;
    out[1] = ALG_XAES_256_GCM_HMAC_COMMIT;
    out[2..6].copy_from_slice(&tenant_key_id.to_be_bytes());
    out[6..10].copy_from_slice(&dek_version.to_be_bytes());
    out[10..HEADER_LEN].copy_from_slice(commitment);
}

/// The encrypted types' contexts: `pg_envelope/type/` and one of these names, bound in v3 as
/// the code. Codes are never reused or renumbered: the golden v3 vectors (one per type) and
/// `tests::type_codes_are_pinned` fail if one changes.
pub const TYPE_CODES: [(&str, u8); 7] =
    [("text", 1), ("bytea", 2), ("jsonb", 3), ("int8", 4), ("numeric", 5), ("date", 6), ("timestamptz", 7)];

/// The prefix of the encrypted types' contexts.
pub const TYPE_CONTEXT_PREFIX: &[u8; 17] = b"pg_envelope/type/";

/// Room for one type context in [`TYPE_CONTEXT_SLOTS`] (the longest is 28 bytes).
const TYPE_CONTEXT_SLOT: usize = 32;

const fn slot(s: &[u8]) -> [u8; TYPE_CONTEXT_SLOT] {
    let mut a = [0u8; TYPE_CONTEXT_SLOT];
    let mut i = 0;
    while i < s.len() {
        a[i] = s[i];
        i += 1;
    }
    a
}

/// The type contexts' bytes, one per 32-byte slot in code order: a context that starts at a
/// slot's address and has its length is that type's, which [`type_code`] tells from the
/// address alone.
static TYPE_CONTEXT_SLOTS: [[u8; TYPE_CONTEXT_SLOT]; 7] = [
    slot(CONTEXTS[0]),
    slot(CONTEXTS[1]),
    slot(CONTEXTS[2]),
    slot(CONTEXTS[3]),
    slot(CONTEXTS[4]),
    slot(CONTEXTS[5]),
    slot(CONTEXTS[6]),
];

/// The contexts' bytes, in code order (written once: the slots and the slices are made of them).
const CONTEXTS: [&[u8]; 7] = [
    b"pg_envelope/type/text",
    b"pg_envelope/type/bytea",
    b"pg_envelope/type/jsonb",
    b"pg_envelope/type/int8",
    b"pg_envelope/type/numeric",
    b"pg_envelope/type/date",
    b"pg_envelope/type/timestamptz",
];

/// The encrypted types' contexts in code order (`TYPE_CODES`: code = index + 1). The typed
/// columns pass these very slices, whose code [`type_code`] then reads from the slice's address
/// and length (a static's bytes cannot change) instead of comparing ~20 bytes per value.
pub static TYPE_CONTEXTS: [&[u8]; 7] = [
    TYPE_CONTEXT_SLOTS[0].split_at(CONTEXTS[0].len()).0,
    TYPE_CONTEXT_SLOTS[1].split_at(CONTEXTS[1].len()).0,
    TYPE_CONTEXT_SLOTS[2].split_at(CONTEXTS[2].len()).0,
    TYPE_CONTEXT_SLOTS[3].split_at(CONTEXTS[3].len()).0,
    TYPE_CONTEXT_SLOTS[4].split_at(CONTEXTS[4].len()).0,
    TYPE_CONTEXT_SLOTS[5].split_at(CONTEXTS[5].len()).0,
    TYPE_CONTEXT_SLOTS[6].split_at(CONTEXTS[6].len()).0,
];

/// The v3 code of an encrypted type's context, `None` for any other context.
#[inline(always)]
pub fn type_code(context: &[u8]) -> Option<u8> {
    // One of `TYPE_CONTEXTS` by its address: at the start of slot `i`, with its length
    // (the slot's bytes past the context are zeros, never part of a context).
    let d = (context.as_ptr() as usize).wrapping_sub(TYPE_CONTEXT_SLOTS.as_ptr() as usize);
    if d.is_multiple_of(TYPE_CONTEXT_SLOT) {
        if let Some(c) = TYPE_CONTEXTS.get(d / TYPE_CONTEXT_SLOT) {
            if c.len() == context.len() {
                return Some((d / TYPE_CONTEXT_SLOT) as u8 + 1);
            }
        }
    }
    type_code_by_bytes(context)
}

#[inline(never)]
fn type_code_by_bytes(context: &[u8]) -> Option<u8> {
    let (prefix, name) = context.split_first_chunk::<17>()?;
    if prefix != TYPE_CONTEXT_PREFIX {
        return None;
    }
    match name {
        b"text" => Some(1),
        b"bytea" => Some(2),
        b"jsonb" => Some(3),
        b"int8" => Some(4),
        b"numeric" => Some(5),
        b"date" => Some(6),
        b"timestamptz" => Some(7),
        _ => None,
    }
}

/// Builds the AAD into `buf` (cleared first) and returns it. The format version is the
/// header's first byte (authenticated itself), so the context's encoding cannot disagree with
/// the version the envelope says it is.
#[inline(always)]
pub(crate) fn build_aad<'b>(
    buf: &'b mut Vec<u8>,
    header: &[u8],
    tenant: &str,
    context: Option<&[u8]>,
) -> &'b [u8] {
    buf.clear();
    buf.extend_from_slice(header);
    buf.extend_from_slice(&(tenant.len() as u32).to_be_bytes());
    buf.extend_from_slice(tenant.as_bytes());
    match context {
        None => buf.push(0),
        Some(c) => {
            // Which encodings of a context a version has (a new version must choose here).
            let code = match header.first() {
                Some(&VERSION_3) => type_code(c),
                Some(&VERSION_1 | &VERSION_2) => None,
                // Not a version `Envelope::parse` accepts (unit tests pass arbitrary headers).
                _ => None,
            };
            match code {
                Some(code) => {
                    buf.push(2);
                    buf.push(code);
                }
                None => {
                    buf.push(1);
                    buf.extend_from_slice(&(c.len() as u32).to_be_bytes());
                    buf.extend_from_slice(c);
                }
            }
        }
    }
    buf
}

/// The encrypted types' text form: this prefix, then the envelope in standard base64 with
/// padding (what COPY, pg_dump and `::text` show).
pub const TEXT_PREFIX: &str = "pge1:";

/// Parses the text form into envelope bytes, checking the envelope's structure. Only the
/// canonical form is accepted (padding required, no stray bits), so parsing and printing round-trip.
pub fn parse_text_form(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let b64 = s.strip_prefix(TEXT_PREFIX)?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    Envelope::parse(&bytes).ok()?;
    Some(bytes)
}

/// The text form of envelope bytes.
pub fn text_form(bytes: &[u8]) -> String {
    use base64::Engine;
    let mut s = String::with_capacity(TEXT_PREFIX.len() + bytes.len().div_ceil(3) * 4);
    s.push_str(TEXT_PREFIX);
    base64::engine::general_purpose::STANDARD.encode_string(bytes, &mut s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_is_82_bytes() {
        assert_eq!(OVERHEAD, 82);
        assert_eq!(envelope_len(0), 82);
    }

    #[test]
    fn short_and_unknown_inputs_are_malformed() {
        assert!(Envelope::parse(&[]).is_err());
        assert!(Envelope::parse(&[1u8; OVERHEAD - 1]).is_err());
        let mut v = vec![0u8; OVERHEAD];
        v[0] = VERSION_1;
        v[1] = ALG_XAES_256_GCM_HMAC_COMMIT;
        assert!(Envelope::parse(&v).is_ok());
        v[0] = VERSION_2;
        assert!(Envelope::parse(&v).is_ok());
        v[0] = VERSION_3;
        assert!(Envelope::parse(&v).is_ok());
        v[0] = 4;
        assert!(Envelope::parse(&v).is_err());
        v[0] = 0;
        assert!(Envelope::parse(&v).is_err());
        v[0] = VERSION_1;
        v[1] = 9;
        assert!(Envelope::parse(&v).is_err());
    }

    #[test]
    fn null_and_empty_context_differ_in_aad() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        let x = build_aad(&mut a, b"h", "t", None).to_vec();
        let y = build_aad(&mut b, b"h", "t", Some(b"")).to_vec();
        assert_ne!(x, y);
    }

    #[test]
    fn tenant_and_context_boundaries_are_unambiguous() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        let x = build_aad(&mut a, b"h", "ab", Some(b"c")).to_vec();
        let y = build_aad(&mut b, b"h", "a", Some(b"bc")).to_vec();
        assert_ne!(x, y);
    }

    #[test]
    fn type_codes_are_pinned() {
        // Stored v3 values depend on these numbers: never change this list, only append to it.
        assert_eq!(
            TYPE_CODES,
            [("text", 1), ("bytea", 2), ("jsonb", 3), ("int8", 4), ("numeric", 5), ("date", 6), ("timestamptz", 7)]
        );
    }

    #[test]
    fn type_contexts_are_the_codes_contexts_by_address_and_by_bytes() {
        for (i, (name, code)) in TYPE_CODES.iter().enumerate() {
            let ctx = [&TYPE_CONTEXT_PREFIX[..], name.as_bytes()].concat();
            assert_eq!(TYPE_CONTEXTS[i], &ctx[..], "{name}");
            assert_eq!(type_code(TYPE_CONTEXTS[i]), Some(*code), "{name} by address");
            // The address is what `type_code` reads first (review 74: nothing showed the slots
            // were used; a broken layout would only cost the byte comparison's time).
            assert_eq!(TYPE_CONTEXTS[i].as_ptr(), TYPE_CONTEXT_SLOTS[i].as_ptr(), "{name} in its slot");
            assert_eq!(type_code(&ctx), Some(*code), "{name} by bytes");
            // The address of a static with a shorter length is not the static.
            assert_eq!(type_code(&TYPE_CONTEXTS[i][..ctx.len() - 1]), None, "{name} cut short");
        }
    }

    #[test]
    fn type_codes_match_their_names_and_nothing_else() {
        for (name, code) in TYPE_CODES {
            let ctx = [&TYPE_CONTEXT_PREFIX[..], name.as_bytes()].concat();
            assert_eq!(type_code(&ctx), Some(code), "{name}");
            assert_eq!(type_code(&ctx[..ctx.len() - 1]), None, "{name} cut short");
            assert_eq!(type_code(&[&ctx[..], b"x"].concat()), None, "{name} extended");
            assert_eq!(type_code(name.as_bytes()), None, "{name} without the prefix");
        }
        let mut codes: Vec<u8> = TYPE_CODES.iter().map(|t| t.1).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), TYPE_CODES.len(), "codes are distinct");
        for other in [&b""[..], b"pg_envelope/type/", b"pg_envelope/type/TEXT", b"pg_envelope/types/text", b"Pg_envelope/type/text", b"pg_envelope/type/encrypted_text"] {
            assert_eq!(type_code(other), None);
        }
    }

    #[test]
    fn v3_binds_type_contexts_as_one_byte_and_every_other_context_as_before() {
        let v2 = [VERSION_2, 1, 0, 0, 0, 1, 0, 0, 0, 1];
        let v3 = [VERSION_3, 1, 0, 0, 0, 1, 0, 0, 0, 1];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let typed = b"pg_envelope/type/numeric";
        let x = build_aad(&mut a, &v3, "acme", Some(typed)).to_vec();
        assert_eq!(&x[10..], &[&4u32.to_be_bytes()[..], b"acme", &[2, 5]].concat()[..]);
        let y = build_aad(&mut b, &v2, "acme", Some(typed)).to_vec();
        assert_eq!(&y[10..], &[&4u32.to_be_bytes()[..], b"acme", &[1], &24u32.to_be_bytes()[..], typed].concat()[..]);
        for ctx in [None, Some(&b""[..]), Some(b"users.email"), Some(b"pg_envelope/type/other")] {
            let x = build_aad(&mut a, &v3, "acme", ctx).to_vec();
            let y = build_aad(&mut b, &v2, "acme", ctx).to_vec();
            assert_eq!(x[1..], y[1..], "{ctx:?}");
        }
        // A user context of the same bytes as a type code's encoding is still length-prefixed.
        let x = build_aad(&mut a, &v3, "acme", Some(&[5])).to_vec();
        let y = build_aad(&mut b, &v3, "acme", Some(b"pg_envelope/type/numeric")).to_vec();
        assert_ne!(x, y);
    }

    /// The AAD of one call, built into an empty buffer.
    fn fresh_aad(header: &[u8], tenant: &str, context: Option<&[u8]>) -> Vec<u8> {
        build_aad(&mut Vec::new(), header, tenant, context).to_vec()
    }

    #[test]
    fn a_reused_aad_buffer_gives_what_a_fresh_one_gives_whatever_it_held() {
        // Each key reuses one buffer for every value's AAD: whatever the previous call left in
        // it, every pair of calls that differ in one part (or in none) must give exactly the
        // fresh AAD of the second (a reuse of the previous AAD was tried for issue 15 and cost
        // more than it saved; this guards any later attempt).
        let v3 = |id: u8| [VERSION_3, 1, 0, 0, 0, id, 0, 0, 0, 1];
        let v2 = [VERSION_2, 1, 0, 0, 0, 1, 0, 0, 0, 1];
        let tenants = ["", "a", "acme", "bench_t0", "bench_t1", "a_tenant_name_of_17", "x".repeat(255).leak()];
        let contexts: [Option<&[u8]>; 6] =
            [None, Some(b""), Some(b"pg_envelope/type/text"), Some(b"pg_envelope/type/int8"), Some(b"users.email"), Some(&[0])];
        let headers: [&[u8]; 4] = [&v3(1), &v3(2), &v2, &v3(1)[..9]];
        let mut calls: Vec<(&[u8], &str, Option<&[u8]>)> = Vec::new();
        for h in headers {
            for t in tenants {
                for c in contexts {
                    calls.push((h, t, c));
                }
            }
        }
        for first in &calls {
            let mut buf = Vec::new();
            build_aad(&mut buf, first.0, first.1, first.2);
            for second in &calls {
                let mut reused = buf.clone();
                let got = build_aad(&mut reused, second.0, second.1, second.2).to_vec();
                assert_eq!(got, fresh_aad(second.0, second.1, second.2), "after {first:?}, for {second:?}");
            }
        }
        // A buffer holding anything at all (not an AAD) is never mistaken for one.
        let want = fresh_aad(&v3(1), "acme", None);
        for n in 0..=want.len() + 1 {
            let mut junk: Vec<u8> = want.iter().copied().chain([0, 0]).take(n).collect();
            if n == want.len() {
                junk[n - 1] ^= 1;
            }
            assert_eq!(build_aad(&mut junk, &v3(1), "acme", None), &want[..], "{n}");
        }
    }
}
