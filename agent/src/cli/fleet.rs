//! `fleet status`: run by an operator, with their own AWS credentials.

use crate::exit::{self, Failure};
use crate::fleet::{Fleet, Query};
use clap::{Args, Subcommand};
use nixos_ami_agent_core::fleet::{View, age};

#[derive(Debug, Args)]
pub struct FleetArgs {
    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Show whether a fleet converged, from what its instances reported to
    /// SSM Compliance.
    ///
    /// Every instance with `report-compliance` on (the NixOS module's
    /// default) reports each run's outcome (type Custom:NixOSAmiAgent).
    /// This lists the instances that report, grouped by the parameter
    /// version their last run read and the system they run, with those
    /// not converged first and how long ago each reported.
    ///
    /// Exit 0 only when every listed instance is COMPLIANT (runs its
    /// target, healthy), on the parameter's current version with
    /// --parameter, and every instance with the tag reported (--tag):
    /// usable as a gate in CI after a rollout. Exit 1 when not, 69 when
    /// AWS refused (the permission it needs is named), 75 when AWS could
    /// not be reached.
    ///
    /// Runs with your AWS credentials (environment, profile, SSO) and
    /// needs ssm:ListResourceComplianceSummaries and
    /// ssm:ListComplianceItems; ssm:GetParameter with --parameter (the
    /// value is not decrypted) and ssm:DescribeInstanceInformation with
    /// --tag.
    #[command(after_help = "Examples:\n  \
        nixos-ami-agent fleet status --parameter /fleets/web/target --tag Fleet=web\n  \
        nixos-ami-agent fleet status --region eu-west-1 --json | jq '.instances[] | select(.converged | not)'")]
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The fleet's SSM parameter (NAME, or NAME:LABEL for the version a
    /// label names): show its value and version, list the instances that
    /// read it (all of the tag's, with --tag), and count one whose last run
    /// read an older version as not converged.
    #[arg(long, value_name = "NAME")]
    pub parameter: Option<String>,
    /// Only the instances with this tag (as SSM knows them); an instance
    /// with the tag that never reported is not converged.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_tag)]
    pub tag: Option<(String, String)>,
    /// The region of the fleet; else AWS_REGION, AWS_DEFAULT_REGION, or
    /// your profile's region.
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// Print the whole view as JSON (every instance).
    #[arg(long)]
    pub json: bool,
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE (for example Fleet=web)")),
    }
}

/// At most this many instances in the text output's list.
const SHOWN: usize = 50;

impl FleetArgs {
    pub async fn run(self, env: &crate::run::Environment) -> Result<u8, Failure> {
        let FleetCommand::Status(a) = self.command;
        let region = match a.region.clone().or_else(|| env.region.clone()) {
            Some(r) => r,
            None => profile_region().await.ok_or_else(|| {
                Failure::Usage(
                    "no region: pass --region, or set AWS_REGION or a region in your AWS profile"
                        .into(),
                )
            })?,
        };
        let fleet = Fleet::new(&region).await.map_err(fail)?;
        let view = fleet
            .status(&Query {
                region: &region,
                parameter: a.parameter.as_deref(),
                tag: a.tag.as_ref().map(|(k, v)| (k.as_str(), v.as_str())),
            })
            .await
            .map_err(fail)?;
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&view).expect("the view serialises")
            );
        } else {
            print!("{}", render(&view, &region, a.tag.as_ref()));
        }
        Ok(if view.converged {
            exit::OK
        } else {
            exit::FAILED
        })
    }
}

fn fail(e: crate::fleet::FleetError) -> Failure {
    Failure::Fleet {
        message: e.message,
        transient: e.transient,
    }
}

async fn profile_region() -> Option<String> {
    use aws_config::meta::region::ProvideRegion;
    aws_config::profile::ProfileFileRegionProvider::new()
        .region()
        .await
        .map(|r| r.to_string())
}

fn render(v: &View, region: &str, tag: Option<&(String, String)>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if let Some(p) = &v.parameter {
        let _ = writeln!(
            out,
            "SSM parameter {}: version {}, {}",
            p.name, p.version, p.value
        );
    }
    let scope = match tag {
        Some((k, val)) => format!(" with tag {k}={val}"),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "{} instances{scope} report in {region} ({}): {} converged, {} not",
        v.reporting,
        nixos_ami_agent_core::compliance::COMPLIANCE_TYPE,
        v.reporting - v.not_converged,
        v.not_converged
    );
    if !v.groups.is_empty() {
        let _ = writeln!(
            out,
            "\n{:>9}  {:>9}  {:<8}  {:<50}  TARGET",
            "INSTANCES", "COMPLIANT", "VERSION", "SYSTEM"
        );
        for g in &v.groups {
            let _ = writeln!(
                out,
                "{:>9}  {:>9}  {:<8}  {:<50}  {}",
                g.instances,
                g.compliant,
                g.ssm_version
                    .map_or_else(|| "-".into(), |n| format!("v{n}")),
                g.system.as_deref().unwrap_or("-"),
                g.target.as_deref().unwrap_or("-")
            );
        }
    }
    let behind: Vec<_> = v.instances.iter().filter(|i| !i.converged).collect();
    if !behind.is_empty() {
        let _ = writeln!(out, "\nnot converged ({}):", behind.len());
        for i in behind.iter().take(SHOWN) {
            let _ = writeln!(
                out,
                "  {}  {}  {} ago  {}",
                i.instance_id,
                i.ssm_version
                    .map_or_else(|| "-".into(), |n| format!("v{n}")),
                age(i.age_seconds),
                i.reason.as_deref().unwrap_or("")
            );
        }
        if behind.len() > SHOWN {
            let _ = writeln!(
                out,
                "  ... and {} more (--json lists every instance)",
                behind.len() - SHOWN
            );
        }
    }
    if !v.not_reporting.is_empty() {
        let _ = writeln!(
            out,
            "\nnever reported ({}): the image has report-compliance off, the role lacks \
             ssm:PutComplianceItems, or no run has finished yet",
            v.not_reporting.len()
        );
        for id in v.not_reporting.iter().take(SHOWN) {
            let _ = writeln!(out, "  {id}");
        }
        if v.not_reporting.len() > SHOWN {
            let _ = writeln!(out, "  ... and {} more", v.not_reporting.len() - SHOWN);
        }
    }
    let _ = writeln!(
        out,
        "\n{}",
        if v.converged {
            "converged"
        } else if v.reporting == 0 && v.not_reporting.is_empty() {
            "not converged: no instance reports"
        } else {
            "not converged"
        }
    );
    out
}
