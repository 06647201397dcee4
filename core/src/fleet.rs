//! `fleet status`: a fleet's convergence from what SSM Compliance holds,
//! pure. The agent's reports (see [`crate::compliance`]) are read back as
//! resource summaries (one per instance), grouped by the parameter version
//! each run read and the system each instance runs, and judged against
//! the parameter's current version.
//!
//! Listed: the instances that report, of the tag when one is named, and
//! reading the parameter when one is named (the execution ID carries a
//! key of its name, so fleets sharing a region do not mix). Converged:
//! every listed instance reported COMPLIANT, on the parameter's current
//! version when one is named, and every instance of the tag (when one is
//! named) reported at all.

use crate::compliance::{ExecutionId, parameter_key};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// One instance's last report, from `ListResourceComplianceSummaries`.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub instance_id: String,
    pub compliant: bool,
    pub severity: String,
    /// Seconds since the epoch.
    pub reported_at: f64,
    pub execution_id: String,
}

/// A report's item, from `ListComplianceItems` (fetched for a few
/// instances only: one per group, and those that are not converged).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Details {
    pub title: String,
    pub target: Option<String>,
    pub store_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Parameter {
    pub name: String,
    pub version: i64,
    /// The value as it may be shown (a SecureString's placeholder).
    pub value: String,
}

pub struct Inputs<'a> {
    pub summaries: &'a [Summary],
    pub parameter: Option<&'a Parameter>,
    /// The instances that carry the tag, when `--tag` was given.
    pub tagged: Option<&'a [String]>,
    pub details: &'a HashMap<String, Details>,
    /// Seconds since the epoch.
    pub now: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Instance {
    pub instance_id: String,
    /// `COMPLIANT` or `NON_COMPLIANT`, as reported.
    pub status: &'static str,
    pub severity: String,
    pub age_seconds: u64,
    pub ssm_version: Option<i64>,
    /// The running system's store directory name.
    pub system: Option<String>,
    pub converged: bool,
    /// Why not, in words (the report's title, or "behind").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Group {
    pub ssm_version: Option<i64>,
    pub system: Option<String>,
    pub instances: usize,
    pub compliant: usize,
    /// From one instance of the group.
    pub target: Option<String>,
    pub store_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct View {
    pub parameter: Option<Parameter>,
    pub converged: bool,
    pub reporting: usize,
    pub compliant: usize,
    pub not_converged: usize,
    pub groups: Vec<Group>,
    /// Not converged first, then by instance ID.
    pub instances: Vec<Instance>,
    /// Tagged instances with no report.
    pub not_reporting: Vec<String>,
}

/// The instances a view lists: of the tag when one is named (whatever
/// they read: reading another parameter is news), else those that read
/// the parameter when one is named, else all that report.
pub fn listed<'a>(
    summaries: &'a [Summary],
    parameter: Option<&Parameter>,
    tagged: Option<&[String]>,
) -> Vec<&'a Summary> {
    let tagged: Option<std::collections::HashSet<&str>> =
        tagged.map(|t| t.iter().map(String::as_str).collect());
    let key = parameter.map(|p| parameter_key(&p.name));
    summaries
        .iter()
        .filter(|s| match &tagged {
            Some(t) => t.contains(s.instance_id.as_str()),
            None => key.as_deref().is_none_or(|k| {
                ExecutionId::parse(&s.execution_id).and_then(|e| e.parameter) == Some(k)
            }),
        })
        .collect()
}

