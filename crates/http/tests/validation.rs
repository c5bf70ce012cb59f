//! Every endpoint, every kind of bad input: missing or wrong credentials, malformed JSON,
//! wrong types, out-of-range values, unknown fields, oversized bodies. Each is a 4xx with its
//! stable code, and none writes an event or reaches a provider.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

/// A user holding credits, so that a refusal can only come from the input.
async fn setup() -> (TestApp, String, String) {
    let app = TestApp::spawn().await;
    let u = user("validator");
    app.grant(&u, 1000).await;
    let token = app.token(&u);
    (app, u, token)
}

/// Sends, asserts status and code, and that nothing was written or sent outside.
#[track_caller]
fn expect(r: &Resp, status: u16, code: &str, what: &str) {
    assert_eq!(
        (r.status, r.code()),
        (status, code),
        "{what}: body {}",
        r.text
    );
    assert!(r.body["error"]["message"].is_string(), "{what}: {}", r.text);
}

async fn assert_untouched(app: &TestApp, events: i64) {
    assert_eq!(app.event_count().await, events, "an event was written");
    assert!(app.stripe().requests().is_empty(), "Stripe was called");
    assert!(app.grsai().requests().is_empty(), "Grsai was called");
}

/// (method, path, body) of every endpoint that takes a user token.
fn user_endpoints() -> Vec<(Method, &'static str, Option<Value>)> {
    vec![
        (Method::GET, "/api/stats", None),
        (Method::POST, "/api/recharge", Some(json!({ "amount": 10 }))),
        (Method::GET, "/api/recharge", None),
        (
            Method::POST,
            "/api/video/generate",
            Some(json!({ "prompt": "a fox" })),
        ),
        (Method::GET, "/api/video/tasks", None),
        (Method::GET, "/api/video/tasks/vid_x", None),
        (Method::GET, "/api/consumption", None),
        (Method::GET, "/api/account/events", None),
    ]
}

fn admin_endpoints(u: &str) -> Vec<(Method, String, Option<Value>)> {
    vec![
        (Method::GET, format!("/api/admin/accounts/{u}/events"), None),
        (
            Method::GET,
            format!("/api/admin/accounts/{u}/balance"),
            None,
        ),
        (
            Method::POST,
            format!("/api/admin/accounts/{u}/adjustments"),
            Some(json!({ "credits": 5, "reason": "x" })),
        ),
        (Method::GET, "/api/admin/audit".to_owned(), None),
    ]
}

async fn call(
    app: &TestApp,
    method: &Method,
    path: &str,
    auth: Option<&str>,
    body: &Option<Value>,
) -> Resp {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = auth {
        headers.push(("authorization", a));
    }
    app.send(
        method.clone(),
        path,
        None,
        &headers,
        body.as_ref().map(Value::to_string),
    )
    .await
}

#[tokio::test]
async fn user_endpoints_refuse_missing_and_wrong_tokens() {
    let (app, u, _) = setup().await;
    let events = app.event_count().await;
    let bearer = |t: String| format!("Bearer {t}");
    let cases: Vec<(Option<String>, &str, &str)> = vec![
        (None, "missing_token", "no header"),
        (
            Some("Basic dXNlcjpwYXNz".into()),
            "missing_token",
            "basic auth",
        ),
        (Some("Bearer ".into()), "missing_token", "empty bearer"),
        (Some(bearer("abc".into())), "invalid_token", "not a JWT"),
        (Some(bearer("a.b.c".into())), "invalid_token", "garbage JWT"),
        (
            Some(bearer(jwt(
                "another-secret-0123456789",
                &json!({"sub": u, "exp": now() + 60}),
            ))),
            "invalid_token",
            "bad signature",
        ),
        (
            Some(bearer(jwt(
                JWT_SECRET,
                &json!({"sub": u, "exp": now() - 120}),
            ))),
            "token_expired",
            "expired",
        ),
        (
            Some(bearer(jwt(JWT_SECRET, &json!({"sub": u})))),
            "invalid_token",
            "no exp",
        ),
        (
            Some(bearer(jwt(JWT_SECRET, &json!({"exp": now() + 60})))),
            "invalid_token",
            "no sub",
        ),
        (
            Some(bearer(jwt(
                JWT_SECRET,
                &json!({"sub": "a b'; --", "exp": now() + 60}),
            ))),
            "invalid_token",
            "invalid sub",
        ),
        (
            Some(bearer(jwt_with_header(
                JWT_SECRET,
                &json!({"alg": "none", "typ": "JWT"}),
                &json!({"sub": u, "exp": now() + 60}),
            ))),
            "invalid_token",
            "alg none",
        ),
        (
            Some(bearer(ADMIN_TOKEN.into())),
            "invalid_token",
            "admin token",
        ),
    ];
    for (method, path, body) in user_endpoints() {
        for (auth, code, what) in &cases {
            let r = call(&app, &method, path, auth.as_deref(), &body).await;
            expect(&r, 401, code, &format!("{method} {path} with {what}"));
        }
    }
    assert_untouched(&app, events).await;
}

