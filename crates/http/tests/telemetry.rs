//! What operators watch: request ids (header, error bodies, event metadata) and the
//! Prometheus metrics at `GET /metrics`.

#![allow(clippy::unwrap_used)]

mod common;

/// The metrics recorder is one per process: tests of this binary that move counters run one
/// at a time, so each sees only its own deltas.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

use common::fake_grsai::failed_result;
use common::*;
use serde_json::{json, Value};

async fn request(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    request_id: Option<&str>,
    body: Option<Value>,
) -> (u16, Option<String>, Value) {
    let mut req = app.http.request(method, app.url(path));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(id) = request_id {
        req = req.header("x-request-id", id);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let id = r
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = r.json().await.unwrap_or(Value::Null);
    (status, id, body)
}

#[tokio::test]
async fn a_valid_incoming_request_id_is_answered_and_kept_in_event_metadata() {
    let _serial = SERIAL.lock().await;
    let app = TestApp::spawn().await;
    let u = user("rid");
    let token = app.token(&u);
    let id = "edge-7f3a.c1:hop/2_x";

    let (status, header, body) = request(
        &app,
        reqwest::Method::POST,
        "/api/recharge",
        Some(&token),
        Some(id),
        Some(json!({"amount": 10})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(header.as_deref(), Some(id));
    let client = app.db.client().await;
    let metadata: Value = client
        .query_one(
            "SELECT metadata FROM events WHERE aggregate_id = $1 AND event_type = 'RechargeRequested'",
            &[&u],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(metadata["request_id"], id);

    // Error answers carry it in the body too.
    let (status, header, body) = request(
        &app,
        reqwest::Method::POST,
        "/api/video/generate",
        None,
        Some(id),
        Some(json!({"prompt": "x"})),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(header.as_deref(), Some(id));
    assert_eq!(body["error"]["request_id"], id);
    assert_eq!(body["error"]["code"], "missing_token");
}

#[tokio::test]
async fn a_missing_or_unacceptable_request_id_is_replaced_by_a_new_one() {
    let _serial = SERIAL.lock().await;
    let app = TestApp::spawn().await;
    let long = "x".repeat(129);
    for incoming in [None, Some("has space"), Some(long.as_str()), Some("a\"b")] {
        let (status, header, body) = request(
            &app,
            reqwest::Method::GET,
            "/api/stats",
            None,
            incoming,
            None,
        )
        .await;
        assert_eq!(status, 401);
        let header = header.unwrap_or_else(|| panic!("no X-Request-Id for {incoming:?}"));
        assert!(uuid::Uuid::parse_str(&header).is_ok(), "{header}");
        assert_eq!(body["error"]["request_id"], header.as_str());
        let (status, again, _) =
            request(&app, reqwest::Method::GET, "/healthz", None, incoming, None).await;
        assert_eq!(status, 200);
        assert_ne!(again, Some(header), "each request gets its own id");
    }
    // Errors made by the framework's extractors (bad JSON) and unknown routes too.
    let token = app.token(&user("rid2"));
    let r = app
        .post_raw("/api/video/generate", Some(&token), "{not json")
        .await;
    assert!(r.body["error"]["request_id"].is_string(), "{}", r.text);
    let r = app.get("/no/such/route", None).await;
    assert!(r.body["error"]["request_id"].is_string(), "{}", r.text);
}

/// The sum of every series of `name` whose labels include all of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, rest)) => (m, rest),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

async fn scrape(app: &TestApp, token: Option<&str>) -> String {
    let r = app.get("/metrics", token).await;
    r.expect(200);
    r.text
}

/// Metrics are per process and tests of this binary run side by side: every check is a
/// difference, on series this test alone moves.
#[tokio::test]
async fn metrics_move_by_what_a_flow_did() {
    let _serial = SERIAL.lock().await;
    let metrics_token = "metrics-token-0123456789";
    let app = TestApp::spawn_with(&[("METRICS_TOKEN", metrics_token)]).await;
    app.get("/metrics", None)
        .await
        .expect_error(401, "missing_token");
    app.get("/metrics", Some("wrong-token-0123456789"))
        .await
        .expect_error(401, "invalid_metrics_token");
    let before = scrape(&app, Some(metrics_token)).await;

    let u = user("metered");
    let token = app.token(&u);
    app.paid_recharge(&u, 500).await; // 500 credits
    let ok = app.generate_ok(&token, "a fox").await;
    let bad = app.generate_ok(&token, "a failing fox").await;
    let pid = app.provider_id(&token, &bad).await;
    assert_eq!(
        app.callback(&bad, &failed_result(&pid, "output_moderation", "blocked"))
            .await,
        200
    );
    app.wait_for_balance(&token, 490).await;
    let _ = ok;
    let after = scrape(&app, Some(metrics_token)).await;

    let delta = |name: &str, labels: &[(&str, &str)]| {
        metric(&after, name, labels) - metric(&before, name, labels)
    };
    assert_eq!(delta("credits_recharged_total", &[]), 500.0, "{after}");
    assert_eq!(delta("credits_spent_total", &[]), 20.0);
    assert_eq!(delta("credits_refunded_total", &[]), 10.0);
    assert_eq!(
        delta(
            "ledger_commands_total",
            &[("kind", "DeductForTask"), ("outcome", "committed")]
        ),
        2.0,
        "{after}"
    );
    assert_eq!(
        delta(
            "http_requests_total",
            &[("route", "/api/video/generate"), ("status", "202")]
        ),
        2.0
    );
    assert!(
        delta(
            "http_request_duration_seconds_count",
            &[("route", "/api/video/generate")]
        ) >= 2.0
    );
    assert_eq!(
        delta(
            "stripe_webhook_events_total",
            &[("type", "checkout.session.completed")]
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta(
            "grsai_calls_total",
            &[("endpoint", "/v1/video/sora-video"), ("outcome", "ok")]
        ),
        2.0,
        "{after}"
    );
    assert!(delta("ledger_batch_size_count", &[]) >= 1.0);
    assert!(after.contains("projector_lag_seconds"), "{after}");
    assert!(after.contains("projector_pending_events"));
}

async fn readyz(app: &TestApp) -> (u16, Value) {
    let r = app.http.get(app.url("/readyz")).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn readiness_turns_503_when_the_projector_lags_and_when_shutting_down() {
    let _serial = SERIAL.lock().await;
    let app = TestApp::spawn_with(&[("READY_MAX_LAG", "5s")]).await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
    let u = user("lag");
    app.grant(&u, 10).await;

    // An outbox row an hour old that the projector cannot take (another transaction holds
    // it): the projection is an hour behind as far as anyone can tell.
    // The projector may take the row between its insert and the lock (it is idle and
    // sweeps every 100 ms): then try again until the lock holds it.
    let mut holder = app.db.client().await;
    let tx = loop {
        holder
            .execute(
                "INSERT INTO projection_outbox (aggregate_id, sequence, created_at)
                 VALUES ($1, 1, now() - interval '1 hour')",
                &[&u],
            )
            .await
            .unwrap();
        let tx = holder.transaction().await.unwrap();
        let held = tx
            .query(
                "SELECT 1 FROM projection_outbox WHERE aggregate_id = $1 FOR UPDATE",
                &[&u],
            )
            .await
            .unwrap();
        if !held.is_empty() {
            break tx;
        }
        tx.rollback().await.unwrap();
    };
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["reason"], "projector_lagging");
    assert!(body["projector_lag"]["seconds"].as_f64().unwrap() > 3000.0);
    // Released, the projector takes it (already applied: nothing changes) and all is well.
    tx.rollback().await.unwrap();
    wait_for("readiness to come back", || async {
        (readyz(&app).await.0 == 200).then_some(())
    })
    .await;

    // SIGTERM's first step: not ready, while still alive and still serving.
    app.readiness.start_draining();
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503);
    assert_eq!(body["reason"], "shutting_down");
    app.get("/healthz", None).await.expect(200);
    app.stats(&app.token(&u)).await.expect(200);
}

#[tokio::test]
async fn generate_and_recharge_are_rate_limited_per_user_with_retry_after() {
    let _serial = SERIAL.lock().await;
    let app = TestApp::spawn_with(&[
        ("RATE_LIMIT_GENERATE", "2/m"),
        ("RATE_LIMIT_RECHARGE", "1/m"),
    ])
    .await;
    let (a, b) = (user("busy"), user("calm"));
    app.grant(&a, 100).await;
    app.grant(&b, 100).await;
    let (ta, tb) = (app.token(&a), app.token(&b));
    app.generate_ok(&ta, "one").await;
    app.generate_ok(&ta, "two").await;

    // A token with a's id but a bad signature does not spend a's allowance, nor get past
    // authentication.
    let forged = jwt(
        "not-the-secret-0123456789",
        &json!({"sub": a, "exp": now() + 60}),
    );
    app.generate(&forged, json!({"prompt": "x"}))
        .await
        .expect_error(401, "invalid_token");

    let r = app
        .http
        .post(app.url("/api/video/generate"))
        .bearer_auth(&ta)
        .json(&json!({"prompt": "three"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry), "Retry-After {retry}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(body["error"]["retry_after"], retry);
    assert!(body["error"]["request_id"].is_string());
    // Nothing was charged for the refused request; another user is not affected.
    assert_eq!(app.events_of(&a, "CreditsDeducted").await, 2);
    app.generate_ok(&tb, "b's first").await;

    app.post_recharge(&ta, json!({"amount": 1}))
        .await
        .expect(201);
    app.post_recharge(&ta, json!({"amount": 1}))
        .await
        .expect_error(429, "rate_limited");
    app.post_recharge(&tb, json!({"amount": 1}))
        .await
        .expect(201);
}

#[tokio::test]
async fn the_demo_token_endpoint_is_rate_limited_per_address() {
    let _serial = SERIAL.lock().await;
    let app = TestApp::demo(&[("RATE_LIMIT_DEV_TOKEN", "2/m")]).await;
    app.dev_token("a").await;
    app.dev_token("b").await;
    app.post("/api/dev/token", None, &json!({"user_id": "c"}))
        .await
        .expect_error(429, "rate_limited");
}

#[tokio::test]
async fn a_known_path_with_an_undeclared_method_is_405_with_allow() {
    let _serial = SERIAL.lock().await;
    let app = TestApp::spawn().await;
    for (method, path, allow) in [
        (reqwest::Method::PUT, "/api/recharge", "GET, POST"),
        (reqwest::Method::DELETE, "/api/video/tasks/vid_x", "GET"),
        (reqwest::Method::POST, "/readyz", "GET"),
    ] {
        let r = app
            .http
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 405, "{method} {path}");
        assert_eq!(r.headers()["allow"], allow);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "method_not_allowed");
        assert!(body["error"]["request_id"].is_string());
    }
    // Unknown paths stay 404, and a route's own 404 (an unknown task) is untouched.
    app.get("/api/nothing", None)
        .await
        .expect_error(404, "not_found");
    let token = app.token(&user("m"));
    app.task(&token, "vid_unknown").await.expect(404);
}

#[tokio::test]
async fn control_characters_in_a_json_body_are_400_and_change_nothing() {
    let _serial = SERIAL.lock().await;
    let app = TestApp::spawn().await;
    let u = user("ctrl");
    app.grant(&u, 100).await;
    let token = app.token(&u);
    let events = app.event_count().await;
    for prompt in ["a\u{0}b", "bell\u{7}", "esc\u{1b}[31m", "c1\u{85}"] {
        app.generate(&token, json!({ "prompt": prompt }))
            .await
            .expect_error(400, "control_characters");
    }
    app.adjust(&u, 5, "why\u{0}")
        .await
        .expect_error(400, "control_characters");
    assert_eq!(app.event_count().await, events);
    // Tabs and line breaks are text.
    app.generate_ok(&token, "line one\nline two\ttabbed").await;
}

#[tokio::test]
async fn readiness_turns_503_when_the_database_is_gone() {
    let _serial = SERIAL.lock().await;
    let app = TestApp::spawn().await;
    assert_eq!(readyz(&app).await.0, 200);
    // Dropping the database ends every connection of both pools, and new ones fail.
    credit_store::db::drop_database(&app.db.url).await.unwrap();
    let (status, body) = wait_for("readiness to fail", || async {
        let (status, body) = readyz(&app).await;
        (status == 503).then_some((status, body))
    })
    .await;
    assert_eq!(status, 503);
    assert_eq!(body["reason"], "database_unreachable", "{body}");
    app.get("/healthz", None).await.expect(200);
}
