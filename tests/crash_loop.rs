//! The long crash loop: herald SIGKILLed again and again under sustained
//! mixed load, against a partner that flaps, loses nothing it accepted.
//!
//! The real `herald` binary runs on one data dir. Four clients post single
//! events and batches of up to eight, critical and normal, each event with
//! its own idempotency key; a post whose answer is lost (herald killed, or
//! busy) is sent again as it was, as a real client does, so every event is
//! accepted in the end and herald must not store one twice. One event in
//! 37 has a type the partner refuses for good (400): those become dead
//! letters. The partner flaps: it answers 200 for a while, then 503, or
//! stops listening so that connections are refused; herald retries and its
//! breaker opens and probes. herald is killed at random moments (every
//! other kill while the partner fails, so that what it accepted then is
//! only on its disk) and started again on the same data dir shortly after.
//!
//! Then the partner's records are the truth: every accepted event reached
//! it with a 2xx or is a dead letter with a reason (0 lost), and herald
//! counts nothing queued; no event was stored twice under one idempotency
//! key; a dead letter is an event the partner refused and never took. A
//! delivery answered 2xx twice is a duplicate only if the partner read the
//! first request before herald was started again after a kill and the
//! second after, and herald's store holds one success for it, sent after
//! that kill: the first was in flight when herald died (sent, perhaps
//! answered, not yet recorded). It prints accepted / delivered /
//! duplicates / lost / dead letters, the duplicates each kill explains and
//! how long before its kill their unrecorded 2xx came.
//!
//! CI runs the short form (6 kills, about 12 s). The long form:
//!
//! ```sh
//! HERALD_CRASH_LOOP_KILLS=25 cargo nextest run --locked --test crash_loop --no-capture
//! ```
//!
//! `HERALD_CRASH_LOOP_SEED=<n>` replays a run's kill and flap timings (the
//! seed is printed); the load and the machine's speed still vary.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{MockPartner, Recorded, Reply, Rng};
use herald::bench::process::{HeraldProcess, TOKEN};
use herald::clock::Clock;
use serde_json::{json, Value};

/// Kills in the CI form.
const SHORT_KILLS: usize = 6;
const CLIENTS: usize = 4;
/// The type the partner refuses with 400: its events end as dead letters.
const POISON: &str = "sensor.malformed";
/// An unrecorded 2xx before a kill was answered at most this long before
/// it (recording an outcome takes a group commit: milliseconds).
const IN_FLIGHT_MS: i64 = 3000;

/// The partner's config: a backlog builds while it fails, retries come fast,
/// the breaker opens and probes within the run, nothing dies of age, and the
/// poison type's 400 is a dead letter at once (a receiver that says so).
const PARTNER: &str = r#"rate = { per_second = 2000, burst = 100 }
retry = { initial_ms = 50, max_interval_ms = 500, max_age = "1h" }
breaker = { failures = 5, cool_down = "100ms", max_cool_down = "1s" }
permanent_statuses = [400]"#;

fn event(n: u64) -> Value {
    json!({
        "device_id": format!("sensor-{}", n % 64),
        "type": if n % 37 == 0 { POISON } else { "sensor.temperature" },
        "priority": if n % 4 == 0 { "critical" } else { "normal" },
        "idempotency_key": format!("crash-loop-{n}"),
        "data": {"n": n},
        "partners": ["sink"],
    })
}

/// What one client's posts came to.
#[derive(Default)]
struct Posted {
    /// Each event's number, and the id herald's 202 gave it.
    accepted: HashMap<u64, String>,
    posts: u64,
    /// Posts sent again after an answer that never came (or a 503).
    resent: u64,
    /// Events a resent post found already stored (`"duplicate": true`).
    already_stored: u64,
}

