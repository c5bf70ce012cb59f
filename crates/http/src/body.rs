//! `Body<T>`: a JSON request body that must be an object. serde's derive would otherwise
//! accept an array for a struct (`[10]` as `{"amount": 10}`); clients must name their fields.

use actix_web::{web, FromRequest, HttpRequest};
use futures::future::LocalBoxFuture;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

pub struct Body<T>(pub T);

impl<T> Body<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for Body<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: DeserializeOwned + 'static> FromRequest for Body<T> {
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        // Size, content type and syntax errors are mapped by the app's `JsonConfig`.
        let json = web::Json::<serde_json::Value>::from_request(req, payload);
        Box::pin(async move {
            let web::Json(value) = json.await?;
            if !value.is_object() {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    "the body must be a JSON object",
                )
                .into());
            }
            if let Some(field) = control_characters(&value, "") {
                return Err(ApiError::bad_request(
                    "control_characters",
                    format!(
                        "{field} contains a control character (only tab, line feed and carriage return are allowed)"
                    ),
                )
                .into());
            }
            serde_json::from_value(value)
                .map(Body)
                .map_err(|e| ApiError::bad_request("invalid_body", e.to_string()).into())
        })
    }
}

/// The first field (a dotted path) whose text holds a control character other than tab,
/// line feed or carriage return. PostgreSQL cannot store `\u0000` at all (the insert would
/// fail as a 500), and none of them belongs in a prompt, a reason or an id.
fn control_characters(value: &serde_json::Value, at: &str) -> Option<String> {
    let bad = |s: &str| {
        s.chars()
            .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    };
    let name = |key: &str| {
        if at.is_empty() {
            key.to_owned()
        } else {
            format!("{at}.{key}")
        }
    };
    match value {
        serde_json::Value::String(s) if bad(s) => Some(if at.is_empty() {
            "a value".to_owned()
        } else {
            at.to_owned()
        }),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| control_characters(v, &name(&i.to_string()))),
        serde_json::Value::Object(fields) => fields.iter().find_map(|(k, v)| {
            if bad(k) {
                Some("a field name".to_owned())
            } else {
                control_characters(v, &name(k))
            }
        }),
        _ => None,
    }
}

/// Reads a raw body (webhooks and callbacks, whose signature or shape is checked on the exact
/// bytes) up to `limit`, answering an oversized one with our JSON 413.
pub async fn read_limited(mut payload: web::Payload, limit: usize) -> Result<web::Bytes, ApiError> {
    use futures::StreamExt;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::new(
                actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request body is larger than {limit} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// PostgreSQL text and jsonb cannot hold the NUL character: a `\u0000` in any string that
/// reached the database would fail the statement (a 500 for the client's own bad input, found
/// by crates/http/tests/fuzz.rs). So a body with one is refused up front, before any effect.
pub fn reject_nul(value: &serde_json::Value) -> Result<(), ApiError> {
    use serde_json::Value;
    let found = match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => return items.iter().try_for_each(reject_nul),
        Value::Object(map) => {
            for (key, child) in map {
                if key.contains('\0') {
                    return Err(nul_refused());
                }
                reject_nul(child)?;
            }
            false
        }
        _ => false,
    };
    if found {
        return Err(nul_refused());
    }
    Ok(())
}

/// [`reject_nul`] on a raw body; a body that is not JSON passes, for its own parser to refuse
/// with its own message.
pub fn reject_nul_in(raw: &[u8]) -> Result<(), ApiError> {
    match serde_json::from_slice::<serde_json::Value>(raw) {
        Ok(value) => reject_nul(&value),
        Err(_) => Ok(()),
    }
}

fn nul_refused() -> ApiError {
    ApiError::bad_request(
        "invalid_body",
        "text may not contain the NUL character (\\u0000)",
    )
}
