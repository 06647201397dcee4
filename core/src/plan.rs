//! The decisions, as pure functions over what was observed: whether to
//! apply, whether the apply really took, whether a reboot is needed, and
//! the plan that `plan` prints. No I/O here; table tests below.

use crate::settings::{Action, RebootPolicy, Settings, Source, Sourced};
use crate::userdata::{Digest, Kind};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The system links, resolved to store paths (`None`: link absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemView {
    /// `/run/current-system`: what is running.
    pub current: Option<PathBuf>,
    /// `/nix/var/nix/profiles/system`: what boots by default.
    pub profile: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    UpToDate { reason: String },
    Apply,
}

fn shows(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map_or_else(|| "absent".into(), |p| p.display().to_string())
}

/// `switch` is done when both the running system and the boot default are
/// the target; `test` only touches the running system, `boot` only the
/// default.
pub fn decide(action: Action, target: &Path, sys: &SystemView) -> Decision {
    let is = |p: &Option<PathBuf>| p.as_deref() == Some(target);
    let up_to_date = match action {
        Action::Switch => is(&sys.current) && is(&sys.profile),
        Action::Test => is(&sys.current),
        Action::Boot => is(&sys.profile),
    };
    if !up_to_date {
        return Decision::Apply;
    }
    let what = match action {
        Action::Switch => "the running system and the boot default are",
        Action::Test => "the running system is",
        Action::Boot => "the boot default is",
    };
    Decision::UpToDate {
        reason: format!("{what} already {}", target.display()),
    }
}

/// `fh apply nixos` ignores the exit status of switch-to-configuration, so
/// its success proves nothing: the links must show the target.
pub fn verify(action: Action, target: &Path, after: &SystemView) -> Result<(), String> {
    let (link, seen) = match action {
        Action::Switch | Action::Test => ("the running system (current-system)", &after.current),
        Action::Boot => ("the boot default (system profile)", &after.profile),
    };
    if seen.as_deref() == Some(target) {
        Ok(())
    } else {
        Err(format!(
            "fh reported success but the system did not switch: {link} is {}, expected {}",
            shows(seen),
            target.display()
        ))
    }
}

/// The files that decide whether a running system can change in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootFiles {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub kernel_modules: Option<PathBuf>,
}

impl BootFiles {
    pub fn differences(&self, other: &BootFiles) -> Vec<&'static str> {
        let mut d = vec![];
        if self.kernel != other.kernel {
            d.push("kernel");
        }
        if self.initrd != other.initrd {
            d.push("initrd");
        }
        if self.kernel_modules != other.kernel_modules {
            d.push("kernel modules");
        }
        d
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RebootAssessment {
    pub needed: bool,
    pub reason: String,
}

pub struct RebootInputs<'a> {
    pub policy: RebootPolicy,
    pub action: Action,
    /// Whether the system changed to the target with no reboot asked for
    /// since: this run applied it, or an earlier run did and was stopped
    /// before it asked (for `always`: reboot after an apply only, or every
    /// run would reboot).
    pub applied: bool,
    pub target: &'a Path,
    pub new: &'a BootFiles,
    pub booted_system: Option<&'a Path>,
    pub booted: &'a BootFiles,
    /// The target a reboot was already requested for, from the state.
    pub requested_for: Option<&'a Path>,
}

/// `if-needed` compares the booted system with the target, not with what
/// this run did, so a reboot lost to a crash is still asked for next run.
/// A reboot already requested for this very target is not asked for again:
/// if the machine came back on another system, rebooting more would loop.
pub fn reboot(i: &RebootInputs<'_>) -> RebootAssessment {
    let no = |reason: String| RebootAssessment {
        needed: false,
        reason,
    };
    let yes = |reason: String| RebootAssessment {
        needed: true,
        reason,
    };
    if i.action == Action::Test {
        return no("action is test: a reboot would return to the boot default".into());
    }
    let differs = match i.action {
        Action::Boot => {
            if i.booted_system == Some(i.target) {
                vec![]
            } else {
                vec!["the whole system (action boot takes effect at the next boot)"]
            }
        }
        _ => i.booted.differences(i.new),
    };
    let pending = if differs.is_empty() {
        "the booted system already matches".to_owned()
    } else {
        format!(
            "{} of the booted system differ from the new system",
            differs.join(", ")
        )
    };
    match i.policy {
        RebootPolicy::Never => no(format!("reboot = never ({pending})")),
        RebootPolicy::Always if i.applied => yes("reboot = always and the system changed".into()),
        RebootPolicy::Always => no("reboot = always, but nothing changed".into()),
        RebootPolicy::IfNeeded if differs.is_empty() => no(pending),
        RebootPolicy::IfNeeded if i.requested_for == Some(i.target) => no(format!(
            "{pending}, but a reboot into {} was already requested; not rebooting again",
            i.target.display()
        )),
        RebootPolicy::IfNeeded => yes(pending),
    }
}

