//! What every handler shares.

use std::sync::Arc;

use credit_domain::ports::{PaymentProvider, VideoProvider};
use credit_domain::UserId;
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

    /// A read-side connection for `user`'s own reads, after the account's projection has
    /// caught up with its journal: after a command is answered, the user's next read shows
    /// it, on any process of the service (see docs/ARCHITECTURE.md, "Read your writes").
    pub async fn read_own(
        &self,
        user: &UserId,
    ) -> Result<deadpool_postgres::Object, crate::error::ApiError> {
        let mut client = self.read().await?;
        credit_store::projector::catch_up(&mut client, user.as_str())
            .await
            .map_err(crate::error::ApiError::from_store)?;
        Ok(client)
    }
}
