//! The accept loop: each connection served by hyper with a timer (so its
//! header-read timeout, which also ends idle keep-alive connections, is in
//! force), under a cap on how many are open at once.
//!
//! `axum::serve` gives hyper no timer and takes every connection the kernel
//! hands it, so a few hundred idle sockets could hold every descriptor.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::config::Config;

/// Descriptors kept back from the connection cap for the store, partner
/// connections and the process itself.
const RESERVED_DESCRIPTORS: u64 = 128;
/// The most a request's header may be (431 over it).
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Connections refused at the cap that may be waiting to close at once.
const MAX_REFUSING: usize = 64;

/// The connection cap in force: `server.max_connections`, lowered to fit
/// under the process's descriptor limit.
pub fn connection_cap(config: &Config) -> usize {
    let configured = config.server.http.max_connections;
    let partners: usize = config.partners.iter().map(|p| p.max_in_flight).sum();
    let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    else {
        return configured;
    };
    let reserve = RESERVED_DESCRIPTORS + partners as u64;
    let fits =
        usize::try_from(soft.saturating_sub(reserve).max(soft / 4).max(1)).unwrap_or(usize::MAX);
    if fits < configured {
        tracing::warn!(
            max_connections = configured,
            descriptor_limit = soft,
            cap = fits,
            "server.max_connections does not fit under the descriptor limit (RLIMIT_NOFILE); \
             the connection cap is lowered"
        );
        return fits;
    }
    configured
}

/// Serves `app` on `listener` until `stop`, then lets open connections
/// finish their requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    header_timeout: Duration,
    cap: usize,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(cap));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let at_cap = AtomicBool::new(false);
    let connections = TaskTracker::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        // hyper's default lets a header grow to ~400 KiB; a request to
        // herald needs a fraction, and a slow client holds what it sent.
        .max_header_size(MAX_HEADER_BYTES);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (or a connection reset before it was
                // taken): wait rather than spin, and say so.
                metrics::counter!(crate::telemetry::HTTP_ACCEPT_ERRORS).increment(1);
                tracing::error!(error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            metrics::counter!(crate::telemetry::HTTP_CONNECTIONS_REFUSED).increment(1);
            if !at_cap.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max_connections = cap,
                    "connection cap reached: new connections are answered 503 until some close"
                );
            }
            // Waiting here for a refusal to finish keeps further
            // connections in the kernel's backlog: each is answered in turn.
            let permit = tokio::select! {
                _ = stop.cancelled() => break,
                permit = Arc::clone(&refusing).acquire_owned() => permit,
            };
            match permit {
                Ok(permit) => refuse(stream, permit),
                Err(_) => break,
            }
            continue;
        };
        if at_cap.swap(false, Ordering::Relaxed) {
            tracing::info!(max_connections = cap, "below the connection cap again");
        }
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let stop = stop.clone();
        let connection = builder.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |request: Request<Incoming>| {
                let mut app = app.clone();
                async move {
                    Ok::<_, Infallible>(
                        app.call(request.map(axum::body::Body::new))
                            .await
                            .unwrap_or_else(|never| match never {}),
                    )
                }
            }),
        );
        metrics::gauge!(crate::telemetry::HTTP_CONNECTIONS).increment(1.0);
        connections.spawn(async move {
            let _slot = slot;
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended");
            }
            metrics::gauge!(crate::telemetry::HTTP_CONNECTIONS).decrement(1.0);
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Answers 503 and closes, without reading the request beyond draining it
/// for at most half a second, so the answer is not lost to a reset.
fn refuse(mut stream: TcpStream, permit: tokio::sync::OwnedSemaphorePermit) {
    tokio::spawn(async move {
        let _permit = permit;
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            stream.write_all(refusal().as_bytes()).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
    });
}

/// The 503 a connection over the cap gets, as a problem document.
fn refusal() -> String {
    let body = serde_json::json!({
        "type": "/problems/too-many-connections",
        "title": "herald has too many connections",
        "status": 503,
        "detail": "server.max_connections is reached; retry shortly",
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}
