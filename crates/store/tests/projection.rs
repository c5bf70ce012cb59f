//! Crash safety of the projections: whatever happens between an append and its projection
//! (the process dies, the projector's connection is killed mid-batch, two projectors race),
//! the read tables end up equal to a replay of the journal, with no event missing and none
//! applied twice.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use credit_store::projector::{self, Interrupt};
use credit_store::Projector;
use tokio::sync::Notify;

/// A projector as a freshly started process would have: its own pool, no wake-ups.
fn fresh_projector(env: &Env) -> Projector {
    let pool = credit_store::db::read_pool(&env.test.url, 4).unwrap();
    Projector::new(pool, Arc::new(Notify::new()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_between_append_and_projection_loses_nothing() {
    let env = env().await;
    // The projector never runs while the events are appended: as if the process died
    // right after each commit, before its projection.
    populate(&env, 30, 12).await;
    let client = env.test.client().await;
    let events = count(&client, "SELECT count(*) FROM events").await;
    assert_eq!(count(&client, "SELECT count(*) FROM users").await, 0);
    assert_eq!(
        count(&client, "SELECT count(*) FROM projection_outbox").await,
        events,
        "every append left its outbox row"
    );
    let report = env.audit().await;
    assert!(
        report.ok,
        "pending accounts are not discrepancies: {report:?}"
    );
    assert_eq!(report.accounts_pending_projection, 30);

    // The restarted process.
    let applied = fresh_projector(&env).drain().await.unwrap();
    assert_eq!(applied as i64, events);
    assert_projection_matches_journal(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn projection_interrupted_before_commit_is_redone_exactly_once() {
    let env = env().await;
    populate(&env, 10, 6).await;
    env.projector.drain().await.unwrap();
    let client = env.test.client().await;
    let projected = dump(&client).await;

    // More events, then a batch that writes everything and dies before its commit.
    let more = account_ids(10);
    for id in &more {
        env.run(&user(id), deduct(&format!("{id}-late")))
            .await
            .unwrap();
    }
    let pending = count(&client, "SELECT count(*) FROM projection_outbox").await;
    assert_eq!(pending, 10);
    let err = env
        .projector
        .run_batch(Some(Interrupt::BeforeCommit))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("interrupted"), "{err:#}");
    assert_eq!(
        dump(&client).await,
        projected,
        "nothing of the batch is visible"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM projection_outbox").await,
        pending,
        "the outbox rows are still there"
    );

    // Restart: everything applied, once.
    assert_eq!(fresh_projector(&env).drain().await.unwrap(), 10);
    assert_projection_matches_journal(&env).await;
    assert_eq!(fresh_projector(&env).drain().await.unwrap(), 0);
}

/// Runs one projection batch while `lock_sql` (run first, in another transaction) holds a
/// lock that makes the batch block on a statement starting with `blocked_on`; kills the
/// projector's backend there, as a crash of its process or connection would.
async fn kill_projector_blocked_on(env: &Env, lock_sql: &str, blocked_on: &str) {
    let mut holder = env.test.client().await;
    let lock = holder.transaction().await.unwrap();
    lock.batch_execute(lock_sql).await.unwrap();

    let victim = fresh_projector(env);
    let batch = tokio::spawn(async move { victim.run_batch(None).await });

    let admin = env.test.client().await;
    // A batch that blocks elsewhere (its statements' text changed, say) fails the test
    // rather than hanging it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let pid: i32 = loop {
        let row = admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'
                    AND query LIKE $1",
                &[&format!("{blocked_on}%")],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            break row.get(0);
        }
        assert!(!batch.is_finished(), "the batch did not block");
        assert!(
            tokio::time::Instant::now() < deadline,
            "no projector backend waits on a lock in a statement starting with {blocked_on:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let killed: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    let result = tokio::time::timeout(Duration::from_secs(10), batch)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_err(), "the killed batch cannot have committed");
    lock.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn projector_killed_mid_batch_then_restarted_applies_each_event_once() {
    let env = env().await;
    populate(&env, 8, 3).await;
    env.projector.drain().await.unwrap();
    let client = env.test.client().await;

    // Round 1: the worst moment. Every read-table write and the checkpoints are done, the
    // batch waits to delete its outbox rows (the holder's SHARE lock admits the batch's
    // row locks but not its DELETE) and is killed there.
    populate_more(&env, "a").await;
    let before = dump(&client).await;
    let pending = count(&client, "SELECT count(*) FROM projection_outbox").await;
    kill_projector_blocked_on(
        &env,
        "LOCK TABLE projection_outbox IN SHARE MODE",
        "DELETE FROM projection_outbox",
    )
    .await;
    assert_eq!(
        dump(&client).await,
        before,
        "the killed batch left no trace"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM projection_outbox").await,
        pending
    );

    // Round 2: killed in the middle of the writes (some rows written, the rest queued
    // behind a lock on video_tasks).
    populate_more(&env, "b").await;
    let pending = count(&client, "SELECT count(*) FROM projection_outbox").await;
    kill_projector_blocked_on(
        &env,
        "LOCK TABLE video_tasks IN SHARE MODE",
        "INSERT INTO video_tasks",
    )
    .await;
    assert_eq!(dump(&client).await, before);
    assert_eq!(
        count(&client, "SELECT count(*) FROM projection_outbox").await,
        pending
    );

    // Restart and drain: each event exactly once.
    let applied = fresh_projector(&env).drain().await.unwrap();
    assert_eq!(applied as i64, pending);
    assert_projection_matches_journal(&env).await;
    let projected = dump(&client).await;
    projector::rebuild(&fresh_projector(&env)).await.unwrap();
    assert_eq!(
        dump(&client).await,
        projected,
        "equal to a replay from scratch"
    );
}

/// A deduction on every account (and one more task per account, failed and refunded).
async fn populate_more(env: &Env, tag: &str) {
    for id in account_ids(8) {
        let account = user(&id);
        let task = format!("{id}-{tag}");
        env.run(&account, deduct(&task)).await.unwrap();
        env.run(&account, fail(&task)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_concurrent_projectors_give_the_same_tables_as_one() {
    let env = env().await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // Two projectors (two processes' worth) run while the events are appended, each woken
    // by its own notifications and sweeps.
    let first = tokio::spawn(fresh_projector(&env).run(stopped.clone()));
    let second = tokio::spawn(fresh_projector(&env).run(stopped));
    populate(&env, 40, 9).await;
    let client = env.test.client().await;
    tokio::time::timeout(Duration::from_secs(30), async {
        while count(&client, "SELECT count(*) FROM projection_outbox").await > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    stop.send(true).unwrap();
    first.await.unwrap();
    second.await.unwrap();

    assert_projection_matches_journal(&env).await;
    let concurrent = dump(&client).await;
    projector::rebuild(&fresh_projector(&env)).await.unwrap();
    assert_eq!(dump(&client).await, concurrent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_restores_tampered_tables() {
    let env = env().await;
    populate(&env, 12, 6).await;
    env.projector.drain().await.unwrap();
    let client = env.test.client().await;
    let projected = dump(&client).await;

    client
        .batch_execute(
            "UPDATE users SET credits = credits + 500 WHERE id = 'user-001';
             DELETE FROM consumption_records WHERE id = 'user-002-t1';
             UPDATE recharge_records SET status = 'failed' WHERE id = 'user-003-r1';
             UPDATE video_tasks SET status = 'succeeded' WHERE id = 'user-004-t2';
             DELETE FROM users WHERE id = 'user-005';
             INSERT INTO users (id, credits) VALUES ('intruder', 1000000);",
        )
        .await
        .unwrap();
    assert!(!env.audit().await.ok);

    let applied = projector::rebuild(&fresh_projector(&env)).await.unwrap();
    assert_eq!(
        applied as i64,
        count(&client, "SELECT count(*) FROM events").await
    );
    assert_eq!(dump(&client).await, projected);
    assert_projection_matches_journal(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_longer_than_a_batch_is_applied_and_cleared_by_one_batch() {
    let env = env().await;
    // A small account first (its outbox rows come first), then one with more events than a
    // batch takes rows.
    let small = user("user-small");
    env.recharge(&small, "small-r1", 1_000).await;
    let big = user("user-backlog");
    env.recharge(&big, "big-r1", 20_000).await;
    let tasks = projector::BATCH as usize + 100;
    for t in 0..tasks {
        env.run(&big, deduct(&format!("big-t{t}"))).await.unwrap();
    }
    let client = env.test.client().await;
    let events = count(&client, "SELECT count(*) FROM events").await;
    assert_eq!(events, 4 + tasks as i64);

    // One batch takes `BATCH` outbox rows, reads every event of both accounts past their
    // checkpoints, and clears the rows it did not take but applied (fails if only the rows
    // taken were deleted: about a hundred would be left for later batches).
    let taken = fresh_projector(&env).run_batch(None).await.unwrap();
    assert_eq!(taken, projector::BATCH as u64);
    assert_eq!(
        count(&client, "SELECT count(*) FROM projection_outbox").await,
        0,
        "rows applied by the batch are not left in the outbox"
    );
    assert_eq!(
        count(
            &client,
            "SELECT last_sequence FROM users WHERE id = 'user-backlog'"
        )
        .await,
        2 + tasks as i64
    );
    assert_projection_matches_journal(&env).await;
}

/// A batch's one statement on `users` creates the checkpoints its accounts lack and locks
/// every checkpoint of the batch, old and new, until it ends: another projector can neither
/// lock an existing one (so never applies the same events at the same time) nor create a
/// new one twice; and it changes nothing in an existing row.
#[tokio::test]
async fn a_batch_locks_the_checkpoints_of_its_accounts_old_and_new() {
    let env = env().await;
    populate(&env, 1, 2).await;
    env.projector.drain().await.unwrap();
    let before = dump(&*env.test.client().await).await;
    let [_, lock, _, _, _] = projector::batch_statements();

    let mut batch = env.test.client().await;
    let tx = batch.transaction().await.unwrap();
    let accounts = vec!["user-000", "user-new"];
    assert_eq!(tx.execute(lock, &[&accounts]).await.unwrap(), 1);

    let other = env.test.client().await;
    other
        .batch_execute("SET lock_timeout = '200ms'")
        .await
        .unwrap();
    for (sql, account) in [
        ("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", "user-000"),
        (
            "INSERT INTO users (id) VALUES ($1) ON CONFLICT DO NOTHING",
            "user-new",
        ),
    ] {
        let held = other.execute(sql, &[&account]).await.unwrap_err();
        assert_eq!(
            held.code(),
            Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE),
            "{account}: {held}"
        );
    }
    tx.commit().await.unwrap();
    other
        .execute(
            "SELECT 1 FROM users WHERE id = 'user-000' FOR UPDATE NOWAIT",
            &[],
        )
        .await
        .unwrap();
    // The new checkpoint is there (at sequence 0); every other row is as it was.
    let mut after = dump(&other).await;
    let new = after
        .iter()
        .position(|r| r.contains("\"user-new\""))
        .unwrap();
    assert!(after.remove(new).contains("\"last_sequence\": 0"));
    assert_eq!(after, before);
}

/// A batch never deletes an outbox row whose event it did not apply. Every row taken is an
/// event committed before the batch, so the batch's read must reach it (or find the
/// checkpoint already past it); when it does not (here, a row for an event the journal does
/// not hold), the batch fails and rolls back, leaving the rows and the read tables as they
/// were, instead of committing a hole in the read tables that only a rebuild would mend.
/// Fails if a batch commits whatever its read returned.
#[tokio::test]
async fn a_batch_that_cannot_read_an_event_it_took_deletes_nothing() {
    let env = env().await;
    populate(&env, 2, 1).await;
    let client = env.test.client().await;
    client
        .batch_execute(
            "INSERT INTO projection_outbox (aggregate_id, sequence) VALUES ('user-001', 99)",
        )
        .await
        .unwrap();
    let pending = count(&client, "SELECT count(*) FROM projection_outbox").await;

    let error = fresh_projector(&env).run_batch(None).await.unwrap_err();
    assert!(
        format!("{error:#}").contains("user-001 has an outbox row for event 99"),
        "{error:#}"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM projection_outbox").await,
        pending
    );
    assert_eq!(count(&client, "SELECT count(*) FROM users").await, 0);

    // Once the stray row is gone, the same batch applies everything.
    client
        .batch_execute("DELETE FROM projection_outbox WHERE sequence = 99")
        .await
        .unwrap();
    fresh_projector(&env).drain().await.unwrap();
    assert_projection_matches_journal(&env).await;
}

/// Every insert into the journal, by whoever, leaves one outbox row per event in the order
/// of the events' `position` (migration 0011 writes them once per statement, from its
/// transition table), and a statement that fails leaves none.
#[tokio::test]
async fn each_appended_event_gets_one_outbox_row_in_append_order() {
    let env = env().await;
    let client = env.test.client().await;
    let insert = "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                      event_version, payload, metadata)
                  SELECT 'CreditAccount', a, s, 'X', '1.0', '{}', '{}'
                    FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS r(a, s, n)
                   ORDER BY n";
    let accounts = vec!["user-b", "user-a", "user-b", "user-c", "user-a"];
    let sequences: Vec<i64> = vec![1, 1, 2, 1, 2];
    client
        .execute(insert, &[&accounts, &sequences])
        .await
        .unwrap();
    // The second statement repeats user-c's first event: it fails, and writes nothing.
    let again = vec!["user-d", "user-c"];
    let first: Vec<i64> = vec![1, 1];
    client.execute(insert, &[&again, &first]).await.unwrap_err();

    let order = |sql: &'static str| {
        let client = &client;
        async move {
            client
                .query(sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
                .collect::<Vec<_>>()
        }
    };
    let journal = order("SELECT aggregate_id, sequence FROM events ORDER BY position").await;
    let outbox = order("SELECT aggregate_id, sequence FROM projection_outbox ORDER BY id").await;
    assert_eq!(journal.len(), 5);
    assert_eq!(outbox, journal);
}

/// A batch's lock of the checkpoints reaches the server before its read of the events,
/// whatever its connection has cached. Here the connection has prepared only the read (as
/// any earlier use of that one statement would leave it): were each statement prepared
/// and sent on its own, the cached read would be sent at once and run before the lock had
/// created the new accounts' checkpoints, and so read nothing. Fails if the batch sends a
/// statement before both are prepared.
#[tokio::test]
async fn a_batch_locks_before_it_reads_when_only_the_read_is_cached() {
    let env = env().await;
    populate(&env, 3, 2).await;
    // One connection, so the batch runs on the one whose cache is primed here.
    let pool = credit_store::db::read_pool(&env.test.url, 1).unwrap();
    let [_, _, _, _, read] = projector::batch_statements();
    pool.get()
        .await
        .unwrap()
        .prepare_cached(read)
        .await
        .unwrap();

    let projector = Projector::new(pool, Arc::new(Notify::new()));
    projector.run_batch(None).await.unwrap();
    assert_projection_matches_journal(&env).await;
}
