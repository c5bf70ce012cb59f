//! The HTTP test harness: the real application on port 0 against a fresh PostgreSQL database,
//! with Stripe and Grsai replaced by the test kit's local fakes (which speak their wire
//! formats), and typed helpers so each test reads as the flow it checks.

#![allow(dead_code, unused_imports, clippy::unwrap_used)]

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use credit_http::{Application, Config};
use credit_testkit::db::TestDb;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

pub use credit_testkit::fake_grsai::{self, FakeGrsai, Mode as GrsaiMode};
pub use credit_testkit::fake_stripe::{self, FailMode, FakeStripe};

pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef";
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const WEBHOOK_SECRET: &str = "whsec_test_0123456789";
pub const STRIPE_KEY: &str = "sk_test_0123456789";
pub const GRSAI_KEY: &str = "grsai-test-key";

/// How long a bounded wait lasts before the test fails.
pub const WAIT: Duration = Duration::from_secs(5);

/// An HTTP answer: status and JSON body (`Value::Null` when the body is not JSON).
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub text: String,
}

impl Resp {
    /// `error.code` of an error answer ("" when there is none).
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    /// Asserts the status, printing the body when it differs.
    #[track_caller]
    pub fn expect(&self, status: u16) -> &Self {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.text
        );
        self
    }

    /// Asserts an error answer: status, stable code and the documented shape.
    #[track_caller]
    pub fn expect_error(&self, status: u16, code: &str) -> &Self {
        assert_eq!(
            (self.status, self.code()),
            (status, code),
            "unexpected error; body: {}",
            self.text
        );
        assert!(
            self.body["error"]["message"].is_string(),
            "error without a message: {}",
            self.text
        );
        self
    }

    pub fn str(&self, field: &str) -> String {
        match &self.body[field] {
            Value::String(s) => s.clone(),
            other => panic!("{field} is not a string but {other}; body: {}", self.text),
        }
    }

    pub fn i64(&self, field: &str) -> i64 {
        self.body[field]
            .as_i64()
            .unwrap_or_else(|| panic!("{field} is not an integer; body: {}", self.text))
    }

    pub fn records(&self) -> Vec<Value> {
        self.body["records"]
            .as_array()
            .unwrap_or_else(|| panic!("no records; body: {}", self.text))
            .clone()
    }
}

/// Signs an HS256 JWT with `secret` over `claims`.
pub fn jwt(secret: &str, claims: &Value) -> String {
    jwt_with_header(secret, &json!({"alg": "HS256", "typ": "JWT"}), claims)
}

