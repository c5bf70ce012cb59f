//! `GET /api/account/events`: the signed-in user's own events (for the balance chart).

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::state::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Sequence after which to start (the previous page's `next_cursor`).
    pub cursor: Option<String>,
    pub limit: Option<i64>,
}

impl EventsQuery {
    pub fn parse(&self) -> Result<(Option<i64>, i64), ApiError> {
        let after = match &self.cursor {
            None => None,
            Some(c) => Some(c.parse::<i64>().ok().filter(|s| *s >= 0).ok_or_else(|| {
                ApiError::invalid("invalid_cursor", "cursor is not one this service issued")
            })?),
        };
        let limit = match self.limit {
            None => 500,
            Some(l) if (1..=1000).contains(&l) => l,
            Some(_) => {
                return Err(ApiError::invalid(
                    "invalid_limit",
                    "limit must be between 1 and 1000",
                ))
            }
        };
        Ok((after, limit))
    }
}

/// Events oldest first, `limit` at a time.
pub async fn events_page(
    state: &AppState,
    account: &str,
    query: &EventsQuery,
) -> Result<HttpResponse, ApiError> {
    let (after, limit) = query.parse()?;
    let client = state.read().await?;
    let mut records =
        credit_store::queries::account_events(&client, account, None, after, limit + 1).await?;
    let next = if records.len() as i64 > limit {
        records.truncate(limit as usize);
        records.last().map(|r| r.sequence.to_string())
    } else {
        None
    };
    Ok(HttpResponse::Ok().json(json!({
        "user_id": account,
        "records": records,
        "next_cursor": next,
    })))
}

pub async fn events(
    state: web::Data<AppState>,
    user: AuthUser,
    query: web::Query<EventsQuery>,
) -> Result<HttpResponse, ApiError> {
    events_page(&state, user.0.as_str(), &query).await
}
