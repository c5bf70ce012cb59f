//! The settlement job: tasks whose callback never came are polled at Grsai and settled; tasks
//! charged but never submitted are refunded. No credit stays charged forever.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use common::fake_grsai::{failed_result, running_result, succeeded_result, RESULT_PATH};
use common::*;
use credit_domain::{CreditCommand, UserId, VideoSpec};
use serde_json::json;

async fn settling_app() -> TestApp {
    TestApp::spawn_with(&[
        ("SETTLEMENT_INTERVAL", "100ms"),
        ("TASK_POLL_AFTER", "1s"),
        ("TASK_UNKNOWN_REFUND_AFTER", "1s"),
        ("GRSAI_TIMEOUT", "300ms"),
    ])
    .await
}

#[tokio::test]
async fn stuck_tasks_are_polled_and_settled_as_the_callback_would() {
    let app = settling_app().await;
    let u = user("stuck");
    app.grant(&u, 40).await;
    let token = app.token(&u);
    let ok = app.generate_ok(&token, "will succeed").await;
    let failed = app.generate_ok(&token, "will fail").await;
    let lost = app.generate_ok(&token, "provider forgot").await;
    let running = app.generate_ok(&token, "still running").await;
    let pid = |t: &str| {
        let t = t.to_owned();
        let app = &app;
        let token = token.clone();
        async move { app.provider_id(&token, &t).await }
    };
    let (p_ok, p_failed, p_lost, p_running) = (
        pid(&ok).await,
        pid(&failed).await,
        pid(&lost).await,
        pid(&running).await,
    );
    app.grsai()
        .set_poll_result(&p_ok, succeeded_result(&p_ok, "https://cdn.example/ok.mp4"));
    app.grsai().set_poll_result(
        &p_failed,
        failed_result(&p_failed, "output_moderation", "no"),
    );
    app.grsai().set_poll_not_found(&p_lost);
    app.grsai()
        .set_poll_result(&p_running, running_result(&p_running, 30));

    let t = app
        .wait_for_task(&token, &ok, |t| t["status"] == "succeeded")
        .await;
    assert_eq!(t["video_url"], "https://cdn.example/ok.mp4");
    assert_eq!(t["refunded"], false);
    let t = app
        .wait_for_task(&token, &failed, |t| t["refunded"] == true)
        .await;
    assert_eq!(t["status"], "failed");
    assert_eq!(t["failure_reason"], "output_moderation");
    let t = app
        .wait_for_task(&token, &lost, |t| t["refunded"] == true)
        .await;
    assert_eq!(t["status"], "failed");
    assert_eq!(t["failure_reason"], "provider_lost");
    let t = app
        .wait_for_task(&token, &running, |t| t["progress"] == 30)
        .await;
    assert_eq!(t["status"], "processing");
    assert_eq!(t["refunded"], false);

    // 40 - 4 * 10 + 2 refunds.
    app.wait_for_balance(&token, 20).await;
    let polled = app.grsai().requests_to(RESULT_PATH);
    assert!(polled.iter().any(|r| r.body["id"] == p_ok.as_str()));
    assert_eq!(polled[0].bearer_token(), Some(GRSAI_KEY));

    // Further passes refund nothing twice.
    let polls = polled.len();
    wait_for("another settlement pass", || async {
        (app.grsai().requests_to(RESULT_PATH).len() > polls + 1).then_some(())
    })
    .await;
    assert_eq!(app.events_of(&u, "CreditsRefunded").await, 2);
    assert_eq!(app.stats(&token).await.i64("credits"), 20);
}

#[tokio::test]
async fn a_task_charged_but_never_submitted_is_refunded() {
    let app = settling_app().await;
    let u = user("crashed");
    app.grant(&u, 10).await;
    let token = app.token(&u);

    // What a process that died between the deduction and the Grsai call leaves behind.
    let ledger = credit_store::Ledger::new(app.db.db.write.clone());
    let account = UserId::parse(&u).unwrap();
    ledger
        .execute(
            &account,
            CreditCommand::DeductForTask {
                task_id: "vid_orphan".into(),
                credits: 10,
                description: "Sora 2 video (10s, 9:16)".into(),
                video: VideoSpec {
                    model: "sora-2".into(),
                    prompt: "never sent".into(),
                    aspect_ratio: "9:16".into(),
                    duration: 10,
                    size: "small".into(),
                    reference_url: None,
                },
                callback_token_sha256: "0".repeat(64),
            },
            HashMap::new(),
        )
        .await
        .unwrap();
    app.wait_for_balance(&token, 0).await;
    let t = app
        .wait_for_task(&token, "vid_orphan", |t| t["status"] == "pending")
        .await;
    assert_eq!(t["refunded"], false);

    let t = app
        .wait_for_task(&token, "vid_orphan", |t| t["refunded"] == true)
        .await;
    assert_eq!(t["status"], "failed");
    assert_eq!(t["failure_reason"], "submission_unknown");
    app.wait_for_balance(&token, 10).await;
    assert!(app.grsai().requests().is_empty());
    assert_eq!(app.events_of(&u, "CreditsRefunded").await, 1);
}

