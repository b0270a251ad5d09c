//! A Google service-account key and the RS256 JWT assertion it signs
//! (RFC 7523 `jwt-bearer` grant, as Google's OAuth 2.0 for server-to-server
//! applications documents it).

use std::fmt;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use serde::Deserialize;
use serde_json::json;

use crate::oauth::form_post;
use crate::{BuildError, OutboundRequest};

pub const HOMEGRAPH_SCOPE: &str = "https://www.googleapis.com/auth/homegraph";
/// Google caps an assertion's lifetime (and the token's) at one hour.
pub const LIFETIME_SECS: u64 = 3600;

#[derive(Deserialize)]
struct KeyFile {
    client_email: String,
    private_key: String,
    private_key_id: Option<String>,
    token_uri: Option<String>,
}

pub struct ServiceAccount {
    pub client_email: String,
    /// Where the token request goes: the key's `token_uri`, or the
    /// partner's `token_url` (a proxy, a test double).
    pub token_uri: String,
    /// The assertion's `aud`: always the key's own `token_uri` (Google's
    /// token endpoint). Google refuses an assertion addressed elsewhere, so
    /// a proxy in front of it must not change what the JWT says.
    audience: String,
    key_id: Option<String>,
    key: RsaKeyPair,
}

impl fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl ServiceAccount {
    /// Reads a key file's JSON (`type: service_account`).
    pub fn from_json(json: &str) -> Result<Self, String> {
        let file: KeyFile = serde_json::from_str(json)
            .map_err(|e| format!("not a service-account key file: {e}"))?;
        let der = pem_body(&file.private_key)?;
        let key = RsaKeyPair::from_pkcs8(&der)
            .map_err(|e| format!("private_key is not a PKCS#8 RSA key: {e}"))?;
        let token_uri = file
            .token_uri
            .unwrap_or_else(|| "https://oauth2.googleapis.com/token".into());
        Ok(ServiceAccount {
            client_email: file.client_email,
            audience: token_uri.clone(),
            token_uri,
            key_id: file.private_key_id,
            key,
        })
    }

    /// The public half, DER `RSAPublicKey` (what a verifier needs).
    pub fn public_key_der(&self) -> Vec<u8> {
        use ring::signature::KeyPair;
        self.key.public_key().as_ref().to_vec()
    }

    /// The signed assertion for `scope`, issued at `now_unix`.
    pub fn assertion(&self, scope: &str, now_unix: u64) -> Result<String, BuildError> {
        let mut header = json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.key_id {
            header["kid"] = kid.clone().into();
        }
        let claims = json!({
            "iss": self.client_email,
            "scope": scope,
            "aud": self.audience,
            "iat": now_unix,
            "exp": now_unix + LIFETIME_SECS,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0u8; self.key.public().modulus_len()];
        // PKCS#1 v1.5 signatures are deterministic; the RNG only blinds.
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| BuildError("RS256 signing failed".into()))?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }

    /// The token request: the assertion traded for a bearer token.
    pub fn token_request(&self, scope: &str, now_unix: u64) -> Result<OutboundRequest, BuildError> {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer")
            .append_pair("assertion", &self.assertion(scope, now_unix)?)
            .finish();
        Ok(form_post(&self.token_uri, body))
    }
}

/// Checks an RS256 JWT against a DER `RSAPublicKey`; returns its claims.
pub fn verify(jwt: &str, public_key_der: &[u8]) -> Result<serde_json::Value, String> {
    let (signing_input, signature) = jwt.rsplit_once('.').ok_or("not a JWT")?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| "signature is not base64url")?;
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        public_key_der,
    )
    .verify(signing_input.as_bytes(), &signature)
    .map_err(|_| "bad signature")?;
    let claims = signing_input.split('.').nth(1).ok_or("no claims")?;
    let claims = URL_SAFE_NO_PAD
        .decode(claims)
        .map_err(|_| "claims are not base64url")?;
    serde_json::from_slice(&claims).map_err(|e| format!("claims are not JSON: {e}"))
}

fn pem_body(pem: &str) -> Result<Vec<u8>, String> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----"))
        .collect();
    if !pem.contains("-----BEGIN PRIVATE KEY-----") {
        return Err("private_key is not a PEM \"PRIVATE KEY\" (PKCS#8)".into());
    }
    STANDARD
        .decode(body)
        .map_err(|e| format!("private_key's PEM body is not base64: {e}"))
}