pub fn view(i: Inputs<'_>) -> View {
    let key = i.parameter.map(|p| parameter_key(&p.name));
    let listed = listed(i.summaries, i.parameter, i.tagged);
    let current = i.parameter.map(|p| p.version);
    let mut instances: Vec<Instance> = listed
        .iter()
        .map(|s| {
            let id = ExecutionId::parse(&s.execution_id);
            let ssm_version = id.as_ref().and_then(|e| e.ssm_version);
            let system = id.as_ref().and_then(|e| e.running).map(str::to_owned);
            let reads = id.as_ref().and_then(|e| e.parameter);
            let other_parameter = key.is_some() && reads != key.as_deref();
            let behind = match (current, ssm_version) {
                (Some(c), Some(v)) => v < c,
                // Not from this agent, or no parameter read: not on the
                // current version.
                (Some(_), None) => true,
                (None, _) => false,
            };
            let reason = if !s.compliant {
                Some(i.details.get(&s.instance_id).map_or_else(
                    || format!("{} (not fetched)", s.severity),
                    |d| d.title.clone(),
                ))
            } else if other_parameter {
                Some(match i.parameter {
                    Some(p) => format!(
                        "its last run read another parameter than {}, or none",
                        p.name
                    ),
                    None => "its last run read another parameter".to_owned(),
                })
            } else if behind {
                Some(match (ssm_version, current) {
                    (Some(v), Some(c)) => {
                        format!("behind: its last run read version {v}, the parameter is at {c}")
                    }
                    _ => "behind: its last run read no version of the parameter".to_owned(),
                })
            } else {
                None
            };
            Instance {
                instance_id: s.instance_id.clone(),
                status: if s.compliant {
                    "COMPLIANT"
                } else {
                    "NON_COMPLIANT"
                },
                severity: s.severity.clone(),
                age_seconds: (i.now - s.reported_at).max(0.0) as u64,
                ssm_version,
                system,
                converged: s.compliant && !behind && !other_parameter,
                reason,
            }
        })
        .collect();
    instances.sort_by(|a, b| (a.converged, &a.instance_id).cmp(&(b.converged, &b.instance_id)));

    let mut groups: BTreeMap<(Option<i64>, Option<String>), Group> = BTreeMap::new();
    for inst in &instances {
        let g = groups
            .entry((inst.ssm_version, inst.system.clone()))
            .or_insert_with(|| Group {
                ssm_version: inst.ssm_version,
                system: inst.system.clone(),
                instances: 0,
                compliant: 0,
                target: None,
                store_path: None,
            });
        g.instances += 1;
        if inst.status == "COMPLIANT" {
            g.compliant += 1;
        }
        if g.target.is_none()
            && let Some(d) = i.details.get(&inst.instance_id)
        {
            g.target = d.target.clone();
            g.store_path = d.store_path.clone();
        }
    }
    // Largest first: where the fleet is.
    let mut groups: Vec<Group> = groups.into_values().collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.instances));

    let reported: std::collections::HashSet<&str> =
        i.summaries.iter().map(|s| s.instance_id.as_str()).collect();
    let mut not_reporting: Vec<String> = i
        .tagged
        .unwrap_or_default()
        .iter()
        .filter(|t| !reported.contains(t.as_str()))
        .cloned()
        .collect();
    not_reporting.sort();

    let not_converged = instances.iter().filter(|x| !x.converged).count();
    View {
        parameter: i.parameter.cloned(),
        converged: !instances.is_empty() && not_converged == 0 && not_reporting.is_empty(),
        reporting: instances.len(),
        compliant: instances.iter().filter(|x| x.status == "COMPLIANT").count(),
        not_converged,
        groups,
        instances,
        not_reporting,
    }
}

/// The instances whose details are worth a call each: one per group (for
/// its target), and those not converged, at most `max` in all.
pub fn wanted_details(summaries: &[&Summary], max: usize) -> Vec<String> {
    let mut seen_groups = std::collections::HashSet::new();
    let mut out = vec![];
    for s in summaries.iter().filter(|s| !s.compliant) {
        if out.len() == max {
            return out;
        }
        out.push(s.instance_id.clone());
        seen_groups.insert(group_key(s));
    }
    for s in summaries {
        if out.len() == max {
            break;
        }
        if seen_groups.insert(group_key(s)) {
            out.push(s.instance_id.clone());
        }
    }
    out
}

fn group_key(s: &Summary) -> &str {
    &s.execution_id
}

