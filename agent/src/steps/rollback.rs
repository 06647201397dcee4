//! Putting the previous system back the way nixos-rebuild installs any
//! system (nixpkgs `pkgs/os-specific/linux/nixos-rebuild`: the profile is
//! set with `nix-env -p PROFILE --set PATH`, then the system's own
//! `PATH/bin/switch-to-configuration ACTION` activates it):
//! `nix-env --profile PROFILE --set PREV`, then
//! `PREV/bin/switch-to-configuration ACTION` (`switch` in place, `boot`
//! when the unhealthy system is the booted one). Its exit status is logged,
//! not trusted either way (a unit failing under PREV makes it non-zero,
//! and that is the gate's to judge); the links are verified after it.

use super::StepError;
use crate::config::Agent;
use crate::process::{self, Program, describe};
use crate::redact::Redactor;
use std::path::Path;

pub const STEP: &str = "rollback";

pub async fn rollback(
    agent: &Agent,
    redactor: &Redactor,
    previous: &Path,
    action: &'static str,
) -> Result<(), StepError> {
    let switch = previous.join("bin/switch-to-configuration");
    for p in [&agent.nix_env, &switch] {
        process::check_program(p).map_err(|e| StepError::from_process(STEP, e))?;
    }
    let set = Program::new(&agent.nix_env, STEP, agent.command_timeout)
        .args(["--profile".as_ref(), agent.system_profile.as_os_str()])
        .args(["--set".as_ref(), previous.as_os_str()])
        .system_path(previous);
    let out = process::run(&set, redactor)
        .await
        .map_err(|e| StepError::from_process(STEP, e))?;
    if !out.status.success() {
        return Err(StepError::Failed {
            step: STEP,
            reason: format!(
                "nix-env --set of the system profile failed ({})",
                describe(out.status)
            ),
        });
    }
    let activate = Program::new(&switch, STEP, agent.apply_timeout)
        .args([action])
        .system_path(previous);
    let out = process::run(&activate, redactor)
        .await
        .map_err(|e| StepError::from_process(STEP, e))?;
    if !out.status.success() && action == "boot" {
        // `boot` starts no unit: a failure is the boot loader's, and the
        // machine would boot the unhealthy system again.
        return Err(StepError::Failed {
            step: STEP,
            reason: format!(
                "switch-to-configuration boot of the previous system failed ({})",
                describe(out.status)
            ),
        });
    }
    if !out.status.success() {
        tracing::warn!(
            step = STEP,
            "switch-to-configuration {action} of the previous system ended with {} (units may have failed; the gate will say)",
            describe(out.status)
        );
    }
    Ok(())
}
