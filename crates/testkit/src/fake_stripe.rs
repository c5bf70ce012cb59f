//! A local fake of the Stripe API (see `fixtures/stripe/README.md`), and signed webhook
//! deliveries built from Stripe's own object shapes.
//!
//! The server is an actix-web app on `127.0.0.1`, port 0. It speaks Stripe's wire format for
//! `POST /v1/checkout/sessions` (form-encoded body, `Bearer` secret key, `Idempotency-Key`)
//! and `GET /v1/checkout/sessions/{id}`, answers `checkout.session` objects built from the
//! fixture, records every request, replays the first answer for a repeated idempotency key
//! as Stripe does, and fails on demand with Stripe's error JSON.
//!
//! ```ignore
//! let stripe = FakeStripe::start().await;
//! let checkout = StripeCheckout::new(StripeConfig::new(key).with_api_base(stripe.base_url()))?;
//! stripe.set_failure(Some(FailMode::ServerError));
//! assert_eq!(stripe.requests()[0].idempotency_key(), Some("rch_1"));
//!
//! let (body, header) = signed_event("whsec_test", &checkout_completed_event(
//!     "evt_1", "cs_test_1", "rch_1", "usr_1", 1000, "cny", "paid", Some("pi_1")));
//! ```

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::dev::ServerHandle;
use actix_web::http::StatusCode as ActixStatus;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use hmac::{Hmac, Mac};
pub use reqwest::StatusCode;
use serde_json::{json, Map, Value};
use sha2::Sha256;

const SESSION_FIXTURE: &str = include_str!("../fixtures/stripe/checkout.session.json");
const EVENT_FIXTURE: &str = include_str!("../fixtures/stripe/event.json");
const CHARGE_FIXTURE: &str = include_str!("../fixtures/stripe/charge.json");
const DISPUTE_FIXTURE: &str = include_str!("../fixtures/stripe/dispute.json");

/// Path of the create-session call.
pub const SESSIONS_PATH: &str = "/v1/checkout/sessions";

/// A failure the fake answers instead of doing its work. Failures sit in front of the
/// idempotency layer (like a fault on the way to Stripe): nothing is created or remembered,
/// so a retry with the same key after [`FakeStripe::set_failure`]`(None)` succeeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailMode {
    /// 400 `invalid_request_error`.
    InvalidRequest,
    /// 401 `invalid_request_error` with an invalid API key message, as Stripe answers.
    Unauthorized,
    /// 429 `invalid_request_error`, code `rate_limit`.
    RateLimited,
    /// 500 `api_error`.
    ServerError,
    /// Any status with a Stripe error body of type `error_type` (`card_error`, `api_error`...).
    Status {
        status: u16,
        error_type: String,
        message: String,
    },
    /// Waits this long, then answers normally: longer than the client's time-out, it
    /// simulates a hung Stripe.
    Delay(Duration),
}

/// One request the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Header names in lower case; repeated headers appear once per value.
    pub headers: Vec<(String, String)>,
    /// The form fields, decoded, in order (`line_items[0][price_data][currency]`, ...).
    pub form: Vec<(String, String)>,
    /// The raw body.
    pub body: String,
}

impl RecordedRequest {
    /// The first value of a header (name is case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `Idempotency-Key` header.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.header("idempotency-key")
    }

    /// The `Authorization` header (`Bearer sk_...`).
    pub fn authorization(&self) -> Option<&str> {
        self.header("authorization")
    }

    /// The value of a form field, e.g. `field("metadata[recharge_id]")`.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone)]
struct Replay {
    form: Vec<(String, String)>,
    session: Value,
}

