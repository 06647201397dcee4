//! The programs a run drives, one file each: `determinate-nixd login aws`,
//! `fh resolve --json`, `fh fetch`, `fh apply nixos`, the rollback, and user-data scripts. All go
//! through [`crate::process`]; the retrying ones through [`crate::retry`].

pub mod apply;
pub mod fetch;
pub mod login;
pub mod resolve;
pub mod rollback;
pub mod script;

use crate::process::ProcessError;
use crate::retry::{Attempt, RetryError};
use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StepError {
    /// A program is not there: the image is broken, retrying cannot help.
    #[error("{step}: {reason}")]
    Missing { step: &'static str, reason: String },
    #[error("{step}: gave up after {attempts} attempts in {:.1}s: {last}", elapsed.as_secs_f64())]
    Exhausted {
        step: &'static str,
        last: String,
        attempts: u32,
        elapsed: Duration,
    },
    #[error("{step}: {reason}")]
    TimedOut { step: &'static str, reason: String },
    #[error("{step}: {reason}")]
    Failed { step: &'static str, reason: String },
    /// The run was asked to stop while the step ran.
    #[error("{step}: {reason}")]
    Interrupted { step: &'static str, reason: String },
    /// The target resolved to another store path while the step ran (a
    /// new release, a changed parameter): what the run decided on is not
    /// what it would apply. The next run decides again.
    #[error("{step}: {reason}")]
    Moved { step: &'static str, reason: String },
}

impl StepError {
    fn from_process(step: &'static str, e: ProcessError) -> Self {
        match e {
            ProcessError::Missing { .. } => StepError::Missing {
                step,
                reason: e.to_string(),
            },
            ProcessError::TimedOut { .. } => StepError::TimedOut {
                step,
                reason: e.to_string(),
            },
            ProcessError::Spawn { .. } => StepError::Failed {
                step,
                reason: e.to_string(),
            },
            ProcessError::Interrupted { .. } => StepError::Interrupted {
                step,
                reason: e.to_string(),
            },
        }
    }

    fn from_retry(step: &'static str, e: RetryError<StepError>) -> Self {
        match e {
            RetryError::Permanent(e) => e,
            RetryError::Stopped(i) => StepError::Interrupted {
                step,
                reason: i.to_string(),
            },
            RetryError::Exhausted {
                last,
                attempts,
                elapsed,
            } => {
                let last = match last {
                    StepError::Missing { reason, .. }
                    | StepError::TimedOut { reason, .. }
                    | StepError::Failed { reason, .. }
                    | StepError::Interrupted { reason, .. }
                    | StepError::Moved { reason, .. } => reason,
                    StepError::Exhausted { last, .. } => last,
                };
                StepError::Exhausted {
                    step,
                    last,
                    attempts,
                    elapsed,
                }
            }
        }
    }
}

/// A program that did not start is permanent; one that failed or hung may
/// succeed next time (network, FlakeHub, credentials not yet there).
fn classify(step: &'static str, e: ProcessError) -> Attempt<StepError> {
    match e {
        ProcessError::Missing { .. } | ProcessError::Interrupted { .. } => {
            Attempt::Fail(StepError::from_process(step, e))
        }
        _ => Attempt::retry(StepError::from_process(step, e)),
    }
}
