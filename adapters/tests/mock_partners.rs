//! Each adapter against its platform's mock, over real loopback HTTP:
//! build the request, send it, classify the answer, refresh when told.

mod common;

use std::time::{Duration, SystemTime};

use adapters::google::service_account::ServiceAccount;
use adapters::mock::{MockHandle, MockPartner, RetryAfter, Scenario};
use adapters::{
    build_adapter, Adapter, Answer, OutboundRequest, RefreshVerdict, TokenScope, Verdict,
};
use common::*;

/// What came back, owned.
enum Sent {
    Http(u16, Vec<(String, String)>, Vec<u8>),
    Timeout,
    Network(String),
}

impl Sent {
    fn answer(&self) -> Answer<'_> {
        match self {
            Sent::Http(status, headers, body) => Answer::Http {
                status: *status,
                headers,
                body,
            },
            Sent::Timeout => Answer::Timeout,
            Sent::Network(e) => Answer::Network(e),
        }
    }
}

struct Harness {
    platform: &'static str,
    adapter: Box<dyn Adapter>,
    client: reqwest::Client,
    link: Link,
    refresh_token: String,
    mock: MockHandle,
}

impl Harness {
    async fn start(platform: &'static str, scenario: Scenario) -> Harness {
        Harness::start_with_timeout(platform, scenario, Duration::from_secs(5)).await
    }

    async fn start_with_timeout(
        platform: &'static str,
        mut scenario: Scenario,
        timeout: Duration,
    ) -> Harness {
        let lock_link = link(platform, "lock-42", None);
        scenario.access_token = lock_link.access_token.clone();
        if platform == "google" && scenario.public_key_der.is_none() {
            let key = ServiceAccount::from_json(GOOGLE_KEY).unwrap();
            scenario.public_key_der = Some(key.public_key_der());
        }
        let (addr, mock) = MockPartner::start(platform, scenario).await.unwrap();
        let base = format!("http://{addr}");
        Harness {
            platform,
            adapter: build_adapter(platform, &settings(platform, Some(&base))).unwrap(),
            client: {
                // In the workspace reqwest is built with `rustls-no-provider`
                // (herald's choice): a client needs a process-wide provider.
                let _ = rustls::crypto::ring::default_provider().install_default();
                reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(timeout)
                    .build()
                    .unwrap()
            },
            link: link(platform, "lock-42", Some(&base)),
            refresh_token: "rt-0".into(),
            mock,
        }
    }

    async fn send(&self, request: OutboundRequest) -> Sent {
        let mut builder = self.client.post(&request.url).body(request.body);
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        match builder.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let headers = response
                    .headers()
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
                    .collect();
                let body = response.bytes().await.unwrap_or_default().to_vec();
                Sent::Http(status, headers, body)
            }
            Err(e) if e.is_timeout() => Sent::Timeout,
            Err(e) => Sent::Network(e.to_string()),
        }
    }

    async fn deliver(&self, sample: &Sample, delivery_id: &str, attempt: u32) -> Verdict {
        let ctx = context(delivery_id, attempt, sample, &self.link);
        let request = self.adapter.build(&ctx).unwrap();
        let sent = self.send(request).await;
        self.adapter
            .classify_attempt(attempt, &sent.answer(), SystemTime::now())
    }

    /// What herald's single-flight refresh would do, for this adapter.
    async fn refresh(&mut self) -> RefreshVerdict {
        let verdict = match self.adapter.token_scope() {
            TokenScope::Link => {
                let request = self
                    .adapter
                    .refresh_request(&self.link.view(), &self.refresh_token, NOW_UNIX)
                    .unwrap()
                    .expect("per-link adapters refresh");
                let sent = self.send(request).await;
                self.adapter.read_refresh(&sent.answer(), SystemTime::now())
            }
            TokenScope::Partner => {
                let request = self
                    .adapter
                    .partner_token_request(NOW_UNIX)
                    .unwrap()
                    .expect("partner-scoped adapters mint");
                let sent = self.send(request).await;
                self.adapter
                    .read_partner_token(&sent.answer(), SystemTime::now())
            }
        };
        if let RefreshVerdict::Renewed(creds) = &verdict {
            self.link.access_token = creds.access_token.clone();
            if let Some(rotated) = &creds.refresh_token {
                self.refresh_token = rotated.clone();
            }
        }
        verdict
    }
}

