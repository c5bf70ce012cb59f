//! The audit: replays the whole journal in global order and checks it against itself and
//! against the read tables. Read-only: it never changes anything.
//!
//! Checks, per account: the hash chain (no event edited, deleted or reordered), dense
//! sequences, each money event's `balance_after` = previous balance + its delta, the
//! projected balance and records against the replay; and in total: recharged − spent +
//! refunded + granted − reversed = the sum of balances.
//!
//! Everything is read in one `REPEATABLE READ READ ONLY` transaction: the journal, the outbox
//! and the read tables come from the same snapshot, so on a live system the audit compares
//! like with like (an account whose outbox rows are pending in that snapshot is not compared
//! with its read tables), and never reports a discrepancy that is only a race.
//!
//! Speed (docs/BENCHMARKS.md, "Audit speed"): every table is read with binary `COPY` and
//! decoded in place, without a row object per row; the journal's bytes go to a blocking
//! thread that hashes and parses while the server produces the next rows.

use std::collections::HashMap as StdHashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, Utc};
use credit_domain::CreditEvent;
use futures::{pin_mut, TryStreamExt};
use serde::Serialize;
use tokio_postgres::{Client, IsolationLevel, Transaction};

use crate::checkpoint::{Checkpoint, Head, HeadCheck};

/// The replay's maps: keyed by account and record ids, looked up once or more per event.
/// foldhash is several times faster than the standard SipHash on such short keys and still
/// seeded per map.
type HashMap<K, V> = StdHashMap<K, V, foldhash::fast::RandomState>;

/// One thing the audit found wrong.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Discrepancy {
    /// Stable code: `hash_mismatch`, `sequence_gap`, `balance_mismatch`, `bad_payload`,
    /// `projected_balance_mismatch`, `missing_user`, `unknown_user`, `missing_record`,
    /// `record_mismatch`, `unknown_record`, `totals_mismatch`; against a checkpoint also
    /// `checkpoint_head_changed` and `checkpoint_head_missing`.
    pub kind: &'static str,
    pub account: Option<String>,
    /// Global position of the event concerned, when there is one.
    pub position: Option<i64>,
    pub sequence: Option<i64>,
    pub detail: String,
}

impl Discrepancy {
    /// A read-table row of `account` that no event explains.
    fn unknown_row(kind: &'static str, account: &str, detail: String) -> Self {
        Self {
            kind,
            account: Some(account.to_owned()),
            position: None,
            sequence: None,
            detail,
        }
    }
}

impl std::fmt::Display for Discrepancy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(a) = &self.account {
            write!(f, " account={a}")?;
        }
        if let Some(p) = self.position {
            write!(f, " position={p}")?;
        }
        if let Some(s) = self.sequence {
            write!(f, " sequence={s}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// Credits moved, by kind, over the whole journal.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Totals {
    pub recharged: i64,
    pub spent: i64,
    pub refunded: i64,
    pub granted: i64,
    pub reversed: i64,
    /// Sum of the replayed balances.
    pub balances: i64,
    /// Sum of `users.credits`.
    pub projected_balances: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub ok: bool,
    pub events_checked: u64,
    pub accounts_checked: u64,
    /// Accounts whose projection is still catching up (outbox rows pending): their read
    /// tables are not compared.
    pub accounts_pending_projection: u64,
    pub totals: Totals,
    pub discrepancies: Vec<Discrepancy>,
    pub elapsed_seconds: f64,
    /// The checkpoint this audit was checked against, when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointChecked>,
    /// Every account's head in this audit's snapshot: the next checkpoint.
    #[serde(skip)]
    pub heads: Checkpoint,
}

/// What an audit against a checkpoint covered (its findings are among the discrepancies:
/// `checkpoint_head_changed`, `checkpoint_head_missing`).
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointChecked {
    pub created: DateTime<Utc>,
    pub position: i64,
    pub accounts: u64,
    pub root: String,
}

/// The journal in global order, as binary `COPY`: the cheapest form for the server to send
/// and for us to read (no per-row allocation). `payload::text` and `metadata::text` are the
/// exact text the hash covers.
const JOURNAL: &str = "COPY (SELECT position, aggregate_type, aggregate_id, sequence, event_type,
                                    event_version, payload::text, metadata::text, hash
                               FROM events ORDER BY position)
                       TO STDOUT (FORMAT binary)";

/// Bytes of `COPY` output handed to the replay thread at a time.
const CHUNK_BYTES: usize = 256 * 1024;

