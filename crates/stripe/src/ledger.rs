//! What a Stripe event asks of the ledger, in the domain's words. Translation only: which
//! credits move, and when, is decided by the `CreditAccount` from the facts given here.

use credit_domain::{CreditCommand, DisputeStage};

use crate::event::{event_types, EventData, WebhookEvent};

/// The ledger's part in one webhook event, once the recharge it concerns is known.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // short-lived, one per webhook delivery
pub enum LedgerAction {
    /// Run this command on the recharge's account.
    Command(CreditCommand),
    /// `checkout.session.completed` for a payment still in flight (an asynchronous payment
    /// method): `checkout.session.async_payment_succeeded` or `_failed` follows.
    AwaitingAsyncPayment,
    /// A dispute status this service does not know: nothing recorded.
    UnknownDisputeStatus,
    /// An event type the ledger does not act on.
    Ignored,
}

/// The stage a dispute event says the dispute is at. Stripe's `status` on the object is the
/// dispute as of the event; the funds events say what moved.
pub fn dispute_stage(event_type: &str, status: &str) -> Option<DisputeStage> {
    let by_status = match status {
        "warning_needs_response" | "warning_under_review" => Some(DisputeStage::Inquiry),
        "warning_closed" => Some(DisputeStage::InquiryClosed),
        "needs_response" | "under_review" => Some(DisputeStage::Open),
        "won" => Some(DisputeStage::Won),
        "lost" => Some(DisputeStage::Lost),
        "prevented" => Some(DisputeStage::Prevented),
        _ => None,
    };
    match event_type {
        // Funds moved back to us: the dispute is won, whatever the object's status lags at.
        event_types::CHARGE_DISPUTE_FUNDS_REINSTATED => Some(DisputeStage::Won),
        event_types::CHARGE_DISPUTE_FUNDS_WITHDRAWN => match by_status {
            Some(stage) if stage.rank() > DisputeStage::FundsWithdrawn.rank() => Some(stage),
            _ => Some(DisputeStage::FundsWithdrawn),
        },
        _ => by_status,
    }
}

/// The command for `event` on recharge `recharge_id`.
pub fn ledger_action(event: &WebhookEvent, recharge_id: String) -> LedgerAction {
    use event_types::*;
    match &event.data {
        EventData::CheckoutSession(session) => match event.event_type.as_str() {
            CHECKOUT_SESSION_COMPLETED if session.payment_status != "paid" => {
                LedgerAction::AwaitingAsyncPayment
            }
            CHECKOUT_SESSION_COMPLETED | CHECKOUT_SESSION_ASYNC_PAYMENT_SUCCEEDED => {
                LedgerAction::Command(CreditCommand::CompleteRecharge {
                    recharge_id,
                    amount_fen: session.amount_total.unwrap_or(-1),
                    currency: session.currency.clone().unwrap_or_default(),
                    payment_id: session
                        .payment_intent
                        .clone()
                        .unwrap_or_else(|| session.session_id.clone()),
                })
            }
            CHECKOUT_SESSION_ASYNC_PAYMENT_FAILED => {
                LedgerAction::Command(CreditCommand::FailRecharge {
                    recharge_id,
                    reason: "async payment failed".to_owned(),
                })
            }
            CHECKOUT_SESSION_EXPIRED => {
                LedgerAction::Command(CreditCommand::CancelRecharge { recharge_id })
            }
            _ => LedgerAction::Ignored,
        },
        EventData::ChargeRefunded(charge) => {
            if charge.amount_refunded <= 0 {
                return LedgerAction::Ignored;
            }
            LedgerAction::Command(CreditCommand::RecordRefund {
                recharge_id,
                refunded_fen: charge.amount_refunded,
                reference: charge.charge_id.clone(),
            })
        }
        EventData::Dispute(dispute) => match dispute_stage(&event.event_type, &dispute.status) {
            Some(stage) => LedgerAction::Command(CreditCommand::RecordDispute {
                recharge_id,
                dispute_id: dispute.dispute_id.clone(),
                amount_fen: dispute.amount,
                stage,
            }),
            None => LedgerAction::UnknownDisputeStatus,
        },
        EventData::Other => LedgerAction::Ignored,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispute_stages_follow_stripe_semantics() {
        use event_types::*;
        let cases = [
            (
                CHARGE_DISPUTE_CREATED,
                "warning_needs_response",
                DisputeStage::Inquiry,
            ),
            (CHARGE_DISPUTE_CREATED, "needs_response", DisputeStage::Open),
            (CHARGE_DISPUTE_UPDATED, "under_review", DisputeStage::Open),
            (
                CHARGE_DISPUTE_FUNDS_WITHDRAWN,
                "needs_response",
                DisputeStage::FundsWithdrawn,
            ),
            (CHARGE_DISPUTE_FUNDS_WITHDRAWN, "lost", DisputeStage::Lost),
            (
                CHARGE_DISPUTE_FUNDS_REINSTATED,
                "under_review",
                DisputeStage::Won,
            ),
            (CHARGE_DISPUTE_CLOSED, "won", DisputeStage::Won),
            (CHARGE_DISPUTE_CLOSED, "lost", DisputeStage::Lost),
            (
                CHARGE_DISPUTE_CLOSED,
                "warning_closed",
                DisputeStage::InquiryClosed,
            ),
            (CHARGE_DISPUTE_CLOSED, "prevented", DisputeStage::Prevented),
        ];
        for (event_type, status, stage) in cases {
            assert_eq!(
                dispute_stage(event_type, status),
                Some(stage),
                "{event_type} {status}"
            );
        }
        assert_eq!(dispute_stage(CHARGE_DISPUTE_CREATED, "brand_new"), None);
    }
}
