//! Connections and migrations.

use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// Plain-SQL migrations, forward-only, applied in order. An applied migration is never
/// edited: its checksum is recorded and checked at every start.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_journal",
        include_str!("../../../migrations/0001_journal.sql"),
    ),
    (
        "0002_projections",
        include_str!("../../../migrations/0002_projections.sql"),
    ),
    (
        "0003_outbox_account_index",
        include_str!("../../../migrations/0003_outbox_account_index.sql"),
    ),
    (
        "0004_payment_id_index",
        include_str!("../../../migrations/0004_payment_id_index.sql"),
    ),
    (
        "0005_reversals_and_uncertain_tasks",
        include_str!("../../../migrations/0005_reversals_and_uncertain_tasks.sql"),
    ),
    (
        "0006_append_only",
        include_str!("../../../migrations/0006_append_only.sql"),
    ),
    (
        "0007_append_fences",
        include_str!("../../../migrations/0007_append_fences.sql"),
    ),
    (
        "0008_idempotency_indexes",
        include_str!("../../../migrations/0008_idempotency_indexes.sql"),
    ),
    (
        "0009_journal_text",
        include_str!("../../../migrations/0009_journal_text.sql"),
    ),
    (
        "0010_lighter_projection_writes",
        include_str!("../../../migrations/0010_lighter_projection_writes.sql"),
    ),
    (
        "0011_outbox_per_statement",
        include_str!("../../../migrations/0011_outbox_per_statement.sql"),
    ),
    (
        "0012_chain_linked_by_the_appender",
        include_str!("../../../migrations/0012_chain_linked_by_the_appender.sql"),
    ),
    (
        "0013_no_recorded_at_index",
        include_str!("../../../migrations/0013_no_recorded_at_index.sql"),
    ),
];

/// Where the database is and how many connections each side may use.
#[derive(Debug, Clone)]
pub struct DbConfig {
    pub url: String,
    /// Connections for the journal (postgres-es, through sqlx).
    pub write_connections: u32,
    /// Connections for projections, queries and audit (deadpool).
    pub read_connections: usize,
}

impl DbConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            write_connections: 20,
            read_connections: 20,
        }
    }
}

/// Both connection pools of one database.
#[derive(Clone)]
pub struct Database {
    pub write: PgPool,
    pub read: Pool,
}

impl Database {
    /// Creates the database if missing, applies pending migrations and opens both pools.
    pub async fn connect_and_migrate(config: &DbConfig) -> anyhow::Result<Self> {
        ensure_database(&config.url).await?;
        let read = read_pool(&config.url, config.read_connections)?;
        {
            let mut client = read.get().await.context("connecting to the database")?;
            migrate(&mut client).await?;
        }
        let write = write_pool(&config.url, config.write_connections).await?;
        Ok(Self { write, read })
    }
}

/// A connection to the server's `postgres` database, and the name of the one in `url`.
async fn maintenance(
    url: &str,
) -> anyhow::Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>, String)> {
    let crate::tls::PgTarget { config, tls, .. } = crate::tls::pg_target(url)?;
    let name = config
        .get_dbname()
        .context("DATABASE_URL names no database")?
        .to_owned();
    let mut maintenance = config.clone();
    maintenance.dbname("postgres");
    let (client, connection) = maintenance
        .connect(tls)
        .await
        .context("connecting to PostgreSQL")?;
    let conn = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((client, conn, name))
}

/// Creates the target database when it does not exist (connecting to `postgres` to do so).
pub async fn ensure_database(url: &str) -> anyhow::Result<()> {
    let (client, conn, name) = maintenance(url).await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match client
            .batch_execute(&format!("CREATE DATABASE {quoted}"))
            .await
        {
            Ok(()) => tracing::info!(db.name = %name, "created database"),
            // Another process created it at the same moment.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {}
            Err(e) => return Err(e).context("creating the database"),
        }
    }
    drop(client);
    conn.abort();
    Ok(())
}

/// Drops a database (tests and tools only).
pub async fn drop_database(url: &str) -> anyhow::Result<()> {
    let (client, conn, name) = maintenance(url).await?;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
        .await?;
    conn.abort();
    Ok(())
}

