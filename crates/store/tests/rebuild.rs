//! A rebuild reproduces every read table exactly: after a realistic history (recharges,
//! a refund before and after completion, a dispute won, tasks in every state, progress
//! callbacks, a video delivered after its refund, adjustments), the tables are compared
//! column by column before and after `projections rebuild`.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use credit_domain::{CreditCommand, DisputeStage};
use credit_store::projector;

/// Every row of every read table, as JSON text, in a stable order.
async fn tables(client: &tokio_postgres::Client) -> Vec<String> {
    let mut all = Vec::new();
    for table in [
        "users",
        "recharge_records",
        "consumption_records",
        "video_tasks",
    ] {
        let rows = client
            .query(
                &format!("SELECT row_to_json(t)::text FROM {table} t ORDER BY t.id"),
                &[],
            )
            .await
            .unwrap();
        all.extend(
            rows.iter()
                .map(|r| format!("{table}: {}", r.get::<_, String>(0))),
        );
    }
    all
}

#[tokio::test]
async fn a_rebuild_reproduces_every_read_table_column_by_column() {
    let env = env().await;
    let alice = user("alice");
    let bob = user("bob");
    env.recharge(&alice, "r1", 10_000).await;
    env.recharge(&bob, "r2", 5_000).await;
    // A refund recorded while pending, netted at completion.
    env.run(&alice, request("r3", 2_000)).await.unwrap();
    env.run(
        &alice,
        CreditCommand::RecordRefund {
            recharge_id: "r3".into(),
            refunded_fen: 500,
            reference: "ch_3".into(),
        },
    )
    .await
    .unwrap();
    env.run(
        &alice,
        CreditCommand::CompleteRecharge {
            recharge_id: "r3".into(),
            amount_fen: 2_000,
            currency: "cny".into(),
            payment_id: "pi_r3".into(),
        },
    )
    .await
    .unwrap();
    // A dispute opened, then won.
    for stage in [DisputeStage::Open, DisputeStage::Won] {
        env.run(
            &bob,
            CreditCommand::RecordDispute {
                recharge_id: "r2".into(),
                dispute_id: "dp_1".into(),
                amount_fen: 1_000,
                stage,
            },
        )
        .await
        .unwrap();
    }
    // Tasks in every state.
    for t in [
        "t-charged",
        "t-uncertain",
        "t-running",
        "t-done",
        "t-failed",
        "t-late",
    ] {
        env.run(&alice, deduct(t)).await.unwrap();
    }
    env.run(
        &alice,
        CreditCommand::MarkSubmissionUncertain {
            task_id: "t-uncertain".into(),
            error_message: "timed out".into(),
        },
    )
    .await
    .unwrap();
    for t in ["t-running", "t-done", "t-failed", "t-late"] {
        env.run(&alice, submit(t)).await.unwrap();
    }
    for p in [10, 40] {
        env.run(
            &alice,
            CreditCommand::RecordProgress {
                task_id: "t-running".into(),
                progress: p,
            },
        )
        .await
        .unwrap();
    }
    env.run(&alice, succeed("t-done")).await.unwrap();
    env.run(&alice, fail("t-failed")).await.unwrap();
    env.run(&alice, fail("t-late")).await.unwrap();
    env.run(&alice, succeed("t-late")).await.unwrap();
    env.run(
        &bob,
        CreditCommand::Adjust {
            adjustment_id: "a1".into(),
            credits: 7,
            actor: "ops".into(),
            reason: "goodwill".into(),
        },
    )
    .await
    .unwrap();

    env.projector.drain().await.unwrap();
    let client = env.test.client().await;
    let before = tables(&client).await;
    assert!(
        before.iter().any(|r| r.contains("\"progress\":40")),
        "{before:#?}"
    );
    // Time passes: a rebuild must not take its own time for anything.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    projector::rebuild(&env.projector).await.unwrap();
    let after = tables(&client).await;
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b, a);
    }
    assert!(env.audit().await.ok);
}
