//! `fh resolve --json REF`: the store path the target means right now, so
//! the run can tell whether there is anything to do before downloading.

use super::{StepError, classify};
use crate::config::Agent;
use crate::process::{self, Program, describe};
use crate::redact::Redactor;
use crate::retry::{self, Attempt, Backoff};
use crate::settings::OutputRef;
use serde::Deserialize;
use std::path::PathBuf;

pub const STEP: &str = "resolve";

#[derive(Deserialize)]
struct Resolved {
    store_path: String,
}

pub async fn resolve(
    agent: &Agent,
    backoff: &Backoff,
    redactor: &Redactor,
    flake: &OutputRef,
) -> Result<PathBuf, StepError> {
    let r = retry::retry(backoff, "fh resolve", |t| async move {
        let timeout = agent
            .command_timeout
            .min(t.remaining().max(std::time::Duration::from_secs(1)));
        let mut prog = Program::new(&agent.fh, STEP, timeout)
            .args(["resolve", "--json", flake.as_str()])
            .system_path(&agent.current_system);
        prog.capture_stdout = true;
        let out = process::run(&prog, redactor)
            .await
            .map_err(|e| classify(STEP, e))?;
        if !out.status.success() {
            return Err(Attempt::retry(StepError::Failed {
                step: STEP,
                reason: format!("fh resolve failed ({})", describe(out.status)),
            }));
        }
        parse(&out.stdout).map_err(|reason| Attempt::Fail(StepError::Failed { step: STEP, reason }))
    })
    .await;
    r.map_err(|e| StepError::from_retry(STEP, e))
}

/// fh prints `{"attribute_path": ..., "store_path": ...}`. Anything else
/// means an incompatible fh: permanent.
pub(crate) fn parse(stdout: &[u8]) -> Result<PathBuf, String> {
    let r: Resolved = serde_json::from_slice(stdout)
        .map_err(|e| format!("fh resolve --json printed no usable JSON with a store_path ({e})"))?;
    let p = r.store_path.trim();
    if !p.starts_with('/') {
        return Err("fh resolve --json printed a store_path that is not an absolute path".into());
    }
    // What a Nix store path may hold (and nothing that could reorder or
    // hide text in a log line).
    if p.len() > 4096
        || !p
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/+._?=-".contains(c))
    {
        return Err(
            "fh resolve --json printed a store_path with characters no store path holds".into(),
        );
    }
    Ok(PathBuf::from(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fh_json() {
        let out = br#"{"attribute_path":"nixosConfigurations.web","store_path":"/nix/store/abc-nixos-system-web"}"#;
        assert_eq!(
            parse(out).unwrap(),
            PathBuf::from("/nix/store/abc-nixos-system-web")
        );
        assert!(parse(b"not json").is_err());
        assert!(parse(br#"{"store_path":"relative"}"#).is_err());
        assert!(parse(br#"{"attribute_path":"x"}"#).is_err());
    }
}
