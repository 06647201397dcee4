//! The command line: one struct per subcommand, each with `run`.

mod assets;
mod doctor;
mod fleet;
mod forget;
mod plan;
mod status;
mod validate;

use crate::config::{self, Config};
use crate::exit::{self, Failure};
use crate::run::Environment;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

const ABOUT: &str =
    "Turns a freshly launched EC2 instance into the NixOS configuration its operator named";

const LONG_ABOUT: &str = "\
Turns a freshly launched EC2 instance into the NixOS configuration its operator
named: reads user data over IMDSv2 (and the image's defaults from the config
file), reads the fleet's SSM parameter if the settings name one, logs in to
FlakeHub with the instance role (determinate-nixd login aws), runs
`fh apply nixos REF ACTION` when the target differs from the running system,
and verifies that the system really switched.";

const AFTER_HELP: &str = "\
User data the agent acts on (gzip is undone first):
  TOML settings        #nixos-ami-agent
                       flake = \"my-org/my-flake/0.1#nixosConfigurations.web\"
  JSON settings        {\"nixos-ami-agent\": {\"ssm-parameter\": \"/fleets/web\"}}
  a #! script          run once per instance, as amazon-init did
  MIME multipart       text/x-nixos-ami-agent (settings) and
                       text/x-shellscript (script) parts
Anything else is left alone.

Settings: flake | ssm-parameter, action (switch|boot|test), reboot
(never|if-needed|always), login (true|false), and the health gate after a
switch: [health] timeout, required-units, http, rollback, and commands (the
image's config file only). The image's config file sets defaults; user data
overrides them; an SSM parameter's value overrides flake, action and reboot.
An unhealthy switch is rolled back and its store path rejected
(forget-rejected allows it again).

Examples:
  nixos-ami-agent validate user-data.toml
  nixos-ami-agent validate --ssm-value target.toml
  nixos-ami-agent plan --user-data user-data.toml
  nixos-ami-agent status --wait --timeout 15m
  nixos-ami-agent doctor

Logging: NIXOS_AMI_AGENT_LOG=debug (tracing filter syntax).

";

#[derive(Debug, Parser)]
#[command(name = "nixos-ami-agent", version, about = ABOUT, long_about = LONG_ABOUT)]
#[command(after_help = format!("{AFTER_HELP}{}", exit::HELP))]
pub struct Cli {
    /// The image's config file (defaults and [agent] settings).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Where to log: the journal when run by systemd (auto), stderr, or
    /// the journal with structured fields.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub log: crate::log::Target,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The log level when `NIXOS_AMI_AGENT_LOG` does not set one: doctor's
    /// checks say what its log lines would (and each retry would be one).
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Doctor(_) => "off",
            _ => "info",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Converge this instance: what the systemd unit runs at boot and on
    /// each timer tick.
    Run,
    /// Download the target's closure without switching: what
    /// nixos-ami-agent-fetch.service runs at boot, as soon as the network
    /// is online, while the rest of the boot goes on.
    ///
    /// Reads user data and the SSM parameter, logs in to FlakeHub and
    /// resolves the target as `run` does, then, if the target is not what
    /// the system already runs (nor rolled back), runs `fh fetch REF LINK`:
    /// the closure comes from FlakeHub Cache and is kept from the garbage
    /// collector by a link in the state directory until a run switches to
    /// it. Changes nothing else: no switch, no state, no scripts. The run
    /// that follows finds the closure there and only switches; if this
    /// fetch failed, the run fetches what is missing itself.
    ///
    /// Exit status: 0 when the closure is here or there is nothing to
    /// fetch; otherwise as `run` (65 bad user data or parameter value, 69
    /// unavailable, 75 temporary, 1 `fh fetch` failed). The unit records
    /// it and goes on (`ExecStart=-`). `nixos-ami-agent status` shows the
    /// last fetch and its phases.
    Fetch,
    /// Show what `run` would do: target, its source, action, reboot
    /// policy, scripts. Reads IMDS and SSM, but does not log in, resolve,
    /// or change anything.
    Plan(plan::PlanArgs),
    /// Show the recorded state: last run, last apply, health, rejected
    /// store paths, scripts.
    Status(status::StatusArgs),
    /// Allow a rolled-back (rejected) store path to be applied again.
    ///
    /// A target that was unhealthy after its switch is rolled back and its
    /// store path rejected: no run applies it again, whoever names it.
    /// Forget one rejection (STORE_PATH, as `status` shows it) or all.
    ForgetRejected(forget::ForgetArgs),
    /// Check a user-data file before launching an instance with it.
    Validate(validate::ValidateArgs),
    /// Check everything a run needs, in seconds, and say what to do about
    /// each failure.
    ///
    /// Programs, state directory, IMDS, the instance role and the principal
    /// to register in FlakeHub, user data, the SSM parameter, then the
    /// FlakeHub login (`determinate-nixd login aws`) and `fh resolve` of the
    /// target, once each. Nothing is applied and no state is written; the
    /// login refreshes the machine's FlakeHub token, as every run does.
    /// Each check has a budget of seconds (a run waits minutes at boot).
    /// Set NIXOS_AMI_AGENT_LOG=debug to see every request and retry.
    Doctor(doctor::DoctorArgs),
    /// A fleet as AWS sees it: `fleet status`, run with your own AWS
    /// credentials, not on an instance.
    Fleet(fleet::FleetArgs),
    /// Write man pages and shell completions (for packaging).
    #[command(hide = true)]
    GenerateAssets(assets::AssetsArgs),
}

impl Cli {
    pub async fn run(self) -> u8 {
        let env = Environment::from_process();
        let config = || load_config(self.config.clone());
        let result = match self.command {
            // `run` reports its own outcome (journal events, sd_notify),
            // including a config file it cannot use.
            Command::Run => {
                if let Err(e) = crate::stop::install() {
                    tracing::warn!("cannot handle SIGTERM/SIGINT/SIGHUP: {e}");
                }
                let r = match config() {
                    Ok(c) => {
                        tokio::select! {
                            // Boxed: the run's future nests deep enough to overflow
                            // the compiler's layout queries in a release build.
                            (r, pending) = Box::pin(crate::run::run(&c, &env)) => {
                                crate::run::outcome_line(&r);
                                if let Some(p) = pending {
                                    p.send(&c).await;
                                }
                                r.map(|_| ())
                            }
                            () = wind_down_limit() => {
                                // The run did not wind down after a stop;
                                // what it ran was killed.
                                tracing::error!("the run did not wind down within {}s of the stop; its programs were killed", WIND_DOWN.as_secs());
                                return exit::TEMPFAIL;
                            }
                        }
                    }
                    Err(e) => {
                        let r = Err(crate::run::report_failure(e));
                        crate::run::outcome_line(&r);
                        r.map(|_: crate::run::Report| ())
                    }
                };
                return r.err().map_or(exit::OK, |e| e.exit_code());
            }
            Command::Fetch => {
                if let Err(e) = crate::stop::install() {
                    tracing::warn!("cannot handle SIGTERM/SIGINT/SIGHUP: {e}");
                }
                let r = match config() {
                    Ok(c) => {
                        tokio::select! {
                            r = Box::pin(crate::fetch::fetch(&c, &env)) => r.map(|_| ()),
                            () = wind_down_limit() => {
                                tracing::error!("the fetch did not wind down within {}s of the stop; its programs were killed", WIND_DOWN.as_secs());
                                return exit::TEMPFAIL;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(exit_code = e.exit_code(), "fetch failed: {e}");
                        Err(e)
                    }
                };
                // The fetch logged its own outcome.
                return r.err().map_or(exit::OK, |e| e.exit_code());
            }
            // Prints every result itself, once.
            Command::Validate(args) => match args.run() {
                Ok(code) => return code,
                Err(e) => Err(e),
            },
            Command::GenerateAssets(args) => args.run(),
            Command::Doctor(args) => match args.run(self.config.clone(), &env).await {
                Ok(code) => return code,
                Err(e) => Err(e),
            },
            Command::Fleet(args) => match args.run(&env).await {
                Ok(code) => return code,
                Err(e) => Err(e),
            },
            Command::Plan(args) => match config() {
                Ok(c) => args.run(&c, &env).await,
                Err(e) => Err(e),
            },
            Command::Status(args) => match config() {
                Ok(c) => match args.run(&c).await {
                    Ok(code) => return code,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            },
            Command::ForgetRejected(args) => match config() {
                Ok(c) => args.run(&c).await,
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => exit::OK,
            Err(e) => {
                let code = e.exit_code();
                tracing::error!(exit_code = code, "failed: {e}");
                code
            }
        }
    }
}

/// How long a stopped run may take to pass the signal on, wait for its
/// program (5 s, then SIGKILL) and record the stop.
const WIND_DOWN: std::time::Duration = std::time::Duration::from_secs(20);

/// Resolves `WIND_DOWN` after a stop request; never without one. Kills
/// what the run still runs before it returns: once `select!` drops the
/// run, its record of running programs is gone.
async fn wind_down_limit() {
    crate::stop::wait().await;
    tokio::time::sleep(WIND_DOWN).await;
    crate::process::kill_all();
}

fn load_config(explicit: Option<PathBuf>) -> Result<Config, Failure> {
    let (path, explicit) = match explicit {
        Some(p) => (p, true),
        None => (PathBuf::from(config::DEFAULT_PATH), false),
    };
    Config::load(&path, explicit).map_err(Failure::Config)
}

/// Standard input for `validate -`, bounded like a file.
fn read_stdin() -> Result<Vec<u8>, Failure> {
    const MAX: u64 = 1 << 20;
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Failure::Usage(format!("standard input: {e}")))?;
    if bytes.len() as u64 > MAX {
        return Err(Failure::Usage(
            "standard input: larger than 1 MiB; EC2 user data is at most 16 KiB".into(),
        ));
    }
    Ok(bytes)
}

/// Reads a user-data file for `plan --user-data` and `validate`: at most
/// 1 MiB is read, whatever the file is (`/dev/zero` has no size to check
/// beforehand, and a pipe has none either).
fn read_user_data(path: &std::path::Path) -> Result<Vec<u8>, Failure> {
    // EC2 user data is at most 16 KiB; a file far larger is not user data.
    const MAX: u64 = 1 << 20;
    use std::io::Read as _;
    let shown = crate::text::escape_controls(&path.display().to_string()).into_owned();
    let fail = |e: std::io::Error| Failure::Usage(format!("{shown}: {e}"));
    let file = std::fs::File::open(path).map_err(fail)?;
    if file.metadata().map_err(fail)?.is_dir() {
        return Err(Failure::Usage(format!("{shown}: is a directory")));
    }
    let mut bytes = Vec::new();
    file.take(MAX + 1).read_to_end(&mut bytes).map_err(fail)?;
    if bytes.len() as u64 > MAX {
        return Err(Failure::Usage(format!(
            "{shown}: larger than 1 MiB; EC2 user data is at most 16 KiB"
        )));
    }
    Ok(bytes)
}