#[tokio::test]
async fn the_audience_is_checked_when_configured() {
    let app = TestApp::spawn_with(&[("AUTH_JWT_AUDIENCE", "authenticated")]).await;
    let u = user("aud");
    let token = |aud: Value| {
        let mut claims = json!({"sub": u, "exp": now() + 60});
        if !aud.is_null() {
            claims["aud"] = aud;
        }
        jwt(JWT_SECRET, &claims)
    };
    for aud in [json!(null), json!("anon"), json!(["anon", "x"]), json!(5)] {
        let r = app.stats(&token(aud.clone())).await;
        expect(&r, 401, "invalid_token", &format!("aud {aud}"));
        let r = app
            .generate(&token(aud.clone()), json!({"prompt": "x"}))
            .await;
        expect(&r, 401, "invalid_token", &format!("aud {aud}"));
    }
    assert_eq!(app.event_count().await, 0);
    app.stats(&token(json!("authenticated"))).await.expect(200);
    app.stats(&token(json!(["x", "authenticated"])))
        .await
        .expect(200);
}

#[tokio::test]
async fn admin_endpoints_refuse_missing_wrong_and_user_tokens() {
    let (app, u, token) = setup().await;
    let events = app.event_count().await;
    let cases = [
        (None, "missing_token"),
        (
            Some("Bearer wrong-admin-token-xyz".to_owned()),
            "invalid_admin_token",
        ),
        (
            Some(format!("Bearer {ADMIN_TOKEN}x")),
            "invalid_admin_token",
        ),
        (Some(format!("Bearer {token}")), "invalid_admin_token"),
    ];
    for (method, path, body) in admin_endpoints(&u) {
        for (auth, code) in &cases {
            let r = call(&app, &method, &path, auth.as_deref(), &body).await;
            expect(&r, 401, code, &format!("{method} {path} with {auth:?}"));
        }
    }
    assert_untouched(&app, events).await;
}

