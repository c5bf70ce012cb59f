use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use crate::account::DisputeStage;
use crate::command::VideoSpec;

/// Version written with every event. Event names and shapes are a contract once shipped:
/// change a shape by adding a version and an upcaster, never by editing one.
pub const EVENT_VERSION: &str = "1.0";

/// Everything that ever happens to a `CreditAccount`. Money events carry `balance_after`,
/// so the log alone proves every balance. Amounts are integers: fen and credits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CreditEvent {
    /// A recharge was requested and is pending payment.
    RechargeRequested {
        recharge_id: String,
        amount_fen: i64,
        currency: String,
        /// Credits the payment will buy, computed here from the price in force.
        credits: i64,
        /// The price in force: credits per yuan.
        credits_per_yuan: i64,
        /// `stripe` or `demo`.
        provider: String,
    },
    /// The provider's checkout session for a pending recharge was created.
    RechargeCheckoutCreated {
        recharge_id: String,
        checkout_session_id: String,
        checkout_url: Option<String>,
    },
    /// The payment was received: credits added.
    RechargeCompleted {
        recharge_id: String,
        credits: i64,
        /// The provider's payment reference (Stripe payment intent, or session id).
        payment_id: String,
        balance_after: i64,
    },
    /// The payment failed, or the checkout could not be created.
    RechargeFailed { recharge_id: String, reason: String },
    /// The checkout session expired unpaid.
    RechargeCancelled { recharge_id: String },
    /// A completed recharge was refunded or disputed at the provider: credits clawed back.
    /// The balance may go below zero; deductions are then refused until it is repaid.
    RechargeReversed {
        recharge_id: String,
        credits: i64,
        /// Fen clawed back in total for this recharge after this event:
        /// min(paid, refunded + disputed and not won).
        reversed_fen: i64,
        reason: String,
        reference: String,
        balance_after: i64,
    },
    /// Credits clawed back earlier are given back: a dispute was won (funds reinstated).
    RechargeReinstated {
        recharge_id: String,
        credits: i64,
        /// Fen clawed back in total for this recharge after this event.
        reversed_fen: i64,
        reason: String,
        reference: String,
        balance_after: i64,
    },
    /// The provider reports that this much of the payment has been refunded so far
    /// (cumulative). A fact, recorded whatever the recharge's state; the credits it claws
    /// back, if any, are a `RechargeReversed` in the same command.
    PaymentRefunded {
        recharge_id: String,
        /// Cumulative fen refunded (Stripe's `charge.amount_refunded`).
        refunded_fen: i64,
        reference: String,
    },
    /// A dispute on the payment reached a stage. A fact, recorded whatever the recharge's
    /// state; the credits it moves, if any, follow in the same command.
    PaymentDisputed {
        recharge_id: String,
        dispute_id: String,
        /// The disputed amount (not cumulative with refunds).
        amount_fen: i64,
        stage: DisputeStage,
    },
    /// Credits taken for a video task, before the provider is called.
    CreditsDeducted {
        task_id: String,
        credits: i64,
        description: String,
        video: VideoSpec,
        /// SHA-256 (hex) of the per-task callback token; the token itself is never stored.
        callback_token_sha256: String,
        balance_after: i64,
    },
    /// The provider accepted the task.
    VideoTaskSubmitted {
        task_id: String,
        provider_task_id: String,
    },
    /// The provider's answer to the submission is unknown (time-out, connection lost after
    /// the request was sent, unreadable answer): the task stays charged until its callback or
    /// the settlement deadline decides.
    VideoSubmissionUncertain {
        task_id: String,
        error_message: String,
    },
    /// The provider reported progress on a running task (0..=99; only increases).
    VideoProgressed { task_id: String, progress: u8 },
    /// The provider delivered the video.
    VideoSucceeded {
        task_id: String,
        video_url: String,
        remove_watermark: Option<bool>,
        pid: Option<String>,
    },
    /// The generation failed (provider verdict, submission error, or never submitted).
    VideoFailed {
        task_id: String,
        failure_reason: String,
        error_message: String,
    },
    /// The provider delivered a video for a task that had already been refunded (settled as
    /// failed, then it succeeded after all). Recorded so the user gets the video; no money
    /// moves: the refund stands (see docs/EVENTS.md).
    VideoDeliveredAfterRefund {
        task_id: String,
        video_url: String,
        remove_watermark: Option<bool>,
        pid: Option<String>,
    },
    /// The credits of a failed task were given back.
    CreditsRefunded {
        task_id: String,
        credits: i64,
        balance_after: i64,
    },
    /// An operator granted (positive) or took back (negative) credits.
    CreditsAdjusted {
        adjustment_id: String,
        credits: i64,
        actor: String,
        reason: String,
        balance_after: i64,
    },
}

impl CreditEvent {
    /// The change this event makes to the balance, for money events; `None` otherwise.
    pub fn credit_delta(&self) -> Option<i64> {
        match self {
            Self::RechargeCompleted { credits, .. }
            | Self::RechargeReinstated { credits, .. }
            | Self::CreditsRefunded { credits, .. }
            | Self::CreditsAdjusted { credits, .. } => Some(*credits),
            Self::RechargeReversed { credits, .. } | Self::CreditsDeducted { credits, .. } => {
                Some(-*credits)
            }
            _ => None,
        }
    }

    /// The balance recorded after this event, for money events.
    pub fn balance_after(&self) -> Option<i64> {
        match self {
            Self::RechargeCompleted { balance_after, .. }
            | Self::RechargeReversed { balance_after, .. }
            | Self::RechargeReinstated { balance_after, .. }
            | Self::CreditsDeducted { balance_after, .. }
            | Self::CreditsRefunded { balance_after, .. }
            | Self::CreditsAdjusted { balance_after, .. } => Some(*balance_after),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::RechargeRequested { .. } => "RechargeRequested",
            Self::RechargeCheckoutCreated { .. } => "RechargeCheckoutCreated",
            Self::RechargeCompleted { .. } => "RechargeCompleted",
            Self::RechargeFailed { .. } => "RechargeFailed",
            Self::RechargeCancelled { .. } => "RechargeCancelled",
            Self::RechargeReversed { .. } => "RechargeReversed",
            Self::RechargeReinstated { .. } => "RechargeReinstated",
            Self::PaymentRefunded { .. } => "PaymentRefunded",
            Self::PaymentDisputed { .. } => "PaymentDisputed",
            Self::VideoSubmissionUncertain { .. } => "VideoSubmissionUncertain",
            Self::VideoDeliveredAfterRefund { .. } => "VideoDeliveredAfterRefund",
            Self::CreditsDeducted { .. } => "CreditsDeducted",
            Self::VideoTaskSubmitted { .. } => "VideoTaskSubmitted",
            Self::VideoProgressed { .. } => "VideoProgressed",
            Self::VideoSucceeded { .. } => "VideoSucceeded",
            Self::VideoFailed { .. } => "VideoFailed",
            Self::CreditsRefunded { .. } => "CreditsRefunded",
            Self::CreditsAdjusted { .. } => "CreditsAdjusted",
        }
    }
}

impl DomainEvent for CreditEvent {
    fn event_type(&self) -> String {
        self.name().to_owned()
    }

    fn event_version(&self) -> String {
        EVENT_VERSION.to_owned()
    }
}
