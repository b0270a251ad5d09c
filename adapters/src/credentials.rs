//! Tokens as adapters hand them to herald: what a refresh or a mint gave
//! back, and what to do when it gave nothing usable.
//!
//! Adapters build token requests and read their answers; herald sends them,
//! keeps one refresh in flight per link (or per partner for partner-wide
//! tokens), and persists what comes back, encrypted, before it is used.

use std::fmt;
use std::time::Duration;

/// Whose token `LinkView::access_token` carries for an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenScope {
    /// Each link holds a user's tokens; a refresh is per link.
    Link,
    /// One token for the whole partner (client credentials, service-account
    /// JWT): herald mints it, caches it until shortly before it expires, and
    /// passes it as every link's `access_token`.
    Partner,
}

/// Fresh credentials from a token endpoint.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_token: String,
    /// `Some` when the platform rotated the refresh token: persist it before
    /// using the new access token, the old one may already be dead.
    pub refresh_token: Option<String>,
    /// When the access token expires, when the platform said.
    pub expires_at_unix: Option<u64>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_token", &"<redacted>")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("expires_at_unix", &self.expires_at_unix)
            .finish()
    }
}

/// What a token endpoint's answer means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshVerdict {
    Renewed(Credentials),
    /// The endpoint is down or throttling: try the refresh again later; the
    /// deliveries waiting on it are retried, not failed.
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// The grant is dead (revoked, the user must log in again): park the
    /// link. For a partner-wide token herald treats it as
    /// [`RefreshVerdict::Misconfigured`]: there is no user to blame.
    Park {
        reason: String,
    },
    /// herald's own client is refused (`invalid_client`,
    /// `unauthorized_client`, a wrong secret): retry later and alert
    /// on-call; the user's grant may be fine.
    Misconfigured {
        after: Option<Duration>,
        reason: String,
    },
}
