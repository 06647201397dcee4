//! The health gate around an apply, and the rollback when it fails: right
//! after a `switch` or `test` (in place), and in the first run after the
//! reboot into a system applied with `boot` (or a `switch` that needed a
//! reboot), before that run does anything else. A gate that did not finish
//! (the run was stopped, or died) is run again by the next run.
//!
//! [`crate::health`] observes, [`crate::health_rules::verdict`] judges,
//! [`crate::steps::rollback`] puts the previous system back; this module
//! decides which, and records each step in the state first.

use crate::config::{Agent, Config};
use crate::exit::Failure;
use crate::health_rules::{Health, HealthLayer, Verdict};
use crate::log;
use crate::notify;
use crate::redact::Redactor;
use crate::state::{HealthRecord, HealthState, RebootRecord, Rejected, RunRecord, State, Store};
use crate::system;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Where the system under judgement is, and so how it is rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Running since a switch in this boot: rolled back in place
    /// (`switch-to-configuration switch`), then the previous system judged.
    InPlace,
    /// Booted into: rolled back as the boot default
    /// (`switch-to-configuration boot`) and rebooted once.
    Booted,
}

/// What the gate needs from before the apply: the system running then
/// (where a rollback goes) and the units already failed.
pub struct BeforeSwitch {
    pub previous: Option<PathBuf>,
    pub failed: Option<BTreeSet<String>>,
}

pub async fn before_switch(agent: &Agent) -> Result<BeforeSwitch, Failure> {
    let previous = system::canonical(&agent.current_system);
    let failed = match crate::health::failed_units(std::time::Duration::from_secs(10)).await {
        Ok(Ok(units)) => Some(units),
        Ok(Err(why)) => {
            tracing::warn!(
                step = crate::health::STEP,
                "the units failed before the apply could not be listed ({why}); after it, every failed unit counts"
            );
            None
        }
        Err(i) => {
            return Err(Failure::Interrupted(format!(
                "{i} before the apply started"
            )));
        }
    };
    Ok(BeforeSwitch { previous, failed })
}

/// The record a gate starts from: pending, with what it needs to resume.
pub fn pending_record(before: &BeforeSwitch) -> HealthRecord {
    HealthRecord {
        state: HealthState::Pending,
        problems: vec![],
        previous: before.previous.as_ref().map(|p| p.display().to_string()),
        failed_before: before.failed.iter().flatten().cloned().collect(),
        rollback: None,
        checked: None,
        applied_boot: None,
        mode: Some(Mode::InPlace),
        reboot_boot: None,
    }
}

/// What is left to do about the last apply, found at the start of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Judge it (the gate did not finish, or this is the boot it awaited).
    Judge,
    /// It was judged unhealthy and the rollback did not finish (stopped,
    /// crashed, or failed): finish it, the verdict stands.
    RollBack,
    /// Rolled back as the boot default, but this boot still runs it: the
    /// reboot back was not carried out.
    RebootBack,
}

pub struct Unconfirmed {
    pub step: Step,
    pub mode: Mode,
    pub target: PathBuf,
    pub flake: String,
    pub record: HealthRecord,
    /// When the apply started: its records are updated.
    pub started: String,
}

/// What the last apply left that this run must do first. `previous_run`:
/// the run before this one (it may have died between its switch and the
/// record of its apply); `this_boot`: the kernel's boot ID.
pub fn unconfirmed(
    state: &State,
    previous_run: Option<&RunRecord>,
    agent: &Agent,
    this_boot: Option<&str>,
) -> Option<Unconfirmed> {
    let open = |r: &&RunRecord| {
        r.health.as_ref().is_some_and(|h| {
            matches!(
                h.state,
                HealthState::Pending | HealthState::RollingBack | HealthState::AwaitingBoot
            )
        })
    };
    previous_run
        .filter(open)
        .and_then(|r| left_by(r, agent, this_boot))
        .or_else(|| {
            state
                .last_applied
                .as_ref()
                .and_then(|r| left_by(r, agent, this_boot))
        })
}