/// How often the progress callback is called, in events.
const PROGRESS_EVERY: u64 = 50_000;

struct AccountState {
    id: String,
    last_sequence: i64,
    last_position: i64,
    last_hash: Vec<u8>,
    balance: i64,
}

/// What the records tables should say, from the replay.
#[derive(Debug, PartialEq, Eq)]
struct ExpectedRecord {
    /// Index of the account in `Replayed::accounts`.
    account: usize,
    position: i64,
    status: &'static str,
    credits: i64,
    /// Credits clawed back, net of reinstatements (recharges only).
    reversed: i64,
    /// Whether the read table had the row.
    seen: bool,
}

#[derive(Default)]
struct Expected {
    recharges: HashMap<String, ExpectedRecord>,
    consumption: HashMap<String, ExpectedRecord>,
}

/// Progress callback: (events done, events in total).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// Runs the whole audit, in one read-only snapshot.
pub async fn run(
    client: &mut Client,
    progress: Option<Progress<'_>>,
) -> anyhow::Result<AuditReport> {
    run_against(client, progress, None).await
}

/// Runs the whole audit, and also proves that the journal still holds and extends every head
/// the checkpoint recorded.
pub async fn run_against(
    client: &mut Client,
    progress: Option<Progress<'_>>,
    checkpoint: Option<&Checkpoint>,
) -> anyhow::Result<AuditReport> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .context("starting the audit's snapshot")?;
    let report = audit(&tx, progress, checkpoint).await?;
    tx.commit().await?;
    Ok(report)
}

/// A progress callback that the audit's own thread can hold ([`run_apart`]).
pub type SharedProgress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Runs the whole audit (against `checkpoint`, when given) on a thread of its own, over a
/// connection of its own to `url`: what the audit CLI, both admin audit endpoints and the benchmark
/// run.
///
/// Why a thread of its own: tokio-postgres's connection task hands the `COPY` messages to
/// the reading task through a channel of one slot, a socket read's worth at a time, so the
/// two take turns tens of thousands of times per million events. On a multi-threaded runtime
/// each turn is a cross-thread wake-up (a futex call and a thread switch); on this thread's
/// single-threaded runtime it is a function return. Measured on the 1,000,000-event journal
/// of `ledger-bench`: 590,000–650,000 events/s this way, 480,000–525,000 with the connection
/// on the caller's multi-threaded runtime (docs/BENCHMARKS.md). It also keeps an audit's
/// work off the service's request threads.
pub async fn run_apart(
    url: &str,
    progress: Option<SharedProgress>,
    checkpoint: Option<Checkpoint>,
) -> anyhow::Result<AuditReport> {
    let target = crate::tls::pg_target(url)?;
    let (answer, answered) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("credit-audit".into())
        .spawn(move || {
            let audit = || -> anyhow::Result<AuditReport> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the audit's runtime")?;
                runtime.block_on(async move {
                    let (mut client, connection) = target
                        .config
                        .connect(target.tls)
                        .await
                        .context("connecting to the database")?;
                    // A broken connection shows as the error of the audit's next query.
                    let connection = tokio::spawn(async move {
                        let _ = connection.await;
                    });
                    let progress = progress.as_deref().map(|p| p as Progress<'_>);
                    let report = run_against(&mut client, progress, checkpoint.as_ref()).await;
                    drop(client);
                    let _ = connection.await;
                    report
                })
            };
            // The caller may have stopped waiting; then the report is dropped.
            let _ = answer.send(audit());
        })
        .context("starting the audit's thread")?;
    answered.await.context("the audit's thread panicked")?
}

