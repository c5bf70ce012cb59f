//! The real Grsai API over HTTPS.
//!
//! Error mapping follows the port's contract: [`ProviderError::Rejected`] only when Grsai
//! definitely said no (a non-zero `code`; an HTTP 4xx, or a 5xx other than a gateway's
//! 502/504, with a body; a connection that could not be opened, so nothing was sent),
//! [`ProviderError::Unavailable`] for everything where we cannot know what happened (time-out
//! or connection lost after the request was sent, a gateway's 502/504, an empty 5xx, an
//! answer we cannot read): the task may have been taken. The API key lives in a [`SecretString`] and in a header marked sensitive;
//! it is never logged, and neither are prompts or callback URLs (the latter carry a per-task
//! token).

use std::time::Duration;

use async_trait::async_trait;
use credit_domain::ports::{PollOutcome, ProviderError, VideoProvider, VideoRequest};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use crate::wire::{
    parse_result_value, CreateVideoBody, CreatedTask, Envelope, PollBody, CODE_NOT_FOUND, CODE_OK,
};

/// The model this service sells.
const MODEL: &str = "sora-2";
const CREATE_PATH: &str = "/v1/video/sora-video";
const RESULT_PATH: &str = "/v1/draw/result";

/// How to reach Grsai.
#[derive(Debug, Clone)]
pub struct GrsaiConfig {
    /// Scheme and host, optionally with a path prefix, e.g. `https://grsai.dakka.com.cn`
    /// (mainland China) or `https://grsaiapi.com` (overseas). `http://` is accepted for local
    /// fakes.
    pub base_url: String,
    /// Sent as `Authorization: Bearer <key>`.
    pub api_key: SecretString,
    /// Limit for a whole call (connect, send, read the answer). Submitting returns at once
    /// because results come by callback, so a few seconds are plenty.
    pub timeout: Duration,
}

impl GrsaiConfig {
    /// Default for [`GrsaiConfig::timeout`].
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

