//! What the ledger reports to Prometheus (through the `metrics` facade; the HTTP crate
//! installs the exporter): commands by kind and outcome, batch sizes, optimistic-lock
//! conflicts, and the credits that moved. Kept apart from the executor so that it stays a
//! few one-line calls there.
//!
//! Names (all counters end in `_total`): `ledger_commands_total{kind, outcome}`,
//! `ledger_batch_size` (histogram), `ledger_conflicts_total`, `credits_recharged_total`,
//! `credits_spent_total`, `credits_refunded_total`, `credits_reversed_total`,
//! `credits_granted_total`, `credits_deducted_by_adjustment_total`.

use credit_domain::CreditEvent;

/// How a command ended.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Committed,
    Rejected,
    Contended,
    Unavailable,
    Unknown,
    StoreError,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Committed => "committed",
            Outcome::Rejected => "rejected",
            Outcome::Contended => "contended",
            Outcome::Unavailable => "unavailable",
            Outcome::Unknown => "unknown",
            Outcome::StoreError => "store_error",
        }
    }
}

/// A command of `kind` (`CreditCommand::kind`) answered with `outcome`.
pub fn command(kind: &'static str, outcome: Outcome) {
    metrics::counter!("ledger_commands_total", "kind" => kind, "outcome" => outcome.as_str())
        .increment(1);
}

pub fn batch(size: usize) {
    metrics::histogram!("ledger_batch_size").record(size as f64);
}

pub fn conflict() {
    metrics::counter!("ledger_conflicts_total").increment(1);
}

/// Credits moved by committed events.
pub fn appended<'a>(events: impl IntoIterator<Item = &'a CreditEvent>) {
    for event in events {
        let Some(delta) = event.credit_delta() else {
            continue;
        };
        let name = match (event.name(), delta >= 0) {
            ("RechargeCompleted", _) => "credits_recharged_total",
            ("CreditsDeducted", _) => "credits_spent_total",
            ("CreditsRefunded", _) => "credits_refunded_total",
            ("RechargeReversed", _) => "credits_reversed_total",
            ("CreditsAdjusted", true) => "credits_granted_total",
            ("CreditsAdjusted", false) => "credits_deducted_by_adjustment_total",
            _ => continue,
        };
        metrics::counter!(name).increment(delta.unsigned_abs());
    }
}

/// A user's own read checked its account's projection: `caught_up` when it was behind the
/// journal and the read projected it first (read-your-writes), `current` when it was not.
pub fn own_read(behind: bool) {
    let projection = if behind { "caught_up" } else { "current" };
    metrics::counter!("own_reads_total", "projection" => projection).increment(1);
}
