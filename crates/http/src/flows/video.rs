//! Video tasks: charge then submit (`generate`), and provider results (callback and
//! settlement alike, `apply_result`). The charge is durable before the provider is called; a
//! clear refusal is refunded at once; an unknown outcome stays charged and says so.

use std::collections::HashMap;

use credit_domain::ports::{ProviderError, ProviderStatus, VideoRequest, VideoResult};
use credit_domain::{CreditAccount, CreditCommand, LedgerError, TaskStatus, UserId, VideoSpec};
use credit_store::{queries, read_models, ExecuteError};
use serde::Serialize;

use crate::error::ApiError;
use crate::state::AppState;

/// A generate request, validated.
pub struct Generate {
    pub user: UserId,
    pub task_id: String,
    pub video: VideoSpec,
    /// The per-task callback token (only its hash is recorded).
    pub callback_token: String,
    pub callback_token_sha256: String,
    pub metadata: HashMap<String, String>,
}

/// What a generate request came to.
#[derive(Debug)]
pub enum GenerateOutcome {
    /// Charged and accepted by the provider.
    Submitted { credits_charged: i64, balance: i64 },
    /// Charged; the provider's answer is unknown. Its callback or the settlement deadline
    /// decides; the credits stay charged until then.
    Uncertain { credits_charged: i64, balance: i64 },
    /// The provider clearly refused: the credits were refunded.
    Refunded { balance: i64 },
    /// A retry with the same Idempotency-Key and the same request: the task as it stands.
    Replayed(ReplayedTask),
}

/// A task as a retry of its generate request shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayedTask {
    pub status: TaskStatus,
    pub credits_charged: i64,
    pub refunded: bool,
    /// The account's balance now.
    pub balance: i64,
}

pub async fn generate(state: &AppState, req: Generate) -> Result<GenerateOutcome, ApiError> {
    let Generate {
        user,
        task_id,
        video,
        callback_token,
        callback_token_sha256,
        metadata,
    } = req;
    let cost = state.config.pricing.video_cost_credits;
    let charged = state
        .ledger
        .execute(
            &user,
            CreditCommand::DeductForTask {
                task_id: task_id.clone(),
                credits: cost,
                description: format!("Sora 2 video ({}s, {})", video.duration, video.aspect_ratio),
                video: video.clone(),
                callback_token_sha256,
            },
            metadata.clone(),
        )
        .await;
    match charged {
        Ok(_) => {}
        Err(ExecuteError::Rejected(LedgerError::TaskAlreadyCharged { .. })) => {
            let (account, _) = state.ledger.load(&user).await?;
            return replay(state, &user, &task_id, &video, &account).await;
        }
        Err(e) => return Err(e.into()),
    }

    let callback_url = format!(
        "{}/api/video/callback?account={}&task={}&token={}",
        state.config.public_base_url,
        urlencode(user.as_str()),
        task_id,
        callback_token
    );
    let submitted = state
        .video
        .submit(&VideoRequest {
            prompt: video.prompt.clone(),
            aspect_ratio: video.aspect_ratio.clone(),
            duration: video.duration,
            size: video.size.clone(),
            image_url: video.reference_url.clone(),
            callback_url,
        })
        .await;
    let command = match &submitted {
        Ok(provider_task_id) => CreditCommand::MarkTaskSubmitted {
            task_id: task_id.clone(),
            provider_task_id: provider_task_id.clone(),
        },
        Err(ProviderError::Unavailable(e)) => {
            tracing::warn!(error = %e, task.id = %task_id, "video submission outcome unknown; task stays charged");
            CreditCommand::MarkSubmissionUncertain {
                task_id: task_id.clone(),
                error_message: e.clone(),
            }
        }
        Err(ProviderError::Rejected(e)) => {
            tracing::warn!(error = %e, task.id = %task_id, "video provider refused, refunding");
            CreditCommand::FailVideo {
                task_id: task_id.clone(),
                failure_reason: "provider_error".to_owned(),
                error_message: e.clone(),
            }
        }
    };
    let recorded = state.ledger.execute(&user, command, metadata).await;
    let balance = match recorded {
        Ok(done) => done.balance,
        // A very fast callback may have settled the task already: the account says how.
        Err(ExecuteError::Rejected(_)) => state.ledger.load(&user).await?.0.balance(),
        Err(e) => return Err(e.into()),
    };
    Ok(match submitted {
        Ok(_) => GenerateOutcome::Submitted {
            credits_charged: cost,
            balance,
        },
        Err(ProviderError::Unavailable(_)) => GenerateOutcome::Uncertain {
            credits_charged: cost,
            balance,
        },
        Err(ProviderError::Rejected(_)) => GenerateOutcome::Refunded { balance },
    })
}

