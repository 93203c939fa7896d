//! Options every provider kind accepts, next to its own:
//!
//! | option | meaning |
//! |---|---|
//! | `key_cache_ttl` | how long a backend may keep this provider's tenants' keys before asking the KMS again (bring-your-own-key: the bound on how long a customer's revocation takes). Capped by `envelope.key_cache_ttl`. |
//! | `max_key_age` | how long this provider's keys may keep serving through an outage (degraded mode). Capped by `envelope.max_key_age`. |
//! | `dedicated` | `true`: this provider's root key belongs to one tenant, and shredding that tenant destroys (or schedules the deletion of) the root key in the KMS. A dedicated provider serves at most one tenant. |
//!
//! Durations are a number of seconds or a string: `"30s"`, `"5min"`, `"2h"`, `"1d"`. A
//! provider's own value can only shorten the server-wide one (the provider is registered in a
//! table; the server-wide settings are the DBA's, in postgresql.conf).

use std::time::Duration;

/// The options shared by every provider kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommonOptions {
    pub key_cache_ttl: Option<Duration>,
    pub max_key_age: Option<Duration>,
    pub dedicated: bool,
}

/// The names of the shared options.
pub const COMMON_OPTIONS: &[&str] = &["key_cache_ttl", "max_key_age", "dedicated"];

/// At most one year: anything longer is a typo.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Parses `"30s"`, `"5 min"`, `"2h"`, `"1d"` or `"45"` (seconds). At least one second, at
/// most one year; anything else is `None`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() || digits.len() > 12 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let unit_s = match unit.trim() {
        "" | "s" | "sec" | "secs" | "second" | "seconds" => 1,
        "min" | "mins" | "minute" | "minutes" => 60,
        "h" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86400,
        _ => return None,
    };
    let d = Duration::from_secs(n.checked_mul(unit_s)?);
    (d >= Duration::from_secs(1) && d <= MAX_DURATION).then_some(d)
}

#[cfg(any(feature = "vault", feature = "pkcs11"))]
impl CommonOptions {
    /// Takes the shared options out of a provider's options object and returns them with the
    /// rest (the kind-specific options, for that kind's parser).
    pub fn split(v: &serde_json::Value) -> Result<(CommonOptions, serde_json::Value), super::ProviderError> {
        use serde_json::Value;
        let bad = |m: String| super::ProviderError::Misconfigured(m);
        let obj = v.as_object().ok_or_else(|| bad("options must be a JSON object".into()))?;
        let duration = |k: &str| -> Result<Option<Duration>, super::ProviderError> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => n
                    .as_u64()
                    .map(Duration::from_secs)
                    .filter(|d| *d >= Duration::from_secs(1) && *d <= MAX_DURATION)
                    .map(Some)
                    .ok_or_else(|| bad(format!("option \"{k}\" must be 1 second to 1 year"))),
                Some(Value::String(s)) => parse_duration(s)
                    .map(Some)
                    .ok_or_else(|| bad(format!("option \"{k}\" must be a duration of 1 second to 1 year, such as \"30s\", \"5min\", \"2h\""))),
                Some(_) => Err(bad(format!("option \"{k}\" must be a number of seconds or a string such as \"30s\""))),
            }
        };
        let common = CommonOptions {
            key_cache_ttl: duration("key_cache_ttl")?,
            max_key_age: duration("max_key_age")?,
            dedicated: match obj.get("dedicated") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(bad("option \"dedicated\" must be true or false".into())),
            },
        };
        let rest: serde_json::Map<String, Value> =
            obj.iter().filter(|(k, _)| !COMMON_OPTIONS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
        Ok((common, Value::Object(rest)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_bounds() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("45"), Some(Duration::from_secs(45)));
        assert_eq!(parse_duration("5 min"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Some(Duration::from_secs(86400)));
        for bad in ["", "0s", "s", "-5s", "1.5h", "5 fortnights", "400d", "99999999999999999999s", "1h30min"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[cfg(any(feature = "vault", feature = "pkcs11"))]
    #[test]
    fn shared_options_are_split_from_the_kind_options() {
        use serde_json::json;
        let (c, rest) = CommonOptions::split(&json!({"key": "k", "key_cache_ttl": "5s", "max_key_age": 60, "dedicated": true})).unwrap();
        assert_eq!(c.key_cache_ttl, Some(Duration::from_secs(5)));
        assert_eq!(c.max_key_age, Some(Duration::from_secs(60)));
        assert!(c.dedicated);
        assert_eq!(rest, json!({"key": "k"}));
        let (c, _) = CommonOptions::split(&json!({})).unwrap();
        assert_eq!(c, CommonOptions::default());
        for bad in [json!({"key_cache_ttl": 0}), json!({"key_cache_ttl": "soon"}), json!({"dedicated": "yes"}), json!({"max_key_age": [1]}), json!([])] {
            assert!(CommonOptions::split(&bad).is_err(), "{bad}");
        }
    }
}
