//! The physical references every herald figure is compared with, measured
//! in the same run on the same machine: how fast a bare hyper client loop
//! can hit a loopback sink, and how fast this disk takes fsynced appends.
//!
//! The ceiling uses hyper's pooled client with nothing on top: the stack
//! herald delivers with, less herald (no address checks, no signing, no
//! store). A slower client here (reqwest's per-request URL parsing, tower
//! layers and header copies) would make herald's share of it look better
//! than it is.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::CONTENT_TYPE;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::sink::Sink;

/// Requests/s of `clients` concurrent loops of hyper's pooled client
/// posting `body` to a minimal sink, over `requests` requests.
pub async fn http_ceiling(requests: u64, clients: usize, body: Vec<u8>) -> Result<f64, String> {
    let sink = Sink::start(Instant::now(), false)
        .await
        .map_err(|e| e.to_string())?;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let url: hyper::Uri = sink.url().parse().map_err(|e| format!("{e}"))?;
    let next = Arc::new(AtomicU64::new(0));
    let body = Bytes::from(body);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, next, body, url) =
            (client.clone(), Arc::clone(&next), body.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < requests {
                let request = hyper::Request::post(url.clone())
                    .header(CONTENT_TYPE, "application/json")
                    .body(Full::new(body.clone()))
                    .map_err(|e| e.to_string())?;
                let response = client.request(request).await.map_err(|e| e.to_string())?;
                // Read to the end, as a delivery does, so the connection is reused.
                response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        }));
    }
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(sink.state.received.load(Ordering::Relaxed) as f64 / elapsed)
}

/// Records/s appending `record_bytes` records to a file in `dir`, with one
/// fsync (fdatasync) per `group` records, for about `budget`.
pub fn fsync_rate(
    dir: &std::path::Path,
    record_bytes: usize,
    group: usize,
    budget: Duration,
) -> Result<f64, String> {
    let path = dir.join(format!("fsync-{group}.log"));
    let mut file = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let record = vec![b'r'; record_bytes];
    let started = Instant::now();
    let mut written = 0u64;
    while started.elapsed() < budget {
        for _ in 0..group {
            file.write_all(&record).map_err(|e| e.to_string())?;
        }
        file.sync_data().map_err(|e| e.to_string())?;
        written += group as u64;
    }
    let rate = written as f64 / started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    Ok(rate)
}
