use std::collections::{BTreeMap, VecDeque};

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};

use crate::command::CreditCommand;
use crate::error::LedgerError;
use crate::event::CreditEvent;
use crate::ids::check_id;
use crate::pricing::credits_for_fen;

/// Free-text fields (reasons, descriptions, prompts) are bounded so an event stays small.
/// In bytes: 2000 characters of Chinese (3 bytes each in UTF-8) must fit a prompt.
const MAX_TEXT: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RechargeStatus {
    Pending,
    Completed,
    Failed,
    Cancelled,
    Reversed,
}

impl RechargeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Reversed => "reversed",
        }
    }
}

/// Where a dispute on a payment stands, from Stripe's dispute `status` and its funds events.
/// Stages only move forward (by rank); the first final stage stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DisputeStage {
    /// An inquiry (`warning_needs_response`, `warning_under_review`): no funds moved.
    Inquiry,
    /// A chargeback (`needs_response`, `under_review`): Stripe withdrew the funds.
    Open,
    /// `charge.dispute.funds_withdrawn`.
    FundsWithdrawn,
    /// Won (`won`, or `charge.dispute.funds_reinstated`): the funds came back.
    Won,
    /// Lost: the funds stay with the cardholder.
    Lost,
    /// An inquiry closed without becoming a chargeback (`warning_closed`).
    InquiryClosed,
    /// Prevented before it became a chargeback (`prevented`).
    Prevented,
}

impl DisputeStage {
    /// Whether the disputed amount is out of the merchant's hands at this stage.
    pub fn holds_funds(self) -> bool {
        matches!(self, Self::Open | Self::FundsWithdrawn | Self::Lost)
    }