/// The read-side pool: projections, queries, audit.
pub fn read_pool(url: &str, size: usize) -> anyhow::Result<Pool> {
    let target = crate::tls::pg_target(url)?;
    let manager = Manager::from_config(
        target.config,
        target.tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(10)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .context("building the read pool")
}

/// How long a write-side statement may run (appends take milliseconds).
pub const WRITE_STATEMENT_TIMEOUT: Duration = Duration::from_secs(4);
/// A write-side connection idle this long is pinged before use.
const PING_IDLE_AFTER: Duration = Duration::from_secs(1);
/// How long a write waits for a write-side connection.
pub const WRITE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(4);

/// The write-side pool for postgres-es, built with explicit options (postgres-es's own
/// `default_postgress_pool` panics on a connection error).
pub async fn write_pool(url: &str, size: u32) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url
        .parse()
        .context("DATABASE_URL is not a valid PostgreSQL URL")?;
    PgPoolOptions::new()
        .max_connections(size)
        .min_connections(1)
        .acquire_timeout(WRITE_ACQUIRE_TIMEOUT)
        // sqlx pings every connection it hands out by default: one more round trip per
        // append, for a connection that was in use a moment ago. Only a connection idle for
        // `PING_IDLE_AFTER` is pinged (a server restart is found there, before anything is
        // sent); one that breaks between two busy appends is handled like any broken append
        // (its fence tells whether it committed, executor.rs).
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IDLE_AFTER {
                    sqlx::Connection::ping(connection).await?;
                }
                Ok(true)
            })
        })
        // A statement held up (a lock taken by maintenance, a starved server) ends within
        // `WRITE_STATEMENT_TIMEOUT`, so a write is answered in time; its fence then tells
        // whether it committed (crates/store/src/executor.rs). Set per session, not as a
        // startup `options` parameter, which connection poolers may refuse.
        .after_connect(|connection, _| {
            Box::pin(async move {
                // Every statement of the write side reads by key (the executor's load, its
                // duplicate and conflict checks, the trigger's previous-hash lookup), so its
                // sessions run generic plans, made once per connection: PostgreSQL re-planned
                // the load of a cold account at every execution (0.2 ms, more than the load
                // itself; ledger-bench's spread x1). A generic plan is estimated from
                // statistics, not from the account asked for: where one account holds most
                // of the journal it chose to scan the journal (0.1 s a load). Scans of whole
                // tables and bitmaps are therefore ruled out for these sessions, and the
                // load is written per account (`LATERAL`), so that its one plan is a range
                // of the journal's primary key whatever the statistics say. JIT is off: a
                // generic plan's estimates (a third of the journal per account) made
                // PostgreSQL compile the load (15 ms) for a read of a few rows.
                let set = format!(
                    "SET statement_timeout = {}; SET plan_cache_mode = force_generic_plan; \
                     SET enable_seqscan = off; SET enable_bitmapscan = off; SET jit = off",
                    WRITE_STATEMENT_TIMEOUT.as_millis()
                );
                sqlx::Executor::execute(connection, set.as_str()).await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .context("connecting the journal pool")
}

/// Applies pending migrations under an advisory lock, so concurrent starts are safe.
/// Returns the names applied now.
pub async fn migrate(client: &mut tokio_postgres::Client) -> anyhow::Result<Vec<&'static str>> {
    const LOCK: i64 = 0x6372_6564_6974; // "credit"
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK])
        .await?;
    let result = apply_pending(client).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK])
        .await?;
    result
}

async fn apply_pending(client: &mut tokio_postgres::Client) -> anyhow::Result<Vec<&'static str>> {
    // Checked before creating: the service's least-privilege role may not create tables, and
    // finds the schema already migrated by the owner (docs/OPERATIONS.md).
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                    version    text PRIMARY KEY,
                    checksum   text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )",
            )
            .await?;
    }
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS {
        let checksum = checksum(sql);
        let row = client
            .query_opt(
                "SELECT checksum FROM schema_migrations WHERE version = $1",
                &[version],
            )
            .await?;
        match row {
            Some(row) => {
                let stored: String = row.get(0);
                anyhow::ensure!(
                    stored == checksum,
                    "migration {version} was edited after it was applied (forward-only: add a new migration instead)"
                );
            }
            None => {
                let tx = client.transaction().await?;
                tx.batch_execute(sql)
                    .await
                    .with_context(|| format!("applying migration {version}"))?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                    &[version, &checksum],
                )
                .await?;
                tx.commit().await?;
                tracing::info!(migration = version, "applied migration");
                applied.push(*version);
            }
        }
    }
    Ok(applied)
}

/// Whether every known migration is applied (for readiness).
pub async fn migrations_applied(client: &tokio_postgres::Client) -> anyhow::Result<bool> {
    let row = client
        .query_one(
            "SELECT count(*) FROM schema_migrations WHERE version = ANY($1)",
            &[&MIGRATIONS.iter().map(|(v, _)| *v).collect::<Vec<_>>()],
        )
        .await?;
    let n: i64 = row.get(0);
    Ok(n == MIGRATIONS.len() as i64)
}

fn checksum(sql: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(sql.as_bytes()))
}
