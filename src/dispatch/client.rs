//! The outbound HTTP clients, shared by every lane.
//!
//! Deliveries go out through hyper's pooled client (hyper-util) with rustls
//! (hyper-rustls) and nothing between them and the socket: no redirects
//! (a redirect could carry a signed request somewhere the partner never
//! agreed to), no retries (the queue owns retries), no URL re-parsing or
//! header copies per request. reqwest did all of those on every delivery,
//! about a fifth of herald's CPU at full load. Every address dialled is put
//! to the outbound address policy ([`crate::outbound::check`]) at connect
//! time: IP literals by [`Guarded`] before the connector sees them, names
//! by the [`Resolver`] after lookup. A refused address is never dialled;
//! the send becomes [`Sent::Refused`], which the lane settles as permanent.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use adapters::{Answer, OutboundRequest};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, USER_AGENT};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::clock::Clock;
use crate::outbound::{self, NotDialled};

/// How much of an answer's body is read: enough for any adapter to classify.
const ANSWER_READ_BYTES: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const AGENT: &str = concat!("herald/", env!("CARGO_PKG_VERSION"));

type Connector = HttpsConnector<Guarded>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One pooled client; cloning shares its connections.
#[derive(Clone)]
pub(crate) struct Client(hyper_util::client::legacy::Client<Connector, Full<Bytes>>);

/// The two clients: one for partners allowed to reach private ranges.
#[derive(Clone)]
pub(crate) struct Clients {
    public_only: Client,
    any: Client,
}

impl Clients {
    /// Fails only when the platform's certificate verifier cannot start.
    pub(crate) fn new() -> Result<Clients, rustls::Error> {
        install_crypto_provider();
        Ok(Clients {
            public_only: Client::new(false)?,
            any: Client::new(true)?,
        })
    }

    pub(crate) fn for_partner(&self, allow_private: bool) -> &Client {
        if allow_private {
            &self.any
        } else {
            &self.public_only
        }
    }
}

impl Client {
    fn new(allow_private: bool) -> Result<Client, rustls::Error> {
        let mut http = HttpConnector::new_with_resolver(Resolver { allow_private });
        // The TLS layer above decides the scheme; this one only dials.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .try_with_platform_verifier()?
            .https_or_http()
            .enable_http1()
            .wrap_connector(Guarded {
                inner: http,
                allow_private,
            });
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(Client(client))
    }
}

/// rustls needs one process-wide crypto provider before any client is
/// built; herald uses ring. Calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The dialler behind TLS: an IP literal is put to the policy here, since
/// the connector dials literals without asking the [`Resolver`].
#[derive(Clone)]
struct Guarded {
    inner: HttpConnector<Resolver>,
    allow_private: bool,
}

type Dialling = Pin<
    Box<
        dyn Future<Output = Result<hyper_util::rt::TokioIo<tokio::net::TcpStream>, BoxError>>
            + Send,
    >,
>;

impl tower_service::Service<hyper::Uri> for Guarded {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = Dialling;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: hyper::Uri) -> Dialling {
        let host = uri.host().unwrap_or_default();
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>();
        if let Ok(ip) = literal {
            if let Err(refused) = outbound::check(ip, self.allow_private) {
                let refused = NotDialled {
                    host: ip.to_string(),
                    refused: vec![refused],
                };
                return Box::pin(async move { Err(refused.into()) });
            }
        }
        let dialling = self.inner.call(uri);
        Box::pin(async move { dialling.await.map_err(Into::into) })
    }
}

/// Name lookups for the connector: every address found is put to the
/// policy; refused ones are dropped, and a name left with none is refused.
#[derive(Clone)]
struct Resolver {
    allow_private: bool,
}

type Resolving =
    Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, BoxError>> + Send>>;

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Resolving;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        let allow_private = self.allow_private;
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = Vec::new();
            let mut allowed = Vec::new();
            for addr in found {
                match outbound::check(addr.ip(), allow_private) {
                    Ok(()) => allowed.push(addr),
                    Err(r) => refused.push(r),
                }
            }
            if allowed.is_empty() && !refused.is_empty() {
                return Err(NotDialled { host, refused }.into());
            }
            if !refused.is_empty() {
                tracing::debug!(%host, refused = refused.len(), "some addresses of the name are refused by the outbound address policy; dialling the others");
            }
            Ok(allowed.into_iter())
        })
    }
}

