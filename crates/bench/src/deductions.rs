//! Deduction throughput: the ledger (`Ledger::execute`, with the projector running) against
//! the plain-SQL equivalent, spread over many accounts or on one hot account.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use credit_domain::UserId;
use credit_store::{projector, Ledger};
use deadpool_postgres::Pool;
use rand::{Rng, SeedableRng};

use crate::journal;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Each deduction on a random one of the funded accounts.
    Spread,
    /// Every deduction on the same account.
    Hot,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Self::Spread => "spread",
            Self::Hot => "hot",
        }
    }
}

/// What one timed run did.
#[derive(Debug, Default, Clone)]
pub struct Run {
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    /// Each ledger command's latency, in microseconds (ledger runs only).
    pub latencies_us: Vec<u32>,
}

impl Run {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    /// The 99th percentile of the latencies, in milliseconds (0 without any).
    pub fn p99_ms(&self) -> f64 {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        let Some(last) = sorted.len().checked_sub(1) else {
            return 0.0;
        };
        f64::from(sorted[last * 99 / 100]) / 1000.0
    }
}

/// The accounts a scenario draws from.
pub struct Accounts {
    pub spread: Vec<String>,
    pub hot: String,
}

impl Accounts {
    fn pick(&self, scenario: Scenario, rng: &mut impl Rng) -> &str {
        match scenario {
            Scenario::Spread => &self.spread[rng.gen_range(0..self.spread.len())],
            Scenario::Hot => &self.hot,
        }
    }

    /// The account of a client's next deduction, or `None` when the run is over.
    fn next(&self, picks: &Picks, rng: &mut impl Rng, stop: &AtomicBool) -> Option<&str> {
        match picks {
            Picks::For(scenario, _) => {
                (!stop.load(Ordering::Relaxed)).then(|| self.pick(*scenario, rng))
            }
            Picks::EachOnce(taken) => self
                .spread
                .get(taken.fetch_add(1, Ordering::Relaxed))
                .map(String::as_str),
        }
    }
}

/// How the clients of a run pick their accounts: at random as the scenario says, for a time;
/// or every account of the spread scenario once, shared out among them (the warm-up sweep:
/// the executor then holds every account's state, as a service that has been serving them
/// does, and PostgreSQL has touched every balance row).
#[derive(Clone)]
pub enum Picks {
    For(Scenario, Duration),
    EachOnce(Arc<AtomicUsize>),
}

impl Picks {
    pub fn each_once() -> Self {
        Self::EachOnce(Arc::new(AtomicUsize::new(0)))
    }

    /// How long the run lasts, if its clients do not end by themselves.
    fn duration(&self) -> Option<Duration> {
        match self {
            Self::For(_, duration) => Some(*duration),
            Self::EachOnce(_) => None,
        }
    }
}

pub const PLAIN_SCHEMA: &str = "
    CREATE TABLE balances (id text PRIMARY KEY, balance bigint NOT NULL);
    CREATE TABLE plain_events (
        id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        account     text        NOT NULL,
        credits     bigint      NOT NULL,
        payload     jsonb       NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
    );";

