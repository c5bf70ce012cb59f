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

/// PostgreSQL restarted under load (`pg_ctl restart -m fast`, then every backend terminated),
/// on a private server of this test's own: no request hangs, the outage is answered quickly,
/// the service recovers by itself, every acknowledged command is in the journal, and the
/// audit is clean.
///
/// Not yet promised (issue 11, open): a write whose connection breaks is answered 500
/// `internal_error`, whether or not its commit happened; telling "not done" (503) from
/// "unknown" needs the executor to report which. Reads answer 503 `database_unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_recovers_and_keeps_every_acknowledged_command() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let pg = Arc::new(credit_testkit::postgres::PrivatePostgres::start().unwrap());
    let app = TestApp::spawn_on(&pg.url("postgres"), &[]).await;
    let users: Vec<String> = (0..4).map(|i| user(&format!("load{i}"))).collect();
    for u in &users {
        app.grant(u, 1_000).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let workers: Vec<_> = users
        .iter()
        .map(|u| {
            let (stop, http) = (stop.clone(), http.clone());
            let url = app.url(&format!("/api/admin/accounts/{u}/adjustments"));
            tokio::spawn(async move {
                let mut answers = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let sent = Instant::now();
                    let r = http
                        .post(&url)
                        .bearer_auth(ADMIN_TOKEN)
                        .json(&serde_json::json!({ "credits": 1, "reason": format!("load {n}") }))
                        .send()
                        .await;
                    let answer = match r {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let body: serde_json::Value = r.json().await.unwrap_or_default();
                            (status, body, sent.elapsed())
                        }
                        Err(e) => panic!("no answer after {:?}: {e}", sent.elapsed()),
                    };
                    answers.push(answer);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                answers
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(700)).await;
    let restarting = pg.clone();
    tokio::task::spawn_blocking(move || restarting.restart())
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Then every backend of the service terminated under it, as a failover would.
    {
        let (client, connection) =
            tokio_postgres::connect(&pg.url("postgres"), tokio_postgres::NoTls)
                .await
                .unwrap();
        let conn = tokio::spawn(connection);
        client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
                &[],
            )
            .await
            .unwrap();
        drop(client);
        let _ = conn.await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for worker in workers {
        for (status, body, took) in worker.await.unwrap() {
            assert!(
                took < Duration::from_secs(11),
                "{status} after {took:?}: {body}"
            );
            match status {
                201 => acknowledged.push(body["adjustment_id"].as_str().unwrap().to_owned()),
                503 => {
                    assert_eq!(body["error"]["code"], "database_unavailable", "{body}");
                    refused += 1;
                }
                // See the note above: a write that failed mid-way is still a 500.
                500 => {
                    assert_eq!(body["error"]["code"], "internal_error", "{body}");
                    refused += 1;
                }
                other => panic!("{other}: {body}"),
            }
        }
    }
    assert!(
        acknowledged.len() > 20,
        "too little load: {}",
        acknowledged.len()
    );
    assert!(
        refused > 0,
        "the restart went unnoticed: was it under load?"
    );

    // Recovered by itself: a new command goes through.
    wait_for("a command after the restart", || {
        let http = http.clone();
        let url = app.url(&format!("/api/admin/accounts/{}/adjustments", users[0]));
        async move {
            let r = http
                .post(url)
                .bearer_auth(ADMIN_TOKEN)
                .json(&serde_json::json!({ "credits": 1, "reason": "after" }))
                .send()
                .await
                .ok()?;
            (r.status().as_u16() == 201).then_some(())
        }
    })
    .await;

    // Every acknowledged command is in the journal.
    let client = app.db.client().await;
    let journal: std::collections::HashSet<String> = client
        .query(
            "SELECT payload->'CreditsAdjusted'->>'adjustment_id' FROM events
              WHERE event_type = 'CreditsAdjusted'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for id in &acknowledged {
        assert!(
            journal.contains(id),
            "acknowledged {id} is not in the journal"
        );
    }
    drop(client);
    app.wait_projected().await;
    let audit = app.admin_get("/api/admin/audit").await;
    assert_eq!(audit.body["ok"], true, "{}", audit.text);
    app.stop().await;
}