/// Sends one body until herald answers 202; the ids it answered with.
async fn post_until_accepted(
    http: &reqwest::Client,
    url: &str,
    body: &str,
    posted: &mut Posted,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        posted.posts += 1;
        let answer = http
            .post(format!("{url}/v1/events"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if let Ok(answer) = answer {
            let status = answer.status().as_u16();
            // A body cut off by a kill: the events may be stored, or not;
            // the same keys again tell.
            if let Ok(text) = answer.bytes().await {
                match status {
                    202 => {
                        let answered: Value =
                            serde_json::from_slice(&text).expect("a 202 carries JSON");
                        return match answered {
                            Value::Array(items) => items,
                            one => vec![one],
                        };
                    }
                    429 | 503 => {}
                    _ => panic!(
                        "herald answered {status} to a valid post: {}",
                        String::from_utf8_lossy(&text)
                    ),
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "herald did not accept a post within 60 s"
        );
        posted.resent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Posts singles and batches of up to eight until `stop`, finishing the
/// post under way; paced so that the load is sustained, not a flood.
async fn client(n: u64, url: String, stop: Arc<AtomicBool>, seq: Arc<AtomicU64>) -> Posted {
    let http = reqwest::Client::new();
    let mut posted = Posted::default();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (n + 1));
    while !stop.load(Ordering::Relaxed) {
        let size = if rng.below(3) == 0 {
            1
        } else {
            2 + rng.below(7)
        };
        let numbers: Vec<u64> = (0..size)
            .map(|_| seq.fetch_add(1, Ordering::Relaxed))
            .collect();
        let events: Vec<Value> = numbers.iter().map(|&n| event(n)).collect();
        let body = if size == 1 {
            events[0].to_string()
        } else {
            Value::Array(events).to_string()
        };
        let answered = post_until_accepted(&http, &url, &body, &mut posted).await;
        assert_eq!(answered.len(), numbers.len(), "one answer per event");
        for (n, item) in numbers.into_iter().zip(answered) {
            let id = item["id"].as_str().expect("202 names the event id");
            if item["duplicate"] == true {
                posted.already_stored += 1;
            }
            posted.accepted.insert(n, id.to_string());
        }
        tokio::time::sleep(rng.millis(1, 5)).await;
    }
    posted
}

/// How the partner answers for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Up,
    Failing,
    Refusing,
}

/// The flapping partner's state, shared with the kill loop.
#[derive(Default)]
struct Flapping {
    stop: AtomicBool,
    /// Whether it answers 200 now.
    up: AtomicBool,
}

/// Flaps the partner until stopped: up for a while, then 503 or refused
/// connections; up for good at the end. Counts each mode's spells.
async fn flap(partner: Arc<MockPartner>, seed: u64, state: Arc<Flapping>) -> BTreeMap<Mode, u32> {
    let mut rng = Rng(seed);
    let mut spells = BTreeMap::new();
    while !state.stop.load(Ordering::Relaxed) {
        let mode = match rng.below(4) {
            0 => Mode::Failing,
            1 => Mode::Refusing,
            _ => Mode::Up,
        };
        *spells.entry(mode).or_insert(0) += 1;
        match mode {
            Mode::Up => {
                partner.answer_by_default(Reply::Status(200));
                partner.accept_connections().await;
            }
            Mode::Failing => {
                partner.answer_by_default(Reply::Status(503));
                partner.accept_connections().await;
            }
            Mode::Refusing => partner.refuse_connections().await,
        }
        state.up.store(mode == Mode::Up, Ordering::Relaxed);
        let spell = match mode {
            Mode::Up => rng.millis(200, 1000),
            _ => rng.millis(200, 800),
        };
        tokio::time::sleep(spell).await;
    }
    partner.answer_by_default(Reply::Status(200));
    partner.accept_connections().await;
    spells
}

/// One SIGKILL (unix ms): just before it, and when herald was started
/// again, a little after it was gone, so that the partner's log tells the
/// old process's requests from the new one's.
struct Kill {
    before_ms: u64,
    respawn_ms: u64,
}

/// GETs an admin path: (status, JSON answer).
async fn get_any(http: &reqwest::Client, herald: &HeraldProcess, path: &str) -> (u16, Value) {
    let answer = http
        .get(format!("{}{path}", herald.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("herald answers");
    let status = answer.status().as_u16();
    let body = answer.bytes().await.expect("body");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// GETs an admin path that must answer 200.
async fn get(http: &reqwest::Client, herald: &HeraldProcess, path: &str) -> Value {
    let (status, body) = get_any(http, herald, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// Every dead letter of the partner, through the paged API.
async fn dead_letters(http: &reqwest::Client, herald: &HeraldProcess) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = String::new();
    loop {
        let page = get(
            http,
            herald,
            &format!("/v1/dead-letters?partner=sink&limit=1000{after}"),
        )
        .await;
        all.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => return all,
        }
    }
}

fn is_success(r: &Recorded) -> bool {
    r.answered.is_some_and(|s| (200..300).contains(&s))
}

/// What the partner's log says, by event and by delivery.
#[derive(Default)]
struct Seen<'a> {
    /// Event ids answered 2xx.
    delivered: HashSet<&'a str>,
    /// Each delivery's requests answered 2xx, in arrival order.
    successes: HashMap<&'a str, Vec<&'a Recorded>>,
    /// The event ids each event number reached the partner under.
    ids_by_number: HashMap<u64, HashSet<&'a str>>,
}

fn seen(requests: &[Recorded]) -> Seen<'_> {
    let mut seen = Seen::default();
    for r in requests {
        let (Some(id), Some(n)) = (r.body["id"].as_str(), r.body["data"]["n"].as_u64()) else {
            panic!("the partner got a request without an event: {:?}", r.body);
        };
        seen.ids_by_number.entry(n).or_default().insert(id);
        if is_success(r) {
            seen.delivered.insert(id);
            seen.successes
                .entry(r.webhook_id.as_str())
                .or_default()
                .push(r);
        }
    }
    seen
}

/// A delivery answered 2xx again, and the kill that explains it.
struct Duplicate<'a> {
    delivery: &'a str,
    event: &'a str,
    /// Index into the kills.
    kill: usize,
    /// How long before the kill the partner read the earlier request
    /// (below 0: read after the sender was killed).
    before_kill_ms: i64,
}

/// Each repeated 2xx, explained by a kill if one can: the first after
/// which herald was started again only once the partner had read the
/// earlier request (so a process now dead sent it), with the later one
/// read after that restart. The rest: (delivery, first ms, again ms).
fn duplicates<'a>(
    seen: &Seen<'a>,
    kills: &[Kill],
) -> (Vec<Duplicate<'a>>, Vec<(&'a str, u64, u64)>) {
    let mut explained = Vec::new();
    let mut unexplained = Vec::new();
    for (delivery, answers) in &seen.successes {
        for pair in answers.windows(2) {
            let (first, again) = (pair[0].at_ms, pair[1].at_ms);
            let kill = kills
                .iter()
                .position(|k| first < k.respawn_ms)
                .filter(|&k| kills[k].respawn_ms <= again);
            match kill {
                Some(k) => explained.push(Duplicate {
                    delivery,
                    event: pair[0].body["id"].as_str().unwrap_or_default(),
                    kill: k,
                    before_kill_ms: kills[k].before_ms as i64 - first as i64,
                }),
                None => unexplained.push((*delivery, first, again)),
            }
        }
    }
    (explained, unexplained)
}

/// Dead letters that break the rules: no reason, an event the partner
/// takes, a delivery the partner never refused or once took, an event
/// dead twice; and the events each letter is for.
fn bad_dead_letters<'a>(
    letters: &'a [Value],
    poison: &HashSet<&str>,
    requests: &[Recorded],
) -> (Vec<String>, HashSet<&'a str>) {
    let mut bad = Vec::new();
    let mut dead_events = HashSet::new();
    for letter in letters {
        let event = letter["event_id"].as_str().unwrap_or_default();
        let delivery = letter["delivery_id"].as_str().unwrap_or_default();
        let answers: Vec<Option<u16>> = requests
            .iter()
            .filter(|r| r.webhook_id == delivery)
            .map(|r| r.answered)
            .collect();
        let reason = letter["reason"].as_str().unwrap_or_default();
        let wrong = if reason.trim().is_empty() {
            Some("no reason")
        } else if !poison.contains(event) {
            Some("an event the partner takes")
        } else if !answers.contains(&Some(400)) {
            Some("the partner never refused it")
        } else if answers
            .iter()
            .any(|a| a.is_some_and(|s| (200..300).contains(&s)))
        {
            Some("the partner took it")
        } else if !dead_events.insert(event) {
            Some("its event is dead twice")
        } else {
            None
        };
        if let Some(wrong) = wrong {
            bad.push(format!("{wrong}: {letter}, answers {answers:?}"));
        }
    }
    (bad, dead_events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_accepted_is_lost_across_many_kills_with_a_flapping_partner() {
    let kills_wanted = std::env::var("HERALD_CRASH_LOOP_KILLS")
        .ok()
        .and_then(|k| k.parse::<usize>().ok())
        .unwrap_or(SHORT_KILLS);
    let seed = common::seed_from_env("HERALD_CRASH_LOOP_SEED");
    let mut rng = Rng(seed);
    let clock = Clock::system();
    let partner = Arc::new(MockPartner::start(clock.clone()).await);
    partner.answer_with(|r, _| (r.body["type"] == POISON).then_some(Reply::Status(400)));

    let mut herald = HeraldProcess::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_herald")),
        &partner.url,
        PARTNER,
    )
    .await
    .expect("herald starts");
    let started = Instant::now();

    let flapping = Arc::new(Flapping::default());
    let flapper = tokio::spawn(flap(
        Arc::clone(&partner),
        seed.rotate_left(17) | 1,
        Arc::clone(&flapping),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..CLIENTS as u64)
        .map(|n| {
            tokio::spawn(client(
                n,
                herald.url.clone(),
                Arc::clone(&stop),
                Arc::clone(&seq),
            ))
        })
        .collect();

    let mut kills = Vec::new();
    for k in 0..kills_wanted {
        tokio::time::sleep(rng.millis(300, 1500)).await;
        // Every other kill falls while the partner fails: what herald
        // accepted then is only on its disk.
        if k % 2 == 1 {
            let deadline = Instant::now() + Duration::from_secs(3);
            while flapping.up.load(Ordering::Relaxed) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let partner_up = flapping.up.load(Ordering::Relaxed);
        let before_ms = clock.now_ms();
        herald.kill().expect("herald was running until the kill");
        // A supervisor's restart delay; requests the dead process had
        // written are read by the partner meanwhile.
        tokio::time::sleep(rng.millis(50, 150)).await;
        kills.push(Kill {
            before_ms,
            respawn_ms: clock.now_ms(),
        });
        herald.restart_stopped().expect("herald restarts");
        let ready = herald
            .wait_ready(Duration::from_secs(30))
            .await
            .expect("herald comes back on the same data dir");
        println!(
            "kill {} (partner {}): {} events made so far, ready again in {ready:?}",
            k + 1,
            if partner_up { "up" } else { "failing" },
            seq.load(Ordering::Relaxed)
        );
    }
    // Traffic after the last restart too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut posted = Posted::default();
    for c in clients {
        let one = c.await.expect("client task");
        posted.accepted.extend(one.accepted);
        posted.posts += one.posts;
        posted.resent += one.resent;
        posted.already_stored += one.already_stored;
    }
    flapping.stop.store(true, Ordering::Relaxed);
    let spells = flapper.await.expect("flapping task");
    let loaded = started.elapsed();
    assert_eq!(
        posted.accepted.len() as u64,
        seq.load(Ordering::Relaxed),
        "every event made was accepted in the end"
    );
    let poison: HashSet<&str> = posted
        .accepted
        .iter()
        .filter(|(n, _)| event(**n)["type"] == POISON)
        .map(|(_, id)| id.as_str())
        .collect();
    let expected: HashSet<&str> = posted
        .accepted
        .values()
        .map(String::as_str)
        .filter(|id| !poison.contains(id))
        .collect();

    // Everything accepted reaches the partner or becomes a dead letter,
    // and herald agrees: nothing left queued.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (requests, letters, queued) = loop {
        let requests = partner.requests();
        let delivered: HashSet<&str> = requests
            .iter()
            .filter(|r| is_success(r))
            .filter_map(|r| r.body["id"].as_str())
            .collect();
        let letters = dead_letters(&http, &herald).await;
        let partners = get(&http, &herald, "/v1/partners").await;
        let queued = partners["partners"][0]["queued"].as_u64();
        let done = expected.iter().all(|id| delivered.contains(id))
            && letters.len() >= poison.len()
            && queued == Some(0);
        if done || Instant::now() > deadline {
            break (requests, letters, queued);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let drained = started.elapsed() - loaded;

    let seen = seen(&requests);
    let (bad_letters, dead_events) = bad_dead_letters(&letters, &poison, &requests);
    let mut lost: Vec<&str> = expected
        .iter()
        .filter(|id| !seen.delivered.contains(*id))
        .chain(poison.iter().filter(|id| !dead_events.contains(*id)))
        .copied()
        .collect();
    lost.sort_unstable();
    let (duplicated, unexplained) = duplicates(&seen, &kills);
    let mut per_kill = vec![0u32; kills.len()];
    for d in &duplicated {
        per_kill[d.kill] += 1;
    }
    let mut before_kill: Vec<i64> = duplicated.iter().map(|d| d.before_kill_ms).collect();
    before_kill.sort_unstable();
    let answered = |code: u16| requests.iter().filter(|r| r.answered == Some(code)).count();
    println!(
        "{} kills in {loaded:.1?} of load, drained in {drained:.1?}; partner spells {spells:?}",
        kills.len()
    );
    println!(
        "posts {} (resent {}, events found already stored {}); partner requests {} (200: {}, 503: {}, 400: {})",
        posted.posts,
        posted.resent,
        posted.already_stored,
        requests.len(),
        answered(200),
        answered(503),
        answered(400)
    );
    println!(
        "duplicates per kill: {per_kill:?}; their unrecorded 2xx came before the kill by {} / {} / {} ms (least / median / most)",
        before_kill.first().unwrap_or(&0),
        before_kill.get(before_kill.len() / 2).unwrap_or(&0),
        before_kill.last().unwrap_or(&0)
    );
    println!(
        "accepted {} / delivered {} / duplicates {} / lost {} / dead letters {}",
        posted.accepted.len(),
        seen.delivered.len(),
        duplicated.len(),
        lost.len(),
        letters.len()
    );

    // Lost: what herald's store says of the first few.
    let mut shown = Vec::new();
    for id in lost.iter().take(3) {
        shown.push(get_any(&http, &herald, &format!("/v1/events/{id}")).await);
    }
    assert!(
        lost.is_empty(),
        "seed {seed}: {} of {} accepted events neither delivered nor dead letters, e.g. {:?}; herald shows {shown:?}",
        lost.len(),
        posted.accepted.len(),
        &lost[..lost.len().min(5)]
    );
    let stored_twice: Vec<_> = seen
        .ids_by_number
        .iter()
        .filter(|(n, ids)| ids.len() > 1 || !ids.contains(posted.accepted[*n].as_str()))
        .collect();
    assert!(
        stored_twice.is_empty(),
        "seed {seed}: events stored under another id than herald answered, or twice under one idempotency key: {stored_twice:?}"
    );
    assert!(
        bad_letters.is_empty(),
        "seed {seed}: dead letters that should not be: {bad_letters:#?}"
    );
    assert!(
        unexplained.is_empty(),
        "seed {seed}: deliveries answered 2xx twice with no kill between (delivery, first ms, again ms): {unexplained:?}"
    );
    // herald's own record of each duplicate: one success, sent after its
    // kill; the earlier one, in flight then, it never recorded.
    for d in &duplicated {
        let view = get(&http, &herald, &format!("/v1/events/{}", d.event)).await;
        let delivery = view["deliveries"]
            .as_array()
            .and_then(|all| all.iter().find(|v| v["id"] == d.delivery));
        let recorded: Vec<u64> = delivery
            .and_then(|v| v["history"].as_array())
            .map(|h| {
                h.iter()
                    .filter(|a| {
                        a["status"]
                            .as_u64()
                            .is_some_and(|s| (200..300).contains(&s))
                    })
                    .filter_map(|a| a["at_ms"].as_u64())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            delivery.is_some_and(|v| v["state"] == "delivered")
                && recorded.len() == 1
                && recorded[0] >= kills[d.kill].before_ms,
            "seed {seed}: delivery {} was answered 2xx before kill {} and again after, but the store shows {view}",
            d.delivery,
            d.kill + 1
        );
        assert!(
            d.before_kill_ms <= IN_FLIGHT_MS,
            "seed {seed}: herald never recorded the 2xx of delivery {} answered {} ms before kill {}",
            d.delivery,
            d.before_kill_ms,
            d.kill + 1
        );
    }
    assert_eq!(
        queued,
        Some(0),
        "seed {seed}: the partner has every event, but herald still counts some queued"
    );
    assert!(
        posted.accepted.len() > 200 && !letters.is_empty(),
        "too little load ({} accepted, {} dead letters) for the test to mean anything",
        posted.accepted.len(),
        letters.len()
    );
    herald.stop().expect("SIGTERM ends herald with exit 0");
}
