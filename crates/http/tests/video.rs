//! `POST /api/video/generate` against the fake Grsai, its callbacks, and the task and
//! consumption lists.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::fake_grsai::{failed_result, running_result, succeeded_result, CREATE_PATH};
use common::*;
use serde_json::json;

/// A user holding `credits`: (user, token).
async fn funded(app: &TestApp, credits: i64) -> (String, String) {
    let u = user("maker");
    if credits > 0 {
        app.grant(&u, credits).await;
    }
    let token = app.token(&u);
    (u, token)
}

#[tokio::test]
async fn generate_charges_and_submits_to_grsai() {
    let app = TestApp::spawn().await;
    let (u, token) = funded(&app, 100).await;

    let r = app
        .generate(
            &token,
            json!({
                "prompt": "  a red fox in the snow  ",
                "aspect_ratio": "16:9",
                "duration": 15,
                "size": "large",
                "image_url": "https://example.com/fox.png"
            }),
        )
        .await;
    r.expect(202);
    let task_id = r.str("task_id");
    assert_eq!(r.body["status"], "processing");
    assert_eq!(r.body["credits_charged"], 10);
    assert_eq!(r.body["credits"], 90);

    let sent = app.grsai_request(&task_id);
    assert_eq!(sent.path, CREATE_PATH);
    assert_eq!(sent.bearer_token(), Some(GRSAI_KEY));
    assert_eq!(sent.body["model"], "sora-2");
    assert_eq!(sent.body["prompt"], "a red fox in the snow");
    assert_eq!(sent.body["aspectRatio"], "16:9");
    assert_eq!(sent.body["duration"], 15);
    assert_eq!(sent.body["size"], "large");
    assert_eq!(sent.body["url"], "https://example.com/fox.png");
    let hook = sent.body["webHook"].as_str().unwrap();
    assert!(
        hook.starts_with(&format!("{}/api/video/callback?", app.base)),
        "{hook}"
    );
    let token_param = hook.split("token=").nth(1).unwrap();
    assert!(token_param.len() >= 32, "the callback token is unguessable");

    app.wait_for_balance(&token, 90).await;
    let task = app
        .wait_for_task(&token, &task_id, |t| t["status"] == "processing")
        .await;
    assert_eq!(task["prompt"], "a red fox in the snow");
    assert_eq!(task["credits_charged"], 10);
    assert_eq!(task["refunded"], false);
    assert_eq!(task["progress"], 0);
    assert_eq!(task["video_url"], json!(null));
    assert!(task["created_at"].is_string());
    let consumption = app.consumption(&token, "").await.records();
    assert_eq!(consumption.len(), 1);
    assert_eq!(consumption[0]["video_task_id"], json!(task_id));
    assert_eq!(consumption[0]["credits"], 10);
    assert_eq!(consumption[0]["status"], "completed");
    assert_eq!(app.events_of(&u, "CreditsDeducted").await, 1);
    assert_eq!(app.events_of(&u, "VideoTaskSubmitted").await, 1);

    // Defaults: 9:16, 10 s, small, no reference image.
    let id = app.generate_ok(&token, "plain").await;
    let sent = app.grsai_request(&id);
    assert_eq!(sent.body["aspectRatio"], "9:16");
    assert_eq!(sent.body["duration"], 10);
    assert_eq!(sent.body["size"], "small");
    assert!(sent.body.get("url").is_none() || sent.body["url"].is_null());
}

#[tokio::test]
async fn too_few_credits_is_402_and_grsai_is_not_called() {
    let app = TestApp::spawn().await;
    let (_, token) = funded(&app, 5).await;
    let events = app.event_count().await;
    let r = app.generate(&token, json!({ "prompt": "a fox" })).await;
    r.expect_error(402, "insufficient_credits");
    assert_eq!(r.body["error"]["required"], 10);
    assert_eq!(r.body["error"]["credits"], 5);
    assert!(app.grsai().requests().is_empty());
    assert_eq!(app.event_count().await, events);

    // A brand-new account has 0.
    let r = app
        .generate(&app.token(&user("new")), json!({ "prompt": "a fox" }))
        .await;
    r.expect_error(402, "insufficient_credits");
    assert_eq!(r.body["error"]["credits"], 0);
    assert_eq!(app.event_count().await, events);
}

async fn assert_refunded_after_provider_failure(app: &TestApp, token: &str) {
    let r = app.generate(token, json!({ "prompt": "doomed" })).await;
    r.expect_error(502, "provider_error");
    assert_eq!(r.body["error"]["refunded"], true);
    assert_eq!(r.body["error"]["credits"], 20);
    let task_id = r.body["error"]["task_id"].as_str().unwrap().to_owned();
    app.wait_for_balance(token, 20).await;
    let task = app
        .wait_for_task(token, &task_id, |t| t["refunded"] == true)
        .await;
    assert_eq!(task["status"], "failed");
    let consumption = app.consumption(token, "").await.records();
    assert_eq!(consumption[0]["status"], "refunded");
    assert!(consumption[0]["refunded_at"].is_string());
}

