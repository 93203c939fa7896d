//! PostgreSQL's on-disk numeric (utils/adt/numeric.c, the same in PostgreSQL 15-18): the header
//! constants and the rules `make_result` follows, shared by the two places that build or check
//! numerics without PostgreSQL: the numeric cast's decoder (src/types.rs `decode_numeric`) and
//! the check of `encrypted_jsonb`'s internal form (`crate::jsonb`).

pub const NBASE: u16 = 10_000;
/// Decimal digits per base-`NBASE` digit.
pub const DEC_DIGITS: i64 = 4;
pub const NUMERIC_SIGN_MASK: u16 = 0xC000;
pub const NUMERIC_POS: u16 = 0x0000;
pub const NUMERIC_NEG: u16 = 0x4000;
pub const NUMERIC_SHORT: u16 = 0x8000;
pub const NUMERIC_SPECIAL: u16 = 0xC000;
pub const NUMERIC_SHORT_SIGN_MASK: u16 = 0x2000;
pub const NUMERIC_SHORT_DSCALE_MASK: u16 = 0x1F80;
pub const NUMERIC_SHORT_DSCALE_SHIFT: u16 = 7;
pub const NUMERIC_SHORT_DSCALE_MAX: u16 = NUMERIC_SHORT_DSCALE_MASK >> NUMERIC_SHORT_DSCALE_SHIFT;
pub const NUMERIC_SHORT_WEIGHT_SIGN_MASK: u16 = 0x0040;
pub const NUMERIC_SHORT_WEIGHT_MASK: u16 = 0x003F;
pub const NUMERIC_DSCALE_MASK: u16 = 0x3FFF;

/// The decimal digits after the point a numeric's stored digits reach (its last non-zero
/// decimal digit's place), for `n` base-10,000 digits from `weight` ending in `last` (not 0).
/// `make_result` never stores more than the display scale shows: a value is canonical only if
/// this is at most its `dscale`.
#[inline]
pub fn fraction_digits(weight: i32, n: usize, last: u16) -> i64 {
    // The last digit's place is NBASE^(weight - n + 1); below the point it spans 4 decimal
    // digits per place, less its own trailing zeros.
    let places = n as i64 - 1 - weight as i64;
    if places <= 0 {
        return 0;
    }
    let trailing = match last {
        d if d % 1000 == 0 => 3,
        d if d % 100 == 0 => 2,
        d if d % 10 == 0 => 1,
        _ => 0,
    };
    places * DEC_DIGITS - trailing
}

/// `NUMERIC_CAN_BE_SHORT`: `make_result` writes the 2-byte short header exactly when this holds.
#[inline]
pub fn short_fits(dscale: u16, weight: i32) -> bool {
    dscale <= NUMERIC_SHORT_DSCALE_MAX && (-64..=63).contains(&weight)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraction_digits_counts_the_last_non_zero_decimal_place() {
        // (value, weight, digits, decimal places it reaches)
        for (value, weight, digits, places) in [
            ("1", 0, &[1u16][..], 0),
            ("10000", 1, &[1], 0),
            ("1.5", 0, &[1, 5000], 1),
            ("1.0001", 0, &[1, 1], 4),
            ("0.00012", -1, &[1, 2000], 5),
            ("5e-400", -100, &[5], 400),
        ] {
            assert_eq!(fraction_digits(weight, digits.len(), *digits.last().unwrap()), places, "{value}");
        }
        assert!(short_fits(63, -64) && short_fits(0, 63));
        assert!(!short_fits(64, 0) && !short_fits(0, 64) && !short_fits(0, -65));
    }
}
