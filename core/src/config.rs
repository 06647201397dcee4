//! The image's config file (`/etc/nixos-ami-agent/config.toml`, written by
//! the NixOS module): top-level keys are image defaults for the settings;
//! `[agent]` holds what only the image may set (program paths, where state
//! and the system links live, budgets).

use crate::settings::document;
use crate::settings::{Document, Layer, SettingsError, Source};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_PATH: &str = "/etc/nixos-ami-agent/config.toml";
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";
/// The SDK's variable, honoured first so one setting moves both clients.
pub const IMDS_ENDPOINT_ENV: &str = "AWS_EC2_METADATA_SERVICE_ENDPOINT";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct AgentTable {
    fh: Option<PathBuf>,
    determinate_nixd: Option<PathBuf>,
    nix_env: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    current_system: Option<PathBuf>,
    booted_system: Option<PathBuf>,
    boot_id: Option<PathBuf>,
    system_profile: Option<PathBuf>,
    imds_endpoint: Option<String>,
    retry_budget: Option<String>,
    command_timeout: Option<String>,
    apply_timeout: Option<String>,
    script_timeout: Option<String>,
    lock_wait: Option<String>,
    reboot_timeout: Option<String>,
    report_compliance: Option<bool>,
}

/// What only the image decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    pub fh: PathBuf,
    pub determinate_nixd: PathBuf,
    /// Sets the system profile back to the previous system on a rollback.
    pub nix_env: PathBuf,
    pub state_dir: PathBuf,
    pub current_system: PathBuf,
    pub booted_system: PathBuf,
    /// The kernel's identifier of this boot: a reboot request counts as
    /// done only once the machine has booted since (see
    /// `RebootRecord::honoured` in the agent).
    pub boot_id: PathBuf,
    pub system_profile: PathBuf,
    /// From the file; see [`Agent::imds_endpoint`] for the effective one.
    pub imds_endpoint: Option<String>,
    /// Per remote step (IMDS, SSM, login, resolve), not per run.
    pub retry_budget: Duration,
    /// `determinate-nixd login aws` and `fh resolve`, per attempt.
    pub command_timeout: Duration,
    /// `fh apply nixos`: covers downloading a large closure.
    pub apply_timeout: Duration,
    pub script_timeout: Duration,
    /// How long a second run waits for the first to finish.
    pub lock_wait: Duration,
    /// The reboot request over D-Bus (connect and call): a bus or logind
    /// that never answers must not hold the run, and its lock, forever.
    pub reboot_timeout: Duration,
    /// Report each run's outcome to SSM Compliance (`PutComplianceItems`
    /// on this instance, type `Custom:NixOSAmiAgent`), so a fleet can be
    /// seen from AWS (`fleet status`). Off by default: the instance role
    /// needs `ssm:PutComplianceItems`; the AMI profile turns it on.
    pub report_compliance: bool,
}

impl Default for Agent {
    fn default() -> Self {
        Self {
            fh: "/run/current-system/sw/bin/fh".into(),
            determinate_nixd: "/run/current-system/sw/bin/determinate-nixd".into(),
            nix_env: "/run/current-system/sw/bin/nix-env".into(),
            state_dir: "/var/lib/nixos-ami-agent".into(),
            current_system: "/run/current-system".into(),
            booted_system: "/run/booted-system".into(),
            boot_id: "/proc/sys/kernel/random/boot_id".into(),
            system_profile: "/nix/var/nix/profiles/system".into(),
            imds_endpoint: None,
            retry_budget: Duration::from_secs(120),
            command_timeout: Duration::from_secs(300),
            apply_timeout: Duration::from_secs(3600),
            script_timeout: Duration::from_secs(3600),
            lock_wait: Duration::from_secs(30),
            reboot_timeout: Duration::from_secs(30),
            report_compliance: false,
        }
    }
}

impl Agent {
    /// `AWS_EC2_METADATA_SERVICE_ENDPOINT` (given by the caller, which owns
    /// the environment), else the config file, else the link-local address.
    pub fn imds_endpoint(&self, env: Option<&str>) -> Result<String, String> {
        let (raw, from) = match (env.filter(|e| !e.is_empty()), &self.imds_endpoint) {
            (Some(e), _) => (e.to_owned(), IMDS_ENDPOINT_ENV),
            (None, Some(c)) => (c.clone(), "[agent] imds-endpoint"),
            (None, None) => return Ok(DEFAULT_IMDS_ENDPOINT.into()),
        };
        check_endpoint(&raw).map_err(|why| format!("{from}: {why}"))?;
        Ok(raw.trim_end_matches('/').to_owned())
    }
}

