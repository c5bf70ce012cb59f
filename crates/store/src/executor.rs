//! The command executor: runs commands against accounts and returns what they committed.
//!
//! Commands wait in one queue per process, and a committer task takes them in batches. A
//! batch holds the commands of many accounts: each account's commands are decided one after
//! the other on that account's state, and the events of every account are appended together
//! by one statement (`INSERT … SELECT … FROM unnest(…)`), which is its own transaction: one
//! round trip and one commit for the batch (group commit). The snapshots it brings due are
//! written after it, best effort (a snapshot is a cache: failing to write one never fails a
//! command). Batches form by themselves: a free committer takes everything queued, so
//! under load the queue fills while a batch commits, and a command arriving on an idle system
//! is taken at once, without waiting for company. A committer that finds the queue empty
//! waits a moment (`KEEP_COMMITTER`) to be woken by the next command before it ends, so that
//! commands coming one by one do not each start a task and take a connection. An account is
//! in one batch at a time, so a hot account queues instead of conflicting.
//!
//! The optimistic check stays per account: the journal's primary key (account, sequence)
//! refuses an append on an account that another process has moved past the state it was
//! decided on. The batch then learns which accounts moved, decides only those again on fresh
//! state, and appends the others' events unchanged. When the database refuses a batch for any
//! other reason (a value that jsonb cannot store, say), the batch is split in halves until
//! the refused account is alone, and that account's commands are then run one at a time, so
//! only the command the database refuses is answered with `ExecuteError::Store`.
//!
//! Decided state is kept in memory between commands (bounded). Kept state that another
//! process has overtaken can never be committed (the primary key again), and a refusal
//! decided on kept state is decided again on fresh state before it stands.
//!
//! An account keeps only recent ids in memory (`credit_domain::RECENT_SETTLED_TASKS`), so
//! the journal is what refuses a duplicate of an older one: its unique indexes
//! (`migrations/0008_idempotency_indexes.sql`) make the append fail, and the executor, having
//! found that no account moved, looks up which decided events repeat an id of the journal and
//! answers exactly those commands with the domain's refusal (`TaskAlreadyCharged`,
//! `RechargeExists`, `AdjustmentExists`); the rest of the batch is appended. Likewise a
//! command about a task the account no longer keeps (`UnknownTask` on fresh state) is
//! answered `TaskAlreadySettled` when the journal shows the task was charged: only settled
//! tasks are ever forgotten.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
use std::time::Duration;

use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{Aggregate, AggregateError, DomainEvent, EventEnvelope, EventStore};
use credit_domain::{CreditAccount, CreditCommand, CreditEvent, LedgerError, UserId};
use postgres_es::PostgresEventRepository;
use rand::Rng;
use sqlx::Row as _;
use tokio::sync::{oneshot, Notify};

/// The fewest events between two snapshots of an account. A snapshot serialises the whole
/// account, so taking one is not free: at 100, a hot account with thousands of tasks spent
/// most of its time writing snapshots (see docs/BENCHMARKS.md). An account that keeps more
/// than twice as many entries (open tasks, recharges) waits for half as many events as it
/// keeps entries (`snapshot_due`): writing snapshots then costs a bounded amount per event
/// whatever the account's size, and a cold load reads at most that many events after the
/// snapshot.
pub const SNAPSHOT_EVERY: usize = 500;
/// How many idle accounts' states are kept in memory.
pub const KEEP_IDLE_ACCOUNTS: usize = 10_000;
/// The most commands decided and appended together.
pub const MAX_BATCH: usize = 256;
/// Batches that may be committing at the same time (on different accounts): while one waits
/// for its commit to be flushed, the next one's statement runs (see docs/BENCHMARKS.md).
pub const COMMITTERS: usize = 2;
/// How long a committer that finds nothing to take waits for more before it ends.
pub const KEEP_COMMITTER: Duration = Duration::from_millis(100);
const MAX_ATTEMPTS: u32 = 12;
/// How long, after a connection broke with an append sent, the journal is read again to
/// learn whether the append committed, before the outcome is answered as unknown.
const VERIFY_FOR: Duration = Duration::from_secs(3);
/// A command is answered within this (as "unknown" if its batch has not finished by then):
/// a write request never waits longer for the journal, whatever the database does.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// Append fences are kept this long, and swept every this many appends.
const KEEP_FENCES: Duration = Duration::from_secs(600);
const SWEEP_FENCES_EVERY: u64 = 4096;

/// The smallest UUIDv7 of the millisecond `age` before `fence`'s: fences below it are older.
fn fence_before(fence: uuid::Uuid, age: Duration) -> uuid::Uuid {
    let (seconds, nanos) = fence.get_timestamp().map_or((0, 0), |t| t.to_unix());
    let millis = (u128::from(seconds) * 1000 + u128::from(nanos) / 1_000_000)
        .saturating_sub(age.as_millis());
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&(millis as u64).to_be_bytes()[2..]);
    uuid::Uuid::from_bytes(bytes)
}

/// What a command committed.
#[derive(Debug, Clone)]
pub struct Committed {
    pub events: Vec<EventEnvelope<CreditAccount>>,
    /// The account's balance right after this command.
    pub balance: i64,
    /// The account's last sequence right after this command.
    pub sequence: usize,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ExecuteError {
    /// The domain refused the command; nothing was written.
    #[error(transparent)]
    Rejected(#[from] LedgerError),
    /// Other writers kept winning the race for this account; nothing was written.
    #[error("account {0} is too busy, gave up after {MAX_ATTEMPTS} attempts")]
    Contended(String),
    /// The database could not be reached, or went away before the command's events were
    /// sent or while they were refused: nothing was written, and the command may be sent
    /// again.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The command's events were sent and no answer came back (the connection broke, the
    /// server shut down), and the journal could not be read afterwards to tell whether they
    /// were committed: the command may or may not have been carried out. Sending it again
    /// under the same idempotency key finds out (a committed one is answered as a repeat).
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// The database refused the command's events for a reason of its own (a value it cannot
    /// store); nothing was written.
    #[error("event store error: {0}")]
    Store(String),
}

impl ExecuteError {
    /// A failed read (loading an account, checking who moved): nothing was written, so a
    /// connection lost or a server going away is `Unavailable`; a refusal is `Store`.
    fn from_read(e: sqlx::Error) -> Self {
        if connection_lost(&e) {
            Self::Unavailable(e.to_string())
        } else {
            Self::Store(e.to_string())
        }
    }
}

/// Whether `e` is the connection or the server failing rather than a statement refused:
/// no connection in time, a broken connection, or a server shutting down, out of resources
/// or failing (SQLSTATE classes 08, 53, 57, 58 and XX).
fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            ["08", "53", "57", "58", "XX"]
                .iter()
                .any(|class| code.starts_with(class))
        }),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

type Reply = Result<Committed, ExecuteError>;

struct Pending {
    account: UserId,
    command: CreditCommand,
    metadata: HashMap<String, String>,
    reply: oneshot::Sender<Reply>,
}

/// An account's state as of `sequence`.
struct Kept {
    aggregate: CreditAccount,
    sequence: usize,
    /// The snapshot counter (postgres-es's `current_snapshot`), if the account has one.
    snapshot: Option<usize>,
    /// The sequence its latest snapshot was taken at (0: none).
    snapshot_at: usize,
    /// The hash of the account's last event (empty before its first), which its next event's
    /// hash links to (`crate::chain`). `None` when not known: the journal then computes the
    /// links of the account's events (migrations/0012_chain_linked_by_the_appender.sql).
    head: Option<Vec<u8>>,
}