/// The audit proper, inside the snapshot `run` opened.
async fn audit(
    client: &Transaction<'_>,
    progress: Option<Progress<'_>>,
    checkpoint: Option<&Checkpoint>,
) -> anyhow::Result<AuditReport> {
    let started = std::time::Instant::now();
    let replayed = read_journal(client, progress, checkpoint).await?;
    let Replayed {
        accounts,
        index,
        mut expected,
        mut totals,
        mut discrepancies,
        checked,
        last_position,
    } = replayed;

    let mut pending = vec![false; accounts.len()];
    let mut pending_accounts = 0u64;
    for row in client
        .query("SELECT DISTINCT aggregate_id FROM projection_outbox", &[])
        .await?
    {
        let id: &str = row.try_get("aggregate_id")?;
        pending_accounts += 1;
        if let Some(&i) = index.get(id) {
            pending[i] = true;
        }
    }
    let books = Books {
        accounts: &accounts,
        index: &index,
        pending: &pending,
    };
    check_users(client, &books, &mut totals, &mut discrepancies).await?;
    check_records(
        client,
        "recharge_records",
        &mut expected.recharges,
        &books,
        &mut discrepancies,
    )
    .await?;
    check_records(
        client,
        "consumption_records",
        &mut expected.consumption,
        &books,
        &mut discrepancies,
    )
    .await?;

    let accounts_checked = accounts.len() as u64;
    let heads = Checkpoint {
        created: Utc::now(),
        position: last_position,
        events: checked,
        heads: accounts
            .into_iter()
            .map(|s| {
                let head = Head {
                    sequence: s.last_sequence,
                    position: s.last_position,
                    hash: s.last_hash,
                };
                (s.id, head)
            })
            .collect(),
    };
    Ok(AuditReport {
        ok: discrepancies.is_empty(),
        events_checked: checked,
        accounts_checked,
        accounts_pending_projection: pending_accounts,
        totals,
        discrepancies,
        elapsed_seconds: started.elapsed().as_secs_f64(),
        checkpoint: checkpoint.map(|c| CheckpointChecked {
            created: c.created,
            position: c.position,
            accounts: c.heads.len() as u64,
            root: hex::encode(c.root()),
        }),
        heads,
    })
}

/// Streams the journal to a replay on a blocking thread: this task only moves `COPY` bytes,
/// so reading (and the server producing the rows) overlaps with hashing and parsing.
async fn read_journal(
    client: &Transaction<'_>,
    progress: Option<Progress<'_>>,
    checkpoint: Option<&Checkpoint>,
) -> anyhow::Result<Replayed> {
    let total = match progress {
        // Only a progress bar needs the total: it costs a scan of its own.
        Some(_) => client
            .query_one("SELECT count(*) FROM events", &[])
            .await?
            .try_get::<_, i64>(0)? as u64,
        None => 0,
    };
    let sizes = Sizes::estimate(client).await?;
    let done = Arc::new(AtomicU64::new(0));
    let (send, mut receive) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    // Emptied chunks come back to be filled again: no fresh pages to fault in per chunk.
    let (recycle, recycled) = std::sync::mpsc::channel::<Vec<u8>>();
    let replay = {
        let checkpoint = checkpoint.cloned();
        let done = done.clone();
        tokio::task::spawn_blocking(move || {
            let mut replay = Replay::new(checkpoint.as_ref(), &done);
            replay.reserve(sizes);
            let mut decoder = CopyDecoder::default();
            while let Some(mut chunk) = receive.blocking_recv() {
                decoder.feed(&chunk, |fields| replay.event(fields))?;
                chunk.clear();
                // The reader may be gone already; then the chunk is simply dropped.
                let _ = recycle.send(chunk);
            }
            decoder.finish()?;
            Ok::<_, anyhow::Error>(replay.finish())
        })
    };

    let stream = client
        .copy_out(JOURNAL)
        .await
        .context("reading the journal")?;
    pin_mut!(stream);
    let fresh = || Vec::with_capacity(CHUNK_BYTES + 64 * 1024);
    let mut chunk = fresh();
    let mut next_report = PROGRESS_EVERY;
    let mut read = Ok(());
    loop {
        let data = match stream.try_next().await {
            Ok(Some(data)) => data,
            Ok(None) => break,
            Err(e) => {
                read = Err(e);
                break;
            }
        };
        chunk.extend_from_slice(&data);
        if chunk.len() < CHUNK_BYTES {
            continue;
        }
        let next = recycled.try_recv().unwrap_or_else(|_| fresh());
        if send
            .send(std::mem::replace(&mut chunk, next))
            .await
            .is_err()
        {
            // The replay stopped on an error: it is reported below.
            break;
        }
        if let Some(progress) = progress {
            let done = done.load(Ordering::Relaxed);
            if done >= next_report {
                progress(done, total);
                next_report = (done / PROGRESS_EVERY + 1) * PROGRESS_EVERY;
            }
        }
    }
    if read.is_ok() && !chunk.is_empty() {
        // A send error means the replay failed; its error is the one to report.
        let _ = send.send(chunk).await;
    }
    drop(send);
    let replayed = replay.await.context("the journal replay panicked")?;
    read.context("reading the journal")?;
    let replayed = replayed?;
    if let Some(progress) = progress {
        progress(replayed.checked, total);
    }
    Ok(replayed)
}

