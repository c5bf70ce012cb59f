//! Stripe delivery simulator: one recharge's story as Stripe would tell it (paid or not,
//! asynchronously or not, refunds, a dispute and its lifecycle), the events Stripe sends
//! for it, and a delivery schedule as Stripe really delivers (any order, duplicates,
//! redelivery of what was not acknowledged). The expected outcome is computed from the money
//! alone, independently of the ledger's code.

use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::fake_stripe::{
    async_payment_failed_event, async_payment_succeeded_event, charge_refunded_event,
    checkout_completed_event, session_expired_event, stripe_event,
};

/// How the checkout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payment {
    /// Card: `checkout.session.completed` with `payment_status = paid`.
    Paid,
    /// Asynchronous method that succeeded later.
    AsyncSucceeded,
    /// Asynchronous method that failed.
    AsyncFailed,
    /// Never paid: the session expired.
    Expired,
}

impl Payment {
    pub fn is_paid(self) -> bool {
        matches!(self, Self::Paid | Self::AsyncSucceeded)
    }
}

/// How a dispute went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisputeEnd {
    /// An inquiry that closed without a chargeback: no funds ever moved.
    InquiryClosed,
    /// An inquiry escalated to a chargeback, then lost.
    InquiryEscalatedLost,
    /// A chargeback (funds withdrawn), then won (funds reinstated).
    Won,
    /// A chargeback (funds withdrawn), then lost.
    Lost,
    /// A chargeback still open at the end of the story.
    Open,
}

impl DisputeEnd {
    /// Whether the disputed amount is out of the merchant's hands at the end.
    pub fn holds_funds(self) -> bool {
        matches!(self, Self::InquiryEscalatedLost | Self::Lost | Self::Open)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispute {
    pub amount_fen: i64,
    pub end: DisputeEnd,
}

/// One recharge's story.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Story {
    pub amount_fen: i64,
    pub payment: Payment,
    /// Cumulative `amount_refunded` after each refund, increasing, at most the amount.
    pub refunds: Vec<i64>,
    pub dispute: Option<Dispute>,
}

impl Story {
    /// Fen that Stripe took back in the end: min(paid, refunded + disputed and not won).
    pub fn taken_back_fen(&self) -> i64 {
        if !self.payment.is_paid() {
            return 0;
        }
        let refunded = self.refunds.last().copied().unwrap_or(0);
        let held = self
            .dispute
            .as_ref()
            .filter(|d| d.end.holds_funds())
            .map_or(0, |d| d.amount_fen);
        (refunded + held).min(self.amount_fen)
    }

    /// The credits the account must hold in the end, at `credits_per_yuan`.
    pub fn expected_credits(&self, credits_per_yuan: i64) -> i64 {
        if !self.payment.is_paid() {
            return 0;
        }
        let credits = i128::from(self.amount_fen) * i128::from(credits_per_yuan) / 100;
        let taken = credits * i128::from(self.taken_back_fen()) / i128::from(self.amount_fen);
        i64::try_from(credits - taken).unwrap_or(i64::MAX)
    }

