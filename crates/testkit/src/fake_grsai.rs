//! A local fake of the Grsai API (see `fixtures/grsai/README.md`): an actix-web server on
//! `127.0.0.1`, port 0, that speaks Grsai's wire format for `POST /v1/video/sora-video` and
//! `POST /v1/draw/result`, records every request for assertions, and misbehaves on demand
//! (error code, HTTP 500, slow answers). It also delivers callbacks the way Grsai does.
//!
//! It is kept cheap per request (no logging, short locks) because load benchmarks drive it
//! at well over a thousand requests a second.
//!
//! ```ignore
//! let grsai = FakeGrsai::start().await;
//! let client = GrsaiClient::new(GrsaiConfig::new(grsai.base_url(), key))?;
//! grsai.set_mode(Mode::ServerError);
//! grsai.set_poll_result("task-1", succeeded_result("task-1", "https://v/1.mp4"));
//! assert_eq!(grsai.requests()[0].path, "/v1/video/sora-video");
//! ```

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::http::StatusCode as ActixStatus;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
pub use reqwest::StatusCode;
use serde_json::{json, Value};

/// Path of the create-video call.
pub const CREATE_PATH: &str = "/v1/video/sora-video";
/// Path of the poll call.
pub const RESULT_PATH: &str = "/v1/draw/result";

/// How the fake answers both endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Mode {
    /// Create answers `create-response.json` with a fresh id at once; poll answers what was
    /// set with [`FakeGrsai::set_poll_result`] (a task created here starts `running`, 0 %),
    /// or `-22` for unknown ids.
    #[default]
    Success,
    /// HTTP 200 with a non-zero `code` (the `create-error.json` shape).
    ErrorCode { code: i64, msg: String },
    /// HTTP 500 with a plain-text body.
    ServerError,
    /// Waits this long, then answers as in [`Mode::Success`]: longer than the client's
    /// time-out, it simulates a hung Grsai.
    Delay(Duration),
    /// Takes the task (it exists and can be polled at once), then waits this long before
    /// answering: longer than the client's time-out, the caller never learns the id.
    TakeThenHang(Duration),
    /// HTTP 504 with an empty body, as a gateway in front of Grsai answers: the outcome is
    /// unknown.
    GatewayTimeout,
}

impl Mode {
    /// The `create-error.json` answer: `{"code": -1, "msg": "insufficient balance in api account"}`.
    pub fn insufficient_balance() -> Self {
        Mode::ErrorCode {
            code: -1,
            msg: "insufficient balance in api account".into(),
        }
    }
}

/// One request the fake received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Header names in lower case; repeated headers appear once per value.
    pub headers: Vec<(String, String)>,
    /// The body as JSON, or `Value::Null` if it was not JSON.
    pub body: Value,
}

impl RecordedRequest {
    /// The first value of a header (name is case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The token of `Authorization: Bearer <token>`.
    pub fn bearer_token(&self) -> Option<&str> {
        self.header("authorization")?.strip_prefix("Bearer ")
    }
}

#[derive(Debug, Clone)]
enum PollAnswer {
    Found(Value),
    NotFound,
}

#[derive(Debug, Default)]
struct State {
    mode: Mutex<Mode>,
    polls: Mutex<HashMap<String, PollAnswer>>,
    requests: Mutex<Vec<RecordedRequest>>,
    next_id: AtomicU64,
    /// Off for load benchmarks, where keeping every request would only cost memory.
    no_recording: std::sync::atomic::AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running fake; stops its server when dropped.
#[derive(Debug)]
pub struct FakeGrsai {
    base_url: String,
    state: Arc<State>,
    handle: ServerHandle,
}

impl FakeGrsai {
    /// Binds `127.0.0.1:0` and serves in the background of the current tokio runtime.
    ///
    /// # Panics
    /// If the port cannot be bound (a broken test environment).
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("fake Grsai cannot bind 127.0.0.1:0: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("fake Grsai has no local address: {e}"))
            .port();
        let state = Arc::new(State::default());
        let app_state = web::Data::from(Arc::clone(&state));
        let server = HttpServer::new(move || {
            App::new()
                .app_data(app_state.clone())
                .app_data(web::PayloadConfig::new(1 << 20))
                .route(CREATE_PATH, web::post().to(create))
                .route(RESULT_PATH, web::post().to(result))
        })
        .workers(2)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)
        .unwrap_or_else(|e| panic!("fake Grsai cannot listen: {e}"))
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            base_url: format!("http://127.0.0.1:{port}"),
            state,
            handle,
        }
    }

    /// Like [`FakeGrsai::start`], but keeps no record of requests (for load benchmarks).
    pub async fn start_without_recording() -> Self {
        let fake = Self::start().await;
        fake.state.no_recording.store(true, Ordering::Relaxed);
        fake
    }

    /// `http://127.0.0.1:<port>`, to configure the client with.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// Changes how the fake answers from now on.
    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.state.mode) = mode;
    }

    /// Poll of `id` answers `{"code": 0, "msg": "success", "data": result}`; see
    /// [`running_result`], [`succeeded_result`], [`failed_result`].
    pub fn set_poll_result(&self, id: impl Into<String>, result: Value) {
        lock(&self.state.polls).insert(id.into(), PollAnswer::Found(result));
    }

    /// Poll of `id` answers `poll-not-found.json` (`code` -22), even for a task created here.
    pub fn set_poll_not_found(&self, id: impl Into<String>) {
        lock(&self.state.polls).insert(id.into(), PollAnswer::NotFound);
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.requests).clone()
    }

    /// The requests received so far on one path (e.g. [`CREATE_PATH`]).
    pub fn requests_to(&self, path: &str) -> Vec<RecordedRequest> {
        lock(&self.state.requests)
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Forgets the recorded requests (e.g. between benchmark rounds).
    pub fn clear_requests(&self) {
        lock(&self.state.requests).clear();
    }
}

