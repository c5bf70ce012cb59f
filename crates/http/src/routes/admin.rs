//! Operators and auditors (admin token): an account's events, its balance at an instant,
//! adjustments, the audit report and the current audit checkpoint.

use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use credit_domain::{CreditCommand, UserId};
use serde::Deserialize;
use serde_json::json;

use super::account::{events_page, EventsQuery};
use super::recharge::{metadata, new_id};
use crate::auth::Admin;
use crate::error::ApiError;
use crate::state::AppState;

fn account(path: &str) -> Result<UserId, ApiError> {
    UserId::parse(path).map_err(|e| ApiError::invalid("invalid_user_id", e.to_string()))
}

pub async fn events(
    state: web::Data<AppState>,
    _admin: Admin,
    path: web::Path<String>,
    query: web::Query<EventsQuery>,
) -> Result<HttpResponse, ApiError> {
    let user = account(&path)?;
    events_page(&state, user.as_str(), &query).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AtQuery {
    at: Option<String>,
}

pub async fn balance(
    state: web::Data<AppState>,
    _admin: Admin,
    path: web::Path<String>,
    query: web::Query<AtQuery>,
) -> Result<HttpResponse, ApiError> {
    let user = account(&path)?;
    let at = match &query.at {
        None => Utc::now(),
        Some(raw) => DateTime::parse_from_rfc3339(raw)
            .map_err(|_| {
                ApiError::invalid(
                    "invalid_timestamp",
                    "at must be an RFC 3339 timestamp, e.g. 2026-11-25T12:00:00Z",
                )
            })?
            .with_timezone(&Utc),
    };
    let client = state.read().await?;
    let report = credit_store::audit::balance_at(&client, user.as_str(), at).await?;
    Ok(HttpResponse::Ok().json(report))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdjustRequest {
    credits: i64,
    reason: String,
}

pub async fn adjust(
    state: web::Data<AppState>,
    _admin: Admin,
    req: HttpRequest,
    path: web::Path<String>,
    body: crate::body::Body<AdjustRequest>,
) -> Result<HttpResponse, ApiError> {
    let user = account(&path)?;
    if body.credits == 0 || body.credits.unsigned_abs() > 1_000_000_000 {
        return Err(ApiError::invalid(
            "invalid_credits",
            "credits must be a non-zero integer of at most 1000000000 in size",
        ));
    }
    let reason = body.reason.trim();
    if reason.is_empty() || reason.chars().count() > 500 {
        return Err(ApiError::invalid(
            "invalid_reason",
            "reason must be 1 to 500 characters",
        ));
    }
    let adjustment_id = new_id(&req, "adj", &user)?;
    let done = match state
        .ledger
        .execute(
            &user,
            CreditCommand::Adjust {
                adjustment_id: adjustment_id.clone(),
                credits: body.credits,
                actor: "admin".to_owned(),
                reason: reason.to_owned(),
            },
            metadata(&req),
        )
        .await
    {
        Ok(done) => done,
        // A retry with the same Idempotency-Key: the adjustment was made once already.
        Err(credit_store::ExecuteError::Rejected(
            credit_domain::LedgerError::AdjustmentExists { .. },
        )) => {
            let (account, _) = state.ledger.load(&user).await?;
            let fingerprint = credit_domain::adjustment_fingerprint(body.credits, reason);
            // The account keeps its recent adjustments; an older one is in the journal.
            let known = match account.adjustment(&adjustment_id) {
                Some(known) => Some(known.to_owned()),
                None => {
                    let client = state.read().await?;
                    credit_store::queries::adjustment_fingerprint(
                        &client,
                        user.as_str(),
                        &adjustment_id,
                    )
                    .await
                    .map_err(ApiError::from_store)?
                }
            };
            if known.is_some_and(|known| known != fingerprint) {
                return Err(crate::error::idempotency_conflict());
            }
            return Ok(HttpResponse::Ok().json(json!({
                "adjustment_id": adjustment_id,
                "user_id": user.as_str(),
                "duplicate": true,
                "balance": account.balance(),
            })));
        }
        Err(e) => return Err(e.into()),
    };
    Ok(HttpResponse::Created().json(json!({
        "adjustment_id": adjustment_id,
        "user_id": user.as_str(),
        "credits": body.credits,
        "reason": reason,
        "balance": done.balance,
    })))
}

pub async fn audit(state: web::Data<AppState>, _admin: Admin) -> Result<HttpResponse, ApiError> {
    let report = credit_store::audit::run_apart(&state.config.database_url, None, None).await?;
    Ok(HttpResponse::Ok().json(report))
}

/// The journal's heads as a checkpoint file (docs/AUDITING.md), taken by a clean audit in the
/// same snapshot. Unsigned on purpose: the signing key belongs to the auditors, not to the
/// service (a service that could sign could sign a forgery); they keep and sign it themselves.
pub async fn checkpoint(
    state: web::Data<AppState>,
    _admin: Admin,
) -> Result<HttpResponse, ApiError> {
    let report = credit_store::audit::run_apart(&state.config.database_url, None, None).await?;
    if !report.ok {
        let found = report.discrepancies.len();
        return Err(ApiError::new(
            actix_web::http::StatusCode::CONFLICT,
            "audit_failed",
            format!(
                "the audit found {found} discrepancies, so no checkpoint vouches for this journal (see GET /api/admin/audit)"
            ),
        )
        .with("discrepancies", found));
    }
    Ok(HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .insert_header(("X-Checkpoint-Root", hex::encode(report.heads.root())))
        .body(report.heads.to_text(None)))
}