    /// The events Stripe sends for this story, in the order they happened, each with a
    /// fresh id. `session` and `pi` name the session and its payment intent.
    pub fn events(
        &self,
        tag: &str,
        recharge_id: &str,
        user_id: &str,
        session: &str,
        pi: &str,
    ) -> Vec<Value> {
        let cny = "cny";
        let amount = self.amount_fen;
        let mut n = 0;
        let mut id = || {
            n += 1;
            format!("evt_{tag}_{n}")
        };
        let mut events = Vec::new();
        match self.payment {
            Payment::Paid => events.push(checkout_completed_event(
                &id(),
                session,
                recharge_id,
                user_id,
                amount,
                cny,
                "paid",
                Some(pi),
            )),
            Payment::AsyncSucceeded => {
                events.push(checkout_completed_event(
                    &id(),
                    session,
                    recharge_id,
                    user_id,
                    amount,
                    cny,
                    "unpaid",
                    Some(pi),
                ));
                events.push(async_payment_succeeded_event(
                    &id(),
                    session,
                    recharge_id,
                    user_id,
                    amount,
                    cny,
                    Some(pi),
                ));
            }
            Payment::AsyncFailed => {
                events.push(checkout_completed_event(
                    &id(),
                    session,
                    recharge_id,
                    user_id,
                    amount,
                    cny,
                    "unpaid",
                    Some(pi),
                ));
                events.push(async_payment_failed_event(
                    &id(),
                    session,
                    recharge_id,
                    user_id,
                    amount,
                    cny,
                    Some(pi),
                ));
            }
            Payment::Expired => events.push(session_expired_event(
                &id(),
                session,
                recharge_id,
                user_id,
                amount,
                cny,
            )),
        }
        if !self.payment.is_paid() {
            return events;
        }
        let charge = format!("ch_{pi}");
        let metadata = [("user_id", user_id), ("recharge_id", recharge_id)];
        for refunded in &self.refunds {
            events.push(charge_refunded_event(
                &id(),
                &charge,
                Some(pi),
                amount,
                *refunded,
                cny,
                &metadata,
            ));
        }
        if let Some(d) = &self.dispute {
            let dp = format!("dp_{tag}");
            let mut dispute = |event_type: &str, status: &str| {
                dispute_event(&id(), event_type, &dp, &charge, pi, d.amount_fen, status)
            };
            match d.end {
                DisputeEnd::InquiryClosed => {
                    events.push(dispute("charge.dispute.created", "warning_needs_response"));
                    events.push(dispute("charge.dispute.closed", "warning_closed"));
                }
                DisputeEnd::InquiryEscalatedLost => {
                    events.push(dispute("charge.dispute.created", "warning_needs_response"));
                    events.push(dispute("charge.dispute.updated", "needs_response"));
                    events.push(dispute("charge.dispute.funds_withdrawn", "needs_response"));
                    events.push(dispute("charge.dispute.closed", "lost"));
                }
                DisputeEnd::Won => {
                    events.push(dispute("charge.dispute.created", "needs_response"));
                    events.push(dispute("charge.dispute.funds_withdrawn", "needs_response"));
                    events.push(dispute("charge.dispute.updated", "under_review"));
                    events.push(dispute("charge.dispute.closed", "won"));
                    events.push(dispute("charge.dispute.funds_reinstated", "won"));
                }
                DisputeEnd::Lost => {
                    events.push(dispute("charge.dispute.created", "needs_response"));
                    events.push(dispute("charge.dispute.funds_withdrawn", "needs_response"));
                    events.push(dispute("charge.dispute.closed", "lost"));
                }
                DisputeEnd::Open => {
                    events.push(dispute("charge.dispute.created", "needs_response"));
                    events.push(dispute("charge.dispute.funds_withdrawn", "needs_response"));
                }
            }
        }
        events
    }
}

/// A `charge.dispute.*` event for dispute `dispute_id` on `charge_id`, at `status`.
pub fn dispute_event(
    event_id: &str,
    event_type: &str,
    dispute_id: &str,
    charge_id: &str,
    payment_intent: &str,
    amount: i64,
    status: &str,
) -> Value {
    let mut dispute: Value = serde_json::from_str(include_str!("../fixtures/stripe/dispute.json"))
        .unwrap_or_else(|e| panic!("dispute fixture is not JSON: {e}"));
    dispute["id"] = json!(dispute_id);
    dispute["charge"] = json!(charge_id);
    dispute["payment_intent"] = json!(payment_intent);
    dispute["amount"] = json!(amount);
    dispute["currency"] = json!("cny");
    dispute["status"] = json!(status);
    stripe_event(event_id, event_type, dispute)
}

/// Random stories: amounts from the quick amounts and odd ones, every payment outcome,
/// zero to three partial refunds, and a dispute in every lifecycle.
pub fn story() -> impl Strategy<Value = Story> {
    story_between(1, 1_000_000)
}

/// As [`story`], with amounts (in fen) between `min` and `max`.
pub fn story_between(min: i64, max: i64) -> impl Strategy<Value = Story> {
    let amount = prop_oneof![
        Just(1_000i64),
        Just(5_000),
        Just(10_000),
        Just(20_000),
        min..=max,
    ];
    let payment = prop_oneof![
        4 => Just(Payment::Paid),
        2 => Just(Payment::AsyncSucceeded),
        1 => Just(Payment::AsyncFailed),
        1 => Just(Payment::Expired),
    ];
    let end = prop_oneof![
        Just(DisputeEnd::InquiryClosed),
        Just(DisputeEnd::InquiryEscalatedLost),
        Just(DisputeEnd::Won),
        Just(DisputeEnd::Lost),
        Just(DisputeEnd::Open),
    ];
    (
        amount,
        payment,
        prop::collection::vec(1..=100i64, 0..=3),
        prop::option::of((1..=100i64, end)),
    )
        .prop_map(|(amount_fen, payment, refund_parts, dispute)| {
            // Refund parts are percentages of what is left, so the cumulative total grows
            // and never passes the amount.
            let mut refunds = Vec::new();
            let mut total = 0i64;
            for part in refund_parts {
                let left = amount_fen - total;
                let step = (left * part / 100).max(1).min(left);
                if step <= 0 {
                    break;
                }
                total += step;
                refunds.push(total);
            }
            let dispute = dispute.map(|(percent, end)| Dispute {
                amount_fen: (amount_fen * percent / 100).max(1),
                end,
            });
            Story {
                amount_fen,
                payment,
                refunds,
                dispute,
            }
        })
}

/// A delivery as Stripe makes it: the events in a random order, some delivered twice.
/// `deliver` answers whether the delivery was acknowledged (2xx); one that was not is
/// delivered again later, as Stripe retries. Returns how many deliveries were made.
///
/// # Panics
/// If an event is still refused after 50 redeliveries (a story the ledger cannot finish).
pub async fn deliver_in_any_order<F, Fut>(events: Vec<Value>, seed: u64, mut deliver: F) -> usize
where
    F: FnMut(Value) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut queue: Vec<(Value, u32)> = Vec::new();
    for event in events {
        let copies = if rng.gen_bool(0.3) { 2 } else { 1 };
        for _ in 0..copies {
            queue.push((event.clone(), 0));
        }
    }
    queue.shuffle(&mut rng);
    let mut deliveries = 0;
    while !queue.is_empty() {
        let (event, attempts) = queue.remove(0);
        deliveries += 1;
        if !deliver(event.clone()).await {
            assert!(attempts < 50, "event never acknowledged: {event}");
            let at = rng.gen_range(0..=queue.len());
            queue.insert(at, (event, attempts + 1));
        }
    }
    deliveries
}
