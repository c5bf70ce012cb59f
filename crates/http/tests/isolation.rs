//! A user cannot read or touch another user's records or tasks.

#![allow(clippy::unwrap_used)]

mod common;

use common::fake_grsai::{failed_result, succeeded_result};
use common::*;
use serde_json::json;

#[tokio::test]
async fn users_see_only_their_own_records_and_tasks() {
    let app = TestApp::spawn().await;
    let (a, b) = (user("a"), user("b"));
    let (ta, tb) = (app.token(&a), app.token(&b));
    app.paid_recharge(&a, 1000).await;
    let task = app.generate_ok(&ta, "a's video").await;
    app.wait_for_balance(&ta, 990).await;
    app.wait_projected().await;

    app.task(&tb, &task).await.expect_error(404, "not_found");
    for path in [
        "/api/recharge",
        "/api/video/tasks",
        "/api/consumption",
        "/api/account/events",
    ] {
        let r = app.get(path, Some(&tb)).await;
        r.expect(200);
        assert!(r.records().is_empty(), "{path} leaks: {}", r.text);
        let r = app.get(path, Some(&ta)).await;
        assert!(!r.records().is_empty(), "{path} misses a's records");
    }
    assert_eq!(app.stats(&tb).await.i64("credits"), 0);

    // A cursor made from a's records shows b nothing of a's.
    let page = app.get("/api/video/tasks?limit=1", Some(&ta)).await;
    let first = page.records()[0]["task_id"].as_str().unwrap().to_owned();
    let cursor = format!("{}_{}", i64::MAX / 1_000_000_000, first);
    let r = app
        .get(&format!("/api/video/tasks?cursor={cursor}"), Some(&tb))
        .await;
    assert!(r.records().is_empty());
}

#[tokio::test]
async fn a_callback_token_is_good_for_one_task_of_one_account_only() {
    let app = TestApp::spawn().await;
    let (a, b) = (user("a"), user("b"));
    app.grant(&a, 20).await;
    app.grant(&b, 10).await;
    let (ta, tb) = (app.token(&a), app.token(&b));
    let a1 = app.generate_ok(&ta, "a one").await;
    let a2 = app.generate_ok(&ta, "a two").await;
    let b1 = app.generate_ok(&tb, "b one").await;
    let pid_a2 = app.provider_id(&ta, &a2).await;
    let pid_b1 = app.provider_id(&tb, &b1).await;

    let url_a1 = app.callback_url(&a1);
    let events = app.event_count().await;
    // a1's token for a2 (same account), for b1 in b's account, and b1 named under a.
    let to_a2 = url_a1.replace(&format!("task={a1}"), &format!("task={a2}"));
    let to_b1 = url_a1
        .replace(&format!("task={a1}"), &format!("task={b1}"))
        .replace(&format!("account={a}"), &format!("account={b}"));
    let b1_under_a = url_a1.replace(&format!("task={a1}"), &format!("task={b1}"));
    for (url, result) in [
        (&to_a2, failed_result(&pid_a2, "error", "forged")),
        (&to_b1, failed_result(&pid_b1, "error", "forged")),
        (&b1_under_a, failed_result(&pid_b1, "error", "forged")),
        (&to_b1, succeeded_result(&pid_b1, "https://evil/x.mp4")),
    ] {
        assert_eq!(
            fake_grsai::deliver(url, &result).await.as_u16(),
            401,
            "{url}"
        );
    }
    assert_eq!(app.event_count().await, events);
    app.wait_for_balance(&tb, 0).await;
    app.wait_for_balance(&ta, 0).await;
}

#[tokio::test]
async fn user_tokens_cannot_reach_admin_endpoints() {
    let app = TestApp::spawn().await;
    let (a, b) = (user("a"), user("b"));
    app.grant(&b, 50).await;
    let ta = app.token(&a);
    let events = app.event_count().await;
    for path in [
        format!("/api/admin/accounts/{b}/events"),
        format!("/api/admin/accounts/{b}/balance"),
        "/api/admin/audit".to_owned(),
    ] {
        app.get(&path, Some(&ta))
            .await
            .expect_error(401, "invalid_admin_token");
    }
    app.post(
        &format!("/api/admin/accounts/{a}/adjustments"),
        Some(&ta),
        &json!({"credits": 1000, "reason": "free money"}),
    )
    .await
    .expect_error(401, "invalid_admin_token");
    assert_eq!(app.event_count().await, events);
    assert_eq!(app.stats(&ta).await.i64("credits"), 0);
}
