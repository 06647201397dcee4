//! The one way the agent runs a program: by absolute path, argv only (no
//! shell), in its own process group, with a timeout that kills the whole
//! group, and every output line passed on to the log tagged with its step.
//!
//! What a program inherits: the agent's environment, minus what belongs to
//! the agent alone ([`NOT_INHERITED`]), with a PATH that starts with the
//! running system's programs ([`search_path`]).

use crate::redact::Redactor;
use crate::stop::{self, Interrupted};
use crate::text::{bounded, escape_controls};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::time::{Instant, sleep_until, timeout};

/// Longer lines are cut: a program printing megabytes without a newline
/// must not grow the agent without bound.
const MAX_LINE: usize = 16 * 1024;
/// Kept beyond [`MAX_LINE`] until the line is redacted, then cut: a secret
/// (an SSM value is at most 8 KiB) straddling the cut is masked whole, not
/// shown up to the cut.
const REDACT_SLACK: usize = 8 * 1024;
const MAX_CAPTURE: usize = 1 << 20;
/// Between SIGTERM and SIGKILL, for a program to clean up.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long output may trail the exit of the main process (a daemonised
/// grandchild holding the pipe must not hang the run).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Never passed on: the unit's notify socket (only the agent speaks for
/// its unit: a script calling `systemd-notify --ready` must not end the
/// start-up early), socket activation and watchdog meant for the agent,
/// and dynamic-linker variables that would load code into every program
/// the agent runs as root.
pub const NOT_INHERITED: &[&str] = &[
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LD_AUDIT",
];

/// The PATH every program the agent runs gets: setuid wrappers and the
/// running system's programs first, then the agent's own PATH.
///
/// A NixOS unit's PATH is only coreutils, findutils, gnugrep, gnused and
/// systemd (nixpkgs `nixos/lib/systemd-lib.nix`, `stage2ServiceConfig`),
/// and `fh apply` refuses to run without `nix` on its PATH
/// (DeterminateSystems/fh `src/cli/cmd/mod.rs`, `nix_command`: "nix is not
/// installed or not on the PATH"); the system's `sw/bin` has it. The
/// NixOS module also puts `nix` on the unit's `path`, but a unit file used
/// without the module must work too.
pub fn search_path(current_system: &Path, inherited: Option<&std::ffi::OsStr>) -> OsString {
    let mut path = OsString::from("/run/wrappers/bin:");
    path.push(current_system.join("sw/bin"));
    if let Some(rest) = inherited.filter(|p| !p.is_empty()) {
        path.push(":");
        path.push(rest);
    }
    path
}

/// The first executable `name` in a PATH-like list of directories, as
/// `execvp` would find it.
pub fn find_in(path: &std::ffi::OsStr, name: &str) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|p| check_program(p).is_ok())
}

pub struct Program<'a> {
    pub path: &'a Path,
    pub args: Vec<OsString>,
    /// Tags every line in the log (`step=login`).
    pub step: &'static str,
    pub timeout: Duration,
    /// Keep stdout for the caller (and log it at debug level only).
    pub capture_stdout: bool,
    /// Also keep stderr's last lines, redacted and escaped, for a caller
    /// that explains a failure in its own words (`doctor`).
    pub capture_stderr: bool,
    pub env: Vec<(OsString, OsString)>,
    pub cwd: Option<&'a Path>,
}

impl<'a> Program<'a> {
    pub fn new(path: &'a Path, step: &'static str, timeout: Duration) -> Self {
        Self {
            path,
            args: vec![],
            step,
            timeout,
            capture_stdout: false,
            capture_stderr: false,
            env: vec![],
            cwd: None,
        }
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// PATH = [`search_path`] for the system at `current_system`.
    pub fn system_path(mut self, current_system: &Path) -> Self {
        let path = search_path(current_system, std::env::var_os("PATH").as_deref());
        self.env.retain(|(k, _)| k != "PATH");
        self.env.push(("PATH".into(), path));
        self
    }
}

pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    /// The last [`STDERR_TAIL`] lines, when asked for.
    pub stderr: Vec<String>,
}

