//! Property tests at scale of everything that reads a partner's answer:
//! `Retry-After` parsing and every adapter's classifier (`classify`,
//! `classify_attempt`, `read_refresh`, `read_partner_token`). Whatever
//! status, headers and body a partner (or a broken proxy) sends, they must
//! not panic and must say precisely what happened: a verdict other than
//! "delivered" carries a short, non-empty reason; only a 2xx is ever
//! "delivered"; a Retry-After is honoured exactly when it is readable.
//!
//! CI runs a short pass (256 cases per property). The long run:
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test -p herald-adapters --test fuzz
//! ```

mod common;

use std::time::{Duration, SystemTime};

use adapters::credentials::RefreshVerdict;
use adapters::{build_adapter, retry_after, Adapter, Answer, PartnerSettings, Verdict, REGISTRY};
use proptest::prelude::*;

/// Cases per property: `PROPTEST_CASES` when set, else a CI-sized pass.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const NOW_UNIX: u64 = 1_764_000_000;

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_UNIX)
}

/// Longest reason a verdict may carry: the body snippet plus a sentence.
const MAX_REASON: usize = adapters::ANSWER_SNIPPET_BYTES * 4 + 512;

fn adapters_under_test() -> Vec<(&'static str, Box<dyn Adapter>)> {
    for platform in common::PLATFORMS {
        assert!(
            REGISTRY.iter().any(|(kind, _)| kind == platform),
            "{platform} is fuzzed"
        );
    }
    REGISTRY
        .iter()
        .map(|(kind, _)| {
            let settings = match *kind {
                "webhook" => PartnerSettings {
                    name: "hook".into(),
                    url: "https://hooks.example/herald".into(),
                    secret: Some("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".into()),
                    ..PartnerSettings::default()
                },
                platform => common::settings(platform, None),
            };
            let adapter = build_adapter(kind, &settings)
                .unwrap_or_else(|e| panic!("the {kind} adapter builds: {e}"));
            (*kind, adapter)
        })
        .collect()
}

/// A Retry-After value as partners send them: seconds, dates, and junk.
fn retry_after_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|s| s.to_string()),
        (0u64..100_000).prop_map(|s| format!(" {s} ")),
        (0u64..10_000_000).prop_map(|s| httpdate::fmt_http_date(
            SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_UNIX - 5_000_000 + s)
        )),
        "[0-9]{19,40}",
        "-?[0-9]{1,5}(\\.[0-9]{1,3})?",
        "[A-Za-z]{3}, [0-9]{1,2} [A-Za-z]{3} [0-9]{1,5} [0-9:]{1,9} [A-Z]{1,4}",
        any::<String>(),
    ]
}

fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(
        prop_oneof![
            retry_after_value().prop_map(|v| ("Retry-After".to_string(), v)),
            (any::<String>(), any::<String>()),
            Just(("content-type".to_string(), "application/json".to_string())),
        ],
        0..4,
    )
}

/// Bodies: arbitrary bytes, and JSON shaped like the platforms' error
/// documents with arbitrary codes and messages in them.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let scalar = prop_oneof![
        any::<i64>().prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
        prop::sample::select(vec![
            "INVALID_ACCESS_TOKEN_EXCEPTION",
            "SKILL_DISABLED_EXCEPTION",
            "invalid_grant",
            "invalid_client",
            "TOKEN_EXPIRED",
            "UNAUTHORIZED",
            "NOT_FOUND",
            "-401",
            "1",
            "",
        ])
        .prop_map(serde_json::Value::from),
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
    ];
    let leaf = scalar.clone();
    let document = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "error",
                    "code",
                    "message",
                    "payload",
                    "status",
                    "error_description",
                    "access_token",
                    "refresh_token",
                    "expires_in",
                    "token_type",
                    "errors",
                    "result",
                    "resultCode",
                    "msg",
                    "type",
                ])
                .prop_map(String::from),
                inner,
                0..5,
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..600),
        document.prop_map(|v| v.to_string().into_bytes()),
        Just(Vec::new()),
    ]
}

fn status() -> impl Strategy<Value = u16> {
    prop_oneof![
        0u16..1000,
        prop::sample::select(vec![
            200, 201, 202, 204, 207, 301, 400, 401, 403, 404, 408, 409, 410, 413, 422, 429, 500,
            502, 503, 504,
        ]),
        any::<u16>(),
    ]
}

