//! Faults survived (issue 11): the read pool exhausted by slow queries. Requests that find no
//! connection get a 503 within the pool's wait (never a 500, never a hang), nothing is
//! half-written, and the service recovers by itself once the queries finish.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test]
async fn an_exhausted_read_pool_answers_503_in_time_and_recovers() {
    let app = TestApp::spawn_with(&[("DATABASE_READ_CONNECTIONS", "2")]).await;
    let u = user("starved");
    let token = app.token(&u);
    app.grant(&u, 100).await;
    app.wait_for_balance(&token, 100).await;
    let events = app.event_count().await;

    // A slow query, as a long report or a stuck migration would be: it holds `users`, so
    // every read of a balance waits on it, each holding one of the two pooled connections.
    let mut blocker = app.db.client().await;
    let lock = blocker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    let started = Instant::now();
    let requests = (0..5).map(|_| {
        let http = app.http.clone();
        let url = app.url("/api/stats");
        let token = token.clone();
        tokio::spawn(async move {
            let r = http.get(url).bearer_auth(token).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap(), started.elapsed())
        })
    });
    let requests: Vec<_> = requests.collect();
    // The pool waits 10 s for a connection (crates/store/src/db.rs): by 14 s, every request
    // that found none has had its answer.
    tokio::time::sleep(Duration::from_secs(14)).await;
    lock.rollback().await.unwrap();

    let mut unavailable = 0;
    for request in requests {
        let (status, text, took) = tokio::time::timeout(WAIT, request)
            .await
            .expect("a request hung after the slow query ended")
            .unwrap();
        match status {
            200 => {}
            503 => {
                unavailable += 1;
                assert!(text.contains("\"database_unavailable\""), "{text}");
                assert!(took < Duration::from_secs(13), "503 after {took:?}");
            }
            other => panic!("{other}: {text}"),
        }
    }
    assert!(unavailable >= 1, "no request ran out of connections");

    // Recovered by itself, and nothing was written by the refused requests.
    app.stats(&token).await.expect(200);
    assert_eq!(app.event_count().await, events);
    let audit = app.admin_get("/api/admin/audit").await;
    audit.expect(200);
    assert_eq!(audit.body["ok"], true, "{}", audit.text);
}
