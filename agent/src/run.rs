//! One `run`, as the unit calls it: sources → settings → target → login →
//! resolve → decide → apply → verify → scripts → state. Also the read-only
//! half that `plan` shares.

use crate::config::{Agent, Config};
use crate::exit::Failure;
use crate::gate;
use crate::health_rules::HealthLayer;
use crate::imds::Imds;
use crate::log;
use crate::notify;
use crate::phases::Phase;
use crate::plan::{self, Decision, RebootInputs};
use crate::reboot;
use crate::redact::Redactor;
use crate::retry::Backoff;
use crate::settings::{Action, OutputRef, Settings, SettingsError, Source, Target, parameter};
use crate::ssm::Ssm;
use crate::state::{
    HealthState, Outcome, Previous, RebootRecord, RunRecord, ScriptRecord, State, Store,
    TargetRecord,
};
use crate::steps::{apply, fetch, login, resolve, script};
use crate::system;
use crate::timing::Clock;
use crate::userdata::{self, Digest, UserData};
use std::path::PathBuf;
use tracing::{Instrument, Span, field};

/// What the agent takes from its environment, read once at the edge.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
    pub imds_endpoint: Option<String>,
    /// `AWS_REGION`, else `AWS_DEFAULT_REGION`.
    pub region: Option<String>,
}

impl Environment {
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            imds_endpoint: var(crate::config::IMDS_ENDPOINT_ENV),
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
        }
    }
}

/// How a run ended when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub outcome: Outcome,
    pub message: String,
}

/// The target once any SSM parameter has been read.
pub struct Resolved {
    pub settings: Settings,
    pub flake: Option<OutputRef>,
    /// How the target may be shown: the ref, or `<SecureString NAME>`.
    pub shown: Option<String>,
    pub record: Option<TargetRecord>,
    pub redactor: Redactor,
}

pub fn imds(config: &Config, env: &Environment) -> Result<(Imds, String), Failure> {
    let endpoint = config
        .agent
        .imds_endpoint(env.imds_endpoint.as_deref())
        .map_err(|why| {
            Failure::Config(SettingsError::new(
                &Source::ConfigFile(config.path.clone()),
                Some("agent.imds-endpoint"),
                why,
            ))
        })?;
    Ok((
        Imds::new(&endpoint, Backoff::imds(config.agent.retry_budget)),
        endpoint,
    ))
}

/// Sniffs user data, logging what it was without showing it.
pub fn sniff(raw: Option<&[u8]>) -> Result<UserData, Failure> {
    let Some(raw) = raw else {
        tracing::info!("no user data");
        return Ok(UserData::absent());
    };
    let digest = Digest::of(raw);
    let ud = userdata::sniff(raw).map_err(Failure::Input)?;
    tracing::info!(size = digest.size, sha256 = %digest.sha256, "user data: {} ({digest})", ud.kind.describe());
    for part in &ud.ignored {
        tracing::info!("user data {part} is for another tool; left alone");
    }
    if ud.kind == userdata::Kind::NotForUs {
        tracing::info!(
            "user data is not addressed to nixos-ami-agent; nothing in it will be run or applied"
        );
        if let Some(hint) = userdata::near_miss(raw) {
            tracing::warn!("user data: {hint}");
        }
    }
    Ok(ud)
}

pub fn settings(config: &Config, ud: &UserData) -> Settings {
    Settings::merge(std::iter::once(&config.defaults).chain(ud.settings.as_ref()))
}