/// How many accounts and records the replay will meet, from the planner's statistics of the
/// read tables: its maps are sized once instead of growing (rehashing) all along. Only a
/// hint: a wrong estimate costs time, never a finding.
#[derive(Debug, Clone, Copy, Default)]
struct Sizes {
    accounts: usize,
    recharges: usize,
    consumption: usize,
}

impl Sizes {
    /// Never more than this many entries reserved on a hint.
    const MOST: usize = 50_000_000;

    async fn estimate(client: &Transaction<'_>) -> anyhow::Result<Self> {
        let row = client
            .query_one(
                "SELECT (SELECT reltuples FROM pg_class WHERE oid = 'users'::regclass),
                        (SELECT reltuples FROM pg_class WHERE oid = 'recharge_records'::regclass),
                        (SELECT reltuples FROM pg_class WHERE oid = 'consumption_records'::regclass)",
                &[],
            )
            .await?;
        // -1 (never analysed) and nonsense become 0: no reservation.
        let rows = |i| (row.get::<_, f32>(i).max(0.0) as usize).min(Self::MOST);
        Ok(Self {
            accounts: rows(0),
            recharges: rows(1),
            consumption: rows(2),
        })
    }
}

/// One journal row, borrowed from the `COPY` bytes.
struct JournalRow<'a> {
    position: i64,
    aggregate_type: &'a [u8],
    account: &'a str,
    sequence: i64,
    event_type: &'a str,
    event_version: &'a [u8],
    payload: &'a [u8],
    metadata: &'a [u8],
    hash: &'a [u8],
}

impl<'a> JournalRow<'a> {
    fn decode(fields: &[&'a [u8]]) -> anyhow::Result<Self> {
        let &[position, aggregate_type, account, sequence, event_type, event_version, payload, metadata, hash] =
            fields
        else {
            anyhow::bail!("a journal row has {} columns, not 9", fields.len());
        };
        Ok(Self {
            position: int8(position)?,
            aggregate_type,
            account: text(account)?,
            sequence: int8(sequence)?,
            event_type: text(event_type)?,
            event_version,
            payload,
            metadata,
            hash,
        })
    }

    /// This row's link of its account's hash chain, after `prev`.
    fn chain_hash(&self, prev: &[u8]) -> [u8; 32] {
        crate::chain::Link {
            aggregate_type: self.aggregate_type,
            account: self.account.as_bytes(),
            sequence: self.sequence,
            event_type: self.event_type.as_bytes(),
            event_version: self.event_version,
            payload: self.payload,
            metadata: self.metadata,
        }
        .hash(prev)
    }
}

fn int8(field: &[u8]) -> anyhow::Result<i64> {
    let bytes: [u8; 8] = field
        .try_into()
        .map_err(|_| anyhow::anyhow!("a bigint column has {} bytes", field.len()))?;
    Ok(i64::from_be_bytes(bytes))
}

fn text(field: &[u8]) -> anyhow::Result<&str> {
    std::str::from_utf8(field).context("a text column is not UTF-8")
}

/// Decodes PostgreSQL's binary `COPY` format (header, then per row a field count and each
/// field's length and bytes) from chunks cut anywhere. NULL is refused: no column read here
/// can be NULL.
#[derive(Default)]
struct CopyDecoder {
    header_read: bool,
    ended: bool,
    /// An incomplete row (or header) carried over to the next chunk.
    carry: Vec<u8>,
}

/// The most columns a `COPY` read here has.
const MAX_FIELDS: usize = 16;

/// `PGCOPY\n\377\r\n\0`, then 32-bit flags and a 32-bit header extension length.
const COPY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl CopyDecoder {
    /// Calls `row` with the fields of every complete row in `chunk` (and the carry before it).
    fn feed(
        &mut self,
        chunk: &[u8],
        mut row: impl FnMut(&[&[u8]]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        if self.carry.is_empty() {
            let used = self.rows(chunk, &mut row)?;
            self.carry.extend_from_slice(&chunk[used..]);
        } else {
            let mut buffer = std::mem::take(&mut self.carry);
            buffer.extend_from_slice(chunk);
            let used = self.rows(&buffer, &mut row)?;
            buffer.drain(..used);
            self.carry = buffer;
        }
        Ok(())
    }

    /// After the last chunk: the data must have ended with the trailer.
    fn finish(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.ended && self.carry.is_empty(),
            "the COPY data ended in the middle of a row"
        );
        Ok(())
    }

    /// Decodes the complete rows at the start of `data`; returns the bytes used.
    fn rows(
        &mut self,
        data: &[u8],
        row: &mut impl FnMut(&[&[u8]]) -> anyhow::Result<()>,
    ) -> anyhow::Result<usize> {
        let mut at = 0;
        if !self.header_read {
            let fixed = COPY_SIGNATURE.len() + 8;
            let Some(extension) = data.get(fixed - 4..fixed) else {
                return Ok(0);
            };
            anyhow::ensure!(data.starts_with(COPY_SIGNATURE), "not binary COPY data");
            let extension = u32::from_be_bytes(extension.try_into()?) as usize;
            if data.len() < fixed + extension {
                return Ok(0);
            }
            at = fixed + extension;
            self.header_read = true;
        }
        while let Some(count) = data.get(at..at + 2) {
            anyhow::ensure!(!self.ended, "data after the COPY trailer");
            let count = i16::from_be_bytes([count[0], count[1]]);
            if count == -1 {
                self.ended = true;
                at += 2;
                continue;
            }
            let count = usize::try_from(count).context("a negative field count")?;
            anyhow::ensure!(count <= MAX_FIELDS, "a row of {count} columns");
            let mut fields: [&[u8]; MAX_FIELDS] = [&[]; MAX_FIELDS];
            let mut next = at + 2;
            let mut complete = true;
            for field in fields.iter_mut().take(count) {
                let Some(length) = data.get(next..next + 4) else {
                    complete = false;
                    break;
                };
                let length = i32::from_be_bytes(length.try_into()?);
                let length = usize::try_from(length)
                    .map_err(|_| anyhow::anyhow!("a NULL where none can be"))?;
                let start = next + 4;
                next = start + length;
                let Some(bytes) = data.get(start..next) else {
                    complete = false;
                    break;
                };
                *field = bytes;
            }
            if !complete {
                break;
            }
            row(&fields[..count])?;
            at = next;
        }
        Ok(at)
    }
}

/// The replay of the journal, event by event, in global order.
struct Replay<'c> {
    found: Replayed,
    head_check: Option<HeadCheck<'c>>,
    /// Events replayed so far, for the progress bar.
    done: &'c AtomicU64,
}