/// A setting as `plan` shows it: its value in its JSON type (`login` is a
/// boolean) and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Shown<V = String> {
    pub value: V,
    pub source: String,
}

impl<V> Shown<V> {
    fn of<T>(s: &Sourced<T>, f: impl Fn(&T) -> V) -> Self {
        Self {
            value: f(&s.value),
            source: s.source.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PlannedScript {
    pub label: String,
    pub size: usize,
    pub sha256: String,
    pub will_run: bool,
    pub note: String,
}

/// What `run` would do, as `plan` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Plan {
    pub instance_id: Option<String>,
    pub user_data: PlannedUserData,
    pub ignored_parts: Vec<String>,
    /// `None`: nothing to apply.
    pub target: Option<Shown>,
    pub action: Shown,
    pub reboot: Shown,
    pub login: Shown<bool>,
    pub scripts: Vec<PlannedScript>,
    pub steps: Vec<String>,
    /// The reboot need is decided after resolving; `plan` does not
    /// resolve, so it shows what the last run on this instance found.
    pub last_reboot: Option<RebootAssessment>,
}

/// The user data as `plan` shows it: its form, and the size and SHA-256
/// of what was read (never its content, which may hold secrets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PlannedUserData {
    pub kind: Kind,
    pub description: String,
    /// `None` when there is none.
    #[serde(flatten)]
    pub digest: Option<Digest>,
}

impl std::fmt::Display for PlannedUserData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.digest {
            Some(d) => write!(f, "{} ({d})", self.description),
            None => f.write_str(&self.description),
        }
    }
}

pub struct PlanInputs<'a> {
    pub instance_id: Option<&'a str>,
    pub user_data: PlannedUserData,
    pub ignored_parts: &'a [String],
    pub settings: &'a Settings,
    /// The target as it may be shown (a SecureString's placeholder), or
    /// what will be read (`the value of SSM parameter X`).
    pub target: Option<(String, Source)>,
    pub scripts: &'a [crate::userdata::Script],
    /// Labels of scripts that already ran on this instance; `None` when
    /// the instance is unknown (offline plan).
    pub scripts_ran: Option<&'a [String]>,
    pub current_system: &'a Path,
    pub system_profile: &'a Path,
    pub last_reboot: Option<RebootAssessment>,
}

