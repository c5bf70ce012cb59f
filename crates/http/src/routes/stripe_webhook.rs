//! `POST /api/stripe/webhook`: Stripe's deliveries. The signature is verified on the raw
//! body before anything is parsed; what the event does is `flows::stripe`'s business.

use actix_web::{web, HttpRequest, HttpResponse};
use secrecy::ExposeSecret;
use serde_json::json;

use crate::error::ApiError;
use crate::flows::stripe::Receipt;
use crate::state::AppState;

const TOLERANCE_SECS: i64 = 300;
const MAX_BODY: usize = 256 * 1024;

pub async fn receive(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let Some(secret) = &state.config.stripe_webhook_secret else {
        return Err(ApiError::not_found(
            "the Stripe webhook is not configured (STRIPE_WEBHOOK_SECRET unset)",
        ));
    };
    let body = crate::body::read_limited(payload, MAX_BODY).await?;
    let header = req
        .headers()
        .get("Stripe-Signature")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::bad_request("invalid_signature", "Stripe-Signature header missing")
        })?;
    let now = chrono::Utc::now().timestamp();
    credit_stripe::verify_signature(&body, header, secret.expose_secret(), TOLERANCE_SECS, now)
        .map_err(|e| match e {
            credit_stripe::SignatureError::Stale { .. } => {
                ApiError::bad_request("stale_signature", e.to_string())
            }
            _ => ApiError::bad_request("invalid_signature", e.to_string()),
        })?;
    crate::body::reject_nul_in(&body).map_err(|_| {
        ApiError::bad_request("invalid_payload", "the event contains a NUL character")
    })?;
    let event = credit_stripe::parse_event(&body)
        .map_err(|e| ApiError::bad_request("invalid_payload", e.to_string()))?;

    let receipt = crate::flows::stripe::receive(&state, &event).await?;
    let counted = match &receipt {
        Receipt::Handled(outcome) => outcome.as_str(),
        Receipt::Duplicate(_) => "duplicate",
    };
    metrics::counter!("stripe_webhook_events_total", "type" => event.event_type.clone(), "outcome" => counted)
        .increment(1);
    match receipt {
        Receipt::Handled(outcome) => {
            Ok(HttpResponse::Ok().json(json!({ "received": true, "outcome": outcome })))
        }
        Receipt::Duplicate(outcome) => Ok(HttpResponse::Ok()
            .json(json!({ "received": true, "duplicate": true, "outcome": outcome }))),
    }
}
