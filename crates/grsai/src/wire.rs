//! Grsai's JSON wire format: request bodies, the `{code, msg, data}` envelope and the result
//! object (callback body, poll `data`), and their translation to and from the domain's
//! [`VideoResult`]. Parsing is lenient about what Grsai may omit or add (unknown fields,
//! missing optional fields, empty strings) and strict about what decides money: the task id
//! and the status.

use credit_domain::ports::{ProviderStatus, VideoResult};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `code` of a successful answer.
pub(crate) const CODE_OK: i64 = 0;
/// `code` of a poll for a task Grsai does not know.
pub(crate) const CODE_NOT_FOUND: i64 = -22;

/// Why a result object could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not JSON, or a field has the wrong type.
    #[error("malformed Grsai result object: {0}")]
    Malformed(String),
    /// `id` is missing or empty: the result cannot be matched to a task.
    #[error("Grsai result object has no task id")]
    MissingId,
    /// `status` is none of `running`, `succeeded`, `failed`.
    #[error("unknown Grsai task status {0:?}")]
    UnknownStatus(String),
}

/// Body of `POST /v1/video/sora-video`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CreateVideoBody<'a> {
    pub model: &'a str,
    pub prompt: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<&'a str>,
    pub aspect_ratio: &'a str,
    pub duration: u32,
    pub size: &'a str,
    pub web_hook: &'a str,
    pub shut_progress: bool,
}

/// Body of `POST /v1/draw/result`.
#[derive(Debug, Serialize)]
pub(crate) struct PollBody<'a> {
    pub id: &'a str,
}

/// Every Grsai JSON answer: `{"code": 0, "msg": "success", "data": ...}`.
#[derive(Debug, Deserialize)]
pub(crate) struct Envelope {
    pub code: i64,
    #[serde(default)]
    pub msg: Option<String>,
    #[serde(default)]
    pub data: Option<Value>,
}

/// `data` of a successful create answer.
#[derive(Debug, Deserialize)]
pub(crate) struct CreatedTask {
    pub id: String,
}