/// What `applied` (a run that applied, or started to) left to do.
fn left_by(applied: &RunRecord, agent: &Agent, this_boot: Option<&str>) -> Option<Unconfirmed> {
    let h = applied.health.as_ref()?;
    let target = PathBuf::from(applied.store_path.as_deref()?);
    let is = |p: &Path| system::canonical(p).as_deref() == Some(target.as_path());
    let mode = h.mode.unwrap_or(Mode::InPlace);
    let booted_in = is(&agent.booted_system) && is(&agent.current_system);
    let step = match (h.state, mode) {
        (HealthState::Pending, Mode::InPlace) if is(&agent.current_system) => Step::Judge,
        (HealthState::Pending, Mode::Booted) if booted_in => Step::Judge,
        (HealthState::AwaitingBoot, _)
            if booted_in
                && (h.applied_boot.is_none() || h.applied_boot.as_deref() != this_boot) =>
        {
            return Some(Unconfirmed {
                step: Step::Judge,
                mode: Mode::Booted,
                target,
                flake: flake(applied),
                record: h.clone(),
                started: applied.started.clone(),
            });
        }
        (HealthState::RollingBack, Mode::InPlace) if is(&agent.current_system) => Step::RollBack,
        (HealthState::RollingBack, Mode::Booted) if is(&agent.booted_system) => Step::RollBack,
        (HealthState::RolledBack, Mode::Booted) if booted_in => {
            let asked_in = h.reboot_boot.as_deref();
            if asked_in.is_some() && asked_in != this_boot {
                // Asked in an earlier boot, and the machine came back on
                // the rejected system anyway: asking again would loop.
                tracing::error!(
                    step = crate::health::STEP,
                    "{} is running again although it was rolled back and the machine rebooted \
                     (the boot loader did not take the previous system?); not rebooting again",
                    target.display()
                );
                return None;
            }
            Step::RebootBack
        }
        _ => return None,
    };
    Some(Unconfirmed {
        step,
        mode,
        target,
        flake: flake(applied),
        record: h.clone(),
        started: applied.started.clone(),
    })
}

fn flake(r: &RunRecord) -> String {
    r.target
        .as_ref()
        .map(|t| t.flake.clone())
        .unwrap_or_default()
}

/// The gate, and the rollback when it fails. `Ok`: healthy. Unhealthy is
/// a failure whether it was rolled back or kept (`health.rollback =
/// false`, or the rollback failed).
pub struct Gate<'a> {
    pub config: &'a Config,
    pub store: &'a Store,
    pub user_health: &'a HealthLayer,
    /// The settings the run started with: used when the running system's
    /// own config file cannot be read.
    pub fallback: &'a Health,
    pub redactor: &'a Redactor,
    pub target: &'a Path,
    pub flake: &'a str,
    pub mode: Mode,
    /// When the apply under judgement started: its record in
    /// `last-applied` is updated along with this run's.
    pub applied_started: &'a str,
}

