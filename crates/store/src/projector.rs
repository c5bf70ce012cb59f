//! The projector: applies journal events to the read tables, exactly once, whatever crashes.
//!
//! The trigger on `events` writes a `projection_outbox` row in the same transaction as each
//! append. The projector takes a batch of outbox rows, locks the accounts' `users` rows,
//! applies every event after each account's checkpoint (`users.last_sequence`), advances the
//! checkpoint and deletes the outbox rows — all in one read-side transaction. A crash before
//! the commit changes nothing (the outbox rows stay); after it, the work is done. Applying an
//! event twice is impossible because only events past the checkpoint are read, under lock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use credit_domain::{CreditAccount, CreditEvent};
use deadpool_postgres::{Pool, Transaction};
use futures::future::try_join_all;
use tokio::sync::{watch, Notify};
use tokio_postgres::types::{Json, ToSql};

/// Outbox rows taken per transaction.
pub const BATCH: i64 = 1000;
/// The sweep interval when nothing wakes the projector (catches appends by other processes).
const SWEEP: Duration = Duration::from_millis(100);
/// After a wake-up, how long to let more appends gather before projecting them together:
/// one read-side transaction for many appends instead of one each, at a cost in lag far
/// below the 1 s budget.
const GATHER: Duration = Duration::from_millis(20);

/// Where a batch may be interrupted on purpose, to prove crash safety in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// After every read-table write of the batch, just before the commit.
    BeforeCommit,
}

/// One event read from the journal for projection.
struct Row {
    account: String,
    sequence: i64,
    event: CreditEvent,
    recorded_at: DateTime<Utc>,
}

/// Applies journal events to the read tables.
#[derive(Clone)]
pub struct Projector {
    pool: Pool,
    wake: Arc<Notify>,
}

impl Projector {
    pub fn new(pool: Pool, wake: Arc<Notify>) -> Self {
        Self { pool, wake }
    }

    /// Runs until `shutdown` turns true, then finishes the batch in hand.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.run_batch(None).await {
                Ok(n) if n as i64 >= BATCH => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = ?e, "projection batch failed, retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            tokio::select! {
                _ = self.wake.notified() => tokio::time::sleep(GATHER).await,
                _ = tokio::time::sleep(SWEEP) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Projects until the outbox is empty. Returns the number of events applied.
    pub async fn drain(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        loop {
            let (rows, applied) = self.batch(None).await?;
            total += applied;
            if rows == 0 {
                return Ok(total);
            }
        }
    }

    /// Read-your-writes: brings one account's read tables up to its journal before a read, so
    /// a user who was just answered sees what the answer said, on any process. See
    /// [`catch_up`]. Returns the events applied.
    pub async fn catch_up(&self, account: &str) -> anyhow::Result<u64> {
        let mut client = self.pool.get().await.context("projector connection")?;
        catch_up(&mut client, account).await
    }

    /// Projects one batch; returns how many outbox rows it consumed.
    pub async fn run_batch(&self, interrupt: Option<Interrupt>) -> anyhow::Result<u64> {
        Ok(self.batch(interrupt).await?.0)
    }

