//! The outbound HTTP clients, shared by every lane.
//!
//! Redirects and reqwest's own retries are off: the queue owns retries, and
//! a redirect could carry a signed request somewhere the partner never
//! agreed to. Partners that may not reach private networks (the default)
//! go through a client whose resolver drops loopback and private addresses,
//! so a webhook URL cannot be used to probe herald's own network.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use adapters::{Answer, OutboundRequest};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::clock::Clock;

/// How much of an answer's body is read: enough for any adapter to classify.
const ANSWER_READ_BYTES: usize = 4096;

/// The two clients: one for partners allowed to reach private ranges.
#[derive(Clone)]
pub struct Clients {
    public_only: reqwest::Client,
    any: reqwest::Client,
}

impl Clients {
    pub fn new() -> Result<Clients, reqwest::Error> {
        install_crypto_provider();
        let builder = || {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .retry(reqwest::retry::never())
                .connect_timeout(Duration::from_secs(5))
                .pool_idle_timeout(Duration::from_secs(60))
                .tcp_nodelay(true)
                .no_proxy()
                .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
        };
        Ok(Clients {
            public_only: builder().dns_resolver(PublicOnly).build()?,
            any: builder().build()?,
        })
    }

    pub fn for_partner(&self, allow_private: bool) -> &reqwest::Client {
        if allow_private {
            &self.any
        } else {
            &self.public_only
        }
    }
}

/// rustls needs one process-wide crypto provider before any client is
/// built; herald uses ring. Calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Whether `ip` is a routable public address (not loopback, private,
/// link-local, unspecified, CGNAT, multicast or documentation).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || (o[0] == 100 && (o[1] & 0xC0) == 64)
                || o[0] == 0)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| is_public(a.ip()))
                .collect();
            if public.is_empty() {
                return Err(format!(
                    "{host} resolves only to loopback or private addresses; the partner needs allow_private = true"
                )
                .into());
            }
            Ok(Box::new(public.into_iter()) as Addrs)
        })
    }
}

/// What came back, owned, so the adapter can borrow it.
pub enum Sent {
    Http {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    Timeout,
    Network(String),
}

impl Sent {
    pub fn as_answer(&self) -> Answer<'_> {
        match self {
            Sent::Http {
                status,
                headers,
                body,
            } => Answer::Http {
                status: *status,
                headers,
                body,
            },
            Sent::Timeout => Answer::Timeout,
            Sent::Network(e) => Answer::Network(e),
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Sent::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Sends `request` and reads the answer, giving up after `timeout` on
/// herald's clock.
pub async fn exchange(
    client: &reqwest::Client,
    request: OutboundRequest,
    timeout: Duration,
    clock: &Clock,
) -> Sent {
    tokio::select! {
        answer = send(client.clone(), request) => answer,
        _ = clock.sleep(timeout) => Sent::Timeout,
    }
}

async fn send(client: reqwest::Client, request: OutboundRequest) -> Sent {
    let method = match request.method {
        adapters::Method::Post => reqwest::Method::POST,
        adapters::Method::Put => reqwest::Method::PUT,
    };
    let mut builder = client.request(method, &request.url).body(request.body);
    for (name, value) in &request.headers {
        builder = builder.header(name, value);
    }
    let mut response = match builder.send().await {
        Ok(r) => r,
        Err(e) => return Sent::Network(error_chain(&e)),
    };
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let mut body = Vec::new();
    while body.len() < ANSWER_READ_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            // The status already tells the verdict; a broken body only shortens the snippet.
            Ok(None) | Err(_) => break,
        }
    }
    body.truncate(ANSWER_READ_BYTES);
    Sent::Http {
        status,
        headers,
        body,
    }
}

/// "error sending request: ...: Connection refused": the whole cause, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges_are_not_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }
}