impl Gate<'_> {
    /// The gate's settings from the config file the running system carries
    /// now (read again: the switch replaced /etc), under user data's.
    fn settings(&self) -> Result<Health, String> {
        match Config::load(&self.config.path, false) {
            Ok(c) => Ok(Health::merge([&c.defaults.health, self.user_health])),
            Err(e) => Err(format!("the running system's config file is invalid: {e}")),
        }
    }

    async fn judge(
        &self,
        failed_before: Option<&BTreeSet<String>>,
    ) -> Result<(Verdict, Health), Failure> {
        let (health, problem) = match self.settings() {
            Ok(h) => (h, None),
            Err(p) => (self.fallback.clone(), Some(p)),
        };
        let mut verdict = crate::health::gate(
            &health,
            failed_before,
            self.redactor,
            &self.config.agent.current_system,
        )
        .await
        .map_err(|i| {
            Failure::Interrupted(format!(
                "{i} during the health gate; the next run checks again"
            ))
        })?;
        verdict.problems.extend(problem);
        Ok((verdict, health))
    }

    /// Records `h` in this run's record and the apply's, and saves.
    pub fn record(
        &self,
        state: &mut State,
        run: &mut RunRecord,
        h: &HealthRecord,
    ) -> Result<(), Failure> {
        run.health = Some(h.clone());
        state.last_run = Some(run.clone());
        if let Some(a) = state
            .last_applied
            .as_mut()
            .filter(|a| a.started == self.applied_started)
        {
            a.health = Some(h.clone());
        }
        self.store.save(state)?;
        Ok(())
    }

    /// Runs the gate from `rec` (recorded as pending first, with its
    /// mode) and acts on the verdict. A [`Mode::Booted`] rollback leaves
    /// this run's reboot record needed: the caller asks for the one
    /// reboot back.
    pub async fn run(
        &self,
        state: &mut State,
        run: &mut RunRecord,
        mut rec: HealthRecord,
    ) -> Result<(), Failure> {
        rec.state = HealthState::Pending;
        rec.mode = Some(self.mode);
        self.record(state, run, &rec)?;
        let shown = self.target.display();
        notify::status(&format!("checking the health of {}", self.flake));
        match self.mode {
            Mode::InPlace => tracing::info!(
                step = crate::health::STEP,
                "checking health after the switch"
            ),
            Mode::Booted => tracing::info!(
                step = crate::health::STEP,
                "booted into {shown}: checking its health before anything else"
            ),
        }
        // Units failed before the apply are not blamed on the target;
        // when they could not be listed the list is empty, and every
        // failed unit counts. After a reboot, the same list: a unit that
        // was broken before is no news in the new boot either.
        let before: BTreeSet<String> = rec.failed_before.iter().cloned().collect();
        let (verdict, health) = self.judge(Some(&before)).await?;
        rec.checked = Some(crate::state::now());
        rec.problems = verdict.problems.clone();
        if verdict.healthy() {
            rec.state = HealthState::Healthy;
            self.record(state, run, &rec)?;
            tracing::info!(step = crate::health::STEP, "healthy");
            return Ok(());
        }
        let problems = verdict.problems.join("; ");
        tracing::error!(
            step = crate::health::STEP,
            "unhealthy {} {shown}: {problems}",
            self.when()
        );
        if !health.rollback {
            rec.state = HealthState::Unhealthy;
            self.record(state, run, &rec)?;
            return Err(Failure::Unhealthy(format!(
                "unhealthy {} {shown}, kept (health.rollback = false): {problems}",
                self.when()
            )));
        }
        // From here the verdict stands: rejected, and rolling back until
        // it is done (a stop, a crash or a failure leaves RollingBack,
        // which the next run finishes without judging again).
        state.reject(Rejected {
            store_path: shown.to_string(),
            flake: Some(self.flake.to_owned()).filter(|f| !f.is_empty()),
            at: crate::state::now(),
            reason: problems,
        });
        rec.state = HealthState::RollingBack;
        self.record(state, run, &rec)?;
        self.roll_back(state, run, rec).await
    }

    fn when(&self) -> &'static str {
        match self.mode {
            Mode::InPlace => "after switching to",
            Mode::Booted => "after booting into",
        }
    }

    /// Puts the previous system back, for a verdict already recorded in
    /// `rec` (state RollingBack).
    pub async fn roll_back(
        &self,
        state: &mut State,
        run: &mut RunRecord,
        mut rec: HealthRecord,
    ) -> Result<(), Failure> {
        let agent = &self.config.agent;
        let shown = self.target.display();
        let when = self.when();
        let problems = rec.problems.join("; ");
        let Some(previous) = rec.previous.clone().map(PathBuf::from) else {
            rec.state = HealthState::Unhealthy;
            rec.rollback = Some("not possible: the system before the apply is not known".into());
            self.record(state, run, &rec)?;
            return Err(Failure::Unhealthy(format!(
                "unhealthy {when} {shown}, and no previous system to roll back to: {problems}"
            )));
        };
        let action = match self.mode {
            Mode::InPlace => "switch",
            Mode::Booted => "boot",
        };
        notify::status(&format!(
            "unhealthy; rolling back to {}",
            previous.display()
        ));
        tracing::warn!(
            step = crate::steps::rollback::STEP,
            "rolling back to {} ({action})",
            previous.display()
        );
        let rolled =
            crate::steps::rollback::rollback(agent, self.redactor, &previous, action).await;
        if let Err(crate::steps::StepError::Interrupted { reason, .. }) = &rolled {
            return Err(Failure::Interrupted(format!(
                "rollback: {reason}; the next run finishes it"
            )));
        }
        let link = match self.mode {
            Mode::InPlace => &agent.current_system,
            Mode::Booted => &agent.system_profile,
        };
        let now = system::canonical(link);
        let failed = match (rolled, now.as_deref() == Some(previous.as_path())) {
            (Err(e), _) => Some(e.to_string()),
            (Ok(()), false) => Some(format!(
                "{} is {} after it, not {}",
                link.display(),
                now.as_deref()
                    .map_or("absent".into(), |p| p.display().to_string()),
                previous.display()
            )),
            (Ok(()), true) => None,
        };
        if let Some(why) = failed {
            // Still RollingBack: the next run (the unit's restart, the
            // timer) tries again.
            rec.rollback = Some(format!("failed: {why}; the next run tries again"));
            self.record(state, run, &rec)?;
            return Err(Failure::Unhealthy(format!(
                "unhealthy {when} {shown} ({problems}), and the rollback to {} failed: {why}",
                previous.display()
            )));
        }
        rec.state = HealthState::RolledBack;
        rec.rollback = Some(match self.mode {
            Mode::InPlace => format!("rolled back to {}", previous.display()),
            Mode::Booted => format!(
                "rolled back to {} as the boot default; it runs after the next boot",
                previous.display()
            ),
        });
        // In place, the previous system runs now: no reboot for the
        // target. Booted: the one reboot back, asked for by the caller.
        run.reboot = match self.mode {
            Mode::InPlace => None,
            Mode::Booted => Some(RebootRecord {
                policy: run
                    .reboot
                    .as_ref()
                    .map_or(crate::settings::RebootPolicy::IfNeeded, |r| r.policy),
                needed: true,
                reason: format!(
                    "rolled back: {} is the boot default again",
                    previous.display()
                ),
                requested: false,
                boot_id: None,
            }),
        };
        if let Some(a) = state
            .last_applied
            .as_mut()
            .filter(|a| a.started == self.applied_started)
        {
            a.reboot = None;
        }
        self.record(state, run, &rec)?;
        tracing::error!(
            message_id = log::message_id::ROLLED_BACK,
            store_path = %shown,
            previous = %previous.display(),
            "rolled back from {shown} to {}: {problems}",
            previous.display()
        );
        if self.mode == Mode::InPlace {
            // The previous system is judged too, and said: the operator
            // needs to know whether what runs now is healthy.
            let before: BTreeSet<String> = rec.failed_before.iter().cloned().collect();
            let (after, _) = self.judge(Some(&before)).await?;
            if after.healthy() {
                tracing::info!(
                    step = crate::health::STEP,
                    "the previous system {} is healthy",
                    previous.display()
                );
            } else {
                tracing::error!(
                    step = crate::health::STEP,
                    "the previous system {} is {} too",
                    previous.display(),
                    after.summary()
                );
            }
            rec.rollback = Some(format!(
                "rolled back to {}; it is {}",
                previous.display(),
                after.summary()
            ));
            self.record(state, run, &rec)?;
        }
        Err(Failure::RolledBack(format!(
            "unhealthy {when} {shown} ({problems}); {}; the store path is rejected",
            rec.rollback.as_deref().unwrap_or_default()
        )))
    }
}
