//! The HTTP service: the API that the web front end, Stripe's webhook and Grsai's callback
//! talk to, plus the background jobs (projector, settlement) and the embedded web pages.
//!
//! Handlers validate, authenticate and translate; the decisions are the domain's, the
//! storage is the store's, and outside calls go through the provider ports.

mod app;
mod auth;
mod body;
pub mod config;
mod error;
mod flows;
mod health;
mod limits;
mod methods;
mod metrics;
mod money;
mod routes;
mod settlement;
mod state;
mod telemetry;

pub use app::{Application, RunningApp};
pub use config::Config;
pub use health::Readiness;

/// Reads the configuration from the environment and serves until Ctrl-C or SIGTERM.
pub async fn serve() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let app = Application::build(config).await?;
    app.run_until_stopped().await
}
