//! The demo's summary: read from herald's public API (`/v1/partners`,
//! `/v1/dead-letters`, `/v1/events/{id}`, `/metrics`) and from the mock
//! partners' own records, and checked against each other: every event sent
//! is delivered at every live partner and a dead letter at the down one.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

use super::stage::{partners, Stage};
use super::traffic::{Sent, Totals};

/// How many problems the summary lists before it only counts them.
const PROBLEMS_SHOWN: usize = 10;

/// GETs `path` on herald with the operator token and reads its JSON.
pub async fn get_json(stage: &Stage, path: &str) -> Result<Value, String> {
    let text = get_text(stage, path).await?;
    serde_json::from_str(&text).map_err(|e| format!("GET {path}: not JSON ({e})"))
}

async fn get_text(stage: &Stage, path: &str) -> Result<String, String> {
    let answer = stage
        .http
        .get(stage.url(path))
        .bearer_auth(&stage.secrets.operator_token)
        .send()
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let status = answer.status();
    let text = answer
        .text()
        .await
        .map_err(|e| format!("GET {path}: the answer was cut: {e}"))?;
    if !status.is_success() {
        return Err(format!("GET {path} answered {status}: {text}"));
    }
    Ok(text)
}

/// One partner's line of the table.
struct Row {
    name: &'static str,
    role: String,
    delivered: u64,
    /// What the mock says it took (unique deliveries); `None`: no mock.
    at_mock: Option<u64>,
    duplicates_at_mock: u64,
    retried: u64,
    dead: u64,
}

/// Dead letters that died for one reason (attempt counts aside).
struct ReasonGroup {
    partner: String,
    reason: String,
    count: usize,
    min_attempts: u64,
    max_attempts: u64,
}

/// Everything the summary shows, and what did not add up.
pub struct Findings {
    events: usize,
    critical: usize,
    took: Duration,
    rows: Vec<Row>,
    reasons: Vec<ReasonGroup>,
    dead_letters: usize,
    /// partner -> enqueue → delivered of its critical deliveries, in ms.
    critical_ms: BTreeMap<&'static str, Vec<u64>>,
    refreshes_at_mock: usize,
    refreshes_in_metrics: Option<u64>,
    /// A dead letter and its event, for the commands to look further.
    example: Option<(String, String)>,
    pub problems: Vec<String>,
}

