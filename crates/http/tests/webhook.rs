//! `POST /api/stripe/webhook`: signature, deduplication, every handled event type, Stripe's
//! unordered delivery, amount checks, refunds and disputes.

#![allow(clippy::unwrap_used)]

mod common;

use common::fake_stripe::*;
use common::*;
use serde_json::json;

/// A pending Stripe recharge of `amount_fen` for a new user: (app token, user, recharge id).
async fn pending(app: &TestApp, amount_fen: i64) -> (String, String, String) {
    let u = user("payer");
    let token = app.token(&u);
    let r = app
        .post_recharge(&token, json!({ "amount": amount_fen as f64 / 100.0 }))
        .await;
    r.expect(201);
    (token, u, r.str("recharge_id"))
}

#[tokio::test]
async fn bad_signatures_stale_timestamps_and_unparsable_bodies_are_400_and_write_nothing() {
    let app = TestApp::spawn().await;
    let (token, u, id) = pending(&app, 1000).await;
    let event = completed_event(&id, &u, 1000, "paid");
    let events = app.event_count().await;

    // Signed with another secret.
    let (body, header) = signed_event("whsec_someone_else", &event);
    app.webhook(&body, &header)
        .await
        .expect_error(400, "invalid_signature");
    // Signature of another body.
    let (_, header) = signed_event(WEBHOOK_SECRET, &event);
    let tampered = body.replace("1000", "1001");
    app.webhook(&tampered, &header)
        .await
        .expect_error(400, "invalid_signature");
    // No header, an empty one, garbage.
    let missing = app
        .send(
            reqwest::Method::POST,
            "/api/stripe/webhook",
            None,
            &[("content-type", "application/json")],
            Some(body.clone()),
        )
        .await;
    missing.expect_error(400, "invalid_signature");
    for header in ["", "garbage", "t=,v1=", "v1=abc"] {
        let r = app.webhook(&body, header).await;
        assert_eq!(r.status, 400, "{header:?}: {}", r.text);
    }
    // Correct signature, but made 301 s ago (tolerance 300 s).
    let (body, header) = signed_event_at(WEBHOOK_SECRET, &event, now() - 301);
    app.webhook(&body, &header)
        .await
        .expect_error(400, "stale_signature");
    // Correctly signed, but not a Stripe event.
    for raw in ["not json", "{}", "[1,2]", r#"{"id": 5}"#] {
        let header = signature_header(WEBHOOK_SECRET, raw, now());
        app.webhook(raw, &header)
            .await
            .expect_error(400, "invalid_payload");
    }

    assert_eq!(app.event_count().await, events);
    assert_eq!(app.stats(&token).await.i64("credits"), 0);
}

#[tokio::test]
async fn one_valid_v1_among_several_is_accepted() {
    let app = TestApp::spawn().await;
    let (token, u, id) = pending(&app, 1000).await;
    let (body, _) = signed_event(WEBHOOK_SECRET, &completed_event(&id, &u, 1000, "paid"));
    let t = now();
    let header = format!(
        "t={t},v1={},v1={},v0={}",
        v1_signature("whsec_old_secret", &body, t),
        v1_signature(WEBHOOK_SECRET, &body, t),
        v1_signature("whatever", &body, t),
    );
    app.webhook(&body, &header).await.expect(200);
    app.wait_for_balance(&token, 1000).await;
}

#[tokio::test]
async fn unhandled_event_types_and_unknown_recharges_change_nothing() {
    let app = TestApp::spawn().await;
    let (token, u, id) = pending(&app, 1000).await;
    let events = app.event_count().await;

    let other = stripe_event(
        &evt("cust"),
        "customer.created",
        json!({"id": "cus_1", "object": "customer"}),
    );
    app.send_event(&other).await.expect(200);
    let unknown = completed_event("rch_nobody_knows", &u, 1000, "paid");
    app.send_event(&unknown).await.expect(200);
    let refund_unknown = charge_refunded_event(
        &evt("r"),
        "ch_x",
        Some("pi_unknown"),
        1000,
        1000,
        "cny",
        &[],
    );
    // A refund of a payment we cannot tie to a recharge yet is not acknowledged: Stripe
    // delivers it again later, when the completion (or the reconciliation) has told us.
    let r = app.send_event(&refund_unknown).await;
    r.expect_error(409, "payment_not_yet_known");

    assert_eq!(app.event_count().await, events);
    app.wait_for_recharge(&token, &id, "pending").await;
}

