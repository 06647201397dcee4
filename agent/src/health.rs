//! The health gate's effects: it watches systemd over D-Bus until the
//! switch has settled, lists the units that failed, looks at the required
//! ones, and runs the configured checks; [`crate::health_rules::verdict`]
//! judges. Everything it does is bounded by `health.timeout` and ends at a
//! stop.

use crate::health_rules::{CommandCheck, Health, HttpProbe, Observation, Verdict, verdict};
use crate::process::{self, Program, describe};
use crate::redact::Redactor;
use crate::stop::{Interrupted, or_stop};
use crate::systemd::{self, Systemd1ManagerProxy};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use tokio::time::{Instant, timeout_at};

pub const STEP: &str = "health";
/// How often the job queue and the checks are looked at again.
const POLL: Duration = Duration::from_millis(200);
const RETRY: Duration = Duration::from_secs(1);
/// One D-Bus call; the gate's deadline bounds it further.
const CALL: Duration = Duration::from_secs(10);

async fn bounded<T, E: std::fmt::Display>(
    deadline: Instant,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<Result<T, String>, Interrupted> {
    let until = deadline.min(Instant::now() + CALL);
    Ok(match or_stop(timeout_at(until, fut)).await? {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer over D-Bus in time")),
    })
}

async fn manager(deadline: Instant) -> Result<Result<zbus::Connection, String>, Interrupted> {
    bounded(
        deadline,
        "cannot reach systemd over the system D-Bus",
        zbus::Connection::system(),
    )
    .await
}

/// The failed units' names, leaving out those without a unit file in the
/// running configuration (load state `not-found`): systemd keeps a unit
/// that failed in memory, failed, after a switch removed it, and a unit
/// the running system does not have is not its failure (after a
/// rollback, the rejected target's units are such). Nor the agent's own
/// units: the boot's fetch may fail or time out while a run judges a
/// switch, and that says nothing about the target.
fn names(units: Vec<systemd::UnitStatus>) -> BTreeSet<String> {
    units
        .into_iter()
        .filter(|u| u.2 != "not-found" && !AGENT_UNITS.contains(&u.0.as_str()))
        .map(|u| u.0)
        .collect()
}

/// The units failed now: the "before" of a gate, taken just before the
/// apply so that what was already broken is not blamed on the target.
pub async fn failed_units(
    within: Duration,
) -> Result<Result<BTreeSet<String>, String>, Interrupted> {
    let deadline = Instant::now() + within;
    let conn = match manager(deadline).await? {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    let m = match bounded(deadline, "systemd", systemd::manager(&conn)).await? {
        Ok(m) => m,
        Err(e) => return Ok(Err(e)),
    };
    Ok(bounded(
        deadline,
        "ListUnitsFiltered",
        m.list_units_filtered(&["failed"]),
    )
    .await?
    .map(names))
}

/// The agent's units. A job of the other one is a run waiting for this
/// one's lock (a switch resets failed units and starts the active targets
/// again, so a boot unit whose run failed is started by the next switch,
/// switch-to-configuration-ng's "Forget about previously failed
/// services"): it ends only after this run, so waiting for it would hold
/// the gate until its own timeout. The boot's fetch
/// (`nixos-ami-agent-fetch.service`) may still be downloading a target
/// that changed since: nothing the switch started, and nothing the
/// system's health depends on.
const AGENT_UNITS: [&str; 3] = [
    "nixos-ami-agent.service",
    "nixos-ami-agent-run.service",
    "nixos-ami-agent-fetch.service",
];

/// Until systemd has settled after the switch, or the deadline.
///
/// A switch queues its starts and restarts as jobs, and
/// switch-to-configuration-ng waits for those it submitted, then for the
/// bus to go quiet, before it returns; what they pull in may still run.
/// The plain rule, "no job queued and `SystemState` past `starting`",
/// cannot hold while the agent's own unit runs: its start job stays in the
/// queue until it exits, so during the boot that runs the boot unit the
/// boot transaction is not finished and `SystemState` stays `starting`
/// (systemd's manager_check_finished), and units ordered after the
/// agent's wait for it. So: settled when no job is *running* other than
/// the agent's own units' (see [`AGENT_UNITS`]), twice in a row a poll
/// apart (a job that just became runnable is dispatched in between). A job
/// still waiting then waits, in the end, for the agent itself.
///
/// Not settled by the deadline is unhealthy: a unit still starting is not
/// known to work. A long job unrelated to the switch (a timer's) counts
/// too; `health.timeout` is the operator's bound for that.
async fn settle(
    m: &Systemd1ManagerProxy<'_>,
    deadline: Instant,
) -> Result<Result<(), String>, Interrupted> {
    let started = Instant::now();
    let own = bounded(
        deadline,
        "GetUnitByPID",
        m.get_unit_by_pid(std::process::id()),
    )
    .await?
    .inspect_err(|e| tracing::debug!(step = STEP, "the agent's own unit is not known: {e}"))
    .ok();
    let mut quiet = 0;
    loop {
        let jobs = match bounded(deadline, "ListJobs", m.list_jobs()).await? {
            Ok(j) => j,
            Err(e) => return Ok(Err(e)),
        };
        let busy: Vec<&str> = jobs
            .iter()
            .filter(|j| {
                j.3 == "running"
                    && Some(&j.5) != own.as_ref()
                    && !AGENT_UNITS.contains(&j.1.as_str())
            })
            .map(|j| j.1.as_str())
            .collect();
        quiet = if busy.is_empty() { quiet + 1 } else { 0 };
        if quiet >= 2 {
            return Ok(Ok(()));
        }
        if Instant::now() + POLL >= deadline {
            let state = bounded(
                deadline.max(Instant::now() + POLL),
                "SystemState",
                m.system_state(),
            )
            .await?
            .unwrap_or_else(|e| e);
            return Ok(Err(format!(
                "systemd did not settle within {:.0}s (system state {}; {} job(s) running: {})",
                (Instant::now() - started).as_secs_f64(),
                crate::text::shown(&state, 60),
                busy.len(),
                crate::text::shown(
                    &busy.iter().take(5).copied().collect::<Vec<_>>().join(", "),
                    300
                )
            )));
        }
        or_stop(tokio::time::sleep(POLL)).await?;
    }
}

async fn command(
    c: &CommandCheck,
    within: Duration,
    redactor: &Redactor,
    system: &Path,
) -> Result<Result<(), String>, Interrupted> {
    let program = Path::new(&c.argv[0]);
    let prog = Program::new(program, STEP, within)
        .args(&c.argv[1..])
        .system_path(system);
    match process::run(&prog, redactor).await {
        Ok(out) if out.status.success() => Ok(Ok(())),
        Ok(out) => Ok(Err(describe(out.status))),
        Err(process::ProcessError::Interrupted { interrupted, .. }) => Err(interrupted),
        Err(e) => Ok(Err(e.to_string())),
    }
}

async fn http(
    client: &reqwest::Client,
    p: &HttpProbe,
    within: Duration,
) -> Result<Result<(), String>, Interrupted> {
    let reply = or_stop(tokio::time::timeout(within, client.get(&p.url).send())).await?;
    Ok(match reply {
        Ok(Ok(r)) if r.status().is_success() => Ok(()),
        Ok(Ok(r)) => Err(format!("HTTP {}", r.status().as_u16())),
        Ok(Err(e)) => Err(if e.is_connect() {
            "connection refused or failed".into()
        } else {
            "request failed".into()
        }),
        Err(_) => Err(format!("no answer within {:.1}s", within.as_secs_f64())),
    })
}

/// Each check until it passes, retried within the deadline. An attempt
/// gets its own timeout or what is left of the gate's, whichever is
/// shorter; no attempt starts after the deadline (a check that never got
/// one fails as not checked).
async fn checks(
    h: &Health,
    deadline: Instant,
    redactor: &Redactor,
    system: &Path,
) -> Result<Vec<(String, Result<(), String>)>, Interrupted> {
    let client = reqwest::Client::builder()
        // A probe of this machine: never through a proxy, never elsewhere.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a plain-HTTP reqwest client always builds");
    let mut results = vec![];
    enum Check<'a> {
        Command(&'a CommandCheck),
        Http(&'a HttpProbe),
    }
    let all = h
        .commands
        .iter()
        .map(Check::Command)
        .chain(h.http.iter().map(Check::Http));
    for check in all {
        let name = match check {
            Check::Command(c) => c.name(),
            Check::Http(p) => format!("GET {}", crate::text::shown(&p.url, 200)),
        };
        let mut attempts = 0u32;
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(if attempts == 0 {
                    "not checked: health.timeout ran out before it".to_owned()
                } else {
                    format!("health.timeout ran out (after {attempts} attempt(s))")
                });
            }
            attempts += 1;
            let r = match check {
                Check::Command(c) => command(c, c.timeout.min(left), redactor, system).await?,
                Check::Http(p) => http(&client, p, p.timeout.min(left)).await?,
            };
            match r {
                Ok(()) => break Ok(()),
                Err(why) if Instant::now() + RETRY >= deadline => {
                    break Err(format!("{why} (after {attempts} attempt(s))"));
                }
                Err(why) => {
                    tracing::info!(step = STEP, "check {name}: {why}; trying again");
                    or_stop(tokio::time::sleep(RETRY)).await?;
                }
            }
        };
        results.push((name, result));
    }
    Ok(results)
}

/// Observes the system that is running now (`system`: its `sw/bin` is
/// the checks' PATH) and judges it. `before`: the units failed before the
/// apply (`None`: not known).
pub async fn gate(
    h: &Health,
    before: Option<&BTreeSet<String>>,
    redactor: &Redactor,
    system: &Path,
) -> Result<Verdict, Interrupted> {
    let deadline = Instant::now() + h.timeout;
    let mut o = Observation {
        settled: Ok(()),
        failed_before: before.cloned(),
        failed_now: Ok(BTreeSet::new()),
        required: vec![],
        checks: vec![],
    };
    let unreachable = |why: String, o: &mut Observation| {
        o.settled = Err(why.clone());
        o.failed_now = Err(why.clone());
        o.required = h
            .required_units
            .iter()
            .map(|u| {
                (
                    u.clone(),
                    Err("not known: systemd could not be asked".to_owned()),
                )
            })
            .collect();
    };
    let conn = manager(deadline).await?;
    let m = match conn {
        Ok(c) => match bounded(deadline, "systemd", systemd::manager(&c)).await? {
            Ok(m) => Some((c, m)),
            Err(e) => {
                unreachable(e, &mut o);
                None
            }
        },
        Err(e) => {
            unreachable(e, &mut o);
            None
        }
    };
    if let Some((_conn, m)) = &m {
        o.settled = settle(m, deadline).await?;
    }
    // The checks before the units: an application that needs a moment to
    // come up gets its retries, and a unit that fails meanwhile is seen.
    o.checks = checks(h, deadline, redactor, system).await?;
    if let Some((_conn, m)) = &m {
        // The units' state is looked at even past the deadline (one short
        // call each): a gate that ran out of time still says what it saw.
        let late = Instant::now() + CALL;
        let at = deadline.max(late.min(deadline + CALL));
        o.failed_now = bounded(at, "ListUnitsFiltered", m.list_units_filtered(&["failed"]))
            .await?
            .map(names);
        if !h.required_units.is_empty() {
            let wanted: Vec<&str> = h.required_units.iter().map(String::as_str).collect();
            match bounded(at, "ListUnitsByNames", m.list_units_by_names(&wanted)).await? {
                Ok(units) => {
                    o.required = h
                        .required_units
                        .iter()
                        .map(|u| {
                            let state = units
                                .iter()
                                .find(|s| &s.0 == u)
                                .map(|s| match s.2.as_str() {
                                    "not-found" => Err("no such unit".to_owned()),
                                    _ => Ok(s.3.clone()),
                                })
                                .unwrap_or_else(|| Err("not listed by systemd".into()));
                            (u.clone(), state)
                        })
                        .collect();
                }
                Err(e) => {
                    o.required = h
                        .required_units
                        .iter()
                        .map(|u| (u.clone(), Err(e.clone())))
                        .collect();
                }
            }
        }
    }
    Ok(verdict(&o))
}
