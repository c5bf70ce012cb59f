//! Test kit: local HTTP servers that speak the wire formats of the outside world (Stripe,
//! Grsai), and helpers for tests against a real PostgreSQL. Used only by tests and benches.

pub mod cut_proxy;
pub mod db;
pub mod fake_grsai;
pub mod fake_jwks;
pub mod fake_stripe;
pub mod postgres;
pub mod stripe_story;
