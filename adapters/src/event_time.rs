//! An event's `occurred_at` (RFC 3339, any offset) in the forms platforms
//! want: unix milliseconds (SmartThings, assumed shapes) or RFC 3339 in UTC
//! (Alexa's `timeOfSample`).

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::BuildError;

fn parse(occurred_at: &str) -> Result<OffsetDateTime, BuildError> {
    OffsetDateTime::parse(occurred_at, &Rfc3339)
        .map_err(|e| BuildError(format!("occurred_at {occurred_at:?} is not RFC 3339: {e}")))
}

/// Unix milliseconds.
pub fn unix_ms(occurred_at: &str) -> Result<i64, BuildError> {
    let at = parse(occurred_at)?;
    Ok((at.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// RFC 3339 in UTC (`...Z`).
pub fn utc(occurred_at: &str) -> Result<String, BuildError> {
    parse(occurred_at)?
        .to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .map_err(|e| BuildError(format!("cannot format occurred_at: {e}")))
}

/// RFC 3339 in UTC cut to whole milliseconds: what Alexa's `timeOfSample`
/// takes (Amazon's message schema, `model.StatePropertyBase.TimeOfSample`,
/// allows at most three fractional digits; a producer's microseconds would
/// make every Alexa event a 400).
pub fn utc_millis(occurred_at: &str) -> Result<String, BuildError> {
    let at = parse(occurred_at)?.to_offset(time::UtcOffset::UTC);
    let cut = at
        .replace_nanosecond(at.nanosecond() / 1_000_000 * 1_000_000)
        .map_err(|e| BuildError(format!("cannot cut occurred_at to milliseconds: {e}")))?;
    cut.format(&Rfc3339)
        .map_err(|e| BuildError(format!("cannot format occurred_at: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_offsets() {
        assert_eq!(unix_ms("1970-01-01T09:00:01.5+09:00").unwrap(), 1500);
        assert_eq!(
            utc("2026-11-25T06:00:00+09:00").unwrap(),
            "2026-11-24T21:00:00Z"
        );
        assert!(unix_ms("yesterday").is_err());
        assert_eq!(
            utc_millis("2026-11-25T06:00:00.123456789+09:00").unwrap(),
            "2026-11-24T21:00:00.123Z"
        );
        assert_eq!(
            utc_millis("2026-11-25T06:00:00.000999Z").unwrap(),
            "2026-11-25T06:00:00Z"
        );
    }
}
