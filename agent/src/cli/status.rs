//! `status [--json] [--wait [--timeout DURATION]]`: the overall result
//! (the newest run's, with its exit code, from the run history: also runs
//! that ended before the instance was known), the recent runs, and the
//! state file, for people or for machines.

use crate::config::Config;
use crate::exit::{self, Failure};
use crate::history::{self, Entry};
use crate::phases::{Phases, human};
use crate::safe_dir::SafeDir;
use crate::state::{HealthState, Outcome, RunRecord, Store};
use clap::Args;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the state as JSON, with `result` (the newest run) and `runs`
    /// (the recent ones); `null` when nothing was recorded yet.
    #[arg(long)]
    pub json: bool,
    /// Block until a run of this boot has finished and its unit is not
    /// restarting it, then exit with that run's exit code (like
    /// `cloud-init status --wait`).
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long (exit 75); default: wait as long as
    /// it takes.
    #[arg(long, requires = "wait", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

fn runs(config: &Config) -> Vec<Entry> {
    match SafeDir::existing(&config.agent.state_dir) {
        Ok(Some(d)) => history::read(&d),
        _ => vec![],
    }
}

fn summary(e: &Entry) -> String {
    let code = e
        .exit_code
        .map(|c| format!(" (exit {c})"))
        .unwrap_or_default();
    let when = e.finished.as_deref().unwrap_or(&e.started);
    let result = if e.result == "running" && e.finished.is_none() {
        "running (or died: no end recorded)"
    } else {
        &e.result
    };
    format!(
        "{result}{code} at {when}{}",
        e.message
            .as_deref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default()
    )
}

/// Whether systemd is (re)starting the boot unit: a finished run is not
/// the last word while its unit waits to restart it.
async fn boot_unit_busy() -> bool {
    let Ok(conn) = zbus::Connection::system().await else {
        return false;
    };
    let Ok(m) = crate::systemd::manager(&conn).await else {
        return false;
    };
    let Ok(units) = m.list_units_by_names(&["nixos-ami-agent.service"]).await else {
        return false;
    };
    units
        .first()
        .is_some_and(|u| u.3 == "activating" || u.3 == "reloading")
}

impl StatusArgs {
    /// The exit code: 0, or with `--wait` the awaited run's.
    pub async fn run(self, config: &Config) -> Result<u8, Failure> {
        let mut code = exit::OK;
        if self.wait {
            let this_boot = crate::system::boot_id(&config.agent.boot_id);
            let deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
            loop {
                let done = runs(config).into_iter().rev().find(|e| {
                    e.exit_code.is_some() && (this_boot.is_none() || e.boot_id == this_boot)
                });
                if let Some(e) = done {
                    let newest_running = runs(config).last().is_some_and(|l| l.exit_code.is_none());
                    if !newest_running && !boot_unit_busy().await {
                        code = e.exit_code.unwrap_or(exit::OK);
                        break;
                    }
                }
                if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    eprintln!(
                        "no run of this boot finished within {}",
                        humantime::format_duration(self.timeout.unwrap_or_default())
                    );
                    return Ok(exit::TEMPFAIL);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        self.show(config)?;
        Ok(code)
    }

    fn show(&self, config: &Config) -> Result<(), Failure> {
        let store = Store::at(&config.agent.state_dir);
        let state = store.read()?;
        let runs = runs(config);
        let fetch = SafeDir::existing(&config.agent.state_dir)
            .ok()
            .flatten()
            .and_then(|d| crate::fetch::read(&d));
        if self.json {
            let mut v = serde_json::to_value(&state).expect("state serialises");
            if !runs.is_empty() {
                let obj = match &mut v {
                    serde_json::Value::Object(o) => o,
                    other => {
                        *other = serde_json::Value::Object(Default::default());
                        other.as_object_mut().expect("just made")
                    }
                };
                obj.insert(
                    "result".into(),
                    serde_json::to_value(runs.last()).expect("serialises"),
                );
                obj.insert(
                    "runs".into(),
                    serde_json::to_value(&runs).expect("serialises"),
                );
            }
            if let Some(f) = &fetch {
                if !v.is_object() {
                    v = serde_json::Value::Object(Default::default());
                }
                v.as_object_mut()
                    .expect("an object")
                    .insert("fetch".into(), serde_json::to_value(f).expect("serialises"));
            }
            println!("{}", serde_json::to_string_pretty(&v).expect("serialises"));
            return Ok(());
        }
        if let Some(last) = runs.last() {
            println!("result:       {}", summary(last));
        }
        let Some(state) = state else {
            if runs.is_empty() {
                println!("no run recorded yet ({})", store.path().display());
            } else {
                println!("instance:     not known yet (no run got that far)");
                print_history(&runs);
            }
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
        if let Some(f) = &fetch {
            print_fetch(f);
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
        print_history(&runs);
        Ok(())
    }
}

fn print_history(runs: &[Entry]) {
    if runs.len() > 1 {
        println!("recent runs:  (newest last)");
        for e in runs.iter().rev().take(5).rev() {
            println!("  {}", summary(e));
        }
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
    let phases = Phases::from_records(&r.phases);
    if !phases.is_empty() {
        println!("  phases:     {}", phases.summary());
    }
    if let Some(ms) = r.after_boot_ms {
        println!(
            "  after boot: finished {} after the machine booted",
            human(Duration::from_millis(ms))
        );
    }
}

/// The boot's fetch (`nixos-ami-agent-fetch.service`), as it recorded it.
fn print_fetch(f: &crate::fetch::Record) {
    let when = match f.after_boot_ms {
        Some(ms) => format!(
            "{} ({} after the boot)",
            f.finished,
            human(Duration::from_millis(ms))
        ),
        None => f.finished.clone(),
    };
    println!("last fetch:   {} at {when}", f.outcome.as_str());
    println!("  message:    {}", f.message);
    let phases = Phases::from_records(&f.phases);
    if !phases.is_empty() {
        println!("  phases:     {}", phases.summary());
    }
}