/// Reads the SSM parameter when the settings name one; region from its
/// ARN, else the environment, else the instance's.
pub async fn resolve_target(
    config: &Config,
    env: &Environment,
    imds: &Imds,
    endpoint: &str,
    settings: Settings,
) -> Result<Resolved, Failure> {
    let mut redactor = Redactor::default();
    let Some(target) = settings.target.clone() else {
        return Ok(Resolved {
            settings,
            flake: None,
            shown: None,
            record: None,
            redactor,
        });
    };
    let name = match target.value {
        Target::Flake(flake) => {
            let record = TargetRecord {
                flake: flake.as_str().to_owned(),
                source: target.source.to_string(),
                ssm_parameter: None,
                ssm_version: None,
                secret: false,
            };
            let shown = Some(flake.as_str().to_owned());
            return Ok(Resolved {
                settings,
                flake: Some(flake),
                shown,
                record: Some(record),
                redactor,
            });
        }
        Target::Ssm(name) => name,
    };
    let region = match (name.arn_region(), &env.region) {
        (Some(r), _) => r.to_owned(),
        (None, Some(r)) => r.clone(),
        (None, None) => imds.region().await?,
    };
    let backoff = Backoff::with_budget(config.agent.retry_budget);
    Span::current().record("ssm_parameter", name.as_str());
    notify::status(&format!("reading SSM parameter {}", name.as_str()));
    tracing::info!(ssm_parameter = name.as_str(), region = %region, "reading SSM parameter {}", name.as_str());
    let p = Ssm::new(&name, &region, endpoint, backoff)
        .await?
        .get(&name)
        .await?;
    let source = Source::SsmParameter {
        name: name.as_str().to_owned(),
        version: p.version,
    };
    let value = p.value.expose();
    let parsed = parameter::parse_value(value, p.secure).map_err(|e| {
        Failure::Input(SettingsError {
            origin: source.clone(),
            key: e.key,
            reason: e.reason,
        })
    })?;
    let shown = if p.secure {
        let placeholder = Redactor::placeholder(name.as_str());
        redactor.add(value, &placeholder);
        redactor.add(parsed.flake.as_str(), &placeholder);
        // fh's own messages carry the flake part in URLs
        // (`…/f/ORG/FLAKE/VERSION/output/ATTR`), without the `#`.
        if let Some((flake, _attr)) = parsed.flake.as_str().split_once('#') {
            redactor.add(flake, &placeholder);
        }
        placeholder
    } else {
        parsed.flake.as_str().to_owned()
    };
    tracing::info!(
        ssm_parameter = name.as_str(),
        ssm_version = p.version,
        "SSM parameter {} (version {}) names {shown}",
        name.as_str(),
        p.version
    );
    let record = TargetRecord {
        flake: shown.clone(),
        source: source.to_string(),
        ssm_parameter: Some(name.as_str().to_owned()),
        ssm_version: Some(p.version),
        secret: p.secure,
    };
    let flake = parsed.flake.clone();
    let settings = settings.with_parameter(parsed, source);
    Ok(Resolved {
        settings,
        flake: Some(flake),
        shown: Some(shown),
        record: Some(record),
        redactor,
    })
}

/// The least an apply is given after a long fetch (or all of
/// `apply-timeout`, if that is less).
const MIN_APPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// What every step of one run shares.
struct Context<'a> {
    config: &'a Config,
    env: &'a Environment,
    imds: &'a Imds,
    endpoint: &'a str,
    store: &'a Store,
    /// Where this run's time goes.
    clock: &'a Clock,
    /// The first run of this boot: its phases start with the boot.
    first_of_boot: bool,
    /// The store path the target resolved to, once it is known.
    resolved: std::sync::Mutex<Option<PathBuf>>,
}

/// One run, in a span whose fields (`INSTANCE_ID`, `FLAKE_REF`,
/// `STORE_PATH`, `SSM_PARAMETER` in the journal) are filled in as they
/// become known, so every line of the run carries them.
/// Also returns the run's report to SSM Compliance, to be sent once the
/// outcome is out (READY=1, the console line): a report waits for SSM
/// (early in the first boot the SSM agent may not have registered the
/// instance yet), and nothing else should wait for the report.
pub async fn run(
    config: &Config,
    env: &Environment,
) -> (Result<Report, Failure>, Option<crate::compliance::Pending>) {
    let span = tracing::info_span!(
        "run",
        instance_id = field::Empty,
        flake_ref = field::Empty,
        store_path = field::Empty,
        ssm_parameter = field::Empty,
    );
    async {
        let mut pending = None;
        let r = match run_inner(config, env, &mut pending).await {
            Ok(report) => {
                notify::ready(&report.message);
                Ok(report)
            }
            Err(e) => Err(report_failure(e)),
        };
        (r, pending)
    }
    .instrument(span)
    .await
}

/// One line on stdout per run, for the machine's console (the units send
/// stdout to the journal and the console), like cloud-init's "finished
/// at" line: what `nixos-ami-publish smoke-test` and an operator
/// reading `aws ec2 get-console-output` look for. Stable format:
/// `nixos-ami-agent: run finished at TIME: OUTCOME (exit CODE): MESSAGE`.
/// The message is the run's own, with any SecureString target already
/// shown as its placeholder, escaped and bounded.
pub fn outcome_line(result: &Result<Report, Failure>) {
    use std::io::Write as _;
    let (outcome, code, message) = match result {
        Ok(r) => (
            match r.outcome {
                Outcome::Applied => "applied",
                Outcome::Unchanged | Outcome::NoTarget => "nothing to do",
                Outcome::Running | Outcome::Failed => "failed",
            },
            crate::exit::OK,
            r.message.clone(),
        ),
        Err(e) => ("failed", e.exit_code(), e.to_string()),
    };
    let line = format!(
        "{OUTCOME_PREFIX} {}: {outcome} (exit {code}): {}\n",
        crate::state::now(),
        crate::text::shown(&message, 400)
    );
    // Best effort: a closed stdout must not fail the run.
    let _ = std::io::stdout().lock().write_all(line.as_bytes());
}

/// The start of every outcome line; the smoke test matches on it.
pub const OUTCOME_PREFIX: &str = "nixos-ami-agent: run finished at";

