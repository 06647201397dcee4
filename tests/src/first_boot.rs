//! One first boot in a container, measured from outside: with a download
//! of D seconds (the `nix` stand-in's) and a slow unit of B seconds that
//! `multi-user.target` waits for, with the boot's fetch
//! (`nixos-ami-agent-fetch.service`) or without it (masked). For the
//! benchmark's section on boot to converged.

use crate::container::{BOOT_UNIT, Container, FETCH_UNIT, REF};
use crate::harness::toml_user_data;
use crate::standin::Download;
use std::time::Duration;

const PHASES: &str = "d83fcfe263434edda3992e11922913c2";

/// What one first boot took.
#[derive(Debug, Clone)]
pub struct Sample {
    /// From the container's PID 1 starting to the boot run's READY=1.
    pub boot_to_converged: Duration,
    /// `PHASES_MS` of the boot run's and the fetch's journal events.
    pub run_phases: String,
    pub fetch_phases: Option<String>,
    /// `SINCE_BOOT_MS` of the boot run's phases event: the agent's own
    /// boot to converged (it finishes just before READY=1).
    pub run_since_boot: Option<Duration>,
    /// The unit that downloaded the target's closure.
    pub downloaded_by: Option<String>,
}

/// Boots a fresh container once: D = `download`, B = `slow_boot`; the
/// boot's fetch masked unless `overlapped`. `Err` says what went wrong.
pub fn measure(
    download: Duration,
    slow_boot: Duration,
    overlapped: bool,
) -> Result<Sample, String> {
    let mut c = Container::new(Some(&toml_user_data(&format!("flake = \"{REF}\""))));
    c.behaviour.download_ms = download.as_millis() as u64;
    c.slow_boot(slow_boot.as_secs_f64());
    if !overlapped {
        c.mask_fetch();
    }
    let code = c.boot(Duration::from_secs(180), |_| {});
    if code != 0 {
        return Err(format!("the container exited {code}"));
    }
    let boot = c
        .boot_ids()
        .first()
        .cloned()
        .ok_or("no boot in the journal")?;
    let boot_to_converged = c
        .boot_to_converged(&boot)
        .ok_or_else(|| format!("the boot run did not converge:\n{}", c.journal_text()))?;
    let journal = c.journal();
    let phases = |unit: &str| {
        journal
            .iter()
            .find(|e| e["MESSAGE_ID"] == PHASES && e["_SYSTEMD_UNIT"] == unit)
            .cloned()
    };
    let run = phases(BOOT_UNIT).ok_or("the boot run logged no phases")?;
    let fetch = phases(FETCH_UNIT);
    let text = |e: &serde_json::Value, k: &str| e[k].as_str().map(str::to_owned);
    let downloads: Vec<Download> = c.downloads();
    Ok(Sample {
        boot_to_converged,
        run_phases: text(&run, "PHASES_MS").unwrap_or_default(),
        fetch_phases: fetch.as_ref().and_then(|e| text(e, "PHASES_MS")),
        run_since_boot: text(&run, "SINCE_BOOT_MS")
            .and_then(|s| s.parse().ok())
            .map(Duration::from_millis),
        downloaded_by: downloads
            .iter()
            .find(|d| d.path == "new-system")
            .and_then(|d| d.unit.clone()),
    })
}
