//! What operators watch: request ids (header, error bodies, event metadata).

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};

async fn request(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    request_id: Option<&str>,
    body: Option<Value>,
) -> (u16, Option<String>, Value) {
    let mut req = app.http.request(method, app.url(path));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(id) = request_id {
        req = req.header("x-request-id", id);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let id = r
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = r.json().await.unwrap_or(Value::Null);
    (status, id, body)
}

#[tokio::test]
async fn a_valid_incoming_request_id_is_answered_and_kept_in_event_metadata() {
    let app = TestApp::spawn().await;
    let u = user("rid");
    let token = app.token(&u);
    let id = "edge-7f3a.c1:hop/2_x";

    let (status, header, body) = request(
        &app,
        reqwest::Method::POST,
        "/api/recharge",
        Some(&token),
        Some(id),
        Some(json!({"amount": 10})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(header.as_deref(), Some(id));
    let client = app.db.client().await;
    let metadata: Value = client
        .query_one(
            "SELECT metadata FROM events WHERE aggregate_id = $1 AND event_type = 'RechargeRequested'",
            &[&u],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(metadata["request_id"], id);

    // Error answers carry it in the body too.
    let (status, header, body) = request(
        &app,
        reqwest::Method::POST,
        "/api/video/generate",
        None,
        Some(id),
        Some(json!({"prompt": "x"})),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(header.as_deref(), Some(id));
    assert_eq!(body["error"]["request_id"], id);
    assert_eq!(body["error"]["code"], "missing_token");
}

#[tokio::test]
async fn a_missing_or_unacceptable_request_id_is_replaced_by_a_new_one() {
    let app = TestApp::spawn().await;
    let long = "x".repeat(129);
    for incoming in [None, Some("has space"), Some(long.as_str()), Some("a\"b")] {
        let (status, header, body) = request(
            &app,
            reqwest::Method::GET,
            "/api/stats",
            None,
            incoming,
            None,
        )
        .await;
        assert_eq!(status, 401);
        let header = header.unwrap_or_else(|| panic!("no X-Request-Id for {incoming:?}"));
        assert!(uuid::Uuid::parse_str(&header).is_ok(), "{header}");
        assert_eq!(body["error"]["request_id"], header.as_str());
        let (status, again, _) =
            request(&app, reqwest::Method::GET, "/healthz", None, incoming, None).await;
        assert_eq!(status, 200);
        assert_ne!(again, Some(header), "each request gets its own id");
    }
    // Errors made by the framework's extractors (bad JSON) and unknown routes too.
    let token = app.token(&user("rid2"));
    let r = app
        .post_raw("/api/video/generate", Some(&token), "{not json")
        .await;
    assert!(r.body["error"]["request_id"].is_string(), "{}", r.text);
    let r = app.get("/no/such/route", None).await;
    assert!(r.body["error"]["request_id"].is_string(), "{}", r.text);
}
