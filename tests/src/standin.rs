//! Stand-ins for `fh` and `determinate-nixd`. They record their argv in
//! `$STANDIN_DIR/calls.jsonl` and behave as `$STANDIN_DIR/standin.json`
//! says: succeed, fail (some times or always), hang, or (fh apply)
//! "succeed" without switching, as real fh does when
//! switch-to-configuration fails.

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
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct Behaviour {
    pub login: Mode,
    /// Fail this many times first, then behave as `login`.
    pub login_fail_times: u32,
    pub resolve: Mode,
    pub resolve_fail_times: u32,
    pub apply: Mode,
    pub apply_fail_times: u32,
    /// Output ref → store path `fh resolve` prints.
    pub store_paths: HashMap<String, PathBuf>,
    pub current_system: PathBuf,
    pub system_profile: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    pub prog: String,
    pub argv: Vec<String>,
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

/// Every call as `prog arg arg`.
pub fn call_lines(dir: &Path) -> Vec<String> {
    calls(dir)
        .iter()
        .map(|c| format!("{} {}", c.prog, c.argv.join(" ")))
        .collect()
}

fn record(dir: &Path, prog: &str, argv: &[String]) {
    use std::io::Write;
    let line = serde_json::to_string(&Call {
        prog: prog.into(),
        argv: argv.to_vec(),
    })
    .unwrap();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("calls.jsonl"))
        .unwrap();
    writeln!(f, "{line}").unwrap();
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
    let tmp = link.with_extension("standin-tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(to, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
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
            let Some(path) = b.store_paths.get(reference) else {
                eprintln!("error: no such flake output {reference}");
                std::process::exit(1);
            };
            let attr = reference.split_once('#').map_or("", |(_, a)| a);
            println!(
                "{}",
                serde_json::json!({"attribute_path": attr, "store_path": path})
            );
            std::process::exit(0)
        }
        ["apply", "nixos", reference, action] => {
            eprintln!("applying {reference} ({action})");
            let Some(path) = b.store_paths.get(reference) else {
                eprintln!("error: no such flake output {reference}");
                std::process::exit(1);
            };
            if bump(&dir, "apply") <= b.apply_fail_times {
                eprintln!("error: building the system failed (stand-in: transient)");
                std::process::exit(1);
            }
            match b.apply {
                Mode::Hang => hang(),
                Mode::Fail => {
                    eprintln!("error: building the system failed (stand-in)");
                    std::process::exit(1)
                }
                Mode::NoSwitch => {
                    eprintln!("switch-to-configuration failed (stand-in; fh ignores it)");
                    std::process::exit(0)
                }
                _ => {}
            }
            if matches!(action, "switch" | "boot") {
                point(&b.system_profile, path);
            }
            if matches!(action, "switch" | "test") {
                point(&b.current_system, path);
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
