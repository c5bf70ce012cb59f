//! Operator endpoints (events, balance at an instant, adjustments, audit), the user's own
//! event list, health, readiness and the OpenAPI document.

#![allow(clippy::unwrap_used)]

mod common;

use chrono::{DateTime, SecondsFormat, Utc};
use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn events_and_balance_at_an_instant() {
    let app = TestApp::spawn().await;
    let u = user("audited");
    let token = app.token(&u);
    app.grant(&u, 100).await;
    app.generate_ok(&token, "a fox").await;
    app.wait_for_balance(&token, 90).await;

    let r = app
        .admin_get(&format!("/api/admin/accounts/{u}/events"))
        .await;
    r.expect(200);
    let records = r.records();
    let types: Vec<_> = records
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["CreditsAdjusted", "CreditsDeducted", "VideoTaskSubmitted"]
    );
    for (i, e) in records.iter().enumerate() {
        assert_eq!(e["sequence"], json!(i + 1));
        assert!(e["position"].is_i64());
        assert!(e["recorded_at"].is_string());
        assert!(e["payload"].is_object());
    }
    assert_eq!(records[0]["balance_after"], 100);
    assert_eq!(records[1]["balance_after"], 90);

    // Paging by sequence.
    let page = app
        .admin_get(&format!("/api/admin/accounts/{u}/events?limit=2"))
        .await;
    assert_eq!(page.records().len(), 2);
    let next = page.str("next_cursor");
    let rest = app
        .admin_get(&format!("/api/admin/accounts/{u}/events?cursor={next}"))
        .await;
    assert_eq!(rest.records().len(), 1);
    assert!(rest.body["next_cursor"].is_null());

    // The user sees the same journal for their own account.
    let own = app.get("/api/account/events", Some(&token)).await;
    own.expect(200);
    assert_eq!(own.records().len(), 3);

    // Balance at the first event's instant, now, and before anything.
    let at = |e: &Value| {
        e["recorded_at"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .unwrap()
    };
    let q = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Micros, true);
    let first = at(&records[0]);
    let r = app
        .admin_get(&format!("/api/admin/accounts/{u}/balance?at={}", q(first)))
        .await;
    r.expect(200);
    assert_eq!(r.body["credits"], 100);
    assert_eq!(r.body["user_id"], json!(u));
    let before = first - chrono::Duration::seconds(1);
    let r = app
        .admin_get(&format!("/api/admin/accounts/{u}/balance?at={}", q(before)))
        .await;
    assert_eq!(r.body["credits"], 0);
    let r = app
        .admin_get(&format!("/api/admin/accounts/{u}/balance"))
        .await;
    assert_eq!(r.body["credits"], 90);
    // An offset other than Z (URL-encoded +).
    let plus8 = first
        .with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).unwrap())
        .to_rfc3339_opts(SecondsFormat::Micros, false)
        .replace('+', "%2B");
    let r = app
        .admin_get(&format!("/api/admin/accounts/{u}/balance?at={plus8}"))
        .await;
    assert_eq!(r.body["credits"], 100);

    // An account nobody has used: empty, zero.
    let r = app.admin_get("/api/admin/accounts/nobody/events").await;
    assert!(r.records().is_empty());
}

#[tokio::test]
async fn adjustments_grant_and_correct_but_never_below_zero() {
    let app = TestApp::spawn().await;
    let u = user("adjusted");
    let token = app.token(&u);

    let r = app.adjust(&u, 100, "welcome bonus").await;
    r.expect(201);
    assert_eq!(r.body["balance"], 100);
    assert_eq!(r.body["credits"], 100);
    assert!(r.body["adjustment_id"].is_string());
    let r = app.adjust(&u, -30, "correction").await;
    r.expect(201);
    assert_eq!(r.body["balance"], 70);
    let events = app.event_count().await;
    app.adjust(&u, -71, "too much")
        .await
        .expect_error(422, "adjustment_below_zero");
    assert_eq!(app.event_count().await, events);
    app.adjust(&u, -70, "all of it").await.expect(201);
    app.wait_for_balance(&token, 0).await;

    // An Idempotency-Key makes a retried adjustment one adjustment.
    let path = format!("/api/admin/accounts/{u}/adjustments");
    let send = || {
        app.send(
            reqwest::Method::POST,
            &path,
            Some(ADMIN_TOKEN),
            &[
                ("content-type", "application/json"),
                ("idempotency-key", "adj-1"),
            ],
            Some(json!({"credits": 5, "reason": "retry"}).to_string()),
        )
    };
    let send_other = || {
        app.send(
            reqwest::Method::POST,
            &path,
            Some(ADMIN_TOKEN),
            &[
                ("content-type", "application/json"),
                ("idempotency-key", "adj-1"),
            ],
            Some(json!({"credits": 500, "reason": "retry"}).to_string()),
        )
    };
    send().await.expect(201);
    let again = send().await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert!(again.text.contains("\"duplicate\":true"), "{}", again.text);
    app.wait_for_balance(&token, 5).await;

    // The same key with other terms: 409, nothing written.
    let events = app.event_count().await;
    send_other().await.expect_error(409, "idempotency_conflict");
    assert_eq!(app.event_count().await, events);

    // After more adjustments than the account keeps, the journal still knows adj-1: a retry
    // is a duplicate, other terms a conflict.
    for _ in 0..credit_domain::RECENT_ADJUSTMENTS {
        app.adjust(&u, 1, "more").await.expect(201);
    }
    let events = app.event_count().await;
    let again = send().await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert!(again.text.contains("\"duplicate\":true"), "{}", again.text);
    send_other().await.expect_error(409, "idempotency_conflict");
    assert_eq!(app.event_count().await, events);
}

