//! `credit-ledger serve`: the HTTP service lives in `credit-http`; this only starts it.
//!
//! The database is the one the global `--database-url` names (clap has already taken it from
//! the flag, else `DATABASE_URL`, else the default); everything else comes from the
//! environment and `.env`, as `credit_http::Config` documents.

pub async fn serve(database_url: String) -> anyhow::Result<()> {
    let config = credit_http::Config::from_lookup(|k| {
        if k == "DATABASE_URL" {
            Some(database_url.clone())
        } else {
            std::env::var(k).ok()
        }
    })?;
    let app = credit_http::Application::build(config).await?;
    app.run_until_stopped().await
}
