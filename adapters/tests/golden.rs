//! Golden requests: for each platform, the exact request herald sends for a
//! sample lock alert and a sample temperature reading, and the token
//! requests, compared byte for byte with `fixtures/<platform>/*.request.json`.
//!
//! After an intended change, regenerate them and review the diff:
//!     UPDATE_GOLDEN=1 cargo test -p herald-adapters --test golden

mod common;

use std::path::PathBuf;

use adapters::{build_adapter, golden, OutboundRequest};
use common::*;

fn check(platform: &str, name: &str, request: &OutboundRequest) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(platform)
        .join(format!("{name}.request.json"));
    let actual = golden::render(request);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run UPDATE_GOLDEN=1 cargo test -p herald-adapters --test golden)",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{} differs from what the adapter builds (UPDATE_GOLDEN=1 regenerates it):\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

#[test]
fn every_platform_matches_its_golden_requests() {
    for platform in PLATFORMS {
        let adapter = build_adapter(platform, &settings(platform, None)).unwrap();
        let lock = Sample::lock_alert();
        let lock_link = link(platform, "lock-42", None);
        let request = adapter
            .build(&context(DELIVERY_ID, 1, &lock, &lock_link))
            .unwrap();
        check(platform, "lock-alert", &request);

        let temperature = Sample::temperature();
        let thermo_link = link(platform, "thermo-7", None);
        let request = adapter
            .build(&context(DELIVERY_ID, 1, &temperature, &thermo_link))
            .unwrap();
        check(platform, "temperature", &request);

        if let Some(request) = adapter
            .refresh_request(&lock_link.view(), "rt-0", NOW_UNIX)
            .unwrap()
        {
            check(platform, "refresh", &request);
        }
        if let Some(request) = adapter.partner_token_request(NOW_UNIX).unwrap() {
            check(platform, "token", &request);
        }
    }
}

#[test]
fn smartthings_batches_one_links_deliveries_into_one_callback() {
    let adapter = build_adapter("smartthings", &settings("smartthings", None)).unwrap();
    let (lock, temperature) = (Sample::lock_alert(), Sample::temperature());
    let link = link("smartthings", "lock-42", None);
    let ids = [
        "01936b2a-5c00-7000-8000-00000000d001",
        "01936b2a-5c00-7000-8000-00000000d002",
    ];
    let batch = [
        context(ids[0], 1, &lock, &link),
        context(ids[1], 3, &temperature, &link),
    ];
    assert_eq!(adapter.max_batch(), 50);
    check(
        "smartthings",
        "batch",
        &adapter.build_batch(&batch).unwrap(),
    );

    let many: Vec<_> = (0..51).map(|_| context(ids[0], 1, &lock, &link)).collect();
    let err = adapter.build_batch(&many).unwrap_err();
    assert!(err.0.contains("at most 50"), "{err}");
}

#[test]
fn other_platforms_do_not_batch() {
    for platform in PLATFORMS.iter().filter(|p| **p != "smartthings") {
        let adapter = build_adapter(platform, &settings(platform, None)).unwrap();
        let (lock, link) = (Sample::lock_alert(), link(platform, "lock-42", None));
        let two = [
            context(DELIVERY_ID, 1, &lock, &link),
            context(DELIVERY_ID, 1, &lock, &link),
        ];
        assert_eq!(adapter.max_batch(), 1, "{platform}");
        assert!(adapter.build_batch(&two).is_err(), "{platform}");
        assert_eq!(
            adapter.build_batch(&two[..1]).unwrap(),
            adapter.build(&two[0]).unwrap()
        );
    }
}

#[test]
fn an_unmapped_capability_is_a_build_error_naming_it() {
    let data = serde_json::value::RawValue::from_string(
        r#"{"capability":"battery","attribute":"battery","value":80}"#.into(),
    )
    .unwrap();
    let sample = Sample {
        data,
        ..Sample::temperature()
    };
    for platform in ["alexa", "google", "thinq", "kakao", "clova", "genie"] {
        let adapter = build_adapter(platform, &settings(platform, None)).unwrap();
        let link = link(platform, "thermo-7", None);
        let err = adapter
            .build(&context(DELIVERY_ID, 1, &sample, &link))
            .unwrap_err();
        assert!(
            err.0.contains("battery.battery") && err.0.contains(platform),
            "{platform}: {err}"
        );
    }
}

#[test]
fn golden_files_read_back_to_the_exact_body() {
    // The indented body in a golden file is the adapter's bytes, re-indented.
    let adapter = build_adapter("alexa", &settings("alexa", None)).unwrap();
    let (lock, link) = (Sample::lock_alert(), link("alexa", "lock-42", None));
    let request = adapter
        .build(&context(DELIVERY_ID, 1, &lock, &link))
        .unwrap();
    let rendered: serde_json::Value = serde_json::from_str(&golden::render(&request)).unwrap();
    let body = adapters::json::compact(&adapters::json::indent(
        std::str::from_utf8(&request.body).unwrap(),
    ));
    assert_eq!(body.as_bytes(), &request.body[..]);
    assert_eq!(
        rendered["body"],
        serde_json::from_slice::<serde_json::Value>(&request.body).unwrap()
    );
}

#[test]
fn platforms_refuse_what_they_cannot_carry() {
    let alert_only = Sample {
        data: serde_json::value::RawValue::from_string(r#"{"kind":"tamper"}"#.into()).unwrap(),
        ..Sample::lock_alert()
    };
    for platform in PLATFORMS {
        let adapter = build_adapter(platform, &settings(platform, None)).unwrap();
        let (lock, lock_link) = (Sample::lock_alert(), link(platform, "lock-42", None));
        let no_link = adapters::DeliveryContext {
            link: None,
            ..context(DELIVERY_ID, 1, &lock, &lock_link)
        };
        let err = adapter.build(&no_link).unwrap_err();
        assert!(err.0.contains("link"), "{platform}: {err}");

        let mut tokenless = link(platform, "lock-42", None);
        tokenless.access_token.clear();
        let err = adapter
            .build(&context(DELIVERY_ID, 1, &lock, &tokenless))
            .unwrap_err();
        assert!(err.0.contains("token"), "{platform}: {err}");

        // A bare alert goes where the platform has an alert channel.
        let link = link(platform, "lock-42", None);
        let built = adapter.build(&context(DELIVERY_ID, 1, &alert_only, &link));
        match *platform {
            "kakao" | "thinq" => assert!(built.is_ok(), "{platform}: {built:?}"),
            _ => assert!(
                built.unwrap_err().0.contains("alert"),
                "{platform} has no alert channel"
            ),
        }
    }
}