/// A paid recharge whose webhook never arrives is completed from what Stripe says; an
/// expired one is cancelled; an open one waits; a late webhook afterwards changes nothing.
#[tokio::test]
async fn pending_recharges_are_reconciled_with_stripe() {
    let app = TestApp::spawn_with(&[
        ("SETTLEMENT_INTERVAL", "100ms"),
        ("RECHARGE_RECONCILE_AFTER", "1s"),
    ])
    .await;
    let u = user("lost-webhook");
    let token = app.token(&u);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = app.post_recharge(&token, json!({ "amount": 50 })).await;
        r.expect(201);
        ids.push(r.str("recharge_id"));
    }
    let session = |id: &str| app.stripe().session_for(id).unwrap();
    // Paid at Stripe, but the webhook is lost for good.
    assert!(app
        .stripe()
        .pay_session(&session(&ids[0]), "pi_lost_webhook"));
    // Expired unpaid at Stripe.
    assert!(app
        .stripe()
        .update_session(&session(&ids[1]), |s| s["status"] = json!("expired")));
    // ids[2] stays open.

    app.wait_for_recharge(&token, &ids[0], "completed").await;
    app.wait_for_recharge(&token, &ids[1], "cancelled").await;
    app.wait_for_balance(&token, 5000).await;
    let records = app.recharges(&token, "").await.records();
    let open = records.iter().find(|r| r["recharge_id"] == ids[2]).unwrap();
    assert_eq!(open["status"], "pending");
    let paid = records.iter().find(|r| r["recharge_id"] == ids[0]).unwrap();
    assert_eq!(paid["payment_id"], "pi_lost_webhook");

    // The webhook arrives after all: nothing changes.
    let events = app.event_count().await;
    let late = credit_testkit::fake_stripe::checkout_completed_event(
        &evt("late"),
        &session(&ids[0]),
        &ids[0],
        &u,
        5000,
        "cny",
        "paid",
        Some("pi_lost_webhook"),
    );
    let r = app.send_event(&late).await;
    r.expect(200);
    assert_eq!(r.body["outcome"], "already_completed");
    assert_eq!(app.event_count().await, events);
    assert_eq!(app.events_of(&u, "RechargeCompleted").await, 1);
    assert_eq!(app.stats(&token).await.i64("credits"), 5000);
}

/// A task that cannot be settled (the provider's result is refused by the ledger) is retried
/// on later passes and never stops the others; it is decided on the account's events, so a
/// task the read table shows as older state is not refunded while it runs.
#[tokio::test]
async fn one_unsettleable_task_never_stops_the_others() {
    let app = settling_app().await;
    let u = user("mixed");
    app.grant(&u, 20).await;
    let token = app.token(&u);
    let bad = app.generate_ok(&token, "bad provider data").await;
    let good = app.generate_ok(&token, "fine").await;
    let p_bad = app.provider_id(&token, &bad).await;
    let p_good = app.provider_id(&token, &good).await;
    // A video URL with a control character: the ledger refuses to record it.
    app.grsai().set_poll_result(
        &p_bad,
        succeeded_result(&p_bad, "https://cdn.example/\u{1}bad.mp4"),
    );
    app.grsai().set_poll_result(
        &p_good,
        succeeded_result(&p_good, "https://cdn.example/ok.mp4"),
    );
    app.wait_for_task(&token, &good, |t| t["status"] == "succeeded")
        .await;
    let polls = |id: &str| {
        app.grsai()
            .requests_to(RESULT_PATH)
            .iter()
            .filter(|r| r.body["id"] == id)
            .count()
    };
    wait_for("the bad task polled again", || async {
        (polls(&p_bad) >= 2).then_some(())
    })
    .await;
    let t = app.task(&token, &bad).await.body;
    assert_eq!(t["status"], "processing");
    assert_eq!(t["refunded"], false);
    assert_eq!(app.stats(&token).await.i64("credits"), 0);
}
