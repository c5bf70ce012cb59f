//! `GrsaiClient` against the local fake Grsai server from the test kit.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use credit_domain::ports::{
    PollOutcome, ProviderError, ProviderStatus, VideoProvider, VideoRequest,
};
use credit_grsai::{GrsaiClient, GrsaiConfig};
use credit_testkit::fake_grsai::{
    failed_result, succeeded_result, FakeGrsai, Mode, CREATE_PATH, RESULT_PATH,
};
use secrecy::SecretString;
use serde_json::json;

const KEY: &str = "sk-test-4f9a";

fn client(grsai: &FakeGrsai) -> GrsaiClient {
    client_with_timeout(grsai, Duration::from_secs(5))
}

fn client_with_timeout(grsai: &FakeGrsai, timeout: Duration) -> GrsaiClient {
    let mut config = GrsaiConfig::new(grsai.base_url(), SecretString::from(KEY));
    config.timeout = timeout;
    GrsaiClient::new(config).unwrap()
}

fn request() -> VideoRequest {
    VideoRequest {
        prompt: "a cat surfing at sunset".into(),
        aspect_ratio: "16:9".into(),
        duration: 15,
        size: "large".into(),
        image_url: Some("https://img.example.com/ref.png".into()),
        callback_url: "https://app.example.com/api/video/callback/t0k3n".into(),
    }
}

fn assert_unavailable(result: Result<impl std::fmt::Debug, ProviderError>) -> String {
    match result {
        Err(ProviderError::Unavailable(msg)) => msg,
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn submit_sends_the_wire_format_and_returns_the_task_id() {
    let grsai = FakeGrsai::start().await;
    let id = client(&grsai).submit(&request()).await.unwrap();
    assert!(!id.is_empty());

    let requests = grsai.requests_to(CREATE_PATH);
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    assert_eq!(sent.method, "POST");
    assert_eq!(sent.bearer_token(), Some(KEY));
    assert!(sent
        .header("content-type")
        .is_some_and(|ct| ct.starts_with("application/json")));
    assert_eq!(
        sent.body,
        json!({
            "model": "sora-2",
            "prompt": "a cat surfing at sunset",
            "url": "https://img.example.com/ref.png",
            "aspectRatio": "16:9",
            "duration": 15,
            "size": "large",
            "webHook": "https://app.example.com/api/video/callback/t0k3n",
            "shutProgress": false,
        })
    );
}

#[tokio::test]
async fn submit_without_image_omits_url() {
    let grsai = FakeGrsai::start().await;
    let req = VideoRequest {
        image_url: None,
        ..request()
    };
    client(&grsai).submit(&req).await.unwrap();
    let body = &grsai.requests()[0].body;
    assert!(body.get("url").is_none(), "{body}");
    assert_eq!(body["aspectRatio"], "16:9");
}

#[tokio::test]
async fn non_zero_code_is_rejected_with_the_message() {
    let grsai = FakeGrsai::start().await;
    grsai.set_mode(Mode::insufficient_balance());
    let err = client(&grsai).submit(&request()).await.unwrap_err();
    assert_eq!(
        err,
        ProviderError::Rejected("insufficient balance in api account".into())
    );
}

#[tokio::test]
async fn http_500_with_a_body_is_a_refusal() {
    let grsai = FakeGrsai::start().await;
    grsai.set_mode(Mode::ServerError);
    let err = client(&grsai).submit(&request()).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::Rejected(msg) if msg.contains("500")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_gateway_time_out_is_an_unknown_outcome() {
    let grsai = FakeGrsai::start().await;
    grsai.set_mode(Mode::GatewayTimeout);
    let msg = assert_unavailable(client(&grsai).submit(&request()).await);
    assert!(msg.contains("504"), "{msg}");
    assert_unavailable(client(&grsai).poll("fake-task-1").await);
}

#[tokio::test]
async fn http_4xx_is_rejected() {
    let grsai = FakeGrsai::start().await;
    // A path Grsai does not serve answers 404.
    let mut config = GrsaiConfig::new(
        format!("{}/nowhere", grsai.base_url()),
        SecretString::from(KEY),
    );
    config.timeout = Duration::from_secs(5);
    let client = GrsaiClient::new(config).unwrap();
    let err = client.submit(&request()).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::Rejected(msg) if msg.contains("404")),
        "{err:?}"
    );
}

#[tokio::test]
async fn slow_answer_times_out_as_unavailable() {
    let grsai = FakeGrsai::start().await;
    grsai.set_mode(Mode::Delay(Duration::from_secs(3)));
    let client = client_with_timeout(&grsai, Duration::from_millis(300));
    let started = std::time::Instant::now();
    let msg = assert_unavailable(client.submit(&request()).await);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(msg.contains("within"), "{msg}");
}

#[tokio::test]
async fn unreachable_grsai_is_a_refusal_nothing_was_sent() {
    let grsai = FakeGrsai::start().await;
    let base = grsai.base_url();
    drop(grsai);
    // Give the server a moment to close its listener.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut config = GrsaiConfig::new(base, SecretString::from(KEY));
    config.timeout = Duration::from_secs(2);
    let client = GrsaiClient::new(config).unwrap();
    let err = client.submit(&request()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Rejected(_)), "{err:?}");
}