/// A result object exactly as Grsai writes it. Everything is optional here; the checks
/// happen in [`RawResult::into_video_result`].
#[derive(Debug, Default, Deserialize, Serialize)]
struct RawResult {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    results: Option<Vec<RawItem>>,
    #[serde(default)]
    progress: Option<Value>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    failure_reason: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct RawItem {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    remove_watermark: Option<bool>,
    #[serde(default)]
    pid: Option<String>,
}

/// Parses one Grsai result object (a callback body, or the `data` of a poll answer).
///
/// Unknown fields are ignored, missing optional fields and empty strings become `None`,
/// `progress` is clamped to 0..=100 (a number, a numeric string, or absent meaning 0). A
/// missing `id` or an unknown `status` is an error: guessing there could settle the wrong
/// task or settle it wrongly.
pub fn parse_result(body: &[u8]) -> Result<VideoResult, ParseError> {
    let json: Value =
        serde_json::from_slice(body).map_err(|e| ParseError::Malformed(e.to_string()))?;
    parse_result_value(json)
}

/// Parses the `data` of a poll answer, already decoded as JSON.
pub(crate) fn parse_result_value(data: Value) -> Result<VideoResult, ParseError> {
    if !data.is_object() {
        // serde would read a struct from an array too; a result object is an object.
        return Err(ParseError::Malformed(
            "a result object must be a JSON object".into(),
        ));
    }
    let raw: RawResult =
        serde_json::from_value(data).map_err(|e| ParseError::Malformed(e.to_string()))?;
    raw.into_video_result()
}

/// Writes a [`VideoResult`] as the Grsai result object it was read from (the shape of the
/// `callback-*.json` fixtures). The simulated provider sends exactly this to the callback
/// endpoint, so demo mode exercises the same parsing as production.
pub fn encode_result(result: &VideoResult) -> Value {
    let results = match &result.video_url {
        Some(url) => vec![RawItem {
            url: Some(url.clone()),
            remove_watermark: result.remove_watermark,
            pid: result.pid.clone(),
        }],
        None => Vec::new(),
    };
    let status = match result.status {
        ProviderStatus::Running => "running",
        ProviderStatus::Succeeded => "succeeded",
        ProviderStatus::Failed => "failed",
    };
    serde_json::json!({
        "id": result.provider_task_id,
        "results": results,
        "progress": result.progress.min(100),
        "status": status,
        "failure_reason": result.failure_reason.clone().unwrap_or_default(),
        "error": result.error.clone().unwrap_or_default(),
    })
}

impl RawResult {
    fn into_video_result(self) -> Result<VideoResult, ParseError> {
        let provider_task_id = non_empty(self.id).ok_or(ParseError::MissingId)?;
        let status = match self.status.as_deref().map(str::trim) {
            Some("running") => ProviderStatus::Running,
            Some("succeeded") => ProviderStatus::Succeeded,
            Some("failed") => ProviderStatus::Failed,
            Some(other) => return Err(ParseError::UnknownStatus(other.to_owned())),
            None => return Err(ParseError::UnknownStatus(String::new())),
        };
        let progress = parse_progress(self.progress.as_ref())?;
        // Grsai returns a list, but one request makes one video: the first item with a URL
        // is the video.
        let item = self
            .results
            .unwrap_or_default()
            .into_iter()
            .find(|item| item.url.as_deref().is_some_and(|u| !u.trim().is_empty()));
        let (video_url, remove_watermark, pid) = match item {
            Some(item) => (
                non_empty(item.url),
                item.remove_watermark,
                non_empty(item.pid),
            ),
            None => (None, None, None),
        };
        Ok(VideoResult {
            provider_task_id,
            status,
            progress,
            video_url,
            remove_watermark,
            pid,
            failure_reason: non_empty(self.failure_reason),
            error: non_empty(self.error),
        })
    }
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

/// `progress` as 0..=100. Grsai documents an integer; floats and numeric strings are
/// accepted too because a progress figure is never worth rejecting a terminal result for.
fn parse_progress(value: Option<&Value>) -> Result<u8, ParseError> {
    let number = match value {
        None | Some(Value::Null) => 0.0,
        Some(Value::Number(n)) => n.as_f64().unwrap_or(0.0),
        Some(Value::String(s)) if s.trim().is_empty() => 0.0,
        Some(Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| ParseError::Malformed(format!("progress {s:?} is not a number")))?,
        Some(other) => {
            return Err(ParseError::Malformed(format!(
                "progress {other} is not a number"
            )))
        }
    };
    if number.is_nan() {
        return Ok(0);
    }
    // The clamp makes the cast exact.
    Ok(number.clamp(0.0, 100.0).round() as u8)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const RUNNING: &str = include_str!("../tests/fixtures/callback-running.json");
    const SUCCEEDED: &str = include_str!("../tests/fixtures/callback-succeeded.json");
    const FAILED: &str = include_str!("../tests/fixtures/callback-failed.json");
    const TASK_ID: &str = "f44bcf50-f2d0-4c26-a467-26f2014a771b";

    fn parse(json: &str) -> Result<VideoResult, ParseError> {
        parse_result(json.as_bytes())
    }

    #[test]
    fn parses_running_fixture() {
        let result = parse(RUNNING).unwrap();
        assert_eq!(
            result,
            VideoResult {
                provider_task_id: TASK_ID.into(),
                status: ProviderStatus::Running,
                progress: 35,
                video_url: None,
                remove_watermark: None,
                pid: None,
                failure_reason: None,
                error: None,
            }
        );
    }

    #[test]
    fn parses_succeeded_fixture() {
        let result = parse(SUCCEEDED).unwrap();
        assert_eq!(
            result,
            VideoResult {
                provider_task_id: TASK_ID.into(),
                status: ProviderStatus::Succeeded,
                progress: 100,
                video_url: Some("https://file.example.com/videos/f44bcf50.mp4".into()),
                remove_watermark: Some(true),
                pid: Some("s_68f2a1c0e4b08190".into()),
                failure_reason: None,
                error: None,
            }
        );
    }

    #[test]
    fn parses_failed_fixture() {
        let result = parse(FAILED).unwrap();
        assert_eq!(result.status, ProviderStatus::Failed);
        assert_eq!(result.progress, 100);
        assert_eq!(result.video_url, None);
        assert_eq!(result.failure_reason.as_deref(), Some("input_moderation"));
        assert_eq!(
            result.error.as_deref(),
            Some("The prompt was rejected by content moderation.")
        );
    }

    #[test]
    fn poll_data_parses_like_a_callback_body() {
        let data: Value = serde_json::from_str(SUCCEEDED).unwrap();
        assert_eq!(parse_result_value(data).unwrap(), parse(SUCCEEDED).unwrap());
    }

    #[test]
    fn tolerates_unknown_and_missing_optional_fields() {
        let result = parse(r#"{"id":"t1","status":"running","eta":12,"extra":{"a":[1]}}"#).unwrap();
        assert_eq!(result.provider_task_id, "t1");
        assert_eq!(result.progress, 0);
        assert_eq!(result.video_url, None);
        assert_eq!(result.failure_reason, None);

        let result = parse(
            r#"{"id":"t1","status":"failed","results":null,"progress":null,
                "failure_reason":null,"error":null}"#,
        )
        .unwrap();
        assert_eq!(result.status, ProviderStatus::Failed);
        assert_eq!(result.error, None);
    }

    #[test]
    fn empty_strings_become_none() {
        let result = parse(
            r#"{"id":"t1","status":"succeeded","progress":100,
                "results":[{"url":"","pid":""},{"url":"https://v/2.mp4","pid":""}],
                "failure_reason":"","error":"  "}"#,
        )
        .unwrap();
        assert_eq!(result.video_url.as_deref(), Some("https://v/2.mp4"));
        assert_eq!(result.pid, None);
        assert_eq!(result.remove_watermark, None);
        assert_eq!(result.failure_reason, None);
        assert_eq!(result.error, None);
    }

