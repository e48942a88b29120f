//! Go duration strings (`time.ParseDuration`), as Knative's components read them from
//! the environment (`PROBE_TIMEOUT=300ms`, `1.5s`, `1m30s`, `2h45m`).
//!
//! The grammar is Go's: an optional sign, then one or more `<number><unit>` pairs, where
//! the number is decimal with an optional fraction (`1`, `1.5`, `.5`, `5.`) and the unit is
//! one of `ns`, `us` (or `µs`, `μs`), `ms`, `s`, `m`, `h`; a lone `0` needs no unit. No
//! white space is allowed. Values are exact in nanoseconds for the integer part; a
//! fraction is converted the way Go does it (and truncated to whole nanoseconds), and the
//! total must fit Go's `int64` nanoseconds (about 292 years). A negative duration is
//! well-formed Go but cannot be a [`Duration`]: it is an error of its own here (`-0s` is
//! zero).

use std::time::Duration;

/// Why a string is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("invalid duration {0:?}")]
    Invalid(String),
    #[error("missing unit in duration {0:?} (use ns, us, ms, s, m or h)")]
    MissingUnit(String),
    #[error("unknown unit {unit:?} in duration {input:?} (use ns, us, ms, s, m or h)")]
    UnknownUnit { unit: String, input: String },
    #[error("duration {0:?} is out of range")]
    OutOfRange(String),
    #[error("duration {0:?} is negative")]
    Negative(String),
}

/// Largest magnitude Go's parser accepts (`1 << 63` nanoseconds, only when negative).
const LIMIT: u64 = 1 << 63;

