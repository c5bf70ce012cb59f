//! `POST /api/recharge` and `GET /api/recharge` against the fake Stripe.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn a_recharge_opens_a_pending_checkout_session_at_stripe() {
    let app = TestApp::spawn().await;
    let u = user("alice");
    let token = app.token(&u);

    let r = app.post_recharge(&token, json!({ "amount": 19.99 })).await;
    r.expect(201);
    let id = r.str("recharge_id");
    assert_eq!(r.body["status"], "pending");
    assert_eq!(r.body["amount"], json!(19.99));
    assert_eq!(r.body["amount_fen"], 1999);
    assert_eq!(r.body["credits"], 1999);
    assert!(r
        .str("checkout_url")
        .starts_with("https://checkout.stripe.com/"));

    let sent = app.stripe().requests();
    assert_eq!(sent.len(), 1);
    let s = &sent[0];
    assert_eq!(s.path, fake_stripe::SESSIONS_PATH);
    assert_eq!(
        s.authorization(),
        Some(format!("Bearer {STRIPE_KEY}").as_str())
    );
    assert_eq!(s.idempotency_key(), Some(id.as_str()));
    assert_eq!(s.field("mode"), Some("payment"));
    assert_eq!(s.field("client_reference_id"), Some(id.as_str()));
    assert_eq!(s.field("metadata[user_id]"), Some(u.as_str()));
    assert_eq!(s.field("metadata[recharge_id]"), Some(id.as_str()));
    assert_eq!(s.field("line_items[0][price_data][currency]"), Some("cny"));
    assert_eq!(
        s.field("line_items[0][price_data][unit_amount]"),
        Some("1999")
    );
    assert_eq!(s.field("line_items[0][quantity]"), Some("1"));
    assert!(s.field("success_url").is_some() && s.field("cancel_url").is_some());

    let record = app.wait_for_recharge(&token, &id, "pending").await;
    assert_eq!(record["amount_fen"], 1999);
    assert_eq!(record["credits"], 1999);
    assert_eq!(record["payment_method"], "stripe");
    assert_eq!(record["payment_id"], json!(null));
    assert_eq!(record["completed_at"], json!(null));
    assert!(record["created_at"].is_string());
    // Pending money is not spendable.
    assert_eq!(app.stats(&token).await.i64("credits"), 0);
}

#[tokio::test]
async fn the_completed_webhook_credits_the_balance() {
    let app = TestApp::spawn().await;
    let u = user("bob");
    let token = app.token(&u);

    let id = app.paid_recharge(&u, 5000).await;
    let stats = app.stats(&token).await;
    assert_eq!(stats.i64("credits"), 5000);
    assert_eq!(stats.body["video_cost"], 10);
    assert_eq!(stats.body["credits_per_yuan"], 100);
    assert_eq!(stats.body["currency"], "cny");

    let record = app.wait_for_recharge(&token, &id, "completed").await;
    assert_eq!(record["payment_id"], json!(pi(&id)));
    assert!(record["completed_at"].is_string());
    assert_eq!(app.events_of(&u, "RechargeCompleted").await, 1);
}

#[tokio::test]
async fn a_failing_stripe_is_a_502_and_the_recharge_is_marked_failed() {
    let app = TestApp::spawn().await;
    let u = user("carol");
    let token = app.token(&u);

    for failure in [FailMode::ServerError, FailMode::Unauthorized] {
        app.stripe().set_failure(Some(failure));
        let r = app.post_recharge(&token, json!({ "amount": 10 })).await;
        r.expect_error(502, "provider_error");
        let id = r.body["error"]["recharge_id"].as_str().unwrap().to_owned();
        let record = app.wait_for_recharge(&token, &id, "failed").await;
        assert_eq!(record["amount_fen"], 1000);
    }
    assert_eq!(app.events_of(&u, "RechargeFailed").await, 2);
    assert_eq!(app.stats(&token).await.i64("credits"), 0);

    // Stripe back: recharges work again.
    app.stripe().set_failure(None);
    app.post_recharge(&token, json!({ "amount": 10 }))
        .await
        .expect(201);
}

