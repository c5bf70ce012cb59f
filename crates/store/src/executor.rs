//! The command executor: runs a command against one account and returns what it committed.
//!
//! Commands for one account are serialised inside the process (a hot account queues instead
//! of conflicting), the decided state is kept while the account is busy so a queued command
//! need not reload it, and an optimistic-lock conflict (another process appended first) is
//! retried a bounded number of times with jitter, against freshly loaded state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use cqrs_es::persist::{EventStoreAggregateContext, PersistedEventStore};
use cqrs_es::{AggregateError, EventEnvelope, EventStore};
use credit_domain::{CreditAccount, CreditCommand, LedgerError, UserId};
use postgres_es::PostgresEventRepository;
use rand::Rng;
use tokio::sync::{Mutex, Notify};

/// How many events between two snapshots of an account.
pub const SNAPSHOT_EVERY: usize = 100;
const MAX_ATTEMPTS: u32 = 12;

/// What a command committed, and the account's state right after it.
#[derive(Debug, Clone)]
pub struct Committed {
    pub events: Vec<EventEnvelope<CreditAccount>>,
    pub state: CreditAccount,
    /// The account's last sequence after the command.
    pub sequence: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    /// The domain refused the command; nothing was written.
    #[error(transparent)]
    Rejected(#[from] LedgerError),
    /// Other writers kept winning the race for this account; nothing was written.
    #[error("account {0} is too busy, gave up after {MAX_ATTEMPTS} attempts")]
    Contended(String),
    /// The database failed.
    #[error("event store error: {0}")]
    Store(String),
}

/// State kept for an account while commands for it are queued.
struct Cached {
    aggregate: CreditAccount,
    sequence: usize,
    snapshot: Option<usize>,
}

type Slot = Arc<Mutex<Option<Cached>>>;

/// How many idle accounts' states are kept in memory. Kept state is only a head start: a
/// commit on stale state fails on the journal's optimistic lock and is retried on fresh state.
pub const KEEP_IDLE_ACCOUNTS: usize = 10_000;

struct Slots {
    busy: HashMap<String, Slot>,
    idle: lru::LruCache<String, Cached>,
}

/// Runs commands against `CreditAccount`s stored by postgres-es.
pub struct Ledger {
    /// Loads from the latest snapshot; commits that reach a snapshot boundary write one.
    store: PersistedEventStore<PostgresEventRepository, CreditAccount>,
    /// Commits without a snapshot, for the commits `snapshot_store_would_corrupt`.
    plain: PersistedEventStore<PostgresEventRepository, CreditAccount>,
    slots: StdMutex<Slots>,
    appended: Arc<Notify>,
}

impl Ledger {
    pub fn new(pool: sqlx::PgPool) -> Self {
        Self {
            store: PersistedEventStore::new_snapshot_store(
                PostgresEventRepository::new(pool.clone()),
                SNAPSHOT_EVERY,
            ),
            plain: PersistedEventStore::new_event_store(PostgresEventRepository::new(pool)),
            slots: StdMutex::new(Slots {
                busy: HashMap::new(),
                idle: lru::LruCache::new(
                    std::num::NonZeroUsize::new(KEEP_IDLE_ACCOUNTS)
                        .unwrap_or(std::num::NonZeroUsize::MIN),
                ),
            }),
            appended: Arc::new(Notify::new()),
        }
    }

    /// Notified after every successful append: wakes the projector in this process.
    pub fn appended(&self) -> Arc<Notify> {
        self.appended.clone()
    }

    /// Loads an account's current state (without queueing behind its commands).
    pub async fn load(&self, account: &UserId) -> Result<(CreditAccount, usize), ExecuteError> {
        let ctx = self
            .store
            .load_aggregate(account.as_str())
            .await
            .map_err(store_error)?;
        Ok((ctx.aggregate, ctx.current_sequence))
    }

    /// Decides `command` against the account and appends the resulting events atomically.
    pub async fn execute(
        &self,
        account: &UserId,
        command: CreditCommand,
        metadata: HashMap<String, String>,
    ) -> Result<Committed, ExecuteError> {
        let slot = self.slot(account.as_str());
        let result = {
            let mut cached = slot.lock().await;
            self.execute_locked(account, command, metadata, &mut cached)
                .await
        };
        self.release(account.as_str(), slot);
        result
    }

