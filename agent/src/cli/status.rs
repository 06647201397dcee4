//! `status [--json]`: the state file, for people or for machines.

use crate::config::Config;
use crate::exit::Failure;
use crate::state::{HealthState, Outcome, RunRecord, Store};
use clap::Args;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the state as JSON (`null` when nothing was recorded yet).
    #[arg(long)]
    pub json: bool,
}

impl StatusArgs {
    pub fn run(self, config: &Config) -> Result<(), Failure> {
        let store = Store::at(&config.agent.state_dir);
        let state = store.read()?;
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&state).expect("state serialises")
            );
            return Ok(());
        }
        let Some(state) = state else {
            println!("no run recorded yet ({})", store.path().display());
            return Ok(());
        };
        println!("instance:     {}", state.instance_id);
        match &state.last_run {
            Some(r) => print_run("last run", r),
            None => println!("last run:     none"),
        }
        if let Some(a) = state
            .last_applied
            .as_ref()
            .filter(|a| Some(*a) != state.last_run.as_ref())
        {
            print_run("last applied", a);
        }
        for r in &state.rejected {
            println!(
                "rejected:     {} ({}) at {}: {}",
                r.store_path,
                r.flake.as_deref().unwrap_or("target unknown"),
                r.at,
                r.reason
            );
        }
        if !state.rejected.is_empty() {
            println!(
                "              (not applied again; `nixos-ami-agent forget-rejected` allows them)"
            );
        }
        if state.scripts.is_empty() {
            println!("scripts:      none ran on this instance");
        }
        for s in &state.scripts {
            let result = s.result.as_deref().unwrap_or("interrupted (not run again)");
            println!(
                "script:       {} ({} bytes, sha256 {}): {result}, started {}",
                s.label, s.size, s.sha256, s.started
            );
        }
        Ok(())
    }
}

fn outcome(o: Outcome) -> &'static str {
    match o {
        Outcome::Running => "running, or interrupted",
        Outcome::Applied => "applied",
        Outcome::Unchanged => "nothing to do",
        Outcome::NoTarget => "no target",
        Outcome::Failed => "failed",
    }
}

fn print_run(title: &str, r: &RunRecord) {
    let when = r.finished.as_deref().unwrap_or(&r.started);
    println!(
        "{:<14}{} at {when}",
        format!("{title}:"),
        outcome(r.outcome)
    );
    if let Some(t) = &r.target {
        println!("  target:     {} (from {})", t.flake, t.source);
    }
    if let Some(a) = r.action {
        println!("  action:     {}", a.as_str());
    }
    if let Some(p) = &r.store_path {
        println!("  store path: {p}");
    }
    if let Some(rb) = &r.reboot {
        let needed = if rb.needed { "needed" } else { "not needed" };
        let requested = if rb.requested { ", requested" } else { "" };
        println!(
            "  reboot:     {needed}{requested} (policy {}): {}",
            rb.policy.as_str(),
            rb.reason
        );
    }
    if let Some(h) = &r.health {
        let state = match h.state {
            HealthState::Pending => "pending (the gate did not finish; the next run checks)",
            HealthState::AwaitingBoot => "judged after the reboot into it",
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy, kept",
            HealthState::RollingBack => "unhealthy, rolling back (the next run finishes it)",
            HealthState::RolledBack => "unhealthy, rolled back",
        };
        println!("  health:     {state}");
        for p in &h.problems {
            println!("    problem:  {p}");
        }
        if let Some(rb) = &h.rollback {
            println!("  rollback:   {rb}");
        }
    }
    if let Some(m) = &r.message {
        println!("  message:    {m}");
    }
}
