//! Faults survived (issue 11): the read pool exhausted by slow queries; PostgreSQL restarted
//! under load; a write whose connection breaks before or after its commit; two instances on
//! one database. Requests get a 503 that tells "not done" (`database_unavailable`) from
//! "unknown" (`outcome_unknown`), within their timeout (never a 500, never a hang); nothing
//! acknowledged is lost, nothing is half-written or applied twice, and the service recovers
//! by itself.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use credit_testkit::cut_proxy::CutProxy;
use credit_testkit::db::server_url;
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
/// audit is clean. Every write is keyed: one answered `database_unavailable` is not in the
/// journal; one answered `outcome_unknown`, sent again with its key, is then done exactly
/// once.
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
            let u = u.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let sent = Instant::now();
                    let reason = format!("load {u} {n}");
                    let (status, body) = keyed_adjustment(&http, &url, &reason, &reason).await;
                    answers.push((status, body, reason, sent, sent.elapsed()));
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
    let mut not_done = Vec::new();
    let mut unknown = Vec::new();
    // Requests sent while the server restarted and its backends were terminated.
    let mut during = 0;
    for worker in workers {
        for (status, body, reason, sent, took) in worker.await.unwrap() {
            if sent >= outage && sent <= recovered {
                during += 1;
            }
            assert!(
                took < Duration::from_secs(11),
                "{status} after {took:?}: {body}"
            );
            match (status, body["error"]["code"].as_str()) {
                (201, _) => acknowledged.push(reason),
                (503, Some("database_unavailable")) => not_done.push(reason),
                (503, Some("outcome_unknown")) => unknown.push(reason),
                _ => panic!("{status}: {body}"),
            }
        }
    }
    let refused = not_done.len() + unknown.len();
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

    // An unknown outcome, sent again with its key, is done (once: counted below).
    for reason in &unknown {
        let u = reason.split(' ').nth(1).unwrap();
        let url = app.url(&format!("/api/admin/accounts/{u}/adjustments"));
        let (status, body) = keyed_adjustment(&http, &url, reason, reason).await;
        assert!(status == 200 || status == 201, "{status}: {body}");
    }
    // Every acknowledged command is in the journal once; nothing answered "not done" is.
    let journal = adjustment_reasons(&app).await;
    for reason in acknowledged.iter().chain(&unknown) {
        assert_eq!(
            journal.get(reason),
            Some(&1),
            "{reason} is not in the journal once"
        );
    }
    for reason in &not_done {
        assert_eq!(journal.get(reason), None, "{reason} was answered not done");
    }
    eprintln!(
        "restart: {} acknowledged, {} not done, {} unknown then retried",
        acknowledged.len(),
        not_done.len(),
        unknown.len()
    );
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

