//! OAuth 2.0 token endpoint requests and answers (RFC 6749 §5, §6), shared by
//! the adapters whose platforms speak plain OAuth2.

use std::time::SystemTime;

use serde::Deserialize;

use crate::{
    retry_after, snippet, Answer, BuildError, Credentials, LinkView, Method, OutboundRequest,
    PartnerSettings, RefreshVerdict, SetupError, Verdict,
};

/// A platform partner's OAuth client (`client_id_env`, `client_secret_env`):
/// what refreshes a link's user token on the platforms that use the plain
/// RFC 6749 `refresh_token` grant.
pub struct OAuthClient {
    id: Option<String>,
    secret: Option<String>,
}

/// Checks at setup that a platform whose links herald refreshes has its
/// OAuth client: without one the first expired token would dead-letter the
/// link's events at 3 a.m. instead of failing the config at start.
pub fn require_client(
    settings: &PartnerSettings,
    platform: &str,
    secret_too: bool,
) -> Result<(), SetupError> {
    if settings.client_id.is_none() {
        return Err(SetupError {
            key: "client_id_env",
            reason: format!(
                "a {platform} partner needs its OAuth client id to refresh link tokens"
            ),
        });
    }
    if secret_too && settings.client_secret.is_none() {
        return Err(SetupError {
            key: "client_secret_env",
            reason: format!(
                "a {platform} partner needs its OAuth client secret to refresh link tokens"
            ),
        });
    }
    Ok(())
}

impl OAuthClient {
    pub fn of(settings: &PartnerSettings) -> OAuthClient {
        OAuthClient {
            id: settings.client_id.clone(),
            secret: settings.client_secret.clone(),
        }
    }

    /// The refresh request for one link, at its own `token_url` or else the
    /// partner's.
    pub fn refresh(
        &self,
        platform: &str,
        link: &LinkView<'_>,
        partner_token_url: Option<&str>,
        refresh_token: &str,
    ) -> Result<Option<OutboundRequest>, BuildError> {
        let url = link
            .token_url
            .or(partner_token_url)
            .ok_or_else(|| BuildError(format!("the {platform} link has no token_url")))?;
        let id = self.id.as_deref().ok_or_else(|| {
            BuildError(format!(
                "the {platform} partner has no OAuth client (client_id_env)"
            ))
        })?;
        Ok(Some(refresh_form(
            url,
            refresh_token,
            id,
            self.secret.as_deref(),
        )))
    }
}

/// `grant_type=refresh_token`, form-encoded, client credentials in the body
/// (RFC 6749 §2.3.1 allows both; the body form is what Kakao and LWA document).
pub fn refresh_form(
    token_url: &str,
    refresh_token: &str,
    client_id: &str,
    client_secret: Option<&str>,
) -> OutboundRequest {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", "refresh_token");
    form.append_pair("refresh_token", refresh_token);
    form.append_pair("client_id", client_id);
    if let Some(secret) = client_secret {
        form.append_pair("client_secret", secret);
    }
    form_post(token_url, form.finish())
}

/// `grant_type=client_credentials` (RFC 6749 §4.4).
pub fn client_credentials_form(
    token_url: &str,
    client_id: &str,
    client_secret: &str,
) -> OutboundRequest {
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "client_credentials")
        .append_pair("client_id", client_id)
        .append_pair("client_secret", client_secret)
        .finish();
    form_post(token_url, body)
}

pub fn form_post(url: &str, body: String) -> OutboundRequest {
    OutboundRequest {
        method: Method::Post,
        url: url.to_string(),
        headers: vec![(
            "content-type".into(),
            "application/x-www-form-urlencoded".into(),
        )],
        body: body.into_bytes(),
    }
}

#[derive(Deserialize)]
struct TokenBody {
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<u64>,
    error: Option<String>,
    error_description: Option<String>,
    /// Kakao's own code beside the RFC one (`KOE322`).
    error_code: Option<String>,
}

