//! Measuring a run's phases ([`crate::phases`]) and how long after the
//! machine's boot it ran, and reporting them: one journal event per run
//! (`MESSAGE_ID` [`crate::log::message_id::PHASES`], the phases in
//! `PHASES_MS`, and `SINCE_BOOT_MS` for the first run of a boot).

use crate::phases::{Phase, Phases};
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The phases of the run in progress. Shared by the steps of one run
/// (behind `&`), so each step adds its own time where it runs.
#[derive(Debug, Default)]
pub struct Clock {
    phases: Mutex<Phases>,
}

impl Clock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `fut`, adding its time to `phase` however it ends.
    pub async fn time<T>(&self, phase: Phase, fut: impl Future<Output = T>) -> T {
        let t = Instant::now();
        let r = fut.await;
        self.add(phase, t.elapsed());
        r
    }

    pub fn add(&self, phase: Phase, d: Duration) {
        self.lock().add(phase, d);
    }

    pub fn note(&self, phase: Phase, note: impl Into<String>) {
        self.lock().note(phase, note);
    }

    pub fn phases(&self) -> Phases {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Phases> {
        // A panic while holding it leaves numbers, not broken invariants.
        self.phases.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Time since this machine (VM or container) booted, best effort: the
/// kernel's uptime, less the time before PID 1 started when systemd says
/// it runs in a container (`/run/systemd/container`, which PID 1 writes
/// there; the kernel, and so its uptime, is then the host's).
pub fn since_boot() -> Option<Duration> {
    let uptime = crate::phases::parse_uptime(&read_small("/proc/uptime")?)?;
    let container_init = if std::path::Path::new("/run/systemd/container").exists() {
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .and_then(|t| u64::try_from(t).ok())?;
        Some(crate::phases::parse_start_time(
            &read_small("/proc/1/stat")?,
            ticks,
        )?)
    } else {
        None
    };
    Some(crate::phases::since_boot(uptime, container_init))
}

fn read_small(path: &str) -> Option<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(4096)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// The journal event with a run's (or a fetch's) phases. `after_boot`:
/// how long after the boot it finished, for the first run of a boot.
pub fn report(what: &str, phases: &Phases, after_boot: Option<Duration>) {
    if phases.is_empty() {
        return;
    }
    let since = after_boot.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    match after_boot {
        Some(d) => tracing::info!(
            message_id = crate::log::message_id::PHASES,
            phases_ms = phases.field(),
            since_boot_ms = since,
            "{what} phases: {}; finished {} after the boot",
            phases.summary(),
            crate::phases::human(d)
        ),
        None => tracing::info!(
            message_id = crate::log::message_id::PHASES,
            phases_ms = phases.field(),
            "{what} phases: {}",
            phases.summary()
        ),
    }
}
