//! Every way a command can end, and the one place that maps them to exit
//! codes (sysexits). The unit's `RestartPreventExitStatus` lists the
//! permanent ones (65, 69, 78): restarting cannot fix bad input, a missing
//! program, or a disabled IMDS.

use crate::imds::ImdsError;
use crate::settings::SettingsError;
use crate::ssm::SsmError;
use crate::state::StateError;
use crate::steps::StepError;

pub const OK: u8 = 0;
pub const FAILED: u8 = 1;
pub const USAGE: u8 = 64;
pub const DATAERR: u8 = 65;
pub const UNAVAILABLE: u8 = 69;
pub const IOERR: u8 = 74;
pub const TEMPFAIL: u8 = 75;
pub const CONFIG: u8 = 78;

/// Shown by `--help` and mirrored in the README.
pub const HELP: &str = "\
Exit codes:
  0   success, or nothing to do
  1   apply or verify failed (fh failed, or the system did not switch), the
      system was unhealthy after the switch (rolled back, or kept with
      health.rollback = false), a user-data script failed, or a needed
      reboot could not be requested; for `fleet status`: not converged
  64  bad command line
  65  invalid user data, settings or SSM parameter value, or a target whose
      store path was rolled back before (rejected; nothing was run)
  69  unavailable: IMDS disabled for this instance, a program missing, the
      SSM parameter missing or access to it denied (`fleet status`: AWS
      refused a request)
  74  the state directory cannot be read or written
  75  temporary: a retry budget ran out on something that may heal, a
      program timed out, another run held the lock, or the target
      resolved to another store path while it was being fetched
      (also a run stopped by SIGTERM, SIGINT or SIGHUP: it passes the
      signal on to the program it runs, waits for it, and records the
      interruption first)
  78  invalid config file";

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// User data, or the SSM parameter's value.
    #[error(transparent)]
    Input(SettingsError),
    /// The image's config file.
    #[error(transparent)]
    Config(SettingsError),
    #[error(transparent)]
    Imds(#[from] ImdsError),
    #[error(transparent)]
    Ssm(#[from] SsmError),
    #[error(transparent)]
    Step(#[from] StepError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("verify: {0}")]
    NotSwitched(String),
    #[error("{0}")]
    Scripts(String),
    /// The system needs a reboot, but it could not be requested.
    #[error("reboot: {0}")]
    Reboot(String),
    #[error("{0}")]
    Usage(String),
    /// Stopped by a signal where no step was running to say so itself
    /// (between steps, in a script, waiting for the lock or a reboot).
    #[error("{0}")]
    Interrupted(String),
    /// Unhealthy after the switch, and the previous system put back.
    #[error("health: {0}")]
    RolledBack(String),
    /// Unhealthy after the switch, and kept (or the rollback failed).
    #[error("health: {0}")]
    Unhealthy(String),
    /// The target resolves to a store path that was rolled back before.
    #[error("{0}")]
    Rejected(String),
    /// `fleet status`: AWS refused or could not be reached.
    #[error("{message}")]
    Fleet { message: String, transient: bool },
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            // Rejected: the same input can only be rejected again; the
            // operator names another target or clears the rejection.
            Failure::Input(_) | Failure::Rejected(_) => DATAERR,
            Failure::Config(_) => CONFIG,
            Failure::Usage(_) => USAGE,
            // Interrupted: the next run redoes what this one did not
            // finish.
            Failure::Imds(ImdsError::Exhausted { .. } | ImdsError::Interrupted { .. })
            | Failure::Ssm(SsmError::Exhausted { .. } | SsmError::Interrupted { .. })
            | Failure::Step(
                StepError::Exhausted { .. }
                | StepError::TimedOut { .. }
                | StepError::Interrupted { .. }
                | StepError::Moved { .. },
            )
            | Failure::State(StateError::Locked { .. } | StateError::Interrupted { .. })
            | Failure::Interrupted(_)
            | Failure::Fleet {
                transient: true, ..
            } => TEMPFAIL,
            Failure::Fleet { .. } => UNAVAILABLE,
            Failure::Imds(_) | Failure::Ssm(_) | Failure::Step(StepError::Missing { .. }) => {
                UNAVAILABLE
            }
            Failure::State(StateError::Io { .. }) => IOERR,
            Failure::Step(StepError::Failed { .. })
            | Failure::NotSwitched(_)
            | Failure::Scripts(_)
            | Failure::Reboot(_)
            | Failure::RolledBack(_)
            | Failure::Unhealthy(_) => FAILED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Source;
    use std::time::Duration;

    #[test]
    fn mapping() {
        let s = SettingsError::new(&Source::UserData, None, "x");
        let d = Duration::from_secs(1);
        let cases: Vec<(Failure, u8)> = vec![
            (Failure::Input(s.clone()), 65),
            (Failure::Rejected("r".into()), 65),
            (Failure::RolledBack("r".into()), 1),
            (Failure::Unhealthy("u".into()), 1),
            (Failure::Config(s), 78),
            (ImdsError::Disabled.into(), 69),
            (
                ImdsError::Exhausted {
                    what: "x".into(),
                    last: "y".into(),
                    attempts: 2,
                    elapsed: d,
                }
                .into(),
                75,
            ),
            (
                SsmError::NotFound {
                    name: "n".into(),
                    region: "r".into(),
                    code: "c".into(),
                }
                .into(),
                69,
            ),
            (
                SsmError::Denied {
                    name: "n".into(),
                    region: "r".into(),
                    code: "c".into(),
                }
                .into(),
                69,
            ),
            (
                SsmError::Exhausted {
                    name: "n".into(),
                    region: "r".into(),
                    last: "l".into(),
                    attempts: 1,
                    elapsed: d,
                }
                .into(),
                75,
            ),
            (
                StepError::Missing {
                    step: "login",
                    reason: "r".into(),
                }
                .into(),
                69,
            ),
            (
                StepError::Failed {
                    step: "apply",
                    reason: "r".into(),
                }
                .into(),
                1,
            ),
            (
                StepError::TimedOut {
                    step: "apply",
                    reason: "r".into(),
                }
                .into(),
                75,
            ),
            (
                StepError::Exhausted {
                    step: "login",
                    last: "l".into(),
                    attempts: 3,
                    elapsed: d,
                }
                .into(),
                75,
            ),
            (
                StateError::Locked {
                    path: "/l".into(),
                    waited: d,
                }
                .into(),
                75,
            ),
            (
                StateError::Io {
                    path: "/l".into(),
                    reason: "r".into(),
                }
                .into(),
                74,
            ),
            (Failure::NotSwitched("x".into()), 1),
            (Failure::Scripts("x".into()), 1),
            (Failure::Reboot("x".into()), 1),
            (Failure::Interrupted("x".into()), 75),
        ];
        for (f, code) in cases {
            assert_eq!(f.exit_code(), code, "{f}");
            assert!(HELP.contains(&format!("  {code} ")), "{code} is documented");
        }
    }
}
