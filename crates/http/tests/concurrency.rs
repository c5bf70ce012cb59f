//! The numbers under concurrency: no double spend, no double credit, no double refund.

#![allow(clippy::unwrap_used)]

mod common;

use common::fake_grsai::failed_result;
use common::*;
use futures::future::join_all;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_generates_with_300_credits_accept_exactly_30() {
    let app = TestApp::spawn_with(&[
        ("DATABASE_WRITE_CONNECTIONS", "16"),
        ("DATABASE_READ_CONNECTIONS", "16"),
    ])
    .await;
    let u = user("hot");
    app.grant(&u, 300).await;
    let token = app.token(&u);

    let answers = join_all((0..100).map(|i| {
        let token = token.clone();
        let app = &app;
        async move {
            app.generate(&token, json!({ "prompt": format!("video {i}") }))
                .await
        }
    }))
    .await;

    let accepted: Vec<_> = answers.iter().filter(|r| r.status == 202).collect();
    let refused: Vec<_> = answers.iter().filter(|r| r.status == 402).collect();
    let others: Vec<_> = answers
        .iter()
        .filter(|r| r.status != 202 && r.status != 402)
        .map(|r| format!("{} {}", r.status, r.text))
        .collect();
    assert!(others.is_empty(), "unexpected answers: {others:?}");
    assert_eq!(accepted.len(), 30);
    assert_eq!(refused.len(), 70);
    for r in &refused {
        assert_eq!(r.code(), "insufficient_credits");
    }
    let mut ids: Vec<_> = accepted.iter().map(|r| r.str("task_id")).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 30);

    app.wait_for_balance(&token, 0).await;
    assert_eq!(app.events_of(&u, "CreditsDeducted").await, 30);
    assert_eq!(app.grsai().requests_to(fake_grsai::CREATE_PATH).len(), 30);
    app.wait_projected().await;
    let audit = app.admin_get("/api/admin/audit").await;
    audit.expect(200);
    assert_eq!(audit.body["ok"], true, "{}", audit.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_completion_delivered_50_times_at_once_credits_once() {
    let app = TestApp::spawn().await;
    let u = user("payer");
    let token = app.token(&u);
    let r = app.post_recharge(&token, json!({ "amount": 10 })).await;
    r.expect(201);
    let id = r.str("recharge_id");
    let (body, header) =
        fake_stripe::signed_event(WEBHOOK_SECRET, &completed_event(&id, &u, 1000, "paid"));

    let answers = join_all((0..50).map(|_| app.webhook(&body, &header))).await;
    for a in &answers {
        a.expect(200);
    }
    app.wait_for_balance(&token, 1000).await;
    assert_eq!(app.events_of(&u, "RechargeCompleted").await, 1);
    app.wait_for_recharge(&token, &id, "completed").await;
    app.wait_projected().await;
    assert_eq!(app.stats(&token).await.i64("credits"), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_callback_delivered_20_times_at_once_refunds_once() {
    let app = TestApp::spawn().await;
    let u = user("maker");
    app.grant(&u, 10).await;
    let token = app.token(&u);
    let task_id = app.generate_ok(&token, "a fox").await;
    let pid = app.provider_id(&token, &task_id).await;
    let url = app.callback_url(&task_id);
    let failed = failed_result(&pid, "error", "boom");

    let statuses = join_all((0..20).map(|_| fake_grsai::deliver(&url, &failed))).await;
    for s in statuses {
        assert_eq!(s.as_u16(), 200);
    }
    app.wait_for_balance(&token, 10).await;
    assert_eq!(app.events_of(&u, "CreditsRefunded").await, 1);
    assert_eq!(app.events_of(&u, "VideoFailed").await, 1);
    app.wait_projected().await;
    assert_eq!(app.stats(&token).await.i64("credits"), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_with_one_idempotency_key_make_one_recharge() {
    let app = TestApp::spawn().await;
    let u = user("retrier");
    let token = app.token(&u);
    let answers = join_all(
        (0..10).map(|_| app.post_recharge_keyed(&token, "same-key", json!({ "amount": 20 }))),
    )
    .await;
    let mut ids = Vec::new();
    for a in &answers {
        assert!(matches!(a.status, 200 | 201), "{} {}", a.status, a.text);
        ids.push(a.str("recharge_id"));
    }
    ids.dedup();
    assert_eq!(ids.len(), 1);
    assert_eq!(app.stripe().session_count(), 1);
    assert_eq!(app.events_of(&u, "RechargeRequested").await, 1);
}
