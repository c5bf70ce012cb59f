//! The command executor: runs commands against one account and returns what they committed.
//!
//! Commands for one account are serialised inside the process, and the ones that queue up
//! behind a busy account are decided together, one after the other on the evolving state, and
//! appended in a single transaction (group commit): a hot account queues instead of
//! conflicting, and pays one commit per batch instead of one per command. The decided state
//! is kept in memory between commands (bounded); because postgres-es appends under an
//! optimistic lock on the account's sequence, kept state that another process has overtaken
//! can never be committed: the conflict is retried, bounded and with jitter, on fresh state.
//! A refusal decided on kept state is likewise re-decided on fresh state before it stands.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use cqrs_es::persist::{
    PersistedEventRepository, PersistedEventStore, PersistenceError, SerializedEvent,
};
use cqrs_es::{AggregateError, EventEnvelope, EventStore};
use credit_domain::{CreditAccount, CreditCommand, CreditEvent, LedgerError, UserId};
use postgres_es::PostgresEventRepository;
use rand::Rng;
use tokio::sync::{oneshot, Mutex, Notify};

/// How many events between two snapshots of an account. A snapshot serialises the whole
/// account, so taking one is not free for a long history: at 100, a hot account with
/// thousands of tasks spent most of its time writing snapshots (see docs/BENCHMARKS.md);
/// at 500 a cold load reads at most 499 events after the snapshot.
pub const SNAPSHOT_EVERY: usize = 500;
/// How many idle accounts' states are kept in memory.
pub const KEEP_IDLE_ACCOUNTS: usize = 10_000;
/// The most commands decided and appended together.
pub const MAX_BATCH: usize = 64;
const MAX_ATTEMPTS: u32 = 12;

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
    /// The database failed; nothing was written.
    #[error("event store error: {0}")]
    Store(String),
}

type Reply = Result<Committed, ExecuteError>;

/// One command of a batch, as decided: which of the batch's events are its own, and the
/// balance after them; or why it was refused.
type Decided = Result<(std::ops::Range<usize>, i64), LedgerError>;

struct Pending {
    command: CreditCommand,
    metadata: HashMap<String, String>,
    reply: oneshot::Sender<Reply>,
}

/// An account's state as of `sequence`.
struct Kept {
    aggregate: CreditAccount,
    sequence: usize,
    snapshot: Option<usize>,
}

/// One account's queue and, while it is busy, its kept state.
#[derive(Default)]
struct Slot {
    queue: StdMutex<Vec<Pending>>,
    kept: Mutex<Option<Kept>>,
}

struct Slots {
    busy: HashMap<String, Arc<Slot>>,
    idle: lru::LruCache<String, Kept>,
}

/// Runs commands against `CreditAccount`s stored by postgres-es.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    /// Loads accounts: the latest snapshot plus the events after it.
    store: PersistedEventStore<PostgresEventRepository, CreditAccount>,
    /// Appends events (and, every `SNAPSHOT_EVERY` events, the snapshot) in one transaction.
    repo: PostgresEventRepository,
    slots: StdMutex<Slots>,
    appended: Arc<Notify>,
}

impl Ledger {
    pub fn new(pool: sqlx::PgPool) -> Self {
        let inner = Inner {
            store: PersistedEventStore::new_snapshot_store(
                PostgresEventRepository::new(pool.clone()),
                SNAPSHOT_EVERY,
            ),
            repo: PostgresEventRepository::new(pool),
            slots: StdMutex::new(Slots {
                busy: HashMap::new(),
                idle: lru::LruCache::new(
                    std::num::NonZeroUsize::new(KEEP_IDLE_ACCOUNTS)
                        .unwrap_or(std::num::NonZeroUsize::MIN),
                ),
            }),
            appended: Arc::new(Notify::new()),
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
        let kept = self.inner.load_kept(account).await?;
        Ok((kept.aggregate, kept.sequence))
    }

    /// Decides `command` against the account and appends the resulting events atomically.
    ///
    /// The command runs on its own task: once submitted it is carried through even if the
    /// caller goes away (an HTTP client disconnecting), since other callers' commands may be
    /// riding in the same batch.
    pub async fn execute(
        &self,
        account: &UserId,
        command: CreditCommand,
        metadata: HashMap<String, String>,
    ) -> Result<Committed, ExecuteError> {
        let inner = self.inner.clone();
        let account = account.clone();
        tokio::spawn(async move { inner.execute(&account, command, metadata).await })
            .await
            .unwrap_or_else(|e| Err(ExecuteError::Store(format!("command task failed: {e}"))))
    }
}

impl Inner {
    async fn load_kept(&self, account: &UserId) -> Result<Kept, ExecuteError> {
        let ctx = self
            .store
            .load_aggregate(account.as_str())
            .await
            .map_err(|e| match e {
                AggregateError::UserError(refused) => ExecuteError::Rejected(refused),
                other => ExecuteError::Store(other.to_string()),
            })?;
        Ok(Kept {
            aggregate: ctx.aggregate,
            sequence: ctx.current_sequence,
            snapshot: ctx.current_snapshot,
        })
    }

