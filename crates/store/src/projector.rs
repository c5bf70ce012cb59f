//! The projector: applies journal events to the read tables, exactly once, whatever crashes.
//!
//! The trigger on `events` writes a `projection_outbox` row in the same transaction as each
//! append. The projector takes a batch of outbox rows, locks the accounts' `users` rows,
//! applies every event after each account's checkpoint (`users.last_sequence`), advances the
//! checkpoint and deletes the outbox rows — all in one read-side transaction. A crash before
//! the commit changes nothing (the outbox rows stay); after it, the work is done. Applying an
//! event twice is impossible because only events past the checkpoint are read, under lock.

use std::collections::{BTreeMap, HashMap};
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

/// How long `drain` waits for outbox rows locked by another transaction.
const DRAIN_PATIENCE: Duration = Duration::from_secs(5);

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
    ///
    /// Outbox rows that a batch cannot take are locked by another transaction: one that is
    /// ending (a batch rolled back, or whose process was killed, releases its rows a moment
    /// after its client has seen it fail) or another projector's. Those are waited for, up
    /// to `DRAIN_PATIENCE`, rather than reported as done.
    pub async fn drain(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        let started = std::time::Instant::now();
        loop {
            let (rows, applied) = self.batch(None).await?;
            total += applied;
            if rows > 0 {
                continue;
            }
            let client = self.pool.get().await.context("projector connection")?;
            let pending: bool = client
                .query_one("SELECT EXISTS (SELECT 1 FROM projection_outbox)", &[])
                .await?
                .try_get(0)?;
            if !pending || started.elapsed() >= DRAIN_PATIENCE {
                return Ok(total);
            }
            drop(client);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Projects one batch; returns how many outbox rows it consumed.
    pub async fn run_batch(&self, interrupt: Option<Interrupt>) -> anyhow::Result<u64> {
        Ok(self.batch(interrupt).await?.0)
    }

    async fn batch(&self, interrupt: Option<Interrupt>) -> anyhow::Result<(u64, u64)> {
        let mut client = self.pool.get().await.context("projector connection")?;
        let tx = client.transaction().await?;
        let (_, outbox) = futures::try_join!(
            tx.batch_execute(BATCH_SETTINGS),
            // Taken and deleted at once: a rollback (or a crash) brings the rows back, and
            // a row deleted here is written once, not locked first and deleted later.
            query(&tx, TAKE, &[&BATCH])
        )?;
        if outbox.is_empty() {
            return Ok((0, 0));
        }
        let taken = highest_sequences(
            outbox
                .iter()
                .map(|r| Ok((r.try_get("aggregate_id")?, r.try_get("sequence")?)))
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()?,
        );
        let mut accounts: Vec<&str> = taken.keys().copied().collect();
        accounts.sort();
        let by_account: &[&(dyn ToSql + Sync)] = &[&accounts];
        let events_of: &[&(dyn ToSql + Sync)] = &[&accounts, &CreditAccount::TYPE];

        // Sent together (pipelined), run in order: create the missing checkpoints and lock
        // them all, in a fixed order (two projectors never deadlock); read the events past
        // them. Both are prepared before either is sent, so the read can never reach the
        // server ahead of the lock (as it would on a connection where `catch_up` has cached
        // only the read: a_batch_locks_before_it_reads_when_only_the_read_is_cached).
        let (lock, read) = futures::try_join!(
            tx.prepare_cached(LOCK_CHECKPOINTS),
            tx.prepare_cached(EVENTS_PAST_CHECKPOINTS)
        )?;
        let (_, rows) =
            futures::try_join!(tx.execute(&lock, by_account), tx.query(&read, events_of))?;
        let (checkpoints, rows) = decode_rows(rows)?;
        // Every row taken is an event committed before the batch began, so after the read
        // each account is at or past it: through its checkpoint (another projector, or a
        // reader catching up, applied it) or through the events read. Anything else would
        // delete outbox rows whose events were never applied, a silent hole in the read
        // tables until a rebuild; the batch is rolled back instead, and retried.
        let read_to = highest_sequences(rows.iter().map(|r| (r.account.as_str(), r.sequence)));
        for (account, taken) in &taken {
            let checkpoint = checkpoints.get(*account).with_context(|| {
                format!("projection batch: the checkpoint of {account} is not visible")
            })?;
            let reached = read_to
                .get(account)
                .map_or(*checkpoint, |r| (*r).max(*checkpoint));
            anyhow::ensure!(
                reached >= *taken,
                "projection batch: {account} has an outbox row for event {taken}, but its \
                 checkpoint is {checkpoint} and no event past it could be read"
            );
        }
        let applied = rows.len() as u64;

        apply_rows(&tx, &rows).await?;

        // The rows outside the batch whose events are now applied too (a long backlog of one
        // account, or an append committed since the batch was taken): only accounts whose
        // applied events go past the rows taken can have any, so only theirs are looked for
        // (a lookup per account of the batch was an eighth of the projector's time). Rows
        // another projector holds are skipped, they are its work. One missed here is no harm:
        // a later batch finds nothing past the checkpoint for it and deletes it.
        let beyond: Vec<&str> = read_to
            .into_iter()
            .filter(|(account, last)| taken.get(account).is_none_or(|t| last > t))
            .map(|(account, _)| account)
            .collect();
        if !beyond.is_empty() {
            execute(&tx, CLEAR_APPLIED, &[&beyond]).await?;
        }
        if interrupt == Some(Interrupt::BeforeCommit) {
            // Dropping the transaction rolls it back, exactly as a killed process would.
            anyhow::bail!("projection interrupted before commit");
        }
        tx.commit().await?;
        Ok((outbox.len() as u64, applied))
    }
}

/// Settings of a batch's transaction. A projection commit may be lost in a database crash
/// without harm: its outbox rows and checkpoints come back with it, and the work is redone; so
/// it need not wait for its WAL flush, which halves the fsyncs the ledger's appends compete
/// with. JIT off: the read of the accounts' new events is estimated at a third of each
/// account's history (the checkpoint comes from a join), which would compile it (tens of ms)
/// for a read of a few rows. Whole-table scans off: the outbox is a queue, its statistics see
/// a few rows while its heap holds the dead rows of thousands of deletes a second, so both
/// deletes of the outbox were planned as sequential scans of it (1.5 and 3 ms a batch under
/// `ledger-bench`'s spread load, against a few hundred µs by its indexes;
/// crates/store/tests/plans.rs).
const BATCH_SETTINGS: &str =
    "SET LOCAL synchronous_commit = off; SET LOCAL jit = off; SET LOCAL enable_seqscan = off";

/// Creates the checkpoint (`users` row) of each account of `$1` that has none and locks
/// every one of them, in the order of `$1` (sorted). One statement: `ON CONFLICT DO UPDATE`
/// locks the row it conflicts with even when its `WHERE` updates nothing (PostgreSQL's
/// `INSERT` reference), where an insert `ON CONFLICT DO NOTHING` then a `SELECT … FOR
/// UPDATE` took two passes over the same keys.
const LOCK_CHECKPOINTS: &str = "INSERT INTO users (id) SELECT unnest($1::text[])
    ON CONFLICT (id) DO UPDATE SET id = EXCLUDED.id WHERE false";

/// Takes (deletes) the next `$1` outbox rows that no other projector holds. (The outbox
/// statements begin with their first word: tests find a blocked batch by its query's start.)
const TAKE: &str = "DELETE FROM projection_outbox WHERE id IN (
    SELECT id FROM projection_outbox ORDER BY id LIMIT $1
       FOR UPDATE SKIP LOCKED)