#[derive(Debug, Default)]
struct State {
    failure: Mutex<Option<FailMode>>,
    requests: Mutex<Vec<RecordedRequest>>,
    sessions: Mutex<HashMap<String, Value>>,
    idempotency: Mutex<HashMap<String, Replay>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running fake; stops its server when dropped.
#[derive(Debug)]
pub struct FakeStripe {
    base_url: String,
    state: Arc<State>,
    handle: ServerHandle,
}

impl FakeStripe {
    /// Binds `127.0.0.1:0` and serves in the background of the current tokio runtime.
    ///
    /// # Panics
    /// If the port cannot be bound (a broken test environment).
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("fake Stripe cannot bind 127.0.0.1:0: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("fake Stripe has no local address: {e}"))
            .port();
        let state = Arc::new(State::default());
        let app_state = web::Data::from(Arc::clone(&state));
        let server = HttpServer::new(move || {
            App::new()
                .app_data(app_state.clone())
                .app_data(web::PayloadConfig::new(1 << 20))
                .route(SESSIONS_PATH, web::post().to(create_session))
                .route(
                    "/v1/checkout/sessions/{id}",
                    web::get().to(retrieve_session),
                )
                .default_service(web::to(unknown_url))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)
        .unwrap_or_else(|e| panic!("fake Stripe cannot listen: {e}"))
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            base_url: format!("http://127.0.0.1:{port}"),
            state,
            handle,
        }
    }

    /// `http://127.0.0.1:<port>` (no `/v1`), to configure the client's API base with.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.requests).clone()
    }

    /// Forgets the recorded requests (not the sessions or idempotency keys).
    pub fn clear_requests(&self) {
        lock(&self.state.requests).clear();
    }

    /// Makes every following request fail this way; `None` goes back to normal.
    pub fn set_failure(&self, failure: Option<FailMode>) {
        *lock(&self.state.failure) = failure;
    }

    /// A session created here, as the API would answer it.
    pub fn session(&self, id: &str) -> Option<Value> {
        lock(&self.state.sessions).get(id).cloned()
    }

    /// Changes a session created here, as Stripe would after the customer acts: paid
    /// (`complete`/`paid` with a payment intent), expired, refunded or disputed. Returns
    /// whether the session exists.
    pub fn update_session(&self, id: &str, change: impl FnOnce(&mut Value)) -> bool {
        match lock(&self.state.sessions).get_mut(id) {
            Some(session) => {
                change(session);
                true
            }
            None => false,
        }
    }

    /// The id of the session created for `recharge_id` (its `client_reference_id`).
    pub fn session_for(&self, recharge_id: &str) -> Option<String> {
        lock(&self.state.sessions)
            .iter()
            .find(|(_, s)| s["client_reference_id"] == recharge_id)
            .map(|(id, _)| id.clone())
    }

    /// Marks a session paid, with payment intent `pi` and its charge (nothing refunded).
    pub fn pay_session(&self, id: &str, pi: &str) -> bool {
        self.update_session(id, |s| {
            s["status"] = json!("complete");
            s["payment_status"] = json!("paid");
            s["payment_intent"] = json!({
                "id": pi,
                "object": "payment_intent",
                "status": "succeeded",
                "latest_charge": {
                    "id": format!("ch_{pi}"),
                    "object": "charge",
                    "amount_refunded": 0,
                    "disputed": false,
                },
            });
        })
    }

    /// How many distinct sessions were created.
    pub fn session_count(&self) -> usize {
        lock(&self.state.sessions).len()
    }
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        // `stop` sends the command at once; the returned future only waits for completion.
        drop(self.handle.stop(false));
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A fresh id in Stripe's style: `<prefix>_<24 base-62 characters>`, unique in the process.
fn fresh_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let count = u128::from(COUNTER.fetch_add(1, Ordering::Relaxed));
    // Counter in the high bits keeps ids unique; the clock makes them differ between runs.
    let mut n = (count << 64) ^ nanos;
    let mut out = String::with_capacity(prefix.len() + 25);
    out.push_str(prefix);
    out.push('_');
    for _ in 0..24 {
        out.push(char::from(ALPHABET[(n % 62) as usize]));
        n /= 62;
    }
    out
}