/// Commands not taken yet, the accounts that batches hold, and idle accounts' states.
struct Queue {
    waiting: VecDeque<Pending>,
    busy: HashSet<String>,
    idle: lru::LruCache<String, Kept>,
    /// Committer tasks running (at most `COMMITTERS`), the waiting ones among them.
    committers: usize,
    /// Committers that found nothing to take and wait a moment for more (`KEEP_COMMITTER`).
    waiting_committers: usize,
}

/// Runs commands against `CreditAccount`s stored in postgres-es's tables.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    /// Loads accounts: the latest snapshot plus the events after it.
    store: PersistedEventStore<PostgresEventRepository, CreditAccount>,
    /// Appends events and snapshots to postgres-es's tables.
    pool: sqlx::PgPool,
    queue: StdMutex<Queue>,
    /// Wakes a committer waiting for work (one that found the queue empty).
    work: Notify,
    appended: Arc<Notify>,
    /// Appends sent by this process (for sweeping old fences).
    appends: std::sync::atomic::AtomicU64,
}

impl Ledger {
    pub fn new(pool: sqlx::PgPool) -> Self {
        let inner = Inner {
            store: PersistedEventStore::new_snapshot_store(
                PostgresEventRepository::new(pool.clone()),
                SNAPSHOT_EVERY,
            ),
            pool,
            queue: StdMutex::new(Queue {
                waiting: VecDeque::new(),
                busy: HashSet::new(),
                idle: lru::LruCache::new(
                    std::num::NonZeroUsize::new(KEEP_IDLE_ACCOUNTS)
                        .unwrap_or(std::num::NonZeroUsize::MIN),
                ),
                committers: 0,
                waiting_committers: 0,
            }),
            work: Notify::new(),
            appended: Arc::new(Notify::new()),
            appends: std::sync::atomic::AtomicU64::new(0),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Notified after every successful append: wakes the projector in this process.
    pub fn appended(&self) -> Arc<Notify> {
        self.inner.appended.clone()
    }

    /// Loads an account's current state from the journal (without queueing).
    pub async fn load(&self, account: &UserId) -> Result<(CreditAccount, usize), ExecuteError> {
        let kept = self
            .inner
            .load_many(&[account], &mut None)
            .await
            .remove(account.as_str())
            .unwrap_or_else(|| {
                Err(ExecuteError::Store(
                    "account state was not loaded".to_owned(),
                ))
            })?;
        Ok((kept.aggregate, kept.sequence))
    }

    /// Decides `command` against the account and appends the resulting events atomically.
    ///
    /// Once submitted, the command is carried through by a committer task even if the caller
    /// goes away (an HTTP client disconnecting): other callers' commands may share its batch.
    pub async fn execute(
        &self,
        account: &UserId,
        command: CreditCommand,
        metadata: HashMap<String, String>,
    ) -> Result<Committed, ExecuteError> {
        let (reply, answer) = oneshot::channel();
        let kind = command.kind();
        Inner::submit(
            &self.inner,
            Pending {
                account: account.clone(),
                command,
                metadata,
                reply,
            },
        );
        // The committer carries the command through whatever the caller does; past the
        // deadline, the caller is told that the outcome is not known yet.
        let answer = match tokio::time::timeout(ANSWER_WITHIN, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(ExecuteError::Store("command was dropped".to_owned())),
            Err(_) => Err(ExecuteError::Unknown(format!(
                "no answer from the journal within {ANSWER_WITHIN:?}"
            ))),
        };
        let outcome = match &answer {
            Ok(done) => {
                crate::metrics::appended(done.events.iter().map(|e| &e.payload));
                crate::metrics::Outcome::Committed
            }
            Err(ExecuteError::Rejected(_)) => crate::metrics::Outcome::Rejected,
            Err(ExecuteError::Contended(_)) => crate::metrics::Outcome::Contended,
            Err(ExecuteError::Unavailable(_)) => crate::metrics::Outcome::Unavailable,
            Err(ExecuteError::Unknown(_)) => crate::metrics::Outcome::Unknown,
            Err(ExecuteError::Store(_)) => crate::metrics::Outcome::StoreError,
        };
        crate::metrics::command(kind, outcome);
        answer
    }
}

impl Inner {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn load_kept(&self, account: &UserId) -> Result<Kept, ExecuteError> {
        let ctx = self
            .store
            .load_aggregate(account.as_str())
            .await
            .map_err(|e| match e {
                AggregateError::UserError(refused) => ExecuteError::Rejected(refused),
                AggregateError::DatabaseConnectionError(e) => {
                    ExecuteError::Unavailable(e.to_string())
                }
                other => ExecuteError::Store(other.to_string()),
            })?;
        Ok(Kept {
            aggregate: ctx.aggregate,
            sequence: ctx.current_sequence,
            snapshot: ctx.current_snapshot,
            // Not known from postgres-es's loader: this load is followed by a rewrite.
            snapshot_at: 0,
            head: None,
        })
    }

    /// The committer's connection, taken from the pool on first use and kept for its next
    /// batches: a connection returned to sqlx's pool is pinged on the way back (a round trip
    /// per statement, on both sides), and a busy committer need not pay that per batch.
    async fn connection<'h>(
        &self,
        held: &'h mut Held,
    ) -> Result<&'h mut sqlx::pool::PoolConnection<sqlx::Postgres>, sqlx::Error> {
        Ok(match held {
            Some(connection) => connection,
            None => held.insert(self.pool.acquire().await?),
        })
    }

    /// Runs `statement` on the committer's connection (`connection`). A connection on which a
    /// statement failed may be broken (or left mid-transaction): it is not used again.
    async fn on_held<T>(
        &self,
        held: &mut Held,
        statement: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let result = statement(self.connection(held).await?).await;
        if result.is_err() {
            *held = None;
        }
        result
    }

