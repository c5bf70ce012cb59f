//! What each subcommand does. Output for people goes to stdout; logs go to stderr.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use credit_store::{db, projector, Projector};
use deadpool_postgres::Pool;

use crate::cli::{AuditCommand, Cli, Command, ExportArgs, ProjectionsCommand};
use crate::{audit, progress, reconcile, serve};

/// The audit found discrepancies.
pub const EXIT_DISCREPANCIES: u8 = 1;
/// The command could not run (bad configuration, database unreachable, ...).
pub const EXIT_ERROR: u8 = 2;

/// Connections the command-line tools use (the server sizes its own pools).
const TOOL_CONNECTIONS: usize = 4;

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let url = cli.database_url;
    match cli.command {
        Command::Migrate => migrate(&url).await,
        Command::Audit(args) => {
            let pool = connect(&url).await?;
            match args.command {
                None => {
                    let checkpoint = audit::CheckpointArgs::from_env(
                        args.checkpoint,
                        args.public_key.as_deref(),
                    )?;
                    audit::full(&url, args.json, checkpoint).await
                }
                Some(AuditCommand::Balance { user, at }) => {
                    anyhow::ensure!(
                        args.checkpoint.is_none(),
                        "--checkpoint belongs to the full audit, not to `audit balance`"
                    );
                    audit::balance(&pool, &user, at, args.json).await
                }
            }
        }
        Command::Export(args) => export(&url, args).await,
        Command::Projections(ProjectionsCommand::Rebuild) => rebuild(&url).await,
        Command::Reconcile { since, json } => {
            let pool = connect(&url).await?;
            reconcile::run(&url, &pool, since, json).await
        }
        Command::Serve => {
            serve::serve(url).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The read-side pool, after checking the schema is there (tools never migrate silently).
async fn connect(url: &str) -> anyhow::Result<Pool> {
    let pool = db::read_pool(url, TOOL_CONNECTIONS)?;
    let client = pool.get().await.context("connecting to the database")?;
    let migrated = db::migrations_applied(&client).await.unwrap_or(false);
    anyhow::ensure!(
        migrated,
        "the database is not migrated: run `credit-ledger migrate` first"
    );
    Ok(pool)
}

async fn migrate(url: &str) -> anyhow::Result<ExitCode> {
    db::ensure_database(url).await?;
    let pool = db::read_pool(url, 1)?;
    let mut client = pool.get().await.context("connecting to the database")?;
    let applied = db::migrate(&mut client).await?;
    if applied.is_empty() {
        println!(
            "migrations: up to date ({} applied before)",
            db::MIGRATIONS.len()
        );
    } else {
        for name in &applied {
            println!("applied {name}");
        }
        println!("migrations: {} applied now", applied.len());
    }
    Ok(ExitCode::SUCCESS)
}

async fn export(url: &str, args: ExportArgs) -> anyhow::Result<ExitCode> {
    let pool = connect(url).await?;
    let mut client = pool.get().await?;
    let filter = credit_store::export::Filter {
        account: args.account.map(|a| a.as_str().to_owned()),
        from: args.from,
        to: args.to,
    };
    let mut out: Box<dyn std::io::Write> = match &args.output {
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?,
        )),
    };
    let events = credit_store::export::write(&mut client, &filter, &mut out).await?;
    drop(out);
    tracing::info!(events, "journal exported");
    Ok(ExitCode::SUCCESS)
}

async fn rebuild(url: &str) -> anyhow::Result<ExitCode> {
    let pool = connect(url).await?;
    let client = pool.get().await?;
    let total: i64 = client
        .query_one("SELECT count(*) FROM events", &[])
        .await?
        .get(0);
    let started = Instant::now();
    let projector = Projector::new(pool.clone(), Arc::new(tokio::sync::Notify::new()));
    let rebuilding = projector::rebuild(&projector);
    let applied = match progress::bar(total as u64, "rebuilding") {
        None => rebuilding.await?,
        Some(bar) => {
            // The projector advances each account's checkpoint as it goes, so the sum of
            // checkpoints is the number of events applied so far.
            tokio::pin!(rebuilding);
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let applied = loop {
                tokio::select! {
                    done = &mut rebuilding => break done?,
                    _ = tick.tick() => {
                        if let Ok(row) = client
                            .query_one("SELECT coalesce(sum(last_sequence), 0)::bigint FROM users", &[])
                            .await
                        {
                            bar.set_position(row.get::<_, i64>(0) as u64);
                        }
                    }
                }
            };
            bar.finish_and_clear();
            applied
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "projections rebuilt: {applied} events applied in {elapsed:.2} s ({:.0} events/s)",
        applied as f64 / elapsed.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}
