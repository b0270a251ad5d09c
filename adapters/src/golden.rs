//! The golden form of an [`OutboundRequest`]: what `fixtures/<platform>/*.json`
//! hold and what the golden tests compare byte for byte.
//!
//! `{"method", "url", "headers": [[name, value]...], "body"}`, indented. A
//! JSON body is embedded as its exact bytes (only indented); any other body
//! (form-encoded) is a JSON string, and a form body is also shown decoded
//! under `form` for the reader (the string stays the bytes that go out).
//! Header order is kept: it is what goes out.

use serde::Serialize;
use serde_json::value::RawValue;

use crate::{json, Method, OutboundRequest};

#[derive(Serialize)]
struct Golden<'a> {
    method: &'a str,
    url: &'a str,
    headers: &'a [(String, String)],
    body: Body<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    form: Option<Vec<(String, String)>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Body<'a> {
    Json(&'a RawValue),
    Text(String),
}

/// Renders `request` in its golden form.
pub fn render(request: &OutboundRequest) -> String {
    let text = String::from_utf8_lossy(&request.body);
    let is_json = request
        .headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("content-type") && v.starts_with("application/json"));
    // Only a compact body can be indented and still read back to its bytes.
    let raw: Option<Box<RawValue>> = if is_json && json::compact(&text) == text {
        serde_json::from_str::<Box<RawValue>>(&text).ok()
    } else {
        None
    };
    let body = match &raw {
        Some(raw) => Body::Json(raw),
        None => Body::Text(text.into_owned()),
    };
    let is_form = request.headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("content-type") && v.starts_with("application/x-www-form-urlencoded")
    });
    let form = is_form.then(|| {
        form_urlencoded::parse(&request.body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    });
    let golden = Golden {
        method: match request.method {
            Method::Post => "POST",
            Method::Put => "PUT",
        },
        url: &request.url,
        headers: &request.headers,
        body,
        form,
    };
    // Serializing strings and a RawValue cannot fail.
    let compact = serde_json::to_string(&golden).unwrap_or_default();
    let mut out = json::indent(&compact);
    out.push('\n');
    out
}