/// "4m", "2h", "3d": how long ago.
pub fn age(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exec` as `vN SYSTEM`, of /fleets/web.
    fn summary(id: &str, compliant: bool, exec: &str) -> Summary {
        let (v, system) = exec.split_once(' ').unwrap();
        Summary {
            instance_id: id.into(),
            compliant,
            severity: if compliant { "INFORMATIONAL" } else { "HIGH" }.into(),
            reported_at: 1000.0,
            execution_id: format!("{v} {} {system}", parameter_key("/fleets/web")),
        }
    }

    fn param(version: i64) -> Parameter {
        Parameter {
            name: "/fleets/web".into(),
            version,
            value: "acme/web/0.2#x".into(),
        }
    }

    #[test]
    fn converged_only_when_every_instance_runs_the_current_version() {
        let s = [
            summary("i-1", true, "v8 new-system"),
            summary("i-2", true, "v8 new-system"),
            summary("i-3", true, "v7 old-system"),
        ];
        let details = HashMap::new();
        let p = param(8);
        let v = view(Inputs {
            summaries: &s,
            parameter: Some(&p),
            tagged: None,
            details: &details,
            now: 1300.0,
        });
        assert!(!v.converged);
        assert_eq!((v.reporting, v.compliant, v.not_converged), (3, 3, 1));
        assert_eq!(v.instances[0].instance_id, "i-3", "not converged first");
        assert_eq!(
            v.instances[0].reason.as_deref(),
            Some("behind: its last run read version 7, the parameter is at 8")
        );
        assert_eq!(v.instances[0].age_seconds, 300);
        assert_eq!(v.groups[0].instances, 2);
        assert_eq!(v.groups[0].system.as_deref(), Some("new-system"));

        // Without a parameter, compliant is converged.
        let v = view(Inputs {
            summaries: &s,
            parameter: None,
            tagged: None,
            details: &details,
            now: 1300.0,
        });
        assert!(v.converged);
    }

    #[test]
    fn failures_carry_their_titles_and_silent_tagged_instances_count() {
        let s = [
            summary("i-1", true, "v8 new-system"),
            summary("i-2", false, "v8 old-system"),
            summary("i-9", true, "v8 new-system"),
        ];
        let mut details = HashMap::new();
        details.insert(
            "i-2".to_owned(),
            Details {
                title: "failed (exit 1): rolled back".into(),
                target: Some("acme/web/0.2#x".into()),
                store_path: Some("/nix/store/new-system".into()),
            },
        );
        let tagged = ["i-1".to_owned(), "i-2".to_owned(), "i-3".to_owned()];
        let p = param(8);
        let v = view(Inputs {
            summaries: &s,
            parameter: Some(&p),
            tagged: Some(&tagged),
            details: &details,
            now: 1000.0,
        });
        assert_eq!(v.reporting, 2, "i-9 is not tagged");
        assert_eq!(v.not_reporting, ["i-3"]);
        assert!(!v.converged);
        assert_eq!(
            v.instances[0].reason.as_deref(),
            Some("failed (exit 1): rolled back")
        );
        let g = v
            .groups
            .iter()
            .find(|g| g.system.as_deref() == Some("old-system"))
            .unwrap();
        assert_eq!(g.target.as_deref(), Some("acme/web/0.2#x"));
    }

    #[test]
    fn another_fleets_instances_are_not_listed_unless_tagged() {
        let mut api = summary("i-api", true, "v9 api-system");
        api.execution_id = format!("v9 {} api-system", parameter_key("/fleets/api"));
        let s = [summary("i-1", true, "v8 new-system"), api];
        let details = HashMap::new();
        let p = param(8);
        let v = view(Inputs {
            summaries: &s,
            parameter: Some(&p),
            tagged: None,
            details: &details,
            now: 1000.0,
        });
        assert_eq!(v.reporting, 1);
        assert!(v.converged);
        // Tagged into this fleet, but reading another parameter: news.
        let tagged = ["i-1".to_owned(), "i-api".to_owned()];
        let v = view(Inputs {
            summaries: &s,
            parameter: Some(&p),
            tagged: Some(&tagged),
            details: &details,
            now: 1000.0,
        });
        assert!(!v.converged);
        assert!(
            v.instances[0]
                .reason
                .as_deref()
                .unwrap()
                .contains("another parameter"),
            "{:?}",
            v.instances[0]
        );
    }

    #[test]
    fn nothing_reporting_is_not_converged() {
        let v = view(Inputs {
            summaries: &[],
            parameter: None,
            tagged: None,
            details: &HashMap::new(),
            now: 0.0,
        });
        assert!(!v.converged);
    }

    #[test]
    fn details_are_fetched_for_failures_and_one_per_group_within_a_cap() {
        let mut s: Vec<Summary> = (0..100)
            .map(|n| summary(&format!("i-{n:03}"), true, "v8 new-system"))
            .collect();
        s.push(summary("i-bad", false, "v8 old-system"));
        s.push(summary("i-old", true, "v7 old-system"));
        let s: Vec<&Summary> = s.iter().collect();
        assert_eq!(wanted_details(&s, 10), ["i-bad", "i-000", "i-old"]);
        assert_eq!(wanted_details(&s, 1), ["i-bad"]);
    }

    #[test]
    fn ages() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(600), "10m");
        assert_eq!(age(3 * 3600), "3h");
        assert_eq!(age(3 * 86400), "3d");
    }
}
