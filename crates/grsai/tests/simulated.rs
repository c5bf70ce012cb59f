//! `SimulatedVideoProvider` calling back a small local actix endpoint, which parses what it
//! receives with the same `parse_result` the real callback endpoint uses.

#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use credit_domain::ports::{PollOutcome, ProviderStatus, VideoProvider, VideoRequest};
use credit_grsai::{parse_result, SimulatedVideoProvider};
use serde_json::Value;
use tokio::sync::mpsc;

/// One callback as received: the path (carrying the token) and the raw JSON.
type Received = (String, Value);

/// Starts a callback endpoint on 127.0.0.1:0; returns its base URL and the received bodies.
fn callback_endpoint() -> (String, mpsc::UnboundedReceiver<Received>) {
    let (tx, rx) = mpsc::unbounded_channel::<Received>();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = HttpServer::new(move || {
        let tx = tx.clone();
        App::new().route(
            "/callback/{token}",
            web::post().to(move |req: actix_web::HttpRequest, body: web::Bytes| {
                let tx = tx.clone();
                async move {
                    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let _ = tx.send((req.path().to_owned(), json));
                    HttpResponse::Ok().finish()
                }
            }),
        )
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    (format!("http://127.0.0.1:{port}"), rx)
}

fn request(prompt: &str, callback_url: String) -> VideoRequest {
    VideoRequest {
        prompt: prompt.into(),
        aspect_ratio: "9:16".into(),
        duration: 10,
        size: "small".into(),
        image_url: None,
        callback_url,
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("no callback within 5 s")
        .expect("callback channel closed")
}

/// The keys of a Grsai result object, as in the fixtures.
fn assert_wire_shape(json: &Value) {
    let fixture: Value =
        serde_json::from_str(include_str!("fixtures/callback-succeeded.json")).unwrap();
    let keys = |v: &Value| {
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    assert_eq!(keys(json), keys(&fixture), "{json}");
}

#[tokio::test]
async fn success_calls_back_running_then_succeeded() {
    let (base, mut rx) = callback_endpoint();
    let provider = SimulatedVideoProvider::new()
        .with_delay(Duration::from_millis(200))
        .with_video_url("http://127.0.0.1/sample.mp4");
    let id = provider
        .submit(&request("a calm lake", format!("{base}/callback/tok-1")))
        .await
        .unwrap();

    // Known (running) before any callback.
    let PollOutcome::Found(first) = provider.poll(&id).await.unwrap() else {
        panic!("submitted task not found");
    };
    assert_eq!(first.status, ProviderStatus::Running);

    let (path, running) = next(&mut rx).await;
    assert_eq!(path, "/callback/tok-1");
    assert_wire_shape(&running);
    let running = parse_result(running.to_string().as_bytes()).unwrap();
    assert_eq!(running.provider_task_id, id);
    assert_eq!(running.status, ProviderStatus::Running);
    assert_eq!(running.progress, 50);

    let (_, done_json) = next(&mut rx).await;
    assert_wire_shape(&done_json);
    assert_eq!(done_json["results"][0]["removeWatermark"], true);
    let done = parse_result(done_json.to_string().as_bytes()).unwrap();
    assert_eq!(done.provider_task_id, id);
    assert_eq!(done.status, ProviderStatus::Succeeded);
    assert_eq!(done.progress, 100);
    assert_eq!(
        done.video_url.as_deref(),
        Some("http://127.0.0.1/sample.mp4")
    );
    assert_eq!(done.failure_reason, None);

    assert_eq!(provider.poll(&id).await.unwrap(), PollOutcome::Found(done));
}

#[tokio::test]
async fn fail_marker_calls_back_a_moderation_failure() {
    let (base, mut rx) = callback_endpoint();
    let provider = SimulatedVideoProvider::new().with_delay(Duration::from_millis(100));
    let id = provider
        .submit(&request(
            "explode everything [fail]",
            format!("{base}/callback/tok-2"),
        ))
        .await
        .unwrap();

    let (_, running) = next(&mut rx).await;
    assert_eq!(running["status"], "running");
    let (_, failed_json) = next(&mut rx).await;
    assert_wire_shape(&failed_json);
    let failed = parse_result(failed_json.to_string().as_bytes()).unwrap();
    assert_eq!(failed.provider_task_id, id);
    assert_eq!(failed.status, ProviderStatus::Failed);
    assert_eq!(failed.failure_reason.as_deref(), Some("input_moderation"));
    assert!(failed.error.is_some());
    assert_eq!(failed.video_url, None);
    assert_eq!(
        provider.poll(&id).await.unwrap(),
        PollOutcome::Found(failed)
    );
}

#[tokio::test]
async fn unknown_task_is_not_found() {
    let provider = SimulatedVideoProvider::new();
    assert_eq!(
        provider.poll("sim-nope").await.unwrap(),
        PollOutcome::NotFound
    );
}

#[tokio::test]
async fn ids_are_fresh() {
    let (base, _rx) = callback_endpoint();
    let provider = SimulatedVideoProvider::new().with_delay(Duration::from_millis(50));
    let a = provider
        .submit(&request("a", format!("{base}/callback/a")))
        .await
        .unwrap();
    let b = provider
        .submit(&request("b", format!("{base}/callback/b")))
        .await
        .unwrap();
    assert_ne!(a, b);
}

#[tokio::test]
async fn a_callback_url_that_is_not_http_is_rejected() {
    let provider = SimulatedVideoProvider::new();
    let err = provider
        .submit(&request("a", "not a url".into()))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        credit_domain::ports::ProviderError::Rejected(_)
    ));
}
