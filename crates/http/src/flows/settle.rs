//! Settlement: no credit stays charged for a task that will never finish, and no paid
//! recharge stays uncredited because its webhook was lost. Candidates come from the read
//! tables; every decision is taken on the account's events (a lagging projection can delay
//! a decision, never make a wrong one). One item that cannot be settled is logged with its
//! reason and retried on the next pass; it never stops the others.

use std::collections::HashMap;
use std::time::Duration;

use credit_domain::ports::{CheckoutStatus, PollOutcome, ProviderStatus};
use credit_domain::{CreditCommand, LedgerError, RechargeStatus, TaskStatus, UserId};
use credit_store::{queries, ExecuteError};
use serde::Serialize;

use super::video::{apply_result, ResultOutcome};
use crate::error::ApiError;
use crate::state::AppState;

/// A task running this long at the provider is given up on and refunded.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
/// How many tasks and recharges one pass looks at, each.
const PASS_LIMIT: i64 = 200;

/// What settlement did with one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskAction {
    /// Refunded: the provider lost it, never took it by the deadline, or ran past a day.
    Refunded,
    /// A polled result was applied as its callback would have been.
    Applied(ResultOutcome),
    /// Not yet decidable (still within its deadline, or the poll failed): next pass.
    Waiting,
    /// Settled already (the read table lagged).
    Settled,
}

/// What settlement did with one pending recharge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RechargeAction {
    Completed,
    Failed,
    Cancelled,
    /// Still open at Stripe, or its payment still in flight.
    Waiting,
    /// Decided already (the read table lagged), or not a Stripe recharge.
    Settled,
}

/// Counts of one pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Pass {
    pub tasks_settled: usize,
    pub recharges_settled: usize,
    pub errors: usize,
}

/// One pass over open tasks and pending recharges.
pub async fn settle_once(state: &AppState) -> anyhow::Result<Pass> {
    let mut pass = Pass::default();
    let config = &state.config;
    let task_after = config
        .task_poll_after
        .min(config.task_unknown_refund_after)
        .as_secs_f64();
    let (tasks, recharges) = {
        let client = state.db.read.get().await?;
        let tasks = queries::open_tasks(&client, task_after, PASS_LIMIT).await?;
        let recharges = queries::pending_recharges(
            &client,
            config.recharge_reconcile_after.as_secs_f64(),
            PASS_LIMIT,
        )
        .await?;
        (tasks, recharges)
    };
    for task in tasks {
        let Ok(user) = UserId::parse(&task.user_id) else {
            continue;
        };
        match settle_task(state, &user, &task.task_id, task.age_seconds).await {
            Ok(TaskAction::Refunded | TaskAction::Applied(ResultOutcome::Applied)) => {
                pass.tasks_settled += 1
            }
            Ok(_) => {}
            Err(e) => {
                pass.errors += 1;
                tracing::warn!(task.id = %task.task_id, account.id = %user, error = %e, "task not settled; will retry");
            }
        }
    }
    for recharge in recharges {
        let Ok(user) = UserId::parse(&recharge.user_id) else {
            continue;
        };
        match reconcile_recharge(state, &user, &recharge.recharge_id).await {
            Ok(RechargeAction::Waiting | RechargeAction::Settled) => {}
            Ok(_) => pass.recharges_settled += 1,
            Err(e) => {
                pass.errors += 1;
                tracing::warn!(recharge.id = %recharge.recharge_id, account.id = %user, error = %e, "recharge not reconciled; will retry");
            }
        }
    }
    Ok(pass)
}

/// Decides one task from its account's events; `age_seconds` is the time since it was
/// charged.
pub async fn settle_task(
    state: &AppState,
    user: &UserId,
    task_id: &str,
    age_seconds: f64,
) -> Result<TaskAction, ApiError> {
    let (account, _) = state.ledger.load(user).await?;
    let Some(task) = account.task(task_id) else {
        return Ok(TaskAction::Settled);
    };
    let config = &state.config;
    match (task.status, task.provider_task_id.clone()) {
        (TaskStatus::Succeeded | TaskStatus::Failed, _) => Ok(TaskAction::Settled),
        // Submitted: ask the provider.
        (_, Some(provider_task_id)) => {
            if age_seconds < config.task_poll_after.as_secs_f64() {
                return Ok(TaskAction::Waiting);
            }
            match state.video.poll(&provider_task_id).await {
                Ok(PollOutcome::Found(result))
                    if result.status == ProviderStatus::Running
                        && age_seconds >= GIVE_UP_AFTER.as_secs_f64() =>
                {
                    refund(
                        state,
                        user,
                        task_id,
                        "timeout",
                        "the provider did not finish within 24 hours",
                    )
                    .await
                }
                Ok(PollOutcome::Found(result)) => Ok(TaskAction::Applied(
                    apply_result(state, user, task_id, &result).await?,
                )),
                Ok(PollOutcome::NotFound) => {
                    refund(
                        state,
                        user,
                        task_id,
                        "provider_lost",
                        "the provider does not know this task",
                    )
                    .await
                }
                Err(e) => {
                    tracing::warn!(task.id = %task_id, error = %e, "poll failed; will retry");
                    Ok(TaskAction::Waiting)
                }
            }
        }
        // Charged, or uncertain: the provider may have taken it and we cannot ask (its id
        // is unknown). Only its callback, or the deadline with no sign of it, decides.
        (_, None) => {
            if age_seconds < config.task_unknown_refund_after.as_secs_f64() {
                return Ok(TaskAction::Waiting);
            }
            refund(
                state,
                user,
                task_id,
                "submission_unknown",
                "no sign that the provider took the task before the deadline",
            )
            .await
        }
    }
}

