//! Settlement: no credit stays charged for a task that will never finish. Periodically,
//! tasks still open after `TASK_POLL_AFTER` are polled at the provider and settled as the
//! callback would; tasks charged but never submitted (the process died in between) are
//! refunded; tasks the provider does not know are refunded.

use std::time::Duration;

use actix_web::web;
use credit_domain::ports::{PollOutcome, ProviderStatus};
use credit_domain::{CreditCommand, LedgerError, UserId};
use credit_store::ExecuteError;
use tokio::sync::watch;

use crate::state::AppState;

/// A task running this long at the provider is given up on and refunded.
const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);

pub async fn run(state: web::Data<AppState>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(state.config.settlement_interval) => {}
            _ = shutdown.changed() => return,
        }
        match settle_once(&state).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(tasks = n, "settlement settled tasks"),
            Err(e) => tracing::error!(error = %format!("{e:#}"), "settlement pass failed"),
        }
    }
}

/// One pass; returns how many tasks it settled.
pub async fn settle_once(state: &AppState) -> anyhow::Result<usize> {
    let after = state.config.task_poll_after.as_secs_f64();
    let rows = {
        let client = state.db.read.get().await?;
        client
            .query(
                "SELECT id, user_id, provider_task_id, status,
                        extract(epoch FROM now() - created_at)::float8
                   FROM video_tasks
                  WHERE status IN ('pending', 'processing')
                    AND created_at < now() - make_interval(secs => $1)
                  ORDER BY created_at LIMIT 200",
                &[&after],
            )
            .await?
    };
    let mut settled = 0;
    for row in rows {
        let task_id: String = row.get(0);
        let Ok(user) = UserId::parse(&row.get::<_, String>(1)) else {
            continue;
        };
        let provider_task_id: Option<String> = row.get(2);
        let age: f64 = row.get(4);
        let outcome = match provider_task_id {
            None => {
                fail(
                    state,
                    &user,
                    &task_id,
                    "not_submitted",
                    "the task was charged but never reached the provider",
                )
                .await?
            }
            Some(pid) => match state.video.poll(&pid).await {
                Ok(PollOutcome::Found(result))
                    if result.status == ProviderStatus::Running
                        && age >= GIVE_UP_AFTER.as_secs_f64() =>
                {
                    fail(
                        state,
                        &user,
                        &task_id,
                        "timeout",
                        "the provider did not finish within 24 hours",
                    )
                    .await?
                }
                // Settled as the callback would settle it (running: progress only).
                Ok(PollOutcome::Found(result)) => {
                    crate::routes::settle(state, &user, &task_id, &result)
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))?
                        == "applied"
                }
                Ok(PollOutcome::NotFound) => {
                    fail(
                        state,
                        &user,
                        &task_id,
                        "provider_lost",
                        "the provider does not know this task",
                    )
                    .await?
                }
                Err(e) => {
                    tracing::warn!(task.id = %task_id, error = %e, "poll failed; will retry");
                    false
                }
            },
        };
        if outcome {
            settled += 1;
        }
        metrics::counter!("settlement_tasks_total", "settled" => outcome.to_string()).increment(1);
    }
    Ok(settled)
}

async fn fail(
    state: &AppState,
    user: &UserId,
    task_id: &str,
    reason: &str,
    message: &str,
) -> anyhow::Result<bool> {
    let command = CreditCommand::FailVideo {
        task_id: task_id.to_owned(),
        failure_reason: reason.to_owned(),
        error_message: message.to_owned(),
    };
    match state
        .ledger
        .execute(user, command, Default::default())
        .await
    {
        Ok(_) => {
            metrics::counter!("settlement_refunds_total", "reason" => reason.to_owned())
                .increment(1);
            Ok(true)
        }
        Err(ExecuteError::Rejected(LedgerError::TaskAlreadySettled { .. })) => Ok(false),
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}
