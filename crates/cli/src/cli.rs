//! The command line, as clap sees it.

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use credit_domain::UserId;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/credit_ledger";

/// Event-sourced credit ledger: the service, its migrations and the auditors' tools.
///
/// Exit codes: 0 success; 1 the audit found discrepancies; 2 the command could not run.
#[derive(Debug, Parser)]
#[command(name = "credit-ledger", version)]
pub struct Cli {
    /// PostgreSQL URL (also read from `.env`).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = DEFAULT_DATABASE_URL,
        hide_env_values = true,
        global = true
    )]
    pub database_url: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the database if missing and apply pending migrations.
    Migrate,
    /// Replay the whole journal and verify balances, projections and totals.
    Audit(AuditArgs),
    /// Write the journal (or one account, or a position range) as JSON Lines with hashes,
    /// for independent verification (docs/AUDITING.md, tools/verify_export.py).
    Export(ExportArgs),
    /// Maintain the read tables.
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// Run the HTTP service.
    Serve,
    /// List every difference between our recharges and Stripe's sessions and charges;
    /// exit 1 when there is any. Needs STRIPE_SECRET_KEY (and STRIPE_API_BASE for a fake).
    Reconcile {
        /// Only recharges created at or after this instant (RFC 3339 or YYYY-MM-DD).
        #[arg(long, value_parser = parse_since)]
        since: Option<DateTime<Utc>>,
        /// Print the differences as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Print the report as JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// Checkpoint file. Missing: a clean audit writes one there (signed with Ed25519 when
    /// AUDIT_SIGNING_KEY holds a 32-byte seed as 64 hex digits). Present: the audit also
    /// proves the journal still holds and extends every head it recorded (exit 1 if not).
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Option<std::path::PathBuf>,

    /// Ed25519 public key (64 hex digits) that must have signed the checkpoint. Implied by
    /// AUDIT_SIGNING_KEY.
    #[arg(long, value_name = "HEX", env = "AUDIT_PUBLIC_KEY")]
    pub public_key: Option<String>,

    #[command(subcommand)]
    pub command: Option<AuditCommand>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Only this account's events.
    #[arg(long, value_parser = parse_user)]
    pub account: Option<UserId>,
    /// First global position included.
    #[arg(long, value_name = "POS")]
    pub from: Option<i64>,
    /// Last global position included.
    #[arg(long, value_name = "POS")]
    pub to: Option<i64>,
    /// Write here instead of to standard output (the file must not exist).
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// An account's balance at a past instant, with the events that made it.
    Balance {
        /// The user (account) id.
        #[arg(long, value_parser = parse_user)]
        user: UserId,
        /// The instant, RFC 3339 (e.g. 2025-01-31T23:59:59Z).
        #[arg(long, value_parser = parse_instant)]
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Empty the read tables and rebuild them from the journal.
    Rebuild,
}

fn parse_user(raw: &str) -> Result<UserId, String> {
    UserId::parse(raw).map_err(|e| e.to_string())
}

fn parse_since(raw: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(day) = chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d") {
        return day
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc())
            .ok_or_else(|| "not a date".to_owned());
    }
    parse_instant(raw)
}

fn parse_instant(raw: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 instant: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn audit_balance_takes_json_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "credit-ledger",
            "audit",
            "balance",
            "--user",
            "alice",
            "--at",
            "2025-01-31T23:59:59+08:00",
            "--json",
        ])
        .map_err(|e| e.to_string());
        let Ok(Cli {
            command: Command::Audit(args),
            ..
        }) = cli
        else {
            panic!("unexpected parse: {cli:?}");
        };
        assert!(args.json);
        let Some(AuditCommand::Balance { user, at }) = args.command else {
            panic!("no balance command");
        };
        assert_eq!(user.as_str(), "alice");
        assert_eq!(at.to_rfc3339(), "2025-01-31T15:59:59+00:00");
    }

    #[test]
    fn a_bad_instant_is_refused() {
        assert!(Cli::try_parse_from([
            "credit-ledger",
            "audit",
            "balance",
            "--user",
            "alice",
            "--at",
            "yesterday"
        ])
        .is_err());
    }
}
