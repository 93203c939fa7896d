//! Blind indexes: keyed, deterministic search terms for equality search on encrypted columns.
//!
//! An encrypted column cannot be searched: every ciphertext is different. A blind index stores,
//! next to each ciphertext, a short *term* that is a keyed hash of the (normalised) plaintext, so
//! `WHERE email_term = envelope.term('users.email', $1)` finds the rows whose plaintext equals
//! `$1` without decrypting anything. Whoever reads the table without the key learns which rows
//! hold equal values and how often each value occurs, nothing more; see
//! [`low_cardinality_warning`] for the columns where that is already too much.
//!
//! ## Keys
//!
//! ```text
//! IndexKey (32 random bytes, a SecretKey)
//!   └─ TermKey = HKDF-SHA-256(salt = "pg_envelope/v1/blind-index", ikm = IndexKey,
//!                             info = lp(purpose) || lp(normalization name) || lp(value kind name))
//!        └─ tag = HMAC-SHA-256(TermKey, canonical value bytes)[..16]
//! ```
//!
//! `lp(x)` is `x`'s length as a 4-byte big-endian integer followed by `x`, so no two different
//! triples give the same `info` ([`term_key_info`]). A *purpose* names what is indexed (for
//! example `"users.email"`); terms of different purposes, normalisations or value kinds come from
//! different keys and never match each other, even for the same plaintext: a term copied from one
//! column to another is useless there, and `'1'` as text never matches `1` as `int8`.
//!
//! ## Canonical value bytes
//!
//! What is MACed is a canonical byte string per [`ValueKind`] ([`canonical_value_bytes`]), so
//! values PostgreSQL considers equal give equal terms:
//!
//! | kind          | bytes                                                                      |
//! |---------------|----------------------------------------------------------------------------|
//! | `text`        | UTF-8 of the text after the key's [`Normalization`]                        |
//! | `bytea`       | the bytes as they are                                                      |
//! | `int8`        | the `i64`, 8 bytes big-endian                                              |
//! | `numeric`     | ASCII of [`canonical_numeric`] of PostgreSQL's numeric output              |
//! | `date`        | PostgreSQL's `DateADT` (`i32` days since 2000-01-01), 4 bytes big-endian   |
//! | `timestamptz` | PostgreSQL's `TimestampTz` (`i64` µs since 2000-01-01 UTC), 8 bytes BE     |
//!
//! Normalisation applies to `text` only; every other kind requires [`Normalization::None`]
//! (checked when the [`TermKey`] is derived). The SQL layer hands values over as a [`Value`].
//!
//! ## Terms
//!
//! A [`Term`] is `(key version, 16-byte tag)`. Binary form ([`TERM_LEN`] = 21 bytes):
//!
//! ```text
//! 0x01 (term format 1) || key version (u32 big-endian) || tag (16)
//! ```
//!
//! Format 1 means: HMAC-SHA-256 truncated to 128 bits, canonical bytes as above, and the Unicode
//! tables pinned in `Cargo.toml` (Unicode [`UNICODE_VERSION`] for both normalisation and case
//! folding). Text form, for PostgreSQL's type input/output: `bi1:v<version>:<32 lowercase hex>`
//! (for example `bi1:v3:00112233445566778899aabbccddeeff`): clearly marked, never mistaken for a
//! plaintext, and parsed strictly ([`Term::from_text`]). Key versions start at 1: version 0 is
//! rejected when making, decoding or parsing a term.
//!
//! 128 bits are plenty for equality: a false match needs two different values with the same tag
//! under one key, about 2^-64 even after 2^32 distinct values.
//!
//! ## Unicode is part of the format
//!
//! Normalisation uses the `unicode-normalization` and `caseless` crates, pinned to exact versions
//! (both Unicode 16.0.0). Under another Unicode version some strings normalise differently (by
//! Unicode's stability policies only strings with code points unassigned in the older version,
//! but their stored terms would silently stop matching), so bumping either crate is a format
//! change: a new format byte and a re-index. `tests::unicode_version_is_pinned` fails on a bump.
//!
//! ## Key hygiene
//!
//! [`IndexKey`] wraps a [`SecretKey`] (key pool, wiped on drop). [`TermKey`] holds only the keyed
//! HMAC-SHA-256 state (the inner and outer SHA-256 states after absorbing `key ^ ipad` and
//! `key ^ opad`, which are as good as the key), in the key pool, wiped on drop. Neither has
//! `Debug`, `Display` or `Clone`, so neither can be printed or copied by accident. What is wiped:
//!
//! * the HKDF pseudorandom key and the 32-byte term key, right after the HMAC state is built;
//! * the per-term copy of the HMAC state (the `zeroize` features of `sha2` and `hmac`, enabled in
//!   `Cargo.toml`, make the SHA-256 states and block buffers zeroize on drop), the untruncated
//!   HMAC output, and every copy of the value this module makes (normalised text, canonical
//!   numeric text, integer bytes: [`Zeroizing`]).
//!
//! What is **not** wiped by this module: temporaries inside the RustCrypto crates (when a key is
//! set up, `hmac` builds the padded key block `key ^ ipad/opad` on the stack and does not wipe
//! it; `hkdf` the same for its PRK and term key: once per [`IndexKey::term_key`], never per term)
//! and the small inline buffers of the Unicode normaliser, all on the stack; and the HMAC state
//! moved into the key pool, whose old stack copy is left where the compiler put it. As
//! everywhere in this crate, the SQL layer wipes the backend's stack after key work
//! ([`crate::secure::wipe_stack`]). The normaliser's heap buffers (only for runs of more than four
//! combining marks) are not wiped either. The caller's own input (`&str`, `&[u8]`) is the
//! caller's to wipe.

use std::fmt;

use caseless::Caseless;
use hmac::{Hmac, KeyInit, Mac};
use rand_core::{CryptoRng, RngCore};
use sha2::Sha256;
use unicode_normalization::UnicodeNormalization;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::secret::{SecretKey, KEY_LEN};
use crate::secure::SecureBox;

type HmacSha256 = Hmac<Sha256>;

/// The term format byte: HMAC-SHA-256 truncated to 128 bits, Unicode as pinned.
pub const TERM_FORMAT_1: u8 = 0x01;
/// Length of a tag (truncated HMAC-SHA-256).
pub const TAG_LEN: usize = 16;
/// Length of a term's binary form: format byte, key version, tag.
pub const TERM_LEN: usize = 1 + 4 + TAG_LEN;
/// The largest key version a term may carry: PostgreSQL stores versions as `integer`.
pub const MAX_VERSION: u32 = i32::MAX as u32;
/// Prefix of a term's text form (format 1), followed by the decimal key version.
pub const TERM_TEXT_PREFIX: &str = "bi1:v";
/// Longest purpose, in bytes.
pub const MAX_PURPOSE_LEN: usize = 200;
/// The HKDF salt of term keys.
pub const TERM_KEY_SALT: &[u8] = b"pg_envelope/v1/blind-index";

/// The Unicode version of the normalisation tables (`unicode-normalization`, pinned). Part of the
/// term format.
pub const UNICODE_VERSION: (u8, u8, u8) = unicode_normalization::UNICODE_VERSION;
/// The Unicode version of the case folding table (`caseless`, pinned). Equal to
/// [`UNICODE_VERSION`]; a test checks both.
pub const CASE_FOLDING_UNICODE_VERSION: (u64, u64, u64) = caseless::UNICODE_VERSION;

/// Below this many rows [`low_cardinality_warning`] says nothing: too few to judge.
pub const LOW_CARDINALITY_MIN_ROWS: u64 = 100;
/// [`low_cardinality_warning`] warns at or below this many distinct terms.
pub const LOW_CARDINALITY_MAX_DISTINCT: u64 = 16;
/// [`low_cardinality_warning`] warns when terms repeat this many times on average, or more.
pub const LOW_CARDINALITY_ROWS_PER_TERM: u64 = 100;

