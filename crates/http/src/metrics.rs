//! Prometheus metrics: the recorder (installed once per process), the per-request
//! middleware, and `GET /metrics`.
//!
//! Metric names and labels are listed in docs/CONFIGURATION.md ("Metrics"). Labels stay
//! bounded: the route is the matched pattern (`/api/video/tasks/{task_id}`, `unmatched` for
//! anything else), never the raw path.

use std::sync::OnceLock;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, Error, HttpRequest, HttpResponse};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use secrecy::ExposeSecret;

use crate::error::ApiError;
use crate::state::AppState;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the global recorder the first time (every `Application` of a process shares it;
/// tests start many), and returns its handle. `None` if another recorder was installed.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ];
            let built = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("ledger_batch_size".into()),
                        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
                    )
                })
                .and_then(|b| b.install_recorder());
            match built {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
                    None
                }
            }
        })
        .clone()
}

/// Middleware: `http_requests_total{method, route, status}` and
/// `http_request_duration_seconds{method, route}` (until the response head).
pub async fn http_metrics(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody + 'static>, Error> {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let res = next.call(req).await?;
    let route = res
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    let status = res.status().as_u16().to_string();
    metrics::counter!(
        "http_requests_total",
        "method" => method.clone(),
        "route" => route.clone(),
        "status" => status
    )
    .increment(1);
    metrics::histogram!(
        "http_request_duration_seconds",
        "method" => method,
        "route" => route
    )
    .record(started.elapsed().as_secs_f64());
    Ok(res)
}

/// `GET /metrics`, in Prometheus' text format. Open when `METRICS_TOKEN` is unset, else it
/// takes `Authorization: Bearer <METRICS_TOKEN>`. The projector's lag and the pools' use
/// are measured at each scrape.
pub async fn scrape(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    if let Some(expected) = &state.config.metrics_token {
        let token = crate::auth::bearer(&req)?;
        if !crate::auth::constant_time_eq(token.as_bytes(), expected.expose_secret().as_bytes()) {
            return Err(ApiError::unauthorized(
                "invalid_metrics_token",
                "wrong metrics token",
            ));
        }
    }
    let read = state.db.read.status();
    metrics::gauge!("db_pool_connections", "pool" => "read", "state" => "open")
        .set(read.size as f64);
    metrics::gauge!("db_pool_connections", "pool" => "read", "state" => "idle")
        .set(read.available as f64);
    metrics::gauge!("db_pool_connections", "pool" => "write", "state" => "open")
        .set(f64::from(state.db.write.size()));
    metrics::gauge!("db_pool_connections", "pool" => "write", "state" => "idle")
        .set(state.db.write.num_idle() as f64);
    match state.db.read.get().await {
        Ok(client) => match credit_store::projector::lag(&client).await {
            Ok(lag) => {
                metrics::gauge!("projector_lag_seconds").set(lag.seconds);
                metrics::gauge!("projector_pending_events").set(lag.pending_events as f64);
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "metrics: projector lag unknown"),
        },
        Err(e) => tracing::warn!(error = %e, "metrics: no database connection for the lag"),
    }
    let body = install().map(|h| h.render()).unwrap_or_default();
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body))
}