#[tokio::test]
async fn an_idempotency_key_returns_the_same_recharge_and_one_session() {
    let app = TestApp::spawn().await;
    let u = user("dave");
    let token = app.token(&u);

    let first = app
        .post_recharge_keyed(&token, "key-1", json!({ "amount": 50 }))
        .await;
    first.expect(201);
    let again = app
        .post_recharge_keyed(&token, "key-1", json!({ "amount": 50 }))
        .await;
    assert!(matches!(again.status, 200 | 201), "{}", again.text);
    assert_eq!(again.str("recharge_id"), first.str("recharge_id"));
    assert_eq!(again.str("checkout_url"), first.str("checkout_url"));
    assert_eq!(app.stripe().session_count(), 1);
    assert_eq!(app.stripe().requests().len(), 1);

    // The same key for another amount is a conflict, and writes nothing.
    let events = app.event_count().await;
    app.post_recharge_keyed(&token, "key-1", json!({ "amount": 60 }))
        .await
        .expect_error(409, "idempotency_conflict");
    assert_eq!(app.event_count().await, events);

    // Another key is another recharge; the key is per user.
    let other = app
        .post_recharge_keyed(&token, "key-2", json!({ "amount": 50 }))
        .await;
    other.expect(201);
    assert_ne!(other.str("recharge_id"), first.str("recharge_id"));
    let someone_else = app
        .post_recharge_keyed(&app.token(&user("eve")), "key-1", json!({ "amount": 50 }))
        .await;
    someone_else.expect(201);
    assert_ne!(someone_else.str("recharge_id"), first.str("recharge_id"));

    let list = app.recharges(&token, "").await;
    list.expect(200);
    app.wait_projected().await;
    assert_eq!(app.recharges(&token, "").await.records().len(), 2);

    // An unusable key is refused before anything is written.
    let events = app.event_count().await;
    app.post_recharge_keyed(&token, &"k".repeat(256), json!({ "amount": 50 }))
        .await
        .expect_error(400, "invalid_idempotency_key");
    assert_eq!(app.event_count().await, events);
}

#[tokio::test]
async fn recharge_bounds_are_inclusive() {
    let app = TestApp::spawn().await;
    let token = app.token(&user("fay"));
    let min = app.post_recharge(&token, json!({ "amount": 1 })).await;
    min.expect(201);
    assert_eq!(min.body["credits"], 100);
    let max = app.post_recharge(&token, json!({ "amount": 10000 })).await;
    max.expect(201);
    assert_eq!(max.body["amount_fen"], 1_000_000);
    assert_eq!(max.body["credits"], 1_000_000);
    let cents = app.post_recharge(&token, json!({ "amount": 1.5 })).await;
    cents.expect(201);
    assert_eq!(cents.body["amount_fen"], 150);
    assert_eq!(cents.body["amount"], json!(1.5));
}

#[tokio::test]
async fn recharge_records_list_newest_first_and_paginate() {
    let app = TestApp::spawn().await;
    let u = user("gus");
    let token = app.token(&u);
    let mut ids = Vec::new();
    for yuan in 1..=5 {
        let r = app.post_recharge(&token, json!({ "amount": yuan })).await;
        r.expect(201);
        ids.push(r.str("recharge_id"));
    }
    app.wait_projected().await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("?limit=2&cursor={c}"),
            None => "?limit=2".to_owned(),
        };
        let page = app.recharges(&token, &q).await;
        page.expect(200);
        let records = page.records();
        assert!(records.len() <= 2);
        seen.extend(
            records
                .iter()
                .map(|r| r["recharge_id"].as_str().unwrap().to_owned()),
        );
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, each exactly once");
}
