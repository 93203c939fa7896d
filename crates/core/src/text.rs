//! The check a decrypted value passes before it is returned as `text` in a UTF-8 database.

/// Valid UTF-8 without NUL bytes (PostgreSQL's rules for `text`: no surrogates, nothing above
/// U+10FFFF, no NUL). ASCII text, the common case, is checked in one branch-free pass that the
/// compiler vectorises: a byte is ASCII and not NUL exactly when neither it nor itself minus one
/// has the high bit set.
#[inline]
pub fn valid_utf8_text(bytes: &[u8]) -> bool {
    let high = bytes.iter().fold(0u8, |acc, &b| acc | b | b.wrapping_sub(1));
    if high & 0x80 == 0 {
        return true;
    }
    !bytes.contains(&0) && std::str::from_utf8(bytes).is_ok()
}

/// `bytes` as UTF-8: ASCII without NUL (the common case) through [`valid_utf8_text`]'s
/// vectorised pass, anything else through `from_utf8` (which, unlike [`valid_utf8_text`],
/// accepts NUL). For inputs that cannot hold a NUL (a C string, a `text` datum) this is
/// `from_utf8` at a fraction of its cost.
#[inline]
pub fn utf8_str(bytes: &[u8]) -> Result<&str, std::str::Utf8Error> {
    if valid_utf8_text(bytes) {
        // SAFETY: valid_utf8_text checked that the bytes are valid UTF-8.
        Ok(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        std::str::from_utf8(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn edges() {
        assert!(valid_utf8_text(b""));
        assert!(valid_utf8_text(b"user@example.com"));
        assert!(valid_utf8_text("Zoë 日本".as_bytes()));
        assert!(!valid_utf8_text(b"a\0b"));
        assert!(!valid_utf8_text(b"\0"));
        assert!(!valid_utf8_text(b"\x80"));
        assert!(!valid_utf8_text(b"\xed\xa0\x80")); // a surrogate
        assert!(!valid_utf8_text(b"\xf4\x90\x80\x80")); // above U+10FFFF
        assert!(valid_utf8_text(b"\x7f"));
        assert!(valid_utf8_text(b"\x01"));
    }

    proptest! {
        /// utf8_str is from_utf8, NUL included.
        #[test]
        fn utf8_str_is_from_utf8(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(utf8_str(&bytes).ok(), std::str::from_utf8(&bytes).ok());
        }


        /// The fast path agrees with the plain definition on every input.
        #[test]
        fn agrees_with_the_definition(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let plain = !bytes.contains(&0) && std::str::from_utf8(&bytes).is_ok();
            prop_assert_eq!(valid_utf8_text(&bytes), plain);
        }

        #[test]
        fn agrees_on_mostly_ascii(bytes in proptest::collection::vec(0u8..0x81, 0..64)) {
            let plain = !bytes.contains(&0) && std::str::from_utf8(&bytes).is_ok();
            prop_assert_eq!(valid_utf8_text(&bytes), plain);
        }
    }
}

/// Byte equality for the short, public strings compared on every key use (tenant names, setting
/// names, blind-index purposes), without a call into libc's `memcmp`: two overlapping 8-byte
/// loads for 8-16 bytes, a byte loop below 8, the slice compare above 16. Not constant-time:
/// never for secrets.
#[inline(always)]
pub fn short_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if n >= 8 && n <= 16 {
        let word = |s: &[u8], at: usize| u64::from_ne_bytes(s[at..at + 8].try_into().expect("8 bytes"));
        return word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8);
    }
    if n < 8 {
        let mut d = 0u8;
        for i in 0..n {
            d |= a[i] ^ b[i];
        }
        return d == 0;
    }
    a == b
}

#[cfg(test)]
mod short_eq_tests {
    use super::short_eq;

    #[test]
    fn agrees_with_slice_equality_at_every_length_and_position() {
        let base: Vec<u8> = (0..40u8).map(|i| b'a' + i % 26).collect();
        for n in 0..=40 {
            let a = &base[..n];
            assert!(short_eq(a, a), "{n}");
            for i in 0..n {
                let mut b = a.to_vec();
                b[i] ^= 0x20;
                assert!(!short_eq(a, &b), "length {n}, byte {i}");
            }
            if n > 0 {
                assert!(!short_eq(a, &base[..n - 1]), "prefix of {n}");
                assert!(!short_eq(&base[..n - 1], a), "prefix of {n}");
            }
        }
    }
}
