//! The run's login and resolve, taken once each: doctor wants the first
//! failure's cause, not a retry loop's last word.

use super::causes::{self, Ended};
use super::{Check, Status, check};
use crate::config::Agent;
use crate::plan::{self, Decision};
use crate::process::{self, Output, ProcessError, Program, describe};
use crate::redact::Redactor;
use crate::settings::{Action, OutputRef};
use crate::state::Store;
use crate::steps::resolve::parse;

async fn once(
    path: &std::path::Path,
    step: &'static str,
    args: &[&str],
    agent: &Agent,
    redactor: &Redactor,
) -> Result<Output, ProcessError> {
    let mut prog = Program::new(path, step, agent.command_timeout)
        .args(args.iter().copied())
        .system_path(&agent.current_system);
    prog.capture_stdout = true;
    prog.capture_stderr = true;
    process::run(&prog, redactor).await
}

pub async fn login(agent: &Agent, redactor: &Redactor, principal: Option<&str>) -> Check {
    const NAME: &str = "FlakeHub login";
    let cause = match once(
        &agent.determinate_nixd,
        "login",
        &["login", "aws"],
        agent,
        redactor,
    )
    .await
    {
        Ok(out) if out.status.success() => {
            return check(
                NAME,
                Status::Pass,
                "determinate-nixd login aws logged in with the instance role",
                None,
            );
        }
        Ok(out) => causes::login(
            Ended::Failed {
                status: &describe(out.status),
                stderr: &out.stderr,
            },
            principal,
        ),
        Err(ProcessError::TimedOut { after, .. }) => causes::login(
            Ended::TimedOut {
                after_secs: after.as_secs(),
            },
            principal,
        ),
        Err(e) => return check(NAME, Status::Fail, e.to_string(), None),
    };
    check(NAME, Status::Fail, cause.detail, Some(&cause.fix))
}

/// `fh resolve` of the target, and what a run would then do with it.
pub async fn resolve(
    agent: &Agent,
    redactor: &Redactor,
    flake: &OutputRef,
    shown: &str,
    action: Action,
    logged_in: bool,
) -> Check {
    const NAME: &str = "target resolves";
    let out = once(
        &agent.fh,
        "resolve",
        &["resolve", "--json", flake.as_str()],
        agent,
        redactor,
    )
    .await;
    let cause = match out {
        Ok(out) if out.status.success() => {
            return match parse(&out.stdout) {
                Ok(path) => resolved(agent, shown, &path, action),
                Err(reason) => check(
                    NAME,
                    Status::Fail,
                    reason,
                    Some("the image's fh does not print what this agent reads: update the image"),
                ),
            };
        }
        Ok(out) => causes::resolve(
            Ended::Failed {
                status: &describe(out.status),
                stderr: &out.stderr,
            },
            shown,
            logged_in,
        ),
        Err(ProcessError::TimedOut { after, .. }) => causes::resolve(
            Ended::TimedOut {
                after_secs: after.as_secs(),
            },
            shown,
            logged_in,
        ),
        Err(e) => return check(NAME, Status::Fail, e.to_string(), None),
    };
    check(NAME, Status::Fail, cause.detail, Some(&cause.fix))
}

/// Resolved: whether a run would apply it, or refuse it as rolled back.
fn resolved(agent: &Agent, shown: &str, path: &std::path::Path, action: Action) -> Check {
    const NAME: &str = "target resolves";
    let path = crate::system::canonical(path).unwrap_or_else(|| path.to_owned());
    let is = format!("{shown} resolves to {}", path.display());
    if let Some(r) = Store::at(&agent.state_dir)
        .read()
        .ok()
        .flatten()
        .and_then(|s| s.rejection(&path.to_string_lossy()).cloned())
    {
        return check(
            NAME,
            Status::Warn,
            format!(
                "{is}, which was rolled back at {} ({}): a run refuses it",
                r.at,
                crate::text::shown(&r.reason, 300)
            ),
            Some(&format!(
                "publish a fixed release, or run `nixos-ami-agent forget-rejected {}` to allow it again",
                path.display()
            )),
        );
    }
    let then = match plan::decide(action, &path, &crate::system::view(agent)) {
        Decision::UpToDate { .. } => "this machine already runs it".to_owned(),
        Decision::Apply => format!("a run would apply it ({})", action.as_str()),
    };
    check(NAME, Status::Pass, format!("{is}; {then}"), None)
}
