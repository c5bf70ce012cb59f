//! Property-based fuzzing of every body the service parses (issue 11): arbitrary bytes,
//! JSON-shaped values built from the endpoints' own field names, and byte-level mutations of
//! valid bodies, into the Stripe webhook (correctly signed, so parsing is reached, and not),
//! the Grsai callback (with a valid task token) and the JSON bodies of generate, recharge
//! and adjustments. Never a 5xx, never a panic; and a refused request writes nothing: neither
//! the journal nor the Stripe delivery log changes.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use hmac::{Hmac, Mac};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use serde_json::{json, Value};
use sha2::Sha256;

#[derive(Debug, Clone, Copy)]
enum Target {
    WebhookSigned,
    WebhookUnsigned,
    Callback,
    Generate,
    Recharge,
    Adjust,
}

const TARGETS: [Target; 6] = [
    Target::WebhookSigned,
    Target::WebhookUnsigned,
    Target::Callback,
    Target::Generate,
    Target::Recharge,
    Target::Adjust,
];

/// Field names the endpoints and the providers' wire formats use, so that generated objects
/// get past "unknown field" and reach the validation behind it.
const KEYS: &[&str] = &[
    "id",
    "type",
    "object",
    "data",
    "created",
    "livemode",
    "amount",
    "amount_total",
    "currency",
    "payment_status",
    "payment_intent",
    "metadata",
    "user_id",
    "recharge_id",
    "status",
    "results",
    "url",
    "progress",
    "failure_reason",
    "error",
    "prompt",
    "model",
    "aspect_ratio",
    "aspectRatio",
    "duration",
    "size",
    "url",
    "credits",
    "reason",
    "charge",
    "refunded",
    "amount_refunded",
    "dispute",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1000i64..100_000).prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::from),
        prop::sample::select(vec![
            "paid",
            "unpaid",
            "failed",
            "succeeded",
            "running",
            "cny",
            "usd",
            "sora-2",
            "9:16",
            "16:9",
            "small",
            "large",
            "checkout.session.completed",
            "charge.refunded",
            "checkout.session",
            "",
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..8).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

/// One byte-level edit of a valid body.
#[derive(Debug, Clone)]
enum Edit {
    Replace(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Replace(i, b)),
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
            any::<usize>().prop_map(Edit::Delete),
            any::<usize>().prop_map(Edit::Truncate),
        ],
        1..6,
    )
}

fn apply(mut body: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        let len = body.len().max(1);
        match *edit {
            Edit::Replace(i, b) if !body.is_empty() => body[i % len] = b,
            Edit::Insert(i, b) => body.insert(i % (body.len() + 1), b),
            Edit::Delete(i) if !body.is_empty() => {
                body.remove(i % len);
            }
            Edit::Truncate(i) => body.truncate(i % len),
            _ => {}
        }
    }
    body
}

#[derive(Debug, Clone)]
enum Body {
    Bytes(Vec<u8>),
    Json(Value),
    Mutated(Vec<Edit>),
    /// A valid body with the value at one of its fields (any depth) replaced.
    Field(usize, Value),
}

/// Replaces the `n`th value (depth first, modulo their number) under an object key.
fn replace_field(seed: &mut Value, n: usize, with: Value) {
    /// JSON pointers of every value under an object key.
    fn paths(v: &Value, at: &mut Vec<String>, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    at.push(k.replace('~', "~0").replace('/', "~1"));
                    out.push(format!("/{}", at.join("/")));
                    paths(child, at, out);
                    at.pop();
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    at.push(i.to_string());
                    paths(child, at, out);
                    at.pop();
                }
            }
            _ => {}
        }
    }
    let mut found = Vec::new();
    paths(seed, &mut Vec::new(), &mut found);
    if found.is_empty() {
        return;
    }
    if let Some(slot) = seed.pointer_mut(&found[n % found.len()]) {
        *slot = with;
    }
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..600).prop_map(Body::Bytes),
        json_value().prop_map(Body::Json),
        edits().prop_map(Body::Mutated),
        (any::<usize>(), json_value()).prop_map(|(n, v)| Body::Field(n, v)),
    ]
}