RETURNING aggregate_id, sequence";

/// Deletes the outbox rows of the accounts `$1` that their checkpoints have passed.
const CLEAR_APPLIED: &str = "DELETE FROM projection_outbox WHERE id IN (
    SELECT o.id FROM projection_outbox o JOIN users u ON u.id = o.aggregate_id
     WHERE o.aggregate_id = ANY($1) AND o.sequence <= u.last_sequence
       FOR UPDATE OF o SKIP LOCKED)";

/// A batch's settings, its lock of the checkpoints, its two outbox statements (`TAKE`,
/// `CLEAR_APPLIED`) and its read of the events (`EVENTS_PAST_CHECKPOINTS`), for tests that
/// check how a batch plans, locks and orders its statements.
#[doc(hidden)]
pub fn batch_statements() -> [&'static str; 5] {
    [
        BATCH_SETTINGS,
        LOCK_CHECKPOINTS,
        TAKE,
        CLEAR_APPLIED,
        EVENTS_PAST_CHECKPOINTS,
    ]
}

/// The highest sequence of each account among `pairs` of (account, sequence).
fn highest_sequences<'a>(pairs: impl IntoIterator<Item = (&'a str, i64)>) -> HashMap<&'a str, i64> {
    let mut highest = HashMap::new();
    for (account, sequence) in pairs {
        let last = highest.entry(account).or_insert(sequence);
        *last = (*last).max(sequence);
    }
    highest
}

