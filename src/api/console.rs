//! The on-call console: one static page, its script and its style sheet,
//! embedded in the binary and served at `/console`.
//!
//! The page holds no data and needs no token to load: everything it shows
//! it reads from the public API with the operator token the engineer signs
//! in with (kept in the tab's session storage, sent as a bearer header), so
//! anything it shows a script can get too. Nothing is fetched from anywhere
//! but herald itself, and the Content-Security-Policy says so to the
//! browser: no inline script or style, no other origin, no framing. The
//! script builds every element from data with `textContent`, so a payload
//! holding markup shows as text.

use axum::extract::Path;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::problem::Problem;

const INDEX_HTML: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const CONSOLE_CSS: &str = include_str!("console/console.css");
const ICON_SVG: &str = include_str!("console/icon.svg");

/// Only herald's own assets and API; no inline code, no frames, no plugins.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; font-src 'none'; \
     object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// `GET /console`: the page.
pub async fn page() -> Response {
    served(INDEX_HTML, "text/html; charset=utf-8")
}

/// `GET /console/{asset}`: the page's script, style sheet and icon.
pub async fn asset(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "app.js" => served(APP_JS, "text/javascript; charset=utf-8"),
        "console.css" => served(CONSOLE_CSS, "text/css; charset=utf-8"),
        "icon.svg" => served(ICON_SVG, "image/svg+xml"),
        _ => Problem::not_found(format!(
            "the console has no asset {name:?} (it has app.js, console.css, icon.svg)"
        ))
        .into_response(),
    }
}

fn served(body: &'static str, content_type: &'static str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        // A new binary brings new assets: the browser asks again each time.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ),
    ];
    (StatusCode::OK, headers, body).into_response()
}
