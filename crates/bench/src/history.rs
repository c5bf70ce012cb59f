//! An account's cost does not grow with its history (issue 9): one account with a long
//! history of settled video tasks, written through the journal (decided by the real domain,
//! bulk-inserted through the journal trigger) with the snapshot the executor would have
//! left (at the last multiple of `SNAPSHOT_EVERY`, the events after it to replay); then its
//! snapshot's size, its cold load time (`Ledger::load` on a fresh `Ledger`), and the hot
//! deduction rate on it against a fresh account's, in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use credit_domain::{CreditCommand, UserId};
use credit_store::executor::SNAPSHOT_EVERY;
use credit_store::{Database, Ledger, Projector};
use tokio_postgres::types::Json;

use crate::deductions::{self, Accounts, Scenario};
use crate::journal::{self, Account, Batch};

pub const LONG: &str = "long-history";
pub const FRESH: &str = "fresh-account";

pub struct Figures {
    pub tasks: usize,
    pub events: i64,
    pub snapshot_bytes: usize,
    /// Cold loads of the long account, in ms, sorted.
    pub loads_ms: Vec<f64>,
    /// Cold loads of the fresh account, in ms, sorted.
    pub fresh_loads_ms: Vec<f64>,
    /// (workers, long-history rate, fresh rate), per pair of runs.
    pub hot: Vec<(usize, f64, f64)>,
}