/// How many of stderr's last lines a capture keeps: where programs put
/// the error that ended them.
pub const STDERR_TAIL: usize = 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProcessError {
    #[error("{} {reason}", path.display())]
    Missing { path: PathBuf, reason: String },
    #[error("{} could not be started: {reason}", path.display())]
    Spawn { path: PathBuf, reason: String },
    #[error("{} did not finish within {}s and was killed", path.display(), after.as_secs())]
    TimedOut { path: PathBuf, after: Duration },
    /// The run was asked to stop; the program got the signal and is gone.
    #[error("{}: {interrupted}", path.display())]
    Interrupted {
        path: PathBuf,
        interrupted: Interrupted,
    },
}

/// Process groups of the programs running now, for the last resort of a
/// run that does not wind down after a stop ([`kill_all`]).
static RUNNING: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// SIGKILL to every program's group still running: when a stopped run
/// did not wind down in time, nothing it started may outlive it.
pub fn kill_all() {
    for pgid in RUNNING.lock().map(|g| g.clone()).unwrap_or_default() {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

/// Keeps a child's group in [`RUNNING`] while it is alive.
struct Running(Option<i32>);

impl Running {
    fn new(pgid: Option<i32>) -> Self {
        if let (Some(p), Ok(mut g)) = (pgid, RUNNING.lock()) {
            g.push(p);
        }
        Self(pgid)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let (Some(p), Ok(mut g)) = (self.0, RUNNING.lock()) {
            g.retain(|x| *x != p);
        }
    }
}

/// Is `path` an executable file? Checked before anything runs, so a missing
/// `fh` fails the run before login rather than after.
pub fn check_program(path: &Path) -> Result<(), ProcessError> {
    let missing = |reason: &str| ProcessError::Missing {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if !path.is_absolute() {
        return Err(missing("is not an absolute path"));
    }
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(missing("does not exist")),
        Err(e) => Err(missing(&format!("cannot be inspected: {e}"))),
        Ok(m) if !m.is_file() => Err(missing("is not a file")),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Err(missing("is not executable")),
        Ok(_) => Ok(()),
    }
}

pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".into(),
    }
}

pub async fn run(p: &Program<'_>, redactor: &Redactor) -> Result<Output, ProcessError> {
    check_program(p.path)?;
    // Nothing new starts once the run is stopping.
    if let Some(signal) = stop::requested() {
        return Err(ProcessError::Interrupted {
            path: p.path.to_owned(),
            interrupted: Interrupted(signal),
        });
    }
    let mut cmd = tokio::process::Command::new(p.path);
    for k in NOT_INHERITED {
        cmd.env_remove(k);
    }
    cmd.args(&p.args)
        .envs(p.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = p.cwd {
        cmd.current_dir(dir);
    }
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
            ProcessError::Missing {
                path: p.path.to_owned(),
                reason: format!("cannot be executed: {e}"),
            }
        }
        _ => ProcessError::Spawn {
            path: p.path.to_owned(),
            reason: e.to_string(),
        },
    })?;
    let pid = child.id().map(|id| Pid::from_raw(id as i32));
    let _running = Running::new(pid.map(Pid::as_raw));
    let shown_pid = child.id().unwrap_or_default();
    tracing::debug!(step = p.step, program = %p.path.display(), pid = shown_pid, "started");

    let step = p.step;
    let capture = p.capture_stdout;
    let out = pump(
        child.stdout.take().expect("piped"),
        move |line, buf: &mut Vec<u8>| {
            let line = String::from_utf8_lossy(line);
            let line = redactor.apply(&line);
            // Logged with control characters escaped: a program's output
            // must not forge log lines (CR, newlines inside a line) or
            // drive the terminal (ESC) of whoever reads the log.
            let shown = escape_controls(&bounded(&line, MAX_LINE)).into_owned();
            if capture {
                if buf.len() + line.len() < MAX_CAPTURE {
                    buf.extend_from_slice(line.as_bytes());
                    buf.push(b'\n');
                }
                tracing::debug!(step, stream = "stdout", "{shown}");
            } else {
                tracing::info!(step, stream = "stdout", "{shown}");
            }
        },
    );
    let capture_err = p.capture_stderr;
    // Shared with the pump, which lives until the end of this function.
    let tail = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
    let tail_in = tail.clone();
    let err = pump(child.stderr.take().expect("piped"), move |line, _| {
        let line = String::from_utf8_lossy(line);
        let shown = escape_controls(&bounded(&redactor.apply(&line), MAX_LINE)).into_owned();
        tracing::info!(step, stream = "stderr", "{shown}");
        if capture_err {
            let mut tail = tail_in.lock().unwrap_or_else(|p| p.into_inner());
            if tail.len() == STDERR_TAIL {
                tail.pop_front();
            }
            tail.push_back(shown);
        }
    });
    let mut pumps = std::pin::pin!(async { tokio::join!(out, err) });
    let mut captured = None;
    let deadline = Instant::now() + p.timeout;
    let status = loop {
        tokio::select! {
            s = child.wait() => break s,
            (o, _) = &mut pumps, if captured.is_none() => captured = Some(o),
            _ = sleep_until(deadline) => {
                kill_group(pid, &mut child, Signal::SIGTERM).await;
                return Err(ProcessError::TimedOut { path: p.path.to_owned(), after: p.timeout });
            }
            signal = stop::wait() => {
                // Passed on to the program's whole group, which is waited
                // for (SIGKILL after a grace period): it must be gone
                // before the run records the stop and releases the lock.
                tracing::warn!(step = p.step, "passing {} on to {}", signal.as_str(), p.path.display());
                kill_group(pid, &mut child, signal).await;
                return Err(ProcessError::Interrupted { path: p.path.to_owned(), interrupted: Interrupted(signal) });
            }
        }
    };
    let status = status.map_err(|e| ProcessError::Spawn {
        path: p.path.to_owned(),
        reason: e.to_string(),
    })?;
    if captured.is_none() {
        captured = timeout(DRAIN_GRACE, &mut pumps).await.ok().map(|(o, _)| o);
    }
    tracing::debug!(step = p.step, program = %p.path.display(), status = %describe(status), "finished");
    let stderr = std::mem::take(&mut *tail.lock().unwrap_or_else(|p| p.into_inner())).into();
    Ok(Output {
        status,
        stdout: captured.unwrap_or_default(),
        stderr,
    })
}