/// Stripe's error body: `{"error": {"type": ..., "message": ..., "code"?, "param"?}}`.
fn stripe_error(
    status: u16,
    error_type: &str,
    code: Option<&str>,
    param: Option<&str>,
    message: &str,
) -> HttpResponse {
    let mut error = Map::new();
    error.insert("type".into(), json!(error_type));
    error.insert("message".into(), json!(message));
    if let Some(code) = code {
        error.insert("code".into(), json!(code));
        error.insert(
            "doc_url".into(),
            json!(format!("https://stripe.com/docs/error-codes/{code}")),
        );
    }
    if let Some(param) = param {
        error.insert("param".into(), json!(param));
    }
    let status = ActixStatus::from_u16(status).unwrap_or(ActixStatus::INTERNAL_SERVER_ERROR);
    HttpResponse::build(status)
        .insert_header(("request-id", fresh_id("req")))
        .json(json!({ "error": error }))
}

fn ok_json(value: &Value, replayed: bool) -> HttpResponse {
    let mut response = HttpResponse::Ok();
    response.insert_header(("request-id", fresh_id("req")));
    if replayed {
        response.insert_header(("idempotent-replayed", "true"));
    }
    response.json(value)
}

/// Records the request; answers the current failure, or a missing API key, or `None` to go on.
async fn prelude(
    state: &State,
    req: &HttpRequest,
    body: &[u8],
) -> (Option<HttpResponse>, RecordedRequest) {
    let text = String::from_utf8_lossy(body).into_owned();
    let form = web::Query::<Vec<(String, String)>>::from_query(&text)
        .map(web::Query::into_inner)
        .unwrap_or_default();
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
    let recorded = RecordedRequest {
        method: req.method().as_str().to_owned(),
        path: req.path().to_owned(),
        headers,
        form,
        body: text,
    };
    lock(&state.requests).push(recorded.clone());

    let failure = lock(&state.failure).clone();
    let answer = match failure {
        None => None,
        Some(FailMode::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            None
        }
        Some(FailMode::InvalidRequest) => Some(stripe_error(
            400,
            "invalid_request_error",
            Some("parameter_invalid_empty"),
            None,
            "Invalid request (injected by the fake).",
        )),
        Some(FailMode::Unauthorized) => Some(stripe_error(
            401,
            "invalid_request_error",
            None,
            None,
            "Invalid API Key provided: sk_test_****",
        )),
        Some(FailMode::RateLimited) => Some(stripe_error(
            429,
            "invalid_request_error",
            Some("rate_limit"),
            None,
            "Too many requests hit the API too quickly.",
        )),
        Some(FailMode::ServerError) => Some(stripe_error(
            500,
            "api_error",
            None,
            None,
            "An unknown error occurred (injected by the fake).",
        )),
        Some(FailMode::Status {
            status,
            error_type,
            message,
        }) => Some(stripe_error(status, &error_type, None, None, &message)),
    };
    if answer.is_some() {
        return (answer, recorded);
    }

    let authorized = recorded
        .authorization()
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|key| !key.trim().is_empty());
    if !authorized {
        return (
            Some(stripe_error(
                401,
                "invalid_request_error",
                None,
                None,
                "You did not provide an API key.",
            )),
            recorded,
        );
    }
    (None, recorded)
}

