//! Ports: the small traits through which the outside world (payments, video generation)
//! reaches the application. The domain owns them; adapter crates (`credit-stripe`,
//! `credit-grsai`) implement them. Nothing here does I/O.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Failure of an outside provider. `Rejected` is a definite "no" (nothing was created, safe to
/// refund or mark failed); `Unavailable` means the outcome is unknown (time-out or connection
/// lost after the request was sent, a gateway error, an unreadable answer): the request may
/// have been carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    #[error("provider rejected the request: {0}")]
    Rejected(String),
    #[error("provider unavailable: {0}")]
    Unavailable(String),
}

/// What the service asks the payment provider to sell: one line item, priced in fen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutRequest {
    pub user_id: String,
    pub recharge_id: String,
    /// Price in the smallest currency unit (fen for `cny`).
    pub amount_fen: i64,
    /// ISO currency code in lower case, e.g. `cny`.
    pub currency: String,
    /// Credits the payment buys, shown in the product name.
    pub credits: i64,
    pub success_url: String,
    pub cancel_url: String,
}

/// A created checkout session: where to send the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutSession {
    pub session_id: String,
    pub url: Option<String>,
}

/// A checkout session as the provider sees it now: how a lost webhook is reconciled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutStatus {
    pub session_id: String,
    /// `open`, `complete` or `expired`.
    pub status: String,
    /// `paid`, `unpaid` or `no_payment_required`.
    pub payment_status: String,
    pub amount_total: Option<i64>,
    pub currency: Option<String>,
    /// The payment reference (Stripe payment intent), once there is one.
    pub payment_intent: Option<String>,
    /// Whether the payment failed for good (its payment intent was cancelled or needs a new
    /// payment method after an asynchronous failure).
    pub payment_failed: bool,
    /// Cumulative amount refunded on the payment's charge.
    pub amount_refunded: i64,
    /// Whether the payment's charge is disputed.
    pub disputed: bool,
}

/// The payment side: creates checkout sessions. Completion arrives later by webhook, or is
/// found by retrieving the session.
#[async_trait]
pub trait PaymentProvider: Send + Sync {
    /// The provider's name as recorded in `recharge_records.payment_method` (`stripe`, `demo`).
    fn name(&self) -> &'static str;
    async fn create_checkout(
        &self,
        req: &CheckoutRequest,
    ) -> Result<CheckoutSession, ProviderError>;
    /// The session as it stands at the provider.
    async fn retrieve_checkout(&self, session_id: &str) -> Result<CheckoutStatus, ProviderError>;
}

/// A video generation request as the service forwards it to the provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoRequest {
    pub prompt: String,
    /// `9:16` or `16:9`.
    pub aspect_ratio: String,
    /// 10 or 15 seconds.
    pub duration: u32,
    /// `small` or `large`.
    pub size: String,
    /// Optional reference image URL.
    pub image_url: Option<String>,
    /// Where the provider must POST results (already carries the per-task token).
    pub callback_url: String,
}

/// Status of a provider task, as reported by callback or poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderStatus {
    Running,
    Succeeded,
    Failed,
}

/// One result object (callback body, or `data` of a poll answer), normalised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoResult {
    pub provider_task_id: String,
    pub status: ProviderStatus,
    pub progress: u8,
    pub video_url: Option<String>,
    pub remove_watermark: Option<bool>,
    pub pid: Option<String>,
    pub failure_reason: Option<String>,
    pub error: Option<String>,
}

/// What a poll found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollOutcome {
    Found(VideoResult),
    /// The provider does not know the task (Grsai `code` -22).
    NotFound,
}

/// The video side: submits generation tasks and polls them.
#[async_trait]
pub trait VideoProvider: Send + Sync {
    /// Submits a task; returns the provider's task id.
    async fn submit(&self, req: &VideoRequest) -> Result<String, ProviderError>;
    /// Asks for the current result of a task.
    async fn poll(&self, provider_task_id: &str) -> Result<PollOutcome, ProviderError>;
}
