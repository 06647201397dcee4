//! `nixos-ami-agent fetch`: the first half of a boot's run, started by
//! `nixos-ami-agent-fetch.service` as soon as the network is online, while
//! the rest of the boot goes on. It reads the same sources as a run,
//! logs in, resolves, and downloads the target's closure (`fh fetch`,
//! [`crate::steps::fetch`]), but changes nothing: no switch, no state, no
//! lock. The run after `multi-user.target` finds the closure there and
//! only switches; when this fetch failed or has not finished, the run
//! fetches what is missing itself (the Nix daemon's path locks make two
//! downloads of one path wait for each other, not repeat it).
//!
//! Its result is kept in `fetch.json` in the state directory (advisory,
//! like the run history): what it fetched, how long each phase took,
//! for the run's and `status`'s report.

use crate::config::Config;
use crate::exit::Failure;
use crate::phases::{Phase, Timing, human};
use crate::plan::{self, Decision};
use crate::run::{self, Environment};
use crate::safe_dir::SafeDir;
use crate::state::Store;
use crate::steps::fetch;
use crate::timing::Clock;
use crate::{log, notify, system};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tracing::{Instrument, Span, field};

const FILE: &str = "fetch.json";
const MAX_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The closure is in the store (downloaded now, or already there).
    Fetched,
    /// Nothing to fetch: no target, the system already runs it, or it was
    /// rolled back.
    Nothing,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Fetched => "fetched",
            Outcome::Nothing => "nothing",
            Outcome::Failed => "failed",
        }
    }
}

/// The last fetch, as `fetch.json` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Record {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    pub started: String,
    pub finished: String,
    pub outcome: Outcome,
    /// The output ref, or `<SecureString NAME>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flake: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_path: Option<String>,
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<Timing>,
    /// How long after the machine's boot it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_boot_ms: Option<u64>,
}

impl Record {
    /// How long the download itself took.
    pub fn fetch_time(&self) -> Option<Duration> {
        self.phases
            .iter()
            .find(|t| t.phase == Phase::Fetch.name())
            .map(|t| Duration::from_millis(t.ms))
    }
}

pub fn read(dir: &SafeDir) -> Option<Record> {
    match dir.read(FILE, MAX_BYTES) {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).ok(),
        _ => None,
    }
}

fn write(dir: &SafeDir, r: &Record) {
    let mut bytes = serde_json::to_vec_pretty(r).expect("fetch record serialises");
    bytes.push(b'\n');
    // Advisory, as the run history: not fsynced.
    if let Err(e) = dir.write_atomic_unsynced(FILE, &format!(".{FILE}.tmp"), &bytes) {
        tracing::warn!("cannot record the fetch in {FILE}: {e}");
    }
}

/// What a successful fetch says.
pub struct Report {
    pub outcome: Outcome,
    pub message: String,
}

/// One fetch, in a span with the same journal fields as a run.
pub async fn fetch(config: &Config, env: &Environment) -> Result<Report, Failure> {
    let span = tracing::info_span!(
        "fetch",
        instance_id = field::Empty,
        flake_ref = field::Empty,
        store_path = field::Empty,
        ssm_parameter = field::Empty,
    );
    async {
        let clock = Clock::new();
        let started = crate::state::now();
        let mut shown = None;
        let mut store_path = None;
        // Without a state directory there is nowhere to keep the link.
        let store = Store::open(&config.agent.state_dir)?;
        let r = fetch_inner(config, env, &store, &clock, &mut shown, &mut store_path).await;
        let after_boot = crate::timing::since_boot();
        let phases = clock.phases();
        let (outcome, message) = match &r {
            Ok(rep) => (rep.outcome, rep.message.clone()),
            Err(e) => (Outcome::Failed, e.to_string()),
        };
        match &r {
            Ok(rep) => tracing::info!(
                message_id = log::message_id::FETCHED,
                outcome = outcome.as_str(),
                "{}",
                rep.message
            ),
            Err(e) => tracing::warn!(
                message_id = log::message_id::FETCHED,
                outcome = outcome.as_str(),
                exit_code = e.exit_code(),
                "fetch failed: {e}; the run fetches what is missing"
            ),
        }
        crate::timing::report("fetch", &phases, after_boot);
        notify::status(&message);
        write(
            store.safe_dir(),
            &Record {
                boot_id: system::boot_id(&config.agent.boot_id),
                started,
                finished: crate::state::now(),
                outcome,
                flake: shown,
                store_path,
                message,
                phases: phases.records(),
                after_boot_ms: after_boot.map(|d| d.as_millis() as u64),
            },
        );
        r
    }
    .instrument(span)
    .await
}