#[tokio::test]
async fn poll_finds_a_succeeded_task() {
    let grsai = FakeGrsai::start().await;
    grsai.set_poll_result(
        "task-1",
        succeeded_result("task-1", "https://v.example.com/1.mp4"),
    );
    let outcome = client(&grsai).poll("task-1").await.unwrap();
    let PollOutcome::Found(result) = outcome else {
        panic!("expected Found, got {outcome:?}");
    };
    assert_eq!(result.provider_task_id, "task-1");
    assert_eq!(result.status, ProviderStatus::Succeeded);
    assert_eq!(result.progress, 100);
    assert_eq!(
        result.video_url.as_deref(),
        Some("https://v.example.com/1.mp4")
    );

    let sent = &grsai.requests_to(RESULT_PATH)[0];
    assert_eq!(sent.body, json!({"id": "task-1"}));
    assert_eq!(sent.bearer_token(), Some(KEY));
}

#[tokio::test]
async fn poll_finds_a_failed_task() {
    let grsai = FakeGrsai::start().await;
    grsai.set_poll_result(
        "task-2",
        failed_result("task-2", "output_moderation", "blocked"),
    );
    let PollOutcome::Found(result) = client(&grsai).poll("task-2").await.unwrap() else {
        panic!("expected Found");
    };
    assert_eq!(result.status, ProviderStatus::Failed);
    assert_eq!(result.failure_reason.as_deref(), Some("output_moderation"));
    assert_eq!(result.error.as_deref(), Some("blocked"));
}

#[tokio::test]
async fn a_submitted_task_polls_as_running() {
    let grsai = FakeGrsai::start().await;
    let client = client(&grsai);
    let id = client.submit(&request()).await.unwrap();
    let PollOutcome::Found(result) = client.poll(&id).await.unwrap() else {
        panic!("expected Found");
    };
    assert_eq!(result.status, ProviderStatus::Running);
}

#[tokio::test]
async fn poll_of_an_unknown_task_is_not_found() {
    let grsai = FakeGrsai::start().await;
    let client = client(&grsai);
    assert_eq!(client.poll("nope").await.unwrap(), PollOutcome::NotFound);
    let id = client.submit(&request()).await.unwrap();
    grsai.set_poll_not_found(&id);
    assert_eq!(client.poll(&id).await.unwrap(), PollOutcome::NotFound);
}

#[tokio::test]
async fn poll_with_an_unreadable_result_is_unavailable() {
    let grsai = FakeGrsai::start().await;
    grsai.set_poll_result("task-3", json!({"id": "task-3", "status": "exploded"}));
    assert_unavailable(client(&grsai).poll("task-3").await);
    // Another task's result must never settle this one.
    grsai.set_poll_result("task-4", succeeded_result("task-5", "https://v/5.mp4"));
    assert_unavailable(client(&grsai).poll("task-4").await);
}

#[tokio::test]
async fn poll_error_code_is_rejected() {
    let grsai = FakeGrsai::start().await;
    grsai.set_mode(Mode::ErrorCode {
        code: -3,
        msg: "rate limited".into(),
    });
    assert_eq!(
        client(&grsai).poll("task-1").await.unwrap_err(),
        ProviderError::Rejected("rate limited".into())
    );
}
