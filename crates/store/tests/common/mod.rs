#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;

use credit_domain::{CreditCommand, UserId, VideoSpec};
use credit_store::{Committed, ExecuteError, Ledger, Projector};
use credit_testkit::db::TestDb;

pub struct Env {
    pub test: TestDb,
    pub ledger: std::sync::Arc<Ledger>,
    pub projector: Projector,
}

pub async fn env() -> Env {
    env_on(TestDb::new().await)
}

/// An environment whose pools have these sizes.
pub async fn env_with_pools(write: u32, read: usize) -> Env {
    env_on(TestDb::with_pools(write, read).await)
}

fn env_on(test: TestDb) -> Env {
    let ledger = std::sync::Arc::new(Ledger::new(test.db.write.clone()));
    let projector = Projector::new(test.db.read.clone(), ledger.appended());
    Env {
        test,
        ledger,
        projector,
    }
}

pub fn user(id: &str) -> UserId {
    UserId::parse(id).unwrap()
}

impl Env {
    pub async fn run(
        &self,
        account: &UserId,
        cmd: CreditCommand,
    ) -> Result<Committed, ExecuteError> {
        self.ledger.execute(account, cmd, HashMap::new()).await
    }

    /// Recharges `yuan` through the full request → complete path.
    pub async fn recharge(&self, account: &UserId, recharge_id: &str, amount_fen: i64) {
        self.run(account, request(recharge_id, amount_fen))
            .await
            .unwrap();
        self.run(
            account,
            CreditCommand::CompleteRecharge {
                recharge_id: recharge_id.into(),
                amount_fen,
                currency: "cny".into(),
                payment_id: format!("pi_{recharge_id}"),
            },
        )
        .await
        .unwrap();
    }

    pub async fn audit(&self) -> credit_store::audit::AuditReport {
        let mut client = self.test.client().await;
        credit_store::audit::run(&mut client, None).await.unwrap()
    }
}

pub fn request(recharge_id: &str, amount_fen: i64) -> CreditCommand {
    CreditCommand::RequestRecharge {
        recharge_id: recharge_id.into(),
        amount_fen,
        currency: "cny".into(),
        credits_per_yuan: 100,
        provider: "demo".into(),
    }
}

pub fn deduct(task_id: &str) -> CreditCommand {
    CreditCommand::DeductForTask {
        task_id: task_id.into(),
        credits: 10,
        description: "Sora 2 video".into(),
        video: VideoSpec {
            model: "sora-2".into(),
            prompt: "a cat surfing".into(),
            aspect_ratio: "9:16".into(),
            duration: 10,
            size: "small".into(),
            reference_url: None,
        },
        callback_token_sha256: "00".repeat(32),
    }
}

pub fn fail(task_id: &str) -> CreditCommand {
    CreditCommand::FailVideo {
        task_id: task_id.into(),
        failure_reason: "error".into(),
        error_message: "boom".into(),
    }
}

pub fn submit(task_id: &str) -> CreditCommand {
    CreditCommand::MarkTaskSubmitted {
        task_id: task_id.into(),
        provider_task_id: format!("prov-{task_id}"),
    }
}

pub fn succeed(task_id: &str) -> CreditCommand {
    CreditCommand::RecordVideoSuccess {
        task_id: task_id.into(),
        video_url: format!("https://cdn.example/{task_id}.mp4"),
        remove_watermark: Some(true),
        pid: Some("p1".into()),
    }
}

/// The account ids `populate` writes to.
pub fn account_ids(accounts: usize) -> Vec<String> {
    (0..accounts).map(|i| format!("user-{i:03}")).collect()
}

/// Writes a realistic history for `accounts` accounts, concurrently across accounts: a
/// recharge of 1,000 credits, then `tasks` videos each charged 10 credits, of which every
/// third fails (refunded), every third succeeds, and the rest stay submitted. Events per
/// account: 2 + tasks + (failed and succeeded tasks: one or two more each).
pub async fn populate(env: &Env, accounts: usize, tasks: usize) {
    let jobs = account_ids(accounts).into_iter().map(|id| {
        let ledger = env.ledger.clone();
        async move {
            let account = user(&id);
            let run = |cmd| ledger.execute(&account, cmd, HashMap::new());
            run(request(&format!("{id}-r1"), 1000)).await.unwrap();
            run(CreditCommand::CompleteRecharge {
                recharge_id: format!("{id}-r1"),
                amount_fen: 1000,
                currency: "cny".into(),
                payment_id: format!("pi_{id}"),
            })
            .await
            .unwrap();
            for t in 0..tasks {
                let task = format!("{id}-t{t}");
                run(deduct(&task)).await.unwrap();
                match t % 3 {
                    0 => {
                        run(fail(&task)).await.unwrap();
                    }
                    1 => {
                        run(submit(&task)).await.unwrap();
                        run(succeed(&task)).await.unwrap();
                    }
                    _ => {
                        run(submit(&task)).await.unwrap();
                    }
                }
            }
        }
    });
    futures::future::join_all(jobs).await;
}