/// The unit's length in nanoseconds.
fn unit_nanos(unit: &str) -> Option<u64> {
    Some(match unit {
        "ns" => 1,
        "us" | "µs" | "μs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    })
}

/// Leading decimal digits of `s` as an integer; `None` when it exceeds [`LIMIT`].
fn leading_int(s: &str) -> Option<(u64, &str)> {
    let end = s
        .bytes()
        .position(|c| !c.is_ascii_digit())
        .unwrap_or(s.len());
    let mut x: u64 = 0;
    for c in s[..end].bytes() {
        if x > LIMIT / 10 {
            return None;
        }
        x = x * 10 + u64::from(c - b'0');
        if x > LIMIT {
            return None;
        }
    }
    Some((x, &s[end..]))
}

/// Leading digits of a fraction: their value, the power of ten they are scaled by, and
/// the rest. Digits past what 63 bits hold are read and ignored, as Go does.
fn leading_fraction(s: &str) -> (u64, f64, &str) {
    let end = s
        .bytes()
        .position(|c| !c.is_ascii_digit())
        .unwrap_or(s.len());
    let (mut x, mut scale, mut full) = (0u64, 1.0f64, false);
    for c in s[..end].bytes() {
        if full {
            continue;
        }
        if x > (LIMIT - 1) / 10 {
            full = true;
            continue;
        }
        let y = x * 10 + u64::from(c - b'0');
        if y > LIMIT {
            full = true;
            continue;
        }
        x = y;
        scale *= 10.0;
    }
    (x, scale, &s[end..])
}

/// Parses a Go duration string (see the module documentation).
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid(input.to_owned());
    let out_of_range = || DurationError::OutOfRange(input.to_owned());
    let (negative, mut s) = match input.as_bytes().first() {
        Some(b'-') => (true, &input[1..]),
        Some(b'+') => (false, &input[1..]),
        _ => (false, input),
    };
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: u64 = 0;
    while !s.is_empty() {
        if !(s.starts_with('.') || s.as_bytes()[0].is_ascii_digit()) {
            return Err(invalid());
        }
        let before = s.len();
        let (mut v, rest) = leading_int(s).ok_or_else(out_of_range)?;
        let has_int = rest.len() != before;
        s = rest;
        let (mut frac, mut scale, mut has_frac) = (0, 1.0, false);
        if let Some(rest) = s.strip_prefix('.') {
            let (f, sc, rest2) = leading_fraction(rest);
            has_frac = rest2.len() != rest.len();
            (frac, scale, s) = (f, sc, rest2);
        }
        if !has_int && !has_frac {
            return Err(invalid());
        }
        let unit_end = s
            .bytes()
            .position(|c| c == b'.' || c.is_ascii_digit())
            .unwrap_or(s.len());
        if unit_end == 0 {
            return Err(DurationError::MissingUnit(input.to_owned()));
        }
        let (unit, rest) = s.split_at(unit_end);
        s = rest;
        let nanos = unit_nanos(unit).ok_or_else(|| DurationError::UnknownUnit {
            unit: unit.to_owned(),
            input: input.to_owned(),
        })?;
        if v > LIMIT / nanos {
            return Err(out_of_range());
        }
        v *= nanos;
        if frac > 0 {
            // Go: v += int64(float64(f) * (float64(unit) / scale)).
            v += (frac as f64 * (nanos as f64 / scale)) as u64;
            if v > LIMIT {
                return Err(out_of_range());
            }
        }
        total = total
            .checked_add(v)
            .filter(|t| *t <= LIMIT)
            .ok_or_else(out_of_range)?;
    }
    if negative {
        return if total == 0 {
            Ok(Duration::ZERO)
        } else {
            Err(DurationError::Negative(input.to_owned()))
        };
    }
    if total > LIMIT - 1 {
        return Err(out_of_range());
    }
    Ok(Duration::from_nanos(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Duration {
        parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn what_go_accepts() {
        let ms = Duration::from_millis;
        let cases = [
            ("0", Duration::ZERO),
            ("+0", Duration::ZERO),
            ("-0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("-0s", Duration::ZERO),
            ("5s", Duration::from_secs(5)),
            ("+5s", Duration::from_secs(5)),
            ("30s", Duration::from_secs(30)),
            ("1478s", Duration::from_secs(1478)),
            ("300ms", ms(300)),
            ("1.5s", ms(1500)),
            ("1.s", Duration::from_secs(1)),
            (".5s", ms(500)),
            ("1.0s", Duration::from_secs(1)),
            ("1.004s", ms(1004)),
            ("100.00100s", ms(100_001)),
            ("10ns", Duration::from_nanos(10)),
            ("11us", Duration::from_micros(11)),
            ("12µs", Duration::from_micros(12)),
            ("12μs", Duration::from_micros(12)),
            ("13ms", ms(13)),
            ("14s", Duration::from_secs(14)),
            ("15m", Duration::from_secs(900)),
            ("16h", Duration::from_secs(16 * 3600)),
            ("1m30s", Duration::from_secs(90)),
            ("3h30m", Duration::from_secs(3 * 3600 + 1800)),
            ("10.5s4m", Duration::from_secs(4 * 60) + ms(10_500)),
            ("1h2m3s4ms5us6ns", Duration::new(3723, 4_005_006)),
            ("39h9m14.425s", Duration::new(140_954, 425_000_000)),
            ("52763797000ns", Duration::from_nanos(52_763_797_000)),
            ("0.3333333333333333333h", Duration::from_secs(20 * 60)),
            (
                "9007199254740993ns",
                Duration::from_nanos(9_007_199_254_740_993),
            ),
            (
                "9223372036854775807ns",
                Duration::from_nanos(i64::MAX as u64),
            ),
            (
                "9223372036854775.807us",
                Duration::from_nanos(i64::MAX as u64),
            ),
            (
                "9223372036s854ms775us807ns",
                Duration::from_nanos(i64::MAX as u64),
            ),
            ("0.100000000000000000000h", Duration::from_secs(360)),
            (
                "0.830103483285477580700h",
                Duration::from_nanos(2_988_372_539_827),
            ),
        ];
        for (s, want) in cases {
            assert_eq!(ok(s), want, "{s:?}");
        }
    }

    #[test]
    fn what_go_refuses() {
        for s in [
            "",
            "3",
            "-",
            "s",
            ".",
            "-.",
            ".s",
            "+.s",
            "1d",
            "1..2s",
            "1.5",
            "1s ",
            " 1s",
            "1 s",
            "\u{85}\u{85}",
            "\u{fffd}",
            "9223372036854775808ns",
            "9223372036854775.808us",
            "9223372036854ms775us808ns",
            "3000000h",
            "1e3s",
            "0x10s",
            "1m30",
        ] {
            assert!(parse(s).is_err(), "{s:?} parsed as {:?}", parse(s));
        }
        assert_eq!(parse("3"), Err(DurationError::MissingUnit("3".into())));
        assert_eq!(
            parse("1d"),
            Err(DurationError::UnknownUnit {
                unit: "d".into(),
                input: "1d".into()
            })
        );
        assert_eq!(parse("-1s"), Err(DurationError::Negative("-1s".into())));
        assert_eq!(
            parse("3000000h"),
            Err(DurationError::OutOfRange("3000000h".into()))
        );
        assert!(parse("-9223372036854775808ns").is_err());
    }

    #[test]
    fn random_input_never_panics() {
        // A small xorshift: no dependency, the same inputs every run.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let alphabet: Vec<char> = "0123456789.+-nsuµμmh x\u{fffd}".chars().collect();
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 14) as usize;
            let s: String = (0..len)
                .map(|i| alphabet[((x >> (i * 4)) as usize + i) % alphabet.len()])
                .collect();
            if let Ok(d) = parse(&s) {
                assert!(d.as_nanos() <= i64::MAX as u128, "{s:?}");
            }
        }
    }
}
