//! Deliveries over HTTPS: real partners take webhooks over TLS only, so the
//! client's TLS stack (rustls, the platform's certificate verifier) is
//! tried against real TLS servers on loopback, with certificates made here.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use herald::clock::Clock;
use herald::model::DeliveryState;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A partner behind TLS with `cert` and `key`, answering 200 and counting
/// the signed requests it gets.
async fn tls_partner(cert: CertificateDer<'static>, key: &KeyPair) -> (String, Arc<AtomicU64>) {
    herald::dispatch::client::install_crypto_provider();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let signed = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&signed);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, counter) = (acceptor.clone(), Arc::clone(&counter));
            tokio::spawn(async move {
                // A handshake the client refuses simply ends here.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                    if request.headers().contains_key("webhook-signature") {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(Bytes::new()),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (format!("https://localhost:{port}/hook"), signed)
}

fn leaf_params() -> CertificateParams {
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params
}

#[test]
fn webhooks_go_out_over_tls_to_a_trusted_partner_and_never_to_an_untrusted_one() {
    // A CA of our own, made the trusted roots of this process before any
    // thread that could read the environment starts (nextest runs each test
    // in a process of its own).
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "herald test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let dir = tempfile::tempdir().expect("temp dir");
    let roots = dir.path().join("roots.pem");
    std::fs::write(&roots, ca.pem()).expect("roots file");
    std::env::set_var("SSL_CERT_FILE", &roots);

    let trusted_key = KeyPair::generate().expect("key");
    let trusted = leaf_params()
        .signed_by(&trusted_key, &ca, &ca_key)
        .expect("leaf signed by the CA");
    // Same name, but signed by nobody the client trusts.
    let stranger_key = KeyPair::generate().expect("key");
    let stranger = leaf_params()
        .self_signed(&stranger_key)
        .expect("self-signed leaf");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (trusted_url, trusted_got) = tls_partner(trusted.der().clone(), &trusted_key).await;
        let (stranger_url, stranger_got) = tls_partner(stranger.der().clone(), &stranger_key).await;
        let partners = partner_toml("trusted", &trusted_url, "")
            + &partner_toml("stranger", &stranger_url, "retry = { max_attempts = 1 }");
        let data = dir.path().join("data");
        let h = TestHerald::start(&config_toml(&data, &partners, ""), Clock::system()).await;

        let (event, _) = h.send_one("trusted", "critical").await;
        h.wait_event(&event, "delivered over TLS", |e| {
            e.deliveries[0].state == DeliveryState::Delivered
        })
        .await;
        assert_eq!(trusted_got.load(Ordering::SeqCst), 1, "one signed request");

        // Normal: a critical delivery is never given up for its attempt count.
        let (event, _) = h.send_one("stranger", "normal").await;
        let dead = h
            .wait_event(&event, "a dead letter", |e| {
                e.deliveries[0].state == DeliveryState::Dead
            })
            .await;
        let detail = &dead.deliveries[0]
            .last_attempt
            .as_ref()
            .expect("an attempt")
            .detail;
        assert!(detail.contains("certificate"), "{detail}");
        assert_eq!(
            stranger_got.load(Ordering::SeqCst),
            0,
            "nothing reached a partner whose certificate was refused"
        );
    });
}
