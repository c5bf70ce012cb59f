//! The credit ledger's domain: the `CreditAccount` aggregate, its commands, events and
//! errors, and the ports through which payments and video generation reach it.
//!
//! This crate decides; it never does I/O. It must not depend on a database, HTTP, or any
//! provider SDK: `handle` chooses events from the account's state, `apply` only changes state
//! and cannot fail. All money is integers: fen for payments, credits for the balance.

mod account;
mod command;
mod error;
mod event;
mod ids;
pub mod ports;
mod pricing;

pub use account::{
    adjustment_fingerprint, CreditAccount, Dispute, DisputeStage, Recharge, RechargeStatus, Task,
    TaskStatus, RECENT_ADJUSTMENTS, RECENT_SETTLED_TASKS,
};
pub use command::{CreditCommand, VideoSpec};
pub use error::LedgerError;
pub use event::{CreditEvent, EVENT_VERSION};
pub use ids::{IdError, UserId};
pub use pricing::{Pricing, PricingError};