    /// Loads the states of `accounts` in one round trip: each one's latest snapshot (as
    /// postgres-es writes and reads it) and the events after it. An account whose snapshot
    /// no longer reads as a `CreditAccount` (an older shape, such as one written before the
    /// account's state was bounded) goes through postgres-es's loader, which replays its
    /// whole journal, and its snapshot is then written again in the current shape, so that
    /// the replay happens once. On the committer's connection, if it holds one
    /// (`held`, else one is taken and kept there).
    async fn load_many(
        &self,
        accounts: &[&UserId],
        held: &mut Held,
    ) -> HashMap<String, Result<Kept, ExecuteError>> {
        let ids: Vec<&str> = accounts.iter().map(|a| a.as_str()).collect();
        let mut loaded: HashMap<String, Result<Kept, ExecuteError>> = ids
            .iter()
            .map(|&id| {
                let empty = Kept {
                    aggregate: CreditAccount::default(),
                    sequence: 0,
                    snapshot: None,
                    snapshot_at: 0,
                    head: Some(Vec::new()),
                };
                (id.to_owned(), Ok(empty))
            })
            .collect();
        let rows = self
            .on_held(held, async |connection| {
                sqlx::query(LOAD)
                    .bind(CreditAccount::TYPE)
                    .bind(&ids)
                    .fetch_all(connection)
                    .await
            })
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                let e = ExecuteError::from_read(e);
                return ids
                    .iter()
                    .map(|&id| (id.to_owned(), Err(e.clone())))
                    .collect();
            }
        };
        let mut unreadable_snapshots = Vec::new();
        for row in rows {
            let Ok(id) = row.try_get::<String, _>("aggregate_id") else {
                continue;
            };
            let Some(Ok(kept)) = loaded.get_mut(&id) else {
                continue;
            };
            let read = (|| -> Result<(), String> {
                let sequence: i64 = row.try_get("sequence").map_err(|e| e.to_string())?;
                kept.head = row.try_get("hash").map_err(|e| e.to_string())?;
                let snapshot: Option<i64> = row.try_get("snapshot").map_err(|e| e.to_string())?;
                let payload: serde_json::Value =
                    row.try_get("payload").map_err(|e| e.to_string())?;
                if let Some(counter) = snapshot {
                    match serde_json::from_value(payload) {
                        Ok(aggregate) => kept.aggregate = aggregate,
                        Err(_) => {
                            unreadable_snapshots.push(id.clone());
                            return Ok(());
                        }
                    }
                    kept.snapshot = Some(counter as usize);
                    kept.snapshot_at = sequence as usize;
                } else {
                    let event: CreditEvent =
                        serde_json::from_value(payload).map_err(|e| e.to_string())?;
                    kept.aggregate.apply_event(event);
                }
                kept.sequence = sequence as usize;
                Ok(())
            })();
            if let Err(e) = read {
                loaded.insert(id, Err(ExecuteError::Store(e)));
            }
        }
        if !unreadable_snapshots.is_empty() {
            // postgres-es's loader and the rewrite take connections of their own: the held
            // one goes back first, so that a pool of one connection still serves them.
            *held = None;
        }
        for id in unreadable_snapshots {
            if let Some(account) = accounts.iter().find(|a| a.as_str() == id) {
                let mut state = self.load_kept(account).await;
                if let Ok(kept) = &mut state {
                    self.rewrite_snapshot(account, kept).await;
                }
                loaded.insert(id, state);
            }
        }
        loaded
    }

    /// Writes `kept` as the account's snapshot over an older or unreadable one at the same or
    /// an earlier sequence. A snapshot is a cache: failing to write it is only logged.
    async fn rewrite_snapshot(&self, account: &UserId, kept: &mut Kept) {
        if kept.sequence == 0 {
            return;
        }
        let counter = kept
            .snapshot
            .unwrap_or(0)
            .max(kept.sequence / SNAPSHOT_EVERY)
            .max(1);
        let written = match serde_json::to_string(&kept.aggregate) {
            Ok(payload) => sqlx::query(REWRITE_SNAPSHOT)
                .bind(CreditAccount::TYPE)
                .bind(account.as_str())
                .bind(kept.sequence as i64)
                .bind(counter as i64)
                .bind(payload)
                .execute(&self.pool)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match written {
            Ok(_) => {
                tracing::info!(account.id = %account, sequence = kept.sequence, "snapshot in an older shape rebuilt from the journal");
                kept.snapshot = Some(counter);
                kept.snapshot_at = kept.sequence;
            }
            Err(e) => {
                tracing::warn!(account.id = %account, error = %e, "could not rewrite a snapshot rebuilt from the journal");
            }
        }
    }

    /// Queues a command, and wakes a waiting committer, or starts one if one may start and
    /// none would take it.
    fn submit(this: &Arc<Self>, pending: Pending) {
        let (wake, start) = {
            let mut queue = this.queue();
            let wake = queue.waiting_committers > 0;
            let start = !wake
                && queue.committers < COMMITTERS
                && (queue.committers == 0 || !queue.busy.contains(pending.account.as_str()));
            queue.waiting.push_back(pending);
            if start {
                queue.committers += 1;
            }
            (wake, start)
        };
        if wake {
            // A permit is kept if the committer is not awaiting yet: it cannot be missed.
            this.work.notify_one();
        }
        if start {
            tokio::spawn(Committer::new(this.clone()).run());
        }
    }

    /// Decides and appends one batch; every command in it is answered on return.
    async fn run_batch(&self, groups: &mut [Group], held: &mut Held) {
        crate::metrics::batch(groups.iter().map(|g| g.commands.len()).sum());
        loop {
            // Load the accounts whose state is unknown (first use, or after a failed append).
            let missing: Vec<usize> = (0..groups.len())
                .filter(|&i| groups[i].state.is_none() && !groups[i].commands.is_empty())
                .collect();
            if !missing.is_empty() {
                let accounts: Vec<&UserId> = missing.iter().map(|&i| &groups[i].account).collect();
                let mut loaded = self.load_many(&accounts, held).await;
                for i in missing {
                    match loaded.remove(groups[i].account.as_str()) {
                        Some(Ok(kept)) => {
                            groups[i].state = Some(kept);
                            groups[i].fresh = true;
                        }
                        Some(Err(e)) => groups[i].fail_all(&e),
                        None => groups[i].fail_all(&ExecuteError::Store(
                            "account state was not loaded".to_owned(),
                        )),
                    }
                }
            }

            let mut decided = Vec::new();
            for (i, group) in groups.iter_mut().enumerate() {
                if group.decision.is_none() && !group.decide() {
                    continue;
                }
                decided.push(i);
            }
            self.settled_long_ago(groups, &decided, held).await;
            let mut ready = Vec::new();
            for i in decided {
                let group = &mut groups[i];
                match &group.decision {
                    // Nothing to append (every command refused): answered at once.
                    Some(decision) if decision.events() == 0 => group.committed(),
                    Some(_) => ready.push(i),
                    None => {}
                }
            }
            let conflicted = self.append_isolating(groups, ready, held).await;

            if groups.iter().all(|g| g.commands.is_empty()) {
                return;
            }
            // What remains was refused on kept state, refused by the database, or lost the
            // race for its account: it goes again (after a conflict, with jitter).
            if let Some(attempt) = conflicted {
                let jitter = rand::thread_rng().gen_range(1..=5u64 << attempt.min(5));
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
        }
    }

    /// Appends the decided events of the groups `ready`, in one statement when the database
    /// accepts it. Otherwise the accounts that another writer moved are taken out (decided
    /// again by the caller), and a refused statement is split until the refused account is
    /// alone. Returns the highest attempt count of a group that conflicted, if any did.
    async fn append_isolating(
        &self,
        groups: &mut [Group],
        ready: Vec<usize>,
        held: &mut Held,
    ) -> Option<u32> {
        let mut conflicted: Option<u32> = None;
        let mut conflict = |group: &mut Group| {
            group.conflict();
            conflicted = conflicted.max(Some(group.conflicts));
        };
        let mut chunks = if ready.is_empty() {
            Vec::new()
        } else {
            vec![ready]
        };
        while let Some(chunk) = chunks.pop() {
            let refusal = match self.append(groups, &chunk, held).await {
                Ok(heads) => {
                    self.write_snapshots(groups, &chunk, held).await;
                    for (&i, head) in chunk.iter().zip(heads) {
                        groups[i].appended(head);
                    }
                    self.appended.notify_one();
                    continue;
                }
                Err(AppendError::Conflict(e)) => match self.moved(groups, &chunk).await {
                    Ok(moved) if !moved.is_empty() => {
                        let mut rest = Vec::new();
                        for i in chunk {
                            if moved.contains(groups[i].account.as_str()) {
                                tracing::debug!(account.id = %groups[i].account, "optimistic lock conflict, deciding again");
                                conflict(&mut groups[i]);
                            } else {
                                rest.push(i);
                            }
                        }
                        if !rest.is_empty() {
                            chunks.push(rest);
                        }
                        continue;
                    }
                    // A unique violation that no other writer explains: an id the journal has
                    // already (one the account no longer keeps in memory), or a refusal.
                    Ok(_) => match self.duplicates(groups, &chunk).await {
                        Ok(found) if !found.is_empty() => {
                            let mut rest = Vec::new();
                            for i in chunk {
                                let repeated: Vec<(usize, LedgerError)> = found
                                    .iter()
                                    .filter(|d| d.group == i)
                                    .map(|d| (d.verdict, d.refusal.clone()))
                                    .collect();
                                if repeated.is_empty() {
                                    rest.push(i);
                                } else {
                                    groups[i].refuse_repeated(repeated);
                                }
                            }
                            if !rest.is_empty() {
                                chunks.push(rest);
                            }
                            continue;
                        }
                        Ok(_) => e,
                        Err(e) => {
                            fail_decided(groups, &chunk, e);
                            continue;
                        }
                    },
                    Err(e) => {
                        fail_decided(groups, &chunk, e);
                        continue;
                    }
                },
                Err(AppendError::Transient(e)) => {
                    tracing::debug!(error = %e, "append rolled back by the database, retrying");
                    for &i in &chunk {
                        conflict(&mut groups[i]);
                    }
                    continue;
                }
                Err(AppendError::Unavailable(e)) => {
                    fail_decided(groups, &chunk, ExecuteError::Unavailable(e));
                    continue;
                }
                Err(AppendError::Unknown(e)) => {
                    tracing::error!(error = %e, "an append's outcome is unknown: the connection broke after it was sent and the journal could not be read since");
                    fail_decided(groups, &chunk, ExecuteError::Unknown(e));
                    continue;
                }
                Err(AppendError::Refused(e)) => e,
            };
            if chunk.len() > 1 {
                let (first, second) = chunk.split_at(chunk.len() / 2);
                chunks.push(second.to_vec());
                chunks.push(first.to_vec());
            } else if let Some(&i) = chunk.first() {
                tracing::warn!(account.id = %groups[i].account, error = %refusal, "the database refused a command's events");
                groups[i].refused(refusal);
            }
        }
        conflicted
    }

    /// Writes the snapshots that `chunk`'s committed groups brought due, on the committer's
    /// connection. Best effort: a snapshot is a cache, so failing to write one (an account so
    /// large that its snapshot outlasts the statement timeout, a lost connection) is logged,
    /// and the account's next load replays more events; it never fails a command.
    async fn write_snapshots(&self, groups: &[Group], chunk: &[usize], held: &mut Held) {
        let mut rows = SnapshotRows::default();
        for &i in chunk {
            if let Err(e) = rows.add(&groups[i]) {
                tracing::warn!(account.id = %groups[i].account, error = %e, "could not serialise a snapshot");
            }
        }
        if rows.accounts.is_empty() {
            return;
        }
        let written = self
            .on_held(held, async |connection| {
                sqlx::query(SNAPSHOTS)
                    .bind(CreditAccount::TYPE)
                    .bind(&rows.accounts)
                    .bind(&rows.sequences)
                    .bind(&rows.counters)
                    .bind(&rows.payloads)
                    .execute(connection)
                    .await
            })
            .await;
        if let Err(e) = written {
            tracing::warn!(accounts = rows.accounts.len(), error = %e, "could not write snapshots; the accounts' next loads replay more events");
        }
    }

    /// Appends the decided events of `chunk`'s groups in one statement (one transaction).
    /// Returns each group's new last hash, in `chunk`'s order.
    async fn append(
        &self,
        groups: &[Group],
        chunk: &[usize],
        held: &mut Held,
    ) -> Result<Vec<Option<Vec<u8>>>, AppendError> {
        let mut rows = Rows::default();
        let mut heads = Vec::with_capacity(chunk.len());
        for &i in chunk {
            heads.push(rows.add(&groups[i]).map_err(AppendError::Refused)?);
        }
        let fence = uuid::Uuid::now_v7();
        // Taken first, so that failing to get a connection is known to have sent nothing.
        self.connection(held)
            .await
            .map_err(|e| AppendError::Unavailable(e.to_string()))?;
        let sent = self
            .on_held(held, async |connection| {
                sqlx::query(APPEND)
                    .bind(CreditAccount::TYPE)
                    .bind(&rows.accounts)
                    .bind(&rows.sequences)
                    .bind(&rows.types)
                    .bind(&rows.versions)
                    .bind(&rows.payloads)
                    .bind(&rows.metadata)
                    .bind(fence.to_string())
                    .bind(&rows.hashes)
                    .execute(connection)
                    .await
            })
            .await;
        self.appends_since_sweep(fence);
        match sent {
            Ok(_) => Ok(heads),
            Err(e) if connection_lost(&e) => {
                self.resolve(fence, e.to_string()).await?;
                Ok(heads)
            }
            Err(e) => Err(AppendError::of_refusal(e)),
        }
    }

    /// After the connection broke with an append sent: learns from its fence whether it
    /// committed, on another connection, trying for up to `VERIFY_FOR`. Inserting the fence's
    /// key ourselves either conflicts (the append committed) or succeeds (it did not, and now
    /// never will); an append still running is waited for.
    async fn resolve(&self, fence: uuid::Uuid, lost: String) -> Result<(), AppendError> {
        let deadline = tokio::time::Instant::now() + VERIFY_FOR;
        let mut pause = Duration::from_millis(50);
        let mut last_error = lost.clone();
        loop {
            let claim = sqlx::query(
                "INSERT INTO append_fences (id) VALUES ($1::uuid) ON CONFLICT (id) DO NOTHING",
            )
            .bind(fence.to_string())
            .execute(&self.pool);
            match tokio::time::timeout_at(deadline, claim).await {
                Ok(Ok(claimed)) if claimed.rows_affected() == 0 => {
                    tracing::warn!(error = %lost, "the connection broke after an append was sent; its fence shows it committed");
                    return Ok(());
                }
                Ok(Ok(_)) => {
                    return Err(AppendError::Unavailable(format!(
                        "{lost} (its fence shows the append did not commit)"
                    )))
                }
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => return Err(AppendError::Unknown(last_error)),
            }
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(AppendError::Unknown(last_error));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// Every `SWEEP_FENCES_EVERY` appends, deletes (in the background) the fences older than
    /// `KEEP_FENCES`: by then no append of theirs can still be in doubt.
    fn appends_since_sweep(&self, fence: uuid::Uuid) {
        let n = self
            .appends
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !n.is_multiple_of(SWEEP_FENCES_EVERY) {
            return;
        }
        let pool = self.pool.clone();
        let cutoff = fence_before(fence, KEEP_FENCES);
        tokio::spawn(async move {
            if let Err(e) = sqlx::query("DELETE FROM append_fences WHERE id < $1::uuid")
                .bind(cutoff.to_string())
                .execute(&pool)
                .await
            {
                tracing::debug!(error = %e, "sweeping old append fences failed; the next sweep retries");
            }
        });
    }

    /// The accounts of `chunk` whose journal has moved past the state they were decided on.
    async fn moved(
        &self,
        groups: &[Group],
        chunk: &[usize],
    ) -> Result<HashSet<String>, ExecuteError> {
        let accounts: Vec<&str> = chunk.iter().map(|&i| groups[i].account.as_str()).collect();
        let last: Vec<(String, i64)> = sqlx::query_as(
            "SELECT aggregate_id, max(sequence) FROM events
              WHERE aggregate_type = $1 AND aggregate_id = ANY($2)
              GROUP BY aggregate_id",
        )
        .bind(CreditAccount::TYPE)
        .bind(&accounts)
        .fetch_all(&self.pool)
        .await
        .map_err(ExecuteError::from_read)?;
        let last: HashMap<String, i64> = last.into_iter().collect();
        Ok(chunk
            .iter()
            .map(|&i| &groups[i])
            .filter(|g| {
                let decided_on = g.decision.as_ref().map_or(0, |d| d.sequence);
                last.get(g.account.as_str())
                    .is_some_and(|&seq| seq > decided_on as i64)
            })
            .map(|g| g.account.as_str().to_owned())
            .collect())
    }

    /// The decided commands of `chunk` whose events repeat a task, recharge or adjustment id
    /// that the account's journal has already (the unique indexes of migration 0008), each
    /// with the refusal the domain gives a duplicate.
    async fn duplicates(
        &self,
        groups: &[Group],
        chunk: &[usize],
    ) -> Result<Vec<Repeated>, ExecuteError> {
        let mut candidates = Vec::new();
        let (mut accounts, mut kinds, mut ids) = (Vec::new(), Vec::new(), Vec::new());
        for &i in chunk {
            let Some(decision) = &groups[i].decision else {
                continue;
            };
            for (v, verdict) in decision.verdicts.iter().enumerate() {
                let Verdict::Accepted { events, .. } = verdict else {
                    continue;
                };
                for event in events {
                    let (id, refusal) = match event {
                        CreditEvent::CreditsDeducted { task_id, .. } => (
                            task_id,
                            LedgerError::TaskAlreadyCharged {
                                task_id: task_id.clone(),
                            },
                        ),
                        CreditEvent::RechargeRequested { recharge_id, .. } => (
                            recharge_id,
                            LedgerError::RechargeExists {
                                recharge_id: recharge_id.clone(),
                            },
                        ),
                        CreditEvent::CreditsAdjusted { adjustment_id, .. } => (
                            adjustment_id,
                            LedgerError::AdjustmentExists {
                                adjustment_id: adjustment_id.clone(),
                            },
                        ),
                        _ => continue,
                    };
                    accounts.push(groups[i].account.as_str());
                    kinds.push(event.name());
                    ids.push(id.as_str());
                    candidates.push(Repeated {
                        group: i,
                        verdict: v,
                        refusal,
                    });
                }
            }
        }
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let found: Vec<i64> = sqlx::query_scalar(DUPLICATES)
            .bind(CreditAccount::TYPE)
            .bind(&accounts)
            .bind(&kinds)
            .bind(&ids)
            .fetch_all(&self.pool)
            .await
            .map_err(ExecuteError::from_read)?;
        Ok(candidates
            .into_iter()
            .enumerate()
            .filter(|(n, _)| found.contains(&(*n as i64 + 1)))
            .map(|(_, c)| c)
            .collect())
    }

    /// Refusals `UnknownTask` decided on fresh state, in the groups `decided`, become
    /// `TaskAlreadySettled` for tasks the journal shows charged: the account forgets only
    /// settled tasks, and a late command about one must be answered as about a settled task.
    async fn settled_long_ago(&self, groups: &mut [Group], decided: &[usize], held: &mut Held) {
        let mut unknown = Vec::new();
        for &i in decided {
            let Some(decision) = &groups[i].decision else {
                continue;
            };
            for (v, verdict) in decision.verdicts.iter().enumerate() {
                if let Verdict::Refused(LedgerError::UnknownTask { task_id }) = verdict {
                    unknown.push((i, v, task_id.clone()));
                }
            }
        }
        if unknown.is_empty() {
            return;
        }
        let accounts: Vec<&str> = unknown
            .iter()
            .map(|(i, _, _)| groups[*i].account.as_str())
            .collect();
        let tasks: Vec<&str> = unknown.iter().map(|(_, _, t)| t.as_str()).collect();
        let kinds = vec!["CreditsDeducted"; tasks.len()];
        // The same lookup as for duplicates (a charged task id is one); a read: a connection
        // lost here is "not done" (`Unavailable`), like the loads'.
        let found = self
            .on_held(held, async |connection| {
                sqlx::query_scalar::<_, i64>(DUPLICATES)
                    .bind(CreditAccount::TYPE)
                    .bind(&accounts)
                    .bind(&kinds)
                    .bind(&tasks)
                    .fetch_all(connection)
                    .await
            })
            .await
            .map_err(ExecuteError::from_read);
        for (n, (i, v, task_id)) in unknown.into_iter().enumerate() {
            let Some(decision) = groups[i].decision.as_mut() else {
                continue;
            };
            decision.verdicts[v] = match &found {
                Ok(found) if found.contains(&(n as i64 + 1)) => {
                    Verdict::Refused(LedgerError::TaskAlreadySettled { task_id })
                }
                Ok(_) => continue,
                Err(e) => Verdict::Failed(e.clone()),
            };
        }
    }
}

/// A decided command that repeats an id of its account's journal.
struct Repeated {
    /// Index of its group in the batch, and of its verdict in the group's decision.
    group: usize,
    verdict: usize,
    refusal: LedgerError,
}

/// Which of the (account, event type, id) triples name an id that the account's journal has
/// already: their ordinals (from 1). One probe of a unique index of migration 0008 each.
const DUPLICATES: &str = "
SELECT k.n FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS k(account, kind, id, n)
 WHERE (k.kind = 'CreditsDeducted' AND EXISTS (
            SELECT 1 FROM events e
             WHERE e.event_type = 'CreditsDeducted' AND e.aggregate_id = k.account
               AND e.payload -> 'CreditsDeducted' ->> 'task_id' = k.id
               AND e.aggregate_type = $1))
    OR (k.kind = 'RechargeRequested' AND EXISTS (
            SELECT 1 FROM events e
             WHERE e.event_type = 'RechargeRequested' AND e.aggregate_id = k.account
               AND e.payload -> 'RechargeRequested' ->> 'recharge_id' = k.id
               AND e.aggregate_type = $1))
    OR (k.kind = 'CreditsAdjusted' AND EXISTS (
            SELECT 1 FROM events e
             WHERE e.event_type = 'CreditsAdjusted' AND e.aggregate_id = k.account
               AND e.payload -> 'CreditsAdjusted' ->> 'adjustment_id' = k.id
               AND e.aggregate_type = $1))";

/// A snapshot rebuilt from the journal, written over an older or unreadable one.
const REWRITE_SNAPSHOT: &str = "
INSERT INTO snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload)
VALUES ($1, $2, $3, $4, $5::jsonb)
    ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
   SET last_sequence = EXCLUDED.last_sequence,
       current_snapshot = EXCLUDED.current_snapshot,
       payload = EXCLUDED.payload
 WHERE snapshots.last_sequence <= EXCLUDED.last_sequence";

/// The append of a batch: events in order (each account's in sequence order, accounts in
/// a fixed order so that concurrent writers lock keys in the same order), each with its
/// hash (`Rows::add`; NULL where the account's last hash is not known, and the journal's row
/// trigger computes it), which the journal checks for the whole statement at once
/// (migrations/0012_chain_linked_by_the_appender.sql), and writes the outbox rows; and the
/// statement's fence (migrations/0007_append_fences.sql), which tells after a broken
/// connection whether it committed. Payloads and metadata are stored as the very text that
/// was hashed: `json` keeps its input as it is (and validates it).
const APPEND: &str = "
WITH appended AS (
    INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                        payload, metadata, hash)
    SELECT $1, e.aggregate_id, e.sequence, e.event_type, e.event_version,
           e.payload::json, e.metadata::json, e.hash
      FROM unnest($2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[],
                  $9::bytea[])
           WITH ORDINALITY AS e(aggregate_id, sequence, event_type, event_version, payload,
                                metadata, hash, n)
     ORDER BY e.n
    RETURNING 1
), fence AS (
    INSERT INTO append_fences (id) VALUES ($8::uuid)
    RETURNING 1
)
SELECT (SELECT count(*) FROM appended), (SELECT count(*) FROM fence)";

/// The snapshots a committed batch brought due, each written only over an older one.
const SNAPSHOTS: &str = "
INSERT INTO snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload)
SELECT $1, s.aggregate_id, s.last_sequence, s.current_snapshot, s.payload::jsonb
  FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::text[])
       AS s(aggregate_id, last_sequence, current_snapshot, payload)
    ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
   SET last_sequence = EXCLUDED.last_sequence,
       current_snapshot = EXCLUDED.current_snapshot,
       payload = EXCLUDED.payload
 WHERE snapshots.last_sequence < EXCLUDED.last_sequence";

