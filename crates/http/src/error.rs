//! The one HTTP error type. Every error answers
//! `{"error": {"code": "snake_case", "message": "…", "request_id": "…", …extra}}`; internals never leak: the
//! cause is logged once, here, and the client sees a stable code.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use credit_domain::LedgerError;
use credit_store::ExecuteError;
use serde_json::{json, Map, Value};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub extra: Map<String, Value>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    /// 400: the request is malformed (JSON, types, fields).
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 422: well-formed, but the values are not acceptable.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// 401: missing or wrong credentials.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 502: an outside provider failed.
    pub fn provider(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "provider_error", message)
    }

    /// 503: no database connection could be had within the pool's wait (all held by slow
    /// queries, or the database down or restarting). Nothing was done: the client may retry.
    pub fn database_unavailable(cause: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "database unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the database is unavailable or overloaded; nothing was done, retry shortly",
        )
    }

    /// 500: our own failure (database). The cause is logged, never sent.
    /// A write whose connection broke after it was sent, the journal unreadable since: it
    /// may or may not have been done. The same request with the same `Idempotency-Key`
    /// finds out (a done command is answered as the repeat it then is).
    pub fn outcome_unknown(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "a write's outcome is unknown");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "outcome_unknown",
            "the database stopped answering while this request was being recorded; it may or \
             may not have been done: send it again with the same Idempotency-Key to find out",
        )
    }

    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the service failed to complete the request; it has been logged",
        )
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        self.response(None)
    }
}

impl ApiError {
    /// The answer, with the request's id in the body when it is known (the request-id
    /// middleware rebuilds every error answer with it).
    pub fn response(&self, request_id: Option<&str>) -> HttpResponse {
        let mut body = Map::new();
        body.insert("code".into(), json!(self.code));
        body.insert("message".into(), json!(self.message));
        for (k, v) in &self.extra {
            body.insert(k.clone(), v.clone());
        }
        if let Some(id) = request_id {
            body.insert("request_id".into(), json!(id));
        }
        let mut answer = HttpResponse::build(self.status);
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Every 503 here is worth retrying soon (the database back, the account calmer).
            answer.insert_header((actix_web::http::header::RETRY_AFTER, "1"));
        }
        answer.json(json!({ "error": body }))
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        // A store call that could get no connection (e.g. the projector's catch-up before a
        // read) is the same 503 as below, however deep the pool error is wrapped.
        let no_connection = e.chain().any(|cause| {
            matches!(
                cause.downcast_ref::<deadpool_postgres::PoolError>(),
                Some(
                    deadpool_postgres::PoolError::Timeout(_)
                        | deadpool_postgres::PoolError::Backend(_)
                )
            )
        });
        if no_connection {
            return Self::database_unavailable(format!("{e:#}"));
        }
        Self::internal(format!("{e:#}"))
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::PoolError as E;
        match e {
            // No connection within the pool's wait (every one held by slow queries), or none
            // could be opened (the database is down or restarting). Nothing was done yet: the
            // client may retry, so say so instead of a 500 (crates/http/tests/faults.rs).
            E::Timeout(_) | E::Backend(_) => Self::database_unavailable(e),
            other => Self::internal(other),
        }
    }
}

impl ApiError {
    /// A read-side failure: the database going away is `database_unavailable` (503, nothing
    /// was done), anything else a 500.
    pub fn from_store(e: anyhow::Error) -> Self {
        match e.downcast::<tokio_postgres::Error>() {
            Ok(db) if db.is_closed() || db.as_db_error().is_none() => {
                tracing::warn!(error = %db, "database unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "the database is unavailable or overloaded; nothing was done, retry shortly",
                )
            }
            Ok(db) => Self::internal(db),
            Err(other) => Self::internal(format!("{other:#}")),
        }
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::internal(e)
    }
}

/// A refusal of the ledger, as the client sees it.
impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        let status = match &e {
            LedgerError::InsufficientCredits { .. } => StatusCode::PAYMENT_REQUIRED,
            LedgerError::RechargeExists { .. }
            | LedgerError::RechargeAlreadyCompleted { .. }
            | LedgerError::RechargeNotPending { .. }
            | LedgerError::TaskAlreadyCharged { .. }
            | LedgerError::TaskAlreadySettled { .. }
            | LedgerError::TaskAlreadySubmitted { .. }
            | LedgerError::AdjustmentExists { .. }
            | LedgerError::AlreadyRecorded { .. }
            | LedgerError::StaleProgress { .. } => StatusCode::CONFLICT,
            LedgerError::ControlCharacters { .. } => StatusCode::BAD_REQUEST,
            LedgerError::UnknownRecharge { .. } | LedgerError::UnknownTask { .. } => {
                StatusCode::NOT_FOUND
            }
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        let mut err = ApiError::new(status, e.code(), e.to_string());
        if let LedgerError::InsufficientCredits {
            required,
            available,
        } = e
        {
            err = err.with("required", required).with("credits", available);
        }
        err
    }
}

impl From<ExecuteError> for ApiError {
    fn from(e: ExecuteError) -> Self {
        match e {
            ExecuteError::Rejected(refused) => refused.into(),
            ExecuteError::Contended(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "account_busy",
                "too many concurrent requests for this account; retry shortly",
            ),
            ExecuteError::Unavailable(cause) => ApiError::database_unavailable(cause),
            ExecuteError::Unknown(cause) => ApiError::outcome_unknown(cause),
            ExecuteError::Store(cause) => ApiError::internal(cause),
        }
    }
}

/// An `Idempotency-Key` reused with a different request.
pub fn idempotency_conflict() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_conflict",
        "this Idempotency-Key was used before with a different request",
    )
}

/// JSON, query and path extractor failures become 400s with our error shape.
pub fn json_error(err: actix_web::error::JsonPayloadError) -> ApiError {
    use actix_web::error::JsonPayloadError as E;
    match err {
        E::OverflowKnownLength { .. } | E::Overflow { .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is too large",
        ),
        E::ContentType => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be JSON (Content-Type: application/json)",
        ),
        E::Deserialize(e) if e.is_data() => ApiError::bad_request("invalid_body", e.to_string()),
        E::Deserialize(e) => ApiError::bad_request("malformed_json", e.to_string()),
        other => ApiError::bad_request("malformed_json", other.to_string()),
    }
}

pub fn query_error(err: actix_web::error::QueryPayloadError) -> ApiError {
    ApiError::bad_request("invalid_query", err.to_string())
}

pub fn path_error(err: actix_web::error::PathError) -> ApiError {
    ApiError::bad_request("invalid_path", err.to_string())
}
