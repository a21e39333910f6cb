//! Durations written as "10s", "2m", "500ms", "1h", "1.5s" or a bare number of seconds:
//! parsing, formatting, and serde `with = "humane"` for cluster keys.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Serializer;

use crate::diag::hinted;

/// Parses a humane duration; the error says what was wrong.
pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    if t.starts_with('-') {
        return Err("durations cannot be negative".to_string());
    }
    if number.is_empty() {
        return Err(format!("`{text}` does not start with a number"));
    }
    let value: f64 = number.parse().map_err(|_| format!("`{number}` is not a number"))?;
    let seconds_per_unit = match unit {
        "" | "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
        "ms" | "msec" | "millis" | "milliseconds" => 0.001,
        "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
        "h" | "hr" | "hour" | "hours" => 3600.0,
        other => return Err(format!("unknown unit `{other}`; expected ms, s, m or h")),
    };
    Duration::try_from_secs_f64(value * seconds_per_unit).map_err(|_| format!("`{text}` is out of range"))
}

/// "10s", "500ms", "2m", "1h"; sub-millisecond precision as fractional seconds.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if d.subsec_nanos() % 1_000_000 != 0 {
        format!("{}s", d.as_secs_f64())
    } else if ms % 1000 != 0 {
        format!("{ms}ms")
    } else {
        let s = d.as_secs();
        if s != 0 && s % 3600 == 0 {
            format!("{}h", s / 3600)
        } else if s != 0 && s % 60 == 0 {
            format!("{}m", s / 60)
        } else {
            format!("{s}s")
        }
    }
}

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor)
}

/// serde `with = "humane::option"` for an optional key (`default` makes a missing key None).
pub mod option {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::deserialize(d).map(Some)
    }
}

struct DurationVisitor;

const HINT: &str = "write a duration such as `10s`, `2m`, `500ms`, or a number of seconds";

impl<'de> Visitor<'de> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a duration such as `10s`, `2m`, `500ms` or a number of seconds")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        Ok(Duration::from_secs(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        u64::try_from(v).map(Duration::from_secs).map_err(|_| E::custom(hinted(format!("negative duration {v}"), HINT)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        Duration::try_from_secs_f64(v).map_err(|_| E::custom(hinted(format!("invalid duration {v}"), HINT)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse(v).map_err(|why| E::custom(hinted(format!("invalid duration `{v}`: {why}"), HINT)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::humane;

    #[test]
    fn humane_durations() {
        let cases = [
            ("10s", 10_000),
            ("2m", 120_000),
            ("500ms", 500),
            ("1.5s", 1_500),
            ("1h", 3_600_000),
            ("10", 10_000),
            (" 3 s ", 3_000),
            ("0", 0),
        ];
        for (text, ms) in cases {
            assert_eq!(humane::parse(text), Ok(Duration::from_millis(ms)), "{text}");
        }
        for bad in ["", "s", "-1s", "10 parsecs", "1.2.3s", "1e400s"] {
            assert!(humane::parse(bad).is_err(), "{bad}");
        }
        assert!(humane::parse("99999999999999999999999999h").is_err());
        for (ms, text) in [(10_000, "10s"), (500, "500ms"), (120_000, "2m"), (7_200_000, "2h")] {
            let d = Duration::from_millis(ms);
            assert_eq!(humane::format(d), text);
            assert_eq!(humane::parse(text), Ok(d));
        }
    }
}