/// The checkpoints of the accounts `$1` and the events past them, by account then sequence:
/// one row per event, and a row with no event (`sequence` null) for an account that has
/// none past its checkpoint, so that every account's checkpoint is read. Per account
/// (LATERAL), so that the read is a range of the journal's primary key from the checkpoint
/// on: a join on the checkpoint let PostgreSQL scan every event of the account (a parallel
/// sequential scan of the journal, 245 ms, for an account with 333,000 events in
/// `ledger-bench`'s long-history part), so that projection cost grew with history.
const EVENTS_PAST_CHECKPOINTS: &str = "
SELECT u.id AS aggregate_id, u.last_sequence AS checkpoint, e.sequence, e.payload,
       e.recorded_at
  FROM users u
  LEFT JOIN LATERAL (
        SELECT e.sequence, e.payload, e.recorded_at
          FROM events e
         WHERE e.aggregate_type = $2 AND e.aggregate_id = u.id
           AND e.sequence > u.last_sequence
         ORDER BY e.sequence) e ON true
 WHERE u.id = ANY($1)
 ORDER BY u.id, e.sequence";

/// Brings one account's read tables up to its journal, on a connection the caller holds (the
/// reader's own: a read costs one connection, and with none free it fails before anything is
/// done). Costs one indexed lookup when the account is current (the usual case); otherwise it
/// projects that account's pending events now, under the same per-account checkpoint lock as
/// the batch projector, so nothing is applied twice whoever gets there first.
pub async fn catch_up(
    client: &mut deadpool_postgres::Object,
    account: &str,
) -> anyhow::Result<u64> {
    let check = client
        .prepare_cached(
            "SELECT coalesce((SELECT max(sequence) FROM events
                               WHERE aggregate_type = $1 AND aggregate_id = $2), 0)
                  > coalesce((SELECT last_sequence FROM users WHERE id = $2), 0)",
        )
        .await?;
    let behind: bool = client
        .query_one(&check, &[&CreditAccount::TYPE, &account])
        .await?
        .get(0);
    crate::metrics::own_read(behind);
    if !behind {
        return Ok(0);
    }
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO users (id) VALUES ($1) ON CONFLICT (id) DO NOTHING",
        &[&account],
    )
    .await?;
    let accounts: &[&str] = &[account];
    let (lock, read) = futures::try_join!(
        tx.prepare_cached("SELECT 1 FROM users WHERE id = $1 FOR UPDATE"),
        tx.prepare_cached(EVENTS_PAST_CHECKPOINTS)
    )?;
    // Prepared first, then sent together and run in order (as in a batch).
    let lock_params: &[&(dyn ToSql + Sync)] = &[&account];
    let read_params: &[&(dyn ToSql + Sync)] = &[&accounts, &CreditAccount::TYPE];
    let (_, _, rows) = futures::try_join!(
        tx.batch_execute("SET LOCAL jit = off"),
        tx.execute(&lock, lock_params),
        tx.query(&read, read_params),
    )?;
    let (_, rows) = decode_rows(rows)?;
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

/// Runs a statement through the connection's statement cache (parsed once per connection).
/// Several of these in one `try_join!` are sent together (pipelined) and run in the order
/// they reach the server, which is the order of the `try_join!` only when every one is
/// already cached: one not yet prepared is sent after its preparation's round trip, behind
/// a cached one joined after it. Where the order matters, prepare all of them first.
async fn execute(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.execute(&statement, params).await
}

