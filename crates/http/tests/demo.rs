//! Demo mode: no Stripe, Grsai or JWT key. Recharges complete at once, the simulated provider
//! calls the real callback endpoint, and `POST /api/dev/token` signs in.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn the_whole_flow_runs_without_the_outside_world() {
    let app = TestApp::demo(&[]).await;
    let u = user("demo");
    let token = app.dev_token(&u).await;

    let stats = app.stats(&token).await;
    stats.expect(200);
    assert_eq!(stats.body["credits"], 0);
    assert_eq!(
        stats.body["demo"],
        json!({"payments": true, "video": true, "auth": true})
    );

    let r = app.post_recharge(&token, json!({ "amount": 1 })).await;
    r.expect(201);
    assert_eq!(r.body["status"], "completed");
    assert_eq!(r.body["checkout_url"], json!(null));
    assert_eq!(r.body["payment_method"], "demo");
    let recharge = r.str("recharge_id");
    app.wait_for_balance(&token, 100).await;
    let record = app.wait_for_recharge(&token, &recharge, "completed").await;
    assert_eq!(record["payment_method"], "demo");

    let ok = app.generate_ok(&token, "a fox").await;
    let task = app
        .wait_for_task(&token, &ok, |t| t["status"] == "succeeded")
        .await;
    assert!(task["video_url"].as_str().unwrap().starts_with("https://"));
    assert_eq!(task["refunded"], false);

    let bad = app.generate_ok(&token, "a fox [fail]").await;
    let task = app
        .wait_for_task(&token, &bad, |t| t["refunded"] == true)
        .await;
    assert_eq!(task["status"], "failed");
    app.wait_for_balance(&token, 90).await;
    assert_eq!(app.events_of(&u, "CreditsRefunded").await, 1);
}

#[tokio::test]
async fn dev_tokens_are_checked_and_bad_requests_refused() {
    let app = TestApp::demo(&[]).await;
    for (body, status, code) in [
        (json!({}), 400, "invalid_body"),
        (json!({"user_id": 5}), 400, "invalid_body"),
        (json!({"user_id": "a", "admin": true}), 400, "invalid_body"),
        (json!({"user_id": ""}), 422, "invalid_user_id"),
        (json!({"user_id": "a b"}), 422, "invalid_user_id"),
    ] {
        app.post("/api/dev/token", None, &body)
            .await
            .expect_error(status, code);
    }
    // Tokens signed with anything but the per-process secret are refused.
    let forged = jwt(JWT_SECRET, &json!({"sub": "x", "exp": now() + 60}));
    app.stats(&forged).await.expect_error(401, "invalid_token");
    // Admin takes the per-process demo token (printed in the log), not any configured one.
    app.admin_get("/api/admin/audit")
        .await
        .expect_error(401, "invalid_admin_token");
    // No webhook secret: the webhook is not there.
    app.webhook("{}", "t=1,v1=00").await.expect(404);
    assert_eq!(app.event_count().await, 0);
}