/// The `failed` event and status, for every way a run can fail.
pub fn report_failure(e: Failure) -> Failure {
    let code = e.exit_code();
    tracing::error!(
        message_id = log::message_id::FAILED,
        exit_code = code,
        "failed: {e}"
    );
    notify::status(&format!("failed: {e}"));
    e
}

async fn run_inner(
    config: &Config,
    env: &Environment,
    pending: &mut Option<crate::compliance::Pending>,
) -> Result<Report, Failure> {
    let agent = &config.agent;
    let (imds, endpoint) = imds(config, env)?;
    let store = Store::open(&agent.state_dir)?;
    let _lock = store.lock(agent.lock_wait).await?;
    // Every run that got this far is in the history, however it ends:
    // also one that never learns which instance it is on.
    let (entry, first_of_boot) =
        crate::history::start(store.safe_dir(), system::boot_id(&agent.boot_id));
    // The first run of a boot reports how long the boot took to get to it.
    let clock = Clock::new();
    if first_of_boot && let Some(d) = crate::timing::since_boot() {
        clock.add(Phase::Boot, d);
    }
    // The start of the record this run saved, once it saved one.
    let mut recorded = None;
    let ctx = Context {
        config,
        env,
        imds: &imds,
        endpoint: &endpoint,
        store: &store,
        clock: &clock,
        first_of_boot,
        resolved: Default::default(),
    };
    let result = run_locked(&ctx, &mut recorded).await;
    crate::timing::report(
        "run",
        &clock.phases(),
        first_of_boot.then(crate::timing::since_boot).flatten(),
    );
    let (outcome, code, message) = match &result {
        Ok(r) => (
            match r.outcome {
                Outcome::Applied => "applied",
                _ => "nothing to do",
            },
            crate::exit::OK,
            r.message.clone(),
        ),
        Err(e) => ("failed", e.exit_code(), e.to_string()),
    };
    crate::history::finish(store.safe_dir(), &entry, outcome, code, &message);
    let resolved = ctx
        .resolved
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    release_fetched(&store, resolved.as_deref(), agent);
    if let Some(started) = recorded {
        *pending = Some(crate::compliance::Pending {
            imds,
            endpoint,
            store,
            started,
            result: outcome,
            exit_code: code,
            message,
        });
    }
    result
}

