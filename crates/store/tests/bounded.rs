//! Bounded account state against a real PostgreSQL: ids the account has forgotten are still
//! refused exactly, by the journal's unique indexes (migration 0008), command by command
//! inside a shared batch; commands about forgotten tasks have no money effect; a snapshot in
//! the shape written before the windows is rebuilt from the journal.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use common::*;
use credit_domain::{
    CreditAccount, CreditCommand, LedgerError, UserId, RECENT_ADJUSTMENTS, RECENT_SETTLED_TASKS,
};
use credit_store::{ExecuteError, Ledger};
use futures::future::join_all;

/// Charges, submits and settles `n` tasks `{account}-t{i}` (every third one fails and is
/// refunded).
async fn settle_tasks(env: &Env, account: &UserId, n: usize) {
    for i in 0..n {
        let task = format!("{account}-t{i}");
        env.run(account, deduct(&task)).await.unwrap();
        env.run(account, submit(&task)).await.unwrap();
        let end = if i.is_multiple_of(3) {
            fail(&task)
        } else {
            succeed(&task)
        };
        env.run(account, end).await.unwrap();
    }
}

fn adjust(adjustment_id: &str) -> CreditCommand {
    CreditCommand::Adjust {
        adjustment_id: adjustment_id.to_owned(),
        credits: 1,
        actor: "ops".into(),
        reason: "test".into(),
    }
}

/// A retry of a task id that left the account's window is refused with
/// `TaskAlreadyCharged` (no second charge), and the other commands of its batch, on its own
/// account and on others, are committed; the same for an adjustment id. Both through kept
/// state (the executor's memory) and through a process that loads the account fresh.
#[tokio::test]
async fn a_forgotten_id_is_refused_exactly_while_the_rest_of_its_batch_commits() {
    let env = env().await;
    let alice = user("alice");
    let others = [user("bob"), user("carol")];
    env.recharge(&alice, "alice-r1", 10_000).await;
    for other in &others {
        env.recharge(other, &format!("{other}-r1"), 10_000).await;
    }
    let settled = RECENT_SETTLED_TASKS + 2;
    settle_tasks(&env, &alice, settled).await;
    for i in 0..=RECENT_ADJUSTMENTS {
        env.run(&alice, adjust(&format!("alice-adj{i}")))
            .await
            .unwrap();
    }
    let (state, _) = env.ledger.load(&alice).await.unwrap();
    assert!(state.task("alice-t0").is_none(), "task 0 left the window");
    assert!(state.task(&format!("alice-t{}", settled - 1)).is_some());
    assert!(state.adjustment("alice-adj0").is_none(), "adjustment 0 too");
    let before = state.balance();

    for (round, ledger) in [
        env.ledger.clone(),
        std::sync::Arc::new(Ledger::new(env.test.db.write.clone())),
    ]
    .into_iter()
    .enumerate()
    {
        let commands: Vec<(&UserId, CreditCommand)> = vec![
            (&alice, deduct(&format!("alice-new{round}a"))),
            (&alice, deduct("alice-t0")),
            (&others[0], deduct(&format!("bob-new{round}"))),
            (&alice, adjust("alice-adj0")),
            (&alice, deduct(&format!("alice-new{round}b"))),
            (&others[1], deduct(&format!("carol-new{round}"))),
        ];
        let results = join_all(
            commands
                .iter()
                .map(|(a, c)| ledger.execute(a, c.clone(), HashMap::new())),
        )
        .await;
        let mut results = results.into_iter();
        assert!(results.next().unwrap().is_ok());
        assert!(matches!(
            results.next().unwrap(),
            Err(ExecuteError::Rejected(LedgerError::TaskAlreadyCharged { task_id })) if task_id == "alice-t0"
        ));
        assert!(results.next().unwrap().is_ok());
        assert!(matches!(
            results.next().unwrap(),
            Err(ExecuteError::Rejected(LedgerError::AdjustmentExists { adjustment_id })) if adjustment_id == "alice-adj0"
        ));
        assert!(results.next().unwrap().is_ok());
        assert!(results.next().unwrap().is_ok());
    }

    let client = env.test.client().await;
    for (event, field, id) in [
        ("CreditsDeducted", "task_id", "alice-t0"),
        ("CreditsAdjusted", "adjustment_id", "alice-adj0"),
    ] {
        let sql = format!(
            "SELECT count(*) FROM events WHERE aggregate_id = 'alice'
                AND payload -> '{event}' ->> '{field}' = '{id}'"
        );
        assert_eq!(count(&client, &sql).await, 1, "{id} written once");
    }
    let (state, _) = env.ledger.load(&alice).await.unwrap();
    assert_eq!(
        state.balance(),
        before - 4 * 10,
        "four new tasks, nothing else"
    );
    for other in &others {
        let (state, _) = env.ledger.load(other).await.unwrap();
        assert_eq!(state.balance(), 10_000 - 2 * 10, "{other}");
    }
    assert_eq!(
        env.ledger.load(&alice).await.unwrap().0,
        replay(&env, &alice).await.0
    );
    env.projector.drain().await.unwrap();
    assert_projection_matches_journal(&env).await;
    assert!(env.audit().await.ok);
}