/// An IMDS endpoint is a base URL: `http://HOST[:PORT][/PATH]` and nothing
/// else. Request paths are appended to it, so a query (`?x=1`), a
/// fragment, credentials or a relative reference would send the requests
/// somewhere else than they look.
fn check_endpoint(raw: &str) -> Result<(), String> {
    const FORM: &str = "must be a base URL, http://HOST[:PORT][/PATH]";
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{FORM}, without spaces or control characters"));
    }
    // The URL parser forgives what a reader would misread (`http:///x`
    // is host `x`): the text itself must start with the scheme and a host.
    match raw.strip_prefix("http://") {
        Some(rest) if !rest.is_empty() && !rest.starts_with(['/', '\\']) => {}
        Some(_) => return Err(format!("{FORM}: no host")),
        None => {
            return Err(format!(
                "{FORM}: it must start with http:// (IMDS does not speak TLS)"
            ));
        }
    }
    let url = url::Url::parse(raw).map_err(|e| format!("{FORM}: {e}"))?;
    if url.scheme() != "http" {
        return Err(format!(
            "{FORM}: the scheme must be http:// (IMDS does not speak TLS), not {}://",
            url.scheme()
        ));
    }
    match url.host() {
        None => return Err(format!("{FORM}: no host")),
        Some(url::Host::Domain(d)) => {
            let labels = d.strip_suffix('.').unwrap_or(d);
            if labels.split('.').any(|l| {
                l.is_empty()
                    || l.len() > 63
                    || !l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            }) {
                return Err(format!("{FORM}: {d:?} is not a host name"));
            }
        }
        Some(url::Host::Ipv4(_) | url::Host::Ipv6(_)) => {}
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{FORM}: no user or password"));
    }
    if raw.contains('?') || url.query().is_some() {
        return Err(format!("{FORM}: no query (`?`)"));
    }
    if raw.contains('#') || url.fragment().is_some() {
        return Err(format!("{FORM}: no fragment (`#`)"));
    }
    // Request paths are appended to it: letters, digits, `-._~` and `/`.
    if !url
        .path()
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-._~/".contains(c))
    {
        return Err(format!(
            "{FORM}: the path may hold only letters, digits, `-._~` and `/`"
        ));
    }
    Ok(())
}

/// Durations beyond this are typos ("300000000000y"), and adding them to
/// a clock would overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A config file far larger than this is not one.
const MAX_FILE: usize = 1 << 20;

/// Up to `max + 1` bytes of `path`.
fn read_bounded(path: &Path, max: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)?;
    if file.metadata()?.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "is a directory",
        ));
    }
    let mut bytes = Vec::new();
    file.take(max as u64 + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    /// The image's defaults, the lowest settings layer above built-ins.
    pub defaults: Layer,
    pub agent: Agent,
}

impl Config {
    /// Built-in defaults only: what runs when the image wrote no file.
    pub fn builtin(path: &Path) -> Self {
        let source = Source::ConfigFile(path.to_owned());
        let defaults = Layer {
            source,
            target: None,
            action: None,
            reboot: None,
            login: None,
            health: Default::default(),
        };
        Self {
            path: path.to_owned(),
            defaults,
            agent: Agent::default(),
        }
    }