    async fn execute(
        &self,
        account: &UserId,
        command: CreditCommand,
        metadata: HashMap<String, String>,
    ) -> Result<Committed, ExecuteError> {
        let slot = self.slot(account.as_str());
        let (reply, answer) = oneshot::channel();
        slot.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Pending {
                command,
                metadata,
                reply,
            });
        let mut answer = answer;
        let reply = loop {
            // Either a batch that took our command answers it, or we get the account and
            // take every queued command ourselves (ours included, unless already taken).
            // Waiting for both keeps batches large: an answered caller never queues for the
            // lock just to learn that its command is done.
            tokio::select! {
                biased;
                reply = &mut answer => break reply,
                mut kept = slot.kept.lock() => {
                    let batch: Vec<Pending> = {
                        let mut queue = slot.queue.lock().unwrap_or_else(|e| e.into_inner());
                        let n = queue.len().min(MAX_BATCH);
                        queue.drain(..n).collect()
                    };
                    if !batch.is_empty() {
                        self.run_batch(account, batch, &mut kept).await;
                    }
                }
            }
        };
        self.release(account.as_str(), slot);
        reply.unwrap_or_else(|_| Err(ExecuteError::Store("command was dropped".to_owned())))
    }

    async fn run_batch(&self, account: &UserId, batch: Vec<Pending>, kept: &mut Option<Kept>) {
        crate::metrics::batch(batch.len());
        for attempt in 0..MAX_ATTEMPTS {
            let (mut state, fresh) = match kept.take() {
                Some(k) => (k, false),
                None => match self.load_kept(account).await {
                    Ok(k) => (k, true),
                    Err(e) => return fail_all(batch, &e),
                },
            };
            let before = (state.sequence, state.snapshot);
            // Decide every command in order on the evolving state.
            let mut outcomes: Vec<Decided> = Vec::new();
            let mut events: Vec<CreditEvent> = Vec::new();
            let mut stale = false;
            for pending in &batch {
                match state.aggregate.decide(pending.command.clone()) {
                    Ok(decided) => {
                        // Applied in place: if the append fails, this state is dropped and
                        // the next attempt reloads, so no copy is needed.
                        let from = events.len();
                        for e in &decided {
                            state.aggregate.apply_event(e.clone());
                        }
                        events.extend(decided);
                        outcomes.push(Ok((from..events.len(), state.aggregate.balance())));
                    }
                    Err(_) if !fresh => {
                        stale = true;
                        break;
                    }
                    Err(refused) => outcomes.push(Err(refused)),
                }
            }
            if stale {
                // A refusal on kept state: decide the whole batch again on fresh state.
                continue;
            }
            if events.is_empty() {
                *kept = Some(state);
                return reply_all(batch, outcomes, &[], before.0);
            }
            match self
                .append(account, &batch, &outcomes, &events, before, &state)
                .await
            {
                Ok(envelopes) => {
                    state.sequence = before.0 + events.len();
                    state.snapshot = next_snapshot(before.0, events.len(), before.1);
                    *kept = Some(state);
                    self.appended.notify_one();
                    crate::metrics::appended(&events);
                    return reply_all(batch, outcomes, &envelopes, before.0);
                }
                Err(AppendError::Conflict) => {
                    tracing::debug!(account.id = %account, attempt, "optimistic lock conflict, retrying");
                    crate::metrics::conflict();
                    // `kept` stays empty: the next attempt reloads.
                    let jitter = rand::thread_rng().gen_range(1..=5u64 << attempt.min(5));
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Err(AppendError::Store(e)) => {
                    return fail_all(batch, &ExecuteError::Store(e));
                }
            }
        }
        fail_all(batch, &ExecuteError::Contended(account.to_string()));
    }

    /// Appends the batch's events, with a snapshot of `after` when a multiple of
    /// `SNAPSHOT_EVERY` is reached, in one transaction through postgres-es.
    async fn append(
        &self,
        account: &UserId,
        batch: &[Pending],
        outcomes: &[Decided],
        events: &[CreditEvent],
        (sequence, snapshot): (usize, Option<usize>),
        after: &Kept,
    ) -> Result<Vec<EventEnvelope<CreditAccount>>, AppendError> {
        // Each event carries the metadata of the command that produced it.
        let mut envelopes = Vec::with_capacity(events.len());
        for (pending, outcome) in batch.iter().zip(outcomes) {
            if let Ok((own, _)) = outcome {
                for i in own.clone() {
                    envelopes.push(EventEnvelope {
                        aggregate_id: account.as_str().to_owned(),
                        sequence: sequence + i + 1,
                        payload: events[i].clone(),
                        metadata: pending.metadata.clone(),
                    });
                }
            }
        }
        let serialized = envelopes
            .iter()
            .map(SerializedEvent::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AppendError::Store(e.to_string()))?;
        let last = sequence + events.len();
        let snapshot_update = if last / SNAPSHOT_EVERY > sequence / SNAPSHOT_EVERY {
            let payload = serde_json::to_value(&after.aggregate)
                .map_err(|e| AppendError::Store(e.to_string()))?;
            Some((
                account.as_str().to_owned(),
                payload,
                snapshot.map_or(1, |s| s + 1),
            ))
        } else {
            None
        };
        match self
            .repo
            .persist::<CreditAccount>(&serialized, snapshot_update)
            .await
        {
            Ok(()) => Ok(envelopes),
            Err(PersistenceError::OptimisticLockError) => Err(AppendError::Conflict),
            Err(e) => Err(AppendError::Store(e.to_string())),
        }
    }

    fn slot(&self, account: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.busy.get(account) {
            return slot.clone();
        }
        let slot = Arc::new(Slot {
            queue: StdMutex::new(Vec::new()),
            kept: Mutex::new(slots.idle.pop(account)),
        });
        slots.busy.insert(account.to_owned(), slot.clone());
        slot
    }

    /// Retires an account's slot once nobody is queued on it, keeping its state among the
    /// idle accounts, so memory stays bounded.
    fn release(&self, account: &str, slot: Arc<Slot>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        drop(slot);
        let Some(existing) = slots.busy.get(account) else {
            return;
        };
        // One reference, the map's: no caller holds or waits for it.
        if Arc::strong_count(existing) != 1 {
            return;
        }
        if let Some(slot) = slots.busy.remove(account) {
            if let Ok(mut kept) = slot.kept.try_lock() {
                if let Some(state) = kept.take() {
                    slots.idle.put(account.to_owned(), state);
                }
            }
        }
    }
}

enum AppendError {
    Conflict,
    Store(String),
}

/// Answers every command of a batch whose events were appended after `sequence`.
fn reply_all(
    batch: Vec<Pending>,
    outcomes: Vec<Decided>,
    envelopes: &[EventEnvelope<CreditAccount>],
    sequence: usize,
) {
    for (pending, outcome) in batch.into_iter().zip(outcomes) {
        use crate::metrics::Outcome;
        let counted = if outcome.is_ok() {
            Outcome::Committed
        } else {
            Outcome::Rejected
        };
        crate::metrics::command(&pending.command, counted);
        let reply = match outcome {
            Ok((own, balance)) => Ok(Committed {
                sequence: sequence + own.end,
                events: envelopes[own].to_vec(),
                balance,
            }),
            Err(refused) => Err(ExecuteError::Rejected(refused)),
        };
        let _ = pending.reply.send(reply);
    }
}

fn fail_all(batch: Vec<Pending>, error: &ExecuteError) {
    for pending in batch {
        let counted = match error {
            ExecuteError::Rejected(_) => crate::metrics::Outcome::Rejected,
            ExecuteError::Contended(_) => crate::metrics::Outcome::Contended,
            ExecuteError::Store(_) => crate::metrics::Outcome::StoreError,
        };
        crate::metrics::command(&pending.command, counted);
        let _ = pending.reply.send(Err(error.clone()));
    }
}

/// The snapshot counter after appending `count` events at `sequence`.
fn next_snapshot(sequence: usize, count: usize, snapshot: Option<usize>) -> Option<usize> {
    if (sequence + count) / SNAPSHOT_EVERY > sequence / SNAPSHOT_EVERY {
        Some(snapshot.map_or(1, |s| s + 1))
    } else {
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_taken_each_time_a_multiple_is_passed() {
        let n = SNAPSHOT_EVERY;
        assert_eq!(next_snapshot(0, 1, None), None);
        assert_eq!(next_snapshot(n - 1, 1, None), Some(1));
        assert_eq!(next_snapshot(n - 1, 2, Some(1)), Some(2));
        assert_eq!(next_snapshot(n, 1, Some(1)), Some(1));
    }
}