/// A late callback, poll or deadline for a task the account forgot has no money effect and
/// is answered as for a settled task; a task never charged is still unknown.
#[tokio::test]
async fn commands_about_a_forgotten_task_are_answered_as_settled() {
    let env = env().await;
    let alice = user("alice");
    env.recharge(&alice, "alice-r1", 10_000).await;
    settle_tasks(&env, &alice, RECENT_SETTLED_TASKS + 3).await;
    let (state, sequence) = env.ledger.load(&alice).await.unwrap();
    assert!(state.task("alice-t0").is_none() && state.task("alice-t1").is_none());

    for command in [
        fail("alice-t0"),
        succeed("alice-t0"),
        fail("alice-t1"),
        submit("alice-t1"),
        CreditCommand::RecordProgress {
            task_id: "alice-t1".into(),
            progress: 50,
        },
    ] {
        let refused = env.run(&alice, command.clone()).await;
        assert!(
            matches!(
                refused,
                Err(ExecuteError::Rejected(
                    LedgerError::TaskAlreadySettled { .. }
                ))
            ),
            "{command:?}: {refused:?}"
        );
    }
    assert!(matches!(
        env.run(&alice, fail("never-charged")).await,
        Err(ExecuteError::Rejected(LedgerError::UnknownTask { .. }))
    ));
    let (after, after_sequence) = env.ledger.load(&alice).await.unwrap();
    assert_eq!(
        (after.balance(), after_sequence),
        (state.balance(), sequence)
    );
}

/// A snapshot in the shape written before the account's state was bounded (every task, an
/// `adjustments` set) does not read as an account: it is rebuilt from the journal, written
/// again in the current shape, and the account carries on.
#[tokio::test]
async fn a_snapshot_in_the_old_shape_is_rebuilt_from_the_journal() {
    let env = env().await;
    let alice = user("alice");
    env.recharge(&alice, "alice-r1", 10_000).await;
    settle_tasks(&env, &alice, RECENT_SETTLED_TASKS + 5).await;
    env.run(&alice, adjust("alice-adj0")).await.unwrap();
    env.run(&alice, deduct("alice-open")).await.unwrap();
    let (replayed, sequence) = replay(&env, &alice).await;

    // The old shape: every task ever charged, adjustments as a set with fingerprints.
    let mut old = serde_json::to_value(&replayed).unwrap();
    let object = old.as_object_mut().unwrap();
    object.remove("settled");
    object.remove("recent_adjustments");
    let tasks = object["tasks"].as_object_mut().unwrap();
    for i in 0..5 {
        tasks.insert(
            format!("alice-t{i}"),
            serde_json::json!({"credits": 10, "status": "succeeded", "refunded": false,
                "provider_task_id": format!("prov-alice-t{i}"),
                "callback_token_sha256": "00".repeat(32), "spec_sha256": null,
                "delivered_after_refund": false, "progress": 0}),
        );
    }
    object.insert("adjustments".into(), serde_json::json!(["alice-adj0"]));
    object.insert(
        "adjustment_fingerprints".into(),
        serde_json::json!({"alice-adj0": credit_domain::adjustment_fingerprint(1, "test")}),
    );
    let client = env.test.client().await;
    client
        .execute(
            "INSERT INTO snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload)
             VALUES ('CreditAccount', $1, $2, 1, $3)
             ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
                SET last_sequence = EXCLUDED.last_sequence, payload = EXCLUDED.payload",
            &[
                &alice.as_str(),
                &(sequence as i64),
                &tokio_postgres::types::Json(&old),
            ],
        )
        .await
        .unwrap();

    let fresh = Ledger::new(env.test.db.write.clone());
    let (loaded, loaded_sequence) = fresh.load(&alice).await.unwrap();
    assert_eq!((loaded, loaded_sequence), (replayed.clone(), sequence));
    // Written again in the current shape, at the same sequence.
    let row = client
        .query_one(
            "SELECT last_sequence, payload FROM snapshots WHERE aggregate_id = $1",
            &[&alice.as_str()],
        )
        .await
        .unwrap();
    let last: i64 = row.get("last_sequence");
    let tokio_postgres::types::Json(payload): tokio_postgres::types::Json<serde_json::Value> =
        row.get("payload");
    assert_eq!(last, sequence as i64);
    assert_eq!(
        serde_json::from_value::<CreditAccount>(payload).unwrap(),
        replayed
    );
    // And the account carries on, its forgotten ids still refused.
    let another = Ledger::new(env.test.db.write.clone());
    assert!(matches!(
        another
            .execute(&alice, deduct("alice-t0"), HashMap::new())
            .await,
        Err(ExecuteError::Rejected(
            LedgerError::TaskAlreadyCharged { .. }
        ))
    ));
    let done = another
        .execute(&alice, deduct("alice-after"), HashMap::new())
        .await
        .unwrap();
    assert_eq!(done.balance, replayed.balance() - 10);
}
