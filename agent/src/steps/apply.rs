//! `fh apply nixos REF ACTION`. Not retried: a failed apply is reported
//! (and the unit's restart policy decides), and its exit status proves
//! little either way, so the caller verifies the system links after it.

use super::StepError;
use crate::config::Agent;
use crate::process::{self, Program, describe};
use crate::redact::Redactor;
use crate::settings::{Action, OutputRef};

pub const STEP: &str = "apply";

/// `timeout`: what is left of `apply-timeout` after the run's fetch (one
/// budget for the download and the switch, as when `fh apply` did both).
pub async fn apply(
    agent: &Agent,
    redactor: &Redactor,
    flake: &OutputRef,
    action: Action,
    timeout: std::time::Duration,
) -> Result<(), StepError> {
    // fh needs `nix` on its PATH (system_path gives it the system's).
    let prog = Program::new(&agent.fh, STEP, timeout)
        .args(["apply", "nixos", flake.as_str(), action.as_str()])
        .system_path(&agent.current_system);
    let out = process::run(&prog, redactor)
        .await
        .map_err(|e| StepError::from_process(STEP, e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(StepError::Failed {
            step: STEP,
            reason: format!("fh apply nixos failed ({})", describe(out.status)),
        })
    }
}
