//! `google.protobuf.Timestamp` as quotad's messages carry it: the protobuf message itself, and
//! its proto3 JSON form. The mapping says a Timestamp is an RFC 3339 string whose "generated
//! output will always be Z-normalized and uses 0, 3, 6 or 9 fractional digits", while offsets
//! other than `Z` are accepted on input. `pbjson-types`, where the other well-known types come
//! from, writes `+00:00`, which clients that check the mapping strictly refuse; this type
//! writes `Z`. The build maps `.google.protobuf.Timestamp` here (`build.rs`).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::Error as _;

/// Seconds and nanoseconds since the Unix epoch, as `google.protobuf.Timestamp` has them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl prost::Name for Timestamp {
    const NAME: &'static str = "Timestamp";
    const PACKAGE: &'static str = "google.protobuf";
}

impl Timestamp {
    /// The instant, if it is one chrono can hold (nanos in range, the year within ±262,143).
    fn instant(&self) -> Option<DateTime<Utc>> {
        let nanos = u32::try_from(self.nanos).ok()?;
        DateTime::from_timestamp(self.seconds, nanos)
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Some(instant) = self.instant() else {
            return Err(serde::ser::Error::custom(format!(
                "{}s {}ns is not an instant",
                self.seconds, self.nanos
            )));
        };
        serializer.serialize_str(&instant.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }
}

impl std::str::FromStr for Timestamp {
    type Err = String;

    /// RFC 3339 with any offset, as the JSON mapping reads it, and with the `T` between date and
    /// time that protobuf's own parsers require (chrono would take a space too).
    fn from_str(text: &str) -> Result<Timestamp, String> {
        let bad = |why: &dyn std::fmt::Display| {
            format!("{text:?} is not an RFC 3339 instant such as 2027-01-31T00:00:00Z: {why}")
        };
        if !matches!(text.as_bytes().get(10), Some(b'T' | b't')) {
            return Err(bad(&"no T between the date and the time"));
        }
        let instant = DateTime::parse_from_rfc3339(text).map_err(|e| bad(&e))?;
        Ok(Timestamp {
            seconds: instant.timestamp(),
            nanos: instant.timestamp_subsec_nanos() as i32,
        })
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json(t: Timestamp) -> String {
        serde_json::to_string(&t).unwrap()
    }

    #[test]
    fn written_in_utc_with_z_and_0_3_6_or_9_fractional_digits() {
        let at = |seconds, nanos| json(Timestamp { seconds, nanos });
        assert_eq!(at(1_798_761_600, 0), r#""2027-01-01T00:00:00Z""#);
        assert_eq!(
            at(1_798_761_600, 500_000_000),
            r#""2027-01-01T00:00:00.500Z""#
        );
        assert_eq!(at(1_798_761_600, 1_000), r#""2027-01-01T00:00:00.000001Z""#);
        assert_eq!(at(1_798_761_600, 7), r#""2027-01-01T00:00:00.000000007Z""#);
        assert_eq!(at(-1, 0), r#""1969-12-31T23:59:59Z""#);
    }

    #[test]
    fn read_with_any_offset() {
        let read = |text: &str| serde_json::from_str::<Timestamp>(text).unwrap();
        let z = read(r#""2027-01-01T00:00:00Z""#);
        assert_eq!(read(r#""2027-01-01T01:00:00+01:00""#), z);
        assert_eq!(read(r#""2026-12-31T19:00:00-05:00""#), z);
        assert_eq!(read(r#""2027-01-01T00:00:00.25Z""#).nanos, 250_000_000);
    }

    #[test]
    fn what_is_no_instant_is_an_error_on_both_sides() {
        for text in [
            r#""2027-02-30T00:00:00Z""#,
            r#""2027-01-01 00:00:00Z""#,
            r#""2027-01-01T00:00:00""#,
            r#""tomorrow""#,
            "17",
            r#""2027-01-01""#,
        ] {
            assert!(serde_json::from_str::<Timestamp>(text).is_err(), "{text}");
        }
        for nanos in [-1, 1_000_000_000] {
            let t = Timestamp { seconds: 0, nanos };
            assert!(serde_json::to_string(&t).is_err(), "{t:?}");
        }
    }

    proptest! {
        #[test]
        fn every_timestamp_in_range_round_trips(
            // 0001-01-01T00:00:00Z ..= 9999-12-31T23:59:59Z, the range of the type.
            seconds in -62_135_596_800i64..=253_402_300_799,
            nanos in 0i32..1_000_000_000,
        ) {
            let t = Timestamp { seconds, nanos };
            let text = json(t);
            prop_assert!(text.ends_with("Z\""), "{}", text);
            prop_assert_eq!(serde_json::from_str::<Timestamp>(&text).unwrap(), t);
        }
    }
}
