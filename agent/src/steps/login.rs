//! `determinate-nixd login aws`: keyless FlakeHub login with the instance
//! role. Runs on every run that resolves (tokens expire; it is cheap), and
//! is retried: early in boot the role's credentials or the network may not
//! be there yet.

use super::{StepError, classify};
use crate::config::Agent;
use crate::process::{self, Program, describe};
use crate::redact::Redactor;
use crate::retry::{self, Attempt, Backoff};

pub const STEP: &str = "login";

pub async fn login(agent: &Agent, backoff: &Backoff, redactor: &Redactor) -> Result<(), StepError> {
    let r = retry::retry(backoff, "FlakeHub login", |t| async move {
        let timeout = agent
            .command_timeout
            .min(t.remaining().max(std::time::Duration::from_secs(1)));
        let prog = Program::new(&agent.determinate_nixd, STEP, timeout)
            .args(["login", "aws"])
            .system_path(&agent.current_system);
        let out = process::run(&prog, redactor)
            .await
            .map_err(|e| classify(STEP, e))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(Attempt::retry(StepError::Failed {
                step: STEP,
                reason: format!(
                    "determinate-nixd login aws failed ({})",
                    describe(out.status)
                ),
            }))
        }
    })
    .await;
    r.map_err(|e| StepError::from_retry(STEP, e))
}