/// Reads an RFC 6749 token answer. The verdict table, by `error` (RFC 6749
/// §5.2, <https://www.rfc-editor.org/rfc/rfc6749#section-5.2>; Login with
/// Amazon and Kakao answer with the same codes, Kakao adding its own
/// `error_code`):
///
/// | answer | verdict | why |
/// |---|---|---|
/// | 2xx with `access_token` | renewed | §5.1 |
/// | `invalid_grant` (Kakao KOE322, KOE320) | park | the user's grant is dead: revoked, expired, or refreshed by someone else |
/// | `invalid_client`, `unauthorized_client` (LWA 401 `invalid_client`, Kakao KOE010, KOE101) | misconfigured | herald's OAuth client or secret is refused: every user's refresh would fail alike |
/// | `invalid_request`, `unsupported_grant_type`, `invalid_scope`, any other `error` | misconfigured | herald built a request the endpoint does not take: a setup or herald fault, not the user's |
/// | 429, 5xx (with Retry-After) | retry | the endpoint is throttling or down |
/// | anything else (a proxy's page, a 2xx without a token) | retry | not a verdict on the grant, so one garbled answer parks no link |
///
/// Only `invalid_grant` parks: it is the one answer about the user.
pub fn read_token_answer(answer: &Answer<'_>, now: SystemTime) -> RefreshVerdict {
    let (status, headers, body) = match *answer {
        Answer::Http {
            status,
            headers,
            body,
        } => (status, headers, body),
        Answer::Timeout => {
            return RefreshVerdict::Retry {
                after: None,
                reason: "token endpoint timed out".into(),
            }
        }
        Answer::Network(e) => {
            return RefreshVerdict::Retry {
                after: None,
                reason: format!("token endpoint unreachable: {e}"),
            }
        }
    };
    if status == 429 || status >= 500 {
        return RefreshVerdict::Retry {
            after: retry_after::from_headers(headers, now),
            reason: format!("token endpoint HTTP {status}: {}", snippet(body)),
        };
    }
    let parsed: Option<TokenBody> = serde_json::from_slice(body).ok();
    match parsed {
        Some(TokenBody {
            access_token: Some(access_token),
            refresh_token,
            expires_in,
            ..
        }) if (200..300).contains(&status) => RefreshVerdict::Renewed(Credentials {
            access_token,
            refresh_token,
            expires_at_unix: expires_in.map(|s| unix(now) + s),
        }),
        Some(TokenBody {
            error: Some(error),
            error_description,
            error_code,
            ..
        }) => {
            let reason = format!(
                "token endpoint HTTP {status}: {}{error}{}",
                error_code.map(|c| format!("{c} ")).unwrap_or_default(),
                error_description
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            );
            if error == "invalid_grant" {
                RefreshVerdict::Park { reason }
            } else {
                RefreshVerdict::Misconfigured {
                    after: retry_after::from_headers(headers, now),
                    reason,
                }
            }
        }
        _ => RefreshVerdict::Retry {
            after: None,
            reason: format!(
                "token endpoint HTTP {status} without a token or an error: {}",
                snippet(body)
            ),
        },
    }
}

/// How partners on plain OAuth2 bearer tokens answer: 2xx delivered; 401 the
/// token expired (refresh); 403 and 410 the user revoked us or removed the
/// device (park); 408, 429 and 5xx retried; other statuses permanent.
pub fn classify_bearer(answer: &Answer<'_>, now: SystemTime) -> Verdict {
    match *answer {
        Answer::Http {
            status: 401, body, ..
        } => Verdict::Refresh {
            reason: format!("HTTP 401: {}", snippet(body)),
        },
        Answer::Http {
            status: 403, body, ..
        } => Verdict::Park {
            reason: format!("HTTP 403: {}", snippet(body)),
        },
        _ => crate::classify_http(answer, now),
    }
}

pub fn unix(now: SystemTime) -> u64 {
    now.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// [`required`] for [`crate::Adapter::check_link`]: the same message, with
/// the link field at fault as the key.
pub fn require_link_field(
    value: Option<&str>,
    key: &'static str,
    what: &str,
    platform: &str,
) -> Result<(), SetupError> {
    required(value, what, platform)
        .map(|_| ())
        .map_err(|e| SetupError { key, reason: e.0 })
}

/// The value of a link field an adapter cannot do without.
pub fn required<'a>(
    value: Option<&'a str>,
    what: &str,
    platform: &str,
) -> Result<&'a str, BuildError> {
    value
        .filter(|v| !v.is_empty())
        .ok_or_else(|| BuildError(format!("the {platform} link has no {what}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn read(status: u16, body: &str) -> RefreshVerdict {
        read_token_answer(
            &Answer::Http {
                status,
                headers: &[],
                body: body.as_bytes(),
            },
            SystemTime::UNIX_EPOCH + Duration::from_secs(1000),
        )
    }

    #[test]
    fn reads_rotated_tokens_and_expiry() {
        assert_eq!(
            read(
                200,
                r#"{"access_token":"a","refresh_token":"r","expires_in":3600}"#
            ),
            RefreshVerdict::Renewed(Credentials {
                access_token: "a".into(),
                refresh_token: Some("r".into()),
                expires_at_unix: Some(4600),
            })
        );
    }

    #[test]
    fn dead_grants_park_and_outages_retry() {
        assert!(matches!(
            read(400, r#"{"error":"invalid_grant"}"#),
            RefreshVerdict::Park { .. }
        ));
        // RFC 6749 §5.2: the client, not the user, is refused.
        for client_fault in [
            r#"{"error":"invalid_client","error_description":"Client authentication failed"}"#,
            r#"{"error":"unauthorized_client"}"#,
            r#"{"error":"invalid_client","error_description":"Bad client credentials","error_code":"KOE010"}"#,
            r#"{"error":"invalid_request"}"#,
        ] {
            assert!(
                matches!(
                    read(401, client_fault),
                    RefreshVerdict::Misconfigured { .. }
                ),
                "{client_fault}"
            );
        }
        assert!(matches!(read(503, "down"), RefreshVerdict::Retry { .. }));
        assert!(matches!(read(200, "{}"), RefreshVerdict::Retry { .. }));
        assert!(matches!(
            read(403, "<html>denied</html>"),
            RefreshVerdict::Retry { .. }
        ));
    }

    #[test]
    fn refresh_form_encodes_secrets() {
        let req = refresh_form("https://t/x", "r/+=", "id", Some("s&"));
        assert_eq!(
            String::from_utf8(req.body).unwrap(),
            "grant_type=refresh_token&refresh_token=r%2F%2B%3D&client_id=id&client_secret=s%26"
        );
    }
}
