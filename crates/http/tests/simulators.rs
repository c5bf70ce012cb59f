//! The delivery simulators through the real service: generated Stripe stories delivered
//! over HTTP (signed, in any order, duplicated, redelivered when not acknowledged) to the
//! real webhook, on real PostgreSQL; then every balance is what the money says and the
//! audit is clean. The aggregate-level simulator (thousands of cases) is in
//! crates/stripe/tests/delivery_simulator.rs; this one proves the same through routing,
//! deduplication, the executor and the projections.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use credit_testkit::stripe_story::{deliver_in_any_order, story_between, Story};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use serde_json::json;

/// Stories run through the service; quoted in docs/ARCHITECTURE.md.
const HTTP_STORIES: usize = 300;

async fn run_story(app: &TestApp, n: usize, story: &Story) -> (String, i64) {
    let u = user(&format!("sim{n}"));
    let token = app.token(&u);
    let r = app
        .post_recharge(&token, json!({ "amount": story.amount_fen as f64 / 100.0 }))
        .await;
    r.expect(201);
    let recharge_id = r.str("recharge_id");
    let events = story.events(
        &format!("{n}_{}", uuid::Uuid::new_v4().simple()),
        &recharge_id,
        &u,
        &format!("cs_sim_{n}"),
        &format!("pi_sim_{n}"),
    );
    deliver_in_any_order(events, n as u64, |event| async move {
        let r = app.send_event(&event).await;
        match r.status {
            200 => true,
            409 if r.code() == "payment_not_yet_known" => false,
            other => panic!("story {n}: unexpected {other}: {}", r.body),
        }
    })
    .await;
    (token, story.expected_credits(100))
}

#[tokio::test]
async fn stripe_stories_delivered_in_any_order_end_as_the_money_says() {
    let app = TestApp::spawn().await;
    let mut runner = TestRunner::deterministic();
    let strategy = story_between(100, 1_000_000);
    let stories: Vec<Story> = (0..HTTP_STORIES)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect();
    let mut expected = Vec::new();
    for (chunk_no, chunk) in stories.chunks(8).enumerate() {
        let runs = chunk
            .iter()
            .enumerate()
            .map(|(i, story)| run_story(&app, chunk_no * 8 + i, story));
        expected.extend(futures::future::join_all(runs).await);
    }
    for (token, credits) in &expected {
        app.wait_for_balance(token, *credits).await;
    }
    app.wait_projected().await;
    let audit = app.admin_get("/api/admin/audit").await;
    audit.expect(200);
    assert_eq!(audit.body["ok"], true, "{}", audit.body);
}