/// Whether a run of this boot has finished since `since` (RFC 3339, as
/// the history writes it: such strings sort by time).
fn run_finished_since(store: &Store, agent: &crate::config::Agent, since: &str) -> bool {
    let boot = system::boot_id(&agent.boot_id);
    boot.is_some()
        && crate::history::read(store.safe_dir())
            .iter()
            .any(|e| e.boot_id == boot && e.finished.as_deref().is_some_and(|f| f >= since))
}

async fn fetch_inner(
    config: &Config,
    env: &Environment,
    store: &Store,
    clock: &Clock,
    shown_out: &mut Option<String>,
    store_path_out: &mut Option<String>,
) -> Result<Report, Failure> {
    let agent = &config.agent;
    let started = crate::state::now();
    let (imds, endpoint) = run::imds(config, env)?;
    notify::status("reading instance metadata");
    let (instance_id, ud) = clock
        .time(Phase::Metadata, async {
            let id = imds.instance_id().await?;
            let raw = imds.user_data().await?;
            Ok::<_, Failure>((id, raw))
        })
        .await?;
    Span::current().record("instance_id", instance_id.as_str());
    // Bad user data: nothing is fetched, and the run says why.
    let ud = run::sniff(ud.as_deref())?;
    let settings = run::settings(config, &ud);
    let r = clock
        .time(
            Phase::Metadata,
            run::resolve_target(config, env, &imds, &endpoint, settings),
        )
        .await?;
    let Some(flake) = r.flake else {
        return Ok(Report {
            outcome: Outcome::Nothing,
            message: "nothing to fetch: no target".into(),
        });
    };
    let shown = r.shown.clone().unwrap_or_default();
    *shown_out = Some(shown.clone());
    Span::current().record("flake_ref", shown.as_str());
    let target =
        run::login_and_resolve(agent, &r.settings, &r.redactor, &flake, &shown, clock).await?;
    *store_path_out = Some(target.display().to_string());
    let action = r.settings.action.value;
    if let Decision::UpToDate { reason } = plan::decide(action, &target, &system::view(agent)) {
        return Ok(Report {
            outcome: Outcome::Nothing,
            message: format!("nothing to fetch: {reason}"),
        });
    }
    // Read only: the state is the run's (which may be running now).
    let rejected = store
        .read()
        .ok()
        .flatten()
        .filter(|s| s.instance_id == instance_id)
        .and_then(|s| s.rejection(&target.to_string_lossy()).cloned());
    if let Some(rej) = rejected {
        return Ok(Report {
            outcome: Outcome::Nothing,
            message: format!(
                "nothing to fetch: {} was rolled back at {} and is not applied again",
                target.display(),
                rej.at
            ),
        });
    }
    let (link, _) = links(store);
    if fetch::fetched(&link).as_deref() == Some(target.as_path()) {
        return Ok(Report {
            outcome: Outcome::Fetched,
            message: format!("{shown} ({}) is already fetched", target.display()),
        });
    }
    let got = run::fetch_timed(agent, clock, &r.redactor, &flake, &shown, &target, &link).await?;
    let running = system::view(agent).current;
    if running.as_deref() == Some(got.as_path()) || run_finished_since(store, agent, &started) {
        // The boot run did not wait for this fetch, and switched (the
        // system runs it, and its profile roots it) or is done: it
        // fetched what it switched to itself. A root kept now would keep
        // this closure from the collector until the next run.
        fetch::release(&link);
        return Ok(Report {
            outcome: Outcome::Fetched,
            message: format!(
                "fetched {shown} ({}), but a run finished meanwhile; not kept",
                got.display()
            ),
        });
    }
    if got != target {
        // The target moved between the resolve and fh's own: what was
        // fetched is still fetched; the run resolves again and applies
        // what it finds, fetching what is missing.
        *store_path_out = Some(got.display().to_string());
        return Ok(Report {
            outcome: Outcome::Fetched,
            message: format!(
                "fetched {shown} as {} (it resolved to {} a moment before: the target changed)",
                got.display(),
                target.display()
            ),
        });
    }
    Ok(Report {
        outcome: Outcome::Fetched,
        message: format!(
            "fetched {shown} ({}) in {}",
            target.display(),
            human(clock.phases().get(Phase::Fetch).unwrap_or_default())
        ),
    })
}

/// The links (GC roots) of fetched closures in the state directory: the
/// boot's fetch's, and the runs'. Two, so that the fetch, which takes no
/// lock, never replaces the link of a run that holds it.
pub fn links(store: &Store) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = store.safe_dir().path();
    (dir.join(fetch::BOOT_LINK), dir.join(fetch::LINK))
}
