//! `credit-ledger serve`: the HTTP service lives in `credit-http`; this only starts it.

pub async fn serve() -> anyhow::Result<()> {
    credit_http::serve().await
}
