//! What a run reports to SSM Compliance, and how `fleet status` reads it
//! back: pure, so the mapping from a run to COMPLIANT / NON_COMPLIANT is
//! tested on its own.
//!
//! One compliance item per instance, type [`COMPLIANCE_TYPE`], uploaded
//! with `PutComplianceItems` in COMPLETE mode (each report replaces the
//! last). SSM aggregates them across the fleet
//! (`ListResourceComplianceSummaries`); so that `fleet status` can group a
//! fleet from those summaries alone, without one call per instance, the
//! execution ID carries what groups it: the parameter version the run read
//! the parameter it read (a short hash of its name), and the system the
//! instance runs ([`ExecutionId`]).
//!
//! Limits from the SSM API reference (`PutComplianceItems`,
//! `ComplianceItemEntry`, `ComplianceExecutionSummary`): execution ID at
//! most 100 characters, execution type 50, item ID 100, title 500, at most
//! 20 details (keys up to 64 characters, values up to 4096).

use std::collections::BTreeMap;

pub const COMPLIANCE_TYPE: &str = "Custom:NixOSAmiAgent";
pub const RESOURCE_TYPE: &str = "ManagedInstance";
/// The one item every report holds.
pub const ITEM_ID: &str = "nixos-configuration";
pub const EXECUTION_TYPE: &str = "nixos-ami-agent run";

const MAX_EXECUTION_ID: usize = 100;
const MAX_TITLE: usize = 500;
const MAX_DETAIL_VALUE: usize = 4096;
/// Messages are shown in the console and `fleet status`; a few lines do.
const MAX_MESSAGE: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Compliant,
    NonCompliant,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Compliant => "COMPLIANT",
            Status::NonCompliant => "NON_COMPLIANT",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Critical,
    High,
    Medium,
    Informational,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "CRITICAL",
            Severity::High => "HIGH",
            Severity::Medium => "MEDIUM",
            Severity::Informational => "INFORMATIONAL",
        }
    }
}

/// A finished run, as the state file records it.
#[derive(Debug, Clone, Default)]
pub struct Run<'a> {
    /// `applied`, `nothing to do`, `failed`: as `status` says it.
    pub result: &'a str,
    pub exit_code: u8,
    pub message: &'a str,
    /// The target as it may be shown (a SecureString's placeholder).
    pub target: Option<&'a str>,
    pub ssm_parameter: Option<&'a str>,
    pub ssm_version: Option<i64>,
    pub action: Option<&'a str>,
    /// The target's store path, once resolved.
    pub store_path: Option<&'a str>,
    /// What the instance runs now (`/run/current-system`, resolved).
    pub running: Option<&'a str>,
    /// The health gate's state, when one ran.
    pub health: Option<&'a str>,
    /// RFC 3339.
    pub finished: &'a str,
    pub agent_version: &'a str,
}

/// One `PutComplianceItems` request's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub status: Status,
    pub severity: Severity,
    pub title: String,
    pub execution_id: String,
    pub details: BTreeMap<&'static str, String>,
}

/// COMPLIANT when the run succeeded and the instance runs its target (or
/// has none); NON_COMPLIANT otherwise, with the reason in the title.
pub fn report(r: &Run<'_>) -> Report {
    let runs_target = match (r.store_path, r.running) {
        (Some(target), Some(running)) => target == running,
        _ => false,
    };
    let (status, severity, title) = if r.exit_code != 0 {
        // A target that broke the machine (rolled back, or kept broken)
        // is worse than one that could not be had.
        let severity = if matches!(r.health, Some("unhealthy" | "rolling-back" | "rolled-back")) {
            Severity::Critical
        } else {
            Severity::High
        };
        (
            Status::NonCompliant,
            severity,
            format!("{} (exit {}): {}", r.result, r.exit_code, r.message),
        )
    } else if r.target.is_none() {
        (
            Status::Compliant,
            Severity::Informational,
            "no target configured".to_owned(),
        )
    } else if runs_target {
        (
            Status::Compliant,
            Severity::Informational,
            format!("runs {}", r.target.unwrap_or_default()),
        )
    } else {
        // Applied for the next boot, or a reboot into it requested.
        (
            Status::NonCompliant,
            Severity::Medium,
            format!(
                "{} is set up but not running yet (reboot pending): {}",
                r.target.unwrap_or_default(),
                r.message
            ),
        )
    };
    let mut details = BTreeMap::new();
    let mut put = |k: &'static str, v: Option<String>| {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            details.insert(k, fit(&v, MAX_DETAIL_VALUE));
        }
    };
    put("Result", Some(r.result.to_owned()));
    put("ExitCode", Some(r.exit_code.to_string()));
    put("Message", Some(fit(r.message, MAX_MESSAGE)));
    put("Target", r.target.map(str::to_owned));
    put("SsmParameter", r.ssm_parameter.map(str::to_owned));
    put("SsmVersion", r.ssm_version.map(|v| v.to_string()));
    put("Action", r.action.map(str::to_owned));
    put("StorePath", r.store_path.map(str::to_owned));
    put("Running", r.running.map(str::to_owned));
    put("Health", r.health.map(str::to_owned));
    put("Finished", Some(r.finished.to_owned()));
    put("AgentVersion", Some(r.agent_version.to_owned()));
    let key = r.ssm_parameter.map(parameter_key);
    Report {
        status,
        severity,
        title: fit(&title, MAX_TITLE),
        execution_id: ExecutionId {
            ssm_version: r.ssm_version,
            parameter: key.as_deref(),
            running: r.running.map(basename),
        }
        .to_string(),
        details,
    }
}