async fn create_session(
    state: web::Data<State>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let (answer, recorded) = prelude(&state, &req, &body).await;
    if let Some(answer) = answer {
        return answer;
    }

    let key = recorded.idempotency_key().map(str::to_owned);
    if let Some(key) = &key {
        let previous = lock(&state.idempotency).get(key).cloned();
        if let Some(previous) = previous {
            // Stripe compares the parameters, not their order in the body (async-stripe
            // writes metadata from a HashMap, so the order differs between requests).
            let sorted = |form: &[(String, String)]| {
                let mut form = form.to_vec();
                form.sort();
                form
            };
            if sorted(&previous.form) != sorted(&recorded.form) {
                return stripe_error(
                    400,
                    "idempotency_error",
                    None,
                    None,
                    &format!(
                        "Keys for idempotent requests can only be used with the same parameters \
                         they were first used with. Try using a key other than '{key}' if you \
                         meant to execute a different request."
                    ),
                );
            }
            return ok_json(&previous.session, true);
        }
    }

    let session = match build_session(&recorded) {
        Ok(session) => session,
        Err(answer) => return *answer,
    };
    let id = session["id"].as_str().unwrap_or_default().to_owned();
    lock(&state.sessions).insert(id, session.clone());
    if let Some(key) = key {
        lock(&state.idempotency).insert(
            key,
            Replay {
                form: recorded.form.clone(),
                session: session.clone(),
            },
        );
    }
    ok_json(&session, false)
}

async fn retrieve_session(
    state: web::Data<State>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let (answer, _) = prelude(&state, &req, &body).await;
    if let Some(answer) = answer {
        return answer;
    }
    let id = path.into_inner();
    let session = lock(&state.sessions).get(&id).cloned();
    match session {
        Some(session) => ok_json(&session, false),
        None => stripe_error(
            404,
            "invalid_request_error",
            Some("resource_missing"),
            Some("session"),
            &format!("No such checkout.session: '{id}'"),
        ),
    }
}

async fn unknown_url(state: web::Data<State>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let (answer, _) = prelude(&state, &req, &body).await;
    if let Some(answer) = answer {
        return answer;
    }
    stripe_error(
        404,
        "invalid_request_error",
        None,
        None,
        &format!(
            "Unrecognized request URL ({}: {}).",
            req.method(),
            req.path()
        ),
    )
}

