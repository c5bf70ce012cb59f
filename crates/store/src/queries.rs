//! Read queries on the read side (deadpool): what the HTTP layer and tools show.

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use credit_domain::{CreditAccount, CreditEvent};
use serde::Serialize;
use tokio_postgres::types::Json;
use tokio_postgres::Client;

/// One journal event, as auditors and the balance chart see it.
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    pub position: i64,
    pub sequence: i64,
    pub recorded_at: DateTime<Utc>,
    pub event_type: String,
    pub payload: serde_json::Value,
    pub balance_after: Option<i64>,
}

/// An account's events in order, up to `until` (inclusive) when given, starting after
/// sequence `after` when given, at most `limit`.
pub async fn account_events(
    client: &Client,
    account: &str,
    until: Option<DateTime<Utc>>,
    after: Option<i64>,
    limit: i64,
) -> anyhow::Result<Vec<EventRecord>> {
    let rows = client
        .query(
            "SELECT position, sequence, recorded_at, event_type, payload
               FROM events
              WHERE aggregate_type = $1 AND aggregate_id = $2
                AND ($3::timestamptz IS NULL OR recorded_at <= $3)
                AND sequence > coalesce($4::bigint, 0)
              ORDER BY sequence
              LIMIT $5",
            &[&CreditAccount::TYPE, &account, &until, &after, &limit],
        )
        .await?;
    rows.into_iter()
        .map(|r| {
            let Json(payload): Json<serde_json::Value> = r.try_get(4)?;
            let balance_after = serde_json::from_value::<CreditEvent>(payload.clone())
                .ok()
                .and_then(|e| e.balance_after());
            Ok(EventRecord {
                position: r.get(0),
                sequence: r.get(1),
                recorded_at: r.get(2),
                event_type: r.get(3),
                payload,
                balance_after,
            })
        })
        .collect()
}

/// The projected balance of an account (0 when it has none yet).
pub async fn projected_credits(client: &Client, account: &str) -> anyhow::Result<i64> {
    Ok(client
        .query_opt("SELECT credits FROM users WHERE id = $1", &[&account])
        .await?
        .map_or(0, |r| r.get(0)))
}
