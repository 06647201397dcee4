//! `plan`: what `run` would do, with no side effects (no login, no
//! resolve, no writes). Online it reads IMDS and the SSM parameter like
//! `run`; with `--user-data FILE` it touches no network at all.

use crate::config::Config;
use crate::exit::Failure;
use crate::plan::{self, Plan, PlanInputs, PlannedUserData, RebootAssessment};
use crate::run::{self, Environment};
use crate::settings::{Source, Target};
use crate::state::Store;
use crate::userdata::Digest;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Plan from this user-data file instead of IMDS, offline: no IMDS, no
    /// SSM (an SSM target is shown as the parameter to read).
    #[arg(long, value_name = "FILE")]
    pub user_data: Option<PathBuf>,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

impl PlanArgs {
    /// With `--json`, a failure is a JSON document on stdout too (what a
    /// script parses), `{"error": ..., "exit-code": ...}`.
    pub async fn run(self, config: &Config, env: &Environment) -> Result<(), Failure> {
        let json = self.json;
        let result = self.plan(config, env).await;
        if let (true, Err(e)) = (json, &result) {
            println!(
                "{}",
                serde_json::json!({"error": e.to_string(), "exit-code": e.exit_code()})
            );
        }
        result
    }

    async fn plan(self, config: &Config, env: &Environment) -> Result<(), Failure> {
        let agent = &config.agent;
        let (instance_id, raw, ud, settings, target) = match &self.user_data {
            Some(file) => {
                let raw = super::read_user_data(file)?;
                let ud = run::sniff(Some(&raw))?;
                let settings = run::settings(config, &ud);
                let target = settings.target.as_ref().map(|t| match &t.value {
                    Target::Flake(f) => (f.as_str().to_owned(), t.source.clone()),
                    Target::Ssm(p) => (
                        format!(
                            "<the value of SSM parameter {}, read at run time>",
                            p.as_str()
                        ),
                        t.source.clone(),
                    ),
                });
                (None, Some(raw), ud, settings, target)
            }
            None => {
                let (imds, endpoint) = run::imds(config, env)?;
                let instance_id = imds.instance_id().await?;
                let raw = imds.user_data().await?;
                let ud = run::sniff(raw.as_deref())?;
                let settings = run::settings(config, &ud);
                let r = run::resolve_target(config, env, &imds, &endpoint, settings).await?;
                let source = r
                    .settings
                    .target
                    .as_ref()
                    .map_or(Source::Default, |t| t.source.clone());
                let target = r.shown.map(|s| (s, source));
                (Some(instance_id), raw, ud, r.settings, target)
            }
        };
        // Read-only, unlocked: the state file is replaced atomically.
        let state = Store::at(&agent.state_dir).read().ok().flatten();
        let state = state.filter(|s| Some(&s.instance_id) == instance_id.as_ref());
        let last_reboot = state
            .as_ref()
            .and_then(|s| s.last_run.as_ref()?.reboot.as_ref())
            .map(|r| RebootAssessment {
                needed: r.needed,
                reason: r.reason.clone(),
            });
        let ran: Option<Vec<String>> = instance_id.as_ref().map(|_| {
            state
                .map(|s| s.scripts.into_iter().map(|r| r.label).collect())
                .unwrap_or_default()
        });
        let user_data = PlannedUserData {
            kind: ud.kind,
            description: ud.kind.describe().to_owned(),
            digest: raw.as_deref().map(Digest::of),
        };
        let plan = plan::build(PlanInputs {
            instance_id: instance_id.as_deref(),
            user_data,
            ignored_parts: &ud.ignored,
            settings: &settings,
            target,
            scripts: &ud.scripts,
            scripts_ran: ran.as_deref(),
            current_system: &agent.current_system,
            system_profile: &agent.system_profile,
            last_reboot,
        });
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&plan).expect("plan serialises")
            );
        } else {
            print(&plan);
        }
        Ok(())
    }
}

fn print(p: &Plan) {
    println!(
        "instance:   {}",
        p.instance_id
            .as_deref()
            .unwrap_or("unknown (offline plan from a file)")
    );
    println!("user data:  {}", p.user_data);
    for part in &p.ignored_parts {
        println!("            {part}: for another tool, left alone");
    }
    match &p.target {
        Some(t) => println!("target:     {}  [{}]", t.value, t.source),
        None => println!("target:     none: nothing will be applied"),
    }
    println!("action:     {}  [{}]", p.action.value, p.action.source);
    println!("reboot:     {}  [{}]", p.reboot.value, p.reboot.source);
    match &p.last_reboot {
        Some(r) if r.needed => println!(
            "            the last run found a reboot needed: {}",
            r.reason
        ),
        Some(r) => println!(
            "            the last run found no reboot needed: {}",
            r.reason
        ),
        None => println!("            whether one is needed is decided after resolving the target"),
    }
    println!("login:      {}  [{}]", p.login.value, p.login.source);
    if p.scripts.is_empty() {
        println!("scripts:    none");
    }
    for s in &p.scripts {
        let verdict = if s.will_run {
            "will run"
        } else {
            "will not run"
        };
        println!(
            "script:     {} ({} bytes, sha256 {}): {verdict}, {}",
            s.label, s.size, s.sha256, s.note
        );
    }
    if p.steps.is_empty() {
        println!("steps:      none");
    } else {
        println!("steps:");
        for (i, s) in p.steps.iter().enumerate() {
            println!("  {}. {s}", i + 1);
        }
    }
}