/// Safe to show (escaped) and within SSM's limit of `max` characters,
/// whatever the escaping added.
fn fit(s: &str, max: usize) -> String {
    // Room for `bounded`'s "… [N more bytes]".
    let t = crate::text::shown(s, max.saturating_sub(32));
    if t.chars().count() <= max {
        t
    } else {
        t.chars().take(max).collect()
    }
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Eight hex digits of the SHA-256 of a parameter's name without its
/// `:label` or `:version` selector (and as a name, not an ARN): the same
/// for every instance of a fleet, whichever label it reads.
pub fn parameter_key(name: &str) -> String {
    use sha2::{Digest as _, Sha256};
    let bare = crate::settings::parameter::bare_name(name);
    Sha256::digest(bare.as_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `v7 1a2b3c4d abc…-nixos-system-web-26.05`: the parameter version the
/// run read, its parameter's [`parameter_key`], and the running system
/// (`-` for what is not known), within SSM's 100 characters. What a fleet
/// is grouped and filtered by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionId<S: AsRef<str> = String> {
    pub ssm_version: Option<i64>,
    pub parameter: Option<S>,
    /// The running system's store directory name.
    pub running: Option<S>,
}

impl<S: AsRef<str>> std::fmt::Display for ExecutionId<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let version = self
            .ssm_version
            .map_or_else(|| "-".to_owned(), |v| format!("v{v}"));
        let parameter = self.parameter.as_ref().map_or("-", |p| p.as_ref());
        let head = format!("{version} {parameter} ");
        let room = MAX_EXECUTION_ID.saturating_sub(head.len());
        let running = self.running.as_ref().map_or("-", |r| r.as_ref());
        // Store names are ASCII; cut at a character boundary anyway.
        let mut end = running.len().min(room);
        while !running.is_char_boundary(end) {
            end -= 1;
        }
        write!(f, "{head}{}", &running[..end])
    }
}