/// The answer to a retry of a generate request whose task exists: the task as it stands, if
/// the retry asks for the same video. The account keeps the task while it is open or recently
/// settled; a task settled long ago is read from the journal (its charge) and the caught-up
/// read table (how it ended).
async fn replay(
    state: &AppState,
    user: &UserId,
    task_id: &str,
    video: &VideoSpec,
    account: &CreditAccount,
) -> Result<GenerateOutcome, ApiError> {
    if let Some(task) = account.task(task_id) {
        let same = task
            .spec_sha256
            .as_deref()
            .is_none_or(|known| known == video.fingerprint());
        if !same {
            return Err(crate::error::idempotency_conflict());
        }
        return Ok(GenerateOutcome::Replayed(ReplayedTask {
            status: task.status,
            credits_charged: task.credits,
            refunded: task.refunded,
            balance: account.balance(),
        }));
    }
    let client = state.read_own(user).await?;
    let Some(charged) = queries::charged_task(&client, user.as_str(), task_id)
        .await
        .map_err(ApiError::from_store)?
    else {
        return Err(ApiError::internal(
            "a task refused as charged is not in the journal",
        ));
    };
    if charged.spec_sha256 != video.fingerprint() {
        return Err(crate::error::idempotency_conflict());
    }
    let record = read_models::task(&client, user.as_str(), task_id)
        .await
        .map_err(ApiError::from_store)?;
    // Forgotten tasks are settled; the read table, caught up above, says how.
    let status = record
        .as_ref()
        .and_then(|r| TaskStatus::ALL.into_iter().find(|s| s.as_str() == r.status))
        .unwrap_or(TaskStatus::Succeeded);
    Ok(GenerateOutcome::Replayed(ReplayedTask {
        status,
        credits_charged: charged.credits,
        refunded: record.as_ref().is_some_and(|r| r.refunded),
        balance: account.balance(),
    }))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What a provider result did to its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultOutcome {
    /// Succeeded or failed (and refunded), recorded now.
    Applied,
    /// A running update: progress shown.
    Progress,
    /// The task was settled before; nothing changed.
    AlreadySettled,
    /// A video for a task already refunded: recorded, the refund stands.
    DeliveredAfterRefund,
    /// A result for another provider task than the one this task was submitted as.
    IgnoredMismatchedId,
}

/// Applies a provider result to a task, deciding on the account's events.
pub async fn apply_result(
    state: &AppState,
    user: &UserId,
    task_id: &str,
    result: &VideoResult,
) -> Result<ResultOutcome, ApiError> {
    let (account, _) = state.ledger.load(user).await?;
    let Some(task) = account.task(task_id) else {
        // The account forgets only settled tasks: one the journal charged was settled.
        let client = state.read().await?;
        let charged = queries::charged_task(&client, user.as_str(), task_id)
            .await
            .map_err(ApiError::from_store)?;
        return match charged {
            Some(_) => Ok(ResultOutcome::AlreadySettled),
            None => Err(LedgerError::UnknownTask {
                task_id: task_id.to_owned(),
            }
            .into()),
        };
    };
    match &task.provider_task_id {
        Some(known) if known != &result.provider_task_id => {
            tracing::warn!(task.id = %task_id, "result for another provider task id; ignored");
            return Ok(ResultOutcome::IgnoredMismatchedId);
        }
        Some(_) => {}
        // The submission's answer was lost (or not recorded yet): the result names the
        // provider's task, so record it first.
        None if matches!(task.status, TaskStatus::Pending | TaskStatus::Uncertain) => {
            let marked = state
                .ledger
                .execute(
                    user,
                    CreditCommand::MarkTaskSubmitted {
                        task_id: task_id.to_owned(),
                        provider_task_id: result.provider_task_id.clone(),
                    },
                    HashMap::new(),
                )
                .await;
            match marked {
                Ok(_) | Err(ExecuteError::Rejected(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        None => {}
    }
    let command = match result.status {
        ProviderStatus::Running => {
            let command = CreditCommand::RecordProgress {
                task_id: task_id.to_owned(),
                progress: result.progress,
            };
            return match state.ledger.execute(user, command, HashMap::new()).await {
                Ok(_) | Err(ExecuteError::Rejected(LedgerError::StaleProgress { .. })) => {
                    Ok(ResultOutcome::Progress)
                }
                Err(ExecuteError::Rejected(LedgerError::TaskAlreadySettled { .. })) => {
                    Ok(ResultOutcome::AlreadySettled)
                }
                Err(e) => Err(e.into()),
            };
        }
        ProviderStatus::Succeeded => match &result.video_url {
            Some(url) => CreditCommand::RecordVideoSuccess {
                task_id: task_id.to_owned(),
                video_url: url.clone(),
                remove_watermark: result.remove_watermark,
                pid: result.pid.clone(),
            },
            // "Succeeded" without a video is no video: treat as a failure, refund.
            None => CreditCommand::FailVideo {
                task_id: task_id.to_owned(),
                failure_reason: "error".to_owned(),
                error_message: "provider reported success without a video URL".to_owned(),
            },
        },
        ProviderStatus::Failed => CreditCommand::FailVideo {
            task_id: task_id.to_owned(),
            failure_reason: result
                .failure_reason
                .clone()
                .unwrap_or_else(|| "error".to_owned()),
            error_message: result.error.clone().unwrap_or_default(),
        },
    };
    let late = matches!(command, CreditCommand::RecordVideoSuccess { .. })
        && task.status == TaskStatus::Failed;
    match state.ledger.execute(user, command, HashMap::new()).await {
        Ok(_) if late => Ok(ResultOutcome::DeliveredAfterRefund),
        Ok(_) => Ok(ResultOutcome::Applied),
        Err(ExecuteError::Rejected(LedgerError::TaskAlreadySettled { .. })) => {
            Ok(ResultOutcome::AlreadySettled)
        }
        Err(e) => Err(e.into()),
    }
}
