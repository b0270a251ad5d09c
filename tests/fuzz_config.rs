//! Property tests at scale of the config parser (`Config::parse`, what
//! `herald check` and `herald serve` run): from the complete example config,
//! values replaced by anything, lines dropped, duplicated or cut, junk
//! inserted, any text at all, and token values with any whitespace. It must
//! not panic; a refusal names a config key and says what is wrong; no
//! secret from the environment ever appears in a message.
//!
//! CI runs a short pass (256 configs per property). The long run:
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test --test fuzz_config
//! ```

use herald::config::Config;
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../fixtures/config/herald.toml");

const SECRETS: &[(&str, &str)] = &[
    (
        "HERALD_LINK_KEY",
        "aGVyYWxkLXRlc3QtbGluay1rZXktMzItYnl0ZXMhISE=",
    ),
    ("HERALD_TOKEN_DOOR", "door-secret-Value-0123456789"),
    ("HERALD_TOKEN_ONCALL", "oncall-secret-Value-0123456789"),
    (
        "ACME_WEBHOOK_SECRET",
        "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
    ),
    ("ST_CLIENT_ID", "st-client-id-Value"),
    ("ST_CLIENT_SECRET", "st-client-secret-Value"),
    ("ALEXA_CLIENT_ID", "alexa-client-id-Value"),
    ("ALEXA_CLIENT_SECRET", "alexa-client-secret-Value"),
];

fn env(name: &str) -> Option<String> {
    SECRETS
        .iter()
        .find(|(var, _)| *var == name)
        .map(|(_, value)| value.to_string())
}

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

/// A TOML value of any kind a careless operator might write.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<String>().prop_map(|s| format!("{s:?}")),
        "\"[0-9]{1,4}(ms|s|m|h|d|x|)\"",
        "\"[0-9]{1,5} ?(MiB|GB|%|KB|)\"",
        "\"(https?|ftp)://[a-z0-9.:\\[\\]]{0,20}/?\"",
        "\\[\"[a-z.*]{0,8}\"\\]",
        "\\{ [a-z_]{1,12} = -?[0-9]{1,6} \\}",
        Just("\"\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
    ]
}

#[derive(Debug, Clone)]
enum Edit {
    Replace(prop::sample::Index, String),
    Drop(prop::sample::Index),
    Duplicate(prop::sample::Index),
    Insert(prop::sample::Index, String),
    Cut(prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        6 => (any::<prop::sample::Index>(), toml_value()).prop_map(|(i, v)| Edit::Replace(i, v)),
        2 => any::<prop::sample::Index>().prop_map(Edit::Drop),
        1 => any::<prop::sample::Index>().prop_map(Edit::Duplicate),
        1 => (any::<prop::sample::Index>(), any::<String>()).prop_map(|(i, s)| Edit::Insert(i, s)),
        1 => any::<prop::sample::Index>().prop_map(Edit::Cut),
    ]
}

/// The example with `edits` applied, line by line.
fn edited(edits: &[Edit]) -> String {
    let mut lines: Vec<String> = EXAMPLE.lines().map(String::from).collect();
    for edit in edits {
        if lines.is_empty() {
            break;
        }
        match edit {
            Edit::Replace(at, value) => {
                let i = at.index(lines.len());
                let line = &mut lines[i];
                if let Some((key, _)) = line.split_once(" = ") {
                    *line = format!("{key} = {value}");
                }
            }
            Edit::Drop(at) => {
                lines.remove(at.index(lines.len()));
            }
            Edit::Duplicate(at) => {
                let i = at.index(lines.len());
                let copy = lines[i].clone();
                lines.insert(i, copy);
            }
            Edit::Insert(at, text) => lines.insert(at.index(lines.len()), text.clone()),
            Edit::Cut(at) => lines.truncate(at.index(lines.len())),
        }
    }
    lines.join("\n")
}

/// What every refusal must be: a key and a reason, no secret.
fn check_refusal(
    text: &str,
    parsed: Result<Config, herald::config::ConfigError>,
) -> Result<(), TestCaseError> {
    if let Err(e) = parsed {
        prop_assert!(!e.key.trim().is_empty(), "no key: {e}\n{text}");
        prop_assert!(!e.reason.trim().is_empty(), "no reason: {e}");
        let shown = e.to_string();
        for (var, secret) in SECRETS {
            prop_assert!(
                !shown.contains(secret),
                "the value of {var} is shown: {shown}"
            );
        }
    }
    Ok(())
}