/// The `checkout.session` Stripe would answer for this form, from the fixture shape.
fn build_session(req: &RecordedRequest) -> Result<Value, Box<HttpResponse>> {
    let missing = |param: &str| {
        Box::new(stripe_error(
            400,
            "invalid_request_error",
            Some("parameter_missing"),
            Some(param),
            &format!("Missing required param: {param}."),
        ))
    };
    let invalid_integer = |param: &str| {
        Box::new(stripe_error(
            400,
            "invalid_request_error",
            Some("parameter_invalid_integer"),
            Some(param),
            &format!("Invalid integer: {param}"),
        ))
    };
    let mode = req.field("mode").ok_or_else(|| missing("mode"))?;

    // Line items priced inline: total = sum of unit_amount * quantity.
    let mut amount_total: Option<i64> = None;
    let mut currency: Option<String> = None;
    let mut index = 0;
    while let Some(unit_amount) =
        req.field(&format!("line_items[{index}][price_data][unit_amount]"))
    {
        let unit_param = format!("line_items[{index}][price_data][unit_amount]");
        let unit: i64 = unit_amount
            .parse()
            .map_err(|_| invalid_integer(&unit_param))?;
        let quantity_param = format!("line_items[{index}][quantity]");
        let quantity: i64 = match req.field(&quantity_param) {
            Some(q) => q.parse().map_err(|_| invalid_integer(&quantity_param))?,
            None => return Err(missing(&quantity_param)),
        };
        let currency_param = format!("line_items[{index}][price_data][currency]");
        let item_currency = req
            .field(&currency_param)
            .ok_or_else(|| missing(&currency_param))?;
        currency.get_or_insert_with(|| item_currency.to_owned());
        amount_total = Some(amount_total.unwrap_or(0) + unit * quantity);
        index += 1;
    }
    if mode == "payment" && index == 0 && req.field("line_items[0][price]").is_none() {
        return Err(missing("line_items"));
    }

    let metadata: Map<String, Value> = req
        .form
        .iter()
        .filter_map(|(name, value)| {
            let key = name.strip_prefix("metadata[")?.strip_suffix(']')?;
            Some((key.to_owned(), json!(value)))
        })
        .collect();

    let mut session: Value = serde_json::from_str(SESSION_FIXTURE).unwrap_or_else(|_| json!({}));
    let id = fresh_id("cs_test");
    let now = unix_now();
    let set = |session: &mut Value, field: &str, value: Value| session[field] = value;
    set(&mut session, "id", json!(id));
    set(
        &mut session,
        "url",
        json!(format!("https://checkout.stripe.com/c/pay/{id}")),
    );
    set(&mut session, "object", json!("checkout.session"));
    set(&mut session, "mode", json!(mode));
    set(&mut session, "amount_subtotal", json!(amount_total));
    set(&mut session, "amount_total", json!(amount_total));
    set(&mut session, "currency", json!(currency));
    set(&mut session, "metadata", Value::Object(metadata));
    set(
        &mut session,
        "client_reference_id",
        json!(req.field("client_reference_id")),
    );
    set(&mut session, "success_url", json!(req.field("success_url")));
    set(&mut session, "cancel_url", json!(req.field("cancel_url")));
    set(
        &mut session,
        "customer_email",
        json!(req.field("customer_email")),
    );
    set(&mut session, "created", json!(now));
    set(&mut session, "expires_at", json!(now + 24 * 60 * 60));
    set(&mut session, "livemode", json!(false));
    set(&mut session, "status", json!("open"));
    set(&mut session, "payment_status", json!("unpaid"));
    // A new session has no PaymentIntent yet (it is made when the customer pays).
    set(&mut session, "payment_intent", Value::Null);
    set(&mut session, "customer_details", Value::Null);
    set(&mut session, "currency_conversion", Value::Null);
    set(&mut session, "shipping_cost", Value::Null);
    set(&mut session, "shipping_address_collection", Value::Null);
    set(
        &mut session,
        "total_details",
        json!({"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0}),
    );
    Ok(session)
}

// ---------------------------------------------------------------------------------------------
// Webhook deliveries
// ---------------------------------------------------------------------------------------------

/// The `Stripe-Signature` header value for `payload` signed with `secret` at `timestamp`:
/// `t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>.<payload>")>`.
pub fn signature_header(secret: &str, payload: &str, timestamp: i64) -> String {
    format!(
        "t={timestamp},v1={}",
        v1_signature(secret, payload, timestamp)
    )
}

/// Just the hex `v1` signature, to build unusual headers (several `v1`, a `v0`...).
pub fn v1_signature(secret: &str, payload: &str, timestamp: i64) -> String {
    // HMAC accepts keys of any length, so this cannot fail; an empty MAC would only make
    // the signature wrong, never panic.
    match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(format!("{timestamp}.").as_bytes());
            mac.update(payload.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    }
}

/// A webhook delivery signed now: `(raw body, Stripe-Signature header value)`.
pub fn signed_event(secret: &str, event_json: &Value) -> (String, String) {
    signed_event_at(secret, event_json, unix_now())
}

/// A webhook delivery signed at `timestamp` (e.g. too old, to test the tolerance).
pub fn signed_event_at(secret: &str, event_json: &Value, timestamp: i64) -> (String, String) {
    let body = event_json.to_string();
    let header = signature_header(secret, &body, timestamp);
    (body, header)
}

/// POSTs a signed delivery to a webhook endpoint as Stripe does and returns the status and
/// body the endpoint answered.
///
/// # Panics
/// If the endpoint cannot be reached at all (the test's own server is not running).
pub async fn deliver(url: &str, body: &str, signature_header: &str) -> (StatusCode, String) {
    // A client per call: a pooled connection must not outlive the test runtime it was made on.
    let sent = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json; charset=utf-8")
        .header("stripe-signature", signature_header)
        .header(
            "user-agent",
            "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        )
        .body(body.to_owned())
        .send()
        .await;
    match sent {
        Ok(response) => {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            (status, text)
        }
        Err(e) => panic!("cannot deliver the Stripe webhook: {e}"),
    }
}

fn fixture(text: &str) -> Value {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("embedded Stripe fixture is not JSON: {e}"))
}

/// Wraps `object` in the fixture `event` envelope: `{id, type, created: now, data: {object}}`.
pub fn stripe_event(event_id: &str, event_type: &str, object: Value) -> Value {
    let mut event = fixture(EVENT_FIXTURE);
    event["id"] = json!(event_id);
    event["type"] = json!(event_type);
    event["created"] = json!(unix_now());
    event["api_version"] = json!("2025-03-31.basil");
    event["pending_webhooks"] = json!(1);
    event["data"] = json!({ "object": object });
    event
}

/// A `checkout.session` object (fixture shape) in the state a webhook would carry it.
pub fn checkout_session_object(
    session_id: &str,
    recharge_id: &str,
    user_id: &str,
    amount_fen: i64,
    currency: &str,
    payment_status: &str,
    payment_intent: Option<&str>,
) -> Value {
    let mut session = fixture(SESSION_FIXTURE);
    session["id"] = json!(session_id);
    session["url"] = Value::Null;
    session["client_reference_id"] = json!(recharge_id);
    session["metadata"] = json!({ "user_id": user_id, "recharge_id": recharge_id });
    session["amount_subtotal"] = json!(amount_fen);
    session["amount_total"] = json!(amount_fen);
    session["currency"] = json!(currency);
    session["mode"] = json!("payment");
    session["payment_status"] = json!(payment_status);
    session["status"] = json!("complete");
    session["payment_intent"] = json!(payment_intent);
    session["currency_conversion"] = Value::Null;
    session["shipping_cost"] = Value::Null;
    session
}

/// `checkout.session.completed`; `payment_status` is `paid` for cards, `unpaid` for delayed
/// methods (then `async_payment_succeeded`/`_failed` follows).
#[allow(clippy::too_many_arguments)] // mirrors the fields a test sets, in the order of the object
pub fn checkout_completed_event(
    event_id: &str,
    session_id: &str,
    recharge_id: &str,
    user_id: &str,
    amount_fen: i64,
    currency: &str,
    payment_status: &str,
    payment_intent: Option<&str>,
) -> Value {
    let session = checkout_session_object(
        session_id,
        recharge_id,
        user_id,
        amount_fen,
        currency,
        payment_status,
        payment_intent,
    );
    stripe_event(event_id, "checkout.session.completed", session)
}

/// `checkout.session.async_payment_succeeded` (`payment_status` `paid`).
pub fn async_payment_succeeded_event(
    event_id: &str,
    session_id: &str,
    recharge_id: &str,
    user_id: &str,
    amount_fen: i64,
    currency: &str,
    payment_intent: Option<&str>,
) -> Value {
    let session = checkout_session_object(
        session_id,
        recharge_id,
        user_id,
        amount_fen,
        currency,
        "paid",
        payment_intent,
    );
    stripe_event(
        event_id,
        "checkout.session.async_payment_succeeded",
        session,
    )
}

/// `checkout.session.async_payment_failed` (`payment_status` `unpaid`).
pub fn async_payment_failed_event(
    event_id: &str,
    session_id: &str,
    recharge_id: &str,
    user_id: &str,
    amount_fen: i64,
    currency: &str,
    payment_intent: Option<&str>,
) -> Value {
    let session = checkout_session_object(
        session_id,
        recharge_id,
        user_id,
        amount_fen,
        currency,
        "unpaid",
        payment_intent,
    );
    stripe_event(event_id, "checkout.session.async_payment_failed", session)
}

/// `checkout.session.expired`: status `expired`, unpaid, no PaymentIntent.
pub fn session_expired_event(
    event_id: &str,
    session_id: &str,
    recharge_id: &str,
    user_id: &str,
    amount_fen: i64,
    currency: &str,
) -> Value {
    let mut session = checkout_session_object(
        session_id,
        recharge_id,
        user_id,
        amount_fen,
        currency,
        "unpaid",
        None,
    );
    session["status"] = json!("expired");
    stripe_event(event_id, "checkout.session.expired", session)
}

/// `charge.refunded`: `amount_refunded` is cumulative; equal to `amount` for a full refund.
/// `metadata` is what the charge carries (often empty: match refunds by `payment_intent`).
pub fn charge_refunded_event(
    event_id: &str,
    charge_id: &str,
    payment_intent: Option<&str>,
    amount: i64,
    amount_refunded: i64,
    currency: &str,
    metadata: &[(&str, &str)],
) -> Value {
    let mut charge = fixture(CHARGE_FIXTURE);
    charge["id"] = json!(charge_id);
    charge["payment_intent"] = json!(payment_intent);
    charge["amount"] = json!(amount);
    charge["amount_captured"] = json!(amount);
    charge["captured"] = json!(true);
    charge["amount_refunded"] = json!(amount_refunded);
    charge["refunded"] = json!(amount_refunded >= amount);
    charge["currency"] = json!(currency);
    charge["metadata"] = Value::Object(
        metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect(),
    );
    stripe_event(event_id, "charge.refunded", charge)
}

/// `charge.dispute.created` for a charge.
pub fn dispute_created_event(
    event_id: &str,
    dispute_id: &str,
    charge_id: &str,
    payment_intent: Option<&str>,
    amount: i64,
    currency: &str,
) -> Value {
    let mut dispute = fixture(DISPUTE_FIXTURE);
    dispute["id"] = json!(dispute_id);
    dispute["charge"] = json!(charge_id);
    dispute["payment_intent"] = json!(payment_intent);
    dispute["amount"] = json!(amount);
    dispute["currency"] = json!(currency);
    dispute["status"] = json!("needs_response");
    stripe_event(event_id, "charge.dispute.created", dispute)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_ids_are_unique_and_stripe_shaped() {
        let a = fresh_id("cs_test");
        let b = fresh_id("cs_test");
        assert_ne!(a, b);
        assert!(a.starts_with("cs_test_"));
        assert_eq!(a.len(), "cs_test_".len() + 24);
    }

    #[test]
    fn signs_like_stripe() {
        // Reference: Python's hmac.new(b"whsec_x", b"1700000000.{}", sha256).hexdigest().
        assert_eq!(
            signature_header("whsec_x", "{}", 1_700_000_000),
            "t=1700000000,v1=be8cb8325f2202445260a855532f967e30ad2a9394ce28da66ee02880ddcb661"
        );
    }

    #[test]
    fn builders_start_from_the_fixtures_and_set_the_fields() {
        let event = checkout_completed_event(
            "evt_1",
            "cs_test_1",
            "rch_1",
            "usr_1",
            1000,
            "cny",
            "paid",
            Some("pi_1"),
        );
        assert_eq!(event["type"], "checkout.session.completed");
        assert_eq!(event["object"], "event");
        let session = &event["data"]["object"];
        assert_eq!(session["object"], "checkout.session");
        assert_eq!(session["metadata"]["recharge_id"], "rch_1");
        assert_eq!(session["amount_total"], 1000);
        assert_eq!(session["payment_intent"], "pi_1");

        let event = charge_refunded_event("evt_2", "ch_1", Some("pi_1"), 1000, 1000, "cny", &[]);
        assert_eq!(event["data"]["object"]["refunded"], true);
        let event = dispute_created_event("evt_3", "dp_1", "ch_1", None, 1000, "cny");
        assert_eq!(event["data"]["object"]["charge"], "ch_1");
        let event = session_expired_event("evt_4", "cs_1", "rch_1", "usr_1", 1000, "cny");
        assert_eq!(event["data"]["object"]["status"], "expired");
    }
}