/// Why a blind-index operation failed. Messages never contain key bytes or the value being
/// indexed (nor any part of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchError {
    /// A normalisation name that is not one of [`Normalization::ALL`].
    UnknownNormalization,
    /// A value kind name that is not one of [`ValueKind::ALL`].
    UnknownValueKind,
    /// A normalisation other than `none` for a kind other than `text`.
    NormalizationNeedsText { kind: ValueKind },
    /// The purpose is empty, too long or contains NUL; the reason says which.
    InvalidPurpose(&'static str),
    /// A value of another kind than the term key was derived for.
    KindMismatch { expected: ValueKind, got: ValueKind },
    /// `digits` normalisation of a value with no digit 0-9.
    NoDigits,
    /// `digits` normalisation of a value with a digit NFKC does not map to 0-9.
    NonAsciiDigit,
    /// A numeric value not in PostgreSQL's numeric output form.
    InvalidNumeric,
    /// Key version 0 (versions start at 1).
    InvalidVersion,
    /// A term's binary or text form is malformed; the reason says how (never echoes the input).
    InvalidTerm(&'static str),
    /// The normalised value does not fit in memory.
    ValueTooLarge,
    /// The operating system's random source failed.
    Random,
    /// HKDF or HMAC refused its input (cannot happen with a 32-byte key; never a panic).
    KeyDerivation,
}

impl fmt::Display for SearchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SearchError::UnknownNormalization => {
                f.write_str("unknown blind index normalization; valid names: none, nfc, nfkc_casefold, digits")
            }
            SearchError::UnknownValueKind => f.write_str(
                "unknown blind index value kind; valid names: text, bytea, int8, numeric, date, timestamptz",
            ),
            SearchError::NormalizationNeedsText { kind } => write!(
                f,
                "blind index normalization applies to text only: a {} blind index needs normalization 'none'",
                kind.name()
            ),
            SearchError::InvalidPurpose(why) => write!(f, "invalid blind index purpose: {why}"),
            SearchError::KindMismatch { expected, got } => write!(
                f,
                "blind index term key is for {} values, got a {} value",
                expected.name(),
                got.name()
            ),
            SearchError::NoDigits => {
                f.write_str("blind index 'digits' normalization: the value contains no digit 0-9")
            }
            SearchError::NonAsciiDigit => f.write_str(
                "blind index 'digits' normalization: the value contains a digit that NFKC does not map \
                 to 0-9 (such as Arabic-Indic or Devanagari digits); convert it to 0-9 before indexing",
            ),
            SearchError::InvalidNumeric => f.write_str(
                "not a numeric value in PostgreSQL's output form (optional sign, digits, optional decimal \
                 point and digits; NaN, Infinity, -Infinity); exponents are not accepted",
            ),
            SearchError::InvalidVersion => f.write_str("blind index key versions start at 1"),
            SearchError::InvalidTerm(why) => write!(f, "invalid blind index term: {why}"),
            SearchError::ValueTooLarge => f.write_str("blind index: the normalized value does not fit in memory"),
            SearchError::Random => f.write_str("operating system random source failed"),
            SearchError::KeyDerivation => f.write_str("blind index key derivation failed"),
        }
    }
}

impl std::error::Error for SearchError {}

// ---------------------------------------------------------------------------------------------
// Normalisation
// ---------------------------------------------------------------------------------------------

/// How text is normalised before it is MACed. Never locale-dependent. Part of the term key's
/// derivation, so terms of one normalisation never match terms of another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Normalization {
    /// The text as it is (byte equality, like `text =` under a deterministic collation).
    None,
    /// Unicode NFC: canonically equivalent texts (`é` precomposed or as `e` + U+0301) match.
    Nfc,
    /// An approximation of Unicode's `NFKC_Casefold`: NFKC, then full default case folding
    /// (`CaseFolding.txt` statuses C and F, not the Turkic T mappings), then removal of
    /// `Default_Ignorable_Code_Point` characters (zero-width space and joiners, soft hyphen,
    /// variation selectors, bidi controls, tags, ...), then NFKC again. Removing the default
    /// ignorables is a choice: Unicode's `NFKC_Casefold` removes them too, and invisible
    /// characters should not make `"a\u{200B}b"` miss `"ab"` (a zero-width joiner inside an emoji
    /// sequence is removed as well).
    ///
    /// Checked against Unicode's own `NFKC_Casefold` mapping (Unicode 14 tables, the same
    /// algorithm in Python): identical for every single code point. It differs only when U+0345
    /// COMBINING GREEK YPOGEGRAMMENI (alone, or inside a character such as `ᾳ` or `ͺ`) is
    /// followed by another combining mark: NFKC first puts the marks in canonical order, then
    /// U+0345 folds to `ι`, whereas the per-character mapping folds first; so here canonically
    /// equivalent strings always match, which the per-character mapping does not guarantee.
    /// The result is idempotent (tested). `"Straße"`, `"STRASSE"` and `"strasse"` match; so do
    /// `"ﬁ"` and `"fi"`, `"ＡＢＣ"` and `"abc"`; `"İ"` folds to `"i\u{307}"` (not Turkic `"i"`).
    NfkcCasefold,
    /// NFKC (full-width and other compatibility digits become ASCII), then only the ASCII digits
    /// `0`-`9` are kept: `"+1 (555) 010-9999"` and `"15550109999"` match. A value without any
    /// digit is an error (it must not index as the empty string), and so is a value with a
    /// numeric character NFKC leaves outside ASCII (Arabic-Indic or Devanagari digits, `〇`, ...;
    /// Rust's `char::is_numeric`): silently dropping it would make different numbers match.
    Digits,
}

impl Normalization {
    /// Every normalisation, in the order of their names in messages.
    pub const ALL: [Normalization; 4] =
        [Normalization::None, Normalization::Nfc, Normalization::NfkcCasefold, Normalization::Digits];

    /// The SQL-facing name: `none`, `nfc`, `nfkc_casefold`, `digits`. Part of the key derivation.
    pub fn name(&self) -> &'static str {
        match self {
            Normalization::None => "none",
            Normalization::Nfc => "nfc",
            Normalization::NfkcCasefold => "nfkc_casefold",
            Normalization::Digits => "digits",
        }
    }

    /// Parses [`Normalization::name`] (exact, lowercase).
    pub fn parse(s: &str) -> Result<Self, SearchError> {
        Normalization::ALL.into_iter().find(|n| n.name() == s).ok_or(SearchError::UnknownNormalization)
    }
}