impl Drop for FakeGrsai {
    fn drop(&mut self) {
        // `stop` sends the command at once; the returned future only waits for completion.
        drop(self.handle.stop(false));
    }
}

/// Records the request; answers the misbehaviour of the current mode, or `None` to go on.
async fn prelude(state: &State, req: &HttpRequest, body: &[u8]) -> (Option<HttpResponse>, Value) {
    let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let headers = req
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    if !state.no_recording.load(Ordering::Relaxed) {
        lock(&state.requests).push(RecordedRequest {
            method: req.method().as_str().to_owned(),
            path: req.path().to_owned(),
            headers,
            body: json.clone(),
        });
    }

    let mode = lock(&state.mode).clone();
    match mode {
        Mode::Success | Mode::TakeThenHang(_) => {}
        Mode::Delay(delay) => tokio::time::sleep(delay).await,
        Mode::GatewayTimeout => {
            return (Some(HttpResponse::GatewayTimeout().finish()), json);
        }
        Mode::ServerError => {
            return (
                Some(
                    HttpResponse::InternalServerError()
                        .content_type("text/plain")
                        .body("Internal Server Error"),
                ),
                json,
            )
        }
        Mode::ErrorCode { code, msg } => {
            return (Some(envelope(code, &msg, Value::Null)), json);
        }
    }

    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|token| !token.trim().is_empty());
    if !authorized {
        let body = json!({"code": -1, "msg": "missing or invalid api key", "data": null});
        return (
            Some(HttpResponse::build(ActixStatus::UNAUTHORIZED).json(body)),
            json,
        );
    }
    if json.is_null() {
        let body = json!({"code": -1, "msg": "invalid json body", "data": null});
        return (Some(HttpResponse::BadRequest().json(body)), json);
    }
    (None, json)
}

fn envelope(code: i64, msg: &str, data: Value) -> HttpResponse {
    HttpResponse::Ok().json(json!({"code": code, "msg": msg, "data": data}))
}

fn non_empty_str<'a>(body: &'a Value, field: &str) -> Option<&'a str> {
    body.get(field)
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
}

async fn create(state: web::Data<State>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let (answer, json) = prelude(&state, &req, &body).await;
    if let Some(answer) = answer {
        return answer;
    }
    if non_empty_str(&json, "model").is_none() || non_empty_str(&json, "prompt").is_none() {
        return envelope(-1, "model and prompt are required", Value::Null);
    }
    let n = state.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let id = format!("fake-task-{n:08}");
    lock(&state.polls)
        .entry(id.clone())
        .or_insert_with(|| PollAnswer::Found(running_result(&id, 0)));
    let mode = lock(&state.mode).clone();
    if let Mode::TakeThenHang(delay) = mode {
        tokio::time::sleep(delay).await;
    }
    envelope(0, "success", json!({ "id": id }))
}

async fn result(state: web::Data<State>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let (answer, json) = prelude(&state, &req, &body).await;
    if let Some(answer) = answer {
        return answer;
    }
    let Some(id) = non_empty_str(&json, "id") else {
        return envelope(-1, "id is required", Value::Null);
    };
    let found = lock(&state.polls).get(id).cloned();
    match found {
        Some(PollAnswer::Found(result)) => envelope(0, "success", result),
        Some(PollAnswer::NotFound) | None => envelope(-22, "task not found", Value::Null),
    }
}

/// A `running` result object (`callback-running.json` shape).
pub fn running_result(id: &str, progress: u8) -> Value {
    json!({
        "id": id,
        "results": [],
        "progress": progress,
        "status": "running",
        "failure_reason": "",
        "error": "",
    })
}

/// A `succeeded` result object (`callback-succeeded.json` shape).
pub fn succeeded_result(id: &str, video_url: &str) -> Value {
    json!({
        "id": id,
        "results": [{"url": video_url, "removeWatermark": true, "pid": format!("s_{id}")}],
        "progress": 100,
        "status": "succeeded",
        "failure_reason": "",
        "error": "",
    })
}

/// A `failed` result object (`callback-failed.json` shape); `failure_reason` is one of
/// `output_moderation`, `input_moderation`, `error`.
pub fn failed_result(id: &str, failure_reason: &str, error: &str) -> Value {
    json!({
        "id": id,
        "results": [],
        "progress": 100,
        "status": "failed",
        "failure_reason": failure_reason,
        "error": error,
    })
}

/// POSTs a result object to a callback URL as Grsai does (JSON, no signature) and returns
/// the status the endpoint answered.
///
/// # Panics
/// If the endpoint cannot be reached at all (the test's own server is not running).
pub async fn deliver(url: &str, result_json: &Value) -> StatusCode {
    // A client per call: a pooled connection must not outlive the test runtime it was made on.
    match reqwest::Client::new()
        .post(url)
        .json(result_json)
        .send()
        .await
    {
        Ok(response) => response.status(),
        Err(e) => panic!("cannot deliver the Grsai callback: {e}"),
    }
}