    async fn execute_locked(
        &self,
        account: &UserId,
        command: CreditCommand,
        metadata: HashMap<String, String>,
        cached: &mut Option<Cached>,
    ) -> Result<Committed, ExecuteError> {
        for attempt in 0..MAX_ATTEMPTS {
            let (current, fresh) = match cached.take() {
                Some(c) => (c, false),
                None => {
                    let ctx = self
                        .store
                        .load_aggregate(account.as_str())
                        .await
                        .map_err(store_error)?;
                    let loaded = Cached {
                        aggregate: ctx.aggregate,
                        sequence: ctx.current_sequence,
                        snapshot: ctx.current_snapshot,
                    };
                    (loaded, true)
                }
            };
            let events = match current.aggregate.decide(command.clone()) {
                Ok(events) => events,
                // Kept state may be behind another process's appends: a refusal is only
                // final when decided on state just loaded from the journal.
                Err(_) if !fresh => continue,
                Err(refused) => {
                    *cached = Some(current);
                    return Err(refused.into());
                }
            };
            let mut after = current.aggregate.clone();
            for event in &events {
                after.apply_event(event.clone());
            }
            let count = events.len();
            let snapshot_after = next_snapshot(current.sequence, count, current.snapshot);
            let context = EventStoreAggregateContext {
                aggregate_id: account.as_str().to_owned(),
                // The store applies the events to this pre-command state itself when it
                // writes a snapshot, so it must not have them applied already.
                aggregate: current.aggregate,
                current_sequence: current.sequence,
                current_snapshot: current.snapshot,
            };
            let store = if snapshot_store_would_corrupt(current.sequence, count) {
                &self.plain
            } else {
                &self.store
            };
            match store.commit(events, context, metadata.clone()).await {
                Ok(committed) => {
                    let sequence = current.sequence + count;
                    *cached = Some(Cached {
                        aggregate: after.clone(),
                        sequence,
                        snapshot: snapshot_after,
                    });
                    self.appended.notify_one();
                    return Ok(Committed {
                        events: committed,
                        state: after,
                        sequence,
                    });
                }
                Err(AggregateError::AggregateConflict) => {
                    tracing::debug!(account.id = %account, attempt, "optimistic lock conflict, retrying");
                    let jitter = rand::thread_rng().gen_range(1..=5u64 << attempt.min(5));
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Err(e) => return Err(store_error(e)),
            }
        }
        Err(ExecuteError::Contended(account.to_string()))
    }

    fn slot(&self, account: &str) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.busy.get(account) {
            return slot.clone();
        }
        let kept = slots.idle.pop(account);
        let slot = Arc::new(Mutex::new(kept));
        slots.busy.insert(account.to_owned(), slot.clone());
        slot
    }

    /// Retires an account's slot once nobody is queued on it, keeping its state among the
    /// idle accounts, so memory stays bounded.
    fn release(&self, account: &str, slot: Slot) {
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
            if let Ok(mut kept) = slot.try_lock() {
                if let Some(state) = kept.take() {
                    slots.idle.put(account.to_owned(), state);
                }
            }
        }
    }
}

/// The snapshot counter after appending `count` events at `sequence`, mirroring the rule of
/// cqrs-es's snapshot store (a snapshot is written each time a multiple of
/// `SNAPSHOT_EVERY` is reached or passed).
fn next_snapshot(sequence: usize, count: usize, snapshot: Option<usize>) -> Option<usize> {
    let next_at = SNAPSHOT_EVERY - (sequence % SNAPSHOT_EVERY);
    if count >= next_at && !snapshot_store_would_corrupt(sequence, count) {
        Some(snapshot.map_or(1, |s| s + 1))
    } else {
        snapshot
    }
}

/// cqrs-es 0.5's snapshot store, when one commit of several events passes a snapshot
/// boundary without ending on it, snapshots the state at the boundary but labels it with the
/// last event's sequence, so the events after the boundary would be lost on the next load.
/// Such commits go through the plain store instead; the snapshot is taken at a later commit.
fn snapshot_store_would_corrupt(sequence: usize, count: usize) -> bool {
    let next_at = SNAPSHOT_EVERY - (sequence % SNAPSHOT_EVERY);
    count > next_at && !(count - next_at).is_multiple_of(SNAPSHOT_EVERY)
}

fn store_error(e: AggregateError<LedgerError>) -> ExecuteError {
    match e {
        AggregateError::UserError(refused) => ExecuteError::Rejected(refused),
        AggregateError::AggregateConflict => ExecuteError::Contended(String::new()),
        other => ExecuteError::Store(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_counter_follows_the_store_rule() {
        assert_eq!(next_snapshot(0, 1, None), None);
        assert_eq!(next_snapshot(99, 1, None), Some(1));
        assert_eq!(next_snapshot(98, 2, Some(1)), Some(2));
        assert_eq!(next_snapshot(100, 1, Some(1)), Some(1));
        // 99 + 2 events passes 100 and ends at 101: no snapshot for that commit.
        assert!(snapshot_store_would_corrupt(99, 2));
        assert_eq!(next_snapshot(99, 2, Some(1)), Some(1));
        assert!(!snapshot_store_would_corrupt(98, 2));
    }
}