#[tokio::test]
async fn a_grsai_error_code_refunds_and_answers_502() {
    let app = TestApp::spawn().await;
    let (u, token) = funded(&app, 20).await;
    app.grsai().set_mode(GrsaiMode::insufficient_balance());
    assert_refunded_after_provider_failure(&app, &token).await;
    assert_eq!(app.events_of(&u, "CreditsRefunded").await, 1);
}

#[tokio::test]
async fn a_grsai_http_500_refunds_and_answers_502() {
    let app = TestApp::spawn().await;
    let (u, token) = funded(&app, 20).await;
    app.grsai().set_mode(GrsaiMode::ServerError);
    assert_refunded_after_provider_failure(&app, &token).await;
    assert_eq!(app.events_of(&u, "CreditsRefunded").await, 1);
}

#[tokio::test]
async fn a_grsai_timeout_keeps_the_task_charged_and_says_so() {
    let app = TestApp::spawn_with(&[("GRSAI_TIMEOUT", "300ms")]).await;
    let (u, token) = funded(&app, 20).await;
    // Grsai takes the task, then its answer never comes in time.
    app.grsai()
        .set_mode(GrsaiMode::TakeThenHang(Duration::from_millis(1500)));
    let started = std::time::Instant::now();
    let r = app.generate(&token, json!({ "prompt": "a fox" })).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    r.expect(202);
    assert_eq!(r.body["status"], "uncertain");
    assert_eq!(r.body["credits"], 10);
    let task_id = r.body["task_id"].as_str().unwrap().to_owned();
    let task = app
        .wait_for_task(&token, &task_id, |t| t["status"] == "uncertain")
        .await;
    assert_eq!(task["refunded"], false);
    assert_eq!(app.events_of(&u, "CreditsRefunded").await, 0);
    assert_eq!(app.events_of(&u, "VideoSubmissionUncertain").await, 1);
}

#[tokio::test]
async fn a_gateway_time_out_is_unknown_too() {
    let app = TestApp::spawn().await;
    let (u, token) = funded(&app, 20).await;
    app.grsai().set_mode(GrsaiMode::GatewayTimeout);
    let r = app.generate(&token, json!({ "prompt": "a fox" })).await;
    r.expect(202);
    assert_eq!(r.body["status"], "uncertain");
    assert_eq!(app.events_of(&u, "CreditsRefunded").await, 0);
}

#[tokio::test]
async fn callbacks_report_progress_then_the_video() {
    let app = TestApp::spawn().await;
    let (u, token) = funded(&app, 10).await;
    let task_id = app.generate_ok(&token, "a fox").await;
    let pid = app.provider_id(&token, &task_id).await;

    assert_eq!(app.callback(&task_id, &running_result(&pid, 40)).await, 200);
    app.wait_for_task(&token, &task_id, |t| t["progress"] == 40)
        .await;
    let done = succeeded_result(&pid, "https://cdn.example/fox.mp4");
    assert_eq!(app.callback(&task_id, &done).await, 200);
    let task = app
        .wait_for_task(&token, &task_id, |t| t["status"] == "succeeded")
        .await;
    assert_eq!(task["video_url"], "https://cdn.example/fox.mp4");
    assert_eq!(task["progress"], 100);
    assert_eq!(task["refunded"], false);
    assert!(task["completed_at"].is_string());

    // Late and repeated deliveries are harmless: a stale progress, the success again, a
    // failure after the success.
    let events = app.event_count().await;
    assert_eq!(app.callback(&task_id, &running_result(&pid, 10)).await, 200);
    assert_eq!(app.callback(&task_id, &done).await, 200);
    assert_eq!(
        app.callback(&task_id, &failed_result(&pid, "error", "late"))
            .await,
        200
    );
    assert_eq!(app.event_count().await, events);
    app.wait_projected().await;
    let task = app.task(&token, &task_id).await;
    assert_eq!(task.body["status"], "succeeded");
    assert_eq!(task.body["progress"], 100);
    assert_eq!(app.stats(&token).await.i64("credits"), 0);
    assert_eq!(app.events_of(&u, "CreditsRefunded").await, 0);
}

