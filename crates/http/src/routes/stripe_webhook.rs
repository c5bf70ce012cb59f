//! `POST /api/stripe/webhook`: Stripe's deliveries. The signature is verified on the raw
//! body before anything is parsed; every event id is handled at most once; the ledger's own
//! rules make repeated or out-of-order deliveries harmless (a recharge completes once; an
//! `expired` after `completed` finds nothing pending).

use actix_web::{web, HttpRequest, HttpResponse};
use credit_domain::{CreditCommand, LedgerError, UserId};
use credit_store::ExecuteError;
use credit_stripe::{EventData, WebhookEvent};
use secrecy::ExposeSecret;
use serde_json::json;

use crate::error::ApiError;
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
    let event = credit_stripe::parse_event(&body)
        .map_err(|e| ApiError::bad_request("invalid_payload", e.to_string()))?;

    let client = state.read().await?;
    let seen = client
        .query_opt(
            "SELECT outcome FROM stripe_events WHERE id = $1",
            &[&event.id],
        )
        .await?;
    if let Some(row) = seen {
        let outcome: String = row.get(0);
        metrics::counter!("stripe_webhook_events_total", "type" => event.event_type.clone(), "outcome" => "duplicate").increment(1);
        return Ok(HttpResponse::Ok()
            .json(json!({ "received": true, "duplicate": true, "outcome": outcome })));
    }
    drop(client);

    let outcome = handle(&state, &event).await?;
    tracing::info!(stripe.event_id = %event.id, stripe.event_type = %event.event_type, outcome, "stripe event handled");
    metrics::counter!("stripe_webhook_events_total", "type" => event.event_type.clone(), "outcome" => outcome.to_string()).increment(1);
    let client = state.read().await?;
    client
        .execute(
            "INSERT INTO stripe_events (id, event_type, outcome) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO NOTHING",
            &[&event.id, &event.event_type, &outcome],
        )
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "received": true, "outcome": outcome })))
}

/// Runs the event's command; returns a short outcome for the log and the dedup table.
/// A refusal that means "already done" is a normal outcome; a mismatch is an error (422), so
/// it shows as failed in Stripe's dashboard, and nothing is written.
async fn handle(state: &AppState, event: &WebhookEvent) -> Result<&'static str, ApiError> {
    let meta = std::collections::HashMap::from([("stripe_event_id".to_owned(), event.id.clone())]);
    match (&event.data, event.event_type.as_str()) {
        (EventData::CheckoutSession(session), kind) => {
            let Some((user, recharge_id)) = recharge_of(state, session).await? else {
                return Ok("ignored_unknown_recharge");
            };
            let command = match kind {
                "checkout.session.completed" if session.payment_status != "paid" => {
                    return Ok("awaiting_async_payment");
                }
                "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
                    CreditCommand::CompleteRecharge {
                        recharge_id,
                        amount_fen: session.amount_total.unwrap_or(-1),
                        currency: session.currency.clone().unwrap_or_default(),
                        payment_id: session
                            .payment_intent
                            .clone()
                            .unwrap_or_else(|| session.session_id.clone()),
                    }
                }
                "checkout.session.async_payment_failed" => CreditCommand::FailRecharge {
                    recharge_id,
                    reason: "async payment failed".to_owned(),
                },
                "checkout.session.expired" => CreditCommand::CancelRecharge { recharge_id },
                _ => return Ok("ignored_event_type"),
            };
            run(state, &user, command, meta).await
        }
        (EventData::ChargeRefunded(charge), _) => {
            let from_metadata = match (
                charge.metadata.get("user_id"),
                charge.metadata.get("recharge_id"),
            ) {
                (Some(u), Some(r)) => UserId::parse(u).ok().map(|u| (u, r.clone())),
                _ => None,
            };
            let found = match from_metadata {
                Some(found) => Some(found),
                None => recharge_by_payment(state, charge.payment_intent.as_deref()).await?,
            };
            let Some((user, recharge_id)) = found else {
                return Ok("ignored_unknown_charge");
            };
            let command = CreditCommand::ReverseRecharge {
                recharge_id,
                reversed_fen: charge.amount_refunded,
                reason: "refunded at Stripe".to_owned(),
                reference: event.id.clone(),
            };
            run(state, &user, command, meta).await
        }
        (EventData::DisputeCreated(dispute), _) => {
            let Some((user, recharge_id)) =
                recharge_by_payment(state, dispute.payment_intent.as_deref()).await?
            else {
                return Ok("ignored_unknown_charge");
            };
            let command = CreditCommand::ReverseRecharge {
                recharge_id,
                reversed_fen: dispute.amount,
                reason: "disputed at Stripe".to_owned(),
                reference: dispute.dispute_id.clone(),
            };
            run(state, &user, command, meta).await
        }
        (EventData::Other, _) => Ok("ignored_event_type"),
    }
}