    async fn batch(&self, interrupt: Option<Interrupt>) -> anyhow::Result<(u64, u64)> {
        let mut client = self.pool.get().await.context("projector connection")?;
        let tx = client.transaction().await?;
        // A projection commit may be lost in a database crash without harm: its outbox rows
        // and checkpoints come back with it, and the work is redone. So it need not wait for
        // its WAL flush, which halves the fsyncs the ledger's appends compete with.
        tx.batch_execute("SET LOCAL synchronous_commit = off")
            .await?;
        let outbox = tx
            .query(
                "SELECT id, aggregate_id FROM projection_outbox ORDER BY id LIMIT $1
                 FOR UPDATE SKIP LOCKED",
                &[&BATCH],
            )
            .await?;
        if outbox.is_empty() {
            return Ok((0, 0));
        }
        let ids: Vec<i64> = outbox.iter().map(|r| r.get(0)).collect();
        let mut accounts: Vec<String> = outbox.iter().map(|r| r.get(1)).collect();
        accounts.sort();
        accounts.dedup();

        tx.execute(
            "INSERT INTO users (id) SELECT unnest($1::text[]) ON CONFLICT (id) DO NOTHING",
            &[&accounts],
        )
        .await?;
        // Lock the checkpoints in a fixed order, so two projectors never deadlock.
        tx.execute(
            "SELECT 1 FROM users WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            &[&accounts],
        )
        .await?;
        let rows = tx
            .query(
                "SELECT e.aggregate_id, e.sequence, e.payload, e.recorded_at
                   FROM events e JOIN users u ON u.id = e.aggregate_id
                  WHERE e.aggregate_type = $1 AND e.aggregate_id = ANY($2)
                    AND e.sequence > u.last_sequence
                  ORDER BY e.aggregate_id, e.sequence",
                &[&CreditAccount::TYPE, &accounts],
            )
            .await?;
        let rows = rows
            .into_iter()
            .map(|r| {
                let Json(event): Json<CreditEvent> = r.try_get(2)?;
                Ok(Row {
                    account: r.get(0),
                    sequence: r.get(1),
                    event,
                    recorded_at: r.get(3),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .context("decoding journal events")?;
        let applied = rows.len() as u64;

        apply_rows(&tx, &rows).await?;

        tx.execute("DELETE FROM projection_outbox WHERE id = ANY($1)", &[&ids])
            .await?;
        // Rows of these accounts outside the batch whose events are now applied too (a long
        // backlog of one account): skip rows another projector holds, they are its work.
        tx.execute(
            "DELETE FROM projection_outbox WHERE id IN (
                 SELECT o.id FROM projection_outbox o JOIN users u ON u.id = o.aggregate_id
                  WHERE o.aggregate_id = ANY($1) AND o.sequence <= u.last_sequence
                    FOR UPDATE OF o SKIP LOCKED)",
            &[&accounts],
        )
        .await?;
        if interrupt == Some(Interrupt::BeforeCommit) {
            // Dropping the transaction rolls it back, exactly as a killed process would.
            anyhow::bail!("projection interrupted before commit");
        }
        tx.commit().await?;
        Ok((ids.len() as u64, applied))
    }
}

/// Brings one account's read tables up to its journal, on a connection the caller holds (the
/// reader's own: a read costs one connection, and with none free it fails before anything is
/// done). Costs one indexed lookup when the account is current (the usual case); otherwise it
/// projects that account's pending events now, under the same per-account checkpoint lock as
/// the batch projector, so nothing is applied twice whoever gets there first.
pub async fn catch_up(
    client: &mut deadpool_postgres::Object,
    account: &str,
) -> anyhow::Result<u64> {
    let behind: bool = client
        .query_one(
            "SELECT coalesce((SELECT max(sequence) FROM events
                               WHERE aggregate_type = $1 AND aggregate_id = $2), 0)
                  > coalesce((SELECT last_sequence FROM users WHERE id = $2), 0)",
            &[&CreditAccount::TYPE, &account],
        )
        .await?
        .get(0);
    if !behind {
        return Ok(0);
    }
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO users (id) VALUES ($1) ON CONFLICT (id) DO NOTHING",
        &[&account],
    )
    .await?;
    tx.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", &[&account])
        .await?;
    let rows = tx
        .query(
            "SELECT e.aggregate_id, e.sequence, e.payload, e.recorded_at
               FROM events e JOIN users u ON u.id = e.aggregate_id
              WHERE e.aggregate_type = $1 AND e.aggregate_id = $2
                AND e.sequence > u.last_sequence
              ORDER BY e.sequence",
            &[&CreditAccount::TYPE, &account],
        )
        .await?;
    let rows = rows
        .into_iter()
        .map(|r| {
            let Json(event): Json<CreditEvent> = r.try_get(2)?;
            Ok(Row {
                account: r.get(0),
                sequence: r.get(1),
                event,
                recorded_at: r.get(3),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .context("decoding journal events")?;
    if rows.is_empty() {
        return Ok(0);
    }
    apply_rows(&tx, &rows).await?;
    // Its outbox rows are done; rows a batch projector holds are left to it (it finds nothing
    // past the checkpoint and deletes them).
    tx.execute(
        "DELETE FROM projection_outbox WHERE id IN (
             SELECT o.id FROM projection_outbox o JOIN users u ON u.id = o.aggregate_id
              WHERE o.aggregate_id = $1 AND o.sequence <= u.last_sequence
                FOR UPDATE OF o SKIP LOCKED)",
        &[&account],
    )
    .await?;
    tx.commit().await?;
    Ok(rows.len() as u64)
}

/// Checkpoint and balance of one account after a batch.
struct AccountUpdate {
    sequence: i64,
    credits: Option<i64>,
    at: DateTime<Utc>,
    /// When the account's first event was recorded, if it is in this batch: the account's
    /// `created_at`, so a rebuild reproduces it.
    first_at: Option<DateTime<Utc>>,
}

async fn apply_rows(tx: &Transaction<'_>, rows: &[Row]) -> anyhow::Result<()> {
    // Statements for one batch are sent together (pipelined) and run in order.
    let mut statements: Vec<(&'static str, Vec<Box<dyn ToSql + Sync + Send>>)> = Vec::new();
    let mut updates: BTreeMap<&str, AccountUpdate> = BTreeMap::new();
    for row in rows {
        statements.extend(statements_for(row));
        let update = updates
            .entry(row.account.as_str())
            .or_insert(AccountUpdate {
                sequence: row.sequence,
                credits: None,
                at: row.recorded_at,
                first_at: None,
            });
        if row.sequence == 1 {
            update.first_at = Some(row.recorded_at);
        }
        update.sequence = row.sequence;
        update.at = row.recorded_at;
        if let Some(balance) = row.event.balance_after() {
            update.credits = Some(balance);
        }
    }
    let ids: Vec<&str> = updates.keys().copied().collect();
    let sequences: Vec<i64> = updates.values().map(|u| u.sequence).collect();
    let credits: Vec<Option<i64>> = updates.values().map(|u| u.credits).collect();
    let ats: Vec<DateTime<Utc>> = updates.values().map(|u| u.at).collect();
    let firsts: Vec<Option<DateTime<Utc>>> = updates.values().map(|u| u.first_at).collect();

    let mut prepared = Vec::with_capacity(statements.len());
    for (sql, _) in &statements {
        prepared.push(tx.prepare_cached(sql).await?);
    }
    let futures = statements.iter().zip(&prepared).map(|((_, params), stmt)| {
        let params: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect();
        async move { tx.execute(stmt, &params).await }
    });
    try_join_all(futures).await?;
    tx.execute(
        "UPDATE users u
            SET last_sequence = v.seq,
                credits = coalesce(v.credits, u.credits),
                created_at = coalesce(v.first_at, u.created_at),
                updated_at = v.at
           FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::timestamptz[],
                       $5::timestamptz[])
                AS v(id, seq, credits, at, first_at)
          WHERE u.id = v.id",
        &[&ids, &sequences, &credits, &ats, &firsts],
    )
    .await?;
    Ok(())
}

type Params = Vec<Box<dyn ToSql + Sync + Send>>;

fn p<T: ToSql + Sync + Send + 'static>(v: T) -> Box<dyn ToSql + Sync + Send> {
    Box::new(v)
}

/// The read-table writes one event causes. Inserts skip an id that exists already: ids are
/// unique UUIDs, and if one were ever claimed by two accounts the audit reports the record
/// mismatch, instead of the projector stalling on that event forever.
fn statements_for(row: &Row) -> Vec<(&'static str, Params)> {
    let at = row.recorded_at;
    let user = row.account.clone();
    match &row.event {
        CreditEvent::RechargeRequested {
            recharge_id,
            amount_fen,
            currency,
            credits,
            credits_per_yuan,
            provider,
        } => vec![(
            "INSERT INTO recharge_records (id, user_id, amount, amount_fen, currency, credits,
                 credits_per_yuan, payment_method, status, created_at)
             VALUES ($1, $2, ($3::bigint)::numeric / 100, $3, $4, $5, $6, $7, 'pending', $8)
             ON CONFLICT (id) DO NOTHING",
            vec![
                p(recharge_id.clone()),
                p(user),
                p(*amount_fen),
                p(currency.clone()),
                p(*credits),
                p(*credits_per_yuan),
                p(provider.clone()),
                p(at),
            ],
        )],
        CreditEvent::RechargeCheckoutCreated {
            recharge_id,
            checkout_session_id,
            checkout_url,
        } => vec![(
            "UPDATE recharge_records SET checkout_session_id = $2, checkout_url = $3 WHERE id = $1",
            vec![
                p(recharge_id.clone()),
                p(checkout_session_id.clone()),
                p(checkout_url.clone()),
            ],
        )],
        CreditEvent::RechargeCompleted {
            recharge_id,
            payment_id,
            ..
        } => vec![(
            "UPDATE recharge_records SET status = 'completed', payment_id = $2, completed_at = $3
              WHERE id = $1",
            vec![p(recharge_id.clone()), p(payment_id.clone()), p(at)],
        )],
        CreditEvent::RechargeFailed {
            recharge_id,
            reason,
        } => vec![(
            "UPDATE recharge_records SET status = 'failed', failure_reason = $2 WHERE id = $1",
            vec![p(recharge_id.clone()), p(reason.clone())],
        )],
        CreditEvent::RechargeCancelled { recharge_id } => vec![(
            "UPDATE recharge_records SET status = 'cancelled' WHERE id = $1",
            vec![p(recharge_id.clone())],
        )],
        CreditEvent::RechargeReversed {
            recharge_id,
            credits,
            ..
        } => vec![(
            "UPDATE recharge_records SET status = 'reversed', reversed_credits = reversed_credits + $2
              WHERE id = $1",
            vec![p(recharge_id.clone()), p(*credits)],
        )],
        CreditEvent::RechargeReinstated {
            recharge_id,
            credits,
            ..
        } => vec![(
            "UPDATE recharge_records
                SET reversed_credits = reversed_credits - $2,
                    status = CASE WHEN reversed_credits - $2 > 0 THEN 'reversed' ELSE 'completed' END
              WHERE id = $1",
            vec![p(recharge_id.clone()), p(*credits)],
        )],
        // Facts about the payment: the credits they move come as their own events.
        CreditEvent::PaymentRefunded { .. } | CreditEvent::PaymentDisputed { .. } => Vec::new(),
        CreditEvent::VideoProgressed { task_id, progress } => vec![(
            "UPDATE video_tasks SET progress = $2, status = 'processing'
              WHERE id = $1 AND status IN ('pending', 'uncertain', 'processing')",
            vec![p(task_id.clone()), p(i32::from(*progress))],
        )],
        CreditEvent::VideoSubmissionUncertain {
            task_id,
            error_message,
        } => vec![(
            "UPDATE video_tasks SET status = 'uncertain', error_message = $2
              WHERE id = $1 AND status = 'pending'",
            vec![p(task_id.clone()), p(error_message.clone())],
        )],
        CreditEvent::VideoDeliveredAfterRefund {
            task_id,
            video_url,
            remove_watermark,
            pid,
        } => vec![(
            "UPDATE video_tasks SET delivered_after_refund = true, video_url = $2,
                    remove_watermark = $3, pid = $4
              WHERE id = $1",
            vec![
                p(task_id.clone()),
                p(video_url.clone()),
                p(*remove_watermark),
                p(pid.clone()),
            ],
        )],
        CreditEvent::CreditsDeducted {
            task_id,
            credits,
            description,
            video,
            ..
        } => vec![
            (
                "INSERT INTO consumption_records (id, user_id, video_task_id, credits, description,
                     status, created_at)
                 VALUES ($1, $2, $1, $3, $4, 'completed', $5)
                 ON CONFLICT (id) DO NOTHING",
                vec![
                    p(task_id.clone()),
                    p(user.clone()),
                    p(*credits),
                    p(description.clone()),
                    p(at),
                ],
            ),
            (
                "INSERT INTO video_tasks (id, user_id, model, prompt, reference_url, aspect_ratio,
                     duration, size, status, credits_charged, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, $10)
                 ON CONFLICT (id) DO NOTHING",
                vec![
                    p(task_id.clone()),
                    p(user),
                    p(video.model.clone()),
                    p(video.prompt.clone()),
                    p(video.reference_url.clone()),
                    p(video.aspect_ratio.clone()),
                    p(i32::try_from(video.duration).unwrap_or(i32::MAX)),
                    p(video.size.clone()),
                    p(*credits),
                    p(at),
                ],
            ),
        ],
        CreditEvent::VideoTaskSubmitted {
            task_id,
            provider_task_id,
        } => vec![(
            "UPDATE video_tasks SET provider_task_id = $2, status = 'processing'
              WHERE id = $1 AND status IN ('pending', 'uncertain', 'processing')",
            vec![p(task_id.clone()), p(provider_task_id.clone())],
        )],
        CreditEvent::VideoSucceeded {
            task_id,
            video_url,
            remove_watermark,
            pid,
        } => vec![(
            "UPDATE video_tasks SET status = 'succeeded', progress = 100, video_url = $2,
                    remove_watermark = $3, pid = $4, completed_at = $5
              WHERE id = $1",
            vec![
                p(task_id.clone()),
                p(video_url.clone()),
                p(*remove_watermark),
                p(pid.clone()),
                p(at),
            ],
        )],
        CreditEvent::VideoFailed {
            task_id,
            failure_reason,
            error_message,
        } => vec![(
            "UPDATE video_tasks SET status = 'failed', failure_reason = $2, error_message = $3,
                    completed_at = $4
              WHERE id = $1",
            vec![
                p(task_id.clone()),
                p(failure_reason.clone()),
                p(error_message.clone()),
                p(at),
            ],
        )],
        CreditEvent::CreditsRefunded { task_id, .. } => vec![
            (
                "UPDATE consumption_records SET status = 'refunded', refunded_at = $2 WHERE id = $1",
                vec![p(task_id.clone()), p(at)],
            ),
            (
                "UPDATE video_tasks SET refunded = true WHERE id = $1",
                vec![p(task_id.clone())],
            ),
        ],
        CreditEvent::CreditsAdjusted { .. } => Vec::new(),
    }
}

/// Empties the read tables and rebuilds them from the journal. Returns events applied.
pub async fn rebuild(projector: &Projector) -> anyhow::Result<u64> {
    let client = projector.pool.get().await?;
    client
        .batch_execute(
            "BEGIN;
             LOCK TABLE projection_outbox IN EXCLUSIVE MODE;
             TRUNCATE users, recharge_records, consumption_records, video_tasks, projection_outbox;
             INSERT INTO projection_outbox (aggregate_id, sequence)
                  SELECT aggregate_id, max(sequence) FROM events GROUP BY aggregate_id;
             COMMIT;",
        )
        .await
        .context("resetting the read tables")?;
    drop(client);
    projector.drain().await
}

/// How far the projections are behind the journal.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Lag {
    pub pending_events: i64,
    pub seconds: f64,
}

pub async fn lag(client: &tokio_postgres::Client) -> anyhow::Result<Lag> {
    let row = client
        .query_one(
            "SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8
               FROM projection_outbox",
            &[],
        )
        .await?;
    Ok(Lag {
        pending_events: row.get(0),
        seconds: row.get(1),
    })
}
