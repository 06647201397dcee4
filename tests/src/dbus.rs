//! A private D-Bus (a `dbus-daemon` on a socket in the scenario's temp
//! dir) with doubles of logind's and systemd's managers that record the
//! reboot requests they get. The agent finds it through
//! `DBUS_SYSTEM_BUS_ADDRESS`; it never sees the host's system bus.
//!
//! The systemd double also answers what the health gate asks, with the
//! signatures of `org.freedesktop.systemd1(5)`: `SystemState`,
//! `ListJobs`, `ListUnitsFiltered`, `ListUnitsByNames`, `GetUnitByPID`.
//! Which units are failed depends on which system runs: it follows the
//! stand-ins' `current-system` link and reports that system's `units`
//! from `standin.json`, so a rollback really changes what it reports.

use crate::standin::Behaviour;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

pub type Calls = Arc<Mutex<Vec<String>>>;

struct Login1 {
    calls: Calls,
}

#[zbus::interface(name = "org.freedesktop.login1.Manager")]
impl Login1 {
    fn reboot(&self, interactive: bool) {
        self.calls
            .lock()
            .unwrap()
            .push(format!("login1.Reboot({interactive})"));
    }
}

struct Systemd1 {
    calls: Calls,
    /// Whether `StartUnit` is allowed (a systemd that reboots when logind
    /// is absent); otherwise it is refused as access denied.
    reboots: bool,
    standin: Option<PathBuf>,
    list_jobs_calls: Arc<Mutex<u32>>,
    /// Units seen failed: systemd keeps a failed unit, failed, after a
    /// switch removed its file (load state `not-found`) until
    /// reset-failed.
    failed_seen: Arc<Mutex<std::collections::BTreeSet<String>>>,
}

type UnitStatus = (
    String,
    String,
    String,
    String,
    String,
    String,
    zbus::OwnedObjectPath,
    u32,
    String,
    zbus::OwnedObjectPath,
);
type JobStatus = (
    u32,
    String,
    String,
    String,
    zbus::OwnedObjectPath,
    zbus::OwnedObjectPath,
);

/// The unit the double pretends every caller runs in.
const OWN_UNIT: &str = "nixos-ami-agent.service";

/// systemd's object path escaping (`unit_dbus_path_from_name`).
fn unit_path(name: &str) -> zbus::OwnedObjectPath {
    let mut p = String::from("/org/freedesktop/systemd1/unit/");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() {
            p.push(b as char);
        } else {
            p.push_str(&format!("_{b:02x}"));
        }
    }
    zbus::OwnedObjectPath::try_from(p).unwrap()
}

fn status(name: &str, load: &str, active: &str) -> UnitStatus {
    let sub = match active {
        "active" => "running",
        "failed" => "failed",
        _ => "dead",
    };
    (
        name.into(),
        format!("{name} (double)"),
        load.into(),
        active.into(),
        sub.into(),
        String::new(),
        unit_path(name),
        0,
        String::new(),
        zbus::OwnedObjectPath::try_from("/").unwrap(),
    )
}

impl Systemd1 {
    fn behaviour(&self) -> Behaviour {
        self.standin
            .as_deref()
            .map(crate::standin::read_behaviour)
            .unwrap_or_default()
    }

    /// The running system's units, as `standin.json` says.
    fn units(&self) -> HashMap<String, String> {
        let b = self.behaviour();
        let running = std::fs::canonicalize(&b.current_system)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        let units = running
            .and_then(|r| b.units.get(&r).cloned())
            .unwrap_or_default();
        let mut seen = self.failed_seen.lock().unwrap();
        seen.extend(
            units
                .iter()
                .filter(|(_, s)| *s == "failed")
                .map(|(u, _)| u.clone()),
        );
        units
    }

    /// Failed units the running system has no file for.
    fn stale_failed(&self, units: &HashMap<String, String>) -> Vec<UnitStatus> {
        self.failed_seen
            .lock()
            .unwrap()
            .iter()
            .filter(|u| !units.contains_key(*u))
            .map(|u| status(u, "not-found", "failed"))
            .collect()
    }
}

#[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
impl Systemd1 {
    #[zbus(property)]
    fn system_state(&self) -> String {
        if self.units().values().any(|s| s == "failed") {
            "degraded".into()
        } else {
            "running".into()
        }
    }

    fn list_jobs(&self) -> Vec<JobStatus> {
        let b = self.behaviour();
        let n = {
            let mut n = self.list_jobs_calls.lock().unwrap();
            *n += 1;
            *n
        };
        let job = |id: u32, unit: &str, kind: &str, state: &str| {
            (
                id,
                unit.to_owned(),
                kind.to_owned(),
                state.to_owned(),
                zbus::OwnedObjectPath::try_from(format!("/org/freedesktop/systemd1/job/{id}"))
                    .unwrap(),
                unit_path(unit),
            )
        };
        let mut jobs = vec![];
        if b.booting {
            jobs.push(job(1, OWN_UNIT, "start", "running"));
            // A unit ordered after the agent's, waiting for it.
            jobs.push(job(2, "after-agent.service", "start", "waiting"));
        }
        if b.sibling_waiting {
            jobs.push(job(4, "nixos-ami-agent-run.service", "start", "running"));
        }
        if n <= b.busy_polls {
            jobs.push(job(3, "restarting.service", "restart", "running"));
        }
        jobs
    }