async fn run_locked(ctx: &Context<'_>, recorded: &mut Option<String>) -> Result<Report, Failure> {
    let (config, imds, store) = (ctx.config, ctx.imds, ctx.store);
    let agent = &config.agent;
    notify::status("reading instance metadata");
    let instance_id = ctx.clock.time(Phase::Metadata, imds.instance_id()).await?;
    Span::current().record("instance_id", instance_id.as_str());
    tracing::info!("instance {instance_id}");

    let (mut state, previous) = store.load(&instance_id)?;
    match &previous {
        Previous::OtherInstance(old) => {
            tracing::info!(
                "state belonged to instance {old} (an image made from a running instance?); starting fresh"
            )
        }
        Previous::MovedAside { to, reason } => {
            tracing::warn!(
                "state file {reason}; moved to {} and starting fresh",
                to.display()
            )
        }
        Previous::None | Previous::SameInstance => {}
    }
    if let Some(last) = state
        .last_run
        .as_ref()
        .filter(|r| r.outcome == Outcome::Running)
    {
        tracing::warn!(
            "the run started at {} did not finish (crash or power loss); checking the system again",
            last.started
        );
    }
    let mut record = RunRecord::start();
    let previous_run = state.last_run.replace(record.clone());
    store.save(&state)?;
    *recorded = Some(record.started.clone());

    // Bad input stops everything, scripts included; it is still recorded
    // so that `status` can say why nothing happened.
    notify::status("fetching user data");
    let ud = match ctx
        .clock
        .time(Phase::Metadata, imds.user_data())
        .await
        .map_err(Failure::from)
        .and_then(|raw| sniff(raw.as_deref()))
    {
        Ok(ud) => ud,
        Err(e) => return finish(ctx, &mut state, record, Err(e), 0),
    };
    let settings = settings(config, &ud);
    let no_health = Default::default();
    let user_health = ud.settings.as_ref().map_or(&no_health, |l| &l.health);
    // What the last apply left to judge comes first: a target that broke
    // the machine is rolled back before this run logs in, resolves or
    // applies anything.
    let this_boot = system::boot_id(&agent.boot_id);
    if let Some(u) = gate::unconfirmed(&state, previous_run.as_ref(), agent, this_boot.as_deref()) {
        let from = [previous_run.as_ref(), state.last_applied.as_ref()]
            .into_iter()
            .flatten()
            .find(|r| r.started == u.started)
            .cloned()
            .expect("unconfirmed comes from one of them");
        record.target = from.target.clone();
        record.action = from.action;
        record.store_path = from.store_path.clone();
        let g = gate::Gate {
            config,
            store,
            user_health,
            fallback: &settings.health,
            redactor: &Redactor::default(),
            target: &u.target,
            flake: &u.flake,
            mode: u.mode,
            applied_started: &u.started,
        };
        let gate_started = std::time::Instant::now();
        let done = match u.step {
            gate::Step::Judge => g.run(&mut state, &mut record, u.record).await,
            gate::Step::RollBack => {
                tracing::warn!(
                    step = crate::steps::rollback::STEP,
                    "the rollback of {} did not finish; finishing it",
                    u.target.display()
                );
                g.roll_back(&mut state, &mut record, u.record).await
            }
            gate::Step::RebootBack => {
                record.reboot = Some(RebootRecord {
                    policy: settings.reboot.value,
                    needed: true,
                    reason: "rolled back: the previous system is the boot default again".into(),
                    requested: false,
                    boot_id: None,
                });
                Err(Failure::RolledBack(format!(
                    "{} was rolled back as the boot default, but this boot still runs it: \
                     the reboot back was not carried out",
                    u.target.display()
                )))
            }
        };
        ctx.clock.add(Phase::Health, gate_started.elapsed());
        if let Err(e) = done {
            let reboot_back = u.mode == gate::Mode::Booted
                && matches!(e, Failure::RolledBack(_))
                && settings.reboot.value != crate::settings::RebootPolicy::Never;
            let failed = finish(ctx, &mut state, record, Err(e), 0);
            if reboot_back && crate::stop::requested().is_none() {
                // The one reboot back into the previous system. The boot
                // it is asked in is recorded first: a later boot that
                // still runs the rejected system does not ask again.
                if let Some(h) = state
                    .last_applied
                    .as_mut()
                    .filter(|a| a.started == u.started)
                    .and_then(|a| a.health.as_mut())
                {
                    h.reboot_boot = this_boot.clone();
                }
                store.save(&state)?;
                if let Err(e) = reboot_if_needed(store, &mut state, agent).await {
                    tracing::error!("{e}");
                }
            }
            return failed;
        }
        record.target = None;
        record.action = None;
        record.store_path = None;
    }
    let converged = converge(
        ctx,
        settings,
        user_health,
        &mut state,
        &mut record,
        previous_run.as_ref(),
    )
    .await;
    if let Err(e @ (Failure::Input(_) | Failure::Rejected(_) | Failure::RolledBack(_))) = converged
    {
        // A bad parameter value is bad input too: nothing runs. Nor after
        // a rollback, or for a rejected target: the run ends there.
        return finish(ctx, &mut state, record, Err(e), 0);
    }
    // A stopping run starts nothing new: scripts wait for the next run.
    let scripts = match crate::stop::requested() {
        Some(_) => Ok(0),
        None => run_scripts(ctx, &mut state, &ud).await,
    };
    let (mut converged, script_failures) = match scripts {
        Ok(n) => (converged, n),
        // The scripts could not run at all (their directory is unusable):
        // recorded like any other failure; an apply is already on record.
        Err(e) => (converged.and(Err(e)), 0),
    };
    // Stopped after the target's steps (before or during the scripts):
    // the run did not finish, whatever the steps before said.
    if let (Some(signal), Ok(_)) = (crate::stop::requested(), &converged) {
        converged = Err(Failure::Interrupted(format!(
            "interrupted by {} before the run finished",
            signal.as_str()
        )));
    }
    let mut report = finish(ctx, &mut state, record, converged, script_failures)?;
    if crate::stop::requested().is_some() {
        // Asked to stop after the work was done: recorded as it went, but
        // no reboot now; the next run asks for it if it is still needed.
        return Ok(report);
    }
    if let Some(by) = reboot_if_needed(store, &mut state, agent).await? {
        report
            .message
            .push_str(&format!("; reboot requested from {by}"));
    }
    Ok(report)
}