/// What the replay found and built, for the comparison with the read tables.
#[derive(Default)]
struct Replayed {
    accounts: Vec<AccountState>,
    index: HashMap<String, usize>,
    expected: Expected,
    totals: Totals,
    discrepancies: Vec<Discrepancy>,
    checked: u64,
    last_position: i64,
}

impl<'c> Replay<'c> {
    fn new(checkpoint: Option<&'c Checkpoint>, done: &'c AtomicU64) -> Self {
        Self {
            found: Replayed::default(),
            head_check: checkpoint.map(HeadCheck::new),
            done,
        }
    }

    fn reserve(&mut self, sizes: Sizes) {
        let found = &mut self.found;
        found.accounts.reserve(sizes.accounts);
        found.index.reserve(sizes.accounts);
        found.expected.recharges.reserve(sizes.recharges);
        found.expected.consumption.reserve(sizes.consumption);
    }

    /// One journal row.
    fn event(&mut self, fields: &[&[u8]]) -> anyhow::Result<()> {
        let row = JournalRow::decode(fields)?;
        let JournalRow {
            position,
            account,
            sequence,
            event_type,
            ..
        } = row;
        self.found.checked += 1;
        if self.found.checked.is_multiple_of(PROGRESS_EVERY) {
            self.done.store(self.found.checked, Ordering::Relaxed);
        }
        let at = match self.found.index.get(account) {
            Some(&i) => i,
            None => {
                self.found
                    .index
                    .insert(account.to_owned(), self.found.accounts.len());
                self.found.accounts.push(AccountState {
                    id: account.to_owned(),
                    last_sequence: 0,
                    last_position: 0,
                    last_hash: Vec::new(),
                    balance: 0,
                });
                self.found.accounts.len() - 1
            }
        };
        let state = &mut self.found.accounts[at];
        let discrepancies = &mut self.found.discrepancies;
        let found = |kind, detail: String| Discrepancy {
            kind,
            account: Some(account.to_owned()),
            position: Some(position),
            sequence: Some(sequence),
            detail,
        };
        if sequence != state.last_sequence + 1 {
            discrepancies.push(found(
                "sequence_gap",
                format!(
                    "expected sequence {}, found {sequence}: events are missing or reordered",
                    state.last_sequence + 1
                ),
            ));
        }
        if row.chain_hash(&state.last_hash) != row.hash {
            discrepancies.push(found(
                "hash_mismatch",
                format!("{event_type}: content or chain does not match the stored hash (edited, or an earlier event was removed)"),
            ));
        }
        state.last_sequence = sequence;
        state.last_position = position;
        state.last_hash.clear();
        state.last_hash.extend_from_slice(row.hash);
        self.found.last_position = position;
        if let Some(check) = self.head_check.as_mut() {
            discrepancies.extend(check.observe(account, sequence, position, row.hash));
        }

        let event: CreditEvent = match serde_json::from_slice(row.payload) {
            Ok(e) => e,
            Err(e) => {
                discrepancies.push(found("bad_payload", format!("{event_type}: {e}")));
                return Ok(());
            }
        };
        if let (Some(delta), Some(after)) = (event.credit_delta(), event.balance_after()) {
            let want = state.balance.saturating_add(delta);
            if after != want {
                discrepancies.push(found(
                    "balance_mismatch",
                    format!(
                        "{event_type}: balance_after is {after}, but {} {:+} = {want}",
                        state.balance, delta
                    ),
                ));
            }
            state.balance = after;
        }
        record_expectations(
            event,
            at,
            position,
            &mut self.found.expected,
            &mut self.found.totals,
        );
        Ok(())
    }

