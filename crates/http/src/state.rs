//! What every handler shares.

use std::sync::Arc;

use credit_domain::ports::{PaymentProvider, VideoProvider};
use credit_store::{Database, Ledger};

use crate::auth::JwtKeys;
use crate::config::Config;

pub struct AppState {
    pub config: Config,
    pub db: Database,
    pub ledger: Arc<Ledger>,
    /// `None` in demo payment mode: recharges complete at once.
    pub payments: Option<Arc<dyn PaymentProvider>>,
    pub video: Arc<dyn VideoProvider>,
    pub jwt: JwtKeys,
    /// True when tokens are signed with a random per-process secret (`/api/dev/token`).
    pub demo_auth: bool,
}

impl AppState {
    pub async fn read(&self) -> Result<deadpool_postgres::Object, crate::error::ApiError> {
        Ok(self.db.read.get().await?)
    }
}
