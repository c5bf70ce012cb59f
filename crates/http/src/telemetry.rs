//! Request spans. Like tracing-actix-web's default, but the query string is never recorded:
//! Grsai's callback URL carries the per-task token there, and tokens are never logged.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::{Error, HttpMessage};
use tracing::Span;
use tracing_actix_web::{RequestId, RootSpanBuilder};

pub struct RedactingSpans;

impl RootSpanBuilder for RedactingSpans {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let request_id = request
            .extensions()
            .get::<RequestId>()
            .map(|id| id.to_string())
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
