//! A verified Stripe event, applied to the ledger. Every outcome is independent of delivery
//! order and repetition: the account records refunds and disputes as facts in any state of
//! the recharge and nets them when it completes (see docs/EVENTS.md). A reversal whose
//! payment cannot be tied to a recharge yet is refused with a 4xx, so Stripe redelivers it.

use std::collections::HashMap;

use actix_web::http::StatusCode;
use credit_domain::{LedgerError, UserId};
use credit_store::{queries, ExecuteError};
use credit_stripe::{EventData, LedgerAction, WebhookEvent};
use serde::Serialize;

use crate::error::ApiError;
use crate::state::AppState;

/// What one Stripe event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StripeOutcome {
    /// The ledger recorded it (and moved credits, if it says so).
    Applied,
    AlreadyCompleted,
    /// Expired or failed after the recharge was decided otherwise: nothing to do.
    NotPending,
    /// This refund total or dispute stage was recorded before (a repeat or a stale event).
    AlreadyRecorded,
    /// A completed session whose payment is still in flight.
    AwaitingAsyncPayment,
    /// A session that is not one of our recharges.
    IgnoredUnknownRecharge,
    IgnoredUnknownDisputeStatus,
    IgnoredEventType,
}

impl StripeOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::AlreadyCompleted => "already_completed",
            Self::NotPending => "not_pending",
            Self::AlreadyRecorded => "already_recorded",
            Self::AwaitingAsyncPayment => "awaiting_async_payment",
            Self::IgnoredUnknownRecharge => "ignored_unknown_recharge",
            Self::IgnoredUnknownDisputeStatus => "ignored_unknown_dispute_status",
            Self::IgnoredEventType => "ignored_event_type",
        }
    }
}

/// The answer to one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Receipt {
    Handled(StripeOutcome),
    /// This event id was handled before, with this outcome.
    Duplicate(String),
}

/// Handles one verified event, at most once per event id.
pub async fn receive(state: &AppState, event: &WebhookEvent) -> Result<Receipt, ApiError> {
    {
        let client = state.read().await?;
        if let Some(outcome) = queries::stripe_event_outcome(&client, &event.id).await? {
            return Ok(Receipt::Duplicate(outcome));
        }
    }
    let outcome = handle(state, event).await?;
    tracing::info!(
        stripe.event_id = %event.id,
        stripe.event_type = %event.event_type,
        outcome = outcome.as_str(),
        "stripe event handled"
    );
    let client = state.read().await?;
    queries::record_stripe_event(&client, &event.id, &event.event_type, outcome.as_str()).await?;
    Ok(Receipt::Handled(outcome))
}

/// Applies the event to the ledger, without the duplicate check (the simulators and the
/// reconciliation call this path too).
pub async fn handle(state: &AppState, event: &WebhookEvent) -> Result<StripeOutcome, ApiError> {
    let Some((user, recharge_id)) = recharge_for(state, event).await? else {
        return Ok(match &event.data {
            EventData::Other => StripeOutcome::IgnoredEventType,
            _ => StripeOutcome::IgnoredUnknownRecharge,
        });
    };
    let command = match credit_stripe::ledger_action(event, recharge_id) {
        LedgerAction::Command(command) => command,
        LedgerAction::AwaitingAsyncPayment => return Ok(StripeOutcome::AwaitingAsyncPayment),
        LedgerAction::UnknownDisputeStatus => {
            tracing::warn!(stripe.event_id = %event.id, "dispute with an unknown status; ignored");
            return Ok(StripeOutcome::IgnoredUnknownDisputeStatus);
        }
        LedgerAction::Ignored => return Ok(StripeOutcome::IgnoredEventType),
    };
    let meta = HashMap::from([("stripe_event_id".to_owned(), event.id.clone())]);
    match state.ledger.execute(&user, command, meta).await {
        Ok(_) => Ok(StripeOutcome::Applied),
        Err(ExecuteError::Rejected(refused)) => match refused {
            LedgerError::RechargeAlreadyCompleted { .. } => Ok(StripeOutcome::AlreadyCompleted),
            LedgerError::RechargeNotPending { .. } => Ok(StripeOutcome::NotPending),
            LedgerError::AlreadyRecorded { .. } => Ok(StripeOutcome::AlreadyRecorded),
            LedgerError::UnknownRecharge { .. } => Ok(StripeOutcome::IgnoredUnknownRecharge),
            other => {
                tracing::error!(error = %other, account.id = %user, "stripe event refused by the ledger");
                Err(other.into())
            }
        },
        Err(e) => Err(e.into()),
    }
}

/// The account and recharge an event concerns. A checkout session names them (metadata);
/// a refund's charge carries the same metadata; a dispute names only the payment, known
/// once the recharge completed. A refund or dispute whose payment is not known yet is
/// refused with 409 `payment_not_yet_known`, so Stripe redelivers it after the completion
/// (or the reconciliation) has recorded the payment.
async fn recharge_for(
    state: &AppState,
    event: &WebhookEvent,
) -> Result<Option<(UserId, String)>, ApiError> {
    let (metadata_user, metadata_recharge, payment) = match &event.data {
        EventData::CheckoutSession(session) => (
            session.user_id.clone(),
            session
                .client_reference_id
                .clone()
                .or_else(|| session.recharge_id.clone()),
            None,
        ),
        EventData::ChargeRefunded(charge) => (
            charge.metadata.get("user_id").cloned(),
            charge.metadata.get("recharge_id").cloned(),
            charge.payment_intent.clone(),
        ),
        EventData::Dispute(dispute) => (None, None, dispute.payment_intent.clone()),
        EventData::Other => return Ok(None),
    };
    if let (Some(user), Some(recharge)) = (&metadata_user, &metadata_recharge) {
        if let Ok(user) = UserId::parse(user) {
            return Ok(Some((user, recharge.clone())));
        }
    }
    let client = state.read().await?;
    if let EventData::CheckoutSession(_) = &event.data {
        let Some(recharge_id) = metadata_recharge else {
            return Ok(None);
        };
        let owner = queries::recharge_owner(&client, &recharge_id).await?;
        return Ok(owner
            .and_then(|u| UserId::parse(&u).ok())
            .map(|u| (u, recharge_id)));
    }
    if let Some(payment) = payment {
        if let Some(found) = queries::recharge_by_payment(&client, &payment).await? {
            if let Ok(user) = UserId::parse(&found.user_id) {
                return Ok(Some((user, found.recharge_id)));
            }
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "payment_not_yet_known",
        "no recharge is known for this payment yet; Stripe will deliver this event again",
    ))
}
