//! The journal as JSON Lines, for auditors who verify it with their own tools
//! (tools/verify_export.py). The format and the hash are specified in docs/AUDITING.md.
//!
//! Every event line carries the exact text the hash covers (`payload` and `metadata` are the
//! stored text, as strings) and the previous event's hash, so a verifier
//! recomputes each chain from the file alone, also for one account or a position range.

use std::collections::HashMap;
use std::io::Write;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::{pin_mut, TryStreamExt};
use serde::Serialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, IsolationLevel};

/// Which events to export (all of them by default).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub account: Option<String>,
    /// First global position included.
    pub from: Option<i64>,
    /// Last global position included.
    pub to: Option<i64>,
}

/// The first line.
#[derive(Serialize)]
struct Header<'a> {
    format: &'static str,
    version: u32,
    exported_at: String,
    /// The highest position in the journal when the export's snapshot was taken.
    journal_position: i64,
    account: Option<&'a str>,
    from: Option<i64>,
    to: Option<i64>,
}

/// One event.
#[derive(Serialize)]
struct Line<'a> {
    position: i64,
    recorded_at: String,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    sequence: i64,
    event_type: &'a str,
    event_version: &'a str,
    payload: &'a str,
    metadata: &'a str,
    /// Hex; empty for an account's first event.
    prev_hash: String,
    hash: String,
}

/// The last line: its absence shows a cut-off file.
#[derive(Serialize)]
struct End {
    end: bool,
    events: u64,
}

pub const FORMAT: &str = "credit-ledger export";

/// Writes the export in one read-only snapshot; returns the number of events written.
pub async fn write(
    client: &mut Client,
    filter: &Filter,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .context("starting the export's snapshot")?;
    let journal_position: i64 = tx
        .query_one("SELECT coalesce(max(position), 0)::bigint FROM events", &[])
        .await?
        .try_get(0)?;
    let header = Header {
        format: FORMAT,
        version: 1,
        exported_at: Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
        journal_position,
        account: filter.account.as_deref(),
        from: filter.from,
        to: filter.to,
    };
    writeln!(out, "{}", serde_json::to_string(&header)?)?;

    let condition = "($1::text IS NULL OR aggregate_id = $1)
                 AND ($2::bigint IS NULL OR position >= $2)
                 AND ($3::bigint IS NULL OR position <= $3)";
    let params: [&(dyn ToSql + Sync); 3] = [&filter.account, &filter.from, &filter.to];
    // The hash before each account's first exported event, so its chain can be checked
    // from there.
    let mut last_hash: HashMap<String, Vec<u8>> = HashMap::new();
    for row in tx
        .query(
            &format!(
                "WITH first AS (
                     SELECT aggregate_type, aggregate_id, min(sequence) AS sequence
                       FROM events WHERE {condition} GROUP BY 1, 2)
                 SELECT f.aggregate_id, p.hash
                   FROM first f JOIN events p
                     ON p.aggregate_type = f.aggregate_type AND p.aggregate_id = f.aggregate_id
                    AND p.sequence = f.sequence - 1"
            ),
            &params,
        )
        .await
        .context("reading the chains' anchors")?
    {
        last_hash.insert(row.try_get("aggregate_id")?, row.try_get("hash")?);
    }

    let stream = tx
        .query_raw(
            &format!(
                "SELECT position, recorded_at, aggregate_type, aggregate_id, sequence, event_type,
                        event_version, payload::text AS payload, metadata::text AS metadata, hash
                   FROM events WHERE {condition} ORDER BY position"
            ),
            params,
        )
        .await
        .context("reading the journal")?;
    pin_mut!(stream);
    let mut events = 0u64;
    while let Some(row) = stream.try_next().await? {
        let account: &str = row.try_get("aggregate_id")?;
        let hash: Vec<u8> = row.try_get("hash")?;
        let recorded_at: DateTime<Utc> = row.try_get("recorded_at")?;
        let prev = last_hash.insert(account.to_owned(), hash.clone());
        let line = Line {
            position: row.try_get("position")?,
            recorded_at: recorded_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: account,
            sequence: row.try_get("sequence")?,
            event_type: row.try_get("event_type")?,
            event_version: row.try_get("event_version")?,
            payload: row.try_get("payload")?,
            metadata: row.try_get("metadata")?,
            prev_hash: prev.map(hex::encode).unwrap_or_default(),
            hash: hex::encode(&hash),
        };
        writeln!(out, "{}", serde_json::to_string(&line)?)?;
        events += 1;
    }
    writeln!(
        out,
        "{}",
        serde_json::to_string(&End { end: true, events })?
    )?;
    out.flush()?;
    tx.commit().await?;
    Ok(events)
}
