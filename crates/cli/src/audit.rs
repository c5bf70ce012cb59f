//! `credit-ledger audit` and `audit balance`: the report for auditors, as text or JSON.

use std::process::ExitCode;

use chrono::{DateTime, SecondsFormat, Utc};
use credit_domain::{CreditEvent, UserId};
use credit_store::audit::{self, AuditReport};
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
}

pub async fn full(pool: &Pool, json: bool) -> anyhow::Result<ExitCode> {
    let client = pool.get().await?;
    let bar = progress::bar(0, "auditing");
    let report = match &bar {
        None => audit::run(&client, None).await?,
        Some(bar) => {
            let update = |done: u64, total: u64| {
                bar.set_length(total);
                bar.set_position(done);
            };
            audit::run(&client, Some(&update)).await?
        }
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let rate = report.events_checked as f64 / report.elapsed_seconds.max(1e-9);
    if json {
        let out = JsonReport {
            report: &report,
            events_per_second: rate,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", summary(&report, rate));
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DISCREPANCIES)
    })
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