    /// After the last event: the checkpoint's lost heads and the totals.
    fn finish(mut self) -> Replayed {
        self.done.store(self.found.checked, Ordering::Relaxed);
        if let Some(check) = self.head_check {
            let (index, accounts) = (&self.found.index, &self.found.accounts);
            self.found
                .discrepancies
                .extend(check.finish(|a| index.get(a).map(|&i| accounts[i].last_sequence)));
        }
        let totals = &mut self.found.totals;
        totals.balances = self.found.accounts.iter().map(|a| a.balance).sum();
        let flow =
            totals.recharged - totals.spent + totals.refunded + totals.granted - totals.reversed;
        if flow != totals.balances {
            self.found.discrepancies.push(Discrepancy {
                kind: "totals_mismatch",
                account: None,
                position: None,
                sequence: None,
                detail: format!(
                    "recharged {} - spent {} + refunded {} + granted {} - reversed {} = {flow}, but balances sum to {}",
                    totals.recharged, totals.spent, totals.refunded, totals.granted, totals.reversed, totals.balances
                ),
            });
        }
        self.found
    }
}

fn record_expectations(
    event: CreditEvent,
    account: usize,
    position: i64,
    expected: &mut Expected,
    totals: &mut Totals,
) {
    let set_status = |map: &mut HashMap<String, ExpectedRecord>, id: &str, status| {
        if let Some(r) = map.get_mut(id) {
            r.status = status;
        }
    };
    let record = |status, credits| ExpectedRecord {
        account,
        position,
        status,
        credits,
        reversed: 0,
        seen: false,
    };
    match event {
        CreditEvent::RechargeRequested {
            recharge_id,
            credits,
            ..
        } => {
            expected
                .recharges
                .insert(recharge_id, record("pending", credits));
        }
        CreditEvent::RechargeCompleted {
            recharge_id,
            credits,
            ..
        } => {
            totals.recharged += credits;
            set_status(&mut expected.recharges, &recharge_id, "completed");
        }
        CreditEvent::RechargeFailed { recharge_id, .. } => {
            set_status(&mut expected.recharges, &recharge_id, "failed")
        }
        CreditEvent::RechargeCancelled { recharge_id } => {
            set_status(&mut expected.recharges, &recharge_id, "cancelled")
        }
        CreditEvent::RechargeReversed {
            recharge_id,
            credits,
            ..
        } => {
            totals.reversed += credits;
            if let Some(r) = expected.recharges.get_mut(&recharge_id) {
                r.reversed += credits;
                r.status = "reversed";
            }
        }
        CreditEvent::RechargeReinstated {
            recharge_id,
            credits,
            ..
        } => {
            // A reinstatement gives back what a reversal took: it counts against `reversed`.
            totals.reversed -= credits;
            if let Some(r) = expected.recharges.get_mut(&recharge_id) {
                r.reversed -= credits;
                r.status = if r.reversed > 0 {
                    "reversed"
                } else {
                    "completed"
                };
            }
        }
        CreditEvent::CreditsDeducted {
            task_id, credits, ..
        } => {
            totals.spent += credits;
            expected
                .consumption
                .insert(task_id, record("completed", credits));
        }
        CreditEvent::CreditsRefunded {
            task_id, credits, ..
        } => {
            totals.refunded += credits;
            set_status(&mut expected.consumption, &task_id, "refunded");
        }
        CreditEvent::CreditsAdjusted { credits, .. } => totals.granted += credits,
        CreditEvent::RechargeCheckoutCreated { .. }
        | CreditEvent::PaymentRefunded { .. }
        | CreditEvent::PaymentDisputed { .. }
        | CreditEvent::VideoSubmissionUncertain { .. }
        | CreditEvent::VideoProgressed { .. }
        | CreditEvent::VideoDeliveredAfterRefund { .. }
        | CreditEvent::VideoTaskSubmitted { .. }
        | CreditEvent::VideoSucceeded { .. }
        | CreditEvent::VideoFailed { .. } => {}
    }
}

