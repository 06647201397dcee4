//! What the agent remembers between runs, in `state-dir/state.json`:
//! written atomically (temp file, fsync, rename, fsync dir), root-only,
//! keyed by instance id so an image made from a running instance starts
//! fresh. The lock (`state-dir/lock`, flock) makes runs take turns and is
//! released by the kernel when a run dies. The directory and its files go
//! through [`SafeDir`]: no links followed, regular files only, bounded
//! reads.

use crate::plan::RebootAssessment;
use crate::safe_dir::{ReadError, SafeDir, SafeDirError};
use crate::settings::{Action, RebootPolicy};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub const FORMAT: u32 = 1;
const FILE: &str = "state.json";
const LOCK: &str = "lock";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Written before the work starts: seen by a later run, it means the
    /// run died (crash, power loss, SIGKILL).
    Running,
    Applied,
    Unchanged,
    NoTarget,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TargetRecord {
    /// The output ref, or `<SecureString NAME>`.
    pub flake: String,
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssm_parameter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssm_version: Option<i64>,
    #[serde(default)]
    pub secret: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RebootRecord {
    pub policy: RebootPolicy,
    pub needed: bool,
    pub reason: String,
    /// Set before a reboot is asked for (by the systemd integration), so
    /// the run after it does not ask again.
    #[serde(default)]
    pub requested: bool,
    /// The boot (the kernel's boot ID) in which the request was made. A
    /// stop that arrives while logind is being asked is, most of the time,
    /// the reboot itself, so the request stays on record; only a later
    /// boot proves it was carried out (see [`RebootRecord::honoured`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

impl RebootRecord {
    pub fn new(policy: RebootPolicy, a: RebootAssessment) -> Self {
        Self {
            policy,
            needed: a.needed,
            reason: a.reason,
            requested: false,
            boot_id: None,
        }
    }

    /// Whether the reboot asked for has happened, as far as this boot can
    /// tell: requested, and not in this very boot. A request made in the
    /// boot that is still running was not carried out (or not yet), so
    /// the run asks again instead of taking it as done. Without a boot ID
    /// on either side (a record from before the field, or an unreadable
    /// `boot-id`), the request is trusted as before.
    pub fn honoured(&self, this_boot: Option<&str>) -> bool {
        self.requested
            && match (self.boot_id.as_deref(), this_boot) {
                (Some(then), Some(now)) => then != now,
                _ => true,
            }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RunRecord {
    pub started: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot: Option<RebootRecord>,
    /// The health gate after the apply, when one ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthRecord>,
    /// Where the run's time went, phase by phase.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<crate::phases::Timing>,
    /// For the first run of a boot: how long after the machine's boot it
    /// finished (a first boot's boot-to-converged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_boot_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthState {
    /// Recorded before the gate starts: seen later, the gate never ended.
    Pending,
    /// Applied for the next boot (`boot`, or a `switch` that needs a
    /// reboot): judged by the first run in the system it boots into.
    AwaitingBoot,
    Healthy,
    /// Unhealthy and kept (`health.rollback = false`, or no previous
    /// system to go back to).
    Unhealthy,
    /// Unhealthy, rejected, and the rollback not finished (stopped,
    /// crashed or failed): the next run finishes it.
    RollingBack,
    RolledBack,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HealthRecord {
    pub state: HealthState,
    /// What was wrong, one entry each (empty when healthy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// The system that ran before the apply: where a rollback goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// Units already failed before the apply (not blamed on the target).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_before: Vec<String>,
    /// What the rollback did and how the previous system fared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked: Option<String>,
    /// The boot in which it was applied ([`HealthState::AwaitingBoot`]):
    /// only a run in a later boot judges it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_boot: Option<String>,
    /// Where the system under judgement is: judged and rolled back in
    /// place, or as the booted system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<crate::gate::Mode>,
    /// The boot in which the reboot back to the previous system was asked
    /// for: a later boot still on the rejected system does not ask again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot_boot: Option<String>,
}

/// A store path that was rolled back: no later run applies it again,
/// whoever names it, until `forget-rejected` clears it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Rejected {
    pub store_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flake: Option<String>,
    pub at: String,
    pub reason: String,
}

/// The oldest rejections are dropped past this: the state stays small.
pub const MAX_REJECTED: usize = 32;

impl RunRecord {
    pub fn start() -> Self {
        Self {
            started: now(),
            finished: None,
            outcome: Outcome::Running,
            message: None,
            target: None,
            action: None,
            store_path: None,
            reboot: None,
            health: None,
            phases: vec![],
            after_boot_ms: None,
        }
    }

    pub fn finish(&mut self, outcome: Outcome, message: impl Into<String>) {
        self.finished = Some(now());
        self.outcome = outcome;
        self.message = Some(message.into());
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ScriptRecord {
    pub label: String,
    pub size: usize,
    pub sha256: String,
    pub started: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    /// `exit status 0`, `killed by signal 9`, `timed out`, or absent when
    /// the run died while the script ran (it is not run again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    #[serde(default)]
    pub success: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct State {
    pub format: u32,
    pub instance_id: String,
    #[serde(default)]
    pub scripts: Vec<ScriptRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<RunRecord>,
    /// The last run that changed the system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied: Option<RunRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<Rejected>,
}

impl State {
    pub fn rejection(&self, store_path: &str) -> Option<&Rejected> {
        self.rejected.iter().find(|r| r.store_path == store_path)
    }

    /// Records a rejection (replacing an older one of the same path).
    pub fn reject(&mut self, r: Rejected) {
        self.rejected.retain(|x| x.store_path != r.store_path);
        self.rejected.push(r);
        let over = self.rejected.len().saturating_sub(MAX_REJECTED);
        self.rejected.drain(..over);
    }
}

impl State {
    pub fn fresh(instance_id: &str) -> Self {
        Self {
            format: FORMAT,
            instance_id: instance_id.to_owned(),
            scripts: vec![],
            last_run: None,
            last_applied: None,
            rejected: vec![],
        }
    }
}

pub fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {}: {reason}", path.display())]
    Io { path: PathBuf, reason: String },
    #[error("another run is in progress (the lock {} is held); gave up after {}s", path.display(), waited.as_secs())]
    Locked { path: PathBuf, waited: Duration },
    #[error("{reason} ({})", path.display())]
    Interrupted { path: PathBuf, reason: String },
}

fn io(path: &Path, what: &str, e: std::io::Error) -> StateError {
    StateError::Io {
        path: path.to_owned(),
        reason: format!("{what}: {e}"),
    }
}

/// How the previous state related to this run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Previous {
    None,
    SameInstance,
    /// The state was another instance's (an image made from a running
    /// instance): this instance starts fresh.
    OtherInstance(String),
    /// Unreadable, truncated or of another format: moved aside.
    MovedAside {
        to: PathBuf,
        reason: String,
    },
}

/// The state directory: opened (and checked, or repaired) once, every
/// file in it read and written through [`SafeDir`].
pub struct Store {
    dir: PathBuf,
    safe: Option<SafeDir>,
}

/// Held for the whole run; the kernel drops the flock if the run dies.
pub struct Lock {
    _file: File,
}

/// A state file larger than this is not ours (a run writes a few KiB).
const MAX_STATE: usize = 1 << 20;

impl Store {
    /// Opens the state directory, creating it (0700) if needed, repairing
    /// its mode and owner, refusing a link or a directory it cannot make
    /// its own.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let safe = SafeDir::create_or_repair(dir).map_err(|e| StateError::Io {
            path: dir.to_owned(),
            reason: match e {
                SafeDirError::Unusable { reason, .. } => reason,
            },
        })?;
        Ok(Self {
            dir: dir.to_owned(),
            safe: Some(safe),
        })
    }

    /// For readers (`status`, `plan`): never creates or changes anything.
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            safe: None,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// The state directory, for the run's other files (the history).
    pub fn safe_dir(&self) -> &SafeDir {
        self.safe()
    }

    fn safe(&self) -> &SafeDir {
        self.safe
            .as_ref()
            .expect("Store::open, not Store::at, for a run's writes")
    }

    /// `scripts/` in the state directory, held to the same rules.
    pub fn scripts_dir(&self) -> Result<SafeDir, StateError> {
        self.safe().subdir("scripts").map_err(|e| StateError::Io {
            path: self.dir.join("scripts"),
            reason: match e {
                SafeDirError::Unusable { reason, .. } => reason,
            },
        })
    }

    pub async fn lock(&self, wait: Duration) -> Result<Lock, StateError> {
        let path = self.dir.join(LOCK);
        let file = self.safe().lock_file(LOCK).map_err(|e| StateError::Io {
            path: path.clone(),
            reason: format!("the lock file {e}; remove it"),
        })?;
        let start = tokio::time::Instant::now();
        let mut told = false;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Lock { _file: file }),
                Err(fs::TryLockError::WouldBlock) => {}
                Err(fs::TryLockError::Error(e)) => return Err(io(&path, "cannot be locked", e)),
            }
            if start.elapsed() >= wait {
                return Err(StateError::Locked { path, waited: wait });
            }
            if !told {
                tracing::info!(
                    "another run is in progress; waiting up to {}s for it",
                    wait.as_secs()
                );
                told = true;
            }
            if let Err(i) =
                crate::stop::or_stop(tokio::time::sleep(Duration::from_millis(100))).await
            {
                return Err(StateError::Interrupted {
                    path,
                    reason: format!("{i} while waiting for the lock"),
                });
            }
        }
    }

    /// Reads the state file as it is, for `status`.
    pub fn read(&self) -> Result<Option<State>, StateError> {
        let path = self.path();
        let unusable = |reason: String| StateError::Io {
            path: path.clone(),
            reason,
        };
        let dir = match &self.safe {
            Some(d) => d,
            None => match SafeDir::existing(&self.dir) {
                Ok(Some(d)) => return Self::read_in(&d, &path),
                Ok(None) => return Ok(None),
                Err(SafeDirError::Unusable { reason, .. }) => return Err(unusable(reason)),
            },
        };
        Self::read_in(dir, &path)
    }

    fn read_in(dir: &SafeDir, path: &Path) -> Result<Option<State>, StateError> {
        let err = |reason: String| StateError::Io {
            path: path.to_owned(),
            reason,
        };
        match dir.read(FILE, MAX_STATE) {
            Ok(Some(bytes)) => parse(&bytes).map(Some).map_err(err),
            Ok(None) => Ok(None),
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// This instance's state; anything unusable is set aside, never fatal.
    pub fn load(&self, instance_id: &str) -> Result<(State, Previous), StateError> {
        let bytes = match self.safe().read(FILE, MAX_STATE) {
            Ok(Some(b)) => b,
            Ok(None) => return Ok((State::fresh(instance_id), Previous::None)),
            // An I/O error may heal (EIO, ENOMEM): setting the file aside
            // would forget which scripts ran. What is wrong with the file
            // itself (a link, a FIFO, too large, another user's) is set
            // aside.
            Err(ReadError::Io(e)) => {
                return Err(StateError::Io {
                    path: self.path(),
                    reason: format!("cannot be read: {e}"),
                });
            }
            Err(e) => return self.set_aside(instance_id, e.to_string()),
        };
        match parse(&bytes) {
            Ok(s) if s.instance_id == instance_id => Ok((s, Previous::SameInstance)),
            Ok(s) => Ok((
                State::fresh(instance_id),
                Previous::OtherInstance(s.instance_id),
            )),
            Err(reason) => self.set_aside(instance_id, reason),
        }
    }

    /// Moves the state file aside, never over an earlier one.
    fn set_aside(
        &self,
        instance_id: &str,
        reason: String,
    ) -> Result<(State, Previous), StateError> {
        let from = self.path();
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let to = self
            .safe()
            .set_aside(FILE, &format!("unusable-{stamp}"))
            .map_err(|e| io(&from, "cannot be moved aside", e))?;
        Ok((
            State::fresh(instance_id),
            Previous::MovedAside { to, reason },
        ))
    }

    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let path = self.path();
        let mut bytes = serde_json::to_vec_pretty(state).expect("state serialises");
        bytes.push(b'\n');
        self.safe()
            .write_atomic(FILE, &format!(".{FILE}.tmp"), &bytes)
            .map_err(|e| io(&path, "cannot be written", e))
    }
}

