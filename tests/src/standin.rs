//! Stand-ins for `fh`, `determinate-nixd` and `nix`. They record their
//! argv (and PATH) in `$STANDIN_DIR/calls.jsonl` and behave as
//! `$STANDIN_DIR/standin.json` says: succeed, fail (some times or always),
//! hang, or (fh apply) "succeed" without switching, as real fh does when
//! switch-to-configuration fails.
//!
//! They are as strict as the programs they stand for: like the real fh
//! (DeterminateSystems/fh `src/cli/cmd/mod.rs`, `nix_command`), the fh
//! stand-in refuses `apply` with "nix is not installed or not on the PATH"
//! when no `nix` can be started from its PATH, and it sets the system
//! profile through that `nix` (`nix build --profile`), as fh does, so a
//! PATH without `nix` fails here exactly as it would on an instance.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const DIR_ENV: &str = "STANDIN_DIR";
/// Where the stand-ins keep their files when `STANDIN_DIR` is unset (in
/// the boot-test containers, where the unit's environment is the real one).
pub const DEFAULT_DIR: &str = "/var/lib/standin";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Ok,
    Fail,
    Hang,
    /// fh apply only: exit 0 without touching the system links.
    NoSwitch,
    /// fh resolve only: print something that is not fh's JSON.
    BadJson,
    /// SIGKILL the agent (the stand-in's parent): during login, or, for fh
    /// apply, right after switching, before the agent can record it.
    KillAgent,
    /// Hang, ignoring SIGTERM (only SIGKILL ends it).
    HangIgnoringTerm,
}

/// How FlakeHub answers `fh resolve`, told the way fh tells it
/// (DeterminateSystems/fh `FlakeHubClient::resolve` in
/// `src/cli/cmd/mod.rs`, messages from `src/cli/error.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlakeHub {
    /// 401.
    Unauthorized,
    /// 403: fh has no message of its own for it.
    Forbidden,
    /// The request could not be sent (DNS, connect).
    Unreachable,
    /// 200 without a store path: a release published without its output
    /// paths (fh fails to decode the reply).
    NoStorePath,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct Behaviour {
    pub login: Mode,
    /// Fail this many times first, then behave as `login`.
    pub login_fail_times: u32,
    pub resolve: Mode,
    pub resolve_fail_times: u32,
    /// FlakeHub's answer to every resolve, when not the store path.
    pub flakehub: Option<FlakeHub>,
    /// The flakes are private: resolve is refused (401) unless a login
    /// wrote the token fh sends (`$STANDIN_DIR/token`, standing for
    /// `/nix/var/determinate/token`).
    pub private: bool,
    pub apply: Mode,
    pub apply_fail_times: u32,
    /// `fh fetch`: `fail` fails before anything is copied, `hang` hangs
    /// (ignoring nothing; a stop ends it).
    pub fetch: Mode,
    pub fetch_fail_times: u32,
    /// The first this many `fh fetch` calls hang before copying anything
    /// (a FlakeHub that never answers), then `fetch` applies.
    pub fetch_hang_times: u32,
    /// `fh fetch` and `fh apply` resolve every reference to this store
    /// path (a release published after the agent's own `fh resolve`);
    /// so does `fh resolve`, after this many calls, when not 0.
    pub moved_to: Option<PathBuf>,
    pub resolve_moves_after: u32,
    /// How long the `nix` stand-in takes to download a store path that is
    /// not valid yet (`nix copy`, or `nix build` of a store path). A
    /// download holds a lock on the path, as the Nix daemon does
    /// (`PathLocks`): a second one waits for it, then finds the path valid.
    pub download_ms: u64,
    /// Store paths (their directory names) valid from the start, as the
    /// booted system is; any other is downloaded once, then valid.
    pub valid: Vec<String>,
    /// Output ref → store path `fh resolve` prints.
    pub store_paths: HashMap<String, PathBuf>,
    pub current_system: PathBuf,
    pub system_profile: PathBuf,
    /// Written verbatim to stderr by `fh apply` (a progress line with a
    /// CR, an escape sequence, a fake log line).
    pub apply_stderr: Option<String>,
    /// Per system (its store directory's name): units and their
    /// `ActiveState` while that system runs, as the systemd double
    /// reports them. A unit not listed is active if named, else absent.
    pub units: HashMap<String, HashMap<String, String>>,
    /// The systemd double answers `ListJobs` with a running job this many
    /// times before the queue is empty (a switch still restarting units).
    pub busy_polls: u32,
    /// The systemd double's queue also holds the caller's own start job
    /// (running) and `multi-user.target` waiting for it, as during the
    /// boot that runs the agent's boot unit.
    pub booting: bool,
    /// The queue also holds a running start job of the agent's other unit
    /// (a run waiting for this one's lock).
    pub sibling_waiting: bool,
    /// `switch-to-configuration switch` of this system (by store directory
    /// name) hangs until it is signalled, or fails without switching.
    pub switch_hang: Option<String>,
    pub switch_fail: Option<String>,
    /// Under a real systemd (the boot-test containers): the directory
    /// where `switch-to-configuration` puts a system's `units/*`, starting
    /// them and stopping and removing the previous system's, as the real
    /// one does with the units of `etc/systemd/system`.
    pub unit_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    pub prog: String,
    pub argv: Vec<String>,
    /// The caller's `PATH`, to prove what the agent hands its children.
    #[serde(default)]
    pub path: Option<String>,
    /// Names of the environment variables the program got.
    #[serde(default)]
    pub env: Vec<String>,
    /// The systemd unit the program ran in (from its cgroup), if any.
    #[serde(default)]
    pub unit: Option<String>,
}

