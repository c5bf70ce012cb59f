//! How the write sessions plan the executor's load: one generic plan per connection (a cold
//! account's load is not re-planned at each execution), and that plan reads each account by
//! key whatever the journal's statistics say. Where one account holds nearly the whole
//! journal, PostgreSQL's estimate for "one account's events" is half the table, and a generic
//! plan left to itself scanned the journal (0.1 s a load) or compiled the load with JIT
//! (15 ms): see crates/store/src/db.rs. And how a projector batch plans its outbox deletes:
//! by index, though the outbox's statistics see a table of a few rows.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use cqrs_es::Aggregate;
use credit_domain::CreditAccount;

/// Every plan node type in an `EXPLAIN (FORMAT JSON)` plan, and whether it planned JIT.
fn node_types(plan: &serde_json::Value, into: &mut Vec<String>) {
    if let Some(kind) = plan.get("Node Type").and_then(|k| k.as_str()) {
        into.push(kind.to_owned());
    }
    for child in plan
        .get("Plans")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
    {
        node_types(child, into);
    }
}

#[tokio::test]
async fn the_load_reads_by_key_where_one_account_holds_the_journal() {
    let env = env().await;
    let client = env.test.db.read.get().await.unwrap();
    // 20,000 events of one account and 2 of another, written without the journal's triggers
    // (this test looks at plans, not at hashes), a snapshot, and fresh statistics.
    client
        .batch_execute(
            "ALTER TABLE events DISABLE TRIGGER USER;
             INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                 event_version, payload, metadata, hash)
             SELECT 'CreditAccount', CASE WHEN g <= 20000 THEN 'long' ELSE 'short' END,
                    CASE WHEN g <= 20000 THEN g ELSE g - 20000 END, 'X', '1', '{}', '{}', '\\x00'
               FROM generate_series(1, 20002) g;
             ALTER TABLE events ENABLE TRIGGER USER;
             INSERT INTO snapshots VALUES ('CreditAccount', 'long', 19800, 1, '{}');
             ANALYZE events; ANALYZE snapshots;",
        )
        .await
        .unwrap();

    let mut connection = env.test.db.write.acquire().await.unwrap();
    let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&mut *connection)
        .await
        .unwrap();
    assert_eq!(mode, "force_generic_plan");
    // The statement as the executor's prepared statement runs it, through a named prepared
    // statement: `EXPLAIN` of a statement with bound values would plan it for those values.
    sqlx::raw_sql(&format!(
        "PREPARE load(text, text[]) AS {}",
        credit_store::executor::load_statement()
    ))
    .execute(&mut *connection)
    .await
    .unwrap();
    for accounts in ["{long}", "{short,long,nobody}"] {
        let plan: serde_json::Value = sqlx::query_scalar(&format!(
            "EXPLAIN (FORMAT JSON) EXECUTE load('{}', '{accounts}')",
            CreditAccount::TYPE
        ))
        .fetch_one(&mut *connection)
        .await
        .unwrap();
        let top = &plan[0];
        assert!(top.get("JIT").is_none(), "the load is compiled: {plan:#}");
        let mut kinds = Vec::new();
        node_types(&top["Plan"], &mut kinds);
        assert!(
            kinds
                .iter()
                .all(|k| k != "Seq Scan" && !k.starts_with("Bitmap")),
            "the load scans a table for {accounts:?}: {kinds:?}\n{plan:#}"
        );
        assert!(
            kinds.iter().filter(|k| *k == "Index Scan").count() >= 2,
            "{kinds:?}"
        );
    }
}

#[tokio::test]
async fn a_batch_deletes_outbox_rows_by_index_whatever_the_statistics_say() {
    let env = env().await;
    let mut client = env.test.db.read.get().await.unwrap();
    // Statistics of a nearly empty queue, as a busy one has between autovacuums (its heap
    // then holds the dead rows of thousands of deletes a second): planned on its own,
    // each delete reads the whole outbox.
    client
        .batch_execute(
            "INSERT INTO projection_outbox (aggregate_id, sequence)
             SELECT 'acct-' || (g % 10), g FROM generate_series(1, 100) g;
             ANALYZE projection_outbox;",
        )
        .await
        .unwrap();
    let [settings, _, take, clear, _] = credit_store::projector::batch_statements();
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(settings).await.unwrap();
    tx.batch_execute(&format!(
        "PREPARE take(bigint) AS {take}; PREPARE clear(text[]) AS {clear}"
    ))
    .await
    .unwrap();
    for statement in ["take(1000)", "clear('{acct-1,acct-2}')"] {
        let row = tx
            .query_one(&format!("EXPLAIN (FORMAT JSON) EXECUTE {statement}"), &[])
            .await
            .unwrap();
        let plan: serde_json::Value = row.get(0);
        let mut kinds = Vec::new();
        node_types(&plan[0]["Plan"], &mut kinds);
        assert!(
            kinds.iter().all(|k| k != "Seq Scan"),
            "{statement} scans a table: {kinds:?}\n{plan:#}"
        );
    }
}

#[tokio::test]
async fn charged_tasks_stay_out_of_the_provider_index_and_a_lookup_by_provider_id_uses_it() {
    let env = env().await;
    let client = env.test.db.read.get().await.unwrap();
    // A thousand tasks as the projector writes a charge: no provider id yet.
    client
        .batch_execute(
            "INSERT INTO video_tasks (id, user_id, model, prompt, aspect_ratio, duration, size,
                                      status, credits_charged, created_at)
             SELECT 'vid_' || g, 'acct', 'sora-2', 'a cat', '9:16', 10, 'small', 'pending', 10,
                    now()
               FROM generate_series(1, 1000) g;",
        )
        .await
        .unwrap();
    let size: i64 = client
        .query_one("SELECT pg_relation_size('video_tasks_provider')", &[])
        .await
        .unwrap()
        .get(0);
    // Its metapage alone: no entry was written for the charged tasks' missing provider ids.
    assert_eq!(
        size, 8192,
        "the provider index grew with tasks that have no provider id"
    );

    client
        .batch_execute(
            "UPDATE video_tasks SET provider_task_id = 'prov-7', status = 'processing'
              WHERE id = 'vid_7';
             ANALYZE video_tasks;",
        )
        .await
        .unwrap();
    let found: String = client
        .query_one(
            "SELECT id FROM video_tasks WHERE provider_task_id = $1",
            &[&"prov-7"],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(found, "vid_7");
    let row = client
        .query_one(
            "EXPLAIN (FORMAT JSON) SELECT id FROM video_tasks WHERE provider_task_id = 'prov-7'",
            &[],
        )
        .await
        .unwrap();
    let plan: serde_json::Value = row.get(0);
    assert_eq!(
        plan[0]["Plan"]["Index Name"], "video_tasks_provider",
        "a lookup by provider id does not use the provider index: {plan:#}"
    );
}