/// The replayed accounts, for comparing the read tables with them.
struct Books<'a> {
    accounts: &'a [AccountState],
    index: &'a HashMap<String, usize>,
    /// By account index: its projection is pending in the snapshot, so it is not compared.
    pending: &'a [bool],
}

/// Reads a table with binary `COPY`, calling `row` with each row's fields.
async fn copy_rows(
    client: &Transaction<'_>,
    copy: &str,
    mut row: impl FnMut(&[&[u8]]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let stream = client.copy_out(copy).await?;
    pin_mut!(stream);
    let mut decoder = CopyDecoder::default();
    while let Some(data) = stream.try_next().await? {
        decoder.feed(&data, &mut row)?;
    }
    decoder.finish()
}

async fn check_users(
    client: &Transaction<'_>,
    books: &Books<'_>,
    totals: &mut Totals,
    discrepancies: &mut Vec<Discrepancy>,
) -> anyhow::Result<()> {
    let mut seen = vec![false; books.accounts.len()];
    copy_rows(
        client,
        "COPY (SELECT id, credits, last_sequence FROM users) TO STDOUT (FORMAT binary)",
        |fields| {
            let [id, credits, last_sequence] = fields else {
                anyhow::bail!("a users row has {} columns, not 3", fields.len());
            };
            let (id, credits, last_sequence) = (text(id)?, int8(credits)?, int8(last_sequence)?);
            totals.projected_balances += credits;
            let Some(&at) = books.index.get(id) else {
                discrepancies.push(Discrepancy::unknown_row(
                    "unknown_user",
                    id,
                    format!("users row with {credits} credits has no events"),
                ));
                return Ok(());
            };
            seen[at] = true;
            let state = &books.accounts[at];
            if books.pending[at] {
                return Ok(());
            }
            if credits != state.balance || last_sequence != state.last_sequence {
                discrepancies.push(Discrepancy {
                    kind: "projected_balance_mismatch",
                    account: Some(id.to_owned()),
                    position: None,
                    sequence: Some(state.last_sequence),
                    detail: format!(
                        "users.credits is {credits} at sequence {last_sequence}, the journal says {} at sequence {}",
                        state.balance, state.last_sequence
                    ),
                });
            }
            Ok(())
        },
    )
    .await
    .context("reading users")?;
    for (at, state) in books.accounts.iter().enumerate() {
        if !seen[at] && !books.pending[at] {
            discrepancies.push(Discrepancy {
                kind: "missing_user",
                account: Some(state.id.clone()),
                position: None,
                sequence: Some(state.last_sequence),
                detail: format!("no users row; the journal says {} credits", state.balance),
            });
        }
    }
    Ok(())
}

async fn check_records(
    client: &Transaction<'_>,
    table: &str,
    expected: &mut HashMap<String, ExpectedRecord>,
    books: &Books<'_>,
    discrepancies: &mut Vec<Discrepancy>,
) -> anyhow::Result<()> {
    let copy = format!(
        "COPY (SELECT id, user_id, status, credits FROM {table}) TO STDOUT (FORMAT binary)"
    );
    copy_rows(client, &copy, |fields| {
        let [id, user, status, credits] = fields else {
            anyhow::bail!("a {table} row has {} columns, not 4", fields.len());
        };
        let (id, user, status, credits) = (text(id)?, text(user)?, text(status)?, int8(credits)?);
        let Some(want) = expected.get_mut(id) else {
            discrepancies.push(Discrepancy::unknown_row(
                "unknown_record",
                user,
                format!("{table} row {id} has no event"),
            ));
            return Ok(());
        };
        want.seen = true;
        if books.pending[want.account] {
            return Ok(());
        }
        let account = &books.accounts[want.account].id;
        if account != user || want.status != status || want.credits != credits {
            discrepancies.push(Discrepancy {
                kind: "record_mismatch",
                account: Some(account.clone()),
                position: Some(want.position),
                sequence: None,
                detail: format!(
                    "{table} row {id}: ({user}, {status}, {credits} credits), journal says ({account}, {}, {} credits)",
                    want.status, want.credits
                ),
            });
        }
        Ok(())
    })
    .await
    .with_context(|| format!("reading {table}"))?;
    for (id, want) in expected.iter() {
        if !want.seen && !books.pending[want.account] {
            discrepancies.push(Discrepancy {
                kind: "missing_record",
                account: Some(books.accounts[want.account].id.clone()),
                position: Some(want.position),
                sequence: None,
                detail: format!("{table} row {id} is missing"),
            });
        }
    }
    Ok(())
}

/// An account's balance at an instant, with the events that made it.
#[derive(Debug, Clone, Serialize)]
pub struct BalanceAt {
    pub user_id: String,
    pub at: DateTime<Utc>,
    pub credits: i64,
    pub events: Vec<crate::queries::EventRecord>,
}

/// The balance of `account` at `at`, from the journal alone.
pub async fn balance_at(
    client: &Client,
    account: &str,
    at: DateTime<Utc>,
) -> anyhow::Result<BalanceAt> {
    let events = crate::queries::account_events(client, account, Some(at), None, i64::MAX).await?;
    let credits = events
        .iter()
        .rev()
        .find_map(|e| e.balance_after)
        .unwrap_or(0);
    Ok(BalanceAt {
        user_id: account.to_owned(),
        at,
        credits,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::CopyDecoder;

    /// Binary `COPY` output of two rows, (1, "alice", '\x00ff') and (2, "", '\x'), and the
    /// trailer.
    fn copy_data() -> Vec<u8> {
        let mut data = b"PGCOPY\n\xff\r\n\0".to_vec();
        data.extend(0u32.to_be_bytes());
        data.extend(4u32.to_be_bytes());
        data.extend(b"ext!");
        for (n, text, bytes) in [(1i64, "alice", &[0u8, 255][..]), (2, "", &[][..])] {
            data.extend(3i16.to_be_bytes());
            data.extend(8i32.to_be_bytes());
            data.extend(n.to_be_bytes());
            data.extend((text.len() as i32).to_be_bytes());
            data.extend(text.as_bytes());
            data.extend((bytes.len() as i32).to_be_bytes());
            data.extend(bytes);
        }
        data.extend((-1i16).to_be_bytes());
        data
    }

    fn decode(chunks: &[&[u8]]) -> anyhow::Result<Vec<Vec<Vec<u8>>>> {
        let mut decoder = CopyDecoder::default();
        let mut rows = Vec::new();
        for chunk in chunks {
            decoder.feed(chunk, |fields| {
                rows.push(fields.iter().map(|f| f.to_vec()).collect());
                Ok(())
            })?;
        }
        decoder.finish()?;
        Ok(rows)
    }

    #[test]
    fn rows_are_decoded_wherever_the_chunks_are_cut() {
        let data = copy_data();
        let whole = decode(&[&data]).expect("decodes");
        assert_eq!(
            whole,
            vec![
                vec![1i64.to_be_bytes().to_vec(), b"alice".to_vec(), vec![0, 255]],
                vec![2i64.to_be_bytes().to_vec(), vec![], vec![]],
            ]
        );
        for cut in 0..=data.len() {
            for second in cut..=data.len() {
                let (a, rest) = data.split_at(cut);
                let (b, c) = rest.split_at(second - cut);
                assert_eq!(
                    decode(&[a, b, c]).expect("decodes"),
                    whole,
                    "cut at {cut}, {second}"
                );
            }
        }
    }

    #[test]
    fn truncated_or_foreign_data_is_refused() {
        let data = copy_data();
        assert!(decode(&[&data[..data.len() - 1]]).is_err(), "no trailer");
        assert!(
            decode(&[&data[..data.len() - 5]]).is_err(),
            "a row cut short"
        );
        assert!(
            decode(&[b"id,name\n1,alice\n\n\n\n\n"]).is_err(),
            "text COPY"
        );
        let mut null = data.clone();
        // The first row's text field (after the header, count, and the 8-byte int8) as NULL.
        let at = 19 + 4 + 2 + 4 + 8;
        null[at..at + 4].copy_from_slice(&(-1i32).to_be_bytes());
        assert!(decode(&[&null]).is_err(), "NULL");
    }
}
