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

/// An account's projected balance, and whether its projection is behind its journal: one
/// round trip for the hottest read (`GET /api/stats`), which catches up only when behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnBalance {
    pub credits: i64,
    pub behind: bool,
}

pub async fn own_balance(
    client: &deadpool_postgres::ClientWrapper,
    account: &str,
) -> anyhow::Result<OwnBalance> {
    // Through the connection's statement cache: one round trip, parsed once per connection.
    let statement = client
        .prepare_cached(
            "SELECT coalesce(u.credits, 0) AS credits,
                    coalesce((SELECT max(e.sequence) FROM events e
                               WHERE e.aggregate_type = $1 AND e.aggregate_id = $2), 0)
                      > coalesce(u.last_sequence, 0) AS behind
               FROM (SELECT 1) AS one LEFT JOIN users u ON u.id = $2",
        )
        .await?;
    let row = client
        .query_one(&statement, &[&CreditAccount::TYPE, &account])
        .await?;
    Ok(OwnBalance {
        credits: row.try_get("credits")?,
        behind: row.try_get("behind")?,
    })
}

/// The outcome recorded for a Stripe event already handled, if it was.
pub async fn stripe_event_outcome(
    client: &Client,
    event_id: &str,
) -> anyhow::Result<Option<String>> {
    Ok(client
        .query_opt(
            "SELECT outcome FROM stripe_events WHERE id = $1",
            &[&event_id],
        )
        .await?
        .map(|r| r.get("outcome")))
}

/// Records that a Stripe event was handled (the first record of an id stands).
pub async fn record_stripe_event(
    client: &Client,
    event_id: &str,
    event_type: &str,
    outcome: &str,
) -> anyhow::Result<()> {
    client
        .execute(
            "INSERT INTO stripe_events (id, event_type, outcome) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO NOTHING",
            &[&event_id, &event_type, &outcome],
        )
        .await?;
    Ok(())
}

/// The account a recharge belongs to, from the read table.
pub async fn recharge_owner(client: &Client, recharge_id: &str) -> anyhow::Result<Option<String>> {
    Ok(client
        .query_opt(
            "SELECT user_id FROM recharge_records WHERE id = $1",
            &[&recharge_id],
        )
        .await?
        .map(|r| r.get("user_id")))
}

/// A recharge found by the payment that completed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RechargeRef {
    pub user_id: String,
    pub recharge_id: String,
}

/// The recharge a provider payment (Stripe payment intent) paid for: from the read table,
/// or, when the projection has not caught up, from the journal itself (indexed).
pub async fn recharge_by_payment(
    client: &Client,
    payment_id: &str,
) -> anyhow::Result<Option<RechargeRef>> {
    let mut row = client
        .query_opt(
            "SELECT user_id, id AS recharge_id FROM recharge_records WHERE payment_id = $1 LIMIT 1",
            &[&payment_id],
        )
        .await?;
    if row.is_none() {
        row = client
            .query_opt(
                "SELECT aggregate_id AS user_id,
                        payload -> 'RechargeCompleted' ->> 'recharge_id' AS recharge_id
                   FROM events
                  WHERE event_type = 'RechargeCompleted'
                    AND payload -> 'RechargeCompleted' ->> 'payment_id' = $1
                  LIMIT 1",
                &[&payment_id],
            )
            .await?;
    }
    Ok(row.map(|r| RechargeRef {
        user_id: r.get("user_id"),
        recharge_id: r.get("recharge_id"),
    }))
}

/// A recharge the read table shows pending, for reconciliation. Candidates only: what to do
/// is decided on the account's events.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingRecharge {
    pub user_id: String,
    pub recharge_id: String,
    pub created_at: DateTime<Utc>,
}

impl PendingRecharge {
    fn read(r: &tokio_postgres::Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            user_id: r.try_get("user_id")?,
            recharge_id: r.try_get("id")?,
            created_at: r.try_get("created_at")?,
        })
    }
}