/// `signal` to the group, SIGKILL after a grace period: `fh` spawns `nix`,
/// which must not live on after the agent gave up on it.
async fn kill_group(pid: Option<Pid>, child: &mut tokio::process::Child, signal: Signal) {
    let Some(pid) = pid else { return };
    let _ = killpg(pid, signal);
    if timeout(KILL_GRACE, child.wait()).await.is_err() {
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = child.wait().await;
    } else {
        // The leader exited; anything left in its group goes too.
        let _ = killpg(pid, Signal::SIGKILL);
    }
}

/// Reads lines (cut at [`MAX_LINE`] + [`REDACT_SLACK`]) and hands each to `on_line` along
/// with a buffer the caller may fill; returns that buffer at EOF.
async fn pump<R: AsyncRead + Unpin>(r: R, mut on_line: impl FnMut(&[u8], &mut Vec<u8>)) -> Vec<u8> {
    let mut reader = BufReader::new(r);
    let mut line = Vec::new();
    let mut buf = Vec::new();
    let mut truncated = false;
    while let Ok(chunk) = reader.fill_buf().await {
        if chunk.is_empty() {
            break;
        }
        let (take, end) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, Some(i + 1)),
            None => (chunk.len(), None),
        };
        let room = (MAX_LINE + REDACT_SLACK).saturating_sub(line.len());
        line.extend_from_slice(&chunk[..take.min(room)]);
        truncated |= take > room;
        let consumed = end.unwrap_or(chunk.len());
        reader.consume(consumed);
        if end.is_some() {
            emit(&mut line, &mut truncated, &mut buf, &mut on_line);
        }
    }
    if !line.is_empty() {
        emit(&mut line, &mut truncated, &mut buf, &mut on_line);
    }
    buf
}