struct Fixture {
    app: TestApp,
    user: String,
    token: String,
    callback_url: String,
    seeds: Vec<(Target, Vec<u8>)>,
}

impl Fixture {
    async fn new() -> Self {
        let app = TestApp::spawn().await;
        let user = user("fuzzed");
        let token = app.token(&user);
        app.grant(&user, 1_000_000).await;
        let task = app.generate_ok(&token, "a fox").await;
        let pid = app.provider_id(&token, &task).await;
        let callback_url = app.callback_url(&task);
        let recharge = app
            .post_recharge(&token, json!({ "amount": 10 }))
            .await
            .str("recharge_id");
        let seeds = vec![
            (
                Target::WebhookSigned,
                completed_event(&recharge, &user, 1000, "paid").to_string(),
            ),
            (
                Target::Callback,
                fake_grsai::failed_result(&pid, "error", "x").to_string(),
            ),
            (Target::Generate, json!({ "prompt": "a cat" }).to_string()),
            (Target::Recharge, json!({ "amount": 10 }).to_string()),
            (
                Target::Adjust,
                json!({ "credits": 5, "reason": "goodwill" }).to_string(),
            ),
        ]
        .into_iter()
        .map(|(t, s)| (t, s.into_bytes()))
        .collect();
        Self {
            app,
            user,
            token,
            callback_url,
            seeds,
        }
    }

    /// Journal rows and Stripe deliveries recorded.
    async fn writes(&self) -> (i64, i64) {
        let client = self.app.db.client().await;
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM stripe_events)",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }

    fn seed(&self, target: Target) -> Vec<u8> {
        let wanted = match target {
            Target::WebhookUnsigned => Target::WebhookSigned,
            t => t,
        };
        self.seeds
            .iter()
            .find(|(t, _)| std::mem::discriminant(t) == std::mem::discriminant(&wanted))
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    }

    async fn check(&self, target: Target, body: Body) -> Result<(), TestCaseError> {
        let bytes = match &body {
            Body::Bytes(b) => b.clone(),
            Body::Json(v) => v.to_string().into_bytes(),
            Body::Mutated(edits) => apply(self.seed(target), edits),
            Body::Field(n, with) => {
                let mut seed: Value = serde_json::from_slice(&self.seed(target)).unwrap();
                replace_field(&mut seed, *n, with.clone());
                seed.to_string().into_bytes()
            }
        };
        let before = self.writes().await;
        let (status, text) = self.send(target, bytes.clone()).await?;
        let shown = String::from_utf8_lossy(&bytes);
        // 502 is the provider failing on a valid request, not this body's doing.
        let provider = matches!(target, Target::Generate | Target::Recharge) && status == 502;
        prop_assert!(
            status < 500 || provider,
            "{target:?} answered {status} to {shown:?}: {text}"
        );
        if status >= 400 {
            let after = self.writes().await;
            prop_assert_eq!(
                before,
                after,
                "{:?} refused {} but wrote (events, stripe_events) for {:?}",
                target,
                status,
                shown
            );
        }
        Ok(())
    }

    /// Sends `bytes` to `target`; the status only.
    async fn post(&self, target: Target, bytes: Vec<u8>) -> u16 {
        self.send(target, bytes).await.unwrap().0
    }

    async fn send(&self, target: Target, bytes: Vec<u8>) -> Result<(u16, String), TestCaseError> {
        let http = &self.app.http;
        let request = match target {
            Target::WebhookSigned | Target::WebhookUnsigned => {
                let timestamp = chrono::Utc::now().timestamp();
                let signature = match target {
                    Target::WebhookSigned => sign(&bytes, timestamp),
                    _ => "00".repeat(32),
                };
                http.post(self.app.url("/api/stripe/webhook"))
                    .header("stripe-signature", format!("t={timestamp},v1={signature}"))
            }
            Target::Callback => http.post(&self.callback_url),
            Target::Generate => http
                .post(self.app.url("/api/video/generate"))
                .bearer_auth(&self.token),
            Target::Recharge => http
                .post(self.app.url("/api/recharge"))
                .bearer_auth(&self.token),
            Target::Adjust => http
                .post(
                    self.app
                        .url(&format!("/api/admin/accounts/{}/adjustments", self.user)),
                )
                .bearer_auth(ADMIN_TOKEN),
        };
        let response = request
            .header("content-type", "application/json")
            .body(bytes)
            .send()
            .await
            .map_err(|e| TestCaseError::fail(format!("{target:?}: no answer: {e}")))?;
        let status = response.status().as_u16();
        Ok((status, response.text().await.unwrap_or_default()))
    }
}