impl fmt::Display for Normalization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `Default_Ignorable_Code_Point` (DerivedCoreProperties.txt; the same ranges from Unicode 14 to
/// 16, checked against Perl's Unicode 14 tables when written).
fn is_default_ignorable(c: char) -> bool {
    matches!(
        c as u32,
        0x00AD
            | 0x034F
            | 0x061C
            | 0x115F..=0x1160
            | 0x17B4..=0x17B5
            | 0x180B..=0x180F
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x206F
            | 0x3164
            | 0xFE00..=0xFE0F
            | 0xFEFF
            | 0xFFA0
            | 0xFFF0..=0xFFF8
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0000..=0xE0FFF
    )
}

/// Collects characters into a string that is wiped when dropped, growing it by copying into a
/// fresh wiped-on-drop buffer, so no reallocation leaves a copy of the text in freed memory. An
/// allocation failure is an error, not an abort.
fn collect_wiping(chars: impl Iterator<Item = char>, hint: usize) -> Result<Zeroizing<String>, SearchError> {
    let mut out = Zeroizing::new(String::new());
    out.try_reserve_exact(hint.max(16)).map_err(|_| SearchError::ValueTooLarge)?;
    for c in chars {
        if out.capacity() - out.len() < c.len_utf8() {
            let mut bigger = Zeroizing::new(String::new());
            bigger.try_reserve_exact(out.capacity().saturating_mul(2)).map_err(|_| SearchError::ValueTooLarge)?;
            bigger.push_str(&out);
            out = bigger; // the old buffer is wiped as it drops
        }
        out.push(c);
    }
    Ok(out)
}

/// Normalises `s` as `n` says (see [`Normalization`]). The result is wiped when dropped.
///
/// Errors: [`SearchError::NoDigits`] and [`SearchError::NonAsciiDigit`] for `digits`;
/// [`SearchError::ValueTooLarge`] when memory runs out.
pub fn normalize_text(n: Normalization, s: &str) -> Result<Zeroizing<String>, SearchError> {
    // ASCII is stable under NFC and NFKC, contains no default-ignorable code point, and folds
    // by ASCII lower-casing only: the same result without the Unicode machinery (a property
    // test compares the two on random ASCII strings).
    if s.is_ascii() {
        match n {
            Normalization::None | Normalization::Nfc => return collect_wiping(s.chars(), s.len()),
            Normalization::NfkcCasefold => return collect_wiping(s.chars().map(|c| c.to_ascii_lowercase()), s.len()),
            Normalization::Digits => {}
        }
    }
    normalize_text_unicode(n, s)
}

/// [`normalize_text`] through the Unicode normalisation and folding iterators, for any input.
fn normalize_text_unicode(n: Normalization, s: &str) -> Result<Zeroizing<String>, SearchError> {
    match n {
        Normalization::None => collect_wiping(s.chars(), s.len()),
        Normalization::Nfc => collect_wiping(s.nfc(), s.len()),
        Normalization::NfkcCasefold => collect_wiping(
            s.nfkc().default_case_fold().filter(|&c| !is_default_ignorable(c)).nfkc(),
            s.len(),
        ),
        Normalization::Digits => {
            let mut non_ascii_digit = false;
            let out = collect_wiping(
                s.nfkc().filter(|&c| {
                    if c.is_ascii_digit() {
                        return true;
                    }
                    // Nd/Nl/No that NFKC left alone. (Std's Unicode tables: a newer toolchain
                    // may only turn an accepted value into this error, never change a term.)
                    if c.is_numeric() {
                        non_ascii_digit = true;
                    }
                    false
                }),
                s.len().min(64),
            )?;
            if non_ascii_digit {
                Err(SearchError::NonAsciiDigit)
            } else if out.is_empty() {
                Err(SearchError::NoDigits)
            } else {
                Ok(out)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------------

/// The SQL type of the indexed values. Part of the key derivation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueKind {
    Text,
    Bytea,
    Int8,
    Numeric,
    Date,
    Timestamptz,
    /// `timestamp` (without time zone): its own kind, so a term never depends on a session's
    /// TimeZone (an implicit cast to timestamptz would).
    Timestamp,
}

impl ValueKind {
    /// Every kind, in the order of their names in messages.
    pub const ALL: [ValueKind; 7] = [
        ValueKind::Text,
        ValueKind::Bytea,
        ValueKind::Int8,
        ValueKind::Numeric,
        ValueKind::Date,
        ValueKind::Timestamptz,
        ValueKind::Timestamp,
    ];

    /// The SQL-facing name: `text`, `bytea`, `int8`, `numeric`, `date`, `timestamptz`. Part of the
    /// key derivation.
    pub fn name(&self) -> &'static str {
        match self {
            ValueKind::Text => "text",
            ValueKind::Bytea => "bytea",
            ValueKind::Int8 => "int8",
            ValueKind::Numeric => "numeric",
            ValueKind::Date => "date",
            ValueKind::Timestamptz => "timestamptz",
            ValueKind::Timestamp => "timestamp",
        }
    }

    /// Parses [`ValueKind::name`] (exact, lowercase).
    pub fn parse(s: &str) -> Result<Self, SearchError> {
        ValueKind::ALL.into_iter().find(|k| k.name() == s).ok_or(SearchError::UnknownValueKind)
    }
}

impl fmt::Display for ValueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One value to index, as the SQL layer has it. Deliberately no `Debug`: it is plaintext.
#[derive(Clone, Copy)]
pub enum Value<'a> {
    /// The text, not yet normalised (the term key applies its normalisation).
    Text(&'a str),
    Bytea(&'a [u8]),
    Int8(i64),
    /// PostgreSQL's numeric output (`numeric_out`); made canonical by [`canonical_numeric`].
    Numeric(&'a str),
    /// PostgreSQL's `DateADT`: days since 2000-01-01 (`infinity` is `i32::MAX`, as stored).
    Date(i32),
    /// PostgreSQL's `TimestampTz`: microseconds since 2000-01-01 00:00 UTC.
    Timestamptz(i64),
    /// PostgreSQL's `Timestamp`: microseconds since 2000-01-01 00:00 (no time zone).
    Timestamp(i64),
}

impl Value<'_> {
    pub fn kind(&self) -> ValueKind {
        match self {
            Value::Text(_) => ValueKind::Text,
            Value::Bytea(_) => ValueKind::Bytea,
            Value::Int8(_) => ValueKind::Int8,
            Value::Numeric(_) => ValueKind::Numeric,
            Value::Date(_) => ValueKind::Date,
            Value::Timestamptz(_) => ValueKind::Timestamptz,
            Value::Timestamp(_) => ValueKind::Timestamp,
        }
    }
}

/// Makes numerically equal numeric texts identical, as PostgreSQL's `=` sees them
/// (`1.0 = 1.00 = 01`, `-0 = 0`): strips a leading `+`, leading zeros of the integer part,
/// trailing zeros of the fraction and a trailing `.`; `-0` becomes `0`; an empty integer part
/// becomes `0` (`.5` is `0.5`). Accepts `NaN`, `Infinity`, `+Infinity` and `-Infinity` exactly
/// (PostgreSQL treats all NaNs as equal). Rejects anything else: whitespace, exponents (which
/// `numeric_out` never produces), underscores, lowercase `nan`/`inf`.
pub fn canonical_numeric(s: &str) -> Result<String, SearchError> {
    canonical_numeric_wiping(s).map(|c| c.as_str().to_owned())
}

fn canonical_numeric_wiping(s: &str) -> Result<Zeroizing<String>, SearchError> {
    match s {
        "NaN" => return Ok(Zeroizing::new("NaN".to_owned())),
        "Infinity" | "+Infinity" => return Ok(Zeroizing::new("Infinity".to_owned())),
        "-Infinity" => return Ok(Zeroizing::new("-Infinity".to_owned())),
        _ => {}
    }
    let b = s.as_bytes();
    let (negative, rest) = match b.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, b),
    };
    let (int, frac) = match rest.iter().position(|&c| c == b'.') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &rest[rest.len()..]),
    };
    if (int.is_empty() && frac.is_empty()) || !int.iter().chain(frac).all(u8::is_ascii_digit) {
        return Err(SearchError::InvalidNumeric);
    }
    let int = &int[int.iter().position(|&c| c != b'0').unwrap_or(int.len())..];
    let frac = &frac[..frac.iter().rposition(|&c| c != b'0').map_or(0, |i| i + 1)];
    let mut out = Zeroizing::new(String::new());
    out.try_reserve_exact(int.len() + frac.len() + 3).map_err(|_| SearchError::ValueTooLarge)?;
    if negative && !(int.is_empty() && frac.is_empty()) {
        out.push('-');
    }
    // Only ASCII digits are left, so byte-wise pushes are valid UTF-8.
    if int.is_empty() {
        out.push('0');
    }
    out.extend(int.iter().map(|&c| c as char));
    if !frac.is_empty() {
        out.push('.');
        out.extend(frac.iter().map(|&c| c as char));
    }
    Ok(out)
}

/// Runs `f` on the canonical bytes of `v` under normalisation `n` (see the module doc), wiping
/// every copy this function makes.
fn with_canonical_bytes<R>(n: Normalization, v: &Value<'_>, f: impl FnOnce(&[u8]) -> R) -> Result<R, SearchError> {
    if v.kind() != ValueKind::Text && n != Normalization::None {
        return Err(SearchError::NormalizationNeedsText { kind: v.kind() });
    }
    fn fixed<const N: usize, R>(mut b: [u8; N], f: impl FnOnce(&[u8]) -> R) -> R {
        let r = f(&b);
        b.zeroize();
        r
    }
    Ok(match *v {
        Value::Text(s) if n == Normalization::None => f(s.as_bytes()),
        // ASCII fast paths (see normalize_text): no copy for NFC or already-lower-case text,
        // a wiped stack buffer for lower-casing short text.
        Value::Text(s) if s.is_ascii() && n == Normalization::Nfc => f(s.as_bytes()),
        Value::Text(s) if s.is_ascii() && n == Normalization::NfkcCasefold && !s.bytes().any(|b| b.is_ascii_uppercase()) => {
            f(s.as_bytes())
        }
        Value::Text(s) if s.is_ascii() && n == Normalization::NfkcCasefold && s.len() <= 256 => {
            let mut buf = [0u8; 256];
            for (d, b) in buf.iter_mut().zip(s.bytes()) {
                *d = b.to_ascii_lowercase();
            }
            let r = f(&buf[..s.len()]);
            buf.zeroize();
            r
        }
        Value::Text(s) => f(normalize_text(n, s)?.as_bytes()),
        Value::Bytea(b) => f(b),
        Value::Int8(i) => fixed(i.to_be_bytes(), f),
        Value::Numeric(s) => f(canonical_numeric_wiping(s)?.as_bytes()),
        Value::Date(d) => fixed(d.to_be_bytes(), f),
        Value::Timestamptz(t) | Value::Timestamp(t) => fixed(t.to_be_bytes(), f),
    })
}