/// What came back, owned, so the adapter can borrow it.
pub(crate) enum Sent {
    Http {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    Timeout,
    Network(String),
    /// Not dialled: the outbound address policy refused every address.
    Refused(String),
}

impl Sent {
    pub(crate) fn as_answer(&self) -> Answer<'_> {
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
            Sent::Network(e) | Sent::Refused(e) => Answer::Network(e),
        }
    }

    /// Why nothing was sent, when the policy refused the address.
    pub(crate) fn refusal(&self) -> Option<&str> {
        match self {
            Sent::Refused(reason) => Some(reason),
            _ => None,
        }
    }

    pub(crate) fn status(&self) -> Option<u16> {
        match self {
            Sent::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Sends `request` and reads the answer, giving up after `timeout` on
/// herald's clock.
pub(crate) async fn exchange(
    client: &Client,
    request: OutboundRequest,
    timeout: Duration,
    clock: &Clock,
) -> Sent {
    tokio::select! {
        answer = send(client, request) => answer,
        _ = clock.sleep(timeout) => Sent::Timeout,
    }
}

async fn send(client: &Client, request: OutboundRequest) -> Sent {
    let request = match to_http(request) {
        Ok(r) => r,
        Err(e) => return Sent::Network(format!("cannot build the request: {e}")),
    };
    let response = match client.0.request(request).await {
        Ok(r) => r,
        Err(e) => {
            return match not_dialled(&e) {
                Some(refused) => Sent::Refused(refused.to_string()),
                None => Sent::Network(error_chain(&e)),
            }
        }
    };
    let (head, mut answer) = response.into_parts();
    let headers = head
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let mut body = Vec::new();
    while body.len() < ANSWER_READ_BYTES {
        match answer.frame().await {
            Some(Ok(frame)) => {
                if let Some(chunk) = frame.data_ref() {
                    body.extend_from_slice(chunk);
                }
            }
            // The status already tells the verdict; a broken body only shortens the snippet.
            None | Some(Err(_)) => break,
        }
    }
    body.truncate(ANSWER_READ_BYTES);
    Sent::Http {
        status: head.status.as_u16(),
        headers,
        body,
    }
}

/// The adapter's request as hyper takes it; an adapter's bad URL or header
/// is named, not sent.
fn to_http(request: OutboundRequest) -> Result<hyper::Request<Full<Bytes>>, hyper::http::Error> {
    let method = match request.method {
        adapters::Method::Post => hyper::Method::POST,
        adapters::Method::Put => hyper::Method::PUT,
    };
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(ascii_url(request.url))
        .header(USER_AGENT, HeaderValue::from_static(AGENT));
    for (name, value) in &request.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    builder.body(Full::new(Bytes::from(request.body)))
}

/// hyper takes ASCII URLs only: an international host name goes out in
/// its punycode form, as a browser would send it.
fn ascii_url(url: String) -> String {
    if url.is_ascii() {
        return url;
    }
    url::Url::parse(&url).map(String::from).unwrap_or(url)
}

/// The policy's refusal somewhere in `e`'s causes.
fn not_dialled<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a NotDialled> {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(refused) = e.downcast_ref::<NotDialled>() {
            return Some(refused);
        }
        cause = e.source();
    }
    None
}

/// "client error (Connect): tcp connect error: Connection refused": the
/// whole cause, on one line.
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
    fn international_host_names_go_out_as_punycode() {
        assert_eq!(
            ascii_url("https://bücher.example/hook?x=1".into()),
            "https://xn--bcher-kva.example/hook?x=1"
        );
        assert_eq!(ascii_url("http://a.example/".into()), "http://a.example/");
    }
}

#[cfg(test)]
mod exchange_tests {
    use super::*;

