//! The flows: what happens, in the ledger and at the providers, for each thing the outside
//! world does (a Stripe event, a generate request, a provider result, a settlement pass).
//! Route handlers translate HTTP into calls of these and their typed outcomes back into
//! HTTP; the settlement job and the simulators call them directly.

pub mod settle;
pub mod stripe;
pub mod video;
