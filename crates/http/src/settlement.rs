//! The settlement job: every `SETTLEMENT_INTERVAL`, one pass of `flows::settle` (open
//! tasks polled or refunded at their deadline, pending recharges reconciled with Stripe).

use actix_web::web;
use tokio::sync::watch;

use crate::state::AppState;

pub async fn run(state: web::Data<AppState>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(state.config.settlement_interval) => {}
            _ = shutdown.changed() => return,
        }
        let pass = crate::flows::settle::settle_once(&state).await;
        if let Ok(pass) = &pass {
            metrics::counter!("settlement_tasks_settled_total")
                .increment(pass.tasks_settled as u64);
            metrics::counter!("settlement_recharges_settled_total")
                .increment(pass.recharges_settled as u64);
            metrics::counter!("settlement_errors_total").increment(pass.errors as u64);
        }
        match pass {
            Ok(pass) if pass == Default::default() => {}
            Ok(pass) => tracing::info!(
                tasks = pass.tasks_settled,
                recharges = pass.recharges_settled,
                errors = pass.errors,
                "settlement pass"
            ),
            Err(e) => tracing::error!(error = %format!("{e:#}"), "settlement pass failed"),
        }
    }
}
