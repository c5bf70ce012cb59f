use std::collections::{BTreeMap, BTreeSet};

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
    pub reversed_fen: i64,
    pub reversed_credits: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Charged, provider not (yet) called.
    Charged,
    Submitted,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub credits: i64,
    pub status: TaskStatus,
    pub refunded: bool,
    pub provider_task_id: Option<String>,
    pub callback_token_sha256: String,
}

impl Task {
    pub fn is_settled(&self) -> bool {
        matches!(self.status, TaskStatus::Succeeded | TaskStatus::Failed)
    }
}

/// One user's credits. The aggregate id is the user id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditAccount {
    balance: i64,
    recharges: BTreeMap<String, Recharge>,
    tasks: BTreeMap<String, Task>,
    adjustments: BTreeSet<String>,
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
                Ok(vec![CreditEvent::RechargeCompleted {
                    recharge_id,
                    credits: recharge.credits,
                    payment_id,
                    balance_after,
                }])
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
            CreditCommand::ReverseRecharge {
                recharge_id,
                reversed_fen,
                reason,
                reference,
            } => {
                check_text("reason", &reason)?;
                check_text("reference", &reference)?;
                if reversed_fen <= 0 {
                    return Err(LedgerError::NonPositiveAmount);
                }
                let recharge = self.known_recharge(&recharge_id)?;
                if !matches!(
                    recharge.status,
                    RechargeStatus::Completed | RechargeStatus::Reversed
                ) {
                    return Err(LedgerError::RechargeNotCompleted { recharge_id });
                }
                let reversed_fen = reversed_fen.min(recharge.amount_fen);
                // Credits to claw back in total, in proportion to what was refunded; the
                // whole recharge is clawed back exactly when the whole amount is.
                // Computed in i128: credits * fen may exceed i64 for a large recharge, the
                // quotient never exceeds `credits`.
                let target = i64::try_from(
                    i128::from(recharge.credits) * i128::from(reversed_fen)
                        / i128::from(recharge.amount_fen),
                )
                .map_err(|_| LedgerError::Overflow)?;
                let credits = target - recharge.reversed_credits;
                if reversed_fen <= recharge.reversed_fen || credits <= 0 {
                    return Err(LedgerError::NothingToReverse { recharge_id });
                }
                let balance_after = self.add(-credits)?;
                Ok(vec![CreditEvent::RechargeReversed {
                    recharge_id,
                    credits,
                    reversed_fen,
                    reason,
                    reference,
                    balance_after,
                }])
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
                let task = self.known_task(&task_id)?;
                match task.status {
                    TaskStatus::Charged => Ok(vec![CreditEvent::VideoTaskSubmitted {
                        task_id,
                        provider_task_id,
                    }]),
                    TaskStatus::Submitted => Err(LedgerError::TaskAlreadySubmitted { task_id }),
                    TaskStatus::Succeeded | TaskStatus::Failed => {
                        Err(LedgerError::TaskAlreadySettled { task_id })
                    }
                }
            }
            CreditCommand::RecordVideoSuccess {
                task_id,
                video_url,
                remove_watermark,
                pid,
            } => {
                check_text("video_url", &video_url)?;
                let task = self.known_task(&task_id)?;
                if task.is_settled() {
                    return Err(LedgerError::TaskAlreadySettled { task_id });
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
                        failure_reason: truncate(failure_reason),
                        error_message: truncate(error_message),
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
                if credits == 0 {
                    return Err(LedgerError::ZeroAdjustment);
                }
                if self.adjustments.contains(&adjustment_id) {
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
                    },
                );
            }
            CreditEvent::RechargeCheckoutCreated {
                recharge_id,
                checkout_session_id,
                checkout_url,
            } => {
                if let Some(r) = self.recharges.get_mut(&recharge_id) {
                    r.checkout_session_id = Some(checkout_session_id);
                    r.checkout_url = checkout_url;
                }
            }
            CreditEvent::RechargeCompleted {
                recharge_id,
                payment_id,
                ..
            } => {
                if let Some(r) = self.recharges.get_mut(&recharge_id) {
                    r.status = RechargeStatus::Completed;
                    r.payment_id = Some(payment_id);
                }
            }
            CreditEvent::RechargeFailed { recharge_id, .. } => {
                self.set_recharge_status(&recharge_id, RechargeStatus::Failed);
            }
            CreditEvent::RechargeCancelled { recharge_id } => {
                self.set_recharge_status(&recharge_id, RechargeStatus::Cancelled);
            }
            CreditEvent::RechargeReversed {
                recharge_id,
                credits,
                reversed_fen,
                ..
            } => {
                if let Some(r) = self.recharges.get_mut(&recharge_id) {
                    r.status = RechargeStatus::Reversed;
                    r.reversed_fen = reversed_fen;
                    r.reversed_credits += credits;
                }
            }
            CreditEvent::CreditsDeducted {
                task_id,
                credits,
                callback_token_sha256,
                ..
            } => {
                self.tasks.insert(
                    task_id,
                    Task {
                        credits,
                        status: TaskStatus::Charged,
                        refunded: false,
                        provider_task_id: None,
                        callback_token_sha256,
                    },
                );
            }
            CreditEvent::VideoTaskSubmitted {
                task_id,
                provider_task_id,
            } => {
                if let Some(t) = self.tasks.get_mut(&task_id) {
                    t.status = TaskStatus::Submitted;
                    t.provider_task_id = Some(provider_task_id);
                }
            }
            CreditEvent::VideoSucceeded { task_id, .. } => {
                self.set_task_status(&task_id, TaskStatus::Succeeded);
            }
            CreditEvent::VideoFailed { task_id, .. } => {
                self.set_task_status(&task_id, TaskStatus::Failed);
            }
            CreditEvent::CreditsRefunded { task_id, .. } => {
                if let Some(t) = self.tasks.get_mut(&task_id) {
                    t.refunded = true;
                }
            }
            CreditEvent::CreditsAdjusted { adjustment_id, .. } => {
                self.adjustments.insert(adjustment_id);
            }
        }
    }

    fn set_recharge_status(&mut self, recharge_id: &str, status: RechargeStatus) {
        if let Some(r) = self.recharges.get_mut(recharge_id) {
            r.status = status;
        }
    }

    fn set_task_status(&mut self, task_id: &str, status: TaskStatus) {
        if let Some(t) = self.tasks.get_mut(task_id) {
            t.status = status;
        }
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