#[tokio::test]
async fn delivered_and_duplicates_detected() {
    for platform in PLATFORMS {
        let h = Harness::start(platform, Scenario::default()).await;
        let (lock, temperature) = (Sample::lock_alert(), Sample::temperature());
        assert_eq!(
            h.deliver(&lock, DELIVERY_ID, 1).await,
            Verdict::Delivered,
            "{platform}"
        );
        assert_eq!(
            h.deliver(&temperature, "d-temp", 1).await,
            Verdict::Delivered,
            "{platform}"
        );
        // The same delivery again (a retry after a lost answer).
        assert_eq!(
            h.deliver(&temperature, "d-temp", 2).await,
            Verdict::Delivered,
            "{platform}"
        );
        assert_eq!(h.mock.accepted().len(), 3, "{platform}");
        assert_eq!(
            h.mock.duplicates(),
            1,
            "{platform}: the retry is seen as a duplicate"
        );
        let first = &h.mock.requests()[0];
        assert!(!first.token_request && first.status < 300, "{platform}");
        assert!(!first.request.body.is_empty(), "{platform}");
    }
}

#[tokio::test]
async fn expired_token_refreshes_once_then_delivers() {
    for platform in PLATFORMS {
        let scenario = Scenario {
            expire_after: Some(0),
            ..Scenario::default()
        };
        let mut h = Harness::start(platform, scenario).await;
        let lock = Sample::lock_alert();
        let verdict = h.deliver(&lock, DELIVERY_ID, 1).await;
        assert!(
            matches!(verdict, Verdict::Refresh { .. }),
            "{platform}: {verdict:?}"
        );

        let RefreshVerdict::Renewed(creds) = h.refresh().await else {
            panic!("{platform}: the refresh was not accepted");
        };
        assert_eq!(creds.access_token, h.mock.access_token(), "{platform}");
        assert!(creds.expires_at_unix.is_some(), "{platform}");
        assert_eq!(h.mock.refreshes(), 1, "{platform}");
        assert_eq!(
            h.deliver(&lock, DELIVERY_ID, 2).await,
            Verdict::Delivered,
            "{platform}"
        );
        // The debug form of fresh credentials never shows them.
        assert!(
            !format!("{creds:?}").contains(&creds.access_token),
            "{platform}"
        );

        if h.adapter.token_scope() == TokenScope::Link {
            // The refresh token rotated: herald must persist it, the old one is dead.
            assert_eq!(
                creds.refresh_token,
                Some(h.mock.refresh_token()),
                "{platform}"
            );
            h.refresh_token = "rt-0".into();
            let stale = h.refresh().await;
            assert!(
                matches!(stale, RefreshVerdict::Park { .. }),
                "{platform}: {stale:?}"
            );
        }
    }
}

#[tokio::test]
async fn tokens_expire_mid_stream_and_the_new_one_works() {
    for platform in PLATFORMS {
        let scenario = Scenario {
            expire_after: Some(2),
            rotate_refresh: false,
            ..Scenario::default()
        };
        let mut h = Harness::start(platform, scenario).await;
        let t = Sample::temperature();
        assert_eq!(
            h.deliver(&t, "d-1", 1).await,
            Verdict::Delivered,
            "{platform}"
        );
        assert_eq!(
            h.deliver(&t, "d-2", 1).await,
            Verdict::Delivered,
            "{platform}"
        );
        assert!(
            matches!(h.deliver(&t, "d-3", 1).await, Verdict::Refresh { .. }),
            "{platform}"
        );
        let RefreshVerdict::Renewed(creds) = h.refresh().await else {
            panic!("{platform}");
        };
        // Without rotation the old refresh token stays good.
        assert_eq!(creds.refresh_token, None, "{platform}");
        assert_eq!(
            h.deliver(&t, "d-3", 2).await,
            Verdict::Delivered,
            "{platform}"
        );
    }
}

#[tokio::test]
async fn throttled_answers_carry_retry_after() {
    for platform in PLATFORMS {
        let scenario = Scenario {
            throttle: 1,
            retry_after: RetryAfter::Seconds(7),
            ..Scenario::default()
        };
        let h = Harness::start(platform, scenario).await;
        let lock = Sample::lock_alert();
        match h.deliver(&lock, DELIVERY_ID, 1).await {
            Verdict::Retry { after, .. } => {
                assert_eq!(after, Some(Duration::from_secs(7)), "{platform}")
            }
            other => panic!("{platform}: {other:?}"),
        }
        assert_eq!(
            h.deliver(&lock, DELIVERY_ID, 2).await,
            Verdict::Delivered,
            "{platform}"
        );
    }
}