async fn query(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.query(&statement, params).await
}

/// The rows of `EVENTS_PAST_CHECKPOINTS` as each account's checkpoint and the events to
/// project.
fn decode_rows(rows: Vec<tokio_postgres::Row>) -> anyhow::Result<(HashMap<String, i64>, Vec<Row>)> {
    let mut checkpoints = HashMap::new();
    let mut events = Vec::with_capacity(rows.len());
    for r in rows {
        let account: String = r.try_get("aggregate_id")?;
        if !checkpoints.contains_key(&account) {
            checkpoints.insert(account.clone(), r.try_get("checkpoint")?);
        }
        let Some(sequence) = r.try_get::<_, Option<i64>>("sequence")? else {
            continue;
        };
        let Json(event): Json<CreditEvent> = r
            .try_get("payload")
            .with_context(|| format!("decoding event {sequence} of {account}"))?;
        events.push(Row {
            account,
            sequence,
            event,
            recorded_at: r.try_get("recorded_at")?,
        });
    }
    Ok((checkpoints, events))
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

/// Applies a batch's events to the read tables set-based: the writes of all its events are
/// grouped by statement, and each statement runs once over arrays (`unnest`), however many
/// events it serves. Writes to one row keep their journal order: the n-th write to a row in
/// the batch runs in the n-th round, and a round's statements touch each row at most once. A
/// batch of deductions is thus two inserts, whatever its size; a task deducted, submitted
/// and finished within one batch takes three rounds. Then the checkpoints and balances.
async fn apply_rows(tx: &Transaction<'_>, rows: &[Row]) -> anyhow::Result<()> {
    let statements = plan(rows.iter().flat_map(writes_for))?;
    let mut updates: BTreeMap<&str, AccountUpdate> = BTreeMap::new();
    for row in rows {
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

    let prepared = try_join_all(statements.iter().map(|s| tx.prepare_cached(s.sql))).await?;
    // Sent together (pipelined), run in order.
    let writes = statements
        .iter()
        .zip(&prepared)
        .map(|(statement, prepared)| {
            let params: Vec<&(dyn ToSql + Sync)> =
                statement.columns.iter().map(Column::as_param).collect();
            async move { tx.execute(prepared, &params).await }
        });
    let checkpoints: &[&(dyn ToSql + Sync)] = &[&ids, &sequences, &credits, &ats, &firsts];
    let checkpoints = execute(
        tx,
        "UPDATE users u
            SET last_sequence = v.seq,
                credits = coalesce(v.credits, u.credits),
                created_at = coalesce(v.first_at, u.created_at),
                updated_at = v.at
           FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::timestamptz[],
                       $5::timestamptz[])
                AS v(id, seq, credits, at, first_at)
          WHERE u.id = v.id",
        checkpoints,
    );
    futures::try_join!(try_join_all(writes), checkpoints)?;
    Ok(())
}

/// One read-table write caused by one event: the row it writes, the statement (written over
/// arrays, `$1` being the row's id) and this event's values for the statement's parameters.
struct Write {
    table: &'static str,
    id: String,
    sql: &'static str,
    values: Vec<Value>,
}

impl Write {
    fn new(table: &'static str, id: &str, sql: &'static str, mut values: Vec<Value>) -> Self {
        values.insert(0, text(id));
        Self {
            table,
            id: id.to_owned(),
            sql,
            values,
        }
    }
}

/// A statement's parameter value for one event.
#[derive(Clone)]
enum Value {
    Text(Option<String>),
    Int8(i64),
    Int4(i32),
    Bool(Option<bool>),
    Time(DateTime<Utc>),
}

fn text(v: &str) -> Value {
    Value::Text(Some(v.to_owned()))
}

fn opt_text(v: &Option<String>) -> Value {
    Value::Text(v.clone())
}

/// A statement's parameter over every event it serves in a round: one array.
enum Column {
    Text(Vec<Option<String>>),
    Int8(Vec<i64>),
    Int4(Vec<i32>),
    Bool(Vec<Option<bool>>),
    Time(Vec<DateTime<Utc>>),
}

impl Column {
    fn of(value: &Value) -> Self {
        match value {
            Value::Text(_) => Self::Text(Vec::new()),
            Value::Int8(_) => Self::Int8(Vec::new()),
            Value::Int4(_) => Self::Int4(Vec::new()),
            Value::Bool(_) => Self::Bool(Vec::new()),
            Value::Time(_) => Self::Time(Vec::new()),
        }
    }

    fn push(&mut self, value: Value) -> anyhow::Result<()> {
        match (self, value) {
            (Self::Text(c), Value::Text(v)) => c.push(v),
            (Self::Int8(c), Value::Int8(v)) => c.push(v),
            (Self::Int4(c), Value::Int4(v)) => c.push(v),
            (Self::Bool(c), Value::Bool(v)) => c.push(v),
            (Self::Time(c), Value::Time(v)) => c.push(v),
            _ => anyhow::bail!("a projection statement got values of two different types"),
        }
        Ok(())
    }

    fn as_param(&self) -> &(dyn ToSql + Sync) {
        match self {
            Self::Text(c) => c,
            Self::Int8(c) => c,
            Self::Int4(c) => c,
            Self::Bool(c) => c,
            Self::Time(c) => c,
        }
    }
}

/// A statement and its arrays, for one round.
struct Statement {
    sql: &'static str,
    columns: Vec<Column>,
}

/// Groups writes (in journal order) into statements: the n-th write to a row goes into the
/// n-th round; within a round, one statement per distinct SQL. Rounds come out in order.
fn plan(writes: impl Iterator<Item = Write>) -> anyhow::Result<Vec<Statement>> {
    let mut rounds: Vec<Vec<Statement>> = Vec::new();
    let mut written: HashMap<(&'static str, String), usize> = HashMap::new();
    for write in writes {
        let round = written.entry((write.table, write.id)).or_insert(0);
        let n = *round;
        *round += 1;
        if rounds.len() <= n {
            rounds.resize_with(n + 1, Vec::new);
        }
        let statements = &mut rounds[n];
        let statement = match statements.iter().position(|s| s.sql == write.sql) {
            Some(i) => &mut statements[i],
            None => {
                statements.push(Statement {
                    sql: write.sql,
                    columns: write.values.iter().map(Column::of).collect(),
                });
                let last = statements.len() - 1;
                &mut statements[last]
            }
        };
        anyhow::ensure!(
            statement.columns.len() == write.values.len(),
            "a projection statement got a different number of values"
        );
        for (column, value) in statement.columns.iter_mut().zip(write.values) {
            column.push(value)?;
        }
    }
    Ok(rounds.into_iter().flatten().collect())
}

/// The read-table writes one event causes. Inserts skip an id that exists already: ids are
/// unique UUIDs, and if one were ever claimed by two accounts the audit reports the record
/// mismatch, instead of the projector stalling on that event forever.
///
/// Each statement reads its rows from `unnest` of one array per parameter (`$1` is the id of
/// the row written), so one statement serves every event of its kind in a batch.
fn writes_for(row: &Row) -> Vec<Write> {
    let at = Value::Time(row.recorded_at);
    let user = || text(&row.account);
    match &row.event {
        CreditEvent::RechargeRequested {
            recharge_id,
            amount_fen,
            currency,
            credits,
            credits_per_yuan,
            provider,
        } => vec![Write::new(
            "recharge_records",
            recharge_id,
            "INSERT INTO recharge_records (id, user_id, amount, amount_fen, currency, credits,
                 credits_per_yuan, payment_method, status, created_at)
             SELECT v.id, v.user_id, v.amount_fen::numeric / 100, v.amount_fen, v.currency,
                    v.credits, v.credits_per_yuan, v.provider, 'pending', v.at
               FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[],
                           $6::bigint[], $7::text[], $8::timestamptz[])
                    AS v(id, user_id, amount_fen, currency, credits, credits_per_yuan,
                         provider, at)
             ON CONFLICT (id) DO NOTHING",
            vec![
                user(),
                Value::Int8(*amount_fen),
                text(currency),
                Value::Int8(*credits),
                Value::Int8(*credits_per_yuan),
                text(provider),
                at,
            ],
        )],
        CreditEvent::RechargeCheckoutCreated {
            recharge_id,
            checkout_session_id,
            checkout_url,
        } => vec![Write::new(
            "recharge_records",
            recharge_id,
            "UPDATE recharge_records r SET checkout_session_id = v.session, checkout_url = v.url
               FROM unnest($1::text[], $2::text[], $3::text[]) AS v(id, session, url)
              WHERE r.id = v.id",
            vec![text(checkout_session_id), opt_text(checkout_url)],
        )],
        CreditEvent::RechargeCompleted {
            recharge_id,
            payment_id,
            ..
        } => vec![Write::new(
            "recharge_records",
            recharge_id,
            "UPDATE recharge_records r
                SET status = 'completed', payment_id = v.payment_id, completed_at = v.at
               FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS v(id, payment_id, at)
              WHERE r.id = v.id",
            vec![text(payment_id), at],
        )],
        CreditEvent::RechargeFailed {
            recharge_id,
            reason,
        } => vec![Write::new(
            "recharge_records",
            recharge_id,
            "UPDATE recharge_records r SET status = 'failed', failure_reason = v.reason
               FROM unnest($1::text[], $2::text[]) AS v(id, reason)
              WHERE r.id = v.id",
            vec![text(reason)],
        )],
        CreditEvent::RechargeCancelled { recharge_id } => vec![Write::new(
            "recharge_records",
            recharge_id,
            "UPDATE recharge_records r SET status = 'cancelled'
               FROM unnest($1::text[]) AS v(id)
              WHERE r.id = v.id",
            vec![],
        )],
        CreditEvent::RechargeReversed {
            recharge_id,
            credits,
            ..
        } => vec![Write::new(
            "recharge_records",
            recharge_id,
            "UPDATE recharge_records r
                SET status = 'reversed', reversed_credits = r.reversed_credits + v.credits
               FROM unnest($1::text[], $2::bigint[]) AS v(id, credits)
              WHERE r.id = v.id",
            vec![Value::Int8(*credits)],
        )],
        CreditEvent::RechargeReinstated {
            recharge_id,
            credits,
            ..
        } => vec![Write::new(
            "recharge_records",
            recharge_id,
            "UPDATE recharge_records r
                SET reversed_credits = r.reversed_credits - v.credits,
                    status = CASE WHEN r.reversed_credits - v.credits > 0
                                  THEN 'reversed' ELSE 'completed' END
               FROM unnest($1::text[], $2::bigint[]) AS v(id, credits)
              WHERE r.id = v.id",
            vec![Value::Int8(*credits)],
        )],
        // Facts about the payment: the credits they move come as their own events.
        CreditEvent::PaymentRefunded { .. } | CreditEvent::PaymentDisputed { .. } => Vec::new(),
        CreditEvent::VideoProgressed { task_id, progress } => vec![Write::new(
            "video_tasks",
            task_id,
            "UPDATE video_tasks t SET progress = v.progress, status = 'processing'
               FROM unnest($1::text[], $2::int4[]) AS v(id, progress)
              WHERE t.id = v.id AND t.status IN ('pending', 'uncertain', 'processing')",
            vec![Value::Int4(i32::from(*progress))],
        )],
        CreditEvent::VideoSubmissionUncertain {
            task_id,
            error_message,
        } => vec![Write::new(
            "video_tasks",
            task_id,
            "UPDATE video_tasks t SET status = 'uncertain', error_message = v.error_message
               FROM unnest($1::text[], $2::text[]) AS v(id, error_message)
              WHERE t.id = v.id AND t.status = 'pending'",
            vec![text(error_message)],
        )],
        CreditEvent::VideoDeliveredAfterRefund {
            task_id,
            video_url,
            remove_watermark,
            pid,
        } => vec![Write::new(
            "video_tasks",
            task_id,
            "UPDATE video_tasks t
                SET delivered_after_refund = true, video_url = v.video_url,
                    remove_watermark = v.remove_watermark, pid = v.pid
               FROM unnest($1::text[], $2::text[], $3::boolean[], $4::text[])
                    AS v(id, video_url, remove_watermark, pid)
              WHERE t.id = v.id",
            vec![
                text(video_url),
                Value::Bool(*remove_watermark),
                opt_text(pid),
            ],
        )],
        CreditEvent::CreditsDeducted {
            task_id,
            credits,
            description,
            video,
            ..
        } => vec![
            Write::new(
                "consumption_records",
                task_id,
                "INSERT INTO consumption_records (id, user_id, video_task_id, credits,
                     description, status, created_at)
                 SELECT v.id, v.user_id, v.id, v.credits, v.description, 'completed', v.at
                   FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[],
                               $5::timestamptz[])
                        AS v(id, user_id, credits, description, at)
                 ON CONFLICT (id) DO NOTHING",
                vec![user(), Value::Int8(*credits), text(description), at.clone()],
            ),
            Write::new(
                "video_tasks",
                task_id,
                "INSERT INTO video_tasks (id, user_id, model, prompt, reference_url,
                     aspect_ratio, duration, size, status, credits_charged, created_at)
                 SELECT v.id, v.user_id, v.model, v.prompt, v.reference_url, v.aspect_ratio,
                        v.duration, v.size, 'pending', v.credits, v.at
                   FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                               $6::text[], $7::integer[], $8::text[], $9::bigint[],
                               $10::timestamptz[])
                        AS v(id, user_id, model, prompt, reference_url, aspect_ratio,
                             duration, size, credits, at)
                 ON CONFLICT (id) DO NOTHING",
                vec![
                    user(),
                    text(&video.model),
                    text(&video.prompt),
                    opt_text(&video.reference_url),
                    text(&video.aspect_ratio),
                    Value::Int4(i32::try_from(video.duration).unwrap_or(i32::MAX)),
                    text(&video.size),
                    Value::Int8(*credits),
                    at,
                ],
            ),
        ],
        CreditEvent::VideoTaskSubmitted {
            task_id,
            provider_task_id,
        } => vec![Write::new(
            "video_tasks",
            task_id,
            "UPDATE video_tasks t SET provider_task_id = v.provider_task_id, status = 'processing'
               FROM unnest($1::text[], $2::text[]) AS v(id, provider_task_id)
              WHERE t.id = v.id AND t.status IN ('pending', 'uncertain', 'processing')",
            vec![text(provider_task_id)],
        )],
        CreditEvent::VideoSucceeded {
            task_id,
            video_url,
            remove_watermark,
            pid,
        } => vec![Write::new(
            "video_tasks",
            task_id,
            "UPDATE video_tasks t
                SET status = 'succeeded', progress = 100, video_url = v.video_url,
                    remove_watermark = v.remove_watermark, pid = v.pid, completed_at = v.at
               FROM unnest($1::text[], $2::text[], $3::boolean[], $4::text[], $5::timestamptz[])
                    AS v(id, video_url, remove_watermark, pid, at)
              WHERE t.id = v.id",
            vec![
                text(video_url),
                Value::Bool(*remove_watermark),
                opt_text(pid),
                at,
            ],
        )],
        CreditEvent::VideoFailed {
            task_id,
            failure_reason,
            error_message,
        } => vec![Write::new(
            "video_tasks",
            task_id,
            "UPDATE video_tasks t
                SET status = 'failed', failure_reason = v.failure_reason,
                    error_message = v.error_message, completed_at = v.at
               FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
                    AS v(id, failure_reason, error_message, at)
              WHERE t.id = v.id",
            vec![text(failure_reason), text(error_message), at],
        )],
        CreditEvent::CreditsRefunded { task_id, .. } => vec![
            Write::new(
                "consumption_records",
                task_id,
                "UPDATE consumption_records c SET status = 'refunded', refunded_at = v.at
                   FROM unnest($1::text[], $2::timestamptz[]) AS v(id, at)
                  WHERE c.id = v.id",
                vec![at],
            ),
            Write::new(
                "video_tasks",
                task_id,
                "UPDATE video_tasks t SET refunded = true
                   FROM unnest($1::text[]) AS v(id)
                  WHERE t.id = v.id",
                vec![],
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