/// Every row of the read tables, as JSON text in a fixed order. Columns that do not come
/// from the journal (`users.created_at`, the row's insertion time) are left out, so two
/// projections of the same journal dump the same.
pub async fn dump(client: &tokio_postgres::Client) -> Vec<String> {
    let mut out = Vec::new();
    for sql in [
        "SELECT (to_jsonb(t) - 'created_at')::text FROM users t ORDER BY id",
        "SELECT to_jsonb(t)::text FROM recharge_records t ORDER BY id",
        "SELECT to_jsonb(t)::text FROM consumption_records t ORDER BY id",
        "SELECT to_jsonb(t)::text FROM video_tasks t ORDER BY id",
    ] {
        for row in client.query(sql, &[]).await.unwrap() {
            out.push(row.get(0));
        }
    }
    out
}

pub async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// The read tables are exactly a projection of the journal: nothing pending, the audit
/// finds nothing, every balance and checkpoint is the replayed one, and each table has one
/// row per event that creates one (so nothing was applied twice or skipped).
pub async fn assert_projection_matches_journal(env: &Env) {
    let client = env.test.client().await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM projection_outbox").await,
        0
    );
    let report = env.audit().await;
    assert!(report.ok, "{:#?}", report.discrepancies);
    assert_eq!(report.accounts_pending_projection, 0);
    assert_eq!(report.totals.balances, report.totals.projected_balances);

    let accounts: Vec<String> = client
        .query("SELECT DISTINCT aggregate_id FROM events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        count(&client, "SELECT count(*) FROM users").await,
        accounts.len() as i64
    );
    for id in &accounts {
        let (state, sequence) = env.ledger.load(&user(id)).await.unwrap();
        let row = client
            .query_one(
                "SELECT credits, last_sequence FROM users WHERE id = $1",
                &[id],
            )
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, i64>(0), row.get::<_, i64>(1)),
            (state.balance(), sequence as i64),
            "account {id}"
        );
    }
    for (table, event) in [
        ("recharge_records", "RechargeRequested"),
        ("consumption_records", "CreditsDeducted"),
        ("video_tasks", "CreditsDeducted"),
    ] {
        let rows = count(&client, &format!("SELECT count(*) FROM {table}")).await;
        let events = count(
            &client,
            &format!("SELECT count(*) FROM events WHERE event_type = '{event}'"),
        )
        .await;
        assert_eq!(rows, events, "{table} rows vs {event} events");
    }
    for (sql, event) in [
        (
            "SELECT count(*) FROM consumption_records WHERE status = 'refunded'",
            "CreditsRefunded",
        ),
        (
            "SELECT count(*) FROM video_tasks WHERE status = 'succeeded'",
            "VideoSucceeded",
        ),
        (
            "SELECT count(*) FROM recharge_records WHERE status = 'completed'",
            "RechargeCompleted",
        ),
    ] {
        let events = count(
            &client,
            &format!("SELECT count(*) FROM events WHERE event_type = '{event}'"),
        )
        .await;
        assert_eq!(count(&client, sql).await, events, "{sql}");
    }
}

/// An account's state replayed from its whole journal, and its last sequence.
pub async fn replay(env: &Env, account: &UserId) -> (credit_domain::CreditAccount, usize) {
    let client = env.test.client().await;
    let rows = client
        .query(
            "SELECT payload FROM events WHERE aggregate_id = $1 ORDER BY sequence",
            &[&account.as_str()],
        )
        .await
        .unwrap();
    let mut replayed = credit_domain::CreditAccount::default();
    for row in &rows {
        let tokio_postgres::types::Json(e): tokio_postgres::types::Json<
            credit_domain::CreditEvent,
        > = row.get(0);
        replayed.apply_event(e);
    }
    (replayed, rows.len())
}
