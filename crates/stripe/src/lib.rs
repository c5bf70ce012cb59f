//! Stripe adapter: everything the service knows about Stripe's wire format lives here.
//! [`StripeCheckout`] implements the domain's [`PaymentProvider`](credit_domain::ports::PaymentProvider)
//! port by creating Checkout Sessions through `async-stripe`; [`verify_signature`] and
//! [`parse_event`] turn a raw webhook delivery into a small, typed [`WebhookEvent`].
//!
//! This crate does I/O towards Stripe only. It must not depend on the store, the HTTP layer
//! or the binary, and it decides nothing about money: what a completed session or a refund
//! means for an account is the domain's business, not this crate's.

mod checkout;
mod event;
mod ledger;
mod signature;

pub use checkout::{
    checkout_status, StripeCheckout, StripeConfig, StripeConfigError, DEFAULT_API_BASE,
};
pub use event::{
    event_types, parse_event, ChargeInfo, DisputeInfo, EventData, ParseError, SessionInfo,
    WebhookEvent,
};
pub use ledger::{dispute_stage, ledger_action, LedgerAction};
pub use signature::{verify_signature, SignatureError, DEFAULT_TOLERANCE_SECS, SIGNATURE_HEADER};