/// Runs `workers` ledger clients, picking accounts as `picks` says.
pub async fn ledger_run(
    ledger: Arc<Ledger>,
    accounts: Arc<Accounts>,
    picks: Picks,
    workers: usize,
    tag: &str,
) -> anyhow::Result<Run> {
    let ids: Arc<HashMap<String, UserId>> = Arc::new(
        accounts
            .spread
            .iter()
            .chain([&accounts.hot])
            .map(|id| Ok((id.clone(), UserId::parse(id)?)))
            .collect::<anyhow::Result<_>>()?,
    );
    timed(workers, picks.duration(), move |worker, stop| {
        let ledger = ledger.clone();
        let accounts = accounts.clone();
        let ids = ids.clone();
        let picks = picks.clone();
        let tag = format!("{tag}-{worker}");
        async move {
            let mut run = Run::default();
            let mut rng = rand::rngs::StdRng::from_entropy();
            let mut n = 0u64;
            while let Some(account) = accounts.next(&picks, &mut rng, &stop) {
                let id = &ids[account];
                n += 1;
                let command = journal::deduct(format!("{tag}-{n}"));
                let started = Instant::now();
                let result = ledger.execute(id, command, HashMap::new()).await;
                let micros = started.elapsed().as_micros();
                run.latencies_us
                    .push(u32::try_from(micros).unwrap_or(u32::MAX));
                match result {
                    Ok(_) => run.ok += 1,
                    Err(e) => {
                        run.failed += 1;
                        run.first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            run
        }
    })
    .await
}

/// Runs `workers` plain-SQL clients picking accounts as `picks` says: one transaction per
/// deduction, a guarded `UPDATE` of the balance row plus an `INSERT` of an event row.
pub async fn plain_run(
    pool: Pool,
    accounts: Arc<Accounts>,
    picks: Picks,
    workers: usize,
) -> anyhow::Result<Run> {
    let payload: serde_json::Value =
        serde_json::to_value(journal::deduct("plain".into())).context("payload")?;
    timed(workers, picks.duration(), move |_, stop| {
        let pool = pool.clone();
        let accounts = accounts.clone();
        let payload = payload.clone();
        let picks = picks.clone();
        async move {
            let mut run = Run::default();
            let mut rng = rand::rngs::StdRng::from_entropy();
            let result: anyhow::Result<()> = async {
                let mut client = pool.get().await?;
                let update = client
                    .prepare(
                        "UPDATE balances SET balance = balance - 10 WHERE id = $1 AND balance >= 10",
                    )
                    .await?;
                let insert = client
                    .prepare("INSERT INTO plain_events (account, credits, payload) VALUES ($1, 10, $2)")
                    .await?;
                let payload = tokio_postgres::types::Json(&payload);
                while let Some(account) = accounts.next(&picks, &mut rng, &stop) {
                    let id = account.to_owned();
                    let tx = client.transaction().await?;
                    if tx.execute(&update, &[&id]).await? == 1 {
                        tx.execute(&insert, &[&id, &payload]).await?;
                        tx.commit().await?;
                        run.ok += 1;
                    } else {
                        tx.rollback().await?;
                        run.failed += 1;
                    }
                }
                Ok(())
            }
            .await;
            if let Err(e) = result {
                run.failed += 1;
                run.first_error = Some(format!("{e:#}"));
            }
            run
        }
    })
    .await
}

/// Starts `workers` copies of `work`, stops them after `duration` (or lets them end by
/// themselves), sums their runs.
async fn timed<F, Fut>(workers: usize, duration: Option<Duration>, work: F) -> anyhow::Result<Run>
where
    F: Fn(usize, Arc<AtomicBool>) -> Fut,
    Fut: std::future::Future<Output = Run> + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let handles: Vec<_> = (0..workers)
        .map(|w| tokio::spawn(work(w, stop.clone())))
        .collect();
    if let Some(duration) = duration {
        tokio::time::sleep(duration).await;
        stop.store(true, Ordering::Relaxed);
    }
    let mut total = Run::default();
    for handle in handles {
        let run = handle.await?;
        total.ok += run.ok;
        total.failed += run.failed;
        total.latencies_us.extend(run.latencies_us);
        if total.first_error.is_none() {
            total.first_error = run.first_error;
        }
    }
    total.seconds = started.elapsed().as_secs_f64();
    Ok(total)
}

/// The worst projector lag seen since the last `take`.
#[derive(Debug, Default, Clone, Copy)]
pub struct LagPeak {
    pub seconds: f64,
    pub pending: i64,
    pub samples: u64,
}

/// Samples `projection_outbox` every 100 ms while the benchmark runs.
pub struct LagSampler {
    peak: Arc<Mutex<LagPeak>>,
    running: Arc<AtomicBool>,
    pub errors: Arc<AtomicU64>,
}

impl LagSampler {
    pub fn start(pool: Pool) -> Self {
        let peak = Arc::new(Mutex::new(LagPeak::default()));
        let running = Arc::new(AtomicBool::new(true));
        let errors = Arc::new(AtomicU64::new(0));
        let (p, r, e) = (peak.clone(), running.clone(), errors.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while r.load(Ordering::Relaxed) {
                tick.tick().await;
                let sample = match pool.get().await {
                    Ok(client) => projector::lag(&client).await,
                    Err(err) => Err(err.into()),
                };
                match sample {
                    Ok(lag) => {
                        let mut peak = p.lock().unwrap_or_else(|e| e.into_inner());
                        peak.seconds = peak.seconds.max(lag.seconds);
                        peak.pending = peak.pending.max(lag.pending_events);
                        peak.samples += 1;
                    }
                    Err(_) => {
                        e.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Self {
            peak,
            running,
            errors,
        }
    }

    /// The peak since the previous call, and a fresh start.
    pub fn take(&self) -> LagPeak {
        std::mem::take(&mut *self.peak.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn stop(&self) {
        self.running.store(false, Ordering::Relaxed);
    }
}

/// Waits until the projector has applied everything; returns how long that took.
pub async fn wait_for_projection(pool: &Pool) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let client = pool.get().await?;
    loop {
        let lag = projector::lag(&client).await?;
        if lag.pending_events == 0 {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "the projector did not catch up in 5 minutes ({} pending)",
            lag.pending_events
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