impl Figures {
    pub fn median(ms: &[f64]) -> f64 {
        ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

/// Writes the long account's history: a recharge, then `tasks` tasks charged, submitted and
/// settled (every third one failed and refunded, the others succeeded). Returns its last
/// sequence and the size of the snapshot written.
async fn build(client: &tokio_postgres::Client, tasks: usize) -> anyhow::Result<(i64, usize)> {
    let mut account = Account::new(LONG.to_owned());
    let mut batch = Batch::default();
    let mut snapshot: Option<(i64, String)> = None;
    let mut analyzed = false;
    let mut commands: Vec<CreditCommand> =
        journal::recharge(&format!("{LONG}-r1"), 10 * tasks as i64 + 100_000_000).to_vec();
    for t in 0..tasks {
        let task = format!("{LONG}-t{t}");
        commands.push(journal::deduct(task.clone()));
        commands.push(CreditCommand::MarkTaskSubmitted {
            task_id: task.clone(),
            provider_task_id: format!("prov-{task}"),
        });
        commands.push(if t % 3 == 0 {
            CreditCommand::FailVideo {
                task_id: task,
                failure_reason: "error".into(),
                error_message: "content policy".into(),
            }
        } else {
            CreditCommand::RecordVideoSuccess {
                video_url: format!("https://cdn.example/{task}.mp4"),
                task_id: task,
                remove_watermark: Some(true),
                pid: None,
            }
        });
        // One task's commands at a time, like the executor's snapshots at batch ends.
        for command in commands.drain(..) {
            let before = account.sequence();
            for (seq, event) in account.decide(command)? {
                batch.push(LONG, seq, &event)?;
            }
            let after = account.sequence();
            if after / SNAPSHOT_EVERY as i64 > before / SNAPSHOT_EVERY as i64 {
                snapshot = Some((after, serde_json::to_string(account.state())?));
            }
        }
        if batch.len() >= 20_000 {
            batch.flush(client).await?;
            if !analyzed {
                // The journal trigger looks up the previous event's hash; planned on an empty
                // table, that lookup may take `events_recorded_at` and read the whole account
                // for every event (quadratic for one long account). With statistics it takes
                // the primary key. (A service's journal has statistics: autovacuum.)
                client.batch_execute("ANALYZE events").await?;
                analyzed = true;
            }
        }
    }
    batch.flush(client).await?;
    let mut fresh = Account::new(FRESH.to_owned());
    for command in journal::recharge(&format!("{FRESH}-r1"), 10 * tasks as i64 + 100_000_000) {
        for (seq, event) in fresh.decide(command)? {
            batch.push(FRESH, seq, &event)?;
        }
    }
    batch.flush(client).await?;
    let Some((at, payload)) = snapshot else {
        return Ok((account.sequence(), 0));
    };
    let value: serde_json::Value = serde_json::from_str(&payload)?;
    client
        .execute(
            "INSERT INTO snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload)
             VALUES ('CreditAccount', $1, $2, $3, $4)",
            &[&LONG, &at, &(at / SNAPSHOT_EVERY as i64), &Json(&value)],
        )
        .await?;
    Ok((account.sequence(), payload.len()))
}

/// Cold loads of `account`, each on a new `Ledger` (nothing kept in memory), in ms, sorted.
async fn loads(database: &Database, account: &UserId, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let ledger = Ledger::new(database.write.clone());
        let started = Instant::now();
        ledger.load(account).await?;
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms)
}

pub async fn run(
    database: &Database,
    tasks: usize,
    workers: &[usize],
    duration: Duration,
) -> anyhow::Result<Figures> {
    let client = database.read.get().await?;
    let started = Instant::now();
    let (events, snapshot_bytes) = build(&client, tasks).await?;
    println!(
        "history: {tasks} settled tasks, {events} events on {LONG}, written in {:.1} s; snapshot {snapshot_bytes} bytes",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let projector = Projector::new(database.read.clone(), Arc::new(tokio::sync::Notify::new()));
    credit_store::projector::rebuild(&projector).await?;
    client.batch_execute("VACUUM ANALYZE").await?;
    println!("  projected in {:.1} s", started.elapsed().as_secs_f64());

    let long = UserId::parse(LONG)?;
    let fresh = UserId::parse(FRESH)?;
    // A first load warms PostgreSQL's cache, as a service in use would have it.
    loads(database, &long, 3).await?;
    let loads_ms = loads(database, &long, 50).await?;
    let fresh_loads_ms = loads(database, &fresh, 50).await?;
    println!(
        "  cold load (Ledger::load, new Ledger each time, 50 loads): {LONG} median {:.2} ms, max {:.2} ms; {FRESH} median {:.2} ms",
        Figures::median(&loads_ms),
        loads_ms.last().copied().unwrap_or(f64::NAN),
        Figures::median(&fresh_loads_ms),
    );

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let ledger = Arc::new(Ledger::new(database.write.clone()));
    let projector = Projector::new(database.read.clone(), ledger.appended());
    let running = tokio::spawn(projector.run(stopped));
    let mut hot = Vec::new();
    println!(
        "  {:<8} {:>16} {:>16} {:>7}",
        "workers", "long ops/s", "fresh ops/s", "ratio"
    );
    for &w in workers {
        // Two pairs, the long account first in one and second in the other, so that a
        // change in the machine's load, or the open tasks a run leaves behind, hit both.
        for pair in 0..2 {
            let mut rates = [0.0; 2];
            let order = if pair == 0 { [0, 1] } else { [1, 0] };
            for k in order {
                let account = [LONG, FRESH][k];
                let accounts = Arc::new(Accounts {
                    spread: Vec::new(),
                    hot: account.to_owned(),
                });
                let tag = format!("h{w}p{pair}{}", &account[..1]);
                let run = deductions::ledger_run(
                    ledger.clone(),
                    accounts,
                    deductions::Picks::For(Scenario::Hot, duration),
                    w,
                    &tag,
                )
                .await?;
                if let Some(e) = &run.first_error {
                    println!("  first failure on {account}: {e} ({} failed)", run.failed);
                }
                rates[k] = run.rate();
                deductions::wait_for_projection(&database.read).await?;
            }
            println!(
                "  {:<8} {:>16.0} {:>16.0} {:>7.2}",
                w,
                rates[0],
                rates[1],
                rates[0] / rates[1]
            );
            hot.push((w, rates[0], rates[1]));
        }
    }
    stop.send(true)?;
    running.await?;
    Ok(Figures {
        tasks,
        events,
        snapshot_bytes,
        loads_ms,
        fresh_loads_ms,
        hot,
    })
}