fn parse(bytes: &[u8]) -> Result<State, String> {
    #[derive(Deserialize)]
    struct Probe {
        format: u32,
    }
    let probe: Probe =
        serde_json::from_slice(bytes).map_err(|e| format!("is not a state file: {e}"))?;
    if probe.format != FORMAT {
        return Err(format!(
            "has format {} (this agent writes {FORMAT})",
            probe.format
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| format!("is damaged: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_reboot_request_is_honoured_only_in_a_later_boot() {
        let r = |requested, boot_id: Option<&str>| RebootRecord {
            policy: RebootPolicy::IfNeeded,
            needed: true,
            reason: "kernel".into(),
            requested,
            boot_id: boot_id.map(str::to_owned),
        };
        assert!(!r(false, None).honoured(Some("a")));
        assert!(!r(false, Some("a")).honoured(Some("b")));
        assert!(!r(true, Some("a")).honoured(Some("a")), "same boot");
        assert!(r(true, Some("a")).honoured(Some("b")), "a later boot");
        assert!(r(true, None).honoured(Some("a")), "a record from before");
        assert!(r(true, Some("a")).honoured(None), "unreadable boot ID");
    }

    #[test]
    fn round_trip_with_modes() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state");
        let store = Store::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let mut s = State::fresh("i-1");
        let mut run = RunRecord::start();
        run.finish(Outcome::Applied, "applied");
        s.last_run = Some(run);
        store.save(&s).unwrap();
        assert_eq!(mode(&store.path()), 0o600);
        assert_eq!(
            store.load("i-1").unwrap(),
            (s.clone(), Previous::SameInstance)
        );
        assert_eq!(store.read().unwrap(), Some(s));
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("state.json")],
            "no temp files left"
        );
    }

    #[test]
    fn other_instance_starts_fresh() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        store.save(&State::fresh("i-old")).unwrap();
        let (s, prev) = store.load("i-new").unwrap();
        assert_eq!(s, State::fresh("i-new"));
        assert_eq!(prev, Previous::OtherInstance("i-old".into()));
    }

    #[test]
    fn unusable_state_is_moved_aside() {
        for bad in [
            &b"{\"format\": 1, \"instance-id\": "[..],
            b"",
            b"\xff",
            b"{\"format\": 99, \"instance-id\": \"i-1\"}",
        ] {
            let d = tempfile::tempdir().unwrap();
            let store = Store::open(d.path()).unwrap();
            fs::write(store.path(), bad).unwrap();
            let (s, prev) = store.load("i-1").unwrap();
            assert_eq!(s, State::fresh("i-1"));
            let Previous::MovedAside { to, .. } = prev else {
                panic!("{prev:?}")
            };
            assert_eq!(fs::read(to).unwrap(), bad);
            assert!(!store.path().exists());
        }
    }

    #[tokio::test]
    async fn lock_is_exclusive_and_bounded() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let held = store.lock(Duration::from_secs(1)).await.unwrap();
        let start = std::time::Instant::now();
        let e = store.lock(Duration::from_millis(300)).await.err().unwrap();
        assert!(matches!(e, StateError::Locked { .. }), "{e}");
        assert!(start.elapsed() >= Duration::from_millis(300));
        drop(held);
        store.lock(Duration::from_millis(300)).await.unwrap();
    }
}
