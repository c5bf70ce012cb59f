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
    init_tracing();
    match commands::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            // The cause chain, once, on one line (`{:#}`); no backtrace for an operator.
            eprintln!("error: {e:#}");
            ExitCode::from(commands::EXIT_ERROR)
        }
    }
}

/// Logs go to stderr (stdout is for command output), filtered by `RUST_LOG`.
fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tokio_postgres=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
