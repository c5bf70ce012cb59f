//! The executor against a real PostgreSQL: concurrency, retries, snapshots.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use credit_domain::{CreditCommand, LedgerError};
use credit_store::ExecuteError;
use futures::future::join_all;
use std::collections::HashMap;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_deductions_on_two_hundred_credits() {
    let env = env().await;
    let alice = user("alice");
    env.recharge(&alice, "r1", 200).await; // 2 yuan = 200 credits

    let mut handles = Vec::new();
    for i in 0..50 {
        let ledger = env.ledger.clone();
        let alice = alice.clone();
        handles.push(tokio::spawn(async move {
            ledger
                .execute(&alice, deduct(&format!("task-{i}")), Default::default())
                .await
        }));
    }
    let (mut ok, mut insufficient, mut other) = (0, 0, Vec::new());
    for h in handles {
        match h.await.unwrap() {
            Ok(_) => ok += 1,
            Err(ExecuteError::Rejected(LedgerError::InsufficientCredits { .. })) => {
                insufficient += 1
            }
            Err(e) => other.push(e.to_string()),
        }
    }
    assert_eq!(
        (ok, insufficient),
        (20, 30),
        "unexpected failures: {other:?}"
    );
    assert!(other.is_empty());

    env.projector.drain().await.unwrap();
    let client = env.test.client().await;
    let credits: i64 = client
        .query_one("SELECT credits FROM users WHERE id = 'alice'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(credits, 0);
    let records: i64 = client
        .query_one(
            "SELECT count(*) FROM consumption_records WHERE user_id = 'alice'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(records, 20);
    let report = env.audit().await;
    assert!(report.ok, "{:?}", report.discrepancies);
}

/// Two executors (two processes' worth) on one account: conflicts are retried, never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_executors_on_one_account_retry_conflicts() {
    let env = env().await;
    let other = std::sync::Arc::new(credit_store::Ledger::new(env.test.db.write.clone()));
    let bob = user("bob");
    env.recharge(&bob, "r1", 1000).await;
    let mut handles = Vec::new();
    for i in 0..40 {
        let ledger = if i % 2 == 0 {
            env.ledger.clone()
        } else {
            other.clone()
        };
        let bob = bob.clone();
        handles.push(tokio::spawn(async move {
            ledger
                .execute(&bob, deduct(&format!("t{i}")), Default::default())
                .await
        }));
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    let (state, seq) = env.ledger.load(&bob).await.unwrap();
    assert_eq!(state.balance(), 1000 - 400);
    assert_eq!(seq, 2 + 40);
}

/// Long histories go through snapshots, including commits of two events across a
/// snapshot boundary, and load back to exactly the replayed state.
#[tokio::test]
async fn snapshots_load_the_same_state_as_a_replay() {
    let env = env().await;
    let carol = user("carol");
    env.recharge(&carol, "r1", 100_000).await;
    // 2 events so far; each task adds 1 (deduct) or 2 (fail + refund) events: 752 in all,
    // past the first snapshot (every 500), with two-event commits around the boundary.
    for i in 0..450 {
        let task = format!("t{i}");
        env.run(&carol, deduct(&task)).await.unwrap();
        if i % 3 == 0 {
            env.run(&carol, fail(&task)).await.unwrap();
        }
    }
    // A fresh executor loads from the snapshot.
    let fresh = credit_store::Ledger::new(env.test.db.write.clone());
    let (loaded, seq) = fresh.load(&carol).await.unwrap();
    let mut replayed = credit_domain::CreditAccount::default();
    let client = env.test.client().await;
    let rows = client
        .query(
            "SELECT payload FROM events WHERE aggregate_id = 'carol' ORDER BY sequence",
            &[],
        )
        .await
        .unwrap();
    for row in &rows {
        let tokio_postgres::types::Json(e): tokio_postgres::types::Json<
            credit_domain::CreditEvent,
        > = row.get(0);
        replayed.apply_event(e);
    }
    assert_eq!(seq, rows.len());
    assert_eq!(loaded, replayed);
    let snapshots: i64 = client
        .query_one("SELECT count(*) FROM snapshots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(snapshots, 1, "a snapshot was written");
    assert_eq!(loaded.balance(), 100_000 - 450 * 10 + 150 * 10);
}

#[tokio::test]
async fn refused_commands_write_nothing() {
    let env = env().await;
    let dave = user("dave");
    let err = env.run(&dave, deduct("t1")).await.unwrap_err();
    assert!(matches!(
        err,
        ExecuteError::Rejected(LedgerError::InsufficientCredits {
            required: 10,
            available: 0
        })
    ));
    let err = env
        .run(
            &dave,
            CreditCommand::CompleteRecharge {
                recharge_id: "nope".into(),
                amount_fen: 100,
                currency: "cny".into(),
                payment_id: "pi".into(),
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        ExecuteError::Rejected(LedgerError::UnknownRecharge { .. })
    ));
    let client = env.test.client().await;
    let n: i64 = client
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

/// State kept in memory by one process may be behind another's appends: a command refused
/// on kept state is decided again on fresh state, and a commit on stale state retries.
#[tokio::test]
async fn kept_state_never_causes_a_wrong_refusal_or_a_lost_write() {
    let env = env().await;
    let other = credit_store::Ledger::new(env.test.db.write.clone());
    let erin = user("erin");
    // This process learns erin's account with 0 credits...
    assert!(env.run(&erin, deduct("t0")).await.is_err());
    // ...another process recharges it...
    other
        .execute(&erin, request("r1", 100), Default::default())
        .await
        .unwrap();
    other
        .execute(
            &erin,
            CreditCommand::CompleteRecharge {
                recharge_id: "r1".into(),
                amount_fen: 100,
                currency: "cny".into(),
                payment_id: "pi".into(),
            },
            Default::default(),
        )
        .await
        .unwrap();
    // ...and this process must see the credits, not refuse on what it remembered.
    let done = env.run(&erin, deduct("t1")).await.unwrap();
    assert_eq!(done.balance, 90);
    // The other process's kept state is now stale too: its commit conflicts and retries.
    let done = other
        .execute(&erin, deduct("t2"), Default::default())
        .await
        .unwrap();
    assert_eq!(done.balance, 80);
    assert_eq!(done.sequence, 4);
}

/// A command runs on its own task: a caller that goes away (an HTTP client disconnecting)
/// cannot cancel it halfway, nor the other callers' commands sharing its batch.
#[tokio::test]
async fn a_command_whose_caller_goes_away_is_still_carried_through() {
    let env = env().await;
    let gina = user("gina");
    env.recharge(&gina, "r1", 100).await;
    let submitted = env.ledger.execute(&gina, deduct("t1"), Default::default());
    // Polled once (the command is handed to its task), then dropped.
    let _ = tokio::time::timeout(std::time::Duration::from_micros(1), submitted).await;
    for _ in 0..100 {
        let (state, _) = env.ledger.load(&gina).await.unwrap();
        if state.task("t1").is_some() {
            assert_eq!(state.balance(), 90);
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the dropped command was never committed");
}

/// Accounts funded with 100 credits each, named `{prefix}-{i}`.
async fn funded(env: &Env, prefix: &str, n: usize) -> Vec<credit_domain::UserId> {
    let accounts: Vec<_> = (0..n).map(|i| user(&format!("{prefix}-{i:02}"))).collect();
    for account in &accounts {
        env.recharge(account, &format!("{account}-r1"), 100).await;
    }
    accounts
}

/// Commands submitted together for different accounts are decided on their own accounts and
/// appended by one transaction. (On this single-threaded runtime, every command is queued
/// before the committer task first runs, so they form one batch.)
#[tokio::test]
async fn commands_of_many_accounts_share_one_commit() {
    let env = env().await;
    let accounts = funded(&env, "many", 20).await;
    let results = join_all(
        accounts
            .iter()
            .map(|a| env.run(a, deduct(&format!("{a}-t1")))),
    )
    .await;
    for (account, result) in accounts.iter().zip(results) {
        let done = result.unwrap();
        assert_eq!((done.balance, done.sequence), (90, 3), "{account}");
        assert_eq!(done.events.len(), 1);
        assert_eq!(done.events[0].aggregate_id, account.as_str());
    }
    let client = env.test.client().await;
    assert_eq!(
        count(
            &client,
            "SELECT count(DISTINCT xmin::text) FROM events WHERE event_type = 'CreditsDeducted'"
        )
        .await,
        1,
        "one transaction for the whole batch"
    );
    env.projector.drain().await.unwrap();
    assert_projection_matches_journal(&env).await;
}

/// A batch in which another process has moved two of the accounts: only those two are
/// decided again, the others' events are appended as decided, and nobody fails.
#[tokio::test]
async fn a_conflict_on_one_account_never_fails_the_others_in_its_batch() {
    let env = env().await;
    let other = credit_store::Ledger::new(env.test.db.write.clone());
    let accounts = funded(&env, "race", 6).await;
    // This process keeps every account's state at sequence 2; another one moves two of them.
    for account in [&accounts[1], &accounts[4]] {
        other
            .execute(account, deduct(&format!("{account}-other")), HashMap::new())
            .await
            .unwrap();
    }
    let results = join_all(
        accounts
            .iter()
            .map(|a| env.run(a, deduct(&format!("{a}-mine")))),
    )
    .await;
    for (i, result) in results.into_iter().enumerate() {
        let done = result.unwrap();
        let moved = i == 1 || i == 4;
        let expected = if moved { (80, 4) } else { (90, 3) };
        assert_eq!((done.balance, done.sequence), expected, "account {i}");
    }
    let client = env.test.client().await;
    assert_eq!(
        count(
            &client,
            "SELECT count(DISTINCT xmin::text) FROM events
              WHERE payload -> 'CreditsDeducted' ->> 'task_id' LIKE '%-mine'"
        )
        .await,
        2,
        "the four others in one commit, the two decided again in another"
    );
    env.projector.drain().await.unwrap();
    assert_projection_matches_journal(&env).await;
}

/// A command whose events the database refuses (jsonb cannot store U+0000; here in its
/// metadata, which the domain never sees) fails alone, with `ExecuteError::Store`: the other
/// commands of its batch, on other accounts and on its own account before and after it, are
/// committed.
#[tokio::test]
async fn a_command_the_database_refuses_never_fails_the_others_in_its_batch() {
    let env = env().await;
    let accounts = funded(&env, "nul", 8).await;
    let poisoned: HashMap<String, String> =
        [("request.id".to_owned(), "bad\u{0}id".to_owned())].into();
    let mut commands: Vec<(&credit_domain::UserId, String, HashMap<String, String>)> = accounts
        .iter()
        .map(|a| (a, format!("{a}-a"), HashMap::new()))
        .collect();
    commands.insert(
        4,
        (
            &accounts[3],
            format!("{}-bad", accounts[3]),
            poisoned.clone(),
        ),
    );
    commands.push((&accounts[3], format!("{}-c", accounts[3]), HashMap::new()));
    commands.push((&accounts[6], format!("{}-bad", accounts[6]), poisoned));

    let results = join_all(
        commands
            .iter()
            .map(|(a, task, metadata)| env.ledger.execute(a, deduct(task), metadata.clone())),
    )
    .await;
    for ((_, task, _), result) in commands.iter().zip(&results) {
        if task.ends_with("-bad") {
            assert!(
                matches!(result, Err(ExecuteError::Store(_))),
                "{task}: {result:?}"
            );
        } else {
            assert!(result.is_ok(), "{task}: {result:?}");
        }
    }
    for (i, account) in accounts.iter().enumerate() {
        let (state, _) = env.ledger.load(account).await.unwrap();
        assert_eq!(state.balance(), if i == 3 { 80 } else { 90 }, "{account}");
        assert!(state.task(&format!("{account}-bad")).is_none());
    }
    env.projector.drain().await.unwrap();
    assert_projection_matches_journal(&env).await;
}

/// An account that keeps many entries (here: open tasks, each deduction adds one) is
/// snapshotted less often than every `SNAPSHOT_EVERY` events: after half as many events as it
/// keeps entries, so its snapshots come at doubling sequences (about 500, then 1,000, then
/// 2,000) instead of every 500. Its state still loads back exactly.
#[tokio::test]
async fn an_account_that_keeps_many_entries_is_snapshotted_less_often() {
    let env = env().await;
    let account = user("many-open-tasks");
    env.recharge(&account, "r1", 20_000).await;
    // 2 events so far; then 1,800 deductions whose tasks stay open, 100 to a batch.
    deduct_in_batches_of_100(&env, &account, 18).await;
    let client = env.test.client().await;
    let taken_at = count(
        &client,
        "SELECT last_sequence FROM snapshots WHERE aggregate_id = 'many-open-tasks'",
    )
    .await;
    // Every 500 events would have taken one at 1,500 (or later); this account's second
    // snapshot comes at about 1,000 (500 events after the first, with about 1,000 entries
    // kept), and the third not before about 2,000.
    assert!(
        (1_000..1_500).contains(&taken_at),
        "latest snapshot at sequence {taken_at}"
    );
    let loaded = loads_as_replayed(&env, &account, 1_802).await;
    assert_eq!(loaded.balance(), 20_000 - 18_000);
    assert_eq!(loaded.open_tasks().count(), 1_800);
}

/// A committer keeps its write connection between batches while it has work, but not when
/// the pool has none to spare: with a write pool of one connection, both committers (and
/// the commands behind them) keep being served under continuous load, instead of one of them
/// waiting past the pool's 4 s for the connection the other keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_pool_of_one_connection_serves_both_committers_under_load() {
    let env = env_with_pools(1, 4).await;
    let accounts: Vec<_> = (0..8).map(|i| user(&format!("one-conn-{i}"))).collect();
    for account in &accounts {
        env.recharge(account, &format!("{account}-r1"), 1_000_000)
            .await;
    }
    // One caller per account, each sending its next command as soon as the last is answered,
    // for 6 s: the queue is never empty, so no committer stops of its own accord.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(6);
    let callers = accounts.iter().map(|account| {
        let ledger = env.ledger.clone();
        let account = account.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut n = 0;
            while std::time::Instant::now() < until {
                n += 1;
                match ledger
                    .execute(&account, deduct(&format!("t{n}")), HashMap::new())
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })
    });
    for (ok, failed) in join_all(callers).await.into_iter().map(|r| r.unwrap()) {
        assert!(
            failed.is_empty(),
            "{} failed, the first: {}",
            failed.len(),
            failed[0]
        );
        assert!(ok > 0);
    }
}

/// Loads `account` in a fresh process (a new `Ledger`: its snapshot, then the events after
/// it), checks that it is at `sequence` and equal to a replay of its whole journal, and
/// returns it.
async fn loads_as_replayed(
    env: &Env,
    account: &credit_domain::UserId,
    sequence: usize,
) -> credit_domain::CreditAccount {
    let fresh = credit_store::Ledger::new(env.test.db.write.clone());
    let (loaded, at) = fresh.load(account).await.unwrap();
    let (replayed, _) = replay(env, account).await;
    assert_eq!(at, sequence, "{account}");
    assert_eq!(loaded, replayed, "{account}");
    loaded
}

/// `rounds` × 100 deductions on `account`, the 100 of a round submitted together (one batch).
async fn deduct_in_batches_of_100(env: &Env, account: &credit_domain::UserId, rounds: usize) {
    for round in 0..rounds {
        let results =
            join_all((0..100).map(|i| env.run(account, deduct(&format!("t-{round}-{i}"))))).await;
        for r in results {
            r.unwrap();
        }
    }
}

/// A snapshot is a cache, written after the append it follows: when it cannot be written
/// (here a trigger refuses every snapshot; in life, one so large that it outlasts the
/// statement timeout), the commands that brought it due are committed all the same, and the
/// account loads by replaying its journal.
#[tokio::test]
async fn a_snapshot_that_cannot_be_written_fails_no_command() {
    let env = env().await;
    let client = env.test.client().await;
    client
        .batch_execute(
            "CREATE FUNCTION refuse_snapshot() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'no snapshot today'; END $$;
             CREATE TRIGGER refuse_snapshot BEFORE INSERT OR UPDATE ON snapshots
                 FOR EACH ROW EXECUTE FUNCTION refuse_snapshot();",
        )
        .await
        .unwrap();
    let account = user("no-snapshots");
    env.recharge(&account, "r1", 10_000).await;
    // 2 events so far; 600 deductions, 100 to a batch: past the first snapshot's 500.
    deduct_in_batches_of_100(&env, &account, 6).await;
    assert_eq!(count(&client, "SELECT count(*) FROM snapshots").await, 0);
    let loaded = loads_as_replayed(&env, &account, 602).await;
    assert_eq!(loaded.balance(), 10_000 - 6_000);
}

/// Accounts crossing a snapshot boundary inside a shared batch get their snapshots, and a
/// fresh process (postgres-es's loader) reads them back to the replayed state.
#[tokio::test]
async fn snapshots_written_by_shared_batches_load_back() {
    let env = env().await;
    let accounts = funded(&env, "snap", 3).await;
    // 2 events each so far; batches of one deduction per account up to past the boundary.
    for round in 0..(credit_store::executor::SNAPSHOT_EVERY - 1) {
        let results = join_all(accounts.iter().map(|a| {
            env.run(
                a,
                CreditCommand::Adjust {
                    adjustment_id: format!("{a}-adj{round}"),
                    credits: 1,
                    actor: "ops".into(),
                    reason: "test".into(),
                },
            )
        }))
        .await;
        for r in results {
            r.unwrap();
        }
    }
    let client = env.test.client().await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM snapshots WHERE last_sequence = 500"
        )
        .await,
        3
    );
    for account in &accounts {
        let loaded =
            loads_as_replayed(&env, account, credit_store::executor::SNAPSHOT_EVERY + 1).await;
        assert_eq!(loaded.balance(), 100 + 499);
    }
    // A fresh process's executor loads all three (snapshot and the event after it) in one
    // batch, and carries on from there.
    let fresh = credit_store::Ledger::new(env.test.db.write.clone());
    let results = join_all(accounts.iter().map(|a| {
        fresh.execute(
            a,
            CreditCommand::Adjust {
                adjustment_id: format!("{a}-last"),
                credits: 1,
                actor: "ops".into(),
                reason: "test".into(),
            },
            HashMap::new(),
        )
    }))
    .await;
    for r in results {
        let done = r.unwrap();
        assert_eq!((done.balance, done.sequence), (100 + 500, 502));
    }

    // A snapshot that no longer reads as an account (an older shape) is not trusted: the
    // account is rebuilt from its journal.
    client
        .execute(
            "UPDATE snapshots SET payload = '{\"old\": true}' WHERE aggregate_id = $1",
            &[&accounts[0].as_str()],
        )
        .await
        .unwrap();
    let another = credit_store::Ledger::new(env.test.db.write.clone());
    let done = another
        .execute(&accounts[0], deduct("after-upgrade"), HashMap::new())
        .await
        .unwrap();
    assert_eq!((done.balance, done.sequence), (100 + 500 - 10, 503));
}

/// A committer that finds nothing to take waits a moment for more (keeping its task and its
/// connection) before it ends; a command sent while it waits is taken at once, not when the
/// wait runs out. Commands sent one after another, each 5 ms after the last was answered,
/// always find a committer waiting: if it were not woken, each would wait out most of the
/// `KEEP_COMMITTER` wait, and ten of them would take most of a second.
#[tokio::test]
async fn a_command_sent_while_a_committer_waits_is_taken_at_once() {
    let env = env().await;
    let accounts = funded(&env, "waiting", 10).await;
    let started = std::time::Instant::now();
    for account in &accounts {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        env.run(account, deduct(&format!("{account}-t1")))
            .await
            .unwrap();
    }
    let elapsed = started.elapsed();
    let bound = credit_store::executor::KEEP_COMMITTER * 10 / 3;
    assert!(
        elapsed < bound,
        "10 commands one after another took {elapsed:?} (a committer left waiting would take ~{:?})",
        credit_store::executor::KEEP_COMMITTER * 10
    );
}