/// The accounts' snapshots, and their events after the snapshot (or all), in sequence order:
/// a snapshot row (`snapshot` not null) comes before its account's events. Each row carries
/// the hash of its event (a snapshot row, of the event it was taken at), so that the last
/// row read gives the account's last hash. Each account's
/// snapshot and events are read by subqueries of its own (`LATERAL`): a probe of the
/// snapshots' primary key and a range of the journal's from the snapshot on, the one plan the
/// write sessions' settings leave (db.rs), so a load costs the same whatever the statistics
/// (0.14 ms for three accounts, 0.56 ms for 200 events after a snapshot, in `EXPLAIN ANALYZE`
/// of the generic plan on a journal where one account holds 300,000 events). The journal's
/// payloads are json (migrations/0009_journal_text.sql; the cast is a no-op then, and reads
/// a journal from before it, whose payloads are jsonb), the snapshots' jsonb, printed as json
/// here (as jsonb's binary output would print it anyway).
const LOAD: &str = "
SELECT w.id AS aggregate_id, s.last_sequence AS sequence, s.current_snapshot AS snapshot,
       s.payload::json,
       (SELECT e.hash FROM events e
         WHERE e.aggregate_type = $1 AND e.aggregate_id = w.id AND e.sequence = s.last_sequence)
  FROM unnest($2::text[]) AS w(id)
 CROSS JOIN LATERAL (
        SELECT s.last_sequence, s.current_snapshot, s.payload
          FROM snapshots s
         WHERE s.aggregate_type = $1 AND s.aggregate_id = w.id) s