pub fn jwt_with_header(secret: &str, header: &Value, claims: &Value) -> String {
    let h = URL_SAFE_NO_PAD.encode(header.to_string());
    let c = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{h}.{c}").as_bytes());
    let s = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{h}.{c}.{s}")
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A user id unique to this run (tests in one binary share nothing, but unique ids make
/// failures easier to read).
pub fn user(name: &str) -> String {
    format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// Polls `check` until it returns `Some`, for at most [`WAIT`].
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if started.elapsed() > WAIT {
            panic!("timed out after {WAIT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Stopper = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Which outside world the application sees.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Stripe and Grsai fakes, JWT secret, admin token, webhook secret.
    Full,
    /// No keys at all: demo payments, simulated video, dev tokens.
    Demo,
}

pub struct TestApp {
    pub base: String,
    pub port: u16,
    pub http: reqwest::Client,
    pub stripe: Option<FakeStripe>,
    pub grsai: Option<FakeGrsai>,
    /// Stops the running application.
    stopper: Option<Stopper>,
    /// Turns `/readyz` to 503 as SIGTERM does.
    pub readiness: credit_http::Readiness,
    pub db: TestDb,
    /// The configuration it was started with.
    env: HashMap<String, String>,
}

impl TestApp {
    /// The application with both fakes and every secret configured.
    pub async fn spawn() -> Self {
        Self::spawn_with(&[]).await
    }

    /// As [`TestApp::spawn`], with extra or overriding environment variables.
    pub async fn spawn_with(vars: &[(&str, &str)]) -> Self {
        Self::start(Kind::Full, vars, None).await
    }

    /// As [`TestApp::spawn_with`], on another PostgreSQL server (`server`: any database URL
    /// of it), e.g. a private one a fault test restarts.
    pub async fn spawn_on(server: &str, vars: &[(&str, &str)]) -> Self {
        Self::start(Kind::Full, vars, Some(server)).await
    }

    /// Demo mode: no Stripe, Grsai or JWT key; the simulated provider answers in 200 ms.
    pub async fn demo(vars: &[(&str, &str)]) -> Self {
        Self::start(Kind::Demo, vars, None).await
    }

    async fn start(kind: Kind, vars: &[(&str, &str)], server: Option<&str>) -> Self {
        let db = match server {
            None => TestDb::with_pools(2, 4).await,
            Some(server) => TestDb::on_server(server, 2, 4).await,
        };
        let mut env: HashMap<String, String> = HashMap::new();
        let mut set = |k: &str, v: &str| {
            env.insert(k.to_owned(), v.to_owned());
        };
        set("DATABASE_URL", &db.url);
        set("LISTEN_ADDR", "127.0.0.1:0");
        set("DATABASE_WRITE_CONNECTIONS", "8");
        set("DATABASE_READ_CONNECTIONS", "8");
        // Tests fire many requests per user; the rate-limit test sets its own limits.
        set("RATE_LIMIT_GENERATE", "off");
        set("RATE_LIMIT_RECHARGE", "off");
        set("RATE_LIMIT_DEV_TOKEN", "off");
        let (stripe, grsai) = match kind {
            Kind::Full => {
                let stripe = FakeStripe::start().await;
                let grsai = FakeGrsai::start().await;
                set("AUTH_JWT_SECRET", JWT_SECRET);
                set("ADMIN_TOKEN", ADMIN_TOKEN);
                set("STRIPE_SECRET_KEY", STRIPE_KEY);
                set("STRIPE_API_BASE", &stripe.base_url());
                set("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET);
                set("GRSAI_API_KEY", GRSAI_KEY);
                set("GRSAI_API_BASE", &grsai.base_url());
                set("GRSAI_TIMEOUT", "2s");
                (Some(stripe), Some(grsai))
            }
            Kind::Demo => {
                set("DEMO_VIDEO_DELAY", "200ms");
                (None, None)
            }
        };
        for (k, v) in vars {
            set(k, v);
        }
        Self::launch(env, db, stripe, grsai).await
    }

    /// A second instance of the service on this one's database, fakes and configuration, as
    /// a second process would be: its own pools, executor, projector and background jobs.
    /// (Its `stripe()` and `grsai()` are the first instance's; ask that one.)
    pub async fn spawn_sibling(&self) -> Self {
        Self::launch(self.env.clone(), self.db.shared().await, None, None).await
    }

    async fn launch(
        env: HashMap<String, String>,
        db: TestDb,
        stripe: Option<FakeStripe>,
        grsai: Option<FakeGrsai>,
    ) -> Self {
        let config = Config::from_lookup(|k| env.get(k).cloned())
            .unwrap_or_else(|e| panic!("test configuration refused: {e}"));
        let app = Application::build(config)
            .await
            .unwrap_or_else(|e| panic!("application failed to build: {e:#}"));
        let port = app.port();
        let running = app.spawn();
        let readiness = running.readiness.clone();
        let stopper: Stopper = Box::new(move || Box::pin(running.stop()));
        Self {
            base: format!("http://127.0.0.1:{port}"),
            port,
            http: reqwest::Client::new(),
            stripe,
            grsai,
            stopper: Some(stopper),
            readiness,
            db,
            env,
        }
    }

    /// Stops the server and the background jobs.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stopper.take() {
            stop().await;
        }
    }

    pub fn stripe(&self) -> &FakeStripe {
        self.stripe.as_ref().unwrap()
    }

    pub fn grsai(&self) -> &FakeGrsai {
        self.grsai.as_ref().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    // --- tokens -------------------------------------------------------------------------

    /// A valid user token (signed with the configured secret, an hour to live).
    pub fn token(&self, user: &str) -> String {
        jwt(JWT_SECRET, &json!({"sub": user, "exp": now() + 3600}))
    }

    /// A demo-mode token from `POST /api/dev/token`.
    pub async fn dev_token(&self, user: &str) -> String {
        let r = self
            .post("/api/dev/token", None, &json!({ "user_id": user }))
            .await;
        r.expect(200);
        r.str("token")
    }

    // --- raw requests -------------------------------------------------------------------

    /// Sends a request; `token` becomes `Authorization: Bearer <token>`.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Resp {
        let mut req = self.http.request(method, self.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(body) = body {
            req = req.body(body);
        }
        let response = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path} unreachable: {e}"));
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert!(
            status < 500 || status == 502,
            "{path} answered {status} (a client must never cause a 5xx): {text}"
        );
        Resp { status, body, text }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        self.send(reqwest::Method::GET, path, token, &[], None)
            .await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Resp {
        self.post_raw(path, token, &body.to_string()).await
    }

    /// POSTs `body` verbatim as `application/json`.
    pub async fn post_raw(&self, path: &str, token: Option<&str>, body: &str) -> Resp {
        self.send(
            reqwest::Method::POST,
            path,
            token,
            &[("content-type", "application/json")],
            Some(body.to_owned()),
        )
        .await
    }

    // --- user endpoints -----------------------------------------------------------------

    pub async fn stats(&self, token: &str) -> Resp {
        self.get("/api/stats", Some(token)).await
    }

    pub async fn post_recharge(&self, token: &str, body: Value) -> Resp {
        self.post("/api/recharge", Some(token), &body).await
    }

    pub async fn post_recharge_keyed(&self, token: &str, key: &str, body: Value) -> Resp {
        self.send(
            reqwest::Method::POST,
            "/api/recharge",
            Some(token),
            &[
                ("content-type", "application/json"),
                ("idempotency-key", key),
            ],
            Some(body.to_string()),
        )
        .await
    }

    pub async fn recharges(&self, token: &str, query: &str) -> Resp {
        self.get(&format!("/api/recharge{query}"), Some(token))
            .await
    }

    pub async fn generate(&self, token: &str, body: Value) -> Resp {
        self.post("/api/video/generate", Some(token), &body).await
    }

    /// Generates with just a prompt; asserts 202 and returns the task id.
    pub async fn generate_ok(&self, token: &str, prompt: &str) -> String {
        let r = self.generate(token, json!({ "prompt": prompt })).await;
        r.expect(202);
        r.str("task_id")
    }

    pub async fn tasks(&self, token: &str, query: &str) -> Resp {
        self.get(&format!("/api/video/tasks{query}"), Some(token))
            .await
    }

    pub async fn task(&self, token: &str, task_id: &str) -> Resp {
        self.get(&format!("/api/video/tasks/{task_id}"), Some(token))
            .await
    }

    pub async fn consumption(&self, token: &str, query: &str) -> Resp {
        self.get(&format!("/api/consumption{query}"), Some(token))
            .await
    }

    // --- admin --------------------------------------------------------------------------

    pub async fn admin_get(&self, path: &str) -> Resp {
        self.get(path, Some(ADMIN_TOKEN)).await
    }

    pub async fn adjust(&self, user: &str, credits: i64, reason: &str) -> Resp {
        self.post(
            &format!("/api/admin/accounts/{user}/adjustments"),
            Some(ADMIN_TOKEN),
            &json!({ "credits": credits, "reason": reason }),
        )
        .await
    }

    /// Grants credits through the admin endpoint and waits until the balance shows them.
    pub async fn grant(&self, user: &str, credits: i64) {
        let r = self.adjust(user, credits, "test grant").await;
        r.expect(201);
        let balance = r.i64("balance");
        self.wait_for_balance(&self.token(user), balance).await;
    }

    // --- Stripe -------------------------------------------------------------------------

    /// POSTs a raw webhook delivery.
    pub async fn webhook(&self, body: &str, signature: &str) -> Resp {
        self.send(
            reqwest::Method::POST,
            "/api/stripe/webhook",
            None,
            &[
                ("content-type", "application/json; charset=utf-8"),
                ("stripe-signature", signature),
            ],
            Some(body.to_owned()),
        )
        .await
    }

    /// Signs `event` with the configured secret and delivers it.
    pub async fn send_event(&self, event: &Value) -> Resp {
        let (body, header) = fake_stripe::signed_event(WEBHOOK_SECRET, event);
        self.webhook(&body, &header).await
    }

    /// Creates a Stripe recharge of `amount_fen` and pays it (`checkout.session.completed`,
    /// paid, PaymentIntent `pi_<recharge id>`); waits until the balance shows it.
    /// Returns the recharge id.
    pub async fn paid_recharge(&self, user: &str, amount_fen: i64) -> String {
        let token = self.token(user);
        let before = self.stats(&token).await.i64("credits");
        let yuan = amount_fen as f64 / 100.0;
        let r = self.post_recharge(&token, json!({ "amount": yuan })).await;
        r.expect(201);
        let recharge_id = r.str("recharge_id");
        let event = completed_event(&recharge_id, user, amount_fen, "paid");
        self.send_event(&event).await.expect(200);
        self.wait_for_balance(&token, before + amount_fen).await;
        recharge_id
    }

    // --- Grsai --------------------------------------------------------------------------

    /// The create request the fake received for `task_id` (its `webHook` names the task).
    pub fn grsai_request(&self, task_id: &str) -> fake_grsai::RecordedRequest {
        let needle = format!("task={task_id}&");
        self.grsai()
            .requests_to(fake_grsai::CREATE_PATH)
            .into_iter()
            .find(|r| {
                r.body["webHook"]
                    .as_str()
                    .is_some_and(|u| u.contains(&needle))
            })
            .unwrap_or_else(|| panic!("Grsai never received task {task_id}"))
    }

    /// The callback URL the service gave Grsai for `task_id`.
    pub fn callback_url(&self, task_id: &str) -> String {
        self.grsai_request(task_id).body["webHook"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Grsai's id of `task_id`, as the fake assigned it (requests are numbered in order).
    pub async fn provider_id(&self, token: &str, task_id: &str) -> String {
        let task = self
            .wait_for_task(token, task_id, |t| t["status"] == "processing")
            .await;
        let _ = task;
        let client = self.db.client().await;
        let row = client
            .query_one(
                "SELECT provider_task_id FROM video_tasks WHERE id = $1",
                &[&task_id],
            )
            .await
            .unwrap();
        row.get::<_, Option<String>>(0).unwrap()
    }

    /// Delivers a result object to the task's callback URL, as Grsai does.
    pub async fn callback(&self, task_id: &str, result: &Value) -> u16 {
        fake_grsai::deliver(&self.callback_url(task_id), result)
            .await
            .as_u16()
    }

    // --- database and projection --------------------------------------------------------

    /// Rows in the journal.
    pub async fn event_count(&self) -> i64 {
        let client = self.db.client().await;
        client
            .query_one("SELECT count(*) FROM events", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Events of one type in one account.
    pub async fn events_of(&self, user: &str, event_type: &str) -> i64 {
        let client = self.db.client().await;
        client
            .query_one(
                "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = $2",
                &[&user, &event_type],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Waits until the projected balance (`GET /api/stats`) is `expected`.
    pub async fn wait_for_balance(&self, token: &str, expected: i64) {
        let mut last = None;
        let found = tokio::time::timeout(WAIT, async {
            loop {
                let credits = self.stats(token).await.body["credits"].as_i64();
                if credits == Some(expected) {
                    return;
                }
                last = credits;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            found.is_ok(),
            "balance never became {expected} (last seen {last:?})"
        );
    }

    /// Waits until the projection has applied every appended event.
    pub async fn wait_projected(&self) {
        let client = self.db.client().await;
        wait_for("the projection to catch up", || async {
            let n: i64 = client
                .query_one("SELECT count(*) FROM projection_outbox", &[])
                .await
                .unwrap()
                .get(0);
            (n == 0).then_some(())
        })
        .await;
    }

    /// Waits until `GET /api/video/tasks/{id}` answers a task satisfying `pred`.
    pub async fn wait_for_task(
        &self,
        token: &str,
        task_id: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut last = Value::Null;
        let found = tokio::time::timeout(WAIT, async {
            loop {
                let r = self.task(token, task_id).await;
                if r.status == 200 && pred(&r.body) {
                    return r.body;
                }
                last = r.body;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("task {task_id} never reached the state; last: {last}"))
    }

    /// Waits until the recharge record has `status`; returns it.
    pub async fn wait_for_recharge(&self, token: &str, recharge_id: &str, status: &str) -> Value {
        let mut last = Value::Null;
        let found = tokio::time::timeout(WAIT, async {
            loop {
                let r = self.recharges(token, "?limit=100").await;
                let record = r
                    .records()
                    .into_iter()
                    .find(|x| x["recharge_id"] == recharge_id);
                if let Some(record) = record {
                    if record["status"] == status {
                        return record;
                    }
                    last = record;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!("recharge {recharge_id} never became {status}; last: {last}")
        })
    }
}

/// `checkout.session.completed` for a recharge (PaymentIntent `pi_<recharge id>`).
pub fn completed_event(
    recharge_id: &str,
    user: &str,
    amount_fen: i64,
    payment_status: &str,
) -> Value {
    fake_stripe::checkout_completed_event(
        &format!("evt_done_{recharge_id}"),
        &format!("cs_test_{recharge_id}"),
        recharge_id,
        user,
        amount_fen,
        "cny",
        payment_status,
        Some(&pi(recharge_id)),
    )
}

/// The PaymentIntent id [`completed_event`] reports.
pub fn pi(recharge_id: &str) -> String {
    format!("pi_{recharge_id}")
}

/// A unique Stripe event id.
pub fn evt(name: &str) -> String {
    format!("evt_{name}_{}", uuid::Uuid::new_v4().simple())
}
