//! The `credit-ledger` binary: configuration, telemetry and the command line (migrations,
//! the audit, projection rebuilds and the HTTP server). It holds no business logic: every
//! command is a thin call into `credit-store` (or `credit-http` for `serve`).
#![forbid(unsafe_code)]

mod audit;
mod cli;
mod commands;
mod progress;
mod reconcile;
mod serve;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    // `.env` first, so that clap's `env = ...` arguments see its values.
    let _ = dotenvy::dotenv();
    let cli = cli::Cli::parse();
    if let Err(e) = init_tracing() {
        eprintln!("error: {e}");
        return ExitCode::from(commands::EXIT_ERROR);
    }
    match commands::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            // The cause chain, once, on one line (`{:#}`); no backtrace for an operator.
            eprintln!("error: {e:#}");
            ExitCode::from(commands::EXIT_ERROR)
        }
    }
}

/// Logs go to stderr (stdout is for command output), filtered by `RUST_LOG`; as text, or
/// with `LOG_FORMAT=json` as one JSON object a line (with the fields of the current span,
/// so a request's lines carry its `request_id`).
fn init_tracing() -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tokio_postgres=warn"));
    let format = std::env::var("LOG_FORMAT").unwrap_or_default();
    match format.trim() {
        "" | "text" => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
        "json" => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
        other => return Err(format!("LOG_FORMAT: must be text or json, got {other:?}")),
    }
    Ok(())
}