UNION ALL
SELECT w.id, e.sequence, NULL, e.payload::json, e.hash
  FROM unnest($2::text[]) AS w(id)
 CROSS JOIN LATERAL (
        SELECT e.sequence, e.payload, e.hash
          FROM events e
         WHERE e.aggregate_type = $1 AND e.aggregate_id = w.id
           AND e.sequence > coalesce((SELECT s.last_sequence FROM snapshots s
                                       WHERE s.aggregate_type = $1 AND s.aggregate_id = w.id), 0)
         ORDER BY e.sequence) e
 ORDER BY 1, 2";

/// The executor's load statement (`$1` the aggregate type, `$2` the account ids), for tests
/// that check how the write sessions plan it.
#[doc(hidden)]
pub fn load_statement() -> &'static str {
    LOAD
}

/// The columns of one append statement.
#[derive(Default)]
struct Rows {
    accounts: Vec<String>,
    sequences: Vec<i64>,
    types: Vec<String>,
    versions: Vec<String>,
    payloads: Vec<String>,
    metadata: Vec<String>,
    hashes: Vec<Option<Vec<u8>>>,
}

#[derive(Default)]
struct SnapshotRows {
    accounts: Vec<String>,
    sequences: Vec<i64>,
    counters: Vec<i64>,
    payloads: Vec<String>,
}