    /// Order of the lifecycle: a delivery of an earlier stage after a later one is stale.
    pub fn rank(self) -> u8 {
        match self {
            Self::Inquiry => 0,
            Self::Open => 1,
            Self::FundsWithdrawn => 2,
            Self::Won | Self::Lost | Self::InquiryClosed | Self::Prevented => 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inquiry => "inquiry",
            Self::Open => "open",
            Self::FundsWithdrawn => "funds_withdrawn",
            Self::Won => "won",
            Self::Lost => "lost",
            Self::InquiryClosed => "inquiry_closed",
            Self::Prevented => "prevented",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispute {
    pub amount_fen: i64,
    pub stage: DisputeStage,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recharge {
    pub amount_fen: i64,
    pub currency: String,
    pub credits: i64,
    pub provider: String,
    pub status: RechargeStatus,
    pub checkout_session_id: Option<String>,
    pub checkout_url: Option<String>,
    pub payment_id: Option<String>,
    /// Fen clawed back so far (what the credits in `reversed_credits` paid for).
    pub reversed_fen: i64,
    /// Credits clawed back so far, net of reinstatements.
    pub reversed_credits: i64,
    /// Cumulative fen refunded at the provider, recorded in any state of the recharge.
    #[serde(default)]
    pub refunded_fen: i64,
    /// Disputes on the payment, by the provider's dispute id.
    #[serde(default)]
    pub disputes: BTreeMap<String, Dispute>,
}

impl Recharge {
    /// Whether the recharge's credits were added (and so can be clawed back).
    pub fn is_credited(&self) -> bool {
        matches!(
            self.status,
            RechargeStatus::Completed | RechargeStatus::Reversed
        )
    }

    /// Fen the provider has taken back from the payment: refunds plus disputes that hold
    /// funds, never more than was paid. Refunds and disputes are separate amounts.
    pub fn taken_back_fen(&self) -> i64 {
        let held = self
            .disputes
            .values()
            .filter(|d| d.stage.holds_funds())
            .fold(0i64, |sum, d| sum.saturating_add(d.amount_fen));
        self.refunded_fen
            .saturating_add(held)
            .clamp(0, self.amount_fen)
    }

    /// Credits that `fen` of this recharge bought: exact for the whole amount, rounded down
    /// for a part. Computed in i128: credits * fen may exceed i64, the quotient never
    /// exceeds `credits`.
    fn credits_of(&self, fen: i64) -> Result<i64, LedgerError> {
        if self.amount_fen <= 0 {
            return Ok(0);
        }
        i64::try_from(i128::from(self.credits) * i128::from(fen) / i128::from(self.amount_fen))
            .map_err(|_| LedgerError::Overflow)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Charged, the provider not (yet) called, or called without an answer yet.
    #[serde(alias = "charged")]
    Pending,
    /// The provider was called and its answer is unknown (time-out, lost connection).
    Uncertain,
    /// The provider took the task (its id is known) and is working on it.
    #[serde(alias = "submitted")]
    Processing,
    Succeeded,
    Failed,
}

impl TaskStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [TaskStatus; 5] = [
        Self::Pending,
        Self::Uncertain,
        Self::Processing,
        Self::Succeeded,
        Self::Failed,
    ];

    /// The one vocabulary of task statuses: the domain's, `video_tasks.status`'s, the API's,
    /// OpenAPI's and the pages'.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Uncertain => "uncertain",
            Self::Processing => "processing",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub credits: i64,
    pub status: TaskStatus,
    #[serde(default, skip_serializing_if = "is_false")]
    pub refunded: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_task_id: Option<String>,
    pub callback_token_sha256: String,
    /// Fingerprint of the requested video (`VideoSpec::fingerprint`), to tell a retry from a
    /// different request under the same Idempotency-Key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_sha256: Option<String>,
    /// The provider delivered a video after the task was refunded.
    #[serde(default, skip_serializing_if = "is_false")]
    pub delivered_after_refund: bool,
    /// The last progress the provider reported (0..=99 while running).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub progress: u8,
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_zero(value: &u8) -> bool {
    *value == 0
}

impl Task {
    pub fn is_settled(&self) -> bool {
        matches!(self.status, TaskStatus::Succeeded | TaskStatus::Failed)
    }
}

/// How many settled tasks an account keeps in memory (and in its snapshot), the most
/// recently settled ones. Open tasks are always kept. A settled task that falls out of this
/// window is forgotten by the account: a new charge under its id is refused by the journal's
/// unique index (`migrations/0008_idempotency_indexes.sql`), and a late command about it
/// (a repeated callback, a poll) is answered `task_already_settled` by the executor, which
/// finds the charge in the journal. A late success for a refunded task that has left the
/// window is answered `task_already_settled` too, and so is not recorded as
/// `VideoDeliveredAfterRefund` (no money moves either way). 32 keeps a 100,000-task account's
/// snapshot under 16 KB (13,691 bytes with its 16 adjustments, `tests/bounded.rs`) while
/// what is repeated within the next 32 settlements is still answered from memory.
pub const RECENT_SETTLED_TASKS: usize = 32;
/// How many adjustments an account keeps (id and fingerprint), the most recent ones; older
/// ids are refused by the journal's unique index as for tasks.
pub const RECENT_ADJUSTMENTS: usize = 16;

/// One user's credits. The aggregate id is the user id.
///
/// It holds what decisions need now, not its history: the balance, every recharge (a
/// credited one can be refunded or disputed months later, and the clawback rule needs its
/// amounts; recharges are bounded by money paid, not by use), the open tasks and the most
/// recently settled ones, and the most recent adjustments. The windows are part of the
/// serialized state, so a snapshot and a replay agree exactly. A snapshot written before the
/// windows existed (no `settled` field) does not read as an account: the store rebuilds it
/// from the journal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditAccount {
    balance: i64,
    recharges: BTreeMap<String, Recharge>,
    /// Open tasks, and the settled tasks named in `settled`.
    tasks: BTreeMap<String, Task>,
    /// Ids of the settled tasks kept in `tasks`, oldest settlement first (at most
    /// `RECENT_SETTLED_TASKS`). No serde default on purpose: see the type's comment.
    settled: VecDeque<String>,
    /// The most recent adjustments, oldest first (at most `RECENT_ADJUSTMENTS`).
    recent_adjustments: VecDeque<KnownAdjustment>,
}

/// An adjustment the account remembers: its id and the fingerprint of its terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct KnownAdjustment {
    id: String,
    fingerprint: String,
}

/// Fingerprint of an adjustment's terms, to tell a retry from a different request under the
/// same Idempotency-Key.
pub fn adjustment_fingerprint(credits: i64, reason: &str) -> String {
    crate::command::hex_sha256(&format!("{credits}\n{reason}"))
}

impl CreditAccount {
    pub fn balance(&self) -> i64 {
        self.balance
    }

    pub fn recharge(&self, recharge_id: &str) -> Option<&Recharge> {
        self.recharges.get(recharge_id)
    }

    pub fn task(&self, task_id: &str) -> Option<&Task> {
        self.tasks.get(task_id)
    }

    /// The fingerprint of adjustment `adjustment_id`, if the account still remembers it (one
    /// of the `RECENT_ADJUSTMENTS` most recent; older ones are in the journal).
    pub fn adjustment(&self, adjustment_id: &str) -> Option<&str> {
        self.recent_adjustments
            .iter()
            .find(|a| a.id == adjustment_id)
            .map(|a| a.fingerprint.as_str())
    }

    /// How many entries the account keeps (tasks, recharges, adjustments): what its snapshot's
    /// size grows with.
    pub fn kept_entries(&self) -> usize {
        self.tasks.len() + self.recharges.len() + self.recent_adjustments.len()
    }

    /// Tasks charged but not settled, for the settlement job.
    pub fn open_tasks(&self) -> impl Iterator<Item = (&String, &Task)> {
        self.tasks.iter().filter(|(_, t)| !t.is_settled())
    }

    /// Decides which events `command` produces against the current state, without changing
    /// it. Every refusal is a `LedgerError`; an accepted command yields at least one event.
    pub fn decide(&self, command: CreditCommand) -> Result<Vec<CreditEvent>, LedgerError> {
        match command {
            CreditCommand::RequestRecharge {
                recharge_id,
                amount_fen,
                currency,
                credits_per_yuan,
                provider,
            } => {
                check_id(&recharge_id)?;
                check_text("currency", &currency)?;
                check_text("provider", &provider)?;
                if amount_fen <= 0 || credits_per_yuan <= 0 {
                    return Err(LedgerError::NonPositiveAmount);
                }
                if self.recharges.contains_key(&recharge_id) {
                    return Err(LedgerError::RechargeExists { recharge_id });
                }
                let credits =
                    credits_for_fen(amount_fen, credits_per_yuan).ok_or(LedgerError::Overflow)?;
                if credits <= 0 {
                    return Err(LedgerError::NonPositiveAmount);
                }
                Ok(vec![CreditEvent::RechargeRequested {
                    recharge_id,
                    amount_fen,
                    currency,
                    credits,
                    credits_per_yuan,
                    provider,
                }])
            }
            CreditCommand::AttachCheckout {
                recharge_id,
                checkout_session_id,
                checkout_url,
            } => {
                check_text("checkout_session_id", &checkout_session_id)?;
                let recharge = self.pending_recharge(&recharge_id)?;
                if recharge.checkout_session_id.as_deref() == Some(checkout_session_id.as_str()) {
                    return Err(LedgerError::RechargeNotPending {
                        recharge_id,
                        status: "checkout_attached",
                    });
                }
                Ok(vec![CreditEvent::RechargeCheckoutCreated {
                    recharge_id,
                    checkout_session_id,
                    checkout_url,
                }])
            }
            CreditCommand::CompleteRecharge {
                recharge_id,
                amount_fen,
                currency,
                payment_id,
            } => {
                let recharge = self.known_recharge(&recharge_id)?;
                match recharge.status {
                    RechargeStatus::Completed | RechargeStatus::Reversed => {
                        return Err(LedgerError::RechargeAlreadyCompleted { recharge_id });
                    }
                    // Money in hand wins: a payment that arrives after the checkout was
                    // marked failed or expired is still credited.
                    RechargeStatus::Pending
                    | RechargeStatus::Failed
                    | RechargeStatus::Cancelled => {}
                }
                if amount_fen != recharge.amount_fen {
                    return Err(LedgerError::AmountMismatch {
                        expected: recharge.amount_fen,
                        actual: amount_fen,
                    });
                }
                if !currency.eq_ignore_ascii_case(&recharge.currency) {
                    return Err(LedgerError::CurrencyMismatch {
                        expected: recharge.currency.clone(),
                        actual: currency,
                    });
                }
                let balance_after = self.add(recharge.credits)?;
                let completed = CreditEvent::RechargeCompleted {
                    recharge_id: recharge_id.clone(),
                    credits: recharge.credits,
                    payment_id: payment_id.clone(),
                    balance_after,
                };
                // Refunds and disputes recorded while it was pending are netted now.
                let mut after = recharge.clone();
                apply_to_recharge(&mut after, &completed);
                let mut events = vec![completed];
                events.extend(settle_reversal(
                    &recharge_id,
                    &after,
                    balance_after,
                    "refunded or disputed before the payment completed",
                    &payment_id,
                )?);
                Ok(events)
            }
            CreditCommand::FailRecharge {
                recharge_id,
                reason,
            } => {
                check_text("reason", &reason)?;
                self.pending_recharge(&recharge_id)?;
                Ok(vec![CreditEvent::RechargeFailed {
                    recharge_id,
                    reason,
                }])
            }
            CreditCommand::CancelRecharge { recharge_id } => {
                self.pending_recharge(&recharge_id)?;
                Ok(vec![CreditEvent::RechargeCancelled { recharge_id }])
            }
            CreditCommand::RecordRefund {
                recharge_id,
                refunded_fen,
                reference,
            } => {
                check_text("reference", &reference)?;
                if refunded_fen <= 0 {
                    return Err(LedgerError::NonPositiveAmount);
                }
                let recharge = self.known_recharge(&recharge_id)?;
                let refunded_fen = refunded_fen.min(recharge.amount_fen);
                if refunded_fen <= recharge.refunded_fen {
                    return Err(LedgerError::AlreadyRecorded { recharge_id });
                }
                let fact = CreditEvent::PaymentRefunded {
                    recharge_id: recharge_id.clone(),
                    refunded_fen,
                    reference: reference.clone(),
                };
                self.with_settlement(fact, recharge, "refunded at the provider", &reference)
            }
            CreditCommand::RecordDispute {
                recharge_id,
                dispute_id,
                amount_fen,
                stage,
            } => {
                check_id(&dispute_id)?;
                if amount_fen <= 0 {
                    return Err(LedgerError::NonPositiveAmount);
                }
                let recharge = self.known_recharge(&recharge_id)?;
                if let Some(known) = recharge.disputes.get(&dispute_id) {
                    if stage.rank() <= known.stage.rank() {
                        return Err(LedgerError::AlreadyRecorded { recharge_id });
                    }
                }
                let reason = format!("dispute {}", stage.as_str());
                let fact = CreditEvent::PaymentDisputed {
                    recharge_id,
                    dispute_id: dispute_id.clone(),
                    amount_fen,
                    stage,
                };
                self.with_settlement(fact, recharge, &reason, &dispute_id)
            }
            CreditCommand::DeductForTask {
                task_id,
                credits,
                description,
                video,
                callback_token_sha256,
            } => {
                check_id(&task_id)?;
                check_text("description", &description)?;
                check_text("prompt", &video.prompt)?;
                if credits <= 0 {
                    return Err(LedgerError::NonPositiveAmount);
                }
                if self.tasks.contains_key(&task_id) {
                    return Err(LedgerError::TaskAlreadyCharged { task_id });
                }
                check_clean("prompt", &video.prompt)?;
                check_clean("description", &description)?;
                check_clean("model", &video.model)?;
                check_clean("aspect_ratio", &video.aspect_ratio)?;
                check_clean("size", &video.size)?;
                if let Some(url) = &video.reference_url {
                    check_clean("reference_url", url)?;
                }
                if self.balance < credits {
                    return Err(LedgerError::InsufficientCredits {
                        required: credits,
                        available: self.balance,
                    });
                }
                let balance_after = self.add(-credits)?;
                Ok(vec![CreditEvent::CreditsDeducted {
                    task_id,
                    credits,
                    description,
                    video,
                    callback_token_sha256,
                    balance_after,
                }])
            }
            CreditCommand::MarkTaskSubmitted {
                task_id,
                provider_task_id,
            } => {
                check_text("provider_task_id", &provider_task_id)?;
                check_clean("provider_task_id", &provider_task_id)?;
                let task = self.known_task(&task_id)?;
                match task.status {
                    TaskStatus::Pending | TaskStatus::Uncertain => {
                        Ok(vec![CreditEvent::VideoTaskSubmitted {
                            task_id,
                            provider_task_id,
                        }])
                    }
                    TaskStatus::Processing => Err(LedgerError::TaskAlreadySubmitted { task_id }),
                    TaskStatus::Succeeded | TaskStatus::Failed => {
                        Err(LedgerError::TaskAlreadySettled { task_id })
                    }
                }
            }
            CreditCommand::MarkSubmissionUncertain {
                task_id,
                error_message,
            } => {
                let task = self.known_task(&task_id)?;
                match task.status {
                    TaskStatus::Pending => Ok(vec![CreditEvent::VideoSubmissionUncertain {
                        task_id,
                        error_message: clean(error_message),
                    }]),
                    TaskStatus::Uncertain | TaskStatus::Processing => {
                        Err(LedgerError::TaskAlreadySubmitted { task_id })
                    }
                    TaskStatus::Succeeded | TaskStatus::Failed => {
                        Err(LedgerError::TaskAlreadySettled { task_id })
                    }
                }
            }
            CreditCommand::RecordProgress { task_id, progress } => {
                let task = self.known_task(&task_id)?;
                if task.is_settled() {
                    return Err(LedgerError::TaskAlreadySettled { task_id });
                }
                let progress = progress.min(99);
                if progress <= task.progress {
                    return Err(LedgerError::StaleProgress { task_id });
                }
                Ok(vec![CreditEvent::VideoProgressed { task_id, progress }])
            }
            CreditCommand::RecordVideoSuccess {
                task_id,
                video_url,
                remove_watermark,
                pid,
            } => {
                check_text("video_url", &video_url)?;
                check_clean("video_url", &video_url)?;
                let pid = pid.map(clean);
                let task = self.known_task(&task_id)?;
                match task.status {
                    TaskStatus::Succeeded => {
                        return Err(LedgerError::TaskAlreadySettled { task_id });
                    }
                    // Refunded already (a deadline passed, or a contradictory failure came
                    // first): the video is recorded for the user, the refund stands.
                    TaskStatus::Failed if task.refunded && !task.delivered_after_refund => {
                        return Ok(vec![CreditEvent::VideoDeliveredAfterRefund {
                            task_id,
                            video_url,
                            remove_watermark,
                            pid,
                        }]);
                    }
                    TaskStatus::Failed => {
                        return Err(LedgerError::TaskAlreadySettled { task_id });
                    }
                    TaskStatus::Pending | TaskStatus::Uncertain | TaskStatus::Processing => {}
                }
                Ok(vec![CreditEvent::VideoSucceeded {
                    task_id,
                    video_url,
                    remove_watermark,
                    pid,
                }])
            }
            CreditCommand::FailVideo {
                task_id,
                failure_reason,
                error_message,
            } => {
                let task = self.known_task(&task_id)?;
                if task.is_settled() {
                    return Err(LedgerError::TaskAlreadySettled { task_id });
                }
                let credits = task.credits;
                let balance_after = self.add(credits)?;
                Ok(vec![
                    CreditEvent::VideoFailed {
                        task_id: task_id.clone(),
                        failure_reason: clean(failure_reason),
                        error_message: clean(error_message),
                    },
                    CreditEvent::CreditsRefunded {
                        task_id,
                        credits,
                        balance_after,
                    },
                ])
            }
            CreditCommand::Adjust {
                adjustment_id,
                credits,
                actor,
                reason,
            } => {
                check_id(&adjustment_id)?;
                check_text("actor", &actor)?;
                check_text("reason", &reason)?;
                check_clean("reason", &reason)?;
                check_clean("actor", &actor)?;
                if credits == 0 {
                    return Err(LedgerError::ZeroAdjustment);
                }
                if self.adjustment(&adjustment_id).is_some() {
                    return Err(LedgerError::AdjustmentExists { adjustment_id });
                }
                let balance_after = self.add(credits)?;
                // Only a take-back is bounded by zero: a grant to an account in debt after
                // a reversal repays part of the debt even if the balance stays negative.
                if credits < 0 && balance_after < 0 {
                    return Err(LedgerError::AdjustmentBelowZero {
                        would_be: balance_after,
                    });
                }
                Ok(vec![CreditEvent::CreditsAdjusted {
                    adjustment_id,
                    credits,
                    actor,
                    reason,
                    balance_after,
                }])
            }
        }
    }

    /// A fact about a recharge's payment, followed by the credits it moves, if any.
    fn with_settlement(
        &self,
        fact: CreditEvent,
        recharge: &Recharge,
        reason: &str,
        reference: &str,
    ) -> Result<Vec<CreditEvent>, LedgerError> {
        let mut after = recharge.clone();
        apply_to_recharge(&mut after, &fact);
        let recharge_id = match &fact {
            CreditEvent::PaymentRefunded { recharge_id, .. }
            | CreditEvent::PaymentDisputed { recharge_id, .. } => recharge_id.clone(),
            _ => String::new(),
        };
        let mut events = vec![fact];
        events.extend(settle_reversal(
            &recharge_id,
            &after,
            self.balance,
            reason,
            reference,
        )?);
        Ok(events)
    }

    fn add(&self, delta: i64) -> Result<i64, LedgerError> {
        self.balance.checked_add(delta).ok_or(LedgerError::Overflow)
    }

    fn known_recharge(&self, recharge_id: &str) -> Result<&Recharge, LedgerError> {
        self.recharges
            .get(recharge_id)
            .ok_or_else(|| LedgerError::UnknownRecharge {
                recharge_id: recharge_id.to_owned(),
            })
    }

    fn pending_recharge(&self, recharge_id: &str) -> Result<&Recharge, LedgerError> {
        let recharge = self.known_recharge(recharge_id)?;
        if recharge.status != RechargeStatus::Pending {
            return Err(LedgerError::RechargeNotPending {
                recharge_id: recharge_id.to_owned(),
                status: recharge.status.as_str(),
            });
        }
        Ok(recharge)
    }

    fn known_task(&self, task_id: &str) -> Result<&Task, LedgerError> {
        self.tasks
            .get(task_id)
            .ok_or_else(|| LedgerError::UnknownTask {
                task_id: task_id.to_owned(),
            })
    }

    /// Applies one event. Never fails: an event is a fact.
    pub fn apply_event(&mut self, event: CreditEvent) {
        if let Some(balance_after) = event.balance_after() {
            self.balance = balance_after;
        }
        match event {
            CreditEvent::RechargeRequested {
                recharge_id,
                amount_fen,
                currency,
                credits,
                provider,
                ..
            } => {
                self.recharges.insert(
                    recharge_id,
                    Recharge {
                        amount_fen,
                        currency,
                        credits,
                        provider,
                        status: RechargeStatus::Pending,
                        checkout_session_id: None,
                        checkout_url: None,
                        payment_id: None,
                        reversed_fen: 0,
                        reversed_credits: 0,
                        refunded_fen: 0,
                        disputes: BTreeMap::new(),
                    },
                );
            }
            CreditEvent::RechargeCheckoutCreated {
                ref recharge_id, ..
            }
            | CreditEvent::RechargeCompleted {
                ref recharge_id, ..
            }
            | CreditEvent::RechargeFailed {
                ref recharge_id, ..
            }
            | CreditEvent::RechargeCancelled { ref recharge_id }
            | CreditEvent::RechargeReversed {
                ref recharge_id, ..
            }
            | CreditEvent::RechargeReinstated {
                ref recharge_id, ..
            }
            | CreditEvent::PaymentRefunded {
                ref recharge_id, ..
            }
            | CreditEvent::PaymentDisputed {
                ref recharge_id, ..
            } => {
                if let Some(r) = self.recharges.get_mut(recharge_id) {
                    apply_to_recharge(r, &event);
                }
            }
            CreditEvent::CreditsDeducted {
                task_id,
                credits,
                callback_token_sha256,
                video,
                ..
            } => {
                self.tasks.insert(
                    task_id,
                    Task {
                        credits,
                        status: TaskStatus::Pending,
                        refunded: false,
                        provider_task_id: None,
                        callback_token_sha256,
                        spec_sha256: Some(video.fingerprint()),
                        delivered_after_refund: false,
                        progress: 0,
                    },
                );
            }
            CreditEvent::VideoProgressed { task_id, progress } => {
                if let Some(t) = self.tasks.get_mut(&task_id) {
                    t.progress = progress;
                }
            }
            CreditEvent::VideoSubmissionUncertain { task_id, .. } => {
                self.set_task_status(&task_id, TaskStatus::Uncertain);
            }
            CreditEvent::VideoDeliveredAfterRefund { task_id, .. } => {
                if let Some(t) = self.tasks.get_mut(&task_id) {
                    t.delivered_after_refund = true;
                }
            }
            CreditEvent::VideoTaskSubmitted {
                task_id,
                provider_task_id,
            } => {
                if let Some(t) = self.tasks.get_mut(&task_id) {
                    t.status = TaskStatus::Processing;
                    t.provider_task_id = Some(provider_task_id);
                }
            }
            CreditEvent::VideoSucceeded { task_id, .. } => {
                self.settle_task(task_id, TaskStatus::Succeeded);
            }
            CreditEvent::VideoFailed { task_id, .. } => {
                self.settle_task(task_id, TaskStatus::Failed);
            }
            CreditEvent::CreditsRefunded { task_id, .. } => {
                if let Some(t) = self.tasks.get_mut(&task_id) {
                    t.refunded = true;
                }
            }
            CreditEvent::CreditsAdjusted {
                adjustment_id,
                credits,
                reason,
                ..
            } => {
                self.recent_adjustments.push_back(KnownAdjustment {
                    id: adjustment_id,
                    fingerprint: adjustment_fingerprint(credits, &reason),
                });
                while self.recent_adjustments.len() > RECENT_ADJUSTMENTS {
                    self.recent_adjustments.pop_front();
                }
            }
        }
    }

    fn set_task_status(&mut self, task_id: &str, status: TaskStatus) {
        if let Some(t) = self.tasks.get_mut(task_id) {
            t.status = status;
        }
    }

    /// A task reaches a final status: it joins the window of recently settled tasks, and the
    /// oldest one beyond the window is forgotten.
    fn settle_task(&mut self, task_id: String, status: TaskStatus) {
        let Some(t) = self.tasks.get_mut(&task_id) else {
            return;
        };
        let was_settled = t.is_settled();
        t.status = status;
        // Progress only matters while a task runs.
        t.progress = 0;
        if was_settled {
            return;
        }
        self.settled.push_back(task_id);
        while self.settled.len() > RECENT_SETTLED_TASKS {
            if let Some(oldest) = self.settled.pop_front() {
                self.tasks.remove(&oldest);
            }
        }
    }
}

/// Applies one event of a recharge's lifecycle to it. Never fails.
fn apply_to_recharge(r: &mut Recharge, event: &CreditEvent) {
    match event {
        CreditEvent::RechargeCheckoutCreated {
            checkout_session_id,
            checkout_url,
            ..
        } => {
            r.checkout_session_id = Some(checkout_session_id.clone());
            r.checkout_url = checkout_url.clone();
        }
        CreditEvent::RechargeCompleted { payment_id, .. } => {
            r.status = RechargeStatus::Completed;
            r.payment_id = Some(payment_id.clone());
        }
        CreditEvent::RechargeFailed { .. } => r.status = RechargeStatus::Failed,
        CreditEvent::RechargeCancelled { .. } => r.status = RechargeStatus::Cancelled,
        CreditEvent::RechargeReversed {
            credits,
            reversed_fen,
            ..
        } => {
            r.status = RechargeStatus::Reversed;
            r.reversed_credits += credits;
            r.reversed_fen = *reversed_fen;
            // Journals written before refunds and disputes were recorded as facts carry the
            // reversed amount only here: keep the facts at least as high, so it is never
            // "given back" by a later decision.
            let taken = r.taken_back_fen();
            if taken < *reversed_fen {
                r.refunded_fen += reversed_fen - taken;
            }
        }
        CreditEvent::RechargeReinstated {
            credits,
            reversed_fen,
            ..
        } => {
            r.reversed_credits -= credits;
            r.reversed_fen = *reversed_fen;
            r.status = if r.reversed_credits > 0 {
                RechargeStatus::Reversed
            } else {
                RechargeStatus::Completed
            };
        }
        CreditEvent::PaymentRefunded { refunded_fen, .. } => {
            r.refunded_fen = r.refunded_fen.max(*refunded_fen);
        }
        CreditEvent::PaymentDisputed {
            dispute_id,
            amount_fen,
            stage,
            ..
        } => {
            r.disputes.insert(
                dispute_id.clone(),
                Dispute {
                    amount_fen: *amount_fen,
                    stage: *stage,
                },
            );
        }
        _ => {}
    }
}

/// The money event that brings a credited recharge's clawed-back credits to what its
/// refunds and disputes say: a reversal, a reinstatement, or nothing. Nothing moves for a
/// recharge that was never credited: its facts are netted when it completes.
fn settle_reversal(
    recharge_id: &str,
    r: &Recharge,
    balance: i64,
    reason: &str,
    reference: &str,
) -> Result<Option<CreditEvent>, LedgerError> {
    if !r.is_credited() {
        return Ok(None);
    }
    let target_fen = r.taken_back_fen();
    let target = r.credits_of(target_fen)?;
    let delta = target - r.reversed_credits;
    if delta > 0 {
        Ok(Some(CreditEvent::RechargeReversed {
            recharge_id: recharge_id.to_owned(),
            credits: delta,
            reversed_fen: target_fen,
            reason: reason.to_owned(),
            reference: reference.to_owned(),
            balance_after: balance.checked_sub(delta).ok_or(LedgerError::Overflow)?,
        }))
    } else if delta < 0 {
        Ok(Some(CreditEvent::RechargeReinstated {
            recharge_id: recharge_id.to_owned(),
            credits: -delta,
            reversed_fen: target_fen,
            reason: reason.to_owned(),
            reference: reference.to_owned(),
            balance_after: balance.checked_sub(delta).ok_or(LedgerError::Overflow)?,
        }))
    } else {
        Ok(None)
    }
}

/// Control characters other than tab and line breaks have no place in stored text (and
/// PostgreSQL's jsonb refuses `\u0000`).
fn is_forbidden_control(c: char) -> bool {
    c.is_control() && !matches!(c, '\t' | '\n' | '\r')
}

/// Refuses text that a client sent with control characters in it.
fn check_clean(field: &'static str, value: &str) -> Result<(), LedgerError> {
    if value.chars().any(is_forbidden_control) {
        return Err(LedgerError::ControlCharacters { field });
    }
    Ok(())
}

/// Provider-supplied text is recorded as given, less control characters, and bounded.
fn clean(text: String) -> String {
    if text.chars().any(is_forbidden_control) {
        truncate(text.replace(is_forbidden_control, " "))
    } else {
        truncate(text)
    }
}

fn check_text(field: &'static str, value: &str) -> Result<(), LedgerError> {
    if value.trim().is_empty() || value.len() > MAX_TEXT {
        return Err(LedgerError::InvalidText { field });
    }
    Ok(())
}

/// Provider-supplied failure text is recorded as given, but bounded.
fn truncate(mut text: String) -> String {
    if text.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

impl Aggregate for CreditAccount {
    const TYPE: &'static str = "CreditAccount";
    type Command = CreditCommand;
    type Event = CreditEvent;
    type Error = LedgerError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        self.apply_event(event);
    }
}
