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

use std::collections::HashMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use credit_domain::CreditEvent;
use futures::{pin_mut, TryStreamExt};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_postgres::{Client, IsolationLevel, Transaction};

use crate::checkpoint::{Checkpoint, Head, HeadCheck};

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

#[derive(Default)]
struct AccountState {
    last_sequence: i64,
    last_position: i64,
    last_hash: Vec<u8>,
    balance: i64,
}

/// What the records tables should say, from the replay.
#[derive(Debug, PartialEq, Eq)]
struct ExpectedRecord {
    account: String,
    position: i64,
    status: &'static str,
    credits: i64,
    /// Credits clawed back, net of reinstatements (recharges only).
    reversed: i64,
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
    let report = replay(&tx, progress, checkpoint).await?;
    tx.commit().await?;
    Ok(report)
}

/// The audit proper, inside the snapshot `run` opened.
async fn replay(
    client: &Transaction<'_>,
    progress: Option<Progress<'_>>,
    checkpoint: Option<&Checkpoint>,
) -> anyhow::Result<AuditReport> {
    let started = std::time::Instant::now();
    let total: i64 = client
        .query_one("SELECT count(*) FROM events", &[])
        .await?
        .get(0);
    let mut discrepancies = Vec::new();
    let mut accounts: HashMap<String, AccountState> = HashMap::new();
    let mut expected = Expected::default();
    let mut totals = Totals::default();
    let mut checked = 0u64;
    let mut last_position = 0i64;
    let mut head_check = checkpoint.map(HeadCheck::new);

    let stream = client
        .query_raw(
            "SELECT position, aggregate_type, aggregate_id, sequence, event_type, event_version,
                    payload::text, metadata::text, hash
               FROM events ORDER BY position",
            std::iter::empty::<i64>(),
        )
        .await
        .context("reading the journal")?;
    pin_mut!(stream);
    while let Some(row) = stream.try_next().await? {
        let position: i64 = row.get(0);
        let aggregate_type: &str = row.get(1);
        let account: &str = row.get(2);
        let sequence: i64 = row.get(3);
        let event_type: &str = row.get(4);
        let event_version: &str = row.get(5);
        let payload: &str = row.get(6);
        let metadata: &str = row.get(7);
        let stored_hash: &[u8] = row.get(8);
        checked += 1;
        if let Some(progress) = progress {
            if checked.is_multiple_of(50_000) {
                progress(checked, total as u64);
            }
        }

        let state = match accounts.get_mut(account) {
            Some(s) => s,
            None => accounts.entry(account.to_owned()).or_default(),
        };
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
        let mut hasher = Sha256::new();
        hasher.update(&state.last_hash);
        for (i, part) in [
            aggregate_type,
            account,
            &sequence.to_string(),
            event_type,
            event_version,
            payload,
            metadata,
        ]
        .iter()
        .enumerate()
        {
            if i > 0 {
                hasher.update(b"|");
            }
            hasher.update(part.as_bytes());
        }
        if hasher.finalize().as_slice() != stored_hash {
            discrepancies.push(found(
                "hash_mismatch",
                format!("{event_type}: content or chain does not match the stored hash (edited, or an earlier event was removed)"),
            ));
        }
        state.last_sequence = sequence;
        state.last_position = position;
        state.last_hash = stored_hash.to_vec();
        last_position = position;
        if let Some(check) = head_check.as_mut() {
            discrepancies.extend(check.observe(account, sequence, position, stored_hash));
        }

        let event: CreditEvent = match serde_json::from_str(payload) {
            Ok(e) => e,
            Err(e) => {
                discrepancies.push(found("bad_payload", format!("{event_type}: {e}")));
                continue;
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
        record_expectations(&event, account, position, &mut expected, &mut totals);
    }
    if let Some(progress) = progress {
        progress(checked, total as u64);
    }

    if let Some(check) = head_check {
        discrepancies.extend(check.finish(|a| accounts.get(a).map(|s| s.last_sequence)));
    }

    totals.balances = accounts.values().map(|a| a.balance).sum();
    let flow = totals.recharged - totals.spent + totals.refunded + totals.granted - totals.reversed;
    if flow != totals.balances {
        discrepancies.push(Discrepancy {
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

    let pending: std::collections::HashSet<String> = client
        .query("SELECT DISTINCT aggregate_id FROM projection_outbox", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    check_users(client, &accounts, &pending, &mut totals, &mut discrepancies).await?;
    check_records(
        client,
        "recharge_records",
        "SELECT id, user_id, status, credits FROM recharge_records",
        &expected.recharges,
        &pending,
        &mut discrepancies,
    )
    .await?;
    check_records(
        client,
        "consumption_records",
        "SELECT id, user_id, status, credits FROM consumption_records",
        &expected.consumption,
        &pending,
        &mut discrepancies,
    )
    .await?;

    let heads = Checkpoint {
        created: Utc::now(),
        position: last_position,
        events: checked,
        heads: accounts
            .iter()
            .map(|(id, s)| {
                let head = Head {
                    sequence: s.last_sequence,
                    position: s.last_position,
                    hash: s.last_hash.clone(),
                };
                (id.clone(), head)
            })
            .collect(),
    };
    Ok(AuditReport {
        ok: discrepancies.is_empty(),
        events_checked: checked,
        accounts_checked: accounts.len() as u64,
        accounts_pending_projection: pending.len() as u64,
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

fn record_expectations(
    event: &CreditEvent,
    account: &str,
    position: i64,
    expected: &mut Expected,
    totals: &mut Totals,
) {
    let set_status = |map: &mut HashMap<String, ExpectedRecord>, id: &str, status| {
        if let Some(r) = map.get_mut(id) {
            r.status = status;
        }
    };
    match event {
        CreditEvent::RechargeRequested {
            recharge_id,
            credits,
            ..
        } => {
            expected.recharges.insert(
                recharge_id.clone(),
                ExpectedRecord {
                    account: account.to_owned(),
                    position,
                    status: "pending",
                    credits: *credits,
                    reversed: 0,
                },
            );
        }
        CreditEvent::RechargeCompleted {
            recharge_id,
            credits,
            ..
        } => {
            totals.recharged += credits;
            set_status(&mut expected.recharges, recharge_id, "completed");
        }
        CreditEvent::RechargeFailed { recharge_id, .. } => {
            set_status(&mut expected.recharges, recharge_id, "failed")
        }
        CreditEvent::RechargeCancelled { recharge_id } => {
            set_status(&mut expected.recharges, recharge_id, "cancelled")
        }
        CreditEvent::RechargeReversed {
            recharge_id,
            credits,
            ..
        } => {
            totals.reversed += credits;
            if let Some(r) = expected.recharges.get_mut(recharge_id) {
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
            if let Some(r) = expected.recharges.get_mut(recharge_id) {
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
            expected.consumption.insert(
                task_id.clone(),
                ExpectedRecord {
                    account: account.to_owned(),
                    position,
                    status: "completed",
                    credits: *credits,
                    reversed: 0,
                },
            );
        }
        CreditEvent::CreditsRefunded {
            task_id, credits, ..
        } => {
            totals.refunded += credits;
            set_status(&mut expected.consumption, task_id, "refunded");
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

async fn check_users(
    client: &Transaction<'_>,
    accounts: &HashMap<String, AccountState>,
    pending: &std::collections::HashSet<String>,
    totals: &mut Totals,
    discrepancies: &mut Vec<Discrepancy>,
) -> anyhow::Result<()> {
    let rows = client
        .query("SELECT id, credits, last_sequence FROM users", &[])
        .await?;
    let mut seen = std::collections::HashSet::new();
    for row in rows {
        let id: String = row.get(0);
        let credits: i64 = row.get(1);
        let last_sequence: i64 = row.get(2);
        totals.projected_balances += credits;
        let Some(state) = accounts.get(&id) else {
            discrepancies.push(Discrepancy {
                kind: "unknown_user",
                account: Some(id.clone()),
                position: None,
                sequence: None,
                detail: format!("users row with {credits} credits has no events"),
            });
            continue;
        };
        seen.insert(id.clone());
        if pending.contains(&id) {
            continue;
        }
        if credits != state.balance || last_sequence != state.last_sequence {
            discrepancies.push(Discrepancy {
                kind: "projected_balance_mismatch",
                account: Some(id),
                position: None,
                sequence: Some(state.last_sequence),
                detail: format!(
                    "users.credits is {credits} at sequence {last_sequence}, the journal says {} at sequence {}",
                    state.balance, state.last_sequence
                ),
            });
        }
    }
    for (id, state) in accounts {
        if !seen.contains(id) && !pending.contains(id) {
            discrepancies.push(Discrepancy {
                kind: "missing_user",
                account: Some(id.clone()),
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
    sql: &str,
    expected: &HashMap<String, ExpectedRecord>,
    pending: &std::collections::HashSet<String>,
    discrepancies: &mut Vec<Discrepancy>,
) -> anyhow::Result<()> {
    let stream = client.query_raw(sql, std::iter::empty::<i64>()).await?;
    pin_mut!(stream);
    let mut seen = std::collections::HashSet::new();
    while let Some(row) = stream.try_next().await? {
        let id: &str = row.get(0);
        let user: &str = row.get(1);
        let status: &str = row.get(2);
        let credits: i64 = row.get(3);
        match expected.get(id) {
            None => discrepancies.push(Discrepancy {
                kind: "unknown_record",
                account: Some(user.to_owned()),
                position: None,
                sequence: None,
                detail: format!("{table} row {id} has no event"),
            }),
            Some(want) => {
                seen.insert(id.to_owned());
                if pending.contains(&want.account) {
                    continue;
                }
                if want.account != user || want.status != status || want.credits != credits {
                    discrepancies.push(Discrepancy {
                        kind: "record_mismatch",
                        account: Some(want.account.clone()),
                        position: Some(want.position),
                        sequence: None,
                        detail: format!(
                            "{table} row {id}: ({user}, {status}, {credits} credits), journal says ({}, {}, {} credits)",
                            want.account, want.status, want.credits
                        ),
                    });
                }
            }
        }
    }
    for (id, want) in expected {
        if !seen.contains(id.as_str()) && !pending.contains(&want.account) {
            discrepancies.push(Discrepancy {
                kind: "missing_record",
                account: Some(want.account.clone()),
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