impl<'a> ExecutionId<&'a str> {
    /// Reads one back; `None` for an ID this agent did not write.
    pub fn parse(id: &'a str) -> Option<Self> {
        let mut parts = id.splitn(3, ' ');
        let (version, parameter, running) = (parts.next()?, parts.next()?, parts.next()?);
        let ssm_version = match version {
            "-" => None,
            v => Some(v.strip_prefix('v')?.parse().ok()?),
        };
        let parameter = match parameter {
            "-" => None,
            p if p.len() == 8 && p.bytes().all(|b| b.is_ascii_hexdigit()) => Some(p),
            _ => return None,
        };
        let running = (running != "-").then_some(running);
        Some(Self {
            ssm_version,
            parameter,
            running,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEW: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-web-26.05";
    const OLD: &str = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-nixos-system-web-25.11";

    fn run() -> Run<'static> {
        Run {
            result: "applied",
            exit_code: 0,
            message: "switched",
            target: Some("acme/web/0.1#nixosConfigurations.web"),
            ssm_parameter: Some("/fleets/web"),
            ssm_version: Some(7),
            action: Some("switch"),
            store_path: Some(NEW),
            running: Some(NEW),
            health: Some("healthy"),
            finished: "2026-11-29T10:00:00Z",
            agent_version: "0.1.0",
        }
    }

    #[test]
    fn applied_and_running_is_compliant() {
        let r = report(&run());
        assert_eq!(r.status, Status::Compliant);
        assert_eq!(r.title, "runs acme/web/0.1#nixosConfigurations.web");
        assert_eq!(
            r.execution_id,
            format!(
                "v7 {} aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-web-26.05",
                parameter_key("/fleets/web")
            )
        );
        assert_eq!(r.details["SsmVersion"], "7");
        assert_eq!(r.details["StorePath"], NEW);
        assert_eq!(r.details["ExitCode"], "0");
        assert!(r.details.len() <= 20);
    }

    #[test]
    fn failures_and_pending_reboots_are_not() {
        let failed = report(&Run {
            result: "failed",
            exit_code: 1,
            message: "rolled back to the previous system: failed units: web.service",
            running: Some(OLD),
            health: Some("rolled-back"),
            ..run()
        });
        assert_eq!(failed.status, Status::NonCompliant);
        assert_eq!(failed.severity, Severity::Critical);
        assert!(
            failed.title.starts_with("failed (exit 1): rolled back"),
            "{}",
            failed.title
        );
        let unreachable = report(&Run {
            result: "failed",
            exit_code: 75,
            store_path: None,
            ..run()
        });
        assert_eq!(unreachable.severity, Severity::High);
        assert!(!unreachable.details.contains_key("StorePath"));

        let pending = report(&Run {
            running: Some(OLD),
            action: Some("boot"),
            ..run()
        });
        assert_eq!(pending.status, Status::NonCompliant);
        assert_eq!(pending.severity, Severity::Medium);
        assert!(
            pending.title.contains("reboot pending"),
            "{}",
            pending.title
        );

        let none = report(&Run {
            target: None,
            store_path: None,
            ssm_version: None,
            result: "nothing to do",
            ..run()
        });
        assert_eq!(none.status, Status::Compliant);
        assert!(none.execution_id.starts_with("- "));
        let no_parameter = report(&Run {
            ssm_parameter: None,
            ssm_version: None,
            ..run()
        });
        assert!(
            no_parameter.execution_id.starts_with("- - "),
            "{}",
            no_parameter.execution_id
        );
    }

    #[test]
    fn limits_hold_for_any_input() {
        let long = "x".repeat(10_000);
        let r = report(&Run {
            result: "failed",
            exit_code: 75,
            message: &long,
            target: Some(&long),
            running: Some(&long),
            ..run()
        });
        assert!(r.title.chars().count() <= MAX_TITLE, "{}", r.title.len());
        assert!(r.execution_id.len() <= MAX_EXECUTION_ID);
        for (k, v) in &r.details {
            assert!(
                k.len() <= 64 && v.chars().count() <= MAX_DETAIL_VALUE,
                "{k}"
            );
        }
        let r = report(&Run {
            message: "line\nforged\u{1b}[31m",
            exit_code: 75,
            ..run()
        });
        assert!(
            !r.title.contains('\n') && !r.title.contains('\u{1b}'),
            "{}",
            r.title
        );
    }

    #[test]
    fn execution_ids_read_back() {
        let key = parameter_key("/fleets/web");
        for (v, p, running) in [
            (Some(7), Some(key.as_str()), Some("aaaa-nixos-system-web")),
            (None, None, Some("aaaa-nixos-system-web")),
            (Some(12), Some(key.as_str()), None),
            (None, None, None),
        ] {
            let id = ExecutionId {
                ssm_version: v,
                parameter: p,
                running,
            }
            .to_string();
            assert_eq!(
                ExecutionId::parse(&id),
                Some(ExecutionId {
                    ssm_version: v,
                    parameter: p,
                    running
                }),
                "{id}"
            );
        }
        assert_eq!(ExecutionId::parse("Command-1234"), None);
        assert_eq!(ExecutionId::parse("x y z"), None);
        assert_eq!(ExecutionId::parse("v1 nothex!! z"), None);
    }

    #[test]
    fn a_fleet_has_one_parameter_key_whatever_its_labels() {
        let k = parameter_key("/fleets/web");
        assert_eq!(parameter_key("/fleets/web:canary"), k);
        assert_eq!(parameter_key("/fleets/web:12"), k);
        assert_eq!(
            parameter_key("arn:aws:ssm:eu-west-1:123456789012:parameter/fleets/web:stable"),
            k
        );
        assert_ne!(parameter_key("/fleets/api"), k);
        assert_eq!(k.len(), 8);
    }
}
