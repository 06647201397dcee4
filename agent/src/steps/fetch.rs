//! `fh fetch REF LINK`: downloads the closure of what REF resolves to from
//! FlakeHub Cache, and roots it against the garbage collector at LINK,
//! without touching the system. It is what Determinate provides for this
//! (DeterminateSystems/fh `src/cli/cmd/fetch.rs`): fh resolves REF with a
//! scoped token, then runs `nix copy --from https://cache.flakehub.com
//! STORE_PATH --out-link LINK` with that token in a netrc
//! (`copy_closure_with_gc_root` in `src/cli/cmd/mod.rs`), the same copy
//! `fh apply` starts with, so a later `fh apply nixos REF` finds every
//! path valid and only switches.
//!
//! Not retried: a fetch only saves time. When it fails, `fh apply`
//! downloads what is missing, as it always did.

use super::StepError;
use crate::config::Agent;
use crate::process::{self, Program, describe};
use crate::redact::Redactor;
use crate::settings::OutputRef;
use std::path::{Path, PathBuf};

pub const STEP: &str = "fetch";

/// The name of a run's link (a GC root) in the state directory.
pub const LINK: &str = "fetched";
/// The boot's fetch's link (`nixos-ami-agent fetch`).
pub const BOOT_LINK: &str = "fetched-at-boot";

/// Runs `fh fetch`; the store path LINK then points at (what fh resolved
/// REF to when it fetched, which may differ from what the caller
/// resolved if the target changed in between).
pub async fn fetch(
    agent: &Agent,
    redactor: &Redactor,
    flake: &OutputRef,
    link: &Path,
) -> Result<PathBuf, StepError> {
    // Like `fh apply`, `fh fetch` runs `nix` from its PATH.
    let prog = Program::new(&agent.fh, STEP, agent.apply_timeout)
        .args(["fetch".as_ref(), flake.as_str().as_ref(), link.as_os_str()])
        .system_path(&agent.current_system);
    let out = process::run(&prog, redactor)
        .await
        .map_err(|e| StepError::from_process(STEP, e))?;
    if !out.status.success() {
        return Err(StepError::Failed {
            step: STEP,
            reason: format!("fh fetch failed ({})", describe(out.status)),
        });
    }
    fetched(link).ok_or_else(|| StepError::Failed {
        step: STEP,
        reason: format!(
            "fh fetch succeeded but left no link to a store path at {}",
            link.display()
        ),
    })
}

/// The store path a fetch link points at, if it is there: Nix writes the
/// link only once the whole closure is valid.
pub fn fetched(link: &Path) -> Option<PathBuf> {
    let to = std::fs::read_link(link).ok()?;
    (to.is_absolute() && to.exists()).then_some(to)
}

/// Drops the link (the GC root): once the target is the system, its
/// profile roots it; a fetch of a target that is no longer wanted must not
/// keep its closure from the collector.
pub fn release(link: &Path) {
    match std::fs::symlink_metadata(link) {
        Ok(m) if m.file_type().is_symlink() => {
            if let Err(e) = std::fs::remove_file(link) {
                tracing::warn!(step = STEP, "cannot remove {}: {e}", link.display());
            }
        }
        _ => {}
    }
}
