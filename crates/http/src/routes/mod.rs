//! Routes: the paths of the original app, so its front end can switch over.

mod account;
mod admin;
mod pages;
mod recharge;
mod stripe_webhook;
mod video;

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;

use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(crate::health::healthz))
        .route("/readyz", web::get().to(crate::health::readyz))
        .route("/api/openapi.json", web::get().to(pages::openapi))
        .route("/api/stats", web::get().to(stats))
        .route("/api/dev/token", web::post().to(dev_token))
        .route("/api/recharge", web::post().to(recharge::create))
        .route("/api/recharge", web::get().to(recharge::list))
        .route(
            "/api/stripe/webhook",
            web::post().to(stripe_webhook::receive),
        )
        .route("/api/video/generate", web::post().to(video::generate))
        .route("/api/video/callback", web::post().to(video::callback))
        .route("/api/video/tasks", web::get().to(video::list))
        .route("/api/video/tasks/{task_id}", web::get().to(video::get))
        .route("/api/consumption", web::get().to(video::consumption))
        .route("/api/account/events", web::get().to(account::events))
        .route(
            "/api/admin/accounts/{user_id}/events",
            web::get().to(admin::events),
        )
        .route(
            "/api/admin/accounts/{user_id}/balance",
            web::get().to(admin::balance),
        )
        .route(
            "/api/admin/accounts/{user_id}/adjustments",
            web::post().to(admin::adjust),
        )
        .route("/api/admin/audit", web::get().to(admin::audit))
        .route(
            "/api/admin/audit/checkpoint",
            web::get().to(admin::checkpoint),
        )
        .route("/", web::get().to(pages::index))
        .route("/app.js", web::get().to(pages::app_js))
        .route("/app.css", web::get().to(pages::app_css))
        .default_service(web::to(not_found));
}

async fn not_found(req: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.path()
    )))
}

async fn stats(state: web::Data<AppState>, user: AuthUser) -> Result<HttpResponse, ApiError> {
    // Read-your-writes in one round trip when the projection is current (the usual case);
    // otherwise catch the account up and read again.
    let mut client = state.read().await?;
    let mut own = credit_store::queries::own_balance(&client, user.0.as_str()).await?;
    if own.behind {
        // (Counted in `own_reads_total` by the catch-up.)
        credit_store::projector::catch_up(&mut client, user.0.as_str())
            .await
            .map_err(ApiError::from_store)?;
        own = credit_store::queries::own_balance(&client, user.0.as_str()).await?;
    } else {
        credit_store::metrics::own_read(false);
    }
    let credits = own.credits;
    let c = &state.config;
    Ok(HttpResponse::Ok().json(json!({
        "user_id": user.0.as_str(),
        "credits": credits,
        // Below zero only when a spent recharge was refunded or disputed; spending is
        // refused until a recharge repays it.
        "in_debt": credits < 0,
        "video_cost": c.pricing.video_cost_credits,
        "credits_per_yuan": c.pricing.credits_per_yuan,
        "currency": c.pricing.currency,
        "recharge_min_yuan": crate::money::fen_to_yuan(c.recharge_min_fen),
        "recharge_max_yuan": crate::money::fen_to_yuan(c.recharge_max_fen),
        "quick_amounts": [10, 50, 100, 200],
        "demo": {
            "payments": c.stripe.is_none(),
            "video": c.grsai.is_none(),
            "auth": state.demo_auth,
        },
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenRequest {
    user_id: String,
}

/// Demo sign-in: a token for any user id, signed with the per-process secret. Exists only
/// when no `AUTH_JWT_SECRET` is configured (and so only on loopback).
async fn dev_token(
    state: web::Data<AppState>,
    body: crate::body::Body<DevTokenRequest>,
) -> Result<HttpResponse, ApiError> {
    if !state.demo_auth {
        return Err(ApiError::not_found(
            "dev tokens are only issued in demo mode (AUTH_JWT_SECRET unset)",
        ));
    }
    let user = credit_domain::UserId::parse(body.user_id.trim())
        .map_err(|e| ApiError::invalid("invalid_user_id", e.to_string()))?;
    let (token, exp) = state.jwt.issue(&user, 24 * 3600)?;
    Ok(HttpResponse::Ok().json(json!({
        "token": token,
        "user_id": user.as_str(),
        "expires_at": DateTime::<Utc>::from_timestamp(exp, 0),
    })))
}

/// `limit` and `cursor` of list endpoints.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

/// A position in a newest-first list: (created_at, id) of the last record shown.
pub struct Cursor {
    pub created_at: DateTime<Utc>,
    pub id: String,
}

impl Page {
    pub fn limit(&self) -> Result<i64, ApiError> {
        match self.limit {
            None => Ok(20),
            Some(l) if (1..=100).contains(&l) => Ok(l),
            Some(_) => Err(ApiError::invalid(
                "invalid_limit",
                "limit must be between 1 and 100",
            )),
        }
    }

    pub fn cursor(&self) -> Result<Option<Cursor>, ApiError> {
        let Some(raw) = &self.cursor else {
            return Ok(None);
        };
        let bad = || ApiError::invalid("invalid_cursor", "cursor is not one this service issued");
        let (micros, id) = raw.split_once('_').ok_or_else(bad)?;
        let micros: i64 = micros.parse().map_err(|_| bad())?;
        let created_at = DateTime::<Utc>::from_timestamp_micros(micros).ok_or_else(bad)?;
        credit_domain::UserId::parse(id).map_err(|_| bad())?;
        Ok(Some(Cursor {
            created_at,
            id: id.to_owned(),
        }))
    }
}

impl Page {
    /// The page asked for: its limit, and the cursor's (created_at, id) when one was given.
    pub fn keyset(&self) -> Result<credit_store::read_models::Keyset, ApiError> {
        Ok(credit_store::read_models::Keyset {
            limit: self.limit()?,
            before: self.cursor()?.map(|c| (c.created_at, c.id)),
        })
    }
}

impl Cursor {
    pub fn encode(created_at: DateTime<Utc>, id: &str) -> String {
        format!("{}_{id}", created_at.timestamp_micros())
    }
}

/// `{"records": [...], "next_cursor": ...}` from a page of read models.
pub fn page_of<T: credit_store::read_models::Keyed>(
    page: &credit_store::read_models::Page<T>,
    show: impl Fn(&T) -> serde_json::Value,
) -> HttpResponse {
    let next = page.next().map(|(at, id)| Cursor::encode(at, id));
    let records: Vec<_> = page.records.iter().map(show).collect();
    HttpResponse::Ok().json(json!({ "records": records, "next_cursor": next }))
}