impl SnapshotRows {
    /// Adds the snapshot of a group whose decided events are committed, if one is due after
    /// them: its state now, at the sequence of its last event.
    fn add(&mut self, group: &Group) -> Result<(), serde_json::Error> {
        let (Some(decision), Some(state)) = (&group.decision, &group.state) else {
            return Ok(());
        };
        let Some(counter) = decision.snapshot else {
            return Ok(());
        };
        self.accounts.push(group.account.as_str().to_owned());
        self.sequences
            .push((decision.sequence + decision.events()) as i64);
        self.counters.push(counter as i64);
        self.payloads.push(serde_json::to_string(&state.aggregate)?);
        Ok(())
    }
}

impl Rows {
    /// Adds a group's decided events (each with its command's metadata), each linked to the
    /// one before it (`crate::chain`) when the account's last hash is known. Returns the hash
    /// of the group's last event, the account's new last hash (`None`: not known).
    fn add(&mut self, group: &Group) -> Result<Option<Vec<u8>>, String> {
        let (Some(decision), Some(state)) = (&group.decision, &group.state) else {
            return Ok(None);
        };
        let account = group.account.as_str();
        let mut sequence = decision.sequence;
        // The state's head and sequence move on when the decision is committed.
        let mut head = state.head.clone();
        for (verdict, pending) in decision.verdicts.iter().zip(&group.commands) {
            let Verdict::Accepted { events, .. } = verdict else {
                continue;
            };
            let metadata = stored_json(&pending.metadata)?;
            for event in events {
                sequence += 1;
                let event_type = event.event_type();
                let event_version = event.event_version();
                let payload = stored_json(event)?;
                head = head.map(|prev| {
                    crate::chain::Link {
                        aggregate_type: CreditAccount::TYPE.as_bytes(),
                        account: account.as_bytes(),
                        sequence: sequence as i64,
                        event_type: event_type.as_bytes(),
                        event_version: event_version.as_bytes(),
                        payload: payload.as_bytes(),
                        metadata: metadata.as_bytes(),
                    }
                    .hash(&prev)
                    .to_vec()
                });
                self.accounts.push(account.to_owned());
                self.sequences.push(sequence as i64);
                self.types.push(event_type);
                self.versions.push(event_version);
                self.payloads.push(payload);
                self.metadata.push(metadata.clone());
                self.hashes.push(head.clone());
            }
        }
        Ok(head)
    }
}

/// The JSON text of a payload or of metadata, as the journal stores it. `\u0000` is refused
/// (as `jsonb` refuses it; text columns cannot hold it, so no projection could read it back).
/// The domain refuses control characters in what clients send, so this is a last guard (it
/// also refuses a backslash written before `u0000`, which is harmless).
fn stored_json(value: &impl serde::Serialize) -> Result<String, String> {
    let text = serde_json::to_string(value).map_err(|e| e.to_string())?;
    if text.contains("\\u0000") {
        return Err("text with \\u0000 in it cannot be stored".to_owned());
    }
    Ok(text)
}