fn sign(body: &[u8], timestamp: i64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[test]
fn arbitrary_bodies_never_get_a_5xx_or_write_anything_when_refused() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fixture = runtime.block_on(Fixture::new());
    let cases: u32 = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(3000);
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let result = runner.run(
        &(prop::sample::select(TARGETS.to_vec()), body()),
        |(target, body)| runtime.block_on(fixture.check(target, body)),
    );
    let Fixture { app, .. } = fixture;
    runtime.block_on(app.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// What the fuzzing found: a `\u0000` in any string reached PostgreSQL, which cannot store
/// it, and the client got a 500. Every entry point now refuses it with a 400 and no effect.
#[tokio::test]
async fn a_nul_character_is_refused_with_a_400_everywhere() {
    let fixture = Fixture::new().await;
    let before = fixture.writes().await;
    // (The recharge body has no string to poison.)
    for target in TARGETS {
        let mut body: Value = serde_json::from_slice(&fixture.seed(target)).unwrap();
        // Every string of the valid body, one at a time, gets a NUL.
        let mut pointers = Vec::new();
        collect_strings(&body, &mut Vec::new(), &mut pointers);
        for pointer in pointers {
            let original = body.pointer(&pointer).unwrap().clone();
            let poisoned = format!("{}\u{0}", original.as_str().unwrap());
            *body.pointer_mut(&pointer).unwrap() = Value::from(poisoned);
            let status = fixture.post(target, body.to_string().into_bytes()).await;
            assert_eq!(status, 400, "{target:?} {pointer}");
            *body.pointer_mut(&pointer).unwrap() = original;
        }
    }
    assert_eq!(fixture.writes().await, before);
    fixture.app.stop().await;
}

fn collect_strings(v: &Value, at: &mut Vec<String>, out: &mut Vec<String>) {
    match v {
        Value::String(_) => out.push(format!("/{}", at.join("/"))),
        Value::Object(map) => {
            for (k, child) in map {
                at.push(k.replace('~', "~0").replace('/', "~1"));
                collect_strings(child, at, out);
                at.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                at.push(i.to_string());
                collect_strings(child, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

/// The demo sign-in body (`POST /api/dev/token`, demo mode only) under the same fuzzing: never
/// a 5xx, never a write (it writes nothing at all).
#[test]
fn arbitrary_dev_token_bodies_never_get_a_5xx() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = runtime.block_on(TestApp::demo(&[]));
    let seed = json!({ "user_id": "alice" }).to_string().into_bytes();
    let before = runtime.block_on(app.event_count());
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 500,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let result = runner.run(&body(), |body| {
        let bytes = match body {
            Body::Bytes(b) => b,
            Body::Json(v) => v.to_string().into_bytes(),
            Body::Mutated(edits) => apply(seed.clone(), &edits),
            Body::Field(n, with) => {
                let mut v: Value = serde_json::from_slice(&seed).unwrap();
                replace_field(&mut v, n, with);
                v.to_string().into_bytes()
            }
        };
        runtime.block_on(async {
            let r = app
                .http
                .post(app.url("/api/dev/token"))
                .header("content-type", "application/json")
                .body(bytes.clone())
                .send()
                .await
                .map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            prop_assert!(
                status < 500,
                "{status} to {:?}: {text}",
                String::from_utf8_lossy(&bytes)
            );
            Ok(())
        })
    });
    assert_eq!(runtime.block_on(app.event_count()), before);
    runtime.block_on(app.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
}