/// A dead letter's reason with its attempt count taken out, so letters
/// that differ only by how many attempts fit in their budget group
/// together; the count comes back as a range.
fn reason_key(reason: &str) -> String {
    let Some(at) = reason.find("gave up after ") else {
        return reason.to_string();
    };
    let start = at + "gave up after ".len();
    let digits = reason[start..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .count();
    format!("{}{{n}}{}", &reason[..start], &reason[start + digits..])
}

/// Reads herald's API and the mocks, and checks every sent event.
pub async fn gather(stage: &Stage, sent: &Sent, settled: (Totals, bool)) -> Findings {
    let mut problems = Vec::new();
    for why in &sent.refused {
        problems.push(format!("an event was not taken: {why}"));
    }
    if !settled.1 {
        problems.push(format!(
            "{} deliveries were still queued when the wait for the backlog ended",
            settled.0.queued
        ));
    }

    let listed = match get_json(stage, "/v1/partners").await {
        Ok(v) => v,
        Err(e) => {
            problems.push(e);
            Value::Null
        }
    };
    let listed = |name: &str, key: &str| -> u64 {
        listed["partners"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name)
            .and_then(|p| p[key].as_u64())
            .unwrap_or(0)
    };

    // Each sent event as herald's event API tells it.
    let events: Vec<(usize, Result<Value, String>)> =
        futures::stream::iter(sent.accepted.iter().enumerate())
            .map(
                |(i, e)| async move { (i, get_json(stage, &format!("/v1/events/{}", e.id)).await) },
            )
            .buffer_unordered(8)
            .collect()
            .await;
    let webhook_ids = |mock: &adapters::mock::MockHandle| -> HashSet<String> {
        mock.accepted()
            .iter()
            .filter_map(|r| r.request.header("webhook-id").map(str::to_string))
            .collect()
    };
    let acme_took = webhook_ids(&stage.acme);
    let flaky_took = webhook_ids(&stage.flaky);
    let taken_at = |partner: &str| match partner {
        "acme" => Some(&acme_took),
        "flaky" => Some(&flaky_took),
        _ => None,
    };
    let mut critical_ms: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
    for (i, answer) in events {
        let sent_event = &sent.accepted[i];
        let event = match answer {
            Ok(event) => event,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        let received_ms = event["received_at"].as_str().and_then(parse_rfc3339_ms);
        let deliveries = event["deliveries"].as_array().cloned().unwrap_or_default();
        for partner in partners() {
            let Some(d) = deliveries.iter().find(|d| d["partner"] == partner.name) else {
                problems.push(format!(
                    "event {} has no delivery for {}",
                    sent_event.id, partner.name
                ));
                continue;
            };
            let state = d["state"].as_str().unwrap_or("?");
            let expected = if partner.live { "delivered" } else { "dead" };
            if state != expected {
                problems.push(format!(
                    "event {} at {}: {state} after {} attempts (expected {expected})",
                    sent_event.id, partner.name, d["attempts"]
                ));
                continue;
            }
            let delivery_id = d["id"].as_str().unwrap_or_default();
            if let Some(taken) = taken_at(partner.name) {
                if !taken.contains(delivery_id) {
                    problems.push(format!(
                        "event {} at {}: delivered says herald, but the mock never took delivery {delivery_id}",
                        sent_event.id, partner.name
                    ));
                }
            }
            if sent_event.critical && partner.live {
                let delivered = d["history"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .rfind(|a| a["outcome"] == "delivered")
                    .and_then(|a| Some(a["at_ms"].as_u64()? + a["latency_ms"].as_u64()?));
                if let (Some(from), Some(to)) = (received_ms, delivered) {
                    critical_ms
                        .entry(partner.name)
                        .or_default()
                        .push(to.saturating_sub(from));
                }
            }
        }
    }

    // Dead letters, every page.
    let mut dead = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/v1/dead-letters?limit=1000&after={a}"),
            None => "/v1/dead-letters?limit=1000".to_string(),
        };
        match get_json(stage, &path).await {
            Ok(page) => {
                dead.extend(page["items"].as_array().cloned().unwrap_or_default());
                match page["next"].as_str() {
                    Some(next) => after = Some(next.to_string()),
                    None => break,
                }
            }
            Err(e) => {
                problems.push(e);
                break;
            }
        }
    }
    let sent_ids: HashSet<&str> = sent.accepted.iter().map(|e| e.id.as_str()).collect();
    let mut groups: BTreeMap<(String, String), ReasonGroup> = BTreeMap::new();
    for d in &dead {
        let partner = d["partner"].as_str().unwrap_or("?").to_string();
        let reason = d["reason"].as_str().unwrap_or("?");
        let attempts = d["attempts"].as_u64().unwrap_or(0);
        if !sent_ids.contains(d["event_id"].as_str().unwrap_or_default()) {
            problems.push(format!(
                "dead letter {} is for an event the demo did not send",
                d["id"]
            ));
        }
        let key = reason_key(reason);
        let group = groups
            .entry((partner.clone(), key.clone()))
            .or_insert(ReasonGroup {
                partner,
                reason: key,
                count: 0,
                min_attempts: attempts,
                max_attempts: attempts,
            });
        group.count += 1;
        group.min_attempts = group.min_attempts.min(attempts);
        group.max_attempts = group.max_attempts.max(attempts);
    }
    let down_dead = dead.iter().filter(|d| d["partner"] == "down").count();
    if down_dead != sent.accepted.len() {
        problems.push(format!(
            "{} events were sent but {down_dead} dead letters are at down",
            sent.accepted.len()
        ));
    }
    let example = dead.first().and_then(|d| {
        Some((
            d["id"].as_str()?.to_string(),
            d["event_id"].as_str()?.to_string(),
        ))
    });

    let st_states = smartthings_states(&stage.smartthings);
    let rows: Vec<Row> = partners()
        .into_iter()
        .map(|p| {
            let (at_mock, duplicates_at_mock) = match p.name {
                "acme" => (Some(acme_took.len() as u64), stage.acme.duplicates()),
                "flaky" => (Some(flaky_took.len() as u64), stage.flaky.duplicates()),
                "smartthings" => (Some(st_states), stage.smartthings.duplicates()),
                _ => (None, 0),
            };
            Row {
                name: p.name,
                role: p.role,
                delivered: listed(p.name, "delivered"),
                at_mock,
                duplicates_at_mock: duplicates_at_mock as u64,
                retried: listed(p.name, "retried"),
                dead: listed(p.name, "dead"),
            }
        })
        .collect();
    let events = sent.accepted.len() as u64;
    for (row, partner) in rows.iter().zip(partners()) {
        let (counted, what) = match partner.live {
            true => (row.delivered, "delivered"),
            false => (row.dead, "dead letters"),
        };
        if counted != events {
            problems.push(format!(
                "{}: GET /v1/partners counts {counted} {what} for {events} events",
                row.name
            ));
        }
        if let Some(at_mock) = row.at_mock {
            if at_mock < row.delivered {
                problems.push(format!(
                    "{}: herald counts {} delivered, its mock took {at_mock}",
                    row.name, row.delivered
                ));
            }
        }
    }

    let refreshes_in_metrics = match get_text(stage, "/metrics").await {
        Ok(text) => metric_sum(
            &text,
            "herald_token_requests_total",
            &[("partner", "smartthings"), ("outcome", "renewed")],
        ),
        Err(e) => {
            problems.push(e);
            None
        }
    };

    Findings {
        events: sent.accepted.len(),
        critical: sent.critical(),
        took: sent.took,
        rows,
        reasons: groups.into_values().collect(),
        dead_letters: dead.len(),
        critical_ms,
        refreshes_at_mock: stage.smartthings.refreshes(),
        refreshes_in_metrics,
        example,
        problems,
    }
}

/// States the SmartThings mock accepted in callbacks it had not seen
/// before: one per event delivered (a callback carries a device's queued
/// states together).
fn smartthings_states(mock: &adapters::mock::MockHandle) -> u64 {
    mock.accepted()
        .iter()
        .filter(|r| !r.duplicate)
        .filter_map(|r| r.request.json())
        .map(|body| {
            body["deviceState"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| d["states"].as_array().map_or(0, Vec::len) as u64)
                .sum::<u64>()
        })
        .sum()
}

/// The sum of a counter's series that carry every one of `labels`, from
/// Prometheus text; `None` when no such series is exposed.
fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (series, value) = match rest.rsplit_once(' ') {
            Some(split) => split,
            None => continue,
        };
        if !series.is_empty() && !series.starts_with('{') {
            continue; // another metric whose name starts with this one
        }
        if labels
            .iter()
            .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        {
            if let Ok(v) = value.trim().parse::<f64>() {
                *found.get_or_insert(0) += v as u64;
            }
        }
    }
    found
}

