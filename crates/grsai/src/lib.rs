//! Grsai adapter: implements the domain's [`VideoProvider`] port for Grsai, the API gateway
//! that runs OpenAI's Sora 2 model, and parses the result objects Grsai sends to our
//! callback endpoint. [`GrsaiClient`] talks to the real API over HTTPS;
//! [`SimulatedVideoProvider`] stands in for it in demo mode (no API key) and calls the
//! service's real callback endpoint with the same wire format. This crate knows the Grsai
//! wire format and HTTP, and nothing about accounts, credits, the database or actix: deciding
//! what a result means for money is the domain's job.
//!
//! [`VideoProvider`]: credit_domain::ports::VideoProvider

#![forbid(unsafe_code)]

mod client;
mod simulated;
mod wire;

pub use client::{ConfigError, GrsaiClient, GrsaiConfig};
pub use simulated::{SimulatedVideoProvider, DEFAULT_SAMPLE_VIDEO_URL};
pub use wire::{encode_result, parse_result, ParseError};
