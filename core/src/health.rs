//! The health gate's settings and its verdict, pure.
//!
//! `fh apply nixos` ignores switch-to-configuration's exit status
//! (DeterminateSystems/fh `src/cli/cmd/apply/mod.rs`), so a target that
//! switches but leaves failed units, or an application that does not
//! answer, looks applied. After every `switch` or `test` that changed the
//! system the agent observes the machine (systemd over D-Bus, the checks
//! below) and [`verdict`] decides from what it saw.
//!
//! Who may set what: the image's config file (and the one the new system
//! carries, read again after the switch) may set every key; user data may
//! set all but `commands`, because user data is not trusted to run
//! programs outside its scripts (which run once, recorded, as root by the
//! operator's choice, not on every switch).

use crate::settings::{SettingsError, Source};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::time::Duration;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_UNITS: usize = 64;
const MAX_CHECKS: usize = 16;
const MAX_ARGS: usize = 64;
const MAX_ARG: usize = 4096;

/// `[health]` as any source writes it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HealthDoc {
    pub timeout: Option<String>,
    pub required_units: Option<Vec<String>>,
    pub commands: Option<Vec<CommandDoc>>,
    pub http: Option<Vec<HttpDoc>>,
    pub rollback: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CommandDoc {
    pub argv: Vec<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HttpDoc {
    pub url: String,
    pub timeout: Option<String>,
}

/// A program run with this argv (no shell); healthy when it exits 0
/// within `timeout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandCheck {
    pub argv: Vec<String>,
    pub timeout: Duration,
}

impl CommandCheck {
    pub fn name(&self) -> String {
        crate::text::shown(&self.argv.join(" "), 200)
    }
}

/// A GET of a local URL; healthy on a 2xx within `timeout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpProbe {
    pub url: String,
    pub timeout: Duration,
}

/// One source's `[health]`, each key checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthLayer {
    pub timeout: Option<Duration>,
    pub required_units: Option<Vec<String>>,
    pub commands: Option<Vec<CommandCheck>>,
    pub http: Option<Vec<HttpProbe>>,
    pub rollback: Option<bool>,
}

/// The merged gate settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The whole gate: settling, the units, every check and its retries.
    pub timeout: Duration,
    pub required_units: Vec<String>,
    pub commands: Vec<CommandCheck>,
    pub http: Vec<HttpProbe>,
    /// `false`: an unhealthy system is reported, and kept.
    pub rollback: bool,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            required_units: vec![],
            commands: vec![],
            http: vec![],
            rollback: true,
        }
    }
}

impl Health {
    /// Layers, lowest first; a key a layer sets replaces the lower value
    /// whole (lists are not concatenated: the higher layer says the list).
    pub fn merge<'a>(layers: impl IntoIterator<Item = &'a HealthLayer>) -> Self {
        let mut h = Health::default();
        for l in layers {
            if let Some(t) = l.timeout {
                h.timeout = t;
            }
            if let Some(u) = &l.required_units {
                h.required_units = u.clone();
            }
            if let Some(c) = &l.commands {
                h.commands = c.clone();
            }
            if let Some(p) = &l.http {
                h.http = p.clone();
            }
            if let Some(r) = l.rollback {
                h.rollback = r;
            }
        }
        h
    }
}

/// The gate runs inside the boot unit's start (`TimeoutStartSec=3h`),
/// after an apply: an hour for all of it is already generous.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

fn duration(raw: &str) -> Result<Duration, String> {
    match humantime::parse_duration(raw) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) if d > MAX_TIMEOUT => Err("is longer than 1 hour".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("not a duration like \"120s\" or \"5m\": {e}")),
    }
}

/// A unit name as systemd accepts it (`unit_name_is_valid`): a name of
/// at most 255 characters from `[A-Za-z0-9:_.\\@-]`, with a known type
/// suffix. Anything else could not be a unit, so it is a typo.
fn unit_name(raw: &str) -> Result<(), String> {
    const SUFFIXES: &[&str] = &[
        ".service",
        ".socket",
        ".target",
        ".mount",
        ".automount",
        ".swap",
        ".timer",
        ".path",
        ".slice",
        ".scope",
        ".device",
    ];
    if raw.is_empty() || raw.len() > 255 {
        return Err("is not a unit name (1 to 255 characters)".into());
    }
    if !raw
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || ":_.\\@-".contains(c))
    {
        return Err("is not a unit name: only letters, digits and `:_.\\@-`".into());
    }
    if !SUFFIXES
        .iter()
        .any(|s| raw.len() > s.len() && raw.ends_with(s))
    {
        return Err("is not a unit name: it needs a type suffix such as `.service`".into());
    }
    // A template (`foo@.service`) is no unit that can be active, and
    // systemd's ListUnitsByNames refuses the whole call for one.
    if raw.contains("@.") {
        return Err("is a template: name an instance, such as `foo@bar.service`".into());
    }
    Ok(())
}

