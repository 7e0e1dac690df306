//! Tripod builds container images natively on the OS they target.
#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod buildd;
pub mod cli;
pub mod controller;
pub mod dockerfile;
pub mod duration;
pub mod executor;
pub mod http;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod os;
pub mod outcome;
pub mod platform;
pub mod proto;
pub mod reference;
pub mod registry;
pub mod secret_policy;
pub mod source;
pub mod telemetry;
pub mod tls;
