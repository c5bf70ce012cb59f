//! Faults survived (issue 11): the read pool exhausted by slow queries. Requests that find no
//! connection get a 503 within the pool's wait (never a 500, never a hang), nothing is
//! half-written, and the service recovers by itself once the queries finish.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

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
                            (status, body, sent, sent.elapsed())
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
    let outage = Instant::now();
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
    let recovered = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut acknowledged = Vec::new();
    let mut refused = 0;
    // Requests sent while the server restarted and its backends were terminated.
    let mut during = 0;
    for worker in workers {
        for (status, body, sent, took) in worker.await.unwrap() {
            if sent >= outage && sent <= recovered {
                during += 1;
            }
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
    // (Requests may ride out the restart: the pools wait for the server to come back. Those
    // that fail are counted in `refused` and checked above.)
    assert!(
        during > 0,
        "no request was sent during the outage ({refused} refused): not under load"
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

/// Two instances of the service on one database, as two processes would be (each with its own
/// pools, per-account queue, projector and jobs), under concurrent load on the same accounts:
/// grants through both, one keyed adjustment sent to both, a Stripe completion delivered four
/// times across both, generates through both, and each callback delivered four times across
/// both. Balances are exact, nothing is applied twice, and the audit is clean on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_database_stay_exact_under_concurrent_load() {
    let a = TestApp::spawn().await;
    let b = a.spawn_sibling().await;
    let users: Vec<String> = (0..3).map(|i| user(&format!("twin{i}"))).collect();

    let flows = users.iter().map(|u| {
        let (a, b) = (&a, &b);
        async move {
            let token = a.token(u);
            let (ga, gb, ka, kb) = tokio::join!(
                a.adjust(u, 1000, "through a"),
                b.adjust(u, 500, "through b"),
                keyed_gift(a, u),
                keyed_gift(b, u)
            );
            ga.expect(201);
            gb.expect(201);
            let mut keyed_statuses = [ka.status, kb.status];
            keyed_statuses.sort();
            assert_eq!(keyed_statuses, [200, 201], "{} / {}", ka.text, kb.text);

            let r = a.post_recharge(&token, json!({ "amount": 10 })).await;
            r.expect(201);
            let event = completed_event(&r.str("recharge_id"), u, 1000, "paid");
            let deliveries = tokio::join!(
                a.send_event(&event),
                b.send_event(&event),
                a.send_event(&event),
                b.send_event(&event)
            );
            for d in [deliveries.0, deliveries.1, deliveries.2, deliveries.3] {
                d.expect(200);
            }

            let generated = futures::future::join_all((0..6).map(|i| {
                let app = if i % 2 == 0 { a } else { b };
                let token = token.clone();
                async move {
                    let r = app
                        .generate(&token, json!({ "prompt": format!("twin {i}") }))
                        .await;
                    r.expect(202);
                    r.str("task_id")
                }
            }))
            .await;
            for (i, task) in generated.iter().enumerate() {
                let pid = a.provider_id(&token, task).await;
                let result = if i % 2 == 1 {
                    fake_grsai::failed_result(&pid, "error", "x")
                } else {
                    fake_grsai::succeeded_result(&pid, "https://v/ok.mp4")
                };
                // The URL names the instance that submitted the task; deliver to both.
                let url = a.callback_url(task);
                let (_, path) = url.split_once("/api/").unwrap();
                let via_a = a.url(&format!("/api/{path}"));
                let via_b = b.url(&format!("/api/{path}"));
                let statuses = tokio::join!(
                    fake_grsai::deliver(&via_a, &result),
                    fake_grsai::deliver(&via_b, &result),
                    fake_grsai::deliver(&via_a, &result),
                    fake_grsai::deliver(&via_b, &result)
                );
                for s in [statuses.0, statuses.1, statuses.2, statuses.3] {
                    assert_eq!(s.as_u16(), 200, "callback for {task}");
                }
            }
            // 1,000 + 500 + 7 granted, 1,000 recharged, 6 × 10 spent, 3 × 10 refunded.
            let expected = 1000 + 500 + 7 + 1000 - 60 + 30;
            a.wait_for_balance(&token, expected).await;
            b.wait_for_balance(&token, expected).await;
            for (event, n) in [
                ("CreditsAdjusted", 3),
                ("RechargeCompleted", 1),
                ("CreditsDeducted", 6),
                ("CreditsRefunded", 3),
                ("VideoSucceeded", 3),
            ] {
                assert_eq!(a.events_of(u, event).await, n, "{u} {event}");
            }
        }
    });
    futures::future::join_all(flows).await;

    a.wait_projected().await;
    for app in [&a, &b] {
        let audit = app.admin_get("/api/admin/audit").await;
        assert_eq!(audit.body["ok"], true, "{}", audit.text);
    }
    b.stop().await;
    a.stop().await;
}

/// An adjustment of 7 credits under the Idempotency-Key `gift-<user>`.
async fn keyed_gift(app: &TestApp, u: &str) -> Resp {
    let key = format!("gift-{u}");
    app.send(
        reqwest::Method::POST,
        &format!("/api/admin/accounts/{u}/adjustments"),
        Some(ADMIN_TOKEN),
        &[
            ("content-type", "application/json"),
            ("idempotency-key", &key),
        ],
        Some(json!({ "credits": 7, "reason": "gift" }).to_string()),
    )
    .await
}
