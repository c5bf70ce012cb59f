//! Cost as work grows (issue 9): on a journal of a given size over a given number of
//! accounts, the spread deduction rate and its p99 latency through `Ledger::execute`, the
//! projector's lag meanwhile, the bytes on disk per event, and the audit's speed.

use std::sync::Arc;
use std::time::Duration;

use credit_store::{Database, Ledger, Projector};

use crate::deductions::{self, Accounts, LagPeak, Run, Scenario};
use crate::journal;

/// The tables whose size is counted: the journal, its outbox and snapshots, the read tables.
const TABLES: [&str; 7] = [
    "events",
    "projection_outbox",
    "snapshots",
    "users",
    "recharge_records",
    "consumption_records",
    "video_tasks",
];

/// One table's size on disk.
pub struct TableSize {
    pub table: String,
    /// Heap, TOAST, free-space and visibility maps (`pg_table_size`).
    pub data: i64,
    /// All its indexes (`pg_indexes_size`).
    pub indexes: i64,
}

pub struct Figures {
    pub accounts: usize,
    pub events: u64,
    pub run: Run,
    pub lag: LagPeak,
    pub catch_up: Duration,
    pub sizes: Vec<TableSize>,
    pub audit_events: u64,
    pub audit_seconds: f64,
    pub audit_ok: bool,
}

/// Deducts for `seconds` at `workers` workers spread over the journal's `accounts` accounts
/// (written by `journal::build` and projected), with the projector running, then measures
/// the tables and audits everything.
pub async fn measure(
    database: &Database,
    url: &str,
    accounts: usize,
    workers: usize,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let ids = Arc::new(Accounts {
        spread: (0..accounts).map(journal::account_id).collect(),
        // Unused by the spread scenario.
        hot: journal::account_id(0),
    });
    let ledger = Arc::new(Ledger::new(database.write.clone()));
    let projector = Projector::new(database.read.clone(), ledger.appended());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let projecting = tokio::spawn(projector.run(stopped));
    let sampler = deductions::LagSampler::start(database.read.clone());
    let run = deductions::ledger_run(
        ledger,
        ids,
        deductions::Picks::For(Scenario::Spread, duration),
        workers,
        &format!("scale{}", std::process::id()),
    )
    .await?;
    let catch_up = deductions::wait_for_projection(&database.read).await?;
    let lag = sampler.take();
    sampler.stop();
    stop.send(true)?;
    projecting.await?;

    let client = database.read.get().await?;
    let events: i64 = client
        .query_one("SELECT count(*) FROM events", &[])
        .await?
        .try_get(0)?;
    let sizes = client
        .query(
            "SELECT relname::text AS name, pg_table_size(oid) AS data,
                    pg_indexes_size(oid) AS indexes
               FROM pg_class
              WHERE relname = ANY($1) AND relkind = 'r' AND relnamespace = 'public'::regnamespace
              ORDER BY array_position($1, relname::text)",
            &[&&TABLES[..]],
        )
        .await?
        .iter()
        .map(|row| {
            Ok(TableSize {
                table: row.try_get("name")?,
                data: row.try_get("data")?,
                indexes: row.try_get("indexes")?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let report = credit_store::audit::run_apart(url, None, None).await?;
    for d in report.discrepancies.iter().take(10) {
        println!("  {d}");
    }
    Ok(Figures {
        accounts,
        events: events as u64,
        run,
        lag,
        catch_up,
        sizes,
        audit_events: report.events_checked,
        audit_seconds: report.elapsed_seconds,
        audit_ok: report.ok,
    })
}

pub fn print(f: &Figures) {
    let per_event = |bytes: i64| bytes as f64 / f.events.max(1) as f64;
    println!();
    println!(
        "scale: {} accounts, {} events in the journal after the run",
        f.accounts, f.events
    );
    println!(
        "  deductions (spread): {:.0} ops/s, p99 {:.1} ms, {} failed{}",
        f.run.rate(),
        f.run.p99_ms(),
        f.run.failed,
        f.run
            .first_error
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    println!(
        "  projector: max lag {:.3} s, max {} pending, caught up {:.2} s after the run",
        f.lag.seconds,
        f.lag.pending,
        f.catch_up.as_secs_f64()
    );
    println!(
        "  {:<20} {:>14} {:>14} {:>12} {:>12}",
        "table", "data bytes", "index bytes", "data/event", "index/event"
    );
    for s in &f.sizes {
        println!(
            "  {:<20} {:>14} {:>14} {:>12.1} {:>12.1}",
            s.table,
            s.data,
            s.indexes,
            per_event(s.data),
            per_event(s.indexes)
        );
    }
    let total: i64 = f.sizes.iter().map(|s| s.data + s.indexes).sum();
    println!("  {:<20} {:>29} {:>25.1}", "all", total, per_event(total));
    println!(
        "  audit::run: ok={} events={} in {:.2} s = {:.0} events/s",
        f.audit_ok,
        f.audit_events,
        f.audit_seconds,
        f.audit_events as f64 / f.audit_seconds
    );
}