/// Only the machine itself: a probe is about this system's health, and a
/// URL elsewhere would make the agent a client of other hosts.
fn local_url(raw: &str) -> Result<(), String> {
    const FORM: &str = "must be a local http URL (http://127.0.0.1:PORT/PATH, http://[::1]:PORT/PATH or http://localhost:PORT/PATH)";
    if raw.len() > 2048 || raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{FORM}, without spaces or control characters"));
    }
    let url = url::Url::parse(raw).map_err(|e| format!("{FORM}: {e}"))?;
    if url.scheme() != "http" {
        return Err(format!("{FORM}: not {}://", url.scheme()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{FORM}: no user or password"));
    }
    let local = match url.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    if !local {
        return Err(format!("{FORM}: the host is not this machine"));
    }
    Ok(())
}

impl HealthLayer {
    /// Validates `[health]` from `source`; `commands` only where programs
    /// may come from (the image's config file).
    pub fn from_doc(doc: HealthDoc, source: &Source) -> Result<Self, SettingsError> {
        let err = |key: &str, why: String| {
            SettingsError::new(source, Some(&format!("health.{key}")), why)
        };
        let timeout = doc
            .timeout
            .map(|t| duration(&t).map_err(|e| err("timeout", e)))
            .transpose()?;
        let required_units = match doc.required_units {
            None => None,
            Some(u) if u.len() > MAX_UNITS => {
                return Err(err(
                    "required-units",
                    format!("lists more than {MAX_UNITS} units"),
                ));
            }
            Some(u) => {
                for (i, name) in u.iter().enumerate() {
                    unit_name(name).map_err(|e| err(&format!("required-units[{i}]"), e))?;
                }
                let unique: BTreeSet<_> = u.iter().collect();
                Some(unique.into_iter().cloned().collect())
            }
        };
        let commands = match doc.commands {
            None => None,
            Some(_) if !matches!(source, Source::ConfigFile(_)) => {
                return Err(err(
                    "commands",
                    "can only be set in the image's config file (the NixOS module's \
                     services.nixos-ami-agent.settings.health.commands): user data and SSM values may not \
                     add programs to run"
                        .into(),
                ));
            }
            Some(c) if c.len() > MAX_CHECKS => {
                return Err(err("commands", format!("lists more than {MAX_CHECKS} checks")));
            }
            Some(c) => Some(
                c.into_iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let key = format!("commands[{i}]");
                        let Some(program) = c.argv.first() else {
                            return Err(err(&format!("{key}.argv"), "is empty".into()));
                        };
                        if !program.starts_with('/') {
                            return Err(err(
                                &format!("{key}.argv"),
                                "the program must be an absolute path (there is no shell and no search)"
                                    .into(),
                            ));
                        }
                        if c.argv.len() > MAX_ARGS
                            || c.argv.iter().any(|a| a.len() > MAX_ARG || a.contains('\0'))
                        {
                            return Err(err(
                                &format!("{key}.argv"),
                                format!(
                                    "at most {MAX_ARGS} arguments of at most {MAX_ARG} bytes, without NUL"
                                ),
                            ));
                        }
                        let timeout = c
                            .timeout
                            .map(|t| duration(&t).map_err(|e| err(&format!("{key}.timeout"), e)))
                            .transpose()?
                            .unwrap_or(DEFAULT_CHECK_TIMEOUT);
                        Ok(CommandCheck {
                            argv: c.argv,
                            timeout,
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let http = match doc.http {
            None => None,
            Some(p) if p.len() > MAX_CHECKS => {
                return Err(err("http", format!("lists more than {MAX_CHECKS} probes")));
            }
            Some(p) => Some(
                p.into_iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let key = format!("http[{i}]");
                        local_url(&p.url).map_err(|e| err(&format!("{key}.url"), e))?;
                        let timeout = p
                            .timeout
                            .map(|t| duration(&t).map_err(|e| err(&format!("{key}.timeout"), e)))
                            .transpose()?
                            .unwrap_or(DEFAULT_CHECK_TIMEOUT);
                        Ok(HttpProbe {
                            url: p.url,
                            timeout,
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(Self {
            timeout,
            required_units,
            commands,
            http,
            rollback: doc.rollback,
        })
    }
}

/// What the gate saw. Each field is what systemd (or a check) said, or
/// why it could not be asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// `Err`: systemd did not settle within the timeout, or could not be
    /// asked; the reason.
    pub settled: Result<(), String>,
    /// Units failed before the apply; `None`: not known (then every failed
    /// unit counts, which errs towards rolling back).
    pub failed_before: Option<BTreeSet<String>>,
    /// Units failed now; `Err`: could not be listed.
    pub failed_now: Result<BTreeSet<String>, String>,
    /// `health.required-units` with their `ActiveState`, or why not known.
    pub required: Vec<(String, Result<String, String>)>,
    /// Each check: its name and `Err(why)` if it did not pass in time.
    pub checks: Vec<(String, Result<(), String>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Empty: healthy. Each entry names one thing that is wrong.
    pub problems: Vec<String>,
}

impl Verdict {
    pub fn healthy(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn summary(&self) -> String {
        if self.healthy() {
            "healthy".into()
        } else {
            format!("unhealthy: {}", self.problems.join("; "))
        }
    }
}

/// Healthy when systemd settled, no unit failed that had not failed
/// before, every required unit is active and every check passed. Anything
/// that could not be observed counts against health: the gate says
/// healthy only about what it saw.
pub fn verdict(o: &Observation) -> Verdict {
    let mut problems = vec![];
    if let Err(why) = &o.settled {
        problems.push(why.clone());
    }
    match &o.failed_now {
        Ok(now) => {
            let new: Vec<&str> = now
                .iter()
                .filter(|u| o.failed_before.as_ref().is_none_or(|b| !b.contains(*u)))
                .map(String::as_str)
                .collect();
            if !new.is_empty() {
                problems.push(format!("failed units: {}", new.join(", ")));
            }
        }
        Err(why) => problems.push(format!("failed units could not be listed: {why}")),
    }
    for (unit, state) in &o.required {
        match state {
            Ok(s) if s == "active" => {}
            Ok(s) => problems.push(format!("required unit {unit} is {s}, not active")),
            Err(why) => problems.push(format!("required unit {unit}: {why}")),
        }
    }
    for (name, r) in &o.checks {
        if let Err(why) = r {
            problems.push(format!("check {name} failed: {why}"));
        }
    }
    Verdict { problems }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(source: Source, toml: &str) -> Result<HealthLayer, SettingsError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Doc {
            health: HealthDoc,
        }
        let doc: Doc = crate::settings::document::from_toml(toml)
            .map_err(|e| SettingsError::from_doc(&source, e))?;
        HealthLayer::from_doc(doc.health, &source)
    }

    fn config() -> Source {
        Source::ConfigFile("/etc/nixos-ami-agent/config.toml".into())
    }

    fn set(units: &[&str]) -> BTreeSet<String> {
        units.iter().map(|u| (*u).to_owned()).collect()
    }

    #[test]
    fn every_key_from_the_config_file() {
        let l = layer(
            config(),
            r#"[health]
timeout = "90s"
required-units = ["web.service", "db.socket", "web.service"]
rollback = false
commands = [{ argv = ["/run/current-system/sw/bin/curl", "-f", "x"], timeout = "3s" }]
http = [{ url = "http://127.0.0.1:8080/health" }, { url = "http://[::1]/", timeout = "1s" }]
"#,
        )
        .unwrap();
        assert_eq!(l.timeout, Some(Duration::from_secs(90)));
        assert_eq!(
            l.required_units,
            Some(vec!["db.socket".into(), "web.service".into()])
        );
        assert_eq!(l.rollback, Some(false));
        let c = &l.commands.as_ref().unwrap()[0];
        assert_eq!(c.timeout, Duration::from_secs(3));
        assert_eq!(l.http.as_ref().unwrap()[0].timeout, DEFAULT_CHECK_TIMEOUT);
        let h = Health::merge([&l]);
        assert!(!h.rollback);
        assert_eq!(h.commands.len(), 1);
    }

    #[test]
    fn user_data_may_not_add_commands() {
        let e = layer(
            Source::UserData,
            "[health]\ncommands = [{ argv = [\"/bin/true\"] }]",
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("health.commands"));
        assert!(e.reason.contains("only be set in the image"), "{e}");
        // Everything else it may set.
        let l = layer(
            Source::UserData,
            "[health]\ntimeout = \"1m\"\nrequired-units = [\"a.service\"]\nhttp = [{ url = \"http://localhost:1/\" }]\nrollback = false",
        )
        .unwrap();
        assert_eq!(l.rollback, Some(false));
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("timeout = \"soon\"", "health.timeout", "not a duration"),
            ("timeout = \"0s\"", "health.timeout", "longer than zero"),
            ("timeout = \"2h\"", "health.timeout", "longer than 1 hour"),
            (
                "required-units = [\"getty@.service\"]",
                "health.required-units[0]",
                "template",
            ),
            (
                "required-units = [\"web\"]",
                "health.required-units[0]",
                "type suffix",
            ),
            (
                "required-units = [\"a.service\", \"b c.service\"]",
                "health.required-units[1]",
                "only letters",
            ),
            (
                "commands = [{ argv = [] }]",
                "health.commands[0].argv",
                "empty",
            ),
            (
                "commands = [{ argv = [\"curl\"] }]",
                "health.commands[0].argv",
                "absolute path",
            ),
            (
                "commands = [{ argv = [\"/bin/true\"], timeout = \"x\" }]",
                "health.commands[0].timeout",
                "not a duration",
            ),
            (
                "http = [{ url = \"http://10.0.0.1/\" }]",
                "health.http[0].url",
                "not this machine",
            ),
            (
                "http = [{ url = \"https://127.0.0.1/\" }]",
                "health.http[0].url",
                "not https",
            ),
            (
                "http = [{ url = \"http://u:p@127.0.0.1/\" }]",
                "health.http[0].url",
                "no user",
            ),
            ("rollback = \"yes\"", "health.rollback", "bool"),
            ("retries = 3", "health.retries", "unknown field"),
        ];
        for (toml, key, why) in cases {
            let e = layer(config(), &format!("[health]\n{toml}")).expect_err(toml);
            assert_eq!(e.key.as_deref(), Some(*key), "{toml}: {e}");
            assert!(e.reason.contains(why), "{toml}: {e}");
        }
    }

    #[test]
    fn higher_layers_replace_keys() {
        let image = layer(
            config(),
            "[health]\nrequired-units = [\"a.service\"]\ncommands = [{ argv = [\"/bin/true\"] }]",
        )
        .unwrap();
        let user = layer(
            Source::UserData,
            "[health]\nrequired-units = [\"b.service\"]\nrollback = false",
        )
        .unwrap();
        let h = Health::merge([&image, &user]);
        assert_eq!(h.required_units, vec!["b.service".to_owned()]);
        assert_eq!(h.commands.len(), 1, "kept from the image");
        assert!(!h.rollback);
        assert_eq!(h.timeout, DEFAULT_TIMEOUT);
        assert_eq!(Health::merge([]), Health::default());
    }

    #[test]
    fn verdicts() {
        let healthy = Observation {
            settled: Ok(()),
            failed_before: Some(set(&["old.service"])),
            failed_now: Ok(set(&["old.service"])),
            required: vec![("web.service".into(), Ok("active".into()))],
            checks: vec![("http://127.0.0.1/".into(), Ok(()))],
        };
        assert!(
            verdict(&healthy).healthy(),
            "a unit failed before is not new"
        );

        let mut o = healthy.clone();
        o.failed_now = Ok(set(&["old.service", "new.service"]));
        assert_eq!(verdict(&o).problems, ["failed units: new.service"]);

        let mut o = healthy.clone();
        o.failed_before = None;
        assert_eq!(
            verdict(&o).problems,
            ["failed units: old.service"],
            "unknown before: every failed unit counts"
        );

        let mut o = healthy.clone();
        o.required = vec![
            ("web.service".into(), Ok("inactive".into())),
            ("db.service".into(), Err("no such unit".into())),
        ];
        assert_eq!(
            verdict(&o).problems,
            [
                "required unit web.service is inactive, not active",
                "required unit db.service: no such unit"
            ]
        );

        let mut o = healthy.clone();
        o.settled = Err("systemd did not settle within 5s: 2 jobs queued".into());
        o.failed_now = Err("no bus".into());
        o.checks = vec![("/bin/check".into(), Err("exit status 1".into()))];
        let v = verdict(&o);
        assert_eq!(v.problems.len(), 3, "{v:?}");
        assert!(v.summary().starts_with("unhealthy: systemd did not settle"));
    }
}