/// Records that a reboot is requested, in this boot, then asks for it: the
/// run after the reboot must find the request and not ask again. If the
/// request fails, the record is taken back so that the next run asks again.
async fn reboot_if_needed(
    store: &Store,
    state: &mut State,
    agent: &Agent,
) -> Result<Option<&'static str>, Failure> {
    let timeout = agent.reboot_timeout;
    let Some(reason) = state
        .last_run
        .as_ref()
        .and_then(|r| r.reboot.as_ref())
        .filter(|r| r.needed)
        .map(|r| r.reason.clone())
    else {
        return Ok(None);
    };
    mark_reboot_requested(state, Some(system::boot_id(&agent.boot_id)));
    store.save(state)?;
    notify::ready(&format!("rebooting: {reason}"));
    tracing::info!("requesting a reboot: {reason}");
    // Bounded, and ended by a stop: a bus or logind that never answers
    // must not hold the run and its lock. Not answered means not asked:
    // the record is taken back so the next run asks again.
    let asked = crate::stop::or_stop(tokio::time::timeout(timeout, reboot::request())).await;
    match asked {
        Ok(Ok(Ok(by))) => {
            tracing::info!("reboot requested from {by}");
            Ok(Some(by))
        }
        failed => {
            let why = match failed {
                Ok(Ok(Err(e))) => e,
                Ok(Err(_)) => format!(
                    "no answer over D-Bus within {}s (reboot-timeout)",
                    timeout.as_secs()
                ),
                Err(i) => {
                    // Most of the time this stop *is* the reboot: logind
                    // took the request and the shutdown stops the agent
                    // before the answer arrives. Taking the request back
                    // would make the next boot believe no reboot was
                    // asked for. It stays on record with this boot's ID:
                    // if this boot goes on, the next run asks again.
                    return Err(Failure::Interrupted(format!(
                        "reboot: {i} before logind answered; kept as requested \
                         in this boot, so a run in a later boot takes it as done \
                         and a run in this one asks again"
                    )));
                }
                Ok(Ok(Ok(_))) => unreachable!("handled above"),
            };
            mark_reboot_requested(state, None);
            store.save(state)?;
            Err(Failure::Reboot(why))
        }
    }
}

/// `Some(boot)`: requested in that boot (`None` inside if the boot ID is
/// unreadable); `None`: not requested (taken back).
fn mark_reboot_requested(state: &mut State, requested: Option<Option<String>>) {
    let started = state.last_run.as_ref().map(|r| r.started.clone());
    let records = state.last_run.iter_mut().chain(
        state
            .last_applied
            .iter_mut()
            .filter(|a| Some(&a.started) == started.as_ref()),
    );
    for r in records {
        if let Some(rb) = r.reboot.as_mut() {
            rb.requested = requested.is_some();
            rb.boot_id = requested.clone().flatten();
        }
    }
}

fn finish(
    ctx: &Context<'_>,
    state: &mut State,
    mut record: RunRecord,
    converged: Result<(Outcome, String), Failure>,
    script_failures: usize,
) -> Result<Report, Failure> {
    let store = ctx.store;
    record.phases = ctx.clock.phases().records();
    if ctx.first_of_boot {
        record.after_boot_ms =
            crate::timing::since_boot().map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    }
    let result = match converged {
        Ok((outcome, message)) => {
            record.finish(outcome, message.clone());
            Ok(Report { outcome, message })
        }
        Err(e) => {
            record.finish(Outcome::Failed, e.to_string());
            Err(e)
        }
    };
    if record.outcome == Outcome::Applied {
        state.last_applied = Some(record.clone());
    }
    state.last_run = Some(record);
    store.save(state)?;
    match result {
        Ok(_) if script_failures > 0 => Err(Failure::Scripts(format!(
            "{script_failures} user-data script(s) failed"
        ))),
        other => other,
    }
}

