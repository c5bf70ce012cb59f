//! Request ids and request spans.
//!
//! Every request has an id: the caller's `X-Request-Id` when it is a sane one (a proxy or
//! the front end may have made it, and one id across hops is the point), otherwise a new
//! UUID. It is returned in the `X-Request-Id` response header and in every error body, and
//! recorded in the request's span and in the metadata of the events it appends.
//!
//! The span is like tracing-actix-web's default, but the query string is never recorded:
//! Grsai's callback URL carries the per-task token there, and tokens are never logged.

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use actix_web::middleware::Next;
use actix_web::{Error, HttpMessage, HttpRequest};
use tracing::Span;
use tracing_actix_web::RootSpanBuilder;

use crate::error::ApiError;

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The id of the request being served (in the request's extensions).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The current request's id, if the middleware gave it one.
pub fn request_id(req: &HttpRequest) -> Option<String> {
    req.extensions().get::<RequestId>().map(|id| id.0.clone())
}

/// An incoming id is kept when it is 1 to 128 characters of `A-Z a-z 0-9 - _ . : /`, so
/// it cannot forge log lines or carry anything but an identifier.
fn acceptable(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'))
}

/// Middleware (outermost): gives the request its id, and the response the header; an
/// [`ApiError`] answer is rebuilt with `request_id` in its body.
pub async fn request_ids(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let id = req
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| acceptable(v))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    req.extensions_mut().insert(RequestId(id.clone()));
    // Handlers' and extractors' errors arrive as answers; an `Err` comes only from inner
    // middleware refusing (CORS) and is answered by actix as it is.
    let mut res = next.call(req).await?.map_into_boxed_body();
    let rebuilt = res
        .response()
        .error()
        .and_then(|e| e.as_error::<ApiError>())
        .map(|api| api.response(Some(&id)));
    if let Some(mut rebuilt) = rebuilt {
        // Keep what inner middleware added (CORS headers, ...), not the old body's framing.
        for (name, value) in res.headers() {
            if name != CONTENT_TYPE && name != CONTENT_LENGTH {
                rebuilt.headers_mut().append(name.clone(), value.clone());
            }
        }
        res = res.into_response(rebuilt);
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    Ok(res)
}

pub struct RedactingSpans;

impl RootSpanBuilder for RedactingSpans {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let request_id = request
            .extensions()
            .get::<RequestId>()
            .map(|id| id.0.clone())
            .unwrap_or_default();
        tracing::info_span!(
            "http",
            http.method = %request.method(),
            http.path = %request.path(),
            request_id = %request_id,
            http.status_code = tracing::field::Empty,
            error.code = tracing::field::Empty,
        )
    }

    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, Error>) {
        match outcome {
            Ok(response) => {
                let status = response.response().status();
                span.record("http.status_code", status.as_u16());
                if let Some(error) = response.response().error() {
                    span.record("error.code", tracing::field::display(error));
                    if status.is_server_error() {
                        span.in_scope(|| tracing::error!(error = %error, "request failed"));
                    }
                }
            }
            Err(error) => {
                let status = error.as_response_error().status_code();
                span.record("http.status_code", status.as_u16());
                span.in_scope(|| tracing::warn!(error = %error, "request error"));
            }
        }
    }
}
