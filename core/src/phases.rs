//! Where a run's time went: the phases of one run (or of the boot's
//! fetch), as the agent measured them, for the journal, the state file
//! and `status`. An operator reads them to see whether a first boot
//! waited on the boot itself, the login, the download or the switch.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One phase of a run, in the order a run goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// From the machine's boot to the start of the run: only for the
    /// first run of a boot (what a first boot waits for before the agent
    /// can switch: `multi-user.target`).
    Boot,
    /// IMDS (instance, user data) and the SSM parameter.
    Metadata,
    /// `determinate-nixd login aws`.
    Login,
    /// `fh resolve --json`.
    Resolve,
    /// The closure's download (`fh fetch`), or finding it already there.
    Fetch,
    /// `fh apply nixos`: the profile and `switch-to-configuration`.
    Switch,
    /// Checking that the system links point at the target.
    Verify,
    /// The health gate (and a rollback, when it came to that).
    Health,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Boot,
        Phase::Metadata,
        Phase::Login,
        Phase::Resolve,
        Phase::Fetch,
        Phase::Switch,
        Phase::Verify,
        Phase::Health,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Boot => "boot",
            Phase::Metadata => "metadata",
            Phase::Login => "login",
            Phase::Resolve => "resolve",
            Phase::Fetch => "fetch",
            Phase::Switch => "switch",
            Phase::Verify => "verify",
            Phase::Health => "health",
        }
    }

    pub fn parse(name: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// One measured phase, as the state file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Timing {
    pub phase: String,
    pub ms: u64,
    /// What the number means when it is not the plain duration (the fetch
    /// found the closure already fetched at boot, and how long that took).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The phases of one run, in phase order; a phase met twice (the health
/// gate of an earlier apply, then this run's) adds up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Phases {
    entries: Vec<(Phase, Duration, Option<String>)>,
}

impl Phases {
    pub fn add(&mut self, phase: Phase, d: Duration) {
        match self.entries.iter_mut().find(|(p, _, _)| *p == phase) {
            Some((_, total, _)) => *total += d,
            None => {
                self.entries.push((phase, d, None));
                self.entries.sort_by_key(|(p, _, _)| *p);
            }
        }
    }

    /// Adds a note to a phase already measured.
    pub fn note(&mut self, phase: Phase, note: impl Into<String>) {
        if let Some((_, _, n)) = self.entries.iter_mut().find(|(p, _, _)| *p == phase) {
            *n = Some(note.into());
        }
    }