/// Sends a keyed admin adjustment of 1 credit to `url` (a 5xx is a possible answer here, so
/// this is not `TestApp::send`): its status and body.
async fn keyed_adjustment(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    reason: &str,
) -> (u16, serde_json::Value) {
    let sent = Instant::now();
    let r = http
        .post(url)
        .bearer_auth(ADMIN_TOKEN)
        .header("idempotency-key", key)
        .json(&json!({ "credits": 1, "reason": reason }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("no answer after {:?}: {e}", sent.elapsed()));
    let status = r.status().as_u16();
    if status == 503 {
        assert_eq!(r.headers()["retry-after"], "1");
    }
    (status, r.json().await.unwrap_or_default())
}

/// How many times each adjustment reason is in the journal.
async fn adjustment_reasons(app: &TestApp) -> std::collections::HashMap<String, i64> {
    let client = app.db.client().await;
    client
        .query(
            "SELECT payload->'CreditsAdjusted'->>'reason', count(*) FROM events
              WHERE event_type = 'CreditsAdjusted' GROUP BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The journal held up (maintenance holding `events` locked, as a stuck migration or a long
/// `VACUUM FULL` would): writes are answered 503 within their deadline, never hang; those
/// answered `database_unavailable` wrote nothing; once the lock is gone the service recovers,
/// and each write sent again with its key is done exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_up_journal_answers_writes_503_in_time_and_recovers() {
    let app = TestApp::spawn().await;
    let users: Vec<String> = (0..3).map(|i| user(&format!("held{i}"))).collect();
    for u in &users {
        app.grant(u, 100).await;
    }
    let mut blocker = app.db.client().await;
    let lock = blocker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    let sent = Instant::now();
    let writes: Vec<_> = users
        .iter()
        .flat_map(|u| [(u.clone(), 1), (u.clone(), 2)])
        .map(|(u, n)| {
            let http = app.http.clone();
            let url = app.url(&format!("/api/admin/accounts/{u}/adjustments"));
            let reason = format!("held {u} {n}");
            tokio::spawn(async move {
                let (status, body) = keyed_adjustment(&http, &url, &reason, &reason).await;
                (status, body, reason, url, sent.elapsed())
            })
        })
        .collect();
    let mut answers = Vec::new();
    for write in writes {
        let answer = tokio::time::timeout(Duration::from_secs(15), write)
            .await
            .expect("a write hung while the journal was held up")
            .unwrap();
        answers.push(answer);
    }
    lock.rollback().await.unwrap();

    // The write statement timeout (4 s) ends the blocked appends, and their fences say "not
    // done", well before the 10 s after which a command is "unknown".
    assert!(
        answers
            .iter()
            .any(|(_, body, ..)| body["error"]["code"] == "database_unavailable"),
        "no write was answered not done: {answers:?}"
    );
    let journal = adjustment_reasons(&app).await;
    for (status, body, reason, _, took) in &answers {
        assert_eq!(*status, 503, "{body}");
        assert!(took < &Duration::from_secs(11), "answered after {took:?}");
        match body["error"]["code"].as_str() {
            Some("database_unavailable") => {
                assert_eq!(journal.get(reason), None, "{reason} was answered not done")
            }
            Some("outcome_unknown") => {}
            _ => panic!("{body}"),
        }
    }
    // Recovered by itself: each write, sent again with its key, is done once.
    for (_, _, reason, url, _) in &answers {
        let (status, body) = keyed_adjustment(&app.http, url, reason, reason).await;
        assert!(status == 200 || status == 201, "{status}: {body}");
    }
    let journal = adjustment_reasons(&app).await;
    for (_, _, reason, _, _) in &answers {
        assert_eq!(journal.get(reason), Some(&1), "{reason}");
    }
    app.stop().await;
}

/// A write whose answer is lost after its commit (the connection cut once the statement is
/// sent, as a network failure would): the service learns from the journal's fence that it
/// committed and answers it done; the retry with its key finds it; it is in the journal once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_answer_is_lost_after_its_commit_is_answered_done() {
    let (proxy, app, u, url) = behind_cut_proxy("lost-answer").await;

    proxy.cut_after("answer-lost-after-commit", Duration::ZERO);
    let (status, first) =
        keyed_adjustment(&app.http, &url, "lost-1", "answer-lost-after-commit").await;
    assert_eq!(proxy.cuts(), 1, "the append's connection was not cut");
    assert_eq!(status, 201, "{first}");

    let (status, again) =
        keyed_adjustment(&app.http, &url, "lost-1", "answer-lost-after-commit").await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["adjustment_id"], first["adjustment_id"]);
    done_once(app, &u, "answer-lost-after-commit").await;
}

/// A service on the test server through a `CutProxy`, and a user with 100 credits and the
/// URL of their adjustments.
async fn behind_cut_proxy(name: &str) -> (CutProxy, TestApp, String, String) {
    let proxy = CutProxy::start(&server_url()).await.unwrap();
    let app = TestApp::spawn_on(&proxy.url(&server_url()), &[]).await;
    let u = user(name);
    let url = app.url(&format!("/api/admin/accounts/{u}/adjustments"));
    app.grant(&u, 100).await;
    (proxy, app, u, url)
}

/// The 1-credit adjustment `reason` is in the journal once, and shows in the balance.
async fn done_once(app: TestApp, u: &str, reason: &str) {
    let journal = adjustment_reasons(&app).await;
    assert_eq!(journal.get(reason), Some(&1));
    let token = app.token(u);
    app.wait_for_balance(&token, 101).await;
    app.stop().await;
}

/// A write whose answer is lost after its commit while the database stays unreachable: the
/// service cannot learn the outcome and says so (503 `outcome_unknown`, within seconds);
/// sent again with its key once the database is back, it is found done, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_outcome_cannot_be_learned_is_unknown_and_its_retry_finds_it() {
    let (proxy, app, u, url) = behind_cut_proxy("unknown-outcome").await;

    let down = Duration::from_secs(5);
    proxy.cut_after("outcome-unknown", down);
    let sent = Instant::now();
    let (status, body) = keyed_adjustment(&app.http, &url, "unknown-1", "outcome-unknown").await;
    assert_eq!(proxy.cuts(), 1, "the append's connection was not cut");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("outcome_unknown")),
        "{body}"
    );
    assert!(sent.elapsed() < down, "answered after {:?}", sent.elapsed());

    tokio::time::sleep(down.saturating_sub(sent.elapsed())).await;
    wait_for("the database reachable again", || {
        let http = app.http.clone();
        let url = url.clone();
        async move {
            let (status, body) =
                keyed_adjustment(&http, &url, "unknown-1", "outcome-unknown").await;
            match status {
                200 => Some(body),
                503 => None,
                other => panic!("{other}: {body}"),
            }
        }
    })
    .await;
    done_once(app, &u, "outcome-unknown").await;
}

/// A write whose server process dies before its commit (it terminates itself from a trigger,
/// as an administrator's `pg_terminate_backend` or a crash would): answered 503
/// `database_unavailable` ("not done"), and indeed nothing is in the journal; sent again
/// with its key once the cause is gone, it is done once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_connection_dies_before_its_commit_is_answered_not_done() {
    let app = TestApp::spawn().await;
    let u = user("dies-before-commit");
    let url = app.url(&format!("/api/admin/accounts/{u}/adjustments"));
    app.grant(&u, 100).await;
    app.db
        .client()
        .await
        .batch_execute(
            "CREATE FUNCTION die_before_commit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.payload::text LIKE '%die-before-commit%' THEN
                     PERFORM pg_terminate_backend(pg_backend_pid());
                     PERFORM pg_sleep(1);
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER die_before_commit AFTER INSERT ON events
                 FOR EACH ROW EXECUTE FUNCTION die_before_commit();",
        )
        .await
        .unwrap();
    let events = app.event_count().await;

    let (status, body) = keyed_adjustment(&app.http, &url, "dies-1", "die-before-commit").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("database_unavailable")),
        "{body}"
    );
    assert_eq!(
        app.event_count().await,
        events,
        "a write answered not done was written"
    );

    app.db
        .client()
        .await
        .batch_execute("DROP TRIGGER die_before_commit ON events")
        .await
        .unwrap();
    let (status, body) = keyed_adjustment(&app.http, &url, "dies-1", "die-before-commit").await;
    assert_eq!(status, 201, "{body}");
    let journal = adjustment_reasons(&app).await;
    assert_eq!(journal.get("die-before-commit"), Some(&1));
    app.stop().await;
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