#[tokio::test]
async fn a_duplicate_event_id_is_200_and_credits_once() {
    let app = TestApp::spawn().await;
    let (token, u, id) = pending(&app, 1000).await;
    let event = completed_event(&id, &u, 1000, "paid");
    app.send_event(&event).await.expect(200);
    let again = app.send_event(&event).await;
    again.expect(200);
    assert_eq!(again.body["duplicate"], true);
    // The same completion under a new event id (Stripe resends) is harmless too.
    let mut resent = event.clone();
    resent["id"] = json!(evt("resent"));
    app.send_event(&resent).await.expect(200);

    app.wait_for_balance(&token, 1000).await;
    assert_eq!(app.events_of(&u, "RechargeCompleted").await, 1);
}

#[tokio::test]
async fn an_unpaid_completion_waits_for_async_payment_succeeded() {
    let app = TestApp::spawn().await;
    let (token, u, id) = pending(&app, 2000).await;
    let events = app.event_count().await;

    app.send_event(&completed_event(&id, &u, 2000, "unpaid"))
        .await
        .expect(200);
    assert_eq!(app.event_count().await, events);
    app.wait_for_recharge(&token, &id, "pending").await;

    let ok = async_payment_succeeded_event(
        &evt("async"),
        "cs_1",
        &id,
        &u,
        2000,
        "cny",
        Some("pi_async"),
    );
    app.send_event(&ok).await.expect(200);
    app.wait_for_balance(&token, 2000).await;
    let record = app.wait_for_recharge(&token, &id, "completed").await;
    assert_eq!(record["payment_id"], "pi_async");
}

#[tokio::test]
async fn async_payment_failed_marks_the_recharge_failed() {
    let app = TestApp::spawn().await;
    let (token, u, id) = pending(&app, 2000).await;
    app.send_event(&completed_event(&id, &u, 2000, "unpaid"))
        .await
        .expect(200);
    let failed = async_payment_failed_event(&evt("fail"), "cs_1", &id, &u, 2000, "cny", None);
    app.send_event(&failed).await.expect(200);
    app.wait_for_recharge(&token, &id, "failed").await;
    assert_eq!(app.stats(&token).await.i64("credits"), 0);
    // The domain's rule: money in hand wins. A payment that does arrive after all is
    // credited, once.
    let late =
        async_payment_succeeded_event(&evt("late"), "cs_1", &id, &u, 2000, "cny", Some("pi_1"));
    app.send_event(&late).await.expect(200);
    app.wait_for_balance(&token, 2000).await;
    app.wait_for_recharge(&token, &id, "completed").await;
}

#[tokio::test]
async fn expired_cancels_a_pending_recharge_but_not_a_completed_one() {
    let app = TestApp::spawn().await;
    let (token, u, id) = pending(&app, 1000).await;
    let expired = session_expired_event(&evt("exp"), "cs_1", &id, &u, 1000, "cny");
    app.send_event(&expired).await.expect(200);
    app.wait_for_recharge(&token, &id, "cancelled").await;

    // Out of order: completed first, then a late `expired`.
    let (token, u, id) = pending(&app, 1000).await;
    app.send_event(&completed_event(&id, &u, 1000, "paid"))
        .await
        .expect(200);
    app.wait_for_balance(&token, 1000).await;
    let events = app.event_count().await;
    let late = session_expired_event(&evt("exp"), "cs_2", &id, &u, 1000, "cny");
    app.send_event(&late).await.expect(200);
    assert_eq!(app.event_count().await, events);
    app.wait_for_recharge(&token, &id, "completed").await;
    assert_eq!(app.stats(&token).await.i64("credits"), 1000);
}

#[tokio::test]
async fn amount_or_currency_mismatch_is_not_credited() {
    let app = TestApp::spawn().await;
    let (token, u, id) = pending(&app, 1000).await;
    let events = app.event_count().await;

    let cheaper = completed_event(&id, &u, 1, "paid");
    let r = app.send_event(&cheaper).await;
    assert!((400..500).contains(&r.status), "{}", r.text);
    assert_eq!(r.code(), "amount_mismatch");
    let mut dollars = completed_event(&id, &u, 1000, "paid");
    dollars["id"] = json!(evt("usd"));
    dollars["data"]["object"]["currency"] = json!("usd");
    let r = app.send_event(&dollars).await;
    assert!((400..500).contains(&r.status), "{}", r.text);
    assert_eq!(r.code(), "currency_mismatch");

    assert_eq!(app.event_count().await, events);
    app.wait_for_recharge(&token, &id, "pending").await;
    assert_eq!(app.stats(&token).await.i64("credits"), 0);

    // The right event still completes it.
    let mut right = completed_event(&id, &u, 1000, "paid");
    right["id"] = json!(evt("right"));
    app.send_event(&right).await.expect(200);
    app.wait_for_balance(&token, 1000).await;
}