#[tokio::test]
async fn a_failed_callback_refunds_exactly_once() {
    let app = TestApp::spawn().await;
    let (u, token) = funded(&app, 10).await;
    let task_id = app.generate_ok(&token, "a fox").await;
    let pid = app.provider_id(&token, &task_id).await;

    let failed = failed_result(&pid, "output_moderation", "blocked");
    assert_eq!(app.callback(&task_id, &failed).await, 200);
    app.wait_for_balance(&token, 10).await;
    let task = app
        .wait_for_task(&token, &task_id, |t| t["refunded"] == true)
        .await;
    assert_eq!(task["status"], "failed");
    assert_eq!(task["failure_reason"], "output_moderation");

    let events = app.event_count().await;
    assert_eq!(app.callback(&task_id, &failed).await, 200);
    assert_eq!(app.event_count().await, events);
    // A success after the refund is recorded (the user gets the video), once; the refund
    // stands.
    let late = succeeded_result(&pid, "https://cdn.example/late.mp4");
    assert_eq!(app.callback(&task_id, &late).await, 200);
    assert_eq!(app.callback(&task_id, &late).await, 200);
    assert_eq!(app.event_count().await, events + 1);
    assert_eq!(app.events_of(&u, "VideoDeliveredAfterRefund").await, 1);
    app.wait_projected().await;
    let task = app.task(&token, &task_id).await.body;
    assert_eq!(task["status"], "failed");
    assert_eq!(task["video_url"], "https://cdn.example/late.mp4");
    assert_eq!(app.stats(&token).await.i64("credits"), 10);
    assert_eq!(app.events_of(&u, "CreditsRefunded").await, 1);
}

#[tokio::test]
async fn callbacks_without_the_right_token_are_401_and_malformed_bodies_400() {
    let app = TestApp::spawn().await;
    let (_, token) = funded(&app, 10).await;
    let task_id = app.generate_ok(&token, "a fox").await;
    let pid = app.provider_id(&token, &task_id).await;
    let url = app.callback_url(&task_id);
    let events = app.event_count().await;
    let failed = failed_result(&pid, "error", "x");

    let (base, query) = url.split_once('?').unwrap();
    let real_token = query.split("token=").nth(1).unwrap();
    let wrong = url.replace(real_token, &"0".repeat(real_token.len()));
    let no_token = url.replace(&format!("&token={real_token}"), "");
    let no_query = base.to_owned();
    for bad in [wrong, no_token, no_query, format!("{url}x")] {
        let status = fake_grsai::deliver(&bad, &failed).await;
        assert_eq!(status.as_u16(), 401, "{bad}");
    }

    // The right token with a body that is not a result object.
    for body in ["not json", "{}", "[]", r#"{"id": 1, "status": "exploded"}"#] {
        let r = app
            .send(
                reqwest::Method::POST,
                &url.replace(&app.base, ""),
                None,
                &[("content-type", "application/json")],
                Some(body.to_owned()),
            )
            .await;
        r.expect_error(400, "invalid_payload");
    }
    assert_eq!(app.event_count().await, events);
    assert_eq!(app.stats(&token).await.i64("credits"), 0);
}

#[tokio::test]
async fn a_callback_for_another_provider_task_id_is_ignored() {
    let app = TestApp::spawn().await;
    let (_, token) = funded(&app, 10).await;
    let task_id = app.generate_ok(&token, "a fox").await;
    app.provider_id(&token, &task_id).await;
    let events = app.event_count().await;
    let other = failed_result("fake-task-99999999", "error", "not ours");
    assert_eq!(app.callback(&task_id, &other).await, 200);
    assert_eq!(app.event_count().await, events);
}

#[tokio::test]
async fn an_idempotency_key_makes_a_retried_generate_one_task() {
    let app = TestApp::spawn().await;
    let (u, token) = funded(&app, 30).await;
    let send = || {
        app.send(
            reqwest::Method::POST,
            "/api/video/generate",
            Some(&token),
            &[
                ("content-type", "application/json"),
                ("idempotency-key", "gen-1"),
            ],
            Some(json!({ "prompt": "a fox" }).to_string()),
        )
    };
    let first = send().await;
    first.expect(202);
    let again = send().await;
    again.expect(202);
    assert_eq!(again.str("task_id"), first.str("task_id"));
    assert_eq!(app.events_of(&u, "CreditsDeducted").await, 1);
    assert_eq!(app.grsai().requests_to(CREATE_PATH).len(), 1);
    app.wait_for_balance(&token, 20).await;

    // The same key with a different request: 409, nothing written, nothing sent.
    let events = app.event_count().await;
    let other = app
        .send(
            reqwest::Method::POST,
            "/api/video/generate",
            Some(&token),
            &[
                ("content-type", "application/json"),
                ("idempotency-key", "gen-1"),
            ],
            Some(json!({ "prompt": "a different fox" }).to_string()),
        )
        .await;
    other.expect_error(409, "idempotency_conflict");
    assert_eq!(app.event_count().await, events);
    assert_eq!(app.grsai().requests_to(CREATE_PATH).len(), 1);
}