fn parse_rfc3339_ms(text: &str) -> Option<u64> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// The `q` quantile (nearest rank) of sorted `values`.
fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl Findings {
    pub fn accounted(&self) -> bool {
        self.problems.is_empty()
    }

    /// The summary a person reads, with the commands to look further.
    pub fn render(&mut self, stage: &Stage, keep: bool) -> String {
        let mut out = String::new();
        let live = self.rows.iter().filter(|r| r.at_mock.is_some()).count();
        let _ = writeln!(
            out,
            "herald demo: {} events ({} critical) posted in {:.0}s to {} partners\n",
            self.events,
            self.critical,
            self.took.as_secs_f64(),
            self.rows.len()
        );
        let _ = writeln!(
            out,
            "  {:<12} {:<36} {:>9} {:>8} {:>8} {:>6}",
            "partner", "", "delivered", "at mock", "retries", "dead"
        );
        for r in &self.rows {
            let at_mock = r.at_mock.map_or("-".into(), |n| n.to_string());
            let _ = writeln!(
                out,
                "  {:<12} {:<36} {:>9} {:>8} {:>8} {:>6}",
                r.name, r.role, r.delivered, at_mock, r.retried, r.dead
            );
        }
        let duplicates: Vec<String> = self
            .rows
            .iter()
            .filter(|r| r.duplicates_at_mock > 0)
            .map(|r| format!("{} at {}", r.duplicates_at_mock, r.name))
            .collect();
        if !duplicates.is_empty() {
            // At-least-once: a send whose answer was lost is sent again.
            let _ = writeln!(
                out,
                "  the mocks also took a delivery again: {}",
                duplicates.join(", ")
            );
        }
        let metrics = match self.refreshes_in_metrics {
            Some(n) => format!("{n} renewed in herald's /metrics"),
            None => "no herald_token_requests_total in /metrics".into(),
        };
        let _ = writeln!(
            out,
            "\ntoken refreshes: {} at the SmartThings mock ({metrics})",
            self.refreshes_at_mock
        );
        let _ = writeln!(out, "\ndead letters: {}, by reason", self.dead_letters);
        for g in &self.reasons {
            let attempts = match g.min_attempts == g.max_attempts {
                true => g.min_attempts.to_string(),
                false => format!("{}-{}", g.min_attempts, g.max_attempts),
            };
            let reason = g.reason.replace("{n}", &attempts);
            // herald's reasons end with the partner's last answer: a line of its own.
            let (why, last) = match reason.split_once("; last: ") {
                Some((why, last)) => (why.to_string(), Some(last.to_string())),
                None => (reason, None),
            };
            let _ = writeln!(out, "  {:>5} at {}: {why}", g.count, g.partner);
            if let Some(last) = last {
                let _ = writeln!(out, "        last answer: {last}");
            }
        }
        let _ = writeln!(
            out,
            "\ncritical latency, enqueued → delivered ({} critical events):",
            self.critical
        );
        for row in &self.rows {
            let Some(values) = self.critical_ms.get_mut(row.name) else {
                continue;
            };
            let partner = row.name;
            values.sort_unstable();
            let _ = writeln!(
                out,
                "  {partner:<12} p50 {:>6} ms   p99 {:>6} ms   ({} delivered)",
                quantile(values, 0.50),
                quantile(values, 0.99),
                values.len()
            );
        }
        if self.problems.is_empty() {
            let _ = writeln!(
                out,
                "\nevery event accounted for: {} × {live} delivered, {} dead letters at down, nothing queued",
                self.events, self.events
            );
        } else {
            let _ = writeln!(
                out,
                "\nNOT every event is accounted for ({} problems):",
                self.problems.len()
            );
            for p in self.problems.iter().take(PROBLEMS_SHOWN) {
                let _ = writeln!(out, "  - {p}");
            }
            if self.problems.len() > PROBLEMS_SHOWN {
                let _ = writeln!(
                    out,
                    "  ... and {} more",
                    self.problems.len() - PROBLEMS_SHOWN
                );
            }
        }
        let when = match keep {
            true => "herald keeps running (Ctrl-C stops it); look further with",
            false => {
                "herald stops now; with `herald demo --keep` it keeps running, to look further with"
            }
        };
        let _ = writeln!(out, "\n{when}:");
        let _ = writeln!(out, "  export HERALD_URL={}", stage.herald.url());
        let _ = writeln!(
            out,
            "  export HERALD_TOKEN={}",
            stage.secrets.operator_token
        );
        let _ = writeln!(out, "  herald dlq list");
        if let Some((dead_letter, event)) = &self.example {
            let _ = writeln!(out, "  herald dlq show {dead_letter}");
            let _ = writeln!(out, "  herald events show {event}");
        }
        let _ = writeln!(
            out,
            "  curl -H \"authorization: Bearer $HERALD_TOKEN\" $HERALD_URL/metrics"
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_group_apart_from_their_attempt_counts() {
        let a = "gave up after 6 attempts: the next one would be past retry.critical_max_age (3s); last: refused";
        let b = "gave up after 7 attempts: the next one would be past retry.critical_max_age (3s); last: refused";
        assert_eq!(reason_key(a), reason_key(b));
        assert!(reason_key(a).starts_with("gave up after {n} attempts:"));
        assert_eq!(reason_key("parked: gone"), "parked: gone");
    }

    #[test]
    fn a_counter_is_summed_over_the_series_with_its_labels() {
        let text = "# TYPE herald_token_requests_total counter\n\
            herald_token_requests_total{partner=\"smartthings\",outcome=\"renewed\"} 4\n\
            herald_token_requests_total{partner=\"smartthings\",outcome=\"retry\"} 1\n\
            herald_token_requests_total_other{partner=\"smartthings\",outcome=\"renewed\"} 9\n";
        let renewed = [("partner", "smartthings"), ("outcome", "renewed")];
        assert_eq!(
            metric_sum(text, "herald_token_requests_total", &renewed),
            Some(4)
        );
        assert_eq!(
            metric_sum(text, "herald_token_refreshes_total", &renewed),
            None
        );
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&values, 0.5), 50);
        assert_eq!(quantile(&values, 0.99), 99);
        assert_eq!(quantile(&[7], 0.99), 7);
        assert_eq!(quantile(&[], 0.5), 0);
    }
}
