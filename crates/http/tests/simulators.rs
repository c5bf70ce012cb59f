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

mod grsai {
    //! The Grsai simulator through the real service: submissions accepted, refused, or timed
    //! out (taken by Grsai or not); callbacks running, succeeded or failed, repeated and late,
    //! delivered concurrently with the settlement job's polls and deadlines. One task per
    //! account, so each account's journal is one task's story.

    use std::time::Duration;

    use credit_testkit::fake_grsai::{failed_result, running_result, succeeded_result, Mode};
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use serde_json::{json, Value};

    use super::common::*;

    pub const TASKS: usize = 120;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Submit {
        Accepted,
        Refused,
        TimedOutTaken,
        GatewayTimeout,
    }

    struct Task {
        user: String,
        token: String,
        task_id: String,
        submit: Submit,
        provider_id: Option<String>,
        succeeds: bool,
        final_delivered: bool,
    }

    #[tokio::test]
    async fn grsai_interleavings_settle_each_task_exactly_once() {
        let app = TestApp::spawn_with(&[
            ("GRSAI_TIMEOUT", "500ms"),
            ("TASK_POLL_AFTER", "2s"),
            ("TASK_UNKNOWN_REFUND_AFTER", "2s"),
            ("SETTLEMENT_INTERVAL", "100ms"),
        ])
        .await;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut tasks = Vec::new();
        let mut created = 0u32;
        for n in 0..TASKS {
            let submit = *[
                Submit::Accepted,
                Submit::Accepted,
                Submit::Refused,
                Submit::TimedOutTaken,
                Submit::GatewayTimeout,
            ]
            .choose(&mut rng)
            .unwrap();
            let mode = match submit {
                Submit::Accepted => Mode::Success,
                Submit::Refused => Mode::insufficient_balance(),
                Submit::TimedOutTaken => Mode::TakeThenHang(Duration::from_millis(1200)),
                Submit::GatewayTimeout => Mode::GatewayTimeout,
            };
            app.grsai().set_mode(mode);
            let u = user(&format!("g{n}"));
            app.grant(&u, 10).await;
            let token = app.token(&u);
            let r = app
                .generate(&token, json!({ "prompt": format!("task {n}") }))
                .await;
            // What the service saw decides the story (on a loaded machine even a quick answer
            // can miss the time-out and be unknown): a 502 is a refusal, `processing` an
            // acceptance, `uncertain` an unknown outcome whether or not Grsai took it.
            let taken = matches!(submit, Submit::Accepted | Submit::TimedOutTaken);
            let (submit, task_id) = match (r.status, r.body["status"].as_str()) {
                (502, _) => {
                    r.expect_error(502, "provider_error");
                    let id = r.body["error"]["task_id"].as_str().unwrap().to_owned();
                    (Submit::Refused, id)
                }
                (202, Some("processing")) => (Submit::Accepted, r.str("task_id")),
                (202, Some("uncertain")) if taken => (Submit::TimedOutTaken, r.str("task_id")),
                (202, Some("uncertain")) => (Submit::GatewayTimeout, r.str("task_id")),
                other => panic!("task {n}: unexpected answer {other:?}: {}", r.body),
            };
            let provider_id = taken.then(|| {
                created += 1;
                format!("fake-task-{created:08}")
            });
            let succeeds = rng.gen_bool(0.6);
            if let Some(pid) = &provider_id {
                let result = if succeeds {
                    succeeded_result(pid, &format!("https://cdn.example/{pid}.mp4"))
                } else {
                    failed_result(pid, "output_moderation", "blocked")
                };
                app.grsai().set_poll_result(pid, result);
            }
            tasks.push(Task {
                user: u,
                token,
                task_id,
                submit,
                provider_id,
                succeeds,
                final_delivered: false,
            });
        }
        app.grsai().set_mode(Mode::Success);

        // Callbacks for the tasks Grsai has: running, the end, repeats; at random times,
        // some after the settlement deadline, all concurrently.
        let mut deliveries: Vec<(usize, Value, u64)> = Vec::new();
        for (i, t) in tasks.iter_mut().enumerate() {
            let Some(pid) = &t.provider_id else { continue };
            for _ in 0..rng.gen_range(0..3) {
                deliveries.push((
                    i,
                    running_result(pid, rng.gen_range(1..99)),
                    rng.gen_range(0..1500),
                ));
            }
            if rng.gen_bool(0.7) {
                t.final_delivered = true;
                let end = if t.succeeds {
                    succeeded_result(pid, &format!("https://cdn.example/{pid}.mp4"))
                } else {
                    failed_result(pid, "output_moderation", "blocked")
                };
                for _ in 0..rng.gen_range(1..3) {
                    deliveries.push((i, end.clone(), rng.gen_range(0..2500)));
                }
            }
        }
        deliveries.shuffle(&mut rng);
        let app_ref = &app;
        let tasks_ref = &tasks;
        futures::future::join_all(deliveries.into_iter().map(|(i, body, delay)| async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let status = app_ref.callback(&tasks_ref[i].task_id, &body).await;
            assert_eq!(status, 200, "callback for task {i}");
        }))
        .await;

        // Settlement finishes the rest: polls (a known provider id) or the deadline.
        for t in &tasks {
            app.wait_for_task(&t.token, &t.task_id, |v| {
                v["status"] == "succeeded" || v["status"] == "failed"
            })
            .await;
        }
        app.wait_projected().await;
        for (i, t) in tasks.iter().enumerate() {
            let refunds = app.events_of(&t.user, "CreditsRefunded").await;
            let videos = app.events_of(&t.user, "VideoSucceeded").await
                + app.events_of(&t.user, "VideoDeliveredAfterRefund").await;
            assert!(refunds <= 1, "task {i} refunded {refunds} times");
            assert_eq!(app.events_of(&t.user, "CreditsDeducted").await, 1);
            let credits = app.stats(&t.token).await.i64("credits");
            assert_eq!(
                credits,
                10 * refunds,
                "task {i}: balance and refunds disagree"
            );
            match t.submit {
                Submit::Refused => assert_eq!(refunds, 1, "task {i}: a refusal is refunded"),
                Submit::GatewayTimeout => {
                    assert_eq!(
                        refunds, 1,
                        "task {i}: never taken, refunded at the deadline"
                    )
                }
                Submit::Accepted if t.succeeds => {
                    assert_eq!(refunds, 0, "task {i}: accepted and succeeded, yet refunded");
                    assert_eq!(videos, 1, "task {i}: video lost");
                }
                Submit::Accepted => assert_eq!(refunds, 1, "task {i}: failed, not refunded"),
                Submit::TimedOutTaken if t.succeeds && t.final_delivered => {
                    // Either before the deadline (succeeded) or after it (delivered after the
                    // refund): the video is on record either way.
                    assert_eq!(videos, 1, "task {i}: a delivered video was lost");
                }
                Submit::TimedOutTaken => {}
            }
        }
        let audit = app.admin_get("/api/admin/audit").await;
        audit.expect(200);
        assert_eq!(audit.body["ok"], true, "{}", audit.body);
    }
}