async fn refund(
    state: &AppState,
    user: &UserId,
    task_id: &str,
    reason: &str,
    message: &str,
) -> Result<TaskAction, ApiError> {
    let command = CreditCommand::FailVideo {
        task_id: task_id.to_owned(),
        failure_reason: reason.to_owned(),
        error_message: message.to_owned(),
    };
    match state.ledger.execute(user, command, HashMap::new()).await {
        Ok(_) => Ok(TaskAction::Refunded),
        Err(ExecuteError::Rejected(LedgerError::TaskAlreadySettled { .. })) => {
            Ok(TaskAction::Settled)
        }
        Err(e) => Err(e.into()),
    }
}

/// Checks one pending recharge at Stripe and completes, fails or cancels it from what Stripe
/// says, through the same commands (and so the same idempotency) as the webhook.
pub async fn reconcile_recharge(
    state: &AppState,
    user: &UserId,
    recharge_id: &str,
) -> Result<RechargeAction, ApiError> {
    let (account, _) = state.ledger.load(user).await?;
    let Some(recharge) = account.recharge(recharge_id) else {
        return Ok(RechargeAction::Settled);
    };
    let Some(payments) = &state.payments else {
        return Ok(RechargeAction::Settled);
    };
    if recharge.status != RechargeStatus::Pending || recharge.provider != payments.name() {
        return Ok(RechargeAction::Settled);
    }
    let (command, action) = match &recharge.checkout_session_id {
        // The checkout was never created (the process stopped in between): nobody can pay.
        None => (
            CreditCommand::FailRecharge {
                recharge_id: recharge_id.to_owned(),
                reason: "the checkout session was never created".to_owned(),
            },
            RechargeAction::Failed,
        ),
        Some(session_id) => {
            let session = payments
                .retrieve_checkout(session_id)
                .await
                .map_err(|e| ApiError::provider(e.to_string()))?;
            match decide_recharge(recharge_id, &session) {
                Some(decided) => decided,
                None => return Ok(RechargeAction::Waiting),
            }
        }
    };
    let meta = HashMap::from([("reconciled".to_owned(), "settlement".to_owned())]);
    match state.ledger.execute(user, command, meta).await {
        Ok(_) => {
            tracing::info!(recharge.id = %recharge_id, account.id = %user, action = ?action, "recharge reconciled with the provider");
            Ok(action)
        }
        Err(ExecuteError::Rejected(
            LedgerError::RechargeAlreadyCompleted { .. } | LedgerError::RechargeNotPending { .. },
        )) => Ok(RechargeAction::Settled),
        Err(e) => Err(e.into()),
    }
}

/// The command a retrieved session calls for, if any.
fn decide_recharge(
    recharge_id: &str,
    session: &CheckoutStatus,
) -> Option<(CreditCommand, RechargeAction)> {
    if session.payment_status == "paid" {
        return Some((
            CreditCommand::CompleteRecharge {
                recharge_id: recharge_id.to_owned(),
                amount_fen: session.amount_total.unwrap_or(-1),
                currency: session.currency.clone().unwrap_or_default(),
                payment_id: session
                    .payment_intent
                    .clone()
                    .unwrap_or_else(|| session.session_id.clone()),
            },
            RechargeAction::Completed,
        ));
    }
    if session.status == "expired" {
        return Some((
            CreditCommand::CancelRecharge {
                recharge_id: recharge_id.to_owned(),
            },
            RechargeAction::Cancelled,
        ));
    }
    if session.payment_failed {
        return Some((
            CreditCommand::FailRecharge {
                recharge_id: recharge_id.to_owned(),
                reason: "async payment failed".to_owned(),
            },
            RechargeAction::Failed,
        ));
    }
    None
}