/// The canonical bytes of `v` under normalisation `n`: exactly what a [`TermKey`] MACs (see the
/// module doc's table). Wiped when dropped. Errors as [`normalize_text`] and
/// [`canonical_numeric`], and [`SearchError::NormalizationNeedsText`].
pub fn canonical_value_bytes(n: Normalization, v: &Value<'_>) -> Result<Zeroizing<Vec<u8>>, SearchError> {
    with_canonical_bytes(n, v, |b| {
        let mut out = Zeroizing::new(Vec::new());
        out.try_reserve_exact(b.len()).map_err(|_| SearchError::ValueTooLarge)?;
        out.extend_from_slice(b);
        Ok(out)
    })?
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// The root of a blind index: 32 random bytes in a [`SecretKey`] (key pool, wiped on drop). One
/// index key can serve many purposes: each gets its own [`TermKey`]. No `Debug`, `Display` or
/// `Clone`.
pub struct IndexKey {
    key: SecretKey,
}

impl ZeroizeOnDrop for IndexKey {}

impl From<SecretKey> for IndexKey {
    fn from(key: SecretKey) -> Self {
        IndexKey { key }
    }
}

impl IndexKey {
    /// An index key from existing key bytes (for example unwrapped from storage).
    pub fn from_secret_key(key: SecretKey) -> Self {
        IndexKey { key }
    }

    /// A fresh index key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, SearchError> {
        SecretKey::generate().map(IndexKey::from).map_err(|_| SearchError::Random)
    }

    /// A fresh index key from a caller-supplied CSPRNG (tests and deterministic fixtures).
    pub fn generate_with<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        IndexKey { key: SecretKey::generate_with(rng) }
    }

    /// The key itself, to wrap it for storage ([`crate::wrap::wrap_key`]).
    pub fn secret_key(&self) -> &SecretKey {
        &self.key
    }

    /// Gives the key back (to wrap or store it), consuming the index key.
    pub fn into_secret_key(self) -> SecretKey {
        self.key
    }

    /// The term key for `purpose` (1..=[`MAX_PURPOSE_LEN`] bytes, no NUL), normalisation `n`
    /// and value kind `kind`: HKDF-SHA-256 with salt [`TERM_KEY_SALT`] and info
    /// [`term_key_info`]. Kinds other than `text` need [`Normalization::None`].
    pub fn term_key(&self, purpose: &str, n: Normalization, kind: ValueKind) -> Result<TermKey, SearchError> {
        if kind != ValueKind::Text && n != Normalization::None {
            return Err(SearchError::NormalizationNeedsText { kind });
        }
        let info = term_key_info(purpose, n, kind)?;
        let (mut prk, hk) = hkdf::Hkdf::<Sha256>::extract(Some(TERM_KEY_SALT), self.key.expose());
        prk.as_mut_slice().zeroize();
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        hk.expand(&info, &mut k[..]).map_err(|_| SearchError::KeyDerivation)?;
        drop(hk);
        let mac = <HmacSha256 as KeyInit>::new_from_slice(&k[..]).map_err(|_| SearchError::KeyDerivation)?;
        Ok(TermKey { mac: SecureBox::new(mac), normalization: n, kind })
    }
}

/// The HKDF `info` of a term key: purpose, normalisation name and kind name, each as a 4-byte
/// big-endian length and its bytes, so no two different triples give the same bytes. Checks
/// the purpose: 1..=[`MAX_PURPOSE_LEN`] bytes, no NUL.
pub fn term_key_info(purpose: &str, n: Normalization, kind: ValueKind) -> Result<Vec<u8>, SearchError> {
    if purpose.is_empty() {
        return Err(SearchError::InvalidPurpose("it is empty"));
    }
    if purpose.len() > MAX_PURPOSE_LEN {
        return Err(SearchError::InvalidPurpose("it is longer than 200 bytes"));
    }
    if purpose.contains('\0') {
        return Err(SearchError::InvalidPurpose("it contains a NUL character"));
    }
    let mut info = Vec::with_capacity(12 + purpose.len() + 32);
    for field in [purpose, n.name(), kind.name()] {
        // Every field is at most 200 bytes, so the length fits a u32.
        info.extend_from_slice(&(field.len() as u32).to_be_bytes());
        info.extend_from_slice(field.as_bytes());
    }
    Ok(info)
}

/// The key of one blind index (purpose, normalisation, value kind): makes its [`Term`]s. Holds
/// the keyed HMAC-SHA-256 state in the key pool (wiped on drop); the 32-byte key itself was wiped
/// once the state was built. No `Debug`, `Display` or `Clone`.
pub struct TermKey {
    mac: SecureBox<HmacSha256>,
    normalization: Normalization,
    kind: ValueKind,
}

impl ZeroizeOnDrop for TermKey {}

impl TermKey {
    /// The normalisation this key applies to text.
    pub fn normalization(&self) -> Normalization {
        self.normalization
    }

    /// The kind of value this key indexes.
    pub fn kind(&self) -> ValueKind {
        self.kind
    }

    /// The term of `value` under index key version `version` (>= 1): the first 16 bytes of
    /// HMAC-SHA-256(term key, canonical bytes). Text is normalised first with this key's
    /// normalisation. Errors: version 0, a value of another kind, and the errors of
    /// [`canonical_value_bytes`].
    pub fn term(&self, version: u32, value: &Value<'_>) -> Result<Term, SearchError> {
        let mut t = Term { version: 0, tag: [0; TAG_LEN] };
        self.term_into(version, value, &mut t)?;
        Ok(t)
    }