enum AppendError {
    /// A key of the journal exists already: another writer appended first (unless no
    /// account moved, then it is a refusal).
    Conflict(String),
    /// The database rolled the transaction back for a reason that goes away on retry
    /// (deadlock, serialization failure).
    Transient(String),
    /// The database refused the statement (a value it cannot store, a constraint).
    Refused(String),
    /// Not written: no connection, or the statement is known not to have been committed.
    Unavailable(String),
    /// Sent, no answer, and the journal could not be read since to tell.
    Unknown(String),
}

impl AppendError {
    /// Classifies the failure of a statement that the database answered (not a lost
    /// connection): the transaction was rolled back.
    fn of_refusal(e: sqlx::Error) -> Self {
        let code = match &e {
            sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
            _ => None,
        };
        match code.as_deref() {
            Some("23505") => Self::Conflict(e.to_string()),
            Some(c) if c.starts_with("40") => Self::Transient(e.to_string()),
            _ => Self::Refused(e.to_string()),
        }
    }
}

fn fail_decided(groups: &mut [Group], chunk: &[usize], error: ExecuteError) {
    for &i in chunk {
        groups[i].fail_decided(&error);
    }
}

/// One account's commands in a batch.
struct Group {
    account: UserId,
    /// Commands not answered yet, oldest first.
    commands: VecDeque<Pending>,
    /// The account's state; `None` when it must be loaded.
    state: Option<Kept>,
    /// Whether `state` was read from the journal in this batch (a refusal on it stands).
    fresh: bool,
    /// The commands at the front of `commands`, decided on `state` and not yet appended.
    decision: Option<Decision>,
    /// Set once the database refused this account's events: its commands are then decided
    /// and appended one at a time, so that only the refused one fails.
    one_at_a_time: bool,
    /// Appends lost to another writer.
    conflicts: u32,
}

/// The commands at the front of a group, decided one after the other.
struct Decision {
    /// The account's sequence before these commands.
    sequence: usize,
    /// The counter of the snapshot taken after these commands' events, if one is due.
    snapshot: Option<usize>,
    /// One per decided command, in order.
    verdicts: Vec<Verdict>,
}

enum Verdict {
    Accepted {
        events: Vec<CreditEvent>,
        /// The balance right after this command.
        balance: i64,
    },
    Refused(LedgerError),
    /// The database could not tell how to answer (nothing was written for it).
    Failed(ExecuteError),
}

impl Decision {
    fn events(&self) -> usize {
        self.verdicts
            .iter()
            .map(|v| match v {
                Verdict::Accepted { events, .. } => events.len(),
                Verdict::Refused(_) | Verdict::Failed(_) => 0,
            })
            .sum()
    }
}

impl Group {
    fn new(account: UserId, kept: Option<Kept>) -> Self {
        Self {
            account,
            commands: VecDeque::new(),
            state: kept,
            fresh: false,
            decision: None,
            one_at_a_time: false,
            conflicts: 0,
        }
    }

    /// Decides the next commands on the account's state, applying accepted events to it in
    /// place (if the append fails, the state is dropped and loaded again, so no copy is
    /// needed). Returns false when there is nothing to decide, or when a command was refused
    /// on kept state: the state is then dropped, to be loaded and decided again.
    fn decide(&mut self) -> bool {
        let Some(state) = self.state.as_mut() else {
            return false;
        };
        if self.commands.is_empty() {
            return false;
        }
        let take = if self.one_at_a_time {
            1
        } else {
            self.commands.len()
        };
        let sequence = state.sequence;
        let mut verdicts = Vec::with_capacity(take);
        for pending in self.commands.iter().take(take) {
            match state.aggregate.decide(pending.command.clone()) {
                Ok(events) => {
                    for event in &events {
                        state.aggregate.apply_event(event.clone());
                    }
                    verdicts.push(Verdict::Accepted {
                        events,
                        balance: state.aggregate.balance(),
                    });
                }
                Err(refused) if self.fresh => verdicts.push(Verdict::Refused(refused)),
                Err(_) => {
                    self.state = None;
                    return false;
                }
            }
        }
        let mut decision = Decision {
            sequence,
            snapshot: None,
            verdicts,
        };
        let appended = decision.events();
        if appended > 0
            && snapshot_due(
                (sequence + appended).saturating_sub(state.snapshot_at),
                state.aggregate.kept_entries(),
            )
        {
            decision.snapshot = Some(state.snapshot.map_or(1, |s| s + 1));
        }
        self.decision = Some(decision);
        true
    }

    /// The decision's events are in the journal, the last with hash `head`.
    fn appended(&mut self, head: Option<Vec<u8>>) {
        if let Some(state) = self.state.as_mut() {
            state.head = head;
        }
        self.committed();
    }

    /// The decision is in the journal (or had nothing to append): answers its commands.
    fn committed(&mut self) {
        let Some(decision) = self.decision.take() else {
            return;
        };
        let mut sequence = decision.sequence;
        let snapshot = decision.snapshot;
        for verdict in decision.verdicts {
            let Some(pending) = self.commands.pop_front() else {
                break;
            };
            let reply = match verdict {
                Verdict::Accepted { events, balance } => {
                    let events = events
                        .into_iter()
                        .map(|payload| {
                            sequence += 1;
                            EventEnvelope {
                                aggregate_id: self.account.as_str().to_owned(),
                                sequence,
                                payload,
                                metadata: pending.metadata.clone(),
                            }
                        })
                        .collect();
                    Ok(Committed {
                        events,
                        balance,
                        sequence,
                    })
                }
                Verdict::Refused(refused) => Err(ExecuteError::Rejected(refused)),
                Verdict::Failed(error) => Err(error),
            };
            let _ = pending.reply.send(reply);
        }
        if let Some(state) = self.state.as_mut() {
            if let Some(counter) = snapshot {
                state.snapshot = Some(counter);
                state.snapshot_at = sequence;
            }
            state.sequence = sequence;
        }
    }

    /// Another writer appended to the account first: load it and decide again, or give up.
    fn conflict(&mut self) {
        crate::metrics::conflict();
        self.state = None;
        self.decision = None;
        self.conflicts += 1;
        if self.conflicts >= MAX_ATTEMPTS {
            self.fail_all(&ExecuteError::Contended(self.account.to_string()));
        }
    }

    /// The database refused this account's events: with several commands decided, find the
    /// refused one by running them one at a time; with one, that command fails.
    fn refused(&mut self, error: String) {
        let decided = self.decision.as_ref().map_or(0, |d| d.verdicts.len());
        if decided > 1 {
            self.state = None;
            self.decision = None;
            self.one_at_a_time = true;
        } else {
            self.fail_decided(&ExecuteError::Store(error));
        }
    }

    /// Some decided commands repeat an id of the journal: they are answered with `repeated`'s
    /// refusals (by their index among the decided commands). The others were decided on a
    /// state that included the refused ones' events, so they are decided again on the state
    /// loaded afresh.
    fn refuse_repeated(&mut self, mut repeated: Vec<(usize, LedgerError)>) {
        self.decision = None;
        self.state = None;
        repeated.sort_by_key(|(v, _)| std::cmp::Reverse(*v));
        repeated.dedup_by_key(|(v, _)| *v);
        for (v, refusal) in repeated {
            if let Some(pending) = self.commands.remove(v) {
                tracing::debug!(account.id = %self.account, error = %refusal, "an id of the journal repeated");
                let _ = pending.reply.send(Err(ExecuteError::Rejected(refusal)));
            }
        }
    }

