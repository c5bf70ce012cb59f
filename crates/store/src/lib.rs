//! The PostgreSQL store: the event journal (write side, through postgres-es and sqlx), the
//! projections and every read query (read side, through deadpool-postgres), migrations,
//! the command executor and the audit.
//!
//! It knows the domain (`credit-domain`) but nothing of HTTP or of the providers.

pub mod audit;
pub mod chain;
pub mod checkpoint;
pub mod db;
pub mod executor;
pub mod export;
pub mod metrics;
pub mod projector;
pub mod queries;
pub mod read_models;
pub mod tls;

pub use db::{Database, DbConfig};
pub use executor::{Committed, ExecuteError, Ledger};
pub use projector::Projector;
