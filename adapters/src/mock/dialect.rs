//! What differs between platforms in a mock: where the token is, what the
//! request id is, what a valid body looks like, and how each answer reads.
//! The fault engine in `mock/mod.rs` is the same for all.

use serde_json::{json, Value};

/// A request as the mock received it.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Incoming {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn bearer(&self) -> Option<String> {
        self.header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string)
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    pub fn form(&self, key: &str) -> Option<String> {
        form_urlencoded::parse(&self.body)
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }
}

/// The answer a mock sends.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }

    pub fn empty(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &str, value: String) -> Reply {
        self.headers.push((name.into(), value));
        self
    }
}

/// What a token request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    Refresh(String),
    /// A JWT assertion (Google's service account).
    Assertion(String),
    ClientCredentials,
    Unreadable(String),
}

pub trait Dialect: Send + Sync + 'static {
    fn platform(&self) -> &'static str;

    fn is_token_request(&self, req: &Incoming) -> bool {
        req.path.ends_with("/token")
    }

    /// Whether deliveries present an access token the mock checks (and
    /// expires); a plain webhook receiver checks a signature instead.
    fn uses_tokens(&self) -> bool {
        true
    }

    /// The access token the request presents.
    fn token(&self, req: &Incoming) -> Option<String> {
        req.bearer()
    }

    /// Checks the request is in the platform's shape; `Err` is answered as
    /// the platform's bad request.
    fn validate(&self, req: &Incoming) -> Result<(), String>;

    /// What duplicates are detected by; `None`: nothing to go by.
    /// Unless the platform says otherwise, `x-request-id`.
    fn request_id(&self, req: &Incoming) -> Option<String> {
        req.header("x-request-id").map(str::to_string)
    }

    fn grant(&self, req: &Incoming) -> Grant {
        match req.form("grant_type").as_deref() {
            Some("refresh_token") => match req.form("refresh_token") {
                Some(t) => Grant::Refresh(t),
                None => Grant::Unreadable("no refresh_token".into()),
            },
            Some("client_credentials") => Grant::ClientCredentials,
            Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => match req.form("assertion") {
                Some(a) => Grant::Assertion(a),
                None => Grant::Unreadable("no assertion".into()),
            },
            other => Grant::Unreadable(format!("grant_type {other:?}")),
        }
    }

    // The answers below default to plain OAuth2-style JSON errors (what the
    // assumed platforms speak); the documented platforms give their own.

    fn ok(&self, _req: &Incoming) -> Reply {
        Reply::json(200, json!({"result": "ok"}))
    }

    fn bad_request(&self, why: &str) -> Reply {
        Reply::json(
            400,
            json!({"error": "invalid_request", "error_description": why}),
        )
    }

    fn expired(&self) -> Reply {
        Reply::json(401, json!({"error": "invalid_token"}))
    }

    fn throttled(&self) -> Reply {
        Reply::json(429, json!({"error": "too_many_requests"}))
    }

    fn server_error(&self) -> Reply {
        Reply::json(503, json!({"error": "unavailable"}))
    }

    /// The user unlinked the account: the platform's terminal answer.
    fn terminal(&self) -> Reply {
        Reply::json(
            403,
            json!({"error": "access_denied", "error_description": "the user unlinked the account"}),
        )
    }

    /// A token endpoint's success (RFC 6749 §5.1 unless the platform differs).
    fn issued(&self, access_token: &str, refresh_token: Option<&str>, expires_in: u64) -> Reply {
        let mut body = json!({
            "access_token": access_token,
            "token_type": "bearer",
            "expires_in": expires_in,
        });
        if let Some(refresh) = refresh_token {
            body["refresh_token"] = refresh.into();
        }
        Reply::json(200, body)
    }

    /// The platform's answer to a delivery when herald's own setup is
    /// refused; `None` where the platform documents none.
    fn misconfigured(&self) -> Option<Reply> {
        None
    }

    /// The secret a token request presents for herald's client.
    fn client_secret(&self, req: &Incoming) -> Option<String> {
        req.form("client_secret")
    }

    /// A token endpoint's "this client is refused": RFC 6749 §5.2
    /// `invalid_client`, answered 401.
    fn client_refused(&self) -> Reply {
        Reply::json(
            401,
            json!({"error": "invalid_client", "error_description": "Client authentication failed"}),
        )
    }

    /// A token endpoint's "this grant is dead" (RFC 6749 §5.2).
    fn grant_dead(&self, why: &str) -> Reply {
        Reply::json(
            400,
            json!({"error": "invalid_grant", "error_description": why}),
        )
    }
}