fn check_verdict(kind: &str, status: Option<u16>, verdict: &Verdict) -> Result<(), TestCaseError> {
    let reason = match verdict {
        Verdict::Delivered => {
            prop_assert!(
                status.is_some_and(|s| (200..300).contains(&s)),
                "{kind}: delivered on {status:?}"
            );
            return Ok(());
        }
        Verdict::Retry { reason, .. }
        | Verdict::Misconfigured { reason, .. }
        | Verdict::Permanent { reason }
        | Verdict::Refresh { reason }
        | Verdict::Park { reason } => reason,
    };
    prop_assert!(
        !reason.trim().is_empty(),
        "{kind}: an empty reason for {verdict:?}"
    );
    prop_assert!(
        reason.len() <= MAX_REASON,
        "{kind}: a {} byte reason",
        reason.len()
    );
    Ok(())
}

fn check_refresh(kind: &str, verdict: &RefreshVerdict) -> Result<(), TestCaseError> {
    match verdict {
        RefreshVerdict::Renewed(_) => Ok(()),
        RefreshVerdict::Retry { reason, .. }
        | RefreshVerdict::Misconfigured { reason, .. }
        | RefreshVerdict::Park { reason } => {
            prop_assert!(!reason.trim().is_empty(), "{kind}: an empty reason");
            prop_assert!(
                reason.len() <= MAX_REASON,
                "{kind}: a {} byte reason",
                reason.len()
            );
            Ok(())
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_classifier_reads_any_answer_without_panicking(
        status in status(),
        headers in headers(),
        body in body(),
        attempt in 1u32..6,
        network in any::<String>(),
    ) {
        for (kind, adapter) in adapters_under_test() {
            let answer = Answer::Http { status, headers: &headers, body: &body };
            let verdict = adapter.classify_attempt(attempt, &answer, now());
            check_verdict(kind, Some(status), &verdict)?;
            check_verdict(kind, Some(status), &adapter.classify(&answer, now()))?;
            check_refresh(kind, &adapter.read_refresh(&answer, now()))?;
            check_refresh(kind, &adapter.read_partner_token(&answer, now()))?;
            for other in [Answer::Timeout, Answer::Network(&network)] {
                let verdict = adapter.classify_attempt(attempt, &other, now());
                prop_assert!(matches!(verdict, Verdict::Retry { .. }), "{kind}: {verdict:?}");
                check_verdict(kind, None, &verdict)?;
                check_refresh(kind, &adapter.read_refresh(&other, now()))?;
            }
        }
    }

    /// A readable Retry-After on a throttled answer is the delay the
    /// adapter hands on, for every adapter that reads one.
    #[test]
    fn a_readable_retry_after_is_honoured_exactly(
        secs in 0u64..10_000_000,
        as_date in any::<bool>(),
        status in prop::sample::select(vec![429u16, 503]),
    ) {
        let value = match as_date {
            true => httpdate::fmt_http_date(now() + Duration::from_secs(secs)),
            false => secs.to_string(),
        };
        let headers = vec![("retry-after".to_string(), value.clone())];
        for (kind, adapter) in adapters_under_test() {
            let answer = Answer::Http { status, headers: &headers, body: b"" };
            match adapter.classify_attempt(1, &answer, now()) {
                Verdict::Retry { after, .. } => prop_assert_eq!(
                    after,
                    Some(Duration::from_secs(secs)),
                    "{}: Retry-After {:?}", kind, value
                ),
                other => prop_assert!(false, "{kind}: HTTP {status} gave {other:?}"),
            }
        }
    }

    #[test]
    fn retry_after_parses_any_text_without_panicking(value in retry_after_value()) {
        let parsed = retry_after::parse(&value, now());
        let trimmed = value.trim();
        if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
            // Seconds: exact when they fit, refused when they do not.
            prop_assert_eq!(parsed, trimmed.parse::<u64>().ok().map(Duration::from_secs));
        } else if let Ok(at) = httpdate::parse_http_date(trimmed) {
            prop_assert_eq!(parsed, Some(at.duration_since(now()).unwrap_or(Duration::ZERO)));
        } else {
            prop_assert_eq!(parsed, None, "{:?} is neither seconds nor a date", value);
        }
    }
}