#[tokio::test]
async fn retry_after_as_an_http_date() {
    let scenario = Scenario {
        throttle: 1,
        retry_after: RetryAfter::Date(30),
        ..Scenario::default()
    };
    let h = Harness::start("google", scenario).await;
    match h.deliver(&Sample::temperature(), "d-1", 1).await {
        Verdict::Retry {
            after: Some(after), ..
        } => assert!(
            after >= Duration::from_secs(28) && after <= Duration::from_secs(30),
            "{after:?}"
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn server_error_bursts_are_retried() {
    for platform in PLATFORMS {
        let scenario = Scenario {
            server_errors: 2,
            ..Scenario::default()
        };
        let h = Harness::start(platform, scenario).await;
        let t = Sample::temperature();
        for attempt in 1..=2 {
            let verdict = h.deliver(&t, "d-1", attempt).await;
            assert!(
                matches!(verdict, Verdict::Retry { .. }),
                "{platform}: {verdict:?}"
            );
        }
        assert_eq!(
            h.deliver(&t, "d-1", 3).await,
            Verdict::Delivered,
            "{platform}"
        );
    }
}

#[tokio::test]
async fn terminal_codes_park_the_link() {
    for platform in PLATFORMS {
        let scenario = Scenario {
            terminal: true,
            ..Scenario::default()
        };
        let h = Harness::start(platform, scenario).await;
        // Home Graph's 404 parks only once it outlasts a SYNC's delay.
        let attempt = if *platform == "google" {
            adapters::google::NOT_FOUND_ATTEMPTS
        } else {
            1
        };
        let verdict = h.deliver(&Sample::temperature(), "d-1", attempt).await;
        assert!(
            matches!(verdict, Verdict::Park { .. }),
            "{platform}: {verdict:?}"
        );
    }
}

#[tokio::test]
async fn a_revoked_grant_parks_the_link_on_refresh() {
    for platform in PLATFORMS {
        let mut h = Harness::start(platform, Scenario::named("revoked").unwrap()).await;
        let verdict = h.deliver(&Sample::lock_alert(), DELIVERY_ID, 1).await;
        assert!(
            matches!(verdict, Verdict::Refresh { .. }),
            "{platform}: {verdict:?}"
        );
        match h.refresh().await {
            RefreshVerdict::Park { reason } => {
                if h.platform == "kakao" {
                    assert!(reason.contains("KOE322"), "{reason}");
                }
                // No secret leaks into the reason herald stores and shows.
                assert!(
                    !reason.contains("rt-0") && !reason.contains("secret"),
                    "{platform}: {reason}"
                );
            }
            other => panic!("{platform}: {other:?}"),
        }
        assert_eq!(h.mock.refreshes(), 0, "{platform}");
    }
}

#[tokio::test]
async fn google_rejects_an_assertion_signed_by_another_key() {
    let other = ServiceAccount::from_json(GOOGLE_KEY)
        .unwrap()
        .public_key_der();
    let mut wrong = other.clone();
    let last = wrong.len() - 20;
    wrong[last] ^= 0xff;
    let scenario = Scenario {
        public_key_der: Some(wrong),
        expire_after: Some(0),
        ..Scenario::default()
    };
    let mut h = Harness::start("google", scenario).await;
    assert!(matches!(h.refresh().await, RefreshVerdict::Park { .. }));
}

#[tokio::test]
async fn google_404_is_retried_then_parks() {
    // Report State on a device Home Graph does not know yet: the mock's
    // terminal code is 403, so 404 is driven through the adapter directly.
    let h = Harness::start("google", Scenario::default()).await;
    let body = br#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND"}}"#;
    let answer = Answer::Http {
        status: 404,
        headers: &[],
        body,
    };
    let now = SystemTime::now();
    assert!(matches!(
        h.adapter.classify_attempt(1, &answer, now),
        Verdict::Retry { .. }
    ));
    assert!(matches!(
        h.adapter.classify_attempt(3, &answer, now),
        Verdict::Park { .. }
    ));
}

#[tokio::test]
async fn slow_answers_time_out_and_are_retried() {
    let scenario = Scenario {
        latency: Duration::from_millis(400),
        ..Scenario::default()
    };
    let h = Harness::start_with_timeout("smartthings", scenario, Duration::from_millis(100)).await;
    let verdict = h.deliver(&Sample::lock_alert(), DELIVERY_ID, 1).await;
    assert!(matches!(verdict, Verdict::Retry { .. }), "{verdict:?}");
}

#[tokio::test]
async fn per_token_rate_limits_throttle() {
    let scenario = Scenario {
        rate_per_second: Some(2),
        ..Scenario::default()
    };
    let h = Harness::start("alexa", scenario).await;
    let t = Sample::temperature();
    assert_eq!(h.deliver(&t, "d-1", 1).await, Verdict::Delivered);
    assert_eq!(h.deliver(&t, "d-2", 1).await, Verdict::Delivered);
    let verdict = h.deliver(&t, "d-3", 1).await;
    assert!(
        matches!(verdict, Verdict::Retry { after: Some(_), .. }),
        "{verdict:?}"
    );
}

#[tokio::test]
async fn smartthings_takes_a_batch_in_one_callback() {
    let h = Harness::start("smartthings", Scenario::default()).await;
    let (lock, t) = (Sample::lock_alert(), Sample::temperature());
    let batch = [
        context("d-1", 1, &lock, &h.link),
        context("d-2", 1, &t, &h.link),
    ];
    let sent = h.send(h.adapter.build_batch(&batch).unwrap()).await;
    assert_eq!(
        h.adapter.classify(&sent.answer(), SystemTime::now()),
        Verdict::Delivered
    );
    let received = h.mock.accepted();
    assert_eq!(received.len(), 1);
    let body: serde_json::Value = serde_json::from_slice(&received[0].request.body).unwrap();
    assert_eq!(
        body["deviceState"][0]["states"].as_array().unwrap().len(),
        2
    );
}

#[tokio::test]
async fn the_mock_answers_malformed_requests_as_the_platform_would() {
    for platform in PLATFORMS {
        let h = Harness::start(platform, Scenario::default()).await;
        let t = Sample::temperature();
        let ctx = context(DELIVERY_ID, 1, &t, &h.link);
        let mut request = h.adapter.build(&ctx).unwrap();
        // Keep the auth (SmartThings carries it in the body) but break the shape.
        request.body = match platform {
            &"smartthings" => format!(
                r#"{{"headers":{{"schema":"st-schema","version":"1.0","interactionType":"discoveryCallback","requestId":"x"}},"authentication":{{"tokenType":"Bearer","token":"{}"}}}}"#,
                h.link.access_token
            )
            .into_bytes(),
            _ => b"{}".to_vec(),
        };
        let sent = h.send(request).await;
        let verdict = h.adapter.classify(&sent.answer(), SystemTime::now());
        assert!(
            matches!(verdict, Verdict::Permanent { .. }),
            "{platform}: {verdict:?}"
        );
    }
}

#[tokio::test]
async fn named_scenarios_and_unknown_platforms() {
    for name in adapters::mock::scenario::NAMES {
        assert!(Scenario::named(name).is_some(), "{name}");
    }
    assert!(Scenario::named("chaos-monkey").is_none());
    for platform in PLATFORMS {
        assert!(
            !adapters::mock::endpoints(platform, "http://h").is_empty(),
            "{platform}"
        );
    }
    let err = MockPartner::start("carrier-pigeon", Scenario::default())
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("smartthings"), "{err}");
}

/// The webhook mock: a request signed with the Standard Webhooks library is
/// taken, a forged or stale one refused, a repeated `webhook-id` seen as a
/// duplicate; with `intermittent` one delivery in N gets 503 and the next
/// one 429, for good.
#[tokio::test]
async fn the_webhook_mock_checks_signatures_and_fails_part_of_the_time() {
    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    let signer = standardwebhooks::Webhook::new(SECRET).unwrap();
    // reqwest as the workspace builds it needs a process-wide provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let send = |addr: std::net::SocketAddr, id: &str, timestamp: i64, forged: bool| {
        let body = format!(r#"{{"type":"door.forced_open","id":"{id}"}}"#);
        let signature = match forged {
            true => "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=".to_string(),
            false => signer
                .sign(id, timestamp, body.as_bytes())
                .expect("a UTF-8 payload signs"),
        };
        let request = client
            .post(format!("http://{addr}/hook"))
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let signed = |intermittent| Scenario {
        signing_secret: Some(SECRET.into()),
        intermittent,
        ..Scenario::default()
    };

    let (addr, mock) = MockPartner::start("webhook", signed(None)).await.unwrap();
    assert_eq!(send(addr, "msg_1", now, false).await, 204);
    assert_eq!(
        send(addr, "msg_2", now, true).await,
        400,
        "a forged signature"
    );
    assert_eq!(
        send(addr, "msg_3", now - 3600, false).await,
        400,
        "an hour-old timestamp"
    );
    assert_eq!(send(addr, "msg_1", now, false).await, 204);
    assert_eq!(mock.accepted().len(), 2);
    assert_eq!(mock.duplicates(), 1, "msg_1 came twice");
    mock.stop().await;

    let (addr, mock) = MockPartner::start("webhook", signed(Some(4)))
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for n in 1..=8 {
        statuses.push(send(addr, &format!("msg_{n}"), now, false).await);
    }
    assert_eq!(statuses, [429, 204, 204, 503, 429, 204, 204, 503]);
    mock.stop().await;

    let refused = MockPartner::start("webhook", Scenario::default()).await;
    assert!(refused
        .err()
        .unwrap()
        .to_string()
        .contains("signing_secret"));
}