#[tokio::test]
async fn full_and_partial_refunds_reverse_credits_in_proportion() {
    let app = TestApp::spawn().await;
    let u = user("refunded");
    let token = app.token(&u);

    // Full refund.
    let full = app.paid_recharge(&u, 1000).await;
    let refund =
        charge_refunded_event(&evt("rf"), "ch_1", Some(&pi(&full)), 1000, 1000, "cny", &[]);
    app.send_event(&refund).await.expect(200);
    app.wait_for_balance(&token, 0).await;
    let record = app.wait_for_recharge(&token, &full, "reversed").await;
    assert_eq!(record["reversed_credits"], 1000);

    // Partial refunds are cumulative: 25 %, then 60 % in total.
    let part = app.paid_recharge(&u, 2000).await;
    let quarter =
        charge_refunded_event(&evt("rp1"), "ch_2", Some(&pi(&part)), 2000, 500, "cny", &[]);
    app.send_event(&quarter).await.expect(200);
    app.wait_for_balance(&token, 1500).await;
    let more = charge_refunded_event(
        &evt("rp2"),
        "ch_2",
        Some(&pi(&part)),
        2000,
        1200,
        "cny",
        &[],
    );
    app.send_event(&more).await.expect(200);
    app.wait_for_balance(&token, 800).await;
    // A replay of the earlier, smaller total reverses nothing more.
    let stale = charge_refunded_event(&evt("rp3"), "ch_2", Some(&pi(&part)), 2000, 500, "cny", &[]);
    app.send_event(&stale).await.expect(200);
    let record = app.wait_for_recharge(&token, &part, "reversed").await;
    assert_eq!(record["reversed_credits"], 1200);
    assert_eq!(app.stats(&token).await.i64("credits"), 800);
    assert_eq!(app.events_of(&u, "RechargeReversed").await, 3);
}

#[tokio::test]
async fn a_dispute_reverses_and_a_spent_recharge_leaves_a_debt_that_blocks_generation() {
    let app = TestApp::spawn().await;
    let u = user("disputer");
    let token = app.token(&u);
    let id = app.paid_recharge(&u, 100).await;
    app.generate_ok(&token, "a cat").await;
    app.wait_for_balance(&token, 90).await;

    let dispute = dispute_created_event(&evt("dp"), "dp_1", "ch_1", Some(&pi(&id)), 100, "cny");
    app.send_event(&dispute).await.expect(200);
    app.wait_for_balance(&token, -10).await;
    app.wait_for_recharge(&token, &id, "reversed").await;

    let grsai_calls = app.grsai().requests_to(fake_grsai::CREATE_PATH).len();
    let r = app
        .generate(&token, json!({ "prompt": "another cat" }))
        .await;
    r.expect_error(402, "insufficient_credits");
    assert_eq!(r.body["error"]["credits"], -10);
    assert_eq!(r.body["error"]["required"], 10);
    assert_eq!(
        app.grsai().requests_to(fake_grsai::CREATE_PATH).len(),
        grsai_calls
    );
    // A duplicate of the dispute changes nothing.
    app.send_event(&dispute).await.expect(200);
    assert_eq!(app.events_of(&u, "RechargeReversed").await, 1);
}

/// A refund names only the payment intent. When the read table does not show the recharge
/// (the projection is behind), the journal is searched instead: the refund is never lost.
#[tokio::test]
async fn a_refund_is_matched_through_the_journal_when_the_records_lag() {
    let app = TestApp::spawn().await;
    let u = user("lagging");
    let token = app.token(&u);
    let recharge = app.paid_recharge(&u, 1000).await;
    // Simulate a projection that has not caught up: the record is not there.
    let client = app.db.client().await;
    client
        .execute("DELETE FROM recharge_records WHERE id = $1", &[&recharge])
        .await
        .unwrap();
    let refund = charge_refunded_event(
        &evt("lag"),
        "ch_lag",
        Some(&pi(&recharge)),
        1000,
        1000,
        "cny",
        &[],
    );
    let r = app.send_event(&refund).await;
    r.expect(200);
    assert_eq!(r.str("outcome"), "applied", "{}", r.text);
    app.wait_for_balance(&token, 0).await;
}
