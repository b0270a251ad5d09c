//! `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP-date.
//!
//! Adapters hand the parsed delay to herald as a hint; herald's retry policy
//! treats it as a minimum and clamps it, so a partner cannot park a delivery
//! for a year with one header.

use std::time::{Duration, SystemTime};

/// The delay a `Retry-After` header asks for, read at `now`.
/// `None` when the header is absent or unreadable (the backoff policy decides then).
pub fn from_headers(headers: &[(String, String)], now: SystemTime) -> Option<Duration> {
    headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("retry-after"))
        .and_then(|(_, value)| parse(value, now))
}

/// Parses one `Retry-After` value. A date in the past means "now" (zero).
pub fn parse(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse::<u64>().ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(parse("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse(" 0 ", now), Some(Duration::ZERO));
        // RFC 9110's own example date, 30 s after `now`.
        assert_eq!(
            parse("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn rejects_garbage() {
        let now = SystemTime::UNIX_EPOCH;
        for bad in ["", "-5", "1.5", "soon", "99999999999999999999999"] {
            assert_eq!(parse(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn finds_the_header_whatever_its_case() {
        let headers = vec![("RETRY-AFTER".to_string(), "7".to_string())];
        assert_eq!(
            from_headers(&headers, SystemTime::UNIX_EPOCH),
            Some(Duration::from_secs(7))
        );
        assert_eq!(from_headers(&[], SystemTime::UNIX_EPOCH), None);
    }
}