#[tokio::test]
async fn recharge_refuses_bad_bodies() {
    let (app, _, token) = setup().await;
    let events = app.event_count().await;
    let raw: &[(&str, u16, &str)] = &[
        ("{", 400, "malformed_json"),
        ("{\"amount\": 10,}", 400, "malformed_json"),
        ("", 400, "malformed_json"),
        ("{}", 400, "invalid_body"),
        // serde's derive would read a struct from an array: the body must be an object.
        ("[]", 400, "invalid_body"),
        ("[10]", 400, "invalid_body"),
        ("10", 400, "invalid_body"),
        (r#"{"amount": "10"}"#, 400, "invalid_amount"),
        (r#"{"amount": null}"#, 400, "invalid_amount"),
        (r#"{"amount": true}"#, 400, "invalid_amount"),
        (r#"{"amount": {"yuan": 10}}"#, 400, "invalid_amount"),
        (r#"{"amount": 0}"#, 422, "invalid_amount"),
        (r#"{"amount": 0.0}"#, 422, "invalid_amount"),
        (r#"{"amount": -5}"#, 422, "invalid_amount"),
        (r#"{"amount": -0.5}"#, 422, "invalid_amount"),
        (r#"{"amount": 0.001}"#, 422, "invalid_amount"),
        (r#"{"amount": 10.005}"#, 422, "invalid_amount"),
        (r#"{"amount": 1e308}"#, 422, "invalid_amount"),
        (r#"{"amount": 1e-7}"#, 422, "invalid_amount"),
        (r#"{"amount": 18446744073709551616}"#, 422, "invalid_amount"),
        (r#"{"amount": 10001}"#, 422, "amount_out_of_range"),
        (r#"{"amount": 10000.01}"#, 422, "amount_out_of_range"),
        (r#"{"amount": 0.99}"#, 422, "amount_out_of_range"),
        (r#"{"amount": 9223372036854775807}"#, 422, "invalid_amount"),
        (r#"{"amount": 10, "credits": 100000}"#, 400, "invalid_body"),
        (r#"{"amount": 10, "currency": "usd"}"#, 400, "invalid_body"),
    ];
    for (body, status, code) in raw {
        let r = app.post_raw("/api/recharge", Some(&token), body).await;
        expect(&r, *status, code, &format!("recharge body {body:?}"));
    }
    let r = app
        .send(
            Method::POST,
            "/api/recharge",
            Some(&token),
            &[("content-type", "text/plain")],
            Some(r#"{"amount": 10}"#.into()),
        )
        .await;
    expect(&r, 415, "unsupported_media_type", "text/plain body");
    let big = format!(r#"{{"amount": 10, "pad": "{}"}}"#, "x".repeat(70 * 1024));
    let r = app.post_raw("/api/recharge", Some(&token), &big).await;
    expect(&r, 413, "payload_too_large", "70 KiB body");
    assert_untouched(&app, events).await;
}

#[tokio::test]
async fn generate_refuses_bad_bodies() {
    let (app, _, token) = setup().await;
    let events = app.event_count().await;
    let long = "x".repeat(2001);
    let bodies: Vec<(Value, u16, &str)> = vec![
        (json!({}), 400, "invalid_body"),
        (json!({"prompt": 5}), 400, "invalid_body"),
        (json!({"prompt": null}), 400, "invalid_body"),
        (json!({"prompt": ["a"]}), 400, "invalid_body"),
        (json!({"prompt": ""}), 422, "invalid_prompt"),
        (json!({"prompt": "   \n\t "}), 422, "invalid_prompt"),
        (json!({"prompt": long}), 422, "invalid_prompt"),
        (
            json!({"prompt": "x", "duration": 12}),
            422,
            "invalid_duration",
        ),
        (
            json!({"prompt": "x", "duration": 0}),
            422,
            "invalid_duration",
        ),
        (
            json!({"prompt": "x", "duration": "10"}),
            400,
            "invalid_body",
        ),
        (json!({"prompt": "x", "duration": -10}), 400, "invalid_body"),
        (
            json!({"prompt": "x", "duration": 10.5}),
            400,
            "invalid_body",
        ),
        (
            json!({"prompt": "x", "duration": 1e20}),
            400,
            "invalid_body",
        ),
        (
            json!({"prompt": "x", "aspect_ratio": "1:1"}),
            422,
            "invalid_aspect_ratio",
        ),
        (
            json!({"prompt": "x", "aspect_ratio": 916}),
            400,
            "invalid_body",
        ),
        (json!({"prompt": "x", "size": "huge"}), 422, "invalid_size"),
        (
            json!({"prompt": "x", "image_url": "http://example.com/a.png"}),
            422,
            "invalid_image_url",
        ),
        (
            json!({"prompt": "x", "image_url": "https://"}),
            422,
            "invalid_image_url",
        ),
        (
            json!({"prompt": "x", "image_url": "javascript:alert(1)"}),
            422,
            "invalid_image_url",
        ),
        (
            json!({"prompt": "x", "image_url": "https://a b"}),
            422,
            "invalid_image_url",
        ),
        (
            json!({"prompt": "x", "image_url": format!("https://{}", "a".repeat(2100))}),
            422,
            "invalid_image_url",
        ),
        (
            json!({"prompt": "x", "model": "sora-3"}),
            400,
            "invalid_body",
        ),
        (json!({"prompt": "x", "credits": 0}), 400, "invalid_body"),
    ];
    for (body, status, code) in &bodies {
        let r = app.generate(&token, body.clone()).await;
        let shown: String = body.to_string().chars().take(80).collect();
        expect(&r, *status, code, &format!("generate {shown}"));
    }
    for (body, code) in [
        ("{", "malformed_json"),
        ("", "malformed_json"),
        ("\"x\"", "invalid_body"),
        ("[\"a cat\"]", "invalid_body"),
    ] {
        let r = app
            .post_raw("/api/video/generate", Some(&token), body)
            .await;
        expect(&r, 400, code, &format!("generate raw {body:?}"));
    }
    let big = json!({ "prompt": "x".repeat(70 * 1024) });
    let r = app.generate(&token, big).await;
    expect(&r, 413, "payload_too_large", "70 KiB generate");
    assert_untouched(&app, events).await;

    // The boundary values are accepted: 2000 characters (multi-byte too), both options.
    let r = app
        .generate(&token, json!({"prompt": "é".repeat(2000), "duration": 15, "aspect_ratio": "16:9", "size": "large"}))
        .await;
    r.expect(202);
}

#[tokio::test]
async fn list_endpoints_refuse_bad_limits_cursors_and_parameters() {
    let (app, u, token) = setup().await;
    let events = app.event_count().await;
    let cases: &[(&str, u16, &str)] = &[
        ("limit=0", 422, "invalid_limit"),
        ("limit=101", 422, "invalid_limit"),
        ("limit=-1", 422, "invalid_limit"),
        ("limit=abc", 400, "invalid_query"),
        ("limit=1.5", 400, "invalid_query"),
        ("limit=99999999999999999999", 400, "invalid_query"),
        ("cursor=garbage", 422, "invalid_cursor"),
        ("cursor=123_", 422, "invalid_cursor"),
        ("cursor=abc_vid_1", 422, "invalid_cursor"),
        ("cursor=99999999999999999999_x", 422, "invalid_cursor"),
        ("cursor=1_a%20b", 422, "invalid_cursor"),
        ("page=2", 400, "invalid_query"),
    ];
    for path in ["/api/recharge", "/api/video/tasks", "/api/consumption"] {
        for (q, status, code) in cases {
            let r = app.get(&format!("{path}?{q}"), Some(&token)).await;
            expect(&r, *status, code, &format!("{path}?{q}"));
        }
        // The limits themselves are fine.
        for q in ["limit=1", "limit=100", "cursor=1_x"] {
            app.get(&format!("{path}?{q}"), Some(&token))
                .await
                .expect(200);
        }
    }
    for (q, status, code) in [
        ("limit=0", 422, "invalid_limit"),
        ("limit=1001", 422, "invalid_limit"),
        ("cursor=x", 422, "invalid_cursor"),
        ("cursor=-1", 422, "invalid_cursor"),
        ("other=1", 400, "invalid_query"),
    ] {
        let r = app
            .get(&format!("/api/account/events?{q}"), Some(&token))
            .await;
        expect(&r, status, code, &format!("account events ?{q}"));
        let r = app
            .admin_get(&format!("/api/admin/accounts/{u}/events?{q}"))
            .await;
        expect(&r, status, code, &format!("admin events ?{q}"));
    }
    assert_untouched(&app, events).await;
}

#[tokio::test]
async fn admin_endpoints_refuse_bad_inputs() {
    let (app, u, _) = setup().await;
    let events = app.event_count().await;
    let adjust = format!("/api/admin/accounts/{u}/adjustments");
    let bodies: &[(&str, u16, &str)] = &[
        (r#"{"credits": 0, "reason": "x"}"#, 422, "invalid_credits"),
        (
            r#"{"credits": 2000000000, "reason": "x"}"#,
            422,
            "invalid_credits",
        ),
        (
            r#"{"credits": -2000000000, "reason": "x"}"#,
            422,
            "invalid_credits",
        ),
        (r#"{"credits": "5", "reason": "x"}"#, 400, "invalid_body"),
        (r#"{"credits": 1.5, "reason": "x"}"#, 400, "invalid_body"),
        (r#"{"credits": 1e30, "reason": "x"}"#, 400, "invalid_body"),
        (r#"{"credits": 5}"#, 400, "invalid_body"),
        (r#"{"credits": 5, "reason": 7}"#, 400, "invalid_body"),
        (r#"{"credits": 5, "reason": ""}"#, 422, "invalid_reason"),
        (r#"{"credits": 5, "reason": "   "}"#, 422, "invalid_reason"),
        (
            r#"{"credits": 5, "reason": "x", "actor": "root"}"#,
            400,
            "invalid_body",
        ),
        (r#"{"credits": 5, "reason": "x""#, 400, "malformed_json"),
    ];
    for (body, status, code) in bodies {
        let r = app.post_raw(&adjust, Some(ADMIN_TOKEN), body).await;
        expect(&r, *status, code, &format!("adjust {body}"));
    }
    let long = json!({"credits": 5, "reason": "r".repeat(501)});
    let r = app.post(&adjust, Some(ADMIN_TOKEN), &long).await;
    expect(&r, 422, "invalid_reason", "501-char reason");
    // Below zero.
    let r = app.adjust(&u, -1001, "take back too much").await;
    expect(&r, 422, "adjustment_below_zero", "below zero");

    let balance = format!("/api/admin/accounts/{u}/balance");
    for q in [
        "at=yesterday",
        "at=2026-13-01T00:00:00Z",
        "at=2026-01-01",
        "at=",
    ] {
        let r = app.admin_get(&format!("{balance}?{q}")).await;
        expect(&r, 422, "invalid_timestamp", q);
    }
    let r = app.admin_get(&format!("{balance}?when=now")).await;
    expect(&r, 400, "invalid_query", "unknown parameter");

    for bad in ["a%20b", "x'--", &"a".repeat(129)] {
        for path in [
            format!("/api/admin/accounts/{bad}/events"),
            format!("/api/admin/accounts/{bad}/balance"),
        ] {
            let r = app.admin_get(&path).await;
            expect(&r, 422, "invalid_user_id", &path);
        }
        let r = app
            .post(
                &format!("/api/admin/accounts/{bad}/adjustments"),
                Some(ADMIN_TOKEN),
                &json!({"credits": 5, "reason": "x"}),
            )
            .await;
        expect(&r, 422, "invalid_user_id", bad);
    }
    assert_untouched(&app, events).await;
}

#[tokio::test]
async fn unknown_routes_and_disabled_features_answer_in_the_error_shape() {
    let (app, _, token) = setup().await;
    let events = app.event_count().await;
    let r = app.get("/api/nothing-here", Some(&token)).await;
    expect(&r, 404, "not_found", "unknown path");
    let r = app.get("/api/video/generate", Some(&token)).await;
    expect(&r, 405, "method_not_allowed", "wrong method");
    // The dev token endpoint exists only without AUTH_JWT_SECRET.
    let r = app
        .post("/api/dev/token", None, &json!({"user_id": "someone"}))
        .await;
    expect(&r, 404, "not_found", "dev token with a JWT secret");
    assert_untouched(&app, events).await;
}

/// Only the status is checked: these two endpoints read raw bytes, and actix's own payload
/// limit (256 KiB) answers in plain text, not in the `{"error": ...}` shape.
#[tokio::test]
async fn oversized_webhook_and_callback_bodies_are_413() {
    let (app, _, token) = setup().await;
    let task = app.generate_ok(&token, "a fox").await;
    let events = app.event_count().await;
    let big = format!(r#"{{"pad": "{}"}}"#, "x".repeat(300 * 1024));
    let header = fake_stripe::signature_header(WEBHOOK_SECRET, &big, now());
    let r = app.webhook(&big, &header).await;
    expect(&r, 413, "payload_too_large", "oversized webhook");
    let url = app.callback_url(&task).replace(&app.base, "");
    let r = app.post_raw(&url, None, &big).await;
    expect(&r, 413, "payload_too_large", "oversized callback");
    assert_eq!(app.event_count().await, events);
}

/// One task-status vocabulary from the domain to the table, the API and OpenAPI.
#[test]
fn task_statuses_are_one_vocabulary() {
    let domain: Vec<&str> = credit_domain::TaskStatus::ALL
        .iter()
        .map(|s| s.as_str())
        .collect();
    let openapi: serde_json::Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
    for schema in ["VideoTask", "GenerateAccepted"] {
        let listed: Vec<&str> = openapi["components"]["schemas"][schema]["properties"]["status"]
            ["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for status in &listed {
            assert!(domain.contains(status), "{schema} lists {status}");
        }
    }
    let migration = include_str!("../../../migrations/0005_reversals_and_uncertain_tasks.sql");
    for status in &domain {
        assert!(
            migration.contains(&format!("'{status}'")),
            "video_tasks refuses {status}"
        );
    }
}
