//! `credit-ledger audit` and `audit balance`: the report for auditors, as text or JSON.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use credit_domain::{CreditEvent, UserId};
use credit_store::audit::{self, AuditReport};
use credit_store::checkpoint::{self, Checkpoint, Parsed, SigningKey, VerifyingKey};
use deadpool_postgres::Pool;
use serde::Serialize;

use crate::commands::EXIT_DISCREPANCIES;
use crate::progress;

/// The report with its replay rate, as `--json` prints it.
#[derive(Serialize)]
struct JsonReport<'a> {
    #[serde(flatten)]
    report: &'a AuditReport,
    events_per_second: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint_file: Option<&'a CheckpointOutcome>,
}

/// `--checkpoint` and the keys, read and checked before the audit starts.
pub struct CheckpointArgs {
    path: PathBuf,
    /// The file as it was, when there was one.
    existing: Option<Parsed>,
    signing: Option<SigningKey>,
}

impl CheckpointArgs {
    /// `AUDIT_SIGNING_KEY` (secret seed, hex) signs a new checkpoint; it or `public_key`
    /// (hex) is the key an existing checkpoint must be signed with.
    pub fn from_env(
        path: Option<PathBuf>,
        public_key: Option<&str>,
    ) -> anyhow::Result<Option<Self>> {
        let Some(path) = path else {
            return Ok(None);
        };
        let signing = match std::env::var("AUDIT_SIGNING_KEY") {
            Ok(raw) if !raw.trim().is_empty() => Some(checkpoint::signing_key_from_hex(&raw)?),
            _ => None,
        };
        let trusted: Option<VerifyingKey> = match (&signing, public_key) {
            (Some(key), _) => Some(key.verifying_key()),
            (None, Some(raw)) if !raw.trim().is_empty() => {
                Some(checkpoint::verifying_key_from_hex(raw)?)
            }
            _ => None,
        };
        let existing = match std::fs::read_to_string(&path) {
            Ok(text) => Some(
                Checkpoint::parse(&text, trusted.as_ref())
                    .with_context(|| format!("checkpoint {}", path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Some(Self {
            path,
            existing,
            signing,
        }))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum CheckpointAction {
    /// The journal holds and extends every head of the existing file.
    Verified,
    /// It does not: see the `checkpoint_` discrepancies.
    Broken,
    /// There was no file; this clean audit wrote one.
    Written,
    /// There was no file, and the audit found discrepancies: none written.
    NotWritten,
}

/// What happened to the checkpoint file.
#[derive(Serialize)]
struct CheckpointOutcome {
    path: String,
    action: CheckpointAction,
    accounts: u64,
    position: i64,
    root: String,
    /// Hex public key, when signed.
    signed_by: Option<String>,
}

pub async fn full(
    url: &str,
    json: bool,
    checkpoint: Option<CheckpointArgs>,
) -> anyhow::Result<ExitCode> {
    let against = checkpoint
        .as_ref()
        .and_then(|c| c.existing.as_ref())
        .map(|p| p.checkpoint.clone());
    let bar = progress::bar(0, "auditing");
    let update = bar.clone().map(|bar| {
        Arc::new(move |done: u64, total: u64| {
            bar.set_length(total);
            bar.set_position(done);
        }) as audit::SharedProgress
    });
    let report = audit::run_apart(url, update, against).await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let outcome = match checkpoint {
        None => None,
        Some(args) => Some(settle_checkpoint(args, &report)?),
    };
    let rate = report.events_checked as f64 / report.elapsed_seconds.max(1e-9);
    if json {
        let out = JsonReport {
            report: &report,
            events_per_second: rate,
            checkpoint_file: outcome.as_ref(),
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", summary(&report, rate));
        if let Some(outcome) = &outcome {
            println!("{}", checkpoint_line(outcome));
        }
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DISCREPANCIES)
    })
}

/// Verified against the existing file, or writes a new one (only after a clean audit: a
/// checkpoint vouches for the journal it records).
fn settle_checkpoint(
    args: CheckpointArgs,
    report: &AuditReport,
) -> anyhow::Result<CheckpointOutcome> {
    let path = args.path.display().to_string();
    if let Some(existing) = args.existing {
        let held = !report
            .discrepancies
            .iter()
            .any(|d| d.kind.starts_with("checkpoint_"));
        return Ok(CheckpointOutcome {
            path,
            action: if held {
                CheckpointAction::Verified
            } else {
                CheckpointAction::Broken
            },
            accounts: existing.checkpoint.heads.len() as u64,
            position: existing.checkpoint.position,
            root: hex::encode(existing.root),
            signed_by: existing.signed_by.map(|k| hex::encode(k.as_bytes())),
        });
    }
    let heads = &report.heads;
    let mut outcome = CheckpointOutcome {
        path,
        action: CheckpointAction::NotWritten,
        accounts: heads.heads.len() as u64,
        position: heads.position,
        root: hex::encode(heads.root()),
        signed_by: args
            .signing
            .as_ref()
            .map(|k| hex::encode(k.verifying_key().as_bytes())),
    };
    if report.ok {
        let text = heads.to_text(args.signing.as_ref());
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&args.path)
            .with_context(|| format!("creating {}", args.path.display()))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", args.path.display()))?;
        outcome.action = CheckpointAction::Written;
    }
    Ok(outcome)
}

fn checkpoint_line(o: &CheckpointOutcome) -> String {
    let signed = match &o.signed_by {
        Some(key) => format!("signed by {key}"),
        None => "unsigned".to_owned(),
    };
    let what = format!(
        "{} accounts at position {}, root {}, {signed}",
        o.accounts, o.position, o.root
    );
    match o.action {
        CheckpointAction::Verified => format!(
            "checkpoint         {}: every head held and extended ({what})",
            o.path
        ),
        CheckpointAction::Broken => format!(
            "checkpoint         {}: NOT held, see the checkpoint_ discrepancies ({what})",
            o.path
        ),
        CheckpointAction::Written => format!("checkpoint         written to {} ({what})", o.path),
        CheckpointAction::NotWritten => format!(
            "checkpoint         not written to {}: the audit found discrepancies",
            o.path
        ),
    }
}

fn summary(report: &AuditReport, rate: f64) -> String {
    let t = &report.totals;
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!("events checked     {}", report.events_checked));
    line(format!(
        "accounts checked   {} ({} still being projected, read tables not compared)",
        report.accounts_checked, report.accounts_pending_projection
    ));
    line(format!(
        "credits            recharged {} - spent {} + refunded {} + granted {} - reversed {} = {}",
        t.recharged,
        t.spent,
        t.refunded,
        t.granted,
        t.reversed,
        t.recharged - t.spent + t.refunded + t.granted - t.reversed
    ));
    line(format!(
        "balances           journal {}, projected {}",
        t.balances, t.projected_balances
    ));
    line(format!(
        "elapsed            {:.3} s ({rate:.0} events/s)",
        report.elapsed_seconds
    ));
    if report.ok {
        line("result             OK: no discrepancies".to_owned());
    } else {
        line(format!(
            "result             FAILED: {} discrepancies",
            report.discrepancies.len()
        ));
        for d in &report.discrepancies {
            line(d.to_string());
        }
    }
    out
}

pub async fn balance(
    pool: &Pool,
    user: &UserId,
    at: DateTime<Utc>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let client = pool.get().await?;
    let balance = audit::balance_at(&client, user.as_str(), at).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&balance)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "balance of {} at {}: {} credits ({} events)",
        balance.user_id,
        balance.at.to_rfc3339_opts(SecondsFormat::Micros, true),
        balance.credits,
        balance.events.len()
    );
    if balance.events.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>10}  {:>8}  {:<27}  {:<23}  {:>8}  {:>13}  subject",
        "position", "sequence", "recorded_at", "event", "delta", "balance_after"
    );
    for e in &balance.events {
        let event = serde_json::from_value::<CreditEvent>(e.payload.clone()).ok();
        let delta = event
            .as_ref()
            .and_then(CreditEvent::credit_delta)
            .map_or(String::new(), |d| format!("{d:+}"));
        let after = e.balance_after.map_or(String::new(), |b| b.to_string());
        println!(
            "{:>10}  {:>8}  {:<27}  {:<23}  {:>8}  {:>13}  {}",
            e.position,
            e.sequence,
            e.recorded_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            e.event_type,
            delta,
            after,
            event.as_ref().map_or("", subject)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What an event is about: its recharge, task or adjustment.
fn subject(event: &CreditEvent) -> &str {
    match event {
        CreditEvent::RechargeRequested { recharge_id, .. }
        | CreditEvent::RechargeCheckoutCreated { recharge_id, .. }
        | CreditEvent::RechargeCompleted { recharge_id, .. }
        | CreditEvent::RechargeFailed { recharge_id, .. }
        | CreditEvent::RechargeCancelled { recharge_id }
        | CreditEvent::RechargeReversed { recharge_id, .. }
        | CreditEvent::RechargeReinstated { recharge_id, .. }
        | CreditEvent::PaymentRefunded { recharge_id, .. }
        | CreditEvent::PaymentDisputed { recharge_id, .. } => recharge_id,
        CreditEvent::CreditsDeducted { task_id, .. }
        | CreditEvent::VideoSubmissionUncertain { task_id, .. }
        | CreditEvent::VideoProgressed { task_id, .. }
        | CreditEvent::VideoDeliveredAfterRefund { task_id, .. }
        | CreditEvent::VideoTaskSubmitted { task_id, .. }
        | CreditEvent::VideoSucceeded { task_id, .. }
        | CreditEvent::VideoFailed { task_id, .. }
        | CreditEvent::CreditsRefunded { task_id, .. } => task_id,
        CreditEvent::CreditsAdjusted { adjustment_id, .. } => adjustment_id,
    }
}
