//! History is append-only (migrations/0006_append_only.sql): the service, running as a member
//! of `credit_ledger_app`, works normally but can neither rewrite the journal nor switch the
//! guard off; and even a superuser session is refused unless it bypasses the triggers on
//! purpose.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use credit_store::{Database, DbConfig, Ledger, Projector};
use tokio_postgres::error::SqlState;

/// A login role that is a member of `credit_ledger_app`, as docs/OPERATIONS.md sets one up,
/// dropped when the test ends. (Roles belong to the cluster: the name is unique per test.)
struct ServiceRole {
    name: String,
    server: deadpool_postgres::Object,
}

impl ServiceRole {
    async fn create(env: &Env) -> Self {
        let name = format!("credit_ledger_t_{}", uuid_suffix());
        let server = env.test.client().await;
        server
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN IN ROLE credit_ledger_app"
            ))
            .await
            .unwrap();
        Self { name, server }
    }

    /// The test database's URL with this role as the user (trust authentication, as in CI).
    fn url(&self, env: &Env) -> String {
        let (_, rest) = env.test.url.split_once('@').unwrap();
        format!("postgres://{}@{rest}", self.name)
    }

    async fn drop(self) {
        self.server
            .batch_execute(&format!("DROP ROLE {}", self.name))
            .await
            .unwrap();
    }
}

fn uuid_suffix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn refused(result: Result<u64, tokio_postgres::Error>) -> String {
    let err = result.expect_err("the statement should have been refused");
    assert_eq!(
        err.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{err:?}"
    );
    err.as_db_error().unwrap().message().to_owned()
}

#[tokio::test]
async fn the_service_role_runs_the_ledger_but_cannot_rewrite_history() {
    let env = env().await;
    populate(&env, 2, 3).await;
    let role = ServiceRole::create(&env).await;
    let url = role.url(&env);

    {
        // The service starts as this role exactly as it does in production: the schema is
        // already migrated by the owner, so start-up applies nothing and writes nothing.
        let mut config = DbConfig::new(url.clone());
        config.write_connections = 2;
        config.read_connections = 2;
        let db = Database::connect_and_migrate(&config).await.unwrap();
        let ledger = std::sync::Arc::new(Ledger::new(db.write.clone()));
        let account = user("user-000");
        ledger
            .execute(&account, deduct("as-service"), Default::default())
            .await
            .unwrap();
        Projector::new(db.read.clone(), ledger.appended())
            .drain()
            .await
            .unwrap();
        let mut client = db.read.get().await.unwrap();
        let report = credit_store::audit::run(&mut client, None).await.unwrap();
        assert!(report.ok, "{:#?}", report.discrepancies);

        for sql in [
            "UPDATE events SET payload = payload WHERE aggregate_id = 'user-000'",
            "DELETE FROM events WHERE aggregate_id = 'user-000'",
            "TRUNCATE events",
            "UPDATE stripe_events SET outcome = 'x'",
            "DELETE FROM stripe_events",
            "INSERT INTO schema_migrations (version, checksum) VALUES ('9999_x', 'x')",
        ] {
            let message = refused(client.execute(sql, &[]).await);
            assert!(message.starts_with("permission denied"), "{sql}: {message}");
        }
        // Nor can it switch the guard off.
        let err = client
            .batch_execute("SET session_replication_role = replica")
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{err:?}"
        );
        let err = client
            .batch_execute("ALTER TABLE events DISABLE TRIGGER events_append_only")
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{err:?}"
        );
        // The cache stays the service's to manage.
        client
            .batch_execute("DELETE FROM projection_outbox WHERE false; TRUNCATE snapshots")
            .await
            .unwrap();
        db.read.close();
        db.write.close().await;
    }
    role.drop().await;
}

#[tokio::test]
async fn even_a_superuser_session_is_refused_unless_it_bypasses_the_trigger() {
    let env = env().await;
    populate(&env, 1, 2).await;
    let client = env.test.client().await;
    for sql in [
        "UPDATE events SET payload = payload",
        "DELETE FROM events WHERE sequence = (SELECT max(sequence) FROM events)",
        "TRUNCATE events",
    ] {
        let message = refused(client.execute(sql, &[]).await);
        assert!(message.starts_with("events is append-only"), "{message}");
    }
    let events = count(&client, "SELECT count(*) FROM events").await;
    // The deliberate bypass (as the audit tests use it) works, and only for its transaction.
    env.test
        .tamper("DELETE FROM events WHERE sequence = (SELECT max(sequence) FROM events)")
        .await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM events").await,
        events - 1
    );
    let message = refused(client.execute("DELETE FROM events", &[]).await);
    assert!(message.starts_with("events is append-only"), "{message}");
}