async fn converge(
    ctx: &Context<'_>,
    settings: Settings,
    user_health: &HealthLayer,
    state: &mut State,
    record: &mut RunRecord,
    previous_run: Option<&RunRecord>,
) -> Result<(Outcome, String), Failure> {
    let (agent, store) = (&ctx.config.agent, ctx.store);
    let r = ctx
        .clock
        .time(
            Phase::Metadata,
            resolve_target(ctx.config, ctx.env, ctx.imds, ctx.endpoint, settings),
        )
        .await?;
    let Some(flake) = r.flake else {
        let message =
            "nothing to do: no target (neither user data nor the image names a flake or SSM parameter)"
                .to_owned();
        tracing::info!(message_id = log::message_id::NOTHING_TO_DO, "{message}");
        return Ok((Outcome::NoTarget, message));
    };
    let shown = r.shown.unwrap_or_default();
    Span::current().record("flake_ref", shown.as_str());
    let action = r.settings.action.value;
    record.target = r.record;
    record.action = Some(action);
    // Not saved yet: the run's start is already on disk, and the state is
    // saved again before anything changes the system (apply) and at the
    // end, so a crash before then loses nothing a rerun would not redo.

    let target =
        login_and_resolve(agent, &r.settings, &r.redactor, &flake, &shown, ctx.clock).await?;
    record.store_path = Some(target.display().to_string());

    // What changes the running system is judged now (and, if it needs a
    // reboot, again after it); `boot` is judged after the reboot.
    let mut before_apply = None;
    *ctx.resolved.lock().unwrap_or_else(|e| e.into_inner()) = Some(target.clone());
    let (outcome, mut message) = match plan::decide(action, &target, &system::view(agent)) {
        Decision::UpToDate { reason } => (Outcome::Unchanged, format!("nothing to do: {reason}")),
        Decision::Apply => {
            if let Some(rej) = state.rejection(&target.to_string_lossy()) {
                // Nothing of it is kept for a next run.
                *ctx.resolved.lock().unwrap_or_else(|e| e.into_inner()) = None;
                return Err(Failure::Rejected(format!(
                    "not applying {shown}: its store path {} was rolled back at {} ({}); \
                     name another target, or run `nixos-ami-agent forget-rejected {}` to allow it again",
                    target.display(),
                    rej.at,
                    crate::text::shown(&rej.reason, 500),
                    target.display()
                )));
            }
            // The download first, then the switch: the time the system
            // spends between the old closure and the new is the switch.
            let fetch_started = std::time::Instant::now();
            fetch_closure(ctx, &r.redactor, &flake, &shown, &target).await?;
            // One budget for the download and the switch; a switch is
            // never given less than a few minutes.
            let apply_timeout = agent
                .apply_timeout
                .saturating_sub(fetch_started.elapsed())
                .max(MIN_APPLY_TIMEOUT.min(agent.apply_timeout));
            let before = ctx
                .clock
                .time(Phase::Health, gate::before_switch(agent))
                .await?;
            // On record before the apply: a run that dies after the switch
            // (a stop during fh, a crash) leaves the gate pending for the
            // next run, with what it needs.
            let mut h = gate::pending_record(&before);
            if action == Action::Boot {
                h.state = HealthState::AwaitingBoot;
                h.mode = Some(gate::Mode::Booted);
                h.applied_boot = system::boot_id(&agent.boot_id);
            }
            record.health = Some(h);
            before_apply = Some(before);
            state.last_run = Some(record.clone());
            store.save(state)?;
            notify::status(&format!("applying {shown}"));
            tracing::info!(
                step = apply::STEP,
                "applying {shown} ({}) with action {}",
                target.display(),
                action.as_str()
            );
            ctx.clock
                .time(
                    Phase::Switch,
                    apply::apply(agent, &r.redactor, &flake, action, apply_timeout),
                )
                .await?;
            let verify_started = std::time::Instant::now();
            let verified = plan::verify(action, &target, &system::view(agent));
            ctx.clock.add(Phase::Verify, verify_started.elapsed());
            verified.map_err(Failure::NotSwitched)?;
            (
                Outcome::Applied,
                format!(
                    "applied {shown} ({}) with action {}",
                    target.display(),
                    action.as_str()
                ),
            )
        }
    };

    // A request made in this very boot was not carried out (or not yet):
    // it neither guards against asking again nor counts as asked.
    let this_boot = system::boot_id(&agent.boot_id);
    let honoured = |r: &RebootRecord| r.honoured(this_boot.as_deref());
    let requested_for = previous_run
        .into_iter()
        .chain(state.last_applied.as_ref())
        .filter(|p| p.reboot.as_ref().is_some_and(honoured))
        .find_map(|p| p.store_path.as_deref())
        .map(PathBuf::from);
    // An earlier run applied this very target and needed a reboot, but
    // never asked for it (killed during a script, or failed after the
    // apply): this run asks, also for `reboot = "always"`.
    let unasked = state.last_applied.as_ref().is_some_and(|a| {
        a.store_path.as_deref() == Some(&*target.to_string_lossy())
            && a.reboot.as_ref().is_some_and(|r| r.needed && !honoured(r))
    });
    let booted_system = system::canonical(&agent.booted_system);
    let assessment = plan::reboot(&RebootInputs {
        policy: r.settings.reboot.value,
        action,
        applied: outcome == Outcome::Applied || unasked,
        target: &target,
        new: &system::boot_files(&target),
        booted_system: booted_system.as_deref(),
        booted: &system::boot_files(&agent.booted_system),
        requested_for: requested_for.as_deref(),
    });
    tracing::info!(
        reboot_needed = assessment.needed,
        "reboot {}: {}",
        if assessment.needed {
            "needed"
        } else {
            "not needed"
        },
        assessment.reason
    );
    if assessment.needed {
        message.push_str("; a reboot is needed");
    }
    let reboot_needed = assessment.needed;
    record.reboot = Some(RebootRecord::new(r.settings.reboot.value, assessment));
    if outcome == Outcome::Applied {
        // Recorded as soon as it is verified, with its reboot need: the
        // scripts still to come may be killed, or fail to start, and the
        // next run must know the system changed and needs a reboot.
        let mut applied = record.clone();
        applied.finish(Outcome::Applied, message.clone());
        state.last_applied = Some(applied);
        store.save(state)?;
    }
    let judged_now = before_apply.is_some() && action != Action::Boot;
    if let (Some(mut h), true) = (record.health.clone(), judged_now) {
        let started = record.started.clone();
        let g = gate::Gate {
            config: ctx.config,
            store,
            user_health,
            fallback: &r.settings.health,
            redactor: &r.redactor,
            target: &target,
            flake: &shown,
            mode: gate::Mode::InPlace,
            applied_started: &started,
        };
        ctx.clock
            .time(Phase::Health, g.run(state, record, h.clone()))
            .await?;
        message.push_str("; healthy");
        if reboot_needed {
            // Healthy now, on the old kernel: judged again in the system
            // the reboot brings up.
            h = record.health.clone().unwrap_or(h);
            h.state = HealthState::AwaitingBoot;
            h.mode = Some(gate::Mode::Booted);
            h.applied_boot = this_boot.clone();
            g.record(state, record, &h)?;
        }
    }
    let id = match outcome {
        Outcome::Applied => log::message_id::APPLIED,
        _ => log::message_id::NOTHING_TO_DO,
    };
    tracing::info!(
        message_id = id,
        action = action.as_str(),
        reboot_needed,
        "{message}"
    );
    Ok((outcome, message))
}