#[test]
fn the_example_config_parses_with_these_secrets() {
    Config::parse(EXAMPLE, &env).expect("the example is valid");
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn an_edited_config_is_parsed_or_refused_by_key(edits in prop::collection::vec(edit(), 1..6)) {
        let text = edited(&edits);
        check_refusal(&text, Config::parse(&text, &env))?;
    }

    #[test]
    fn any_text_is_parsed_or_refused_by_key(text in any::<String>()) {
        check_refusal(&text, Config::parse(&text, &env))?;
    }

    /// Token values as they come out of files and shells: whatever the
    /// padding, a padded token is refused naming its variable, a clean one
    /// is taken as it is, and two tokens with one secret are refused.
    #[test]
    fn token_values_are_taken_exactly_or_refused_by_variable(
        before in "[ \t\r\n]{0,2}",
        core in "[A-Za-z0-9._~+/=-]{16,64}",
        after in "[ \t\r\n]{0,3}",
        same in any::<bool>(),
    ) {
        let door = format!("{before}{core}{after}");
        let oncall = match same { true => door.clone(), false => format!("{core}-oncall") };
        let lookup = |name: &str| match name {
            "HERALD_TOKEN_DOOR" => Some(door.clone()),
            "HERALD_TOKEN_ONCALL" => Some(oncall.clone()),
            other => env(other),
        };
        let parsed = Config::parse(EXAMPLE, &lookup);
        let padded = !before.is_empty() || !after.is_empty();
        match parsed {
            Ok(config) => {
                prop_assert!(!padded && !same, "padded {padded}, same {same}: accepted");
                prop_assert_eq!(&config.tokens[0].secret, &door);
            }
            Err(e) => {
                let shown = e.to_string();
                prop_assert!(!shown.contains(&core), "the token is shown: {shown}");
                if padded {
                    prop_assert_eq!(&e.key, "tokens[0].token_env");
                    prop_assert!(shown.contains("$HERALD_TOKEN_DOOR") && shown.contains("whitespace"), "{shown}");
                } else {
                    prop_assert!(same, "refused: {shown}");
                    prop_assert_eq!(&e.key, "tokens[1].token_env");
                    prop_assert!(shown.contains("door-service") && shown.contains("on-call"), "{shown}");
                }
            }
        }
    }
}

/// Found by `an_edited_config_is_parsed_or_refused_by_key`: a `cache_mb`
/// whose bytes overflow a u64 panicked (debug) or wrapped to a tiny cache
/// (release); it is refused by key.
#[test]
fn a_cache_mb_too_large_for_bytes_is_refused_by_key() {
    let text = EXAMPLE.replace("cache_mb = 32 ", "cache_mb = 18446744073709551615 ");
    assert_ne!(text, EXAMPLE);
    let err = Config::parse(&text, &env).expect_err("refused");
    assert_eq!(err.key, "server.cache_mb", "{err}");
    assert!(err.reason.contains("too large"), "{err}");
}

/// The shipped example's Alexa partner sends each link to its own region's
/// event gateway, as "Send Events to the Alexa Event Gateway" lists them:
/// one partner-wide URL would send North American and Far East users to
/// the EU gateway, which answers SKILL_NEVER_ENABLED_EXCEPTION.
#[test]
fn the_example_alexa_partner_reaches_each_regions_own_gateway() {
    let config = Config::parse(EXAMPLE, &env).expect("the example is valid");
    let partner = config
        .partners
        .iter()
        .find(|p| p.adapter_kind == "alexa")
        .expect("the example has an Alexa partner");
    let adapter = adapters::build_adapter("alexa", &partner.adapter).expect("it builds");
    let data = serde_json::value::RawValue::from_string(
        r#"{"capability":"lock","attribute":"lock","value":"locked"}"#.into(),
    )
    .expect("json");
    for (region, host) in [
        ("na", "https://api.amazonalexa.com/v3/events"),
        ("eu", "https://api.eu.amazonalexa.com/v3/events"),
        ("fe", "https://api.fe.amazonalexa.com/v3/events"),
    ] {
        let ctx = adapters::DeliveryContext {
            delivery_id: "d-1",
            attempt: 1,
            send: 0,
            now_unix: 1_700_000_000,
            event: adapters::EventView {
                id: "e-1",
                event_type: "lock.changed",
                device_id: "lock-1",
                priority: "normal",
                occurred_at: "2026-11-25T06:00:00Z",
                data: &data,
            },
            link: Some(adapters::LinkView {
                external_id: "lock-42",
                account: None,
                region: Some(region),
                callback_url: None,
                token_url: None,
                access_token: Some("token"),
                options: None,
            }),
        };
        let request = adapter.build(&ctx).expect("builds");
        assert_eq!(request.url, host, "{region}");
    }
}