    #[test]
    fn progress_is_clamped_and_lenient() {
        let progress = |p: &str| {
            parse(&format!(
                r#"{{"id":"t","status":"running","progress":{p}}}"#
            ))
            .map(|r| r.progress)
        };
        assert_eq!(progress("150"), Ok(100));
        assert_eq!(progress("-5"), Ok(0));
        assert_eq!(progress("42.6"), Ok(43));
        assert_eq!(progress(r#""77""#), Ok(77));
        assert_eq!(progress(r#""""#), Ok(0));
        assert!(matches!(
            progress(r#""abc""#),
            Err(ParseError::Malformed(_))
        ));
        assert!(matches!(progress("[1]"), Err(ParseError::Malformed(_))));
    }

    #[test]
    fn unknown_or_missing_status_is_an_error() {
        assert_eq!(
            parse(r#"{"id":"t","status":"queued"}"#),
            Err(ParseError::UnknownStatus("queued".into()))
        );
        assert_eq!(
            parse(r#"{"id":"t"}"#),
            Err(ParseError::UnknownStatus(String::new()))
        );
    }

    #[test]
    fn missing_id_is_an_error() {
        assert_eq!(parse(r#"{"status":"running"}"#), Err(ParseError::MissingId));
        assert_eq!(
            parse(r#"{"id":"","status":"running"}"#),
            Err(ParseError::MissingId)
        );
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(parse("not json"), Err(ParseError::Malformed(_))));
        assert!(matches!(parse("[]"), Err(ParseError::Malformed(_))));
        assert!(matches!(
            parse(r#"{"id":7,"status":"running"}"#),
            Err(ParseError::Malformed(_))
        ));
    }

    #[test]
    fn encode_round_trips_through_parse() {
        for fixture in [RUNNING, SUCCEEDED, FAILED] {
            let parsed = parse(fixture).unwrap();
            let encoded = encode_result(&parsed);
            let fixture_json: Value = serde_json::from_str(fixture).unwrap();
            assert_eq!(encoded, fixture_json, "encoding differs from the fixture");
            assert_eq!(parse(&encoded.to_string()).unwrap(), parsed);
        }
    }
}