/// One download by the `nix` stand-in (`downloads.jsonl`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Download {
    /// The store path's directory name.
    pub path: String,
    pub unit: Option<String>,
    /// Unix time in milliseconds.
    pub started_ms: u64,
    pub finished_ms: u64,
}

/// Every download the `nix` stand-in made, in order of their ends.
pub fn downloads(dir: &Path) -> Vec<Download> {
    std::fs::read_to_string(dir.join("downloads.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("download line"))
        .collect()
}

/// The unit this process runs in: the last `.service` in its cgroup path
/// (cgroup v2: `0::/system.slice/x.service`).
fn own_unit() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .filter_map(|l| l.rsplit_once(':').map(|(_, p)| p))
        .flat_map(|p| p.split('/'))
        .rfind(|c| c.ends_with(".service"))
        .map(str::to_owned)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn read_behaviour(dir: &Path) -> Behaviour {
    let text = std::fs::read_to_string(dir.join("standin.json")).unwrap_or_else(|_| "{}".into());
    serde_json::from_str(&text).expect("standin.json")
}

pub fn write_behaviour(dir: &Path, b: &Behaviour) {
    std::fs::write(
        dir.join("standin.json"),
        serde_json::to_string_pretty(b).unwrap(),
    )
    .unwrap();
}

pub fn calls(dir: &Path) -> Vec<Call> {
    std::fs::read_to_string(dir.join("calls.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("call line"))
        .collect()
}

/// Every call of `fh` and `determinate-nixd` (the programs the agent
/// runs) as `prog arg arg`.
pub fn call_lines(dir: &Path) -> Vec<String> {
    lines(dir, |p| !is_nix(p) && p != SWITCH)
}

/// Every `switch-to-configuration` (by fh or by the agent's rollback), as
/// `SYSTEM ACTION`, SYSTEM the store directory's name.
pub fn switch_lines(dir: &Path) -> Vec<String> {
    lines(dir, |p| p == SWITCH)
}

const SWITCH: &str = "switch-to-configuration";

/// Every call of the `nix` stand-in (by fh, or by the agent's rollback).
pub fn nix_call_lines(dir: &Path) -> Vec<String> {
    lines(dir, is_nix)
}

fn is_nix(prog: &str) -> bool {
    matches!(prog, "nix" | "nix-env")
}

fn lines(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<String> {
    calls(dir)
        .iter()
        .filter(|c| keep(&c.prog))
        .map(|c| format!("{} {}", c.prog, c.argv.join(" ")))
        .collect()
}

/// Appends one JSON record to `dir/file` with one write(2): O_APPEND
/// keeps it whole while the stand-ins of two units (the boot's fetch, a
/// run) append at once (writeln! would write the newline separately).
fn append(dir: &Path, file: &str, record: &impl Serialize) {
    use std::io::Write;
    let line = serde_json::to_string(record).unwrap();
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(file))
        .unwrap()
        .write_all(format!("{line}\n").as_bytes())
        .unwrap();
}

fn record(dir: &Path, prog: &str, argv: &[String]) {
    let mut env: Vec<String> = std::env::vars_os()
        .map(|(k, _)| k.to_string_lossy().into_owned())
        .collect();
    env.sort();
    append(
        dir,
        "calls.jsonl",
        &Call {
            prog: prog.into(),
            argv: argv.to_vec(),
            path: std::env::var("PATH").ok(),
            env,
            unit: own_unit(),
        },
    );
}

/// Counts calls per key across processes, for "fail N times".
fn bump(dir: &Path, key: &str) -> u32 {
    let p = dir.join(format!("count-{key}"));
    let n = std::fs::read_to_string(&p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
        + 1;
    std::fs::write(&p, n.to_string()).unwrap();
    n
}

/// Hangs like a stuck download, but not past the agent: an orphaned
/// stand-in (its agent was SIGKILLed) exits instead of lingering.
fn kill_agent() {
    let agent = std::os::unix::process::parent_id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &agent])
        .status();
}

fn hang_ignoring_term() -> ! {
    // SAFETY: setting a signal's disposition to ignore, single-threaded.
    unsafe {
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
    hang()
}

fn hang() -> ! {
    let parent = std::os::unix::process::parent_id();
    for _ in 0..36_000 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if std::os::unix::process::parent_id() != parent {
            std::process::exit(98);
        }
    }
    std::process::exit(99)
}

/// Replaces a symlink atomically, as nix-env --set and activation do.
fn point(link: &Path, to: &Path) {
    // Per process, as Nix's own temporary links: two copies creating the
    // same link at once must not trip over each other.
    let tmp = link.with_extension(format!("standin-tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(to, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

fn nix_starts() -> bool {
    use std::io::ErrorKind::{NotFound, PermissionDenied};
    for _ in 0..20 {
        match std::process::Command::new("nix").output() {
            Ok(_) => return true,
            Err(e) if matches!(e.kind(), NotFound | PermissionDenied) => return false,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
    false
}

/// An error as fh prints it: color-eyre's report (fh builds it without
/// location and span-trace sections), exit status 1.
fn fh_error(message: &str) -> ! {
    eprintln!(
        "Error: \n   0: {message}\n\nBacktrace omitted. Run with RUST_BACKTRACE=1 environment variable to display it.\n\
         Run with RUST_BACKTRACE=full to include source snippets.\n\
         Consider reporting this error using this URL: https://github.com/DeterminateSystems/fh/issues/new"
    );
    std::process::exit(1)
}

fn setup() -> (PathBuf, Vec<String>, Behaviour) {
    let dir = PathBuf::from(std::env::var_os(DIR_ENV).unwrap_or_else(|| DEFAULT_DIR.into()));
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let b = read_behaviour(&dir);
    (dir, argv, b)
}

pub fn determinate_nixd_main() -> ! {
    let (dir, argv, b) = setup();
    record(&dir, "determinate-nixd", &argv);
    if argv != ["login", "aws"] {
        eprintln!("determinate-nixd stand-in: unexpected argv {argv:?}");
        std::process::exit(2);
    }
    if bump(&dir, "login") <= b.login_fail_times {
        eprintln!("error: failed to authenticate to FlakeHub (stand-in: transient)");
        std::process::exit(1);
    }
    match b.login {
        Mode::Hang => hang(),
        Mode::KillAgent => {
            kill_agent();
            std::process::exit(1)
        }
        Mode::Fail => {
            eprintln!("error: the role is not registered (stand-in)");
            std::process::exit(1)
        }
        _ => {
            std::fs::write(dir.join("token"), "stand-in token").unwrap();
            println!("Logged in to FlakeHub (stand-in)");
            std::process::exit(0)
        }
    }
}

pub fn fh_main() -> ! {
    let (dir, argv, b) = setup();
    record(&dir, "fh", &argv);
    let args: Vec<&str> = argv.iter().map(String::as_str).collect();
    match args[..] {
        ["resolve", "--json", reference] => {
            // Echo the reference on stderr, as fh's progress output does,
            // so tests can check the agent redacts passed-on lines.
            eprintln!("resolving {reference}");
            if bump(&dir, "resolve") <= b.resolve_fail_times {
                eprintln!("error: FlakeHub unreachable (stand-in: transient)");
                std::process::exit(1);
            }
            match b.resolve {
                Mode::Hang => hang(),
                Mode::Fail => std::process::exit(1),
                Mode::BadJson => {
                    println!("not json");
                    std::process::exit(0)
                }
                _ => {}
            }
            let mut path = flakehub_resolve(&dir, &b, reference);
            if b.resolve_moves_after > 0
                && bump(&dir, "resolve-moved") > b.resolve_moves_after
                && let Some(moved) = &b.moved_to
            {
                path = moved.clone();
            }
            let attr = reference.split_once('#').map_or("", |(_, a)| a);
            println!(
                "{}",
                serde_json::json!({"attribute_path": attr, "store_path": path})
            );
            std::process::exit(0)
        }
        // What fh fetch does (DeterminateSystems/fh `src/cli/cmd/fetch.rs`):
        // resolve with a scoped token, ask whether `nix copy` knows
        // `--out-link` (by running it bare), then copy the closure from
        // FlakeHub Cache with a GC root at LINK.
        ["fetch", reference, link] => {
            eprintln!("resolving {reference}");
            std::fs::write(dir.join("pid-fetch"), std::process::id().to_string()).unwrap();
            let path = b
                .moved_to
                .clone()
                .unwrap_or_else(|| flakehub_resolve(&dir, &b, reference));
            if bump(&dir, "fetch-hang") <= b.fetch_hang_times {
                hang();
            }
            if bump(&dir, "fetch") <= b.fetch_fail_times {
                eprintln!("Error: \n   0: error sending request (stand-in: transient)");
                std::process::exit(1);
            }
            match b.fetch {
                Mode::Hang => hang(),
                Mode::Fail => fh_error("Failed to copy resolved store path with Nix"),
                _ => {}
            }
            eprintln!("Resolved {reference} to {}", path.display());
            // `copy_supports_out_link` starts `nix` itself, without fh's
            // presence check: no nix is "Could not run nix".
            if !nix_starts() {
                fh_error("Could not run nix");
            }
            let netrc = dir.join("fetch-netrc");
            std::fs::write(
                &netrc,
                "machine cache.flakehub.com login flakehub password scoped\n",
            )
            .unwrap();
            let store_path = path.display().to_string();
            nix(&[
                "copy",
                "--option",
                "narinfo-cache-negative-ttl",
                "0",
                "--from",
                "https://cache.flakehub.com/",
                &store_path,
                "--out-link",
                link,
                "--netrc-file",
                &netrc.display().to_string(),
            ]);
            eprintln!("Copied {store_path} to {link}");
            std::process::exit(0)
        }
        ["apply", "nixos", reference, action] => {
            eprintln!("applying {reference} ({action})");
            if b.apply == Mode::HangIgnoringTerm {
                // Before the pid is published: a test that signals as soon
                // as it sees it must find SIGTERM already ignored.
                // SAFETY: setting a signal's disposition, single-threaded.
                unsafe {
                    libc::signal(libc::SIGTERM, libc::SIG_IGN);
                }
            }
            // For tests that signal the run: which process to look for.
            std::fs::write(dir.join("pid-apply"), std::process::id().to_string()).unwrap();
            if let Some(raw) = &b.apply_stderr {
                use std::io::Write;
                let _ = std::io::stderr().write_all(raw.as_bytes());
            }
            if b.private && !dir.join("token").exists() {
                fh_error("access to this output reference is not authorized");
            }
            let Some(path) = b.moved_to.as_ref().or(b.store_paths.get(reference)) else {
                fh_error(&format!("output reference {reference} not found"));
            };
            // fh checks for `nix` by starting it from its PATH before it
            // fetches anything. Only a `nix` that is not there (or cannot
            // be executed) is "not installed"; a fork that fails for want
            // of resources (a loaded test machine) is tried again.
            if !nix_starts() {
                eprintln!(
                    "Error: failed to copy resolved store path with Nix: nix is not installed or not on the PATH"
                );
                std::process::exit(1);
            }
            if bump(&dir, "apply") <= b.apply_fail_times {
                eprintln!("error: building the system failed (stand-in: transient)");
                std::process::exit(1);
            }
            match b.apply {
                Mode::Hang => hang(),
                Mode::HangIgnoringTerm => hang_ignoring_term(),
                Mode::Fail => {
                    eprintln!("error: building the system failed (stand-in)");
                    std::process::exit(1)
                }
                _ => {}
            }
            let store_path = path.display().to_string();
            // What fh runs: fetch the closure, then set the system profile
            // (for every action), then switch-to-configuration ACTION.
            nix(&[
                "copy",
                "--option",
                "narinfo-cache-negative-ttl",
                "0",
                "--from",
                "https://cache.flakehub.com",
                &store_path,
            ]);
            let profile = b.system_profile.display().to_string();
            nix(&[
                "build",
                "--no-link",
                "--max-jobs",
                "0",
                "--profile",
                &profile,
                &store_path,
            ]);
            if b.apply == Mode::NoSwitch {
                eprintln!("switch-to-configuration failed (stand-in; fh ignores it)");
                std::process::exit(0)
            }
            // fh activates with the system's own switch-to-configuration
            // and ignores its exit status (fh `src/cli/cmd/apply/mod.rs`);
            // a system without one cannot be activated at all.
            let activated = std::process::Command::new(path.join("bin/switch-to-configuration"))
                .arg(action)
                .status();
            if let Err(e) = activated {
                eprintln!("Error: failed to run switch-to-configuration: {e}");
                std::process::exit(1);
            }
            if b.apply == Mode::KillAgent {
                kill_agent();
            }
            std::process::exit(0)
        }
        _ => {
            eprintln!("fh stand-in: unexpected argv {argv:?}");
            std::process::exit(2)
        }
    }
}

/// FlakeHub's answer to a resolve of `reference` (fh `FlakeHubClient::
/// resolve`): the store path, or fh's error report and exit 1.
fn flakehub_resolve(dir: &Path, b: &Behaviour, reference: &str) -> PathBuf {
    let url = format!(
        "https://api.flakehub.com/f/{}",
        reference.replace('#', "/output/")
    );
    match b.flakehub {
        Some(FlakeHub::Unauthorized) => {
            fh_error("access to this output reference is not authorized")
        }
        Some(FlakeHub::Forbidden) => fh_error("http call returned error code 403 Forbidden"),
        Some(FlakeHub::Unreachable) => fh_error(&format!(
            "http error: error sending request for url ({url}): error trying to connect: dns error: failed to lookup address information"
        )),
        Some(FlakeHub::NoStorePath) => fh_error(
            "http error: error decoding response body: missing field `store_path` at line 1 column 47",
        ),
        None => {}
    }
    if b.private && !dir.join("token").exists() {
        fh_error("access to this output reference is not authorized");
    }
    match b.store_paths.get(reference) {
        Some(path) => path.clone(),
        None => fh_error(&format!("output reference {reference} not found")),
    }
}

/// Runs `nix` from PATH as fh does; fh fails when a nix command fails.
fn nix(args: &[&str]) {
    let ok = std::process::Command::new("nix")
        .args(["--extra-experimental-features", "nix-command flakes"])
        .args(args)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "Error: Nix command `nix {}` failed; check prior Nix output for details",
            args.join(" ")
        );
        std::process::exit(1);
    }
}

/// The `nix` stand-in: `nix build --profile P PATH` and
/// `nix-env --profile P --set PATH` point the profile at PATH; `nix copy`
/// and a bare `nix` (fh's presence check) succeed.
pub fn nix_main() -> ! {
    let (dir, argv, _) = setup();
    let prog = std::env::args()
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "nix".into());
    if argv.is_empty() {
        // fh's `command_exists("nix")`: starting it is the whole check.
        std::process::exit(1);
    }
    record(&dir, &prog, &argv);
    let args: Vec<&str> = argv.iter().map(String::as_str).collect();
    let flag = |name: &str| {
        args.windows(2)
            .find(|w| w[0] == name)
            .map(|w| PathBuf::from(w[1]))
    };
    let store_path = args.last().map(PathBuf::from).unwrap_or_default();
    let sub = args
        .iter()
        .find(|a| matches!(**a, "build" | "copy" | "--set"))
        .copied();
    match sub {
        Some("copy") => {
            // fh's `copy_supports_out_link` probe: a bare `nix copy
            // --out-link` fails with a usage error (this Nix knows it).
            if args == ["copy", "--out-link"] {
                eprintln!("error: flag '--out-link' requires 1 argument(s)");
                std::process::exit(1);
            }
            let Some(path) = copy_operand(&args) else {
                eprintln!("nix stand-in: copy without a store path: {argv:?}");
                std::process::exit(2);
            };
            let out_link = flag("--out-link");
            // Nix's addPermRoot: an out-link path that holds something
            // other than a link into the store is refused, not replaced.
            if let Some(link) = &out_link
                && std::fs::symlink_metadata(link).is_ok_and(|m| !m.file_type().is_symlink())
            {
                eprintln!(
                    "error: cannot create symlink '{}'; already exists",
                    link.display()
                );
                std::process::exit(1);
            }
            substitute(&dir, &path);
            if let Some(link) = out_link {
                point(&link, &path);
            }
            std::process::exit(0)
        }
        Some("build") => {
            substitute(&dir, &store_path);
            if let Some(profile) = flag("--profile") {
                point(&profile, &store_path);
            }
            std::process::exit(0)
        }
        Some("--set") => {
            let Some(profile) = flag("--profile").or_else(|| flag("-p")) else {
                eprintln!("nix-env stand-in: --set needs --profile");
                std::process::exit(2);
            };
            point(&profile, &store_path);
            std::process::exit(0)
        }
        _ => {
            eprintln!("{prog} stand-in: unexpected argv {argv:?}");
            std::process::exit(2)
        }
    }
}

/// The store path `nix copy` is given: its one operand, after the global
/// flags and past each option's values.
fn copy_operand(args: &[&str]) -> Option<PathBuf> {
    let mut rest = args.iter().skip_while(|a| **a != "copy").skip(1);
    while let Some(a) = rest.next() {
        let values = match *a {
            "--option" => 2,
            "--from" | "--to" | "--out-link" | "--netrc-file" => 1,
            a if a.starts_with("--") => 0,
            a => return Some(PathBuf::from(a)),
        };
        for _ in 0..values {
            rest.next();
        }
    }
    None
}

/// Makes `path` valid, as the Nix daemon substitutes a path: under a lock
/// on the path, so that a second download of it waits for the first and
/// then finds it valid; a path already valid is not downloaded again. A
/// download takes `download_ms` and is recorded in `downloads.jsonl`.
fn substitute(dir: &Path, path: &Path) {
    use std::os::fd::AsRawFd;
    let b = read_behaviour(dir);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !path.is_dir() {
        eprintln!(
            "error: path '{}' is required, but there is no substituter that can build it",
            path.display()
        );
        std::process::exit(1);
    }
    let valid = |_: ()| b.valid.contains(&name) || dir.join("valid").join(&name).exists();
    if valid(()) {
        return;
    }
    std::fs::create_dir_all(dir.join("locks")).unwrap();
    let lock = std::fs::File::create(dir.join("locks").join(&name)).unwrap();
    // SAFETY: flock on a file this process owns; released on exit.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        eprintln!("error: cannot lock {}", path.display());
        std::process::exit(1);
    }
    if valid(()) {
        return;
    }
    let started_ms = unix_ms();
    eprintln!(
        "copying path '{}' from 'https://cache.flakehub.com'...",
        path.display()
    );
    std::thread::sleep(std::time::Duration::from_millis(b.download_ms));
    std::fs::create_dir_all(dir.join("valid")).unwrap();
    std::fs::write(dir.join("valid").join(&name), "").unwrap();
    append(
        dir,
        "downloads.jsonl",
        &Download {
            path: name,
            unit: own_unit(),
            started_ms,
            finished_ms: unix_ms(),
        },
    );
}

/// The `switch-to-configuration` stand-in, linked as
/// `SYSTEM/bin/switch-to-configuration`: `switch` and `test` make SYSTEM
/// the running system (`boot` only installs the boot loader entry, which
/// has no stand-in). Like switch-to-configuration-ng, it exits 4 when a
/// unit failed to start: here, when SYSTEM has a failed unit in
/// `units`.
pub fn switch_main() -> ! {
    let (dir, argv, b) = setup();
    let me = std::env::args().next().unwrap_or_default();
    let system = Path::new(&me)
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let name = system
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    record(
        &dir,
        SWITCH,
        &[name.clone()]
            .into_iter()
            .chain(argv.clone())
            .collect::<Vec<_>>(),
    );
    let action = match argv.as_slice() {
        [a] if matches!(a.as_str(), "switch" | "boot" | "test" | "dry-activate") => a.as_str(),
        _ => {
            eprintln!("usage: switch-to-configuration [switch|boot|test|dry-activate]");
            std::process::exit(1)
        }
    };
    if b.switch_hang.as_deref() == Some(name.as_str()) {
        hang();
    }
    if b.switch_fail.as_deref() == Some(name.as_str()) {
        eprintln!("error: activation failed (stand-in)");
        std::process::exit(1);
    }
    if matches!(action, "switch" | "test") {
        point(&b.current_system, &system);
    }
    let started_failed = match (&b.unit_dir, action) {
        (Some(dir), "switch" | "test") => activate_units(dir, &system),
        _ => false,
    };
    let failed = started_failed
        || b.units
            .get(&name)
            .is_some_and(|u| u.values().any(|s| s == "failed"));
    if failed && action != "boot" {
        eprintln!("warning: the following units failed: (stand-in)");
        std::process::exit(4)
    }
    std::process::exit(0)
}

/// Makes `system/units/*` the units in `dir` under the running systemd:
/// units of the previous system (listed in `dir/.standin-units`) that this
/// one lacks are stopped and removed, this one's are written, systemd
/// reloads, and each is (re)started. Whether a start failed.
fn activate_units(dir: &Path, system: &Path) -> bool {
    let systemctl = |args: &[&str]| {
        std::process::Command::new("systemctl")
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    };
    let manifest = dir.join(".standin-units");
    let old: Vec<String> = std::fs::read_to_string(&manifest)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    let mut new: Vec<(String, PathBuf)> = std::fs::read_dir(system.join("units"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    new.sort();
    if old.is_empty() && new.is_empty() {
        return false;
    }
    std::fs::create_dir_all(dir).unwrap();
    for u in old.iter().filter(|u| !new.iter().any(|(n, _)| n == *u)) {
        systemctl(&["stop", u]);
        let _ = std::fs::remove_file(dir.join(u));
    }
    for (u, src) in &new {
        std::fs::copy(src, dir.join(u)).unwrap();
    }
    let names: Vec<&str> = new.iter().map(|(n, _)| n.as_str()).collect();
    std::fs::write(&manifest, names.join("\n")).unwrap();
    systemctl(&["daemon-reload"]);
    let mut failed = false;
    for u in names {
        if !systemctl(&["restart", u]) {
            eprintln!("Failed to restart {u}");
            failed = true;
        }
    }
    failed
}
