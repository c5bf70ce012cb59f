//! A stand-in for Grsai in demo mode (no API key): it accepts every task at once and, a few
//! seconds later, POSTs Grsai-shaped result objects to the task's callback URL, so the
//! service's real callback endpoint, token check, settlement and refund paths all run.
//! Prompts containing `[fail]` end in a moderation failure, to demo refunds.
//!
//! It runs inside the service process and keeps results in memory (lost on restart, never
//! evicted): it is for development and demos, which the binary only allows on loopback.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use credit_domain::ports::{
    PollOutcome, ProviderError, ProviderStatus, VideoProvider, VideoRequest, VideoResult,
};
use reqwest::Url;

use crate::wire::encode_result;

/// The video every successful simulated task "produces": a short CC0 clip (a flower, 5 s,
/// H.264) that MDN hosts for its `<video>` examples, chosen because any browser plays it and
/// it needs nothing from this service. Only the user's browser fetches it; the service never
/// does. Override it with [`SimulatedVideoProvider::with_video_url`] (e.g. for a fully offline
/// demo, a file served by the front end).
pub const DEFAULT_SAMPLE_VIDEO_URL: &str =
    "https://interactive-examples.mdn.mozilla.net/media/cc0-videos/flower.mp4";

/// Prompts containing this marker fail with `input_moderation`.
const FAIL_MARKER: &str = "[fail]";
/// How long one callback delivery may take.
const CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts for the terminal callback; progress callbacks are sent once, like Grsai's.
const TERMINAL_ATTEMPTS: u32 = 3;

/// [`VideoProvider`] that simulates Grsai; see the module documentation.
#[derive(Debug, Clone)]
pub struct SimulatedVideoProvider {
    http: reqwest::Client,
    delay: Duration,
    video_url: String,
    results: Arc<Mutex<HashMap<String, VideoResult>>>,
}

impl Default for SimulatedVideoProvider {
    fn default() -> Self {
        Self::new()
    }
}

impl SimulatedVideoProvider {
    /// Default time from submission to the terminal callback.
    pub const DEFAULT_DELAY: Duration = Duration::from_secs(3);

    /// A provider that answers after [`Self::DEFAULT_DELAY`] with [`DEFAULT_SAMPLE_VIDEO_URL`].
    pub fn new() -> Self {
        let http = reqwest::Client::builder()
            .timeout(CALLBACK_TIMEOUT)
            .build()
            .unwrap_or_default();
        Self {
            http,
            delay: Self::DEFAULT_DELAY,
            video_url: DEFAULT_SAMPLE_VIDEO_URL.to_owned(),
            results: Arc::default(),
        }
    }

    /// Time from submission to the terminal callback; the `running` (50 %) callback comes
    /// half-way.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// The video URL reported for successful tasks.
    pub fn with_video_url(mut self, url: impl Into<String>) -> Self {
        self.video_url = url.into();
        self
    }

    fn store(&self, result: &VideoResult) {
        self.results
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(result.provider_task_id.clone(), result.clone());
    }

    /// Plays one task: progress half-way, the terminal result at the end.
    async fn run(self, callback: Url, running: VideoResult, terminal: VideoResult) {
        let half = self.delay / 2;
        tokio::time::sleep(half).await;
        self.store(&running);
        self.deliver(&callback, &running).await;

        tokio::time::sleep(self.delay.saturating_sub(half)).await;
        self.store(&terminal);
        for attempt in 1..=TERMINAL_ATTEMPTS {
            if self.deliver(&callback, &terminal).await {
                return;
            }
            if attempt < TERMINAL_ATTEMPTS {
                tokio::time::sleep(Duration::from_millis(500) * attempt).await;
            }
        }
        tracing::warn!(
            grsai.task_id = %terminal.provider_task_id,
            "simulated provider gave up delivering the terminal callback; polling will find it"
        );
    }

    /// POSTs one result object; true when the endpoint accepted it (2xx).
    async fn deliver(&self, callback: &Url, result: &VideoResult) -> bool {
        let task_id = result.provider_task_id.as_str();
        match self
            .http
            .post(callback.clone())
            .json(&encode_result(result))
            .send()
            .await
        {
            Ok(response) if response.status().is_success() => {
                tracing::debug!(grsai.task_id = task_id, status = ?result.status, "simulated callback delivered");
                true
            }
            Ok(response) => {
                tracing::warn!(
                    grsai.task_id = task_id,
                    http.status = response.status().as_u16(),
                    "simulated callback refused"
                );
                false
            }
            Err(error) => {
                // `without_url`: the callback URL carries the task's secret token.
                tracing::warn!(grsai.task_id = task_id, error = %error.without_url(), "simulated callback failed");
                false
            }
        }
    }
}

#[async_trait]
impl VideoProvider for SimulatedVideoProvider {
    async fn submit(&self, req: &VideoRequest) -> Result<String, ProviderError> {
        if req.prompt.trim().is_empty() {
            return Err(ProviderError::Rejected("prompt is required".into()));
        }
        let callback = Url::parse(&req.callback_url)
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https"))
            .ok_or_else(|| ProviderError::Rejected("webHook must be an http(s) URL".into()))?;

        let id = format!("sim-{}", uuid::Uuid::new_v4());
        let base = VideoResult {
            provider_task_id: id.clone(),
            status: ProviderStatus::Running,
            progress: 0,
            video_url: None,
            remove_watermark: None,
            pid: None,
            failure_reason: None,
            error: None,
        };
        let running = VideoResult {
            progress: 50,
            ..base.clone()
        };
        let terminal = if req.prompt.contains(FAIL_MARKER) {
            VideoResult {
                status: ProviderStatus::Failed,
                progress: 100,
                failure_reason: Some("input_moderation".into()),
                error: Some(format!(
                    "The prompt was rejected by content moderation (simulated: it contains {FAIL_MARKER})."
                )),
                ..base.clone()
            }
        } else {
            VideoResult {
                status: ProviderStatus::Succeeded,
                progress: 100,
                video_url: Some(self.video_url.clone()),
                remove_watermark: Some(true),
                pid: Some(format!(
                    "s_{}",
                    id.trim_start_matches("sim-").replace('-', "")
                )),
                ..base.clone()
            }
        };
        self.store(&base);
        tokio::spawn(self.clone().run(callback, running, terminal));
        tracing::info!(grsai.task_id = %id, "simulated video task accepted (demo mode, no Grsai call)");
        Ok(id)
    }

    async fn poll(&self, provider_task_id: &str) -> Result<PollOutcome, ProviderError> {
        let found = self
            .results
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(provider_task_id)
            .cloned();
        Ok(found.map_or(PollOutcome::NotFound, PollOutcome::Found))
    }
}