    /// A configuration with the default time-out.
    pub fn new(base_url: impl Into<String>, api_key: SecretString) -> Self {
        Self {
            base_url: base_url.into(),
            api_key,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }
}

/// A configuration that cannot work; reported at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid Grsai base URL {url:?}: {reason}")]
    InvalidBaseUrl { url: String, reason: String },
    /// Empty, or not representable in an HTTP header. The key itself is not included.
    #[error("invalid Grsai API key: {0}")]
    InvalidApiKey(&'static str),
    #[error("Grsai time-out must be greater than zero")]
    ZeroTimeout,
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
}

/// [`VideoProvider`] backed by the Grsai HTTP API. Cheap to clone (the connection pool is
/// shared).
#[derive(Debug, Clone)]
pub struct GrsaiClient {
    http: reqwest::Client,
    create_url: Url,
    result_url: Url,
    timeout: Duration,
}

impl GrsaiClient {
    /// Checks the configuration and builds the HTTP client.
    pub fn new(config: GrsaiConfig) -> Result<Self, ConfigError> {
        let invalid_url = |reason: &str| ConfigError::InvalidBaseUrl {
            url: config.base_url.clone(),
            reason: reason.to_owned(),
        };
        let base = Url::parse(config.base_url.trim()).map_err(|e| invalid_url(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(invalid_url("the scheme must be http or https"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(invalid_url("no query or fragment allowed"));
        }
        let prefix = base.as_str().trim_end_matches('/');
        let endpoint = |path: &str| {
            Url::parse(&format!("{prefix}{path}")).map_err(|e| invalid_url(&e.to_string()))
        };
        let create_url = endpoint(CREATE_PATH)?;
        let result_url = endpoint(RESULT_PATH)?;

        if config.timeout.is_zero() {
            return Err(ConfigError::ZeroTimeout);
        }
        let key = config.api_key.expose_secret().trim();
        if key.is_empty() {
            return Err(ConfigError::InvalidApiKey("the key is empty"));
        }
        let mut auth = HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| ConfigError::InvalidApiKey("the key contains invalid characters"))?;
        // Keeps the value out of reqwest's and hyper's Debug output.
        auth.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);

        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("credit-ledger/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ConfigError::HttpClient)?;
        Ok(Self {
            http,
            create_url,
            result_url,
            timeout: config.timeout,
        })
    }

    /// [`Self::call_unmetered`], counted and timed: `grsai_calls_total{endpoint, outcome}`
    /// and `grsai_call_duration_seconds{endpoint}`.
    async fn call(&self, url: &Url, body: &impl Serialize) -> Result<Envelope, ProviderError> {
        let started = std::time::Instant::now();
        let result = self.call_unmetered(url, body).await;
        let outcome = match &result {
            Ok(envelope) if envelope.code == CODE_OK => "ok".to_owned(),
            Ok(_) => "error_code".to_owned(),
            // The variant's name (`Rejected`, `Unavailable`, ...), lower-cased.
            Err(e) => format!("{e:?}")
                .split(|c: char| !c.is_ascii_alphanumeric())
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase(),
        };
        let endpoint = url.path().to_owned();
        metrics::counter!("grsai_calls_total", "endpoint" => endpoint.clone(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!("grsai_call_duration_seconds", "endpoint" => endpoint)
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// POSTs `body` as JSON and reads Grsai's `{code, msg, data}` envelope, mapping every
    /// failure before the envelope to a [`ProviderError`].
    async fn call_unmetered(
        &self,
        url: &Url,
        body: &impl Serialize,
    ) -> Result<Envelope, ProviderError> {
        let endpoint = url.path();
        let response = self
            .http
            .post(url.clone())
            .json(body)
            .send()
            .await
            .map_err(|e| self.transport_error(endpoint, &e))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(endpoint, &e))?;

        // A gateway's 502/504 means the request may have reached Grsai; any other 5xx with
        // a body is Grsai's own answer that it did not take the task.
        let gateway = matches!(status.as_u16(), 502 | 504);
        if status.is_server_error() && (gateway || bytes.iter().all(u8::is_ascii_whitespace)) {
            tracing::warn!(
                grsai.endpoint = endpoint,
                http.status = status.as_u16(),
                "Grsai server error, outcome unknown"
            );
            return Err(ProviderError::Unavailable(format!(
                "Grsai answered HTTP {status}"
            )));
        }
        if status.is_client_error() || status.is_server_error() {
            let detail = serde_json::from_slice::<Envelope>(&bytes)
                .ok()
                .and_then(|envelope| envelope.msg)
                .filter(|msg| !msg.trim().is_empty());
            tracing::warn!(
                grsai.endpoint = endpoint,
                http.status = status.as_u16(),
                grsai.msg = detail.as_deref(),
                "Grsai refused the request"
            );
            return Err(ProviderError::Rejected(match detail {
                Some(msg) => format!("HTTP {status}: {msg}"),
                None => format!("HTTP {status}"),
            }));
        }
        if !status.is_success() {
            tracing::warn!(
                grsai.endpoint = endpoint,
                http.status = status.as_u16(),
                "unexpected Grsai status"
            );
            return Err(ProviderError::Unavailable(format!(
                "Grsai answered HTTP {status}"
            )));
        }
        serde_json::from_slice::<Envelope>(&bytes).map_err(|e| {
            tracing::warn!(grsai.endpoint = endpoint, error = %e, "unreadable Grsai answer");
            ProviderError::Unavailable(format!("unreadable Grsai answer: {e}"))
        })
    }

    fn transport_error(&self, endpoint: &str, error: &reqwest::Error) -> ProviderError {
        tracing::warn!(grsai.endpoint = endpoint, error = %error, "Grsai call failed");
        if error.is_connect() && !error.is_timeout() {
            // The connection was never opened: nothing was sent, a definite "no".
            return ProviderError::Rejected(format!("cannot connect to Grsai: {error}"));
        }
        if error.is_timeout() {
            ProviderError::Unavailable(format!("no answer from Grsai within {:?}", self.timeout))
        } else {
            ProviderError::Unavailable(format!("Grsai call interrupted: {error}"))
        }
    }
}

/// The message of a non-zero `code` answer, never empty.
fn rejection(envelope: &Envelope) -> String {
    match envelope.msg.as_deref().map(str::trim) {
        Some(msg) if !msg.is_empty() => msg.to_owned(),
        _ => format!("Grsai error code {}", envelope.code),
    }
}

#[async_trait]
impl VideoProvider for GrsaiClient {
    async fn submit(&self, req: &VideoRequest) -> Result<String, ProviderError> {
        let body = CreateVideoBody {
            model: MODEL,
            prompt: &req.prompt,
            url: req
                .image_url
                .as_deref()
                .filter(|url| !url.trim().is_empty()),
            aspect_ratio: &req.aspect_ratio,
            duration: req.duration,
            size: &req.size,
            web_hook: &req.callback_url,
            shut_progress: false,
        };
        let envelope = self.call(&self.create_url, &body).await?;
        if envelope.code != CODE_OK {
            tracing::warn!(
                grsai.code = envelope.code,
                grsai.msg = envelope.msg.as_deref(),
                "Grsai rejected the video task"
            );
            return Err(ProviderError::Rejected(rejection(&envelope)));
        }
        let task = envelope
            .data
            .and_then(|data| serde_json::from_value::<CreatedTask>(data).ok())
            .map(|task| task.id.trim().to_owned())
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                tracing::warn!("Grsai accepted the video task without a task id");
                ProviderError::Unavailable("Grsai answered success without a task id".into())
            })?;
        tracing::info!(grsai.task_id = %task, "video task submitted to Grsai");
        Ok(task)
    }

    async fn poll(&self, provider_task_id: &str) -> Result<PollOutcome, ProviderError> {
        let envelope = self
            .call(
                &self.result_url,
                &PollBody {
                    id: provider_task_id,
                },
            )
            .await?;
        match envelope.code {
            CODE_OK => {}
            CODE_NOT_FOUND => {
                tracing::info!(
                    grsai.task_id = provider_task_id,
                    "Grsai does not know the task"
                );
                return Ok(PollOutcome::NotFound);
            }
            code => {
                tracing::warn!(
                    grsai.task_id = provider_task_id,
                    grsai.code = code,
                    grsai.msg = envelope.msg.as_deref(),
                    "Grsai refused the poll"
                );
                return Err(ProviderError::Rejected(rejection(&envelope)));
            }
        }
        let data = envelope.data.unwrap_or_default();
        let result = parse_result_value(data).map_err(|e| {
            tracing::warn!(grsai.task_id = provider_task_id, error = %e, "unreadable Grsai poll result");
            ProviderError::Unavailable(format!("unreadable Grsai poll result: {e}"))
        })?;
        if result.provider_task_id != provider_task_id {
            // Settling a task with another task's result would move money wrongly.
            tracing::warn!(
                grsai.task_id = provider_task_id,
                grsai.answered_id = %result.provider_task_id,
                "Grsai answered a poll with another task's result"
            );
            return Err(ProviderError::Unavailable(format!(
                "Grsai answered the poll for {provider_task_id} with task {}",
                result.provider_task_id
            )));
        }
        Ok(PollOutcome::Found(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(base_url: &str) -> GrsaiConfig {
        GrsaiConfig::new(base_url, SecretString::from("sk-test"))
    }

    #[test]
    fn endpoints_are_joined_to_the_base_url() {
        let client = GrsaiClient::new(config("https://grsai.dakka.com.cn/"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            client.create_url.as_str(),
            "https://grsai.dakka.com.cn/v1/video/sora-video"
        );
        assert_eq!(
            client.result_url.as_str(),
            "https://grsai.dakka.com.cn/v1/draw/result"
        );

        let client =
            GrsaiClient::new(config("http://127.0.0.1:9/proxy")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            client.create_url.as_str(),
            "http://127.0.0.1:9/proxy/v1/video/sora-video"
        );
    }

    #[test]
    fn bad_configurations_are_refused() {
        assert!(matches!(
            GrsaiClient::new(config("grsai.dakka.com.cn")),
            Err(ConfigError::InvalidBaseUrl { .. })
        ));
        assert!(matches!(
            GrsaiClient::new(config("ftp://grsai.dakka.com.cn")),
            Err(ConfigError::InvalidBaseUrl { .. })
        ));
        assert!(matches!(
            GrsaiClient::new(GrsaiConfig::new("https://x", SecretString::from(" "))),
            Err(ConfigError::InvalidApiKey(_))
        ));
        assert!(matches!(
            GrsaiClient::new(GrsaiConfig::new("https://x", SecretString::from("a\nb"))),
            Err(ConfigError::InvalidApiKey(_))
        ));
        let mut zero = config("https://x");
        zero.timeout = Duration::ZERO;
        assert!(matches!(
            GrsaiClient::new(zero),
            Err(ConfigError::ZeroTimeout)
        ));
    }

    #[test]
    fn debug_output_does_not_show_the_key() {
        let config = GrsaiConfig::new("https://x", SecretString::from("sk-very-secret"));
        let client = GrsaiClient::new(config.clone()).unwrap_or_else(|e| panic!("{e}"));
        assert!(!format!("{config:?}").contains("sk-very-secret"));
        assert!(!format!("{client:?}").contains("sk-very-secret"));
    }
}