    /// Units whose load, active or sub state is one of `states`, as
    /// systemd filters them; only loaded units are listed.
    fn list_units_filtered(&self, states: Vec<String>) -> Vec<UnitStatus> {
        let units = self.units();
        let stale = self.stale_failed(&units);
        units
            .iter()
            .map(|(name, active)| status(name, "loaded", active))
            .chain(stale)
            .filter(|u| states.iter().any(|s| *s == u.2 || *s == u.3 || *s == u.4))
            .collect()
    }

    /// Every name asked for, in order; a unit that does not exist is
    /// `not-found` and `inactive`, as systemd loads it.
    fn list_units_by_names(&self, names: Vec<String>) -> zbus::fdo::Result<Vec<UnitStatus>> {
        // As systemd: a template cannot be loaded, and fails the call.
        if let Some(t) = names.iter().find(|n| n.contains("@.")) {
            return Err(zbus::fdo::Error::InvalidArgs(format!(
                "Unit name {t} is neither a valid invocation ID nor unit name."
            )));
        }
        let units = self.units();
        Ok(names
            .iter()
            .map(|n| match units.get(n) {
                Some(active) => status(n, "loaded", active),
                None => status(n, "not-found", "inactive"),
            })
            .collect())
    }

    /// Spelled as systemd spells it (zbus would make it `GetUnitByPid`).
    #[zbus(name = "GetUnitByPID")]
    fn get_unit_by_pid(&self, _pid: u32) -> zbus::OwnedObjectPath {
        unit_path(OWN_UNIT)
    }

    fn start_unit(&self, name: String, mode: String) -> zbus::fdo::Result<zbus::OwnedObjectPath> {
        if !self.reboots {
            return Err(zbus::fdo::Error::AccessDenied(
                "StartUnit refused (double)".into(),
            ));
        }
        self.calls
            .lock()
            .unwrap()
            .push(format!("systemd1.StartUnit({name}, {mode})"));
        Ok(zbus::OwnedObjectPath::try_from("/org/freedesktop/systemd1/job/1").unwrap())
    }
}

pub struct BusDouble {
    daemon: Child,
    pub address: String,
    pub calls: Calls,
    _connections: Vec<zbus::Connection>,
}

impl Drop for BusDouble {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

impl BusDouble {
    /// Starts the bus, the systemd double (always: there is no system
    /// without it; `systemd_reboots`: whether it accepts
    /// `StartUnit(reboot.target)`) and, if asked, the logind double. The
    /// systemd double reads the stand-ins' behaviour from `standin`.
    pub fn start(
        rt: &tokio::runtime::Runtime,
        dir: &Path,
        standin: Option<&Path>,
        logind: bool,
        systemd_reboots: bool,
    ) -> Self {
        let socket = dir.join("system_bus_socket");
        let address = format!("unix:path={}", socket.display());
        // The daemon prints its address once it accepts connections; the
        // socket file alone appears at bind(), before listen().
        let mut daemon = Command::new("dbus-daemon")
            .args([
                "--session",
                "--nofork",
                "--nopidfile",
                "--print-address=1",
                "--address",
                &address,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon (Debian package dbus-daemon) is installed");
        let mut ready = String::new();
        BufReader::new(daemon.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert!(
            ready.starts_with("unix:"),
            "dbus-daemon did not start on {address}"
        );
        let calls = Calls::default();
        let mut connections = vec![];
        rt.block_on(async {
            let builder = || zbus::connection::Builder::address(address.as_str());
            if logind {
                let c = builder()
                    .name("org.freedesktop.login1")
                    .serve_at(
                        "/org/freedesktop/login1",
                        Login1 {
                            calls: calls.clone(),
                        },
                    )
                    .build()
                    .await
                    .expect("logind double on the private bus");
                connections.push(c);
            }
            {
                let c = builder()
                    .name("org.freedesktop.systemd1")
                    .serve_at(
                        "/org/freedesktop/systemd1",
                        Systemd1 {
                            calls: calls.clone(),
                            reboots: systemd_reboots,
                            standin: standin.map(Path::to_path_buf),
                            list_jobs_calls: Default::default(),
                            failed_seen: Default::default(),
                        },
                    )
                    .build()
                    .await
                    .expect("systemd double on the private bus");
                connections.push(c);
            }
        });
        Self {
            daemon,
            address,
            calls,
            _connections: connections,
        }
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}