/// Recharges pending for more than `older_than_secs`, oldest first.
pub async fn pending_recharges(
    client: &Client,
    older_than_secs: f64,
    limit: i64,
) -> anyhow::Result<Vec<PendingRecharge>> {
    let rows = client
        .query(
            "SELECT user_id, id, created_at FROM recharge_records
              WHERE status = 'pending' AND created_at < now() - make_interval(secs => $1)
              ORDER BY created_at LIMIT $2",
            &[&older_than_secs, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(PendingRecharge::read)
        .collect::<Result<_, _>>()?)
}

/// Every recharge created since `since` that went to `provider`, for `reconcile`.
pub async fn recharges_since(
    client: &Client,
    provider: &str,
    since: Option<DateTime<Utc>>,
) -> anyhow::Result<Vec<PendingRecharge>> {
    let rows = client
        .query(
            "SELECT user_id, id, created_at FROM recharge_records
              WHERE payment_method = $1 AND ($2::timestamptz IS NULL OR created_at >= $2)
              ORDER BY created_at",
            &[&provider, &since],
        )
        .await?;
    Ok(rows
        .iter()
        .map(PendingRecharge::read)
        .collect::<Result<_, _>>()?)
}

/// A task the read table shows unsettled, for the settlement job. Candidates only: what to
/// do is decided on the account's events, never on this row (it may lag).
#[derive(Debug, Clone, PartialEq)]
pub struct OpenTask {
    pub user_id: String,
    pub task_id: String,
    /// Seconds since the task was charged (the deduction's journal time: never lags).
    pub age_seconds: f64,
}

/// Tasks open for more than `older_than_secs`, oldest first.
pub async fn open_tasks(
    client: &Client,
    older_than_secs: f64,
    limit: i64,
) -> anyhow::Result<Vec<OpenTask>> {
    let rows = client
        .query(
            "SELECT user_id, id, extract(epoch FROM now() - created_at)::float8 AS age
               FROM video_tasks
              WHERE status IN ('pending', 'uncertain', 'processing')
                AND created_at < now() - make_interval(secs => $1)
              ORDER BY created_at LIMIT $2",
            &[&older_than_secs, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| OpenTask {
            user_id: r.get("user_id"),
            task_id: r.get("id"),
            age_seconds: r.get("age"),
        })
        .collect())
}

/// A task's charge as the journal recorded it: what an account that no longer keeps the task
/// in memory (it settled long ago, see `credit_domain::RECENT_SETTLED_TASKS`) needs to answer
/// a retry of its request or a late callback about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargedTask {
    pub credits: i64,
    /// `VideoSpec::fingerprint` of the video asked for.
    pub spec_sha256: String,
    /// Hex SHA-256 of the task's callback token.
    pub callback_token_sha256: String,
}

/// The `CreditsDeducted` event of `task_id` on `account`, if the task was ever charged
/// (through the unique index of migration 0008: one index probe).
pub async fn charged_task(
    client: &Client,
    account: &str,
    task_id: &str,
) -> anyhow::Result<Option<ChargedTask>> {
    match event_naming(client, account, "CreditsDeducted", "task_id", task_id).await? {
        None => Ok(None),
        Some(CreditEvent::CreditsDeducted {
            credits,
            video,
            callback_token_sha256,
            ..
        }) => Ok(Some(ChargedTask {
            credits,
            spec_sha256: video.fingerprint(),
            callback_token_sha256,
        })),
        Some(other) => anyhow::bail!("a {} event stored as CreditsDeducted", other.name()),
    }
}

/// The fingerprint (`credit_domain::adjustment_fingerprint`) of adjustment `adjustment_id`
/// on `account` as the journal recorded it, if it was ever made (unique index of migration
/// 0008).
pub async fn adjustment_fingerprint(
    client: &Client,
    account: &str,
    adjustment_id: &str,
) -> anyhow::Result<Option<String>> {
    match event_naming(
        client,
        account,
        "CreditsAdjusted",
        "adjustment_id",
        adjustment_id,
    )
    .await?
    {
        None => Ok(None),
        Some(CreditEvent::CreditsAdjusted {
            credits, reason, ..
        }) => Ok(Some(credit_domain::adjustment_fingerprint(
            credits, &reason,
        ))),
        Some(other) => anyhow::bail!("a {} event stored as CreditsAdjusted", other.name()),
    }
}

/// The `event_type` event of `account` whose `field` is `id`. `event_type` and `field` are
/// one of the pairs migration 0008 indexes uniquely, written into the statement (not bound)
/// so that it matches the index's expression.
async fn event_naming(
    client: &Client,
    account: &str,
    event_type: &'static str,
    field: &'static str,
    id: &str,
) -> anyhow::Result<Option<CreditEvent>> {
    let row = client
        .query_opt(
            &format!(
                "SELECT payload FROM events
                  WHERE aggregate_type = $1 AND aggregate_id = $2
                    AND event_type = '{event_type}'
                    AND payload -> '{event_type}' ->> '{field}' = $3"
            ),
            &[&CreditAccount::TYPE, &account, &id],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let Json(event): Json<CreditEvent> = row.try_get("payload")?;
    Ok(Some(event))
}
