//! placeholder
pub mod ports;