#[tokio::test]
async fn the_audit_is_clean_after_every_kind_of_flow() {
    let app = TestApp::spawn().await;
    let u = user("everything");
    let token = app.token(&u);
    let recharge = app.paid_recharge(&u, 1000).await;
    app.grant(&u, 50).await;
    let ok = app.generate_ok(&token, "ok").await;
    let pid = app.provider_id(&token, &ok).await;
    app.callback(&ok, &fake_grsai::succeeded_result(&pid, "https://v/1.mp4"))
        .await;
    let bad = app.generate_ok(&token, "bad").await;
    let pid = app.provider_id(&token, &bad).await;
    app.callback(&bad, &fake_grsai::failed_result(&pid, "error", "x"))
        .await;
    let refund = fake_stripe::charge_refunded_event(
        &evt("rf"),
        "ch_1",
        Some(&pi(&recharge)),
        1000,
        500,
        "cny",
        &[],
    );
    app.send_event(&refund).await.expect(200);
    app.wait_for_balance(&token, 1000 + 50 - 10 - 500).await;
    app.wait_projected().await;

    let r = app.admin_get("/api/admin/audit").await;
    r.expect(200);
    assert_eq!(r.body["ok"], true, "{}", r.text);
    assert_eq!(r.body["discrepancies"], json!([]));
    let totals = &r.body["totals"];
    assert_eq!(totals["recharged"], 1000);
    assert_eq!(totals["granted"], 50);
    assert_eq!(totals["spent"], 20);
    assert_eq!(totals["refunded"], 10);
    assert_eq!(totals["reversed"], 500);
    assert_eq!(totals["balances"], 540);
    assert_eq!(totals["projected_balances"], 540);
}

#[tokio::test]
async fn the_admin_api_hands_out_the_current_checkpoint() {
    let app = TestApp::spawn().await;
    let u = user("checkpointed");
    let token = app.token(&u);
    app.grant(&u, 100).await;
    app.generate_ok(&token, "a fox").await;
    app.wait_for_balance(&token, 90).await;
    app.wait_projected().await;

    let r = app.admin_get("/api/admin/audit/checkpoint").await;
    r.expect(200);
    let parsed = credit_store::checkpoint::Checkpoint::parse(&r.text, None).unwrap();
    let head = &parsed.checkpoint.heads[u.as_str()];
    assert_eq!(head.sequence, 3, "{}", r.text);
    assert_eq!(parsed.checkpoint.events, 3);
    assert!(parsed.signed_by.is_none());

    app.get("/api/admin/audit/checkpoint", Some(&token))
        .await
        .expect_error(401, "invalid_admin_token");
}

#[tokio::test]
async fn health_readiness_and_openapi() {
    let app = TestApp::spawn().await;
    let r = app.get("/healthz", None).await;
    r.expect(200);
    assert_eq!(r.body["status"], "ok");
    let r = app.get("/readyz", None).await;
    r.expect(200);
    assert_eq!(r.body["status"], "ready");
    assert_eq!(r.body["database"], "ok");
    assert_eq!(r.body["migrations_applied"], true);
    assert!(r.body.get("projector_lag").is_some());

    let r = app.get("/api/openapi.json", None).await;
    r.expect(200);
    assert!(
        r.body["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        r.text
    );
    assert!(r.body["paths"].is_object());
}

/// The issue asks for every endpoint to be described.
#[tokio::test]
async fn openapi_describes_every_endpoint() {
    let app = TestApp::spawn().await;
    let r = app.get("/api/openapi.json", None).await;
    let paths = &r.body["paths"];
    for p in [
        "/api/stats",
        "/api/dev/token",
        "/api/account/events",
        "/api/recharge",
        "/api/stripe/webhook",
        "/api/video/generate",
        "/api/video/callback",
        "/api/video/tasks",
        "/api/video/tasks/{task_id}",
        "/api/consumption",
        "/api/admin/accounts/{user_id}/events",
        "/api/admin/accounts/{user_id}/balance",
        "/api/admin/accounts/{user_id}/adjustments",
        "/api/admin/audit",
        "/api/admin/audit/checkpoint",
        "/healthz",
        "/readyz",
    ] {
        assert!(paths.get(p).is_some(), "{p} is not described");
    }
}