/// What a run and the boot's fetch do once they know the target: check the
/// programs, log in (unless `login = false`), resolve; the store path, as
/// the system links show store paths. The store path is recorded in the
/// run's span.
pub(crate) async fn login_and_resolve(
    agent: &Agent,
    settings: &Settings,
    redactor: &Redactor,
    flake: &OutputRef,
    shown: &str,
    clock: &Clock,
) -> Result<PathBuf, Failure> {
    let missing = |e: crate::process::ProcessError| crate::steps::StepError::Missing {
        step: "preflight",
        reason: e.to_string(),
    };
    // Before anything runs: a missing program is the image's fault and
    // must not leave a half-done run (logged in, never applied).
    crate::process::check_program(&agent.fh).map_err(missing)?;
    if settings.login.value {
        crate::process::check_program(&agent.determinate_nixd).map_err(missing)?;
    }
    let backoff = Backoff::with_budget(agent.retry_budget);
    if settings.login.value {
        notify::status("logging in to FlakeHub");
        tracing::info!(
            step = login::STEP,
            "logging in to FlakeHub (determinate-nixd login aws)"
        );
        clock
            .time(Phase::Login, login::login(agent, &backoff, redactor))
            .await?;
    }
    notify::status(&format!("resolving {shown}"));
    tracing::info!(step = resolve::STEP, "resolving {shown}");
    let resolved = clock
        .time(
            Phase::Resolve,
            resolve::resolve(agent, &backoff, redactor, flake),
        )
        .await?;
    let target = system::canonical(&resolved).unwrap_or(resolved);
    Span::current().record("store_path", tracing::field::display(target.display()));
    tracing::info!(step = resolve::STEP, store_path = %target.display(), "{shown} resolves to {}", target.display());
    Ok(target)
}

/// `fh fetch REF LINK`, said and timed as the fetch phase.
pub(crate) async fn fetch_timed(
    agent: &Agent,
    clock: &Clock,
    redactor: &Redactor,
    flake: &OutputRef,
    shown: &str,
    target: &std::path::Path,
    link: &std::path::Path,
) -> Result<PathBuf, crate::steps::StepError> {
    notify::status(&format!("fetching {shown}"));
    tracing::info!(
        step = fetch::STEP,
        "fetching {shown} ({})",
        target.display()
    );
    clock
        .time(Phase::Fetch, fetch::fetch(agent, redactor, flake, link))
        .await
}

/// The fetch phase of a run that applies: nothing when the boot's fetch
/// (or an earlier run) already fetched this very store path, else `fh
/// fetch`. A fetch that fails is only a warning: `fh apply` fetches what
/// is missing, as it always did. A stop ends the run here, and so does a
/// target that resolved to another store path during the fetch: `fh
/// apply` would resolve again and switch to a path this run neither
/// decided on nor checked against the rejected ones.
async fn fetch_closure(
    ctx: &Context<'_>,
    redactor: &Redactor,
    flake: &OutputRef,
    shown: &str,
    target: &std::path::Path,
) -> Result<(), Failure> {
    let clock = ctx.clock;
    let (boot_link, link) = crate::fetch::links(ctx.store);
    let at_boot = fetch::fetched(&boot_link).as_deref() == Some(target);
    if at_boot || fetch::fetched(&link).as_deref() == Some(target) {
        let record = crate::fetch::read(ctx.store.safe_dir())
            .filter(|f| at_boot && f.store_path.as_deref() == Some(&*target.to_string_lossy()))
            .filter(|f| {
                f.boot_id.is_some() && f.boot_id == system::boot_id(&ctx.config.agent.boot_id)
            });
        let note = match record.as_ref().and_then(|f| f.fetch_time()) {
            Some(d) => format!("fetched at boot in {}", crate::phases::human(d)),
            None => "already fetched".to_owned(),
        };
        clock.add(Phase::Fetch, std::time::Duration::ZERO);
        clock.note(Phase::Fetch, note.clone());
        tracing::info!(
            step = fetch::STEP,
            "the closure of {shown} ({}) is here: {note}",
            target.display()
        );
        return Ok(());
    }
    let got = fetch_timed(
        &ctx.config.agent,
        clock,
        redactor,
        flake,
        shown,
        target,
        &link,
    )
    .await;
    match got {
        Ok(p) if p == target => {
            tracing::info!(step = fetch::STEP, "fetched {shown} ({})", target.display());
        }
        Ok(p) => {
            return Err(crate::steps::StepError::Moved {
                step: fetch::STEP,
                reason: format!(
                    "{shown} resolved to {} but to {} a moment later, while it was being \
                     fetched (a new release, or a changed parameter); not applied: the next run \
                     decides on what it resolves to then",
                    target.display(),
                    p.display()
                ),
            }
            .into());
        }
        Err(e @ crate::steps::StepError::Interrupted { .. }) => return Err(e.into()),
        Err(e) => {
            tracing::warn!(
                step = fetch::STEP,
                "fetching failed ({e}); fh apply fetches what is missing"
            );
            // The fetch may have taken minutes before it failed (a stalled
            // download): `fh apply` resolves REF again, so the target must
            // still be what this run decided on.
            let backoff = crate::retry::Backoff::with_budget(ctx.config.agent.retry_budget);
            let now = resolve::resolve(&ctx.config.agent, &backoff, redactor, flake).await?;
            let now = system::canonical(&now).unwrap_or(now);
            if now != target {
                return Err(crate::steps::StepError::Moved {
                    step: fetch::STEP,
                    reason: format!(
                        "{shown} resolved to {} but to {} after the fetch failed (a new release, \
                         or a changed parameter); not applied: the next run decides on what it \
                         resolves to then",
                        target.display(),
                        now.display()
                    ),
                }
                .into());
            }
        }
    }
    Ok(())
}

