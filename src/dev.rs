//! `tripod dev`: a local Tripod on this machine.

use crate::cli::DevCommand;

/// Errors of `tripod dev`.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// Placeholder until the harness lands.
    #[error("not yet")]
    NotYet,
}

/// Runs a `tripod dev` subcommand.
pub async fn run(_cmd: DevCommand) -> Result<(), DevError> {
    Err(DevError::NotYet)
}