    /// Reads the file; a missing file is an error only when the operator
    /// named it (`--config`), since the image may legitimately write none.
    pub fn load(path: &Path, explicit: bool) -> Result<Self, SettingsError> {
        let source = Source::ConfigFile(path.to_owned());
        // At most MAX_FILE bytes, whatever the file is (a link to
        // /dev/zero has no size to check beforehand).
        let text = match read_bounded(path, MAX_FILE) {
            Ok(t) if t.len() > MAX_FILE => {
                return Err(SettingsError::new(
                    &source,
                    None,
                    format!("is larger than {} KiB", MAX_FILE / 1024),
                ));
            }
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                tracing::debug!(path = %path.display(), "no config file; using built-in defaults");
                return Ok(Self::builtin(path));
            }
            Err(e) => {
                return Err(SettingsError::new(
                    &source,
                    None,
                    format!("cannot be read: {e}"),
                ));
            }
        };
        let text = std::str::from_utf8(&text).map_err(|e| {
            SettingsError::new(
                &source,
                None,
                format!("is not UTF-8 (byte {})", e.valid_up_to()),
            )
        })?;
        Self::parse(text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, SettingsError> {
        let source = Source::ConfigFile(path.to_owned());
        let mut doc: Document<AgentTable> =
            document::from_toml(text).map_err(|e| SettingsError::from_doc(&source, e))?;
        let table = doc.agent.take().unwrap_or_default();
        let agent = agent(table, &source)?;
        let defaults = Layer::from_document(doc, source)?;
        Ok(Self {
            path: path.to_owned(),
            defaults,
            agent,
        })
    }
}

fn agent(t: AgentTable, source: &Source) -> Result<Agent, SettingsError> {
    let d = Agent::default();
    let err =
        |key: &str, why: String| SettingsError::new(source, Some(&format!("agent.{key}")), why);
    let path =
        |key: &str, v: Option<PathBuf>, default: PathBuf| -> Result<PathBuf, SettingsError> {
            match v {
                None => Ok(default),
                Some(p) if p.is_absolute() => Ok(p),
                Some(_) => Err(err(key, "must be an absolute path".into())),
            }
        };
    let duration =
        |key: &str, v: Option<String>, default: Duration| -> Result<Duration, SettingsError> {
            match v {
                None => Ok(default),
                Some(s) => match humantime::parse_duration(&s) {
                    Ok(d) if d > MAX_DURATION => Err(err(
                        key,
                        format!("{s:?} is longer than the longest allowed, 7 days"),
                    )),
                    Ok(d) if !d.is_zero() => Ok(d),
                    Ok(_) => Err(err(key, "must be longer than zero".into())),
                    Err(e) => Err(err(
                        key,
                        format!("not a duration like \"120s\" or \"5m\": {e}"),
                    )),
                },
            }
        };
    let agent = Agent {
        fh: path("fh", t.fh, d.fh)?,
        determinate_nixd: path("determinate-nixd", t.determinate_nixd, d.determinate_nixd)?,
        nix_env: path("nix-env", t.nix_env, d.nix_env)?,
        state_dir: path("state-dir", t.state_dir, d.state_dir)?,
        current_system: path("current-system", t.current_system, d.current_system)?,
        booted_system: path("booted-system", t.booted_system, d.booted_system)?,
        boot_id: path("boot-id", t.boot_id, d.boot_id)?,
        system_profile: path("system-profile", t.system_profile, d.system_profile)?,
        imds_endpoint: t.imds_endpoint,
        retry_budget: duration("retry-budget", t.retry_budget, d.retry_budget)?,
        command_timeout: duration("command-timeout", t.command_timeout, d.command_timeout)?,
        apply_timeout: duration("apply-timeout", t.apply_timeout, d.apply_timeout)?,
        script_timeout: duration("script-timeout", t.script_timeout, d.script_timeout)?,
        lock_wait: duration("lock-wait", t.lock_wait, d.lock_wait)?,
        reboot_timeout: duration("reboot-timeout", t.reboot_timeout, d.reboot_timeout)?,
        report_compliance: t.report_compliance.unwrap_or(d.report_compliance),
    };
    if let Some(e) = &agent.imds_endpoint {
        check_endpoint(e).map_err(|why| err("imds-endpoint", why))?;
    }
    Ok(agent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{RebootPolicy, Target};

    fn parse(text: &str) -> Result<Config, SettingsError> {
        Config::parse(text, Path::new("/etc/c.toml"))
    }

    #[test]
    fn full_file() {
        let c = parse(
            r#"
            ssm-parameter = "/fleet/web"
            reboot = "never"
            [agent]
            fh = "/nix/store/x-fh/bin/fh"
            determinate-nixd = "/nix/store/y/bin/determinate-nixd"
            state-dir = "/tmp/s"
            current-system = "/tmp/cur"
            booted-system = "/tmp/boot"
            system-profile = "/tmp/prof"
            imds-endpoint = "http://127.0.0.1:8080/"
            retry-budget = "3s"
            command-timeout = "1m"
            apply-timeout = "2h"
            script-timeout = "10m"
            lock-wait = "500ms"
            "#,
        )
        .unwrap();
        assert!(matches!(c.defaults.target, Some(Target::Ssm(_))));
        assert_eq!(c.defaults.reboot, Some(RebootPolicy::Never));
        assert_eq!(c.defaults.source, Source::ConfigFile("/etc/c.toml".into()));
        assert_eq!(c.agent.fh, PathBuf::from("/nix/store/x-fh/bin/fh"));
        assert_eq!(c.agent.retry_budget, Duration::from_secs(3));
        assert_eq!(c.agent.apply_timeout, Duration::from_secs(7200));
        assert_eq!(c.agent.lock_wait, Duration::from_millis(500));
        assert_eq!(
            c.agent.imds_endpoint(None).unwrap(),
            "http://127.0.0.1:8080"
        );
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.agent, Agent::default());
        assert_eq!(c.defaults.target, None);
    }

    #[test]
    fn endpoint_precedence() {
        let mut a = Agent::default();
        assert_eq!(a.imds_endpoint(None).unwrap(), "http://169.254.169.254");
        a.imds_endpoint = Some("http://127.0.0.1:1".into());
        assert_eq!(a.imds_endpoint(None).unwrap(), "http://127.0.0.1:1");
        assert_eq!(
            a.imds_endpoint(Some("http://127.0.0.1:2")).unwrap(),
            "http://127.0.0.1:2"
        );
        assert_eq!(a.imds_endpoint(Some("")).unwrap(), "http://127.0.0.1:1");
        assert!(
            a.imds_endpoint(Some("https://x"))
                .unwrap_err()
                .contains(IMDS_ENDPOINT_ENV)
        );
    }

    #[test]
    fn errors_name_key() {
        for (text, key, why) in [
            ("[agent]\nfh = \"fh\"", "agent.fh", "absolute"),
            (
                "[agent]\nretry-budget = \"soon\"",
                "agent.retry-budget",
                "duration",
            ),
            (
                "[agent]\nretry-budget = \"0s\"",
                "agent.retry-budget",
                "zero",
            ),
            (
                "[agent]\nimds-endpoint = \"https://x\"",
                "agent.imds-endpoint",
                "http://",
            ),
            (
                "[agent]\nimds-endpoint = \"http://127.0.0.1:1/?x=1\"",
                "agent.imds-endpoint",
                "no query",
            ),
            (
                "[agent]\nimds-endpoint = \"http://127.0.0.1:1/#x\"",
                "agent.imds-endpoint",
                "no fragment",
            ),
            (
                "[agent]\nimds-endpoint = \"http://user@127.0.0.1:1\"",
                "agent.imds-endpoint",
                "no user",
            ),
            (
                "[agent]\nimds-endpoint = \"http://127.0.0.1:99999\"",
                "agent.imds-endpoint",
                "base URL",
            ),
            (
                "[agent]\nimds-endpoint = \"http:///latest\"",
                "agent.imds-endpoint",
                "base URL",
            ),
            (
                "[agent]\nretry-budget = \"300000000000y\"",
                "agent.retry-budget",
                "7 days",
            ),
            (
                "[agent]\napply-timeout = \"8d\"",
                "agent.apply-timeout",
                "7 days",
            ),
            (
                "[agent]\nfh-path = \"/x\"",
                "agent.fh-path",
                "unknown field",
            ),
            ("flake = \"nope\"", "flake", "output reference"),
        ] {
            let e = parse(text).expect_err(text);
            assert_eq!(e.key.as_deref(), Some(key), "{text}: {e}");
            assert!(e.reason.contains(why), "{text}: {e}");
            assert!(
                e.to_string().starts_with("config file /etc/c.toml: "),
                "{e}"
            );
        }
    }

    #[test]
    fn missing_file() {
        let p = Path::new("/nonexistent/nixos-ami-agent.toml");
        assert_eq!(Config::load(p, false).unwrap().agent, Agent::default());
        assert!(
            Config::load(p, true)
                .unwrap_err()
                .reason
                .contains("cannot be read")
        );
    }
}