fn emit(
    line: &mut Vec<u8>,
    truncated: &mut bool,
    buf: &mut Vec<u8>,
    on_line: &mut impl FnMut(&[u8], &mut Vec<u8>),
) {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    if *truncated {
        line.extend_from_slice(b" [line cut]");
    }
    on_line(line, buf);
    line.clear();
    *truncated = false;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by a child process: a file this process has open for
    /// writing can be inherited by a fork in another test's thread, and
    /// exec of it then fails with ETXTBSY until that fork execs.
    fn script(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("prog");
        let ok = std::process::Command::new("/bin/sh")
            .args(["-c", "printf '%s\\n' \"$1\" > \"$0\" && chmod 755 \"$0\""])
            .arg(&p)
            .arg(format!("#!/bin/sh\n{body}"))
            .status()
            .unwrap()
            .success();
        assert!(ok);
        p
    }

    #[tokio::test]
    async fn captures_stdout_and_status() {
        let d = tempfile::tempdir().unwrap();
        let p = script(d.path(), "echo \"$1\"; echo second; echo err >&2; exit 3");
        let mut prog = Program::new(&p, "test", Duration::from_secs(10)).args(["first arg"]);
        prog.capture_stdout = true;
        let out = run(&prog, &Redactor::default()).await.unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"first arg\nsecond\n");
    }

    #[tokio::test]
    async fn redacts_captured_output() {
        let d = tempfile::tempdir().unwrap();
        let p = script(d.path(), "echo resolving o/f/1#secret");
        let mut r = Redactor::default();
        r.add("o/f/1#secret", "<SecureString /p>");
        let mut prog = Program::new(&p, "test", Duration::from_secs(10));
        prog.capture_stdout = true;
        let out = run(&prog, &r).await.unwrap();
        assert_eq!(out.stdout, b"resolving <SecureString /p>\n");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("grandchild-alive");
        let p = script(
            d.path(),
            &format!("(sleep 3; touch {}) & sleep 60", marker.display()),
        );
        let prog = Program::new(&p, "test", Duration::from_millis(300));
        let start = std::time::Instant::now();
        let e = run(&prog, &Redactor::default()).await.err().unwrap();
        assert!(matches!(e, ProcessError::TimedOut { .. }), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!marker.exists(), "the grandchild survived the timeout");
    }

    #[tokio::test]
    async fn daemonised_grandchild_does_not_hang_the_run() {
        let d = tempfile::tempdir().unwrap();
        let p = script(d.path(), "sleep 30 & echo done");
        let prog = Program::new(&p, "test", Duration::from_secs(20));
        let start = std::time::Instant::now();
        let out = run(&prog, &Redactor::default()).await.unwrap();
        assert!(out.status.success());
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn missing_and_not_executable() {
        let d = tempfile::tempdir().unwrap();
        let e = check_program(&d.path().join("nope")).unwrap_err();
        assert!(e.to_string().ends_with("does not exist"), "{e}");
        let f = d.path().join("plain");
        std::fs::write(&f, "x").unwrap();
        assert!(
            check_program(&f)
                .unwrap_err()
                .to_string()
                .ends_with("is not executable")
        );
        assert!(check_program(Path::new("fh")).is_err());
        assert!(check_program(d.path()).is_err());
    }

    #[test]
    fn search_path_puts_the_system_first() {
        let p = search_path(
            Path::new("/run/current-system"),
            Some("/usr/bin:/bin".as_ref()),
        );
        assert_eq!(
            p,
            "/run/wrappers/bin:/run/current-system/sw/bin:/usr/bin:/bin"
        );
        assert_eq!(
            search_path(Path::new("/s"), Some("".as_ref())),
            "/run/wrappers/bin:/s/sw/bin"
        );
        assert_eq!(
            search_path(Path::new("/s"), None),
            "/run/wrappers/bin:/s/sw/bin"
        );
    }

    #[test]
    fn find_in_takes_the_first_executable() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("nix"), "not executable").unwrap();
        let found = script(&b, "true");
        std::fs::rename(&found, b.join("nix")).unwrap();
        let path = std::env::join_paths([&a, &b]).unwrap();
        assert_eq!(find_in(&path, "nix"), Some(b.join("nix")));
        assert_eq!(find_in(&path, "fh"), None);
    }

    #[tokio::test]
    async fn long_lines_are_cut() {
        let (mut w, r) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            w.write_all(&vec![b'a'; (MAX_LINE + REDACT_SLACK) * 3])
                .await
                .unwrap();
            w.write_all(b"\nshort\npartial").await.unwrap();
        });
        let lines = std::sync::Mutex::new(vec![]);
        pump(r, |l, _| lines.lock().unwrap().push(l.to_vec())).await;
        let lines = lines.into_inner().unwrap();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].ends_with(b" [line cut]") && lines[0].len() < MAX_LINE + REDACT_SLACK + 20
        );
        assert_eq!(lines[1], b"short");
        assert_eq!(lines[2], b"partial");
    }
}