pub fn build(i: PlanInputs<'_>) -> Plan {
    let s = i.settings;
    let mut steps = vec![];
    if let Some((target, _)) = &i.target {
        if s.login.value {
            steps.push("determinate-nixd login aws".to_owned());
        }
        steps.push(format!("fh resolve --json {target}"));
        let against = match s.action.value {
            Action::Switch => format!(
                "{} or {}",
                i.current_system.display(),
                i.system_profile.display()
            ),
            Action::Test => i.current_system.display().to_string(),
            Action::Boot => i.system_profile.display().to_string(),
        };
        steps.push(format!(
            "fh apply nixos {target} {} (only if the resolved store path differs from {against}), then verify",
            s.action.value.as_str()
        ));
    }
    let scripts: Vec<PlannedScript> = i
        .scripts
        .iter()
        .map(|sc| {
            let (will_run, note) = match i.scripts_ran {
                Some(ran) if ran.contains(&sc.label) => {
                    (false, "already ran on this instance".to_owned())
                }
                Some(_) => (true, "runs once on this instance".to_owned()),
                None => (
                    true,
                    "runs once per instance (instance unknown offline)".to_owned(),
                ),
            };
            PlannedScript {
                label: sc.label.clone(),
                size: sc.digest.size,
                sha256: sc.digest.sha256.clone(),
                will_run,
                note,
            }
        })
        .collect();
    for sc in scripts.iter().filter(|sc| sc.will_run) {
        steps.push(format!("run user-data script {}", sc.label));
    }
    Plan {
        instance_id: i.instance_id.map(str::to_owned),
        user_data: i.user_data,
        ignored_parts: i.ignored_parts.to_vec(),
        target: i.target.map(|(value, source)| Shown {
            value,
            source: source.to_string(),
        }),
        action: Shown::of(&s.action, |a| a.as_str().to_owned()),
        reboot: Shown::of(&s.reboot, |r| r.as_str().to_owned()),
        login: Shown::of(&s.login, |l| *l),
        scripts,
        steps,
        last_reboot: i.last_reboot,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Option<PathBuf> {
        Some(PathBuf::from(s))
    }

    const T: &str = "/nix/store/new-system";

    #[test]
    fn decide_table() {
        let t = Path::new(T);
        let cases = [
            (
                Action::Switch,
                SystemView {
                    current: p(T),
                    profile: p(T),
                },
                false,
            ),
            (
                Action::Switch,
                SystemView {
                    current: p(T),
                    profile: p("/old"),
                },
                true,
            ),
            (
                Action::Switch,
                SystemView {
                    current: p("/old"),
                    profile: p(T),
                },
                true,
            ),
            (Action::Switch, SystemView::default(), true),
            (
                Action::Test,
                SystemView {
                    current: p(T),
                    profile: p("/old"),
                },
                false,
            ),
            (
                Action::Test,
                SystemView {
                    current: p("/old"),
                    profile: p(T),
                },
                true,
            ),
            (
                Action::Boot,
                SystemView {
                    current: p("/old"),
                    profile: p(T),
                },
                false,
            ),
            (
                Action::Boot,
                SystemView {
                    current: p(T),
                    profile: p("/old"),
                },
                true,
            ),
        ];
        for (action, sys, apply) in cases {
            let d = decide(action, t, &sys);
            assert_eq!(d == Decision::Apply, apply, "{action:?} {sys:?}: {d:?}");
            if let Decision::UpToDate { reason } = d {
                assert!(reason.contains(T), "{reason}");
            }
        }
    }

    #[test]
    fn verify_table() {
        let t = Path::new(T);
        assert!(
            verify(
                Action::Switch,
                t,
                &SystemView {
                    current: p(T),
                    profile: p("/x")
                }
            )
            .is_ok()
        );
        let e = verify(
            Action::Switch,
            t,
            &SystemView {
                current: p("/old"),
                profile: p(T),
            },
        )
        .unwrap_err();
        assert!(
            e.starts_with("fh reported success but the system did not switch"),
            "{e}"
        );
        assert!(e.contains("/old") && e.contains(T), "{e}");
        assert!(
            verify(
                Action::Test,
                t,
                &SystemView {
                    current: None,
                    profile: None
                }
            )
            .unwrap_err()
            .contains("absent")
        );
        assert!(
            verify(
                Action::Boot,
                t,
                &SystemView {
                    current: p("/old"),
                    profile: p(T)
                }
            )
            .is_ok()
        );
        assert!(
            verify(
                Action::Boot,
                t,
                &SystemView {
                    current: p(T),
                    profile: p("/old")
                }
            )
            .is_err()
        );
    }

    fn files(k: &str, i: &str, m: &str) -> BootFiles {
        BootFiles {
            kernel: p(k),
            initrd: p(i),
            kernel_modules: p(m),
        }
    }

    #[test]
    fn reboot_table() {
        let same = files("/k1", "/i1", "/m1");
        let new_kernel = files("/k2", "/i2", "/m1");
        let t = Path::new(T);
        let run = |policy,
                   action,
                   applied,
                   new: &BootFiles,
                   booted_system: Option<&Path>,
                   requested: Option<&Path>| {
            reboot(&RebootInputs {
                policy,
                action,
                applied,
                target: t,
                new,
                booted_system,
                booted: &same,
                requested_for: requested,
            })
        };
        use Action::*;
        use RebootPolicy::*;
        let old = Some(Path::new("/nix/store/old"));
        let cases = [
            (
                IfNeeded,
                Switch,
                true,
                &same,
                old,
                None,
                false,
                "already matches",
            ),
            (
                IfNeeded,
                Switch,
                true,
                &new_kernel,
                old,
                None,
                true,
                "kernel, initrd of the booted",
            ),
            (
                IfNeeded,
                Switch,
                false,
                &new_kernel,
                old,
                None,
                true,
                "kernel",
            ),
            (
                IfNeeded,
                Switch,
                true,
                &new_kernel,
                old,
                Some(t),
                false,
                "already requested",
            ),
            (
                Never,
                Switch,
                true,
                &new_kernel,
                old,
                None,
                false,
                "reboot = never (kernel",
            ),
            (Always, Switch, true, &same, old, None, true, "always"),
            (
                Always,
                Switch,
                false,
                &same,
                old,
                None,
                false,
                "nothing changed",
            ),
            (
                Always,
                Test,
                true,
                &new_kernel,
                old,
                None,
                false,
                "action is test",
            ),
            (
                IfNeeded,
                Test,
                true,
                &new_kernel,
                old,
                None,
                false,
                "action is test",
            ),
            (IfNeeded, Boot, true, &same, old, None, true, "next boot"),
            (
                IfNeeded,
                Boot,
                false,
                &same,
                Some(t),
                None,
                false,
                "already matches",
            ),
        ];
        for (policy, action, applied, new, booted_sys, requested, needed, why) in cases {
            let r = run(policy, action, applied, new, booted_sys, requested);
            assert_eq!(
                r.needed, needed,
                "{policy:?} {action:?} applied={applied}: {r:?}"
            );
            assert!(
                r.reason.contains(why),
                "{policy:?} {action:?}: {}",
                r.reason
            );
        }
    }

    #[test]
    fn plan_lists_steps_and_scripts() {
        use crate::settings::{Layer, Target};
        use crate::userdata::Script;
        let layer = Layer {
            source: Source::UserData,
            target: Some(Target::Flake(
                crate::settings::OutputRef::parse("o/f/0.1#x").unwrap(),
            )),
            action: Some(Action::Boot),
            reboot: None,
            login: Some(false),
            health: Default::default(),
        };
        let settings = Settings::merge([&layer]);
        let script = |label: &str| Script {
            label: label.into(),
            body: b"#!/bin/sh".to_vec(),
            digest: Digest::of(b"#!/bin/sh"),
        };
        let scripts = [script("part 2"), script("part 3")];
        let ran = ["part 2".to_owned()];
        let plan = build(PlanInputs {
            instance_id: Some("i-1"),
            user_data: PlannedUserData {
                kind: Kind::Mime,
                description: "MIME multipart".into(),
                digest: Some(Digest::of(b"x")),
            },
            ignored_parts: &[],
            settings: &settings,
            target: Some(("o/f/0.1#x".into(), Source::UserData)),
            scripts: &scripts,
            scripts_ran: Some(&ran),
            current_system: Path::new("/run/current-system"),
            system_profile: Path::new("/nix/var/nix/profiles/system"),
            last_reboot: None,
        });
        assert_eq!(
            plan.steps,
            [
                "fh resolve --json o/f/0.1#x",
                "fh apply nixos o/f/0.1#x boot (only if the resolved store path differs from /nix/var/nix/profiles/system), then verify",
                "run user-data script part 3",
            ]
        );
        assert_eq!(
            plan.login,
            Shown {
                value: false,
                source: "user data".into()
            }
        );
        let json = serde_json::to_value(&plan).unwrap();
        assert_eq!(json["login"]["value"], serde_json::json!(false));
        assert_eq!(json["user-data"]["kind"], "mime");
        assert_eq!(json["user-data"]["size"], 1);
        assert_eq!(json["user-data"]["sha256"].as_str().unwrap().len(), 64);
        assert_eq!(plan.reboot.source, "built-in default");
        assert_eq!(
            plan.scripts.iter().map(|s| s.will_run).collect::<Vec<_>>(),
            [false, true]
        );

        let offline = build(PlanInputs {
            instance_id: None,
            user_data: PlannedUserData {
                kind: Kind::Absent,
                description: "no user data".into(),
                digest: None,
            },
            ignored_parts: &[],
            settings: &Settings::default(),
            target: None,
            scripts: &scripts[..1],
            scripts_ran: None,
            current_system: Path::new("/c"),
            system_profile: Path::new("/p"),
            last_reboot: None,
        });
        assert_eq!(offline.steps, ["run user-data script part 2"]);
        assert!(offline.target.is_none());
        let json = serde_json::to_value(&offline).unwrap();
        assert_eq!(
            json["user-data"],
            serde_json::json!({"kind": "absent", "description": "no user data"})
        );
    }
}