async fn run(
    state: &AppState,
    user: &UserId,
    command: CreditCommand,
    meta: std::collections::HashMap<String, String>,
) -> Result<&'static str, ApiError> {
    match state.ledger.execute(user, command, meta).await {
        Ok(_) => Ok("applied"),
        Err(ExecuteError::Rejected(refused)) => match refused {
            LedgerError::RechargeAlreadyCompleted { .. } => Ok("already_completed"),
            LedgerError::RechargeNotPending { .. } => Ok("not_pending"),
            LedgerError::NothingToReverse { .. } => Ok("already_reversed"),
            LedgerError::RechargeNotCompleted { .. } => Ok("not_completed"),
            LedgerError::UnknownRecharge { .. } => Ok("ignored_unknown_recharge"),
            other => {
                tracing::error!(error = %other, account.id = %user, "stripe event refused by the ledger");
                Err(other.into())
            }
        },
        Err(e) => Err(e.into()),
    }
}

/// The account and recharge a checkout session belongs to: from its metadata, else from the
/// recharge records.
async fn recharge_of(
    state: &AppState,
    session: &credit_stripe::SessionInfo,
) -> Result<Option<(UserId, String)>, ApiError> {
    let Some(recharge_id) = session
        .client_reference_id
        .clone()
        .or_else(|| session.recharge_id.clone())
    else {
        return Ok(None);
    };
    if let Some(user) = session
        .user_id
        .as_deref()
        .and_then(|u| UserId::parse(u).ok())
    {
        return Ok(Some((user, recharge_id)));
    }
    let client = state.read().await?;
    let row = client
        .query_opt(
            "SELECT user_id FROM recharge_records WHERE id = $1",
            &[&recharge_id],
        )
        .await?;
    Ok(row
        .and_then(|r| UserId::parse(&r.get::<_, String>(0)).ok())
        .map(|u| (u, recharge_id)))
}

/// The recharge a Stripe payment intent paid for: from the read table, or, when the
/// projection has not caught up yet, from the journal itself (indexed).
async fn recharge_by_payment(
    state: &AppState,
    payment_intent: Option<&str>,
) -> Result<Option<(UserId, String)>, ApiError> {
    let Some(pi) = payment_intent else {
        return Ok(None);
    };
    let client = state.read().await?;
    let mut row = client
        .query_opt(
            "SELECT user_id, id FROM recharge_records WHERE payment_id = $1 LIMIT 1",
            &[&pi],
        )
        .await?;
    if row.is_none() {
        row = client
            .query_opt(
                "SELECT aggregate_id, payload -> 'RechargeCompleted' ->> 'recharge_id'
                   FROM events
                  WHERE event_type = 'RechargeCompleted'
                    AND payload -> 'RechargeCompleted' ->> 'payment_id' = $1
                  LIMIT 1",
                &[&pi],
            )
            .await?;
    }
    Ok(row.and_then(|r| {
        UserId::parse(&r.get::<_, String>(0))
            .ok()
            .map(|u| (u, r.get::<_, String>(1)))
    }))
}
