//! The read models: typed rows of the read tables, as the HTTP layer shows them, read by
//! column name, and one keyset-paging helper for the newest-first lists. The only SQL on the
//! read tables outside the projector lives here (and in `queries`): this crate owns them.

use chrono::{DateTime, Utc};
use serde::Serialize;
// A pooled connection: its statement cache parses each query once per connection, so a read
// is one round trip (a plain `tokio_postgres::Client` would parse the text on every call).
use deadpool_postgres::ClientWrapper as Client;
use tokio_postgres::Row;

/// A page request: at most `limit` records, newest first, strictly before `before`
/// (`created_at`, `id`) when given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyset {
    pub limit: i64,
    pub before: Option<(DateTime<Utc>, String)>,
}

/// One page: the records, and whether more follow (then the last record is the cursor).
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub records: Vec<T>,
    pub more: bool,
}

/// Something listed newest first by (`created_at`, `id`).
pub trait Keyed {
    fn created_at(&self) -> DateTime<Utc>;
    fn id(&self) -> &str;
}

impl<T: Keyed> Page<T> {
    /// The cursor of the next page: the last record's key, when more follow.
    pub fn next(&self) -> Option<(DateTime<Utc>, &str)> {
        if !self.more {
            return None;
        }
        self.records.last().map(|r| (r.created_at(), r.id()))
    }
}

/// The one paging helper: `SELECT {columns} FROM {table}` for one user, newest first, one
/// row more than the limit to know whether more follow.
async fn page<T>(
    client: &Client,
    table: &str,
    columns: &str,
    user: &str,
    keyset: &Keyset,
    read: fn(&Row) -> Result<T, tokio_postgres::Error>,
) -> anyhow::Result<Page<T>> {
    let (at, id) = match &keyset.before {
        Some((at, id)) => (Some(*at), Some(id.as_str())),
        None => (None, None),
    };
    let statement = client
        .prepare_cached(&format!(
            "SELECT {columns} FROM {table}
              WHERE user_id = $1 AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
              ORDER BY created_at DESC, id DESC LIMIT $4"
        ))
        .await?;
    let rows = client
        .query(&statement, &[&user, &at, &id, &(keyset.limit + 1)])
        .await?;
    let mut records = rows.iter().map(read).collect::<Result<Vec<_>, _>>()?;
    let more = records.len() as i64 > keyset.limit;
    records.truncate(usize::try_from(keyset.limit).unwrap_or(0));
    Ok(Page { records, more })
}

/// A video task, as `GET /api/video/tasks` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskRecord {
    pub task_id: String,
    /// One vocabulary: `credit_domain::TaskStatus::as_str`.
    pub status: String,
    pub progress: i32,
    pub prompt: String,
    pub video_url: Option<String>,
    pub failure_reason: Option<String>,
    pub credits_charged: i64,
    pub refunded: bool,
    pub delivered_after_refund: bool,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub aspect_ratio: String,
    pub duration: i32,
    pub size: String,
    pub error_message: Option<String>,
    pub model: String,
}

const TASK_COLUMNS: &str = "id, status, progress, prompt, video_url, failure_reason,
    credits_charged, refunded, delivered_after_refund, created_at, completed_at, aspect_ratio,
    duration, size, error_message, model";

impl TaskRecord {
    fn read(r: &Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            task_id: r.try_get("id")?,
            status: r.try_get("status")?,
            progress: r.try_get("progress")?,
            prompt: r.try_get("prompt")?,
            video_url: r.try_get("video_url")?,
            failure_reason: r.try_get("failure_reason")?,
            credits_charged: r.try_get("credits_charged")?,
            refunded: r.try_get("refunded")?,
            delivered_after_refund: r.try_get("delivered_after_refund")?,
            created_at: r.try_get("created_at")?,
            completed_at: r.try_get("completed_at")?,
            aspect_ratio: r.try_get("aspect_ratio")?,
            duration: r.try_get("duration")?,
            size: r.try_get("size")?,
            error_message: r.try_get("error_message")?,
            model: r.try_get("model")?,
        })
    }
}

