use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::account::DisputeStage;

/// What was asked of the video provider, recorded with the deduction that paid for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoSpec {
    pub model: String,
    pub prompt: String,
    pub aspect_ratio: String,
    pub duration: u32,
    pub size: String,
    pub reference_url: Option<String>,
}

impl VideoSpec {
    /// SHA-256 (hex) of the request's fields: a retry with the same Idempotency-Key must ask
    /// for the same video.
    pub fn fingerprint(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        hex_sha256(&text)
    }
}

pub(crate) fn hex_sha256(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Everything that can be asked of a `CreditAccount`. Every command names the thing it acts
/// on (recharge, task, adjustment id), so repeating a command can never apply it twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CreditCommand {
    /// Open a pending recharge. Credits are computed here from `amount_fen` and the price,
    /// never taken from a client.
    RequestRecharge {
        recharge_id: String,
        amount_fen: i64,
        currency: String,
        credits_per_yuan: i64,
        provider: String,
    },
    /// Record the provider's checkout session for a pending recharge.
    AttachCheckout {
        recharge_id: String,
        checkout_session_id: String,
        checkout_url: Option<String>,
    },
    /// The provider says the payment was received, for this amount and currency.
    CompleteRecharge {
        recharge_id: String,
        amount_fen: i64,
        currency: String,
        payment_id: String,
    },
    FailRecharge {
        recharge_id: String,
        reason: String,
    },
    CancelRecharge {
        recharge_id: String,
    },
    /// The provider says `refunded_fen` of the payment has been refunded so far
    /// (cumulative). Accepted in any state of the recharge, even pending: a refund that
    /// arrives before the completion is netted when the completion comes.
    RecordRefund {
        recharge_id: String,
        refunded_fen: i64,
        reference: String,
    },
    /// A dispute on the payment reached `stage`. Stages only move forward; a stage that is
    /// not beyond the one recorded changes nothing.
    RecordDispute {
        recharge_id: String,
        dispute_id: String,
        amount_fen: i64,
        stage: DisputeStage,
    },
    /// Charge `credits` for a new video task.
    DeductForTask {
        task_id: String,
        credits: i64,
        description: String,
        video: VideoSpec,
        callback_token_sha256: String,
    },
    /// The submission's outcome is unknown: keep the task charged, say so.
    MarkSubmissionUncertain {
        task_id: String,
        error_message: String,
    },
    MarkTaskSubmitted {
        task_id: String,
        provider_task_id: String,
    },
    /// A running update from the provider: progress only moves up, and only while the task is
    /// open.
    RecordProgress {
        task_id: String,
        progress: u8,
    },
    RecordVideoSuccess {
        task_id: String,
        video_url: String,
        remove_watermark: Option<bool>,
        pid: Option<String>,
    },
    /// The task failed (or will never run): record it and refund its credits, exactly once.
    FailVideo {
        task_id: String,
        failure_reason: String,
        error_message: String,
    },
    /// An operator grant (positive) or correction (negative); may not go below zero.
    Adjust {
        adjustment_id: String,
        credits: i64,
        actor: String,
        reason: String,
    },
}

impl CreditCommand {
    /// The command's variant name (`RequestRecharge`, ...), for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RequestRecharge { .. } => "RequestRecharge",
            Self::AttachCheckout { .. } => "AttachCheckout",
            Self::CompleteRecharge { .. } => "CompleteRecharge",
            Self::FailRecharge { .. } => "FailRecharge",
            Self::CancelRecharge { .. } => "CancelRecharge",
            Self::RecordRefund { .. } => "RecordRefund",
            Self::RecordDispute { .. } => "RecordDispute",
            Self::DeductForTask { .. } => "DeductForTask",
            Self::MarkSubmissionUncertain { .. } => "MarkSubmissionUncertain",
            Self::MarkTaskSubmitted { .. } => "MarkTaskSubmitted",
            Self::RecordProgress { .. } => "RecordProgress",
            Self::RecordVideoSuccess { .. } => "RecordVideoSuccess",
            Self::FailVideo { .. } => "FailVideo",
            Self::Adjust { .. } => "Adjust",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_sha256_is_lowercase_hex_of_the_digest() {
        assert_eq!(
            hex_sha256("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex_sha256(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn a_commands_kind_is_its_variant_name() {
        let commands = [
            CreditCommand::FailVideo {
                task_id: "t".into(),
                failure_reason: "r".into(),
                error_message: "e".into(),
            },
            CreditCommand::Adjust {
                adjustment_id: "a".into(),
                credits: 1,
                actor: "ops".into(),
                reason: "r".into(),
            },
        ];
        for command in commands {
            let debug = format!("{command:?}");
            assert!(
                debug.starts_with(&format!("{} {{", command.kind())),
                "{debug}"
            );
        }
    }
}
