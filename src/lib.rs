//! Tripod builds container images natively on the OS they target.
#![forbid(unsafe_code)]

pub mod api;
pub mod buildd;
pub mod cli;
pub mod controller;
pub mod dev;
pub mod duration;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod platform;
pub mod proto;
pub mod reference;
pub mod telemetry;
pub mod testenv;
pub mod tls;