    /// A loopback partner that answers 503 with a long body and echoes what
    /// it was sent in headers.
    async fn partner() -> SocketAddr {
        use axum::http::HeaderMap;
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(|headers: HeaderMap, body: Bytes| async move {
                let agent = headers
                    .get(USER_AGENT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let sig = headers
                    .get("webhook-signature")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    [
                        ("x-agent", agent),
                        ("x-signature", sig),
                        ("x-length", body.len().to_string()),
                    ],
                    "x".repeat(3 * ANSWER_READ_BYTES),
                )
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    fn post(url: String) -> OutboundRequest {
        OutboundRequest {
            method: adapters::Method::Post,
            url,
            headers: vec![("webhook-signature".into(), "v1,abc".into())],
            body: b"{\"a\":1}".to_vec(),
        }
    }

    /// Posts to `url` through the client that may (or may not) reach
    /// private addresses, on the real clock, with a 5 s timeout.
    async fn post_through(clients: &Clients, allow_private: bool, url: String) -> Sent {
        exchange(
            clients.for_partner(allow_private),
            post(url),
            Duration::from_secs(5),
            &Clock::system(),
        )
        .await
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }

    #[tokio::test]
    async fn an_answer_keeps_its_status_headers_and_the_head_of_its_body() {
        let addr = partner().await;
        let clients = Clients::new().expect("clients");
        let sent = post_through(&clients, true, format!("http://{addr}/hook")).await;
        let Sent::Http {
            status,
            headers,
            body,
        } = sent
        else {
            panic!("no HTTP answer");
        };
        assert_eq!(status, 503);
        assert_eq!(header(&headers, "x-agent"), AGENT);
        assert_eq!(header(&headers, "x-signature"), "v1,abc");
        assert_eq!(header(&headers, "x-length"), "7");
        assert_eq!(
            body.len(),
            ANSWER_READ_BYTES,
            "the body is cut at the limit"
        );
    }

    #[tokio::test]
    async fn a_public_only_client_will_not_dial_a_name_that_resolves_to_loopback() {
        let addr = partner().await;
        let clients = Clients::new().expect("clients");
        let url = format!("http://localhost:{}/hook", addr.port());
        let sent = post_through(&clients, false, url.clone()).await;
        match sent {
            Sent::Refused(e) => assert!(
                e.contains(
                    "localhost resolves only to addresses the outbound address policy refuses"
                ) && e.contains("(loopback)"),
                "{e}"
            ),
            _ => panic!("localhost was dialled"),
        }
        // The same name through the client that may reach private ranges.
        let sent = post_through(&clients, true, url).await;
        assert_eq!(sent.status(), Some(503));
    }

    #[tokio::test]
    async fn a_public_only_client_refuses_ip_literals_without_connecting() {
        let addr = partner().await;
        let clients = Clients::new().expect("clients");
        for host in ["127.0.0.1", "[::ffff:127.0.0.1]", "[::127.0.0.1]"] {
            let url = format!("http://{host}:{}/hook", addr.port());
            let sent = post_through(&clients, false, url.clone()).await;
            match sent {
                Sent::Refused(e) => assert!(
                    e.starts_with("not sent: the outbound address policy refuses ")
                        && e.contains("in 127.0.0.0/8 (loopback)"),
                    "{host}: {e}"
                ),
                Sent::Http { status, .. } => panic!("{host} was dialled: HTTP {status}"),
                _ => panic!("{host}: not refused by the policy"),
            }
        }
        // The partner is there: the client that may reach loopback gets its answer.
        let sent = post_through(
            &clients,
            true,
            format!("http://[::ffff:127.0.0.1]:{}/hook", addr.port()),
        )
        .await;
        assert_eq!(sent.status(), Some(503));
    }

    #[tokio::test]
    async fn refused_connections_and_bad_requests_are_network_errors_that_say_why() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let clients = Clients::new().expect("clients");
        let client = clients.for_partner(true);
        let clock = Clock::system();
        let timeout = Duration::from_secs(5);
        let refused = exchange(
            client,
            post(format!("http://127.0.0.1:{port}/hook")),
            timeout,
            &clock,
        )
        .await;
        match refused {
            Sent::Network(e) => assert!(e.contains("onnection refused"), "{e}"),
            _ => panic!("expected a network error"),
        }
        let mut bad = post(format!("http://127.0.0.1:{port}/hook"));
        bad.headers.push(("bad header".into(), "x".into()));
        match exchange(client, bad, timeout, &clock).await {
            Sent::Network(e) => assert!(e.starts_with("cannot build the request"), "{e}"),
            _ => panic!("a bad header name was sent"),
        }
    }

    #[tokio::test]
    async fn a_silent_partner_times_out_on_herald_s_clock() {
        // Accepts the connection and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let clients = Clients::new().expect("clients");
        let clock = Clock::manual(1_000);
        let send = tokio::spawn({
            let client = clients.for_partner(true).clone();
            let clock = clock.clone();
            async move {
                exchange(
                    &client,
                    post(format!("http://{addr}/hook")),
                    Duration::from_secs(30),
                    &clock,
                )
                .await
            }
        });
        tokio::task::yield_now().await;
        assert!(!send.is_finished());
        clock.advance(Duration::from_secs(30));
        let sent = tokio::time::timeout(Duration::from_secs(5), send)
            .await
            .expect("woken by the clock")
            .expect("task");
        assert!(matches!(sent, Sent::Timeout));
    }
}
