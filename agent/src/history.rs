//! Every run's outcome with its exit code, bounded, in `runs.json` next to
//! the state file: also runs that ended before the instance was known
//! (IMDS unreachable, bad user data), which the per-instance state cannot
//! hold. `status` shows the newest as the overall result; `status --wait`
//! waits for the run of this boot to end. Written while the run holds the
//! lock, atomically; a history that cannot be read is started afresh (it
//! is a report, not a decision).

use crate::safe_dir::SafeDir;
use serde::{Deserialize, Serialize};

const FILE: &str = "runs.json";
/// Runs kept, newest last.
pub const KEEP: usize = 20;
const MAX_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Entry {
    pub started: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    /// `running` until it ends (seen later: the run died), then
    /// `applied`, `nothing to do` or `failed`.
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The kernel's boot ID: `status --wait` waits for this boot's run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// `systemd` when a unit ran it (systemd sets `INVOCATION_ID`), else
    /// `manual`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

pub fn read(dir: &SafeDir) -> Vec<Entry> {
    match dir.read(FILE, MAX_BYTES) {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_default(),
        _ => vec![],
    }
}

fn write(dir: &SafeDir, runs: &[Entry]) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(runs).expect("history serialises");
    bytes.push(b'\n');
    // Not fsynced: the history is what `status` shows, the state file
    // (fsynced) is what runs decide by; a power loss that takes the last
    // entry loses nothing a run needs, and a file it leaves unreadable is
    // read as empty. Two fsyncs fewer on each side of every run.
    dir.write_atomic_unsynced(FILE, &format!(".{FILE}.tmp"), &bytes)
}

/// Records a run as started; best effort (a history that cannot be
/// written must not stop the run). Also says whether it is the first run
/// of its boot (no entry before it carries the boot's ID), read from the
/// same read of the file.
pub fn start(dir: &SafeDir, boot_id: Option<String>) -> (Entry, bool) {
    let entry = Entry {
        started: crate::state::now(),
        finished: None,
        result: "running".into(),
        exit_code: None,
        message: None,
        boot_id,
        by: Some(
            if std::env::var_os("INVOCATION_ID").is_some() {
                "systemd"
            } else {
                "manual"
            }
            .into(),
        ),
    };
    let mut runs = read(dir);
    let first_of_boot = entry.boot_id.is_some() && !runs.iter().any(|e| e.boot_id == entry.boot_id);
    runs.push(entry.clone());
    let over = runs.len().saturating_sub(KEEP);
    runs.drain(..over);
    if let Err(e) = write(dir, &runs) {
        tracing::warn!("the run history cannot be written: {e}");
    }
    (entry, first_of_boot)
}

/// Records how the run `entry` ended.
pub fn finish(dir: &SafeDir, entry: &Entry, result: &str, exit_code: u8, message: &str) {
    let mut runs = read(dir);
    let done = Entry {
        finished: Some(crate::state::now()),
        result: result.into(),
        exit_code: Some(exit_code),
        message: Some(crate::text::shown(message, 2000)),
        ..entry.clone()
    };
    match runs
        .iter_mut()
        .rev()
        .find(|r| r.started == entry.started && r.result == "running")
    {
        Some(r) => *r = done,
        None => runs.push(done),
    }
    let over = runs.len().saturating_sub(KEEP);
    runs.drain(..over);
    if let Err(e) = write(dir, &runs) {
        tracing::warn!("the run history cannot be written: {e}");
    }
}