    pub fn get(&self, phase: Phase) -> Option<Duration> {
        self.entries
            .iter()
            .find(|(p, _, _)| *p == phase)
            .map(|(_, d, _)| *d)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `boot 10.2 s, metadata 12 ms, fetch 3 ms (fetched at boot in 8.1 s)`.
    pub fn summary(&self) -> String {
        self.entries
            .iter()
            .map(|(p, d, note)| match note {
                Some(n) => format!("{} {} ({n})", p.name(), human(*d)),
                None => format!("{} {}", p.name(), human(*d)),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// For a journal field and for scripts: `boot=10200 metadata=12`,
    /// milliseconds, phase order.
    pub fn field(&self) -> String {
        self.entries
            .iter()
            .map(|(p, d, _)| format!("{}={}", p.name(), d.as_millis()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn records(&self) -> Vec<Timing> {
        self.entries
            .iter()
            .map(|(p, d, note)| Timing {
                phase: p.name().to_owned(),
                ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                note: note.clone(),
            })
            .collect()
    }

    /// Back from the state file; phases this version does not know are
    /// dropped, not guessed.
    pub fn from_records(records: &[Timing]) -> Self {
        let mut phases = Self::default();
        for r in records {
            if let Some(p) = Phase::parse(&r.phase) {
                phases.add(p, Duration::from_millis(r.ms));
                if let Some(n) = &r.note {
                    phases.note(p, n.clone());
                }
            }
        }
        phases
    }
}

/// A duration for people: `12 ms`, `1.5 s`, `2 min 5 s`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        let s = d.as_secs();
        format!("{} min {} s", s / 60, s % 60)
    }
}

/// How long the machine has been up, from `/proc/uptime` (`12.34 56.78`).
pub fn parse_uptime(text: &str) -> Option<Duration> {
    let first = text.split_whitespace().next()?;
    let secs: f64 = first.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

/// When PID 1 started, after the kernel's boot, from `/proc/1/stat`
/// (field 22, `starttime`, in clock ticks; proc(5)). The command field
/// may hold spaces and parentheses: fields are counted after its last `)`.
pub fn parse_start_time(stat: &str, ticks_per_second: u64) -> Option<Duration> {
    if ticks_per_second == 0 {
        return None;
    }
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state); starttime is field 22.
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    Some(Duration::from_secs_f64(
        ticks as f64 / ticks_per_second as f64,
    ))
}

/// Time since this machine booted. On a VM the kernel's uptime is it
/// (from the kernel's start: firmware, boot loader and the launch itself
/// come before). In a container the kernel is the host's and has been up
/// for longer: the container's boot is when its PID 1 started
/// (`container_init`). An uptime that is not longer than that is already
/// the container's own (lxcfs virtualises `/proc/uptime`).
pub fn since_boot(uptime: Duration, container_init: Option<Duration>) -> Duration {
    match container_init {
        Some(start) if start < uptime => uptime - start,
        _ => uptime,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_add_up_in_phase_order() {
        let mut p = Phases::default();
        p.add(Phase::Switch, Duration::from_millis(3100));
        p.add(Phase::Metadata, Duration::from_millis(12));
        p.add(Phase::Health, Duration::from_millis(500));
        p.add(Phase::Health, Duration::from_millis(1500));
        p.add(Phase::Fetch, Duration::from_millis(3));
        p.note(Phase::Fetch, "fetched at boot in 8.1 s");
        assert_eq!(
            p.summary(),
            "metadata 12 ms, fetch 3 ms (fetched at boot in 8.1 s), switch 3.1 s, health 2.0 s"
        );
        assert_eq!(p.field(), "metadata=12 fetch=3 switch=3100 health=2000");
        assert_eq!(p.get(Phase::Health), Some(Duration::from_secs(2)));
        let back = Phases::from_records(&p.records());
        assert_eq!(back, p);
    }

    #[test]
    fn unknown_phases_in_the_state_are_dropped() {
        let r = vec![
            Timing {
                phase: "teleport".into(),
                ms: 1,
                note: None,
            },
            Timing {
                phase: "login".into(),
                ms: 900,
                note: None,
            },
        ];
        assert_eq!(Phases::from_records(&r).summary(), "login 900 ms");
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human(Duration::from_millis(0)), "0 ms");
        assert_eq!(human(Duration::from_millis(999)), "999 ms");
        assert_eq!(human(Duration::from_millis(1049)), "1.0 s");
        assert_eq!(human(Duration::from_millis(59_900)), "59.9 s");
        assert_eq!(human(Duration::from_secs(125)), "2 min 5 s");
    }

    #[test]
    fn boot_time_from_proc() {
        assert_eq!(
            parse_uptime("12.50 40.10\n"),
            Some(Duration::from_millis(12500))
        );
        assert_eq!(parse_uptime(""), None);
        assert_eq!(parse_uptime("-1 0"), None);
        // proc(5): pid (comm) state ppid … starttime is field 22.
        let mut fields = vec!["S".to_owned()];
        fields.extend((4..=21).map(|n| n.to_string()));
        fields.push("25000".into());
        fields.extend(["0".into(), "0".into()]);
        let stat = format!("1 (sy) stem(d)) {}", fields.join(" "));
        assert_eq!(parse_start_time(&stat, 100), Some(Duration::from_secs(250)));
        assert_eq!(parse_start_time(&stat, 0), None);
        assert_eq!(parse_start_time("1 (init) S 0", 100), None);
        let up = Duration::from_secs(1000);
        assert_eq!(since_boot(up, None), up);
        assert_eq!(
            since_boot(up, Some(Duration::from_secs(990))),
            Duration::from_secs(10)
        );
        // lxcfs: the uptime is the container's already.
        assert_eq!(since_boot(up, Some(Duration::from_secs(2000))), up);
    }
}
