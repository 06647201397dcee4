//! User-data `#!` scripts, run as nixpkgs' amazon-init ran them (the
//! documented `determinate-nixd login aws; fh apply nixos REF` keeps
//! working), but once per instance, like cloud-init's per-instance scripts.

use crate::process::{self, ProcessError, Program, describe};
use crate::redact::Redactor;
use crate::safe_dir::SafeDir;
use crate::userdata::Script;
use std::path::Path;
use std::time::Duration;

pub const STEP: &str = "script";

pub struct ScriptResult {
    pub success: bool,
    /// `exit status 0`, `killed by signal 9`, `timed out after 3600s`, ...
    pub result: String,
}

/// Writes the script into `dir` (the state directory's `scripts/`, checked
/// to be root's own and 0700, so nobody else can swap the file between
/// the write and the exec; the file is created exclusively, never through
/// a link) and executes it directly: the kernel reads its `#!` line, no
/// shell of ours is involved. Its PATH
/// starts with setuid wrappers and the system's programs, which a script
/// written for amazon-init expects (`fh`, `determinate-nixd`, `nix`).
pub async fn run(
    script: &Script,
    index: usize,
    dir: &SafeDir,
    timeout: Duration,
    current_system: &Path,
) -> ScriptResult {
    let failed = |result: String| ScriptResult {
        success: false,
        result,
    };
    let name = format!("user-data-script-{index}");
    let file = match dir.create_new(&name, 0o700, &script.body) {
        Ok(f) => f,
        Err(e) => {
            return failed(format!(
                "could not be written to {}: {e}",
                dir.path().join(&name).display()
            ));
        }
    };
    let mut prog = Program::new(&file, STEP, timeout).system_path(current_system);
    prog.cwd = Some(dir.path());
    match process::run(&prog, &Redactor::default()).await {
        Ok(out) => ScriptResult {
            success: out.status.success(),
            result: describe(out.status),
        },
        Err(ProcessError::TimedOut { after, .. }) => failed(format!(
            "timed out after {}s and was killed",
            after.as_secs()
        )),
        Err(e) => failed(e.to_string()),
    }
}
