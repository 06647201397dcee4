//! systemd's manager over D-Bus (`org.freedesktop.systemd1.Manager`, as
//! documented in systemd's `org.freedesktop.systemd1(5)`): what the health
//! gate asks (the system state, the job queue, failed and named units)
//! and, where logind is absent, the reboot. One proxy for both.

use zbus::proxy;

/// One entry of `ListUnits*`: name, description, load state, active state,
/// sub state, followed unit, unit path, job id, job type, job path.
pub type UnitStatus = (
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

/// One entry of `ListJobs`: id, unit, type, state, job path, unit path.
pub type JobStatus = (
    u32,
    String,
    String,
    String,
    zbus::OwnedObjectPath,
    zbus::OwnedObjectPath,
);

#[proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub trait Systemd1Manager {
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<zbus::OwnedObjectPath>;

    fn list_jobs(&self) -> zbus::Result<Vec<JobStatus>>;

    fn list_units_filtered(&self, states: &[&str]) -> zbus::Result<Vec<UnitStatus>>;

    /// Loads units that are not loaded yet: a unit that does not exist is
    /// returned with load state `not-found` and active state `inactive`.
    fn list_units_by_names(&self, names: &[&str]) -> zbus::Result<Vec<UnitStatus>>;

    /// The unit a process runs in (its service, or a session's scope).
    #[zbus(name = "GetUnitByPID")]
    fn get_unit_by_pid(&self, pid: u32) -> zbus::Result<zbus::OwnedObjectPath>;

    /// `initializing`, `starting`, `running`, `degraded`, `maintenance`,
    /// `stopping`, `offline` (or `unknown`).
    #[zbus(property)]
    fn system_state(&self) -> zbus::Result<String>;
}

/// A proxy that reads properties when asked: systemd does not announce
/// `SystemState` changes, so a cached value would never move.
pub async fn manager(conn: &zbus::Connection) -> zbus::Result<Systemd1ManagerProxy<'static>> {
    Systemd1ManagerProxy::builder(conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
}
