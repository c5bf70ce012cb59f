//! Liveness and readiness.
//!
//! `/healthz` says the process answers. `/readyz` says it should get traffic: both pools
//! reach the database, the schema is migrated, the projector is less than `READY_MAX_LAG`
//! behind, and the service is not shutting down. On SIGTERM readiness turns 503 first, for
//! `SHUTDOWN_DELAY`, so the load balancer stops sending new requests before the listener
//! closes and in-flight requests drain.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::state::AppState;

/// Whether the service is shutting down; shared by the server and whoever stops it.
#[derive(Clone, Default)]
pub struct Readiness {
    draining: Arc<AtomicBool>,
}

impl Readiness {
    /// From now on `/readyz` answers 503 `shutting_down`.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

pub async fn readyz(state: web::Data<AppState>, readiness: web::Data<Readiness>) -> HttpResponse {
    if readiness.is_draining() {
        return HttpResponse::ServiceUnavailable().json(
            json!({ "status": "not_ready", "reason": "shutting_down", "database": "not_checked" }),
        );
    }
    let write = sqlx::query("SELECT 1").execute(&state.db.write).await;
    let read = async {
        let client = state.db.read.get().await?;
        let migrated = credit_store::db::migrations_applied(&client).await?;
        let lag = credit_store::projector::lag(&client).await?;
        anyhow::Ok((migrated, lag))
    }
    .await;
    let (migrated, lag) = match (read, write) {
        (Ok(read), Ok(_)) => read,
        (read, write) => {
            if let Err(e) = &read {
                tracing::warn!(error = %format!("{e:#}"), "readiness: the read pool cannot reach the database");
            }
            if let Err(e) = &write {
                tracing::warn!(error = %e, "readiness: the write pool cannot reach the database");
            }
            return HttpResponse::ServiceUnavailable().json(json!({
                "status": "not_ready",
                "reason": "database_unreachable",
                "database": "unreachable",
                "read_pool": if read.is_ok() { "ok" } else { "unreachable" },
                "write_pool": if write.is_ok() { "ok" } else { "unreachable" },
            }));
        }
    };
    let max_lag = state.config.ready_max_lag.as_secs_f64();
    let reason = if !migrated {
        Some("not_migrated")
    } else if lag.seconds > max_lag {
        Some("projector_lagging")
    } else {
        None
    };
    let body = json!({
        "status": if reason.is_none() { "ready" } else { "not_ready" },
        "reason": reason,
        "database": "ok",
        "migrations_applied": migrated,
        "projector_lag": lag,
        "max_lag_seconds": max_lag,
    });
    if reason.is_none() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