    /// [`TermKey::term`] written into `out` (left as it was on an error): the hot path's form,
    /// which hands the 20-byte term on by reference rather than through the nested `Result`s of
    /// its callers (each move of it was a store-forwarding stall, ~10 ns per term in perf).
    pub fn term_into(&self, version: u32, value: &Value<'_>, out: &mut Term) -> Result<(), SearchError> {
        if version == 0 {
            return Err(SearchError::InvalidVersion);
        }
        if value.kind() != self.kind {
            return Err(SearchError::KindMismatch { expected: self.kind, got: value.kind() });
        }
        // A copy of the keyed state: its SHA-256 states and buffer are wiped when it drops.
        let mut mac: HmacSha256 = (*self.mac).clone();
        with_canonical_bytes(self.normalization, value, |b| mac.update(b))?;
        let mut full = mac.finalize().into_bytes();
        out.version = version;
        out.tag.copy_from_slice(&full[..TAG_LEN]);
        full.as_mut_slice().zeroize();
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Terms
// ---------------------------------------------------------------------------------------------

/// One blind-index term: the index key version and the 128-bit tag. Not secret (it is what the
/// table stores), so it can be printed and compared. Fields are public: a `Term` built by hand
/// with version 0 encodes, but does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Term {
    pub version: u32,
    pub tag: [u8; TAG_LEN],
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl Term {
    /// The binary form: `0x01 || version (u32 BE) || tag`.
    pub fn to_bytes(&self) -> [u8; TERM_LEN] {
        let mut out = [0u8; TERM_LEN];
        out[0] = TERM_FORMAT_1;
        out[1..5].copy_from_slice(&self.version.to_be_bytes());
        out[5..].copy_from_slice(&self.tag);
        out
    }

    /// Parses [`Term::to_bytes`]: exactly [`TERM_LEN`] bytes, format byte 0x01, version >= 1.
    pub fn from_bytes(b: &[u8]) -> Result<Term, SearchError> {
        let b: &[u8; TERM_LEN] = b.try_into().map_err(|_| SearchError::InvalidTerm("it is not 21 bytes long"))?;
        if b[0] != TERM_FORMAT_1 {
            return Err(SearchError::InvalidTerm("unknown format byte"));
        }
        let version = u32::from_be_bytes([b[1], b[2], b[3], b[4]]);
        if version == 0 {
            return Err(SearchError::InvalidTerm("key version 0"));
        }
        if version > MAX_VERSION {
            return Err(SearchError::InvalidTerm("the version is above 2147483647"));
        }
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&b[5..]);
        Ok(Term { version, tag })
    }

    /// The text form: `bi1:v<version>:<32 lowercase hex digits of the tag>`.
    pub fn to_text(&self) -> String {
        let mut s = String::with_capacity(TERM_TEXT_PREFIX.len() + 10 + 1 + 2 * TAG_LEN);
        s.push_str(TERM_TEXT_PREFIX);
        s.push_str(&self.version.to_string());
        s.push(':');
        for &b in &self.tag {
            s.push(HEX[usize::from(b >> 4)] as char);
            s.push(HEX[usize::from(b & 0x0f)] as char);
        }
        s
    }

    /// Parses [`Term::to_text`] strictly: the exact prefix, a decimal version without sign or
    /// leading zeros that fits a `u32` and is not 0, one `:`, exactly 32 lowercase hex digits,
    /// nothing else (no whitespace).
    pub fn from_text(s: &str) -> Result<Term, SearchError> {
        let rest = s
            .strip_prefix(TERM_TEXT_PREFIX)
            .ok_or(SearchError::InvalidTerm("it does not start with 'bi1:v'"))?;
        let (version, hex) =
            rest.split_once(':').ok_or(SearchError::InvalidTerm("no ':' after the version"))?;
        let vb = version.as_bytes();
        if vb.is_empty() || vb.len() > 10 || !vb.iter().all(u8::is_ascii_digit) {
            return Err(SearchError::InvalidTerm("the version is not a decimal number"));
        }
        if vb[0] == b'0' {
            return Err(SearchError::InvalidTerm(if vb.len() == 1 {
                "key version 0"
            } else {
                "the version has leading zeros"
            }));
        }
        let version: u32 = version.parse().map_err(|_| SearchError::InvalidTerm("the version does not fit 32 bits"))?;
        if version > MAX_VERSION {
            return Err(SearchError::InvalidTerm("the version is above 2147483647"));
        }
        let hb = hex.as_bytes();
        if hb.len() != 2 * TAG_LEN {
            return Err(SearchError::InvalidTerm("the tag is not 32 hex digits"));
        }
        let mut tag = [0u8; TAG_LEN];
        for (t, pair) in tag.iter_mut().zip(hb.chunks_exact(2)) {
            match (hex_nibble(pair[0]), hex_nibble(pair[1])) {
                (Some(hi), Some(lo)) => *t = (hi << 4) | lo,
                _ => return Err(SearchError::InvalidTerm("the tag is not lowercase hex")),
            }
        }
        Ok(Term { version, tag })
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

// ---------------------------------------------------------------------------------------------
// Frequency leakage
// ---------------------------------------------------------------------------------------------

/// A warning for a DBA when a column's terms reveal too much through their frequencies, `None`
/// when they look fine (or there are fewer than [`LOW_CARDINALITY_MIN_ROWS`] rows to judge).
///
/// Equal values share a term, so anyone who can read the table sees the histogram of the
/// column. For a categorical column (status, country, gender, a yes/no flag) the histogram
/// matched against public frequencies recovers most values (Naveed, Kamara, Wright, "Inference
/// attacks on property-preserving encrypted databases", CCS 2015). Warns when there are at most
/// [`LOW_CARDINALITY_MAX_DISTINCT`] distinct terms, or when each term covers
/// [`LOW_CARDINALITY_ROWS_PER_TERM`] rows or more on average (`distinct / rows <= 1%`): a
/// column of e-mail addresses, account or phone numbers has close to one row per term, a
/// categorical one hundreds. The text contains only the two counts.
pub fn low_cardinality_warning(distinct_terms: u64, rows: u64) -> Option<String> {
    if rows < LOW_CARDINALITY_MIN_ROWS || distinct_terms == 0 || distinct_terms > rows {
        return None;
    }
    let few = distinct_terms <= LOW_CARDINALITY_MAX_DISTINCT;
    let repeated = u128::from(distinct_terms) * u128::from(LOW_CARDINALITY_ROWS_PER_TERM) <= u128::from(rows);
    if !few && !repeated {
        return None;
    }
    Some(format!(
        "blind index has {distinct_terms} distinct terms over {rows} rows (about {} rows per term): \
         equal values share a term, so anyone who can read the table sees how often each value occurs \
         and can infer the values of a low-cardinality column from known frequencies. Blind indexes suit \
         high-cardinality values (e-mail addresses, account numbers); consider dropping this index, or \
         restricting who can read the term column.",
        rows / distinct_terms
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key_0_to_31() -> IndexKey {
        let mut raw: [u8; 32] = core::array::from_fn(|i| i as u8);
        IndexKey::from_secret_key(SecretKey::from_bytes(&mut raw))
    }

    fn tk(purpose: &str, n: Normalization, kind: ValueKind) -> TermKey {
        key_0_to_31().term_key(purpose, n, kind).unwrap()
    }

    fn text_tag(n: Normalization, s: &str) -> [u8; TAG_LEN] {
        tk("users.name", n, ValueKind::Text).term(1, &Value::Text(s)).unwrap().tag
    }

    fn norm(n: Normalization, s: &str) -> String {
        normalize_text(n, s).unwrap().as_str().to_owned()
    }

    #[test]
    fn unicode_version_is_pinned() {
        // Part of term format 1: a dependency bump that changes it must fail here (new format
        // byte and re-index, see the module doc and Cargo.toml).
        assert_eq!(UNICODE_VERSION, (16, 0, 0));
        assert_eq!(CASE_FOLDING_UNICODE_VERSION, (16, 0, 0));
    }

    #[test]
    fn hash_states_zeroize_on_drop() {
        // Fails to compile if the `zeroize` features of sha2/digest are dropped from Cargo.toml:
        // the copies of the keyed HMAC state made per term would then stay in memory.
        fn zeroizes_on_drop<T: ZeroizeOnDrop>() {}
        zeroizes_on_drop::<sha2::Sha256>();
        zeroizes_on_drop::<IndexKey>();
        zeroizes_on_drop::<TermKey>();
    }

    #[test]
    fn names_parse_and_round_trip() {
        for n in Normalization::ALL {
            assert_eq!(Normalization::parse(n.name()), Ok(n));
        }
        for k in ValueKind::ALL {
            assert_eq!(ValueKind::parse(k.name()), Ok(k));
        }
        for bad in ["", "NFC", "Nfc", " nfc", "nfkc", "nfkc-casefold", "casefold"] {
            assert_eq!(Normalization::parse(bad), Err(SearchError::UnknownNormalization));
        }
        assert_eq!(ValueKind::parse("bigint"), Err(SearchError::UnknownValueKind));
        let msg = SearchError::UnknownNormalization.to_string();
        for n in Normalization::ALL {
            assert!(msg.contains(n.name()), "{msg}");
        }
    }

    #[test]
    fn unicode_normalizations() {
        use Normalization::*;
        // Case folding: full (ß -> ss), default (not Turkic), final sigma folds to sigma.
        assert_eq!(norm(NfkcCasefold, "Straße"), "strasse");
        assert_eq!(norm(NfkcCasefold, "STRASSE"), "strasse");
        assert_eq!(norm(NfkcCasefold, "İstanbul"), "i\u{307}stanbul");
        assert_eq!(norm(NfkcCasefold, "ΟΔΟΣ"), "οδοσ");
        assert_eq!(norm(NfkcCasefold, "οδος"), "οδοσ");
        // Compatibility: ligature, full width, circled, Kelvin sign, ㎒ -> MHz -> mhz.
        assert_eq!(norm(NfkcCasefold, "ﬁle"), "file");
        assert_eq!(norm(NfkcCasefold, "ＡＢＣ"), "abc");
        assert_eq!(norm(NfkcCasefold, "\u{212A}"), "k");
        assert_eq!(norm(NfkcCasefold, "㎒"), "mhz");
        // Composed and decomposed é.
        assert_eq!(norm(NfkcCasefold, "e\u{301}"), "\u{e9}");
        assert_eq!(norm(Nfc, "e\u{301}"), "\u{e9}");
        assert_eq!(norm(Nfc, "É"), "É");
        assert_eq!(norm(None, "e\u{301}"), "e\u{301}");
        // Default-ignorable code points are removed (and the text around them recomposed).
        assert_eq!(norm(NfkcCasefold, "a\u{200B}b\u{AD}c\u{FE0F}"), "abc");
        assert_eq!(norm(NfkcCasefold, "e\u{200B}\u{301}"), "\u{e9}");
        assert_eq!(norm(Nfc, "a\u{200B}b"), "a\u{200B}b");
        // Canonically equivalent orders of ypogegrammeni and acute give one result.
        assert_eq!(norm(NfkcCasefold, "A\u{345}\u{301}"), norm(NfkcCasefold, "A\u{301}\u{345}"));
        assert_eq!(norm(NfkcCasefold, "A\u{345}\u{301}"), "\u{e1}\u{3b9}");
        // NFC keeps compatibility characters.
        assert_eq!(norm(Nfc, "ﬁ"), "ﬁ");
        // Digits.
        assert_eq!(norm(Digits, "+1 (555) 010-9999"), "15550109999");
        assert_eq!(norm(Digits, "１２３"), "123");
        assert_eq!(norm(Digits, "①②"), "12");
        assert_eq!(normalize_text(Digits, "abc").unwrap_err(), SearchError::NoDigits);
        assert_eq!(normalize_text(Digits, "").unwrap_err(), SearchError::NoDigits);
        assert_eq!(normalize_text(Digits, "1\u{663}3").unwrap_err(), SearchError::NonAsciiDigit);
        assert_eq!(normalize_text(Digits, "\u{967}").unwrap_err(), SearchError::NonAsciiDigit);
        assert_eq!(norm(None, ""), "");
        assert_eq!(norm(NfkcCasefold, ""), "");
    }

    #[test]
    fn long_and_expanding_text() {
        // U+FDFA expands to 18 characters (33 bytes) under NFKC: the wiping buffer must grow.
        let s = "\u{FDFA}".repeat(500) + &"Aß".repeat(1000);
        let expected: String = s.nfkc().default_case_fold().nfkc().collect();
        assert_eq!(norm(Normalization::NfkcCasefold, &s), expected);
        let digits = "１-".repeat(10_000);
        assert_eq!(norm(Normalization::Digits, &digits), "1".repeat(10_000));
        assert_eq!(norm(Normalization::None, &s), s);
    }

    #[test]
    fn unicode_terms() {
        use Normalization::*;
        assert_eq!(text_tag(NfkcCasefold, "Straße"), text_tag(NfkcCasefold, "STRASSE"));
        assert_ne!(text_tag(Nfc, "Straße"), text_tag(Nfc, "STRASSE"));
        assert_eq!(text_tag(NfkcCasefold, "ﬁ"), text_tag(NfkcCasefold, "FI"));
        assert_eq!(text_tag(NfkcCasefold, "ＡＢＣ"), text_tag(NfkcCasefold, "abc"));
        for n in [Nfc, NfkcCasefold] {
            assert_eq!(text_tag(n, "\u{e9}"), text_tag(n, "e\u{301}"), "{n}");
        }
        assert_ne!(text_tag(None, "\u{e9}"), text_tag(None, "e\u{301}"));
        assert_eq!(text_tag(NfkcCasefold, "İ"), text_tag(NfkcCasefold, "i\u{307}"));
        assert_ne!(text_tag(NfkcCasefold, "İ"), text_tag(NfkcCasefold, "i"));
        assert_eq!(text_tag(NfkcCasefold, "ΟΔΟΣ"), text_tag(NfkcCasefold, "οδος"));
        assert_eq!(text_tag(Digits, "+1 (555) 010-9999"), text_tag(Digits, "15550109999"));
        assert_eq!(text_tag(Digits, "１２３"), text_tag(Digits, "123"));
        let k = tk("users.phone", Digits, ValueKind::Text);
        assert_eq!(k.term(1, &Value::Text("abc")).unwrap_err(), SearchError::NoDigits);
    }

    // Golden vectors of term format 1: index key 00 01 .. 1f, key version 7. Computed once by this
    // code and cross-checked with an independent HKDF/HMAC in Python (hashlib/hmac). A change in
    // any of these changes every stored term: it needs a new format byte and a re-index, never
    // an edit of the expected values.
    #[test]
    fn golden_vectors() {
        use Normalization as N;
        use ValueKind as K;
        let key = key_0_to_31();
        let cases: &[(&str, Normalization, ValueKind, Value<'_>, &str)] = &[
            ("users.email", N::None, K::Text, Value::Text("alice@example.com"), "bi1:v7:2b2d4e54cd94f02a0f363e97b4110099"),
            ("users.email", N::Nfc, K::Text, Value::Text("alice@example.com"), "bi1:v7:e68e45569f418caf909b8a2b229bd1e3"),
            ("users.email", N::NfkcCasefold, K::Text, Value::Text("Alice@Example.COM"), "bi1:v7:ce94edb34689ef97a00ff099c1247efc"),
            ("users.street", N::NfkcCasefold, K::Text, Value::Text("Straße"), "bi1:v7:8f411681ad80b06ce75b2fa4d81d4bab"),
            ("users.street", N::NfkcCasefold, K::Text, Value::Text("STRASSE"), "bi1:v7:8f411681ad80b06ce75b2fa4d81d4bab"),
            ("users.name", N::Nfc, K::Text, Value::Text("e\u{301}"), "bi1:v7:3e8d8708e70528c30e813ed6b17df819"),
            ("users.name", N::Nfc, K::Text, Value::Text("\u{e9}"), "bi1:v7:3e8d8708e70528c30e813ed6b17df819"),
            ("users.name", N::None, K::Text, Value::Text("e\u{301}"), "bi1:v7:efc5a136a230d7260bf2e5e78c4f3fb4"),
            ("users.name", N::NfkcCasefold, K::Text, Value::Text("ＡＢＣ ﬁ İ ΟΔΟΣ"), "bi1:v7:cf217143f9b3d0c76d97906cb8f4768b"),
            ("users.phone", N::Digits, K::Text, Value::Text("+1 (555) 010-9999"), "bi1:v7:857335118e02f014ecec9020902dc8fd"),
            ("users.phone", N::Digits, K::Text, Value::Text("１２３"), "bi1:v7:8f66eba23a1ac2b6c9043d89fbb36a28"),
            ("files.hash", N::None, K::Bytea, Value::Bytea(&[0, 1, 2, 0xff]), "bi1:v7:1d5cff21b2eb5267c47792623ac4bfd4"),
            ("accounts.no", N::None, K::Int8, Value::Int8(-42), "bi1:v7:c3c0bc3083e74f1803cca25ac997286c"),
            ("accounts.balance", N::None, K::Numeric, Value::Numeric("+0012.3400"), "bi1:v7:2c53884329d413ec07dd10d3818b79cb"),
            ("accounts.balance", N::None, K::Numeric, Value::Numeric("NaN"), "bi1:v7:5edd7bdf483c383ccb813cac8527c815"),
            ("users.birthday", N::None, K::Date, Value::Date(-1234), "bi1:v7:af4b32acd88bd05c38dca447bc1a0f8f"),
            ("events.at", N::None, K::Timestamptz, Value::Timestamptz(757_382_400_000_000), "bi1:v7:c14037436fa3fa070d68e7c678024b42"),
        ];
        for (purpose, n, kind, value, expected) in cases {
            let term = key.term_key(purpose, *n, *kind).unwrap().term(7, value).unwrap();
            assert_eq!(term.to_text(), *expected, "{purpose} {n} {kind}");
        }
    }

    #[test]
    fn term_key_info_is_unambiguous() {
        let a = term_key_info("ab", Normalization::None, ValueKind::Text).unwrap();
        let b = term_key_info("a", Normalization::None, ValueKind::Text).unwrap();
        assert_ne!(a, b);
        let mut expected = Vec::new();
        expected.extend_from_slice(&[0, 0, 0, 2]);
        expected.extend_from_slice(b"ab");
        expected.extend_from_slice(&[0, 0, 0, 4]);
        expected.extend_from_slice(b"none");
        expected.extend_from_slice(&[0, 0, 0, 4]);
        expected.extend_from_slice(b"text");
        assert_eq!(a, expected);
        // A purpose that ends like another's encoded normalisation cannot collide either:
        // the lengths differ.
        let tricky = term_key_info("a\u{0}\u{0}\u{0}\u{4}none", Normalization::None, ValueKind::Text);
        assert!(tricky.is_err(), "NUL is refused anyway");
        let split1 = term_key_info("users.ab", Normalization::Nfc, ValueKind::Text).unwrap();
        let split2 = term_key_info("users.a", Normalization::Nfc, ValueKind::Text).unwrap();
        assert_ne!(split1, split2);
        // And the keys differ for ("ab","c")-style splits through the real derivation.
        let k = key_0_to_31();
        let t1 = k.term_key("ab", Normalization::None, ValueKind::Text).unwrap().term(1, &Value::Text("c")).unwrap();
        let t2 = k.term_key("a", Normalization::None, ValueKind::Text).unwrap().term(1, &Value::Text("bc")).unwrap();
        assert_ne!(t1, t2);
    }

    #[test]
    fn purposes_are_checked() {
        let k = key_0_to_31();
        let ok = "p".repeat(MAX_PURPOSE_LEN);
        assert!(k.term_key(&ok, Normalization::None, ValueKind::Text).is_ok());
        for bad in [String::new(), "p".repeat(MAX_PURPOSE_LEN + 1), "a\0b".to_owned()] {
            assert!(matches!(
                k.term_key(&bad, Normalization::None, ValueKind::Text),
                Err(SearchError::InvalidPurpose(_))
            ));
        }
        // 200 bytes, not characters.
        assert!(k.term_key(&"é".repeat(101), Normalization::None, ValueKind::Text).is_err());
    }

    #[test]
    fn non_text_kinds_need_normalization_none() {
        let k = key_0_to_31();
        for kind in ValueKind::ALL.into_iter().filter(|&k| k != ValueKind::Text) {
            for n in [Normalization::Nfc, Normalization::NfkcCasefold, Normalization::Digits] {
                assert_eq!(
                    k.term_key("p", n, kind).err(),
                    Some(SearchError::NormalizationNeedsText { kind }),
                    "{kind} {n}"
                );
            }
            assert!(k.term_key("p", Normalization::None, kind).is_ok());
        }
        assert_eq!(
            canonical_value_bytes(Normalization::Nfc, &Value::Int8(1)).unwrap_err(),
            SearchError::NormalizationNeedsText { kind: ValueKind::Int8 }
        );
    }

    #[test]
    fn canonical_bytes_per_kind() {
        let n = Normalization::None;
        assert_eq!(&**canonical_value_bytes(n, &Value::Int8(1)).unwrap(), &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(&**canonical_value_bytes(n, &Value::Int8(-1)).unwrap(), &[0xff; 8]);
        assert_eq!(&**canonical_value_bytes(n, &Value::Date(1)).unwrap(), &[0, 0, 0, 1]);
        assert_eq!(&**canonical_value_bytes(n, &Value::Timestamptz(256)).unwrap(), &[0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&**canonical_value_bytes(n, &Value::Bytea(b"\x00x")).unwrap(), b"\x00x");
        assert_eq!(&**canonical_value_bytes(n, &Value::Numeric("-01.50")).unwrap(), b"-1.5");
        assert_eq!(&**canonical_value_bytes(n, &Value::Text("A")).unwrap(), b"A");
        assert_eq!(
            &**canonical_value_bytes(Normalization::NfkcCasefold, &Value::Text("A")).unwrap(),
            b"a"
        );
    }

    #[test]
    fn numeric_canonicalisation() {
        for (input, canon) in [
            ("1", "1"),
            ("1.0", "1"),
            ("1.00", "1"),
            ("01", "1"),
            ("+1", "1"),
            ("1.", "1"),
            ("-0", "0"),
            ("0", "0"),
            ("0.000", "0"),
            ("-0.000", "0"),
            ("+.0", "0"),
            ("000", "0"),
            (".5", "0.5"),
            ("-.5", "-0.5"),
            ("-0012.3400", "-12.34"),
            ("100", "100"),
            ("10.01", "10.01"),
            ("NaN", "NaN"),
            ("Infinity", "Infinity"),
            ("+Infinity", "Infinity"),
            ("-Infinity", "-Infinity"),
        ] {
            assert_eq!(canonical_numeric(input).unwrap(), canon, "{input}");
        }
        for bad in [
            "", "+", "-", ".", "-.", "1e5", "1E5", "1.5e-3", " 1", "1 ", "1_000", "1.2.3", "--1", "+-1", "nan",
            "-NaN", "+NaN", "inf", "infinity", "0x10", "１", "1,5",
        ] {
            assert_eq!(canonical_numeric(bad), Err(SearchError::InvalidNumeric), "{bad:?}");
        }
        let k = tk("accounts.balance", Normalization::None, ValueKind::Numeric);
        let t = |s: &str| k.term(1, &Value::Numeric(s)).unwrap();
        assert_eq!(t("1.0"), t("1.00"));
        assert_eq!(t("1.0"), t("01"));
        assert_eq!(t("1.0"), t("+1"));
        assert_eq!(t("-0"), t("0"));
        assert_eq!(t("0"), t("0.000"));
        assert_ne!(t("1.5"), t("15"));
        assert_ne!(t("Infinity"), t("-Infinity"));
        assert_eq!(k.term(1, &Value::Numeric("1e5")).unwrap_err(), SearchError::InvalidNumeric);
    }

    #[test]
    fn everything_in_the_derivation_separates_terms() {
        let k = key_0_to_31();
        let base = k.term_key("users.email", Normalization::None, ValueKind::Text).unwrap();
        let v = Value::Text("1");
        let t = base.term(1, &v).unwrap();
        assert_eq!(t, base.term(1, &v).unwrap(), "deterministic");
        let other_purpose = k.term_key("users.email2", Normalization::None, ValueKind::Text).unwrap();
        assert_ne!(t.tag, other_purpose.term(1, &v).unwrap().tag);
        for n in [Normalization::Nfc, Normalization::NfkcCasefold, Normalization::Digits] {
            let other = k.term_key("users.email", n, ValueKind::Text).unwrap();
            assert_ne!(t.tag, other.term(1, &v).unwrap().tag, "{n}");
        }
        // '1' as text vs 1 as int8, and the same bytes as bytea.
        let int = k.term_key("users.email", Normalization::None, ValueKind::Int8).unwrap();
        assert_ne!(t.tag, int.term(1, &Value::Int8(1)).unwrap().tag);
        let bytea = k.term_key("users.email", Normalization::None, ValueKind::Bytea).unwrap();
        assert_ne!(t.tag, bytea.term(1, &Value::Bytea(b"1")).unwrap().tag);
        let numeric = k.term_key("users.email", Normalization::None, ValueKind::Numeric).unwrap();
        assert_ne!(t.tag, numeric.term(1, &Value::Numeric("1")).unwrap().tag);
        // Another index key.
        let mut raw = [0x5au8; 32];
        let k2 = IndexKey::from_secret_key(SecretKey::from_bytes(&mut raw));
        let t2 = k2.term_key("users.email", Normalization::None, ValueKind::Text).unwrap().term(1, &v).unwrap();
        assert_ne!(t.tag, t2.tag);
        let g1 = IndexKey::generate().unwrap();
        let g2 = IndexKey::generate().unwrap();
        let tg = |g: &IndexKey| g.term_key("p", Normalization::None, ValueKind::Text).unwrap().term(1, &v).unwrap();
        assert_ne!(tg(&g1).tag, tg(&g2).tag);
        // The version is in the term bytes (the tag itself depends on the key only).
        let t5 = base.term(5, &v).unwrap();
        assert_eq!(t5.tag, t.tag);
        assert_ne!(t5.to_bytes(), t.to_bytes());
        assert_ne!(t5.to_text(), t.to_text());
        assert_eq!(base.term(0, &v).unwrap_err(), SearchError::InvalidVersion);
        assert_eq!(
            base.term(1, &Value::Int8(1)).unwrap_err(),
            SearchError::KindMismatch { expected: ValueKind::Text, got: ValueKind::Int8 }
        );
        assert_eq!(base.normalization(), Normalization::None);
        assert_eq!(base.kind(), ValueKind::Text);
    }

    #[test]
    fn index_key_round_trips_through_secret_key() {
        let k = key_0_to_31();
        let t = k.term_key("p", Normalization::None, ValueKind::Text).unwrap().term(1, &Value::Text("x")).unwrap();
        assert_eq!(k.secret_key().expose(), &core::array::from_fn::<u8, 32, _>(|i| i as u8));
        let back = IndexKey::from(k.into_secret_key());
        let t2 = back.term_key("p", Normalization::None, ValueKind::Text).unwrap().term(1, &Value::Text("x")).unwrap();
        assert_eq!(t, t2);
        // generate_with is deterministic for a seeded generator.
        use rand_core::SeedableRng;
        let a = IndexKey::generate_with(&mut rand_chacha::ChaCha20Rng::seed_from_u64(1));
        let b = IndexKey::generate_with(&mut rand_chacha::ChaCha20Rng::seed_from_u64(1));
        assert_eq!(a.secret_key().expose(), b.secret_key().expose());
    }

    #[test]
    fn timestamp_and_timestamptz_are_different_kinds() {
        let key = IndexKey::from_secret_key(SecretKey::from_slice(&[7u8; 32]).unwrap());
        let a = key.term_key("p", Normalization::None, ValueKind::Timestamp).unwrap().term(1, &Value::Timestamp(42)).unwrap();
        let b = key.term_key("p", Normalization::None, ValueKind::Timestamptz).unwrap().term(1, &Value::Timestamptz(42)).unwrap();
        assert_ne!(a, b);
        assert_eq!(ValueKind::parse("timestamp"), Ok(ValueKind::Timestamp));
    }

    #[test]
    fn term_encodings_reject_malformed_input() {
        let t = Term { version: 3, tag: core::array::from_fn(|i| (i * 17) as u8) };
        let text = t.to_text();
        assert_eq!(text, "bi1:v3:00112233445566778899aabbccddeeff");
        assert_eq!(t.to_string(), text);
        assert_eq!(Term::from_text(&text), Ok(t));
        let bytes = t.to_bytes();
        assert_eq!(bytes[..5], [1, 0, 0, 0, 3]);
        assert_eq!(Term::from_bytes(&bytes), Ok(t));
        let max = Term { version: MAX_VERSION, tag: [0xff; 16] };
        assert_eq!(Term::from_text(&max.to_text()), Ok(max));
        assert_eq!(Term::from_bytes(&max.to_bytes()), Ok(max));
        // Versions are PostgreSQL integers: above 2^31 - 1 is no term.
        let over = Term { version: MAX_VERSION + 1, tag: [0xff; 16] };
        assert!(Term::from_text(&over.to_text()).is_err());
        assert!(Term::from_bytes(&over.to_bytes()).is_err());

        for bad in [
            "",
            "bi1:v3:00112233445566778899AABBCCDDEEFF",
            "bi1:v3:00112233445566778899aabbccddeeFF",
            " bi1:v3:00112233445566778899aabbccddeeff",
            "bi1:v3:00112233445566778899aabbccddeeff ",
            "bi1:v3:00112233445566778899aabbccddeeff\n",
            "bi1:v3: 00112233445566778899aabbccddeeff",
            "bi1:v 3:00112233445566778899aabbccddeeff",
            "bi1:v03:00112233445566778899aabbccddeeff",
            "bi1:v0:00112233445566778899aabbccddeeff",
            "bi1:v+3:00112233445566778899aabbccddeeff",
            "bi1:v-3:00112233445566778899aabbccddeeff",
            "bi1:v4294967296:00112233445566778899aabbccddeeff",
            "bi1:v99999999999:00112233445566778899aabbccddeeff",
            "bi1:v:00112233445566778899aabbccddeeff",
            "bi1:v3:00112233445566778899aabbccddee",
            "bi1:v3:00112233445566778899aabbccddeeff00",
            "bi1:v3:00112233445566778899aabbccddeefg",
            "bi1:v3:0x112233445566778899aabbccddeeff",
            "bi1:v3:00112233445566778899aabbccdd:eff",
            "bi2:v3:00112233445566778899aabbccddeeff",
            "BI1:v3:00112233445566778899aabbccddeeff",
            "bi1:V3:00112233445566778899aabbccddeeff",
            "bi1:v3",
            "bi1:v3:00112233445566778899aabbccddeeé",
            "\\x010000000300112233445566778899aabbccddeeff",
        ] {
            assert!(matches!(Term::from_text(bad), Err(SearchError::InvalidTerm(_))), "{bad:?}");
        }
        assert!(Term::from_text("bi1:v2147483647:00112233445566778899aabbccddeeff").is_ok());
        assert!(Term::from_text("bi1:v4294967295:00112233445566778899aabbccddeeff").is_err());

        assert!(Term::from_bytes(&bytes[..20]).is_err());
        assert!(Term::from_bytes(&[bytes.as_slice(), &[0]].concat()).is_err());
        assert!(Term::from_bytes(&[]).is_err());
        let mut wrong_format = bytes;
        wrong_format[0] = 0x02;
        assert_eq!(Term::from_bytes(&wrong_format), Err(SearchError::InvalidTerm("unknown format byte")));
        wrong_format[0] = 0x00;
        assert!(Term::from_bytes(&wrong_format).is_err());
        let mut v0 = bytes;
        v0[1..5].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(Term::from_bytes(&v0), Err(SearchError::InvalidTerm("key version 0")));
    }

    #[test]
    fn messages_never_echo_values() {
        let secret = "s3cr3t-v4lue";
        let k = tk("p", Normalization::Digits, ValueKind::Text);
        let e = k.term(1, &Value::Text("no-digits-here")).unwrap_err().to_string();
        assert!(!e.contains("no-digits-here"), "{e}");
        let e = canonical_numeric(secret).unwrap_err().to_string();
        assert!(!e.contains(secret), "{e}");
        let e = Term::from_text(secret).unwrap_err().to_string();
        assert!(!e.contains(secret), "{e}");
        let all = [
            SearchError::UnknownNormalization,
            SearchError::UnknownValueKind,
            SearchError::NormalizationNeedsText { kind: ValueKind::Date },
            SearchError::InvalidPurpose("it is empty"),
            SearchError::KindMismatch { expected: ValueKind::Text, got: ValueKind::Int8 },
            SearchError::NoDigits,
            SearchError::NonAsciiDigit,
            SearchError::InvalidNumeric,
            SearchError::InvalidVersion,
            SearchError::InvalidTerm("x"),
            SearchError::ValueTooLarge,
            SearchError::Random,
            SearchError::KeyDerivation,
        ];
        for e in all {
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn low_cardinality() {
        assert_eq!(low_cardinality_warning(2, 99), None, "too few rows to judge");
        assert_eq!(low_cardinality_warning(0, 1_000_000), None, "no terms");
        assert_eq!(low_cardinality_warning(200, 100), None, "inconsistent counts");
        assert_eq!(low_cardinality_warning(100, 100), None, "all distinct");
        assert_eq!(low_cardinality_warning(90_000, 100_000), None);
        assert_eq!(low_cardinality_warning(17, 1_000), None);
        assert_eq!(low_cardinality_warning(1_001, 100_000), None);
        let w = low_cardinality_warning(2, 100).unwrap();
        assert!(w.contains("2 distinct terms over 100 rows"), "{w}");
        assert!(low_cardinality_warning(16, 1_000).is_some());
        assert!(low_cardinality_warning(1_000, 100_000).is_some(), "100 rows per term");
        assert!(low_cardinality_warning(200, 1_000_000).is_some(), "countries");
        assert!(low_cardinality_warning(u64::MAX / 2, u64::MAX).is_none());
        assert!(low_cardinality_warning(1, u64::MAX).is_some());
    }

    /// Characters where folding, compatibility mappings and (de)composition interact: combining
    /// marks (U+0345 ypogegrammeni folds to iota), sharp s, dotted I, sigmas, ligatures, Hangul
    /// jamo, default ignorables, digits of several scripts.
    const TRICKY: &[char] = &[
        'a', 'A', 'e', 'E', 'i', 'I', 's', 'S', 'k', 'K', 'ß', 'ẞ', 'İ', 'ı', 'ς', 'σ', 'Σ', 'ι', 'ͅ', 'ᾳ', 'ᾼ', 'ΐ',
        '\u{301}', '\u{300}', '\u{308}', '\u{307}', '\u{327}', '\u{345}', '\u{1FBE}', 'ﬁ', 'ﬀ', 'ﬃ', 'Ａ', 'ａ',
        '\u{212A}', '\u{212B}', 'Å', 'å', 'ǅ', 'Ǆ', 'ǆ', '㎒', '①', '１', '٣', '7', 'ᄀ', 'ᅡ', 'ᆨ', '가', '\u{200B}',
        '\u{200D}', '\u{AD}', '\u{FE0F}', '\u{3164}', '\u{FFA0}', 'ŉ', 'ǰ', 'ﬆ', 'Ω', '\u{2126}', 'ϴ', 'θ', 'ϑ',
        '\u{1E9E}', '\u{0}',
    ];

    fn arb_term() -> impl Strategy<Value = Term> {
        (1u32..=MAX_VERSION, any::<[u8; 16]>()).prop_map(|(version, tag)| Term { version, tag })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// The ASCII fast paths give exactly what the Unicode path gives.
        #[test]
        fn ascii_fast_paths_match_the_unicode_path(s in "[\\x00-\\x7f]{0,300}") {
            for n in [Normalization::None, Normalization::Nfc, Normalization::NfkcCasefold, Normalization::Digits] {
                let fast = normalize_text(n, &s).map(|z| z.to_string());
                let slow = normalize_text_unicode(n, &s).map(|z| z.to_string());
                prop_assert_eq!(&fast, &slow);
                if n != Normalization::Digits {
                    let canonical = canonical_value_bytes(n, &Value::Text(&s)).map(|z| z.to_vec());
                    prop_assert_eq!(canonical, slow.map(|z| z.into_bytes()));
                }
            }
        }

        #[test]
        fn terms_round_trip(t in arb_term()) {
            prop_assert_eq!(Term::from_bytes(&t.to_bytes()), Ok(t));
            prop_assert_eq!(Term::from_text(&t.to_text()), Ok(t));
            let text = t.to_text();
            prop_assert!(text.starts_with("bi1:v"));
            prop_assert!(text.len() <= 48);
        }

        #[test]
        fn decoding_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64), s in ".{0,64}") {
            let _ = Term::from_bytes(&b);
            let _ = Term::from_text(&s);
            let _ = Term::from_text(&String::from_utf8_lossy(&b));
            let _ = canonical_numeric(&s);
        }

        #[test]
        fn accepted_text_is_canonical(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            // Whatever parses re-encodes to the same text: one text per term.
            let s = format!("bi1:v{}", String::from_utf8_lossy(&b));
            if let Ok(t) = Term::from_text(&s) {
                prop_assert_eq!(t.to_text(), s);
            }
        }

        #[test]
        fn normalization_never_panics_and_is_idempotent(s in "\\PC{0,24}") {
            for n in Normalization::ALL {
                if let Ok(once) = normalize_text(n, &s) {
                    let twice = normalize_text(n, &once).unwrap();
                    prop_assert_eq!(once.as_str(), twice.as_str(), "{}", n);
                }
            }
            let k = key_0_to_31();
            for n in Normalization::ALL {
                let tk = k.term_key("p", n, ValueKind::Text).unwrap();
                let _ = tk.term(1, &Value::Text(&s));
            }
        }

        #[test]
        fn tricky_text_normalizes_idempotently(chars in proptest::collection::vec(proptest::sample::select(TRICKY), 0..12)) {
            // Strings built from the characters where case folding and (de)composition interact.
            let s: String = chars.into_iter().collect();
            for n in Normalization::ALL {
                if let Ok(once) = normalize_text(n, &s) {
                    let twice = normalize_text(n, &once).unwrap();
                    prop_assert_eq!(once.as_str(), twice.as_str(), "{} {:?}", n, s);
                }
            }
        }

        #[test]
        fn numeric_canonical_form_is_a_fixed_point(int in "[0-9]{0,6}", frac in "[0-9]{0,6}", sign in "[-+]?") {
            let s = format!("{sign}{int}.{frac}");
            if let Ok(c) = canonical_numeric(&s) {
                prop_assert_eq!(canonical_numeric(&c).unwrap(), c.clone());
                prop_assert!(!c.ends_with('.') && !c.starts_with('+'));
                prop_assert!(c == "0" || !c.trim_start_matches('-').starts_with("00"));
            }
        }
    }
}