#[tokio::test]
async fn tasks_and_consumption_paginate_newest_first_without_duplicates() {
    let app = TestApp::spawn().await;
    let (_, token) = funded(&app, 250).await;
    let mut ids = Vec::new();
    for i in 0..25 {
        ids.push(app.generate_ok(&token, &format!("video {i}")).await);
    }
    app.wait_projected().await;
    ids.reverse();

    for path in ["/api/video/tasks", "/api/consumption"] {
        let key = if path == "/api/consumption" {
            "video_task_id"
        } else {
            "task_id"
        };
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let q = match &cursor {
                Some(c) => format!("{path}?limit=7&cursor={c}"),
                None => format!("{path}?limit=7"),
            };
            let page = app.get(&q, Some(&token)).await;
            page.expect(200);
            pages += 1;
            let records = page.records();
            assert!(records.len() <= 7);
            seen.extend(records.iter().map(|r| r[key].as_str().unwrap().to_owned()));
            match page.body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        assert_eq!(pages, 4, "{path}");
        assert_eq!(seen, ids, "{path}: newest first, each once");

        // Default limit 20, maximum 100.
        let page = app.get(path, Some(&token)).await;
        assert_eq!(page.records().len(), 20);
        assert!(page.body["next_cursor"].is_string());
        let page = app.get(&format!("{path}?limit=100"), Some(&token)).await;
        assert_eq!(page.records().len(), 25);
        assert!(page.body["next_cursor"].is_null());
    }

    let one = app.task(&token, &ids[3]).await;
    one.expect(200);
    assert_eq!(one.body["task_id"], json!(ids[3]));
    app.task(&token, "vid_does_not_exist")
        .await
        .expect_error(404, "not_found");
}

/// A task that has left the account's memory (more than `RECENT_SETTLED_TASKS` settlements
/// ago) is still one task: a retried generate answers it as it ended, a retry with another
/// request is a conflict, a late callback is answered `already_settled` after its token is
/// checked, and nothing is charged or written.
#[tokio::test]
async fn a_task_the_account_no_longer_keeps_is_still_one_task() {
    let app = TestApp::spawn().await;
    let later = credit_domain::RECENT_SETTLED_TASKS + 1;
    let (u, token) = funded(&app, 10 * (later as i64 + 1)).await;
    let send = |prompt: &str| {
        app.send(
            reqwest::Method::POST,
            "/api/video/generate",
            Some(&token),
            &[
                ("content-type", "application/json"),
                ("idempotency-key", "gen-old"),
            ],
            Some(json!({ "prompt": prompt }).to_string()),
        )
    };
    let first = send("a fox").await;
    first.expect(202);
    let task_id = first.str("task_id").to_owned();
    let pid = app.provider_id(&token, &task_id).await;
    let done = succeeded_result(&pid, "https://cdn.example/old.mp4");
    assert_eq!(app.callback(&task_id, &done).await, 200);
    for i in 0..later {
        let other = app.generate_ok(&token, &format!("fox {i}")).await;
        let pid = app.provider_id(&token, &other).await;
        let result = failed_result(&pid, "error", "no");
        assert_eq!(app.callback(&other, &result).await, 200);
    }
    app.wait_for_balance(&token, 10 * later as i64).await;
    let events = app.event_count().await;
    let submissions = app.grsai().requests_to(CREATE_PATH).len();

    let again = send("a fox").await;
    again.expect(202);
    assert_eq!(again.str("task_id"), task_id);
    assert_eq!(again.str("status"), "succeeded");
    assert_eq!(again.i64("credits_charged"), 10);
    assert_eq!(again.i64("credits"), 10 * later as i64);
    send("a different fox")
        .await
        .expect_error(409, "idempotency_conflict");

    let url = app.callback_url(&task_id);
    let r = reqwest::Client::new()
        .post(&url)
        .json(&failed_result(&pid, "error", "late"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body["outcome"], "already_settled");
    let (_, query) = url.split_once('?').unwrap();
    let real_token = query.split("token=").nth(1).unwrap();
    let wrong = url.replace(real_token, &"0".repeat(real_token.len()));
    assert_eq!(fake_grsai::deliver(&wrong, &done).await.as_u16(), 401);

    assert_eq!(app.event_count().await, events);
    assert_eq!(app.grsai().requests_to(CREATE_PATH).len(), submissions);
    assert_eq!(app.events_of(&u, "CreditsDeducted").await, later as i64 + 1);
    assert_eq!(app.stats(&token).await.i64("credits"), 10 * later as i64);
}