impl Keyed for TaskRecord {
    fn created_at(&self) -> DateTime<Utc> {
        self.created_at
    }
    fn id(&self) -> &str {
        &self.task_id
    }
}

/// A user's tasks, newest first.
pub async fn tasks(
    client: &Client,
    user: &str,
    keyset: &Keyset,
) -> anyhow::Result<Page<TaskRecord>> {
    page(
        client,
        "video_tasks",
        TASK_COLUMNS,
        user,
        keyset,
        TaskRecord::read,
    )
    .await
}

/// One of a user's tasks.
pub async fn task(
    client: &Client,
    user: &str,
    task_id: &str,
) -> anyhow::Result<Option<TaskRecord>> {
    let statement = client
        .prepare_cached(&format!(
            "SELECT {TASK_COLUMNS} FROM video_tasks WHERE id = $1 AND user_id = $2"
        ))
        .await?;
    let row = client.query_opt(&statement, &[&task_id, &user]).await?;
    Ok(row.as_ref().map(TaskRecord::read).transpose()?)
}

/// A consumption record, as `GET /api/consumption` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConsumptionRecord {
    pub id: String,
    pub video_task_id: String,
    pub credits: i64,
    pub description: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub refunded_at: Option<DateTime<Utc>>,
}

impl ConsumptionRecord {
    fn read(r: &Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            video_task_id: r.try_get("video_task_id")?,
            credits: r.try_get("credits")?,
            description: r.try_get("description")?,
            status: r.try_get("status")?,
            created_at: r.try_get("created_at")?,
            refunded_at: r.try_get("refunded_at")?,
        })
    }
}

impl Keyed for ConsumptionRecord {
    fn created_at(&self) -> DateTime<Utc> {
        self.created_at
    }
    fn id(&self) -> &str {
        &self.id
    }
}

/// A user's consumption records, newest first.
pub async fn consumption(
    client: &Client,
    user: &str,
    keyset: &Keyset,
) -> anyhow::Result<Page<ConsumptionRecord>> {
    page(
        client,
        "consumption_records",
        "id, video_task_id, credits, description, status, created_at, refunded_at",
        user,
        keyset,
        ConsumptionRecord::read,
    )
    .await
}

/// A recharge record, as `GET /api/recharge` shows it (amounts in fen; the HTTP layer adds
/// the yuan form).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RechargeRecord {
    pub recharge_id: String,
    pub amount_fen: i64,
    pub currency: String,
    pub credits: i64,
    pub payment_method: String,
    pub payment_id: Option<String>,
    pub status: String,
    pub reversed_credits: i64,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl RechargeRecord {
    fn read(r: &Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            recharge_id: r.try_get("id")?,
            amount_fen: r.try_get("amount_fen")?,
            currency: r.try_get("currency")?,
            credits: r.try_get("credits")?,
            payment_method: r.try_get("payment_method")?,
            payment_id: r.try_get("payment_id")?,
            status: r.try_get("status")?,
            reversed_credits: r.try_get("reversed_credits")?,
            created_at: r.try_get("created_at")?,
            completed_at: r.try_get("completed_at")?,
        })
    }
}

impl Keyed for RechargeRecord {
    fn created_at(&self) -> DateTime<Utc> {
        self.created_at
    }
    fn id(&self) -> &str {
        &self.recharge_id
    }
}

/// A user's recharge records, newest first.
pub async fn recharges(
    client: &Client,
    user: &str,
    keyset: &Keyset,
) -> anyhow::Result<Page<RechargeRecord>> {
    page(
        client,
        "recharge_records",
        "id, amount_fen, credits, payment_method, payment_id, status, created_at, completed_at,
         currency, reversed_credits",
        user,
        keyset,
        RechargeRecord::read,
    )
    .await
}