/// At the end of a run (after its history entry is written): the links
/// that keep fetched closures from the collector go, unless one holds the
/// closure of the store path this run resolved and did not get to run
/// (its switch failed or was stopped: the next run needs it). The boot's
/// fetch, which takes no lock, drops its own link when it ends after a
/// run finished (see `crate::fetch`); together nothing is left rooted.
fn release_fetched(store: &Store, resolved: Option<&std::path::Path>, agent: &Agent) {
    let running = system::view(agent);
    let (boot_link, link) = crate::fetch::links(store);
    for l in [boot_link, link] {
        let keep = fetch::fetched(&l).is_some_and(|p| {
            Some(p.as_path()) == resolved
                && running.current.as_deref() != Some(p.as_path())
                && running.profile.as_deref() != Some(p.as_path())
        });
        if !keep {
            fetch::release(&l);
        }
    }
}

/// Each script once per instance, recorded before it starts: a script that
/// reboots the machine, or a crash while it runs, must not make it run
/// again.
async fn run_scripts(
    ctx: &Context<'_>,
    state: &mut State,
    ud: &UserData,
) -> Result<usize, Failure> {
    let (config, store) = (ctx.config, ctx.store);
    let mut failures = 0;
    let mut dir = None;
    for (index, s) in ud.scripts.iter().enumerate() {
        if crate::stop::requested().is_some() {
            break;
        }
        if let Some(prev) = state.scripts.iter().find(|r| r.label == s.label) {
            tracing::info!(
                step = script::STEP,
                "user-data script {} already ran on this instance ({}); not running it again",
                s.label,
                prev.result.as_deref().unwrap_or("interrupted")
            );
            continue;
        }
        let dir = match &mut dir {
            Some(d) => d,
            None => dir.insert(store.scripts_dir()?),
        };
        state.scripts.push(ScriptRecord {
            label: s.label.clone(),
            size: s.digest.size,
            sha256: s.digest.sha256.clone(),
            started: crate::state::now(),
            finished: None,
            result: None,
            success: false,
        });
        store.save(state)?;
        notify::status(&format!("running user-data script {}", s.label));
        tracing::info!(
            step = script::STEP,
            "running user-data script {} ({})",
            s.label,
            s.digest
        );
        let r = script::run(
            s,
            index,
            dir,
            config.agent.script_timeout,
            &config.agent.current_system,
        )
        .await;
        let stopped = crate::stop::requested().is_some();
        if r.success {
            tracing::info!(
                step = script::STEP,
                "user-data script {} finished: {}",
                s.label,
                r.result
            );
        } else if stopped {
            // Stopped with the run, not failed: recorded (it does not run
            // again, as after a crash: it may have done half its work),
            // and the run ends as interrupted.
            tracing::warn!(
                step = script::STEP,
                "user-data script {} was stopped: {}",
                s.label,
                r.result
            );
        } else {
            failures += 1;
            tracing::error!(
                step = script::STEP,
                "user-data script {} failed: {}",
                s.label,
                r.result
            );
        }
        let rec = state.scripts.last_mut().expect("pushed above");
        rec.finished = Some(crate::state::now());
        rec.result = Some(r.result);
        rec.success = r.success;
        store.save(state)?;
    }
    Ok(failures)
}
