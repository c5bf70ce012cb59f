//! A fresh, migrated PostgreSQL database per test, dropped when the test ends.

use credit_store::{Database, DbConfig};

/// The server tests run against; `TEST_DATABASE_URL` overrides it (any database name: a
/// fresh one is created beside it).
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database that exists for one test.
pub struct TestDb {
    pub url: String,
    pub db: Database,
    /// Whether dropping this handle drops the database (false for [`TestDb::shared`]).
    owner: bool,
}

impl TestDb {
    /// Creates `credit_ledger_test_<random>` and applies the migrations, exactly as the
    /// service does at start-up.
    pub async fn new() -> Self {
        Self::with_pools(20, 20).await
    }

    pub async fn with_pools(write: u32, read: usize) -> Self {
        Self::on_server(&server_url(), write, read).await
    }

    /// A fresh database on another server (`base` is any database URL of it), e.g. a
    /// [`crate::postgres::PrivatePostgres`].
    pub async fn on_server(base: &str, write: u32, read: usize) -> Self {
        let name = format!("credit_ledger_test_{}", uuid::Uuid::new_v4().simple());
        let (base, query) = match base.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (base, String::new()),
        };
        let url = match base.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}{query}"),
            None => panic!("the server URL has no database part: {base}"),
        };
        let mut config = DbConfig::new(url.clone());
        config.write_connections = write;
        config.read_connections = read;
        let db = match Database::connect_and_migrate(&config).await {
            Ok(db) => db,
            Err(e) => panic!("cannot create test database (is PostgreSQL running?): {e:#}"),
        };
        Self {
            url,
            db,
            owner: true,
        }
    }

    /// Another handle on the same database, with pools of its own (what a second process of
    /// the service would have); dropping it leaves the database to its owner.
    pub async fn shared(&self) -> Self {
        let mut config = DbConfig::new(self.url.clone());
        config.write_connections = 2;
        config.read_connections = 4;
        let db = match Database::connect_and_migrate(&config).await {
            Ok(db) => db,
            Err(e) => panic!("cannot connect to the test database again: {e:#}"),
        };
        Self {
            url: self.url.clone(),
            db,
            owner: false,
        }
    }

    /// Runs `sql` as the superuser test role with the append-only triggers switched off for
    /// this one transaction (`session_replication_role = replica`): how a saboteur with
    /// superuser rights rewrites history. The service's own role cannot do this
    /// (crates/store/tests/append_only.rs); the audit and checkpoints must catch it.
    pub async fn tamper(&self, sql: &str) -> Vec<deadpool_postgres::tokio_postgres::Row> {
        let mut client = self.client().await;
        let rows = async {
            let tx = client.transaction().await?;
            tx.batch_execute("SET LOCAL session_replication_role = replica")
                .await?;
            let rows = tx.query(sql, &[]).await?;
            tx.commit().await?;
            Ok::<_, deadpool_postgres::tokio_postgres::Error>(rows)
        }
        .await;
        match rows {
            Ok(rows) => rows,
            Err(e) => panic!("tampering failed: {e}"),
        }
    }

    pub async fn client(&self) -> deadpool_postgres::Object {
        match self.db.read.get().await {
            Ok(c) => c,
            Err(e) => panic!("test database connection: {e}"),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        self.db.read.close();
        if !self.owner {
            return;
        }
        let url = self.url.clone();
        // Drop the database from a separate thread: we may be inside a runtime.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = rt.block_on(credit_store::db::drop_database(&url));
            }
        })
        .join();
    }
}