    /// Answers the decided commands with `error`; the state is loaded again for the rest.
    fn fail_decided(&mut self, error: &ExecuteError) {
        let decided = self.decision.take().map_or(0, |d| d.verdicts.len());
        for pending in self.commands.drain(..decided.min(self.commands.len())) {
            let _ = pending.reply.send(Err(error.clone()));
        }
        self.state = None;
    }

    fn fail_all(&mut self, error: &ExecuteError) {
        for pending in self.commands.drain(..) {
            let _ = pending.reply.send(Err(error.clone()));
        }
        self.decision = None;
        self.state = None;
    }
}

impl Queue {
    /// Takes the oldest waiting commands of the accounts no batch holds (at most
    /// `MAX_BATCH`), grouped by account in arrival order; the accounts are then held.
    fn take(&mut self) -> Vec<Group> {
        let mut groups: Vec<Group> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut rest = VecDeque::with_capacity(self.waiting.len());
        let mut taken = 0;
        while let Some(pending) = self.waiting.pop_front() {
            if taken == MAX_BATCH {
                rest.push_back(pending);
                rest.append(&mut self.waiting);
                break;
            }
            let id = pending.account.as_str();
            let i = match index.get(id) {
                Some(&i) => i,
                None if self.busy.contains(id) => {
                    rest.push_back(pending);
                    continue;
                }
                None => {
                    self.busy.insert(id.to_owned());
                    index.insert(id.to_owned(), groups.len());
                    groups.push(Group::new(pending.account.clone(), self.idle.pop(id)));
                    groups.len() - 1
                }
            };
            groups[i].commands.push_back(pending);
            taken += 1;
        }
        self.waiting = rest;
        // A fixed order of accounts within every batch: concurrent appends lock journal keys
        // in the same order and cannot deadlock.
        groups.sort_by(|a, b| a.account.as_str().cmp(b.account.as_str()));
        groups
    }

    /// Frees a finished batch's accounts, keeping their states (if `keep`) among the idle.
    fn release(&mut self, groups: Vec<Group>, keep: bool) {
        for group in groups {
            self.busy.remove(group.account.as_str());
            if let (true, Some(state)) = (keep, group.state) {
                self.idle.put(group.account.as_str().to_owned(), state);
            }
        }
    }
}

/// The connection a committer keeps between its batches (none until its first statement, and
/// none again after a statement failed on it).
type Held = Option<sqlx::pool::PoolConnection<sqlx::Postgres>>;

/// A committer task: takes batches until none is waiting for it.
struct Committer {
    inner: Arc<Inner>,
    /// The batch in hand.
    groups: Vec<Group>,
    /// Its connection, kept while it has work (returned to the pool when it stops).
    held: Held,
    /// Counted out of `Queue::committers` already.
    done: bool,
    /// Counted in `Queue::waiting_committers`.
    waiting: bool,
}

impl Committer {
    fn new(inner: Arc<Inner>) -> Self {
        Self {
            inner,
            groups: Vec::new(),
            held: None,
            done: false,
            waiting: false,
        }
    }

    async fn run(mut self) {
        // Whether this committer waited for work since it last took a batch, and for how
        // long it may still wait.
        let mut waited: Option<tokio::time::Instant> = None;
        loop {
            if !self.groups.is_empty() {
                // The callers just answered run before the next take, so that their next
                // commands join it (no timer: with nothing else to run this returns at once).
                tokio::task::yield_now().await;
            }
            let wait_until = {
                let mut queue = self.inner.queue();
                queue.release(std::mem::take(&mut self.groups), true);
                self.groups = queue.take();
                if self.groups.is_empty() {
                    let until =
                        *waited.get_or_insert_with(|| tokio::time::Instant::now() + KEEP_COMMITTER);
                    if tokio::time::Instant::now() >= until {
                        // In the same critical section as the empty take: a command queued
                        // after it sees one committer fewer and starts one.
                        queue.committers -= 1;
                        self.done = true;
                        return;
                    }
                    queue.waiting_committers += 1;
                    self.waiting = true;
                    Some(until)
                } else {
                    waited = None;
                    None
                }
            };
            if let Some(until) = wait_until {
                // Nothing to take: wait a moment for the next command, keeping the task and
                // its connection, rather than end and have the next command start a task,
                // take a connection from the pool and (sqlx pings every connection given
                // back) pay a round trip for the one given back. A command that comes is
                // taken at once: nothing waits for this timer but the idle committer.
                if self.inner.pool.num_idle() == 0 {
                    // A small pool: others may need the connection more.
                    self.held = None;
                }
                let _ = tokio::time::timeout_at(until, self.inner.work.notified()).await;
                self.inner.queue().waiting_committers -= 1;
                self.waiting = false;
                continue;
            }
            let inner = self.inner.clone();
            inner.run_batch(&mut self.groups, &mut self.held).await;
            if inner.pool.num_idle() == 0 {
                // No connection to spare (a small pool): the other committer, or a read of
                // the executor, may be waiting for this one.
                self.held = None;
            }
        }
    }
}

impl Drop for Committer {
    /// Reached without `done` only if deciding a batch panicked, or the runtime dropped the
    /// task: the batch's commands are dropped (their callers get an error), its accounts
    /// freed, and another committer carries on with the queue.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Not `tokio::spawn`, which panics outside a runtime.
        let runtime = tokio::runtime::Handle::try_current().ok();
        let restart = {
            let mut queue = self.inner.queue();
            if self.waiting {
                queue.waiting_committers -= 1;
            }
            queue.release(std::mem::take(&mut self.groups), false);
            let restart = runtime.is_some() && !queue.waiting.is_empty();
            if !restart {
                queue.committers -= 1;
            }
            restart
        };
        if let (true, Some(runtime)) = (restart, runtime) {
            runtime.spawn(Committer::new(self.inner.clone()).run());
        }
    }
}

/// Whether an account that keeps `entries` entries, `since` events after its latest snapshot
/// (or its first event), is due a new one: after `SNAPSHOT_EVERY` events, or after half as
/// many events as it keeps entries if that is more. A snapshot's size grows with the entries
/// and an event adds at most about one, so snapshots serialise at most about two entries per
/// event appended (even for an account whose every event adds an entry: its snapshots come
/// at doubling sequences), and a load replays at most half a snapshot's worth of events.
/// With a plain `SNAPSHOT_EVERY`, a hot account holding 20,000 open tasks wrote a 2 MB
/// snapshot every 500 deductions, which cut its rate by more than half.
fn snapshot_due(since: usize, entries: usize) -> bool {
    since >= SNAPSHOT_EVERY.max(entries / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_due_every_snapshot_every_events_or_as_many_as_the_account_keeps() {
        let n = SNAPSHOT_EVERY;
        assert!(!snapshot_due(1, 3));
        assert!(!snapshot_due(n - 1, 3));
        assert!(snapshot_due(n, 3));
        assert!(snapshot_due(n + 7, n));
        assert!(snapshot_due(n, 2 * n + 1));
        // A large account waits longer, as long as it keeps entries.
        assert!(!snapshot_due(n, 20_000));
        assert!(!snapshot_due(9_999, 20_000));
        assert!(snapshot_due(10_000, 20_000));
    }
}
