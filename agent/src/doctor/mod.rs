//! `doctor`: every precondition of a successful run, checked one by one,
//! each with its cause in plain words and the fix for that cause. Uses
//! the run's own code paths (config loading, IMDS, user-data sniffing,
//! SSM), STS's GetCallerIdentity to show which principal FlakeHub must
//! know, and then the two steps most likely to fail: the FlakeHub login
//! and `fh resolve` of the target (never the apply).
//!
//! A run at boot waits minutes for IMDS, the role's credentials and the
//! network to come up; doctor is run by someone waiting for an answer, so
//! every check has a budget of seconds ([`NETWORK_BUDGET`],
//! [`COMMAND_BUDGET`]) and one attempt of each program.

mod causes;
mod steps;

use crate::config::Config;
use crate::exit::Failure;
use crate::imds::{Imds, ImdsError};
use crate::process::{check_program, find_in, search_path};
use crate::retry::Backoff;
use crate::run::{self, Environment};
use crate::settings::{SettingsError, Target};
use crate::ssm::SsmError;
use serde::Serialize;
use std::path::Path;
use std::time::Duration;

/// Per IMDS, STS or SSM request, retries included.
pub const NETWORK_BUDGET: Duration = Duration::from_secs(5);
/// One attempt of `determinate-nixd login aws`, one of `fh resolve`.
pub const COMMAND_BUDGET: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Pass,
    /// Works, but should be changed.
    Warn,
    Fail,
    /// Not checked: something it depends on failed, or it does not apply.
    Skip,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn check(
    name: &'static str,
    status: Status,
    detail: impl Into<String>,
    fix: Option<&str>,
) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
        fix: fix.map(str::to_owned),
    }
}

pub const ROLE_NEEDS: &str = "attach an IAM instance profile to the instance (aws ec2 associate-iam-instance-profile); \
     its role needs no permissions for the FlakeHub login, and ssm:GetParameter (plus kms:Decrypt for a \
     SecureString) on the fleet's parameter";

pub async fn run(
    config: Result<Config, SettingsError>,
    config_path: &Path,
    env: &Environment,
) -> Vec<Check> {
    let mut checks = vec![];
    let mut config = match config {
        // Config::load takes a missing default file for the built-in
        // defaults; doctor says so instead of calling it valid.
        Ok(c) if !config_path.exists() => {
            checks.push(check(
                "config file",
                Status::Warn,
                format!(
                    "{} does not exist; the built-in defaults apply",
                    config_path.display()
                ),
                Some("the NixOS module writes this file: is services.nixos-ami-agent enabled in the image? Elsewhere, name a file with --config"),
            ));
            c
        }
        Ok(c) => {
            checks.push(check(
                "config file",
                Status::Pass,
                format!("{} is valid", c.path.display()),
                None,
            ));
            c
        }
        Err(e) => {
            checks.push(check(
                "config file",
                Status::Fail,
                e.to_string(),
                Some("fix the image's config file (the NixOS module writes it from services.nixos-ami-agent.settings)"),
            ));
            Config::builtin(config_path)
        }
    };
    config.agent.retry_budget = config.agent.retry_budget.min(NETWORK_BUDGET);
    config.agent.command_timeout = config.agent.command_timeout.min(COMMAND_BUDGET);
    let config = config;
    let agent = &config.agent;
    // Whether fh and determinate-nixd can be started, as their checks found.
    let [fh_ok, nixd_ok] = [
        ("fh", &agent.fh),
        ("determinate-nixd", &agent.determinate_nixd),
    ]
    .map(|(name, path)| {
        let c = match check_program(path) {
            Ok(()) => check(
                name,
                Status::Pass,
                format!("{} is executable", path.display()),
                None,
            ),
            Err(e) => check(
                name,
                Status::Fail,
                e.to_string(),
                Some("set [agent] in the config file to the program's absolute path"),
            ),
        };
        let ok = c.status == Status::Pass;
        checks.push(c);
        ok
    });
    checks.push(nix_for_fh(agent));
    checks.push(state_dir(&agent.state_dir));

    let (imds, endpoint) = match run::imds(&config, env) {
        Ok(x) => x,
        Err(e) => {
            checks.push(check(
                "IMDS",
                Status::Fail,
                e.to_string(),
                Some("fix the IMDS endpoint setting"),
            ));
            return checks;
        }
    };
    let instance_id = match imds.instance_id().await {
        Ok(id) => id,
        Err(e) => {
            let fix = match e {
                ImdsError::Disabled => {
                    "enable the metadata service: aws ec2 modify-instance-metadata-options \
                                        --instance-id ID --http-endpoint enabled --http-tokens required"
                }
                _ => {
                    "is this an EC2 instance? The agent reads user data from IMDS at the configured endpoint"
                }
            };
            checks.push(check(
                "IMDS",
                Status::Fail,
                format!("{e} (endpoint {endpoint})"),
                Some(fix),
            ));
            for name in [
                "instance role",
                "user data",
                "SSM parameter",
                "FlakeHub login",
                "target resolves",
            ] {
                checks.push(check(name, Status::Skip, "needs IMDS", None));
            }
            return checks;
        }
    };
    checks.push(check(
        "IMDS",
        Status::Pass,
        format!("IMDSv2 token obtained; instance {instance_id}"),
        None,
    ));
    checks.push(match imds.imdsv1_allowed().await {
        Some(true) => check(
            "IMDSv2 required",
            Status::Warn,
            "the instance still answers IMDSv1 (unauthenticated) requests",
            Some("require IMDSv2: metadata_options { http_tokens = \"required\" } (Terraform), or aws ec2 \
                  modify-instance-metadata-options --http-tokens required"),
        ),
        Some(false) => check("IMDSv2 required", Status::Pass, "IMDSv1 requests are refused", None),
        None => check("IMDSv2 required", Status::Skip, "the probe was inconclusive", None),
    });
    let region = match (&env.region, imds.region().await) {
        (Some(r), _) => r.clone(),
        (None, Ok(r)) => r,
        (None, Err(e)) => {
            checks.push(check(
                "region",
                Status::Fail,
                e.to_string(),
                Some("set AWS_REGION"),
            ));
            return checks;
        }
    };

    let (role_check, principal) = role(
        &imds,
        &region,
        &endpoint,
        Backoff::with_budget(agent.retry_budget),
    )
    .await;
    checks.push(role_check);

    let settings = match imds
        .user_data()
        .await
        .map_err(Failure::from)
        .and_then(|raw| run::sniff(raw.as_deref()))
    {
        Ok(ud) => {
            checks.push(check("user data", Status::Pass, ud.kind.describe(), None));
            run::settings(&config, &ud)
        }
        Err(e) => {
            checks.push(check(
                "user data",
                Status::Fail,
                e.to_string(),
                Some("fix the user data (check it with `nixos-ami-agent validate FILE` before launching)"),
            ));
            run::settings(&config, &crate::userdata::UserData::absent())
        }
    };
    let ssm = match settings.target.as_ref().map(|t| &t.value) {
        Some(Target::Ssm(name)) => Some(name.as_str().to_owned()),
        Some(Target::Flake(f)) => {
            checks.push(check(
                "SSM parameter",
                Status::Skip,
                format!(
                    "the target is a flake reference ({}), not a parameter",
                    f.as_str()
                ),
                None,
            ));
            None
        }
        None => {
            checks.push(check(
                "SSM parameter",
                Status::Skip,
                "no target configured",
                None,
            ));
            checks.push(check(
                "target",
                Status::Warn,
                "neither the user data nor the image's config file names a flake or an SSM parameter: a run applies nothing",
                Some("name one in user data: `flake = \"ORG/FLAKE/VERSION#nixosConfigurations.NAME\"` or `ssm-parameter = \"/fleets/NAME\"`"),
            ));
            for name in ["FlakeHub login", "target resolves"] {
                checks.push(check(name, Status::Skip, "no target", None));
            }
            return checks;
        }
    };
    let login_wanted = settings.login.value;
    let resolved = match run::resolve_target(&config, env, &imds, &endpoint, settings).await {
        Ok(r) => {
            if let Some(name) = &ssm {
                checks.push(check(
                    "SSM parameter",
                    Status::Pass,
                    format!(
                        "{name} is readable and names {}",
                        r.shown.as_deref().unwrap_or_default()
                    ),
                    None,
                ));
            }
            r
        }
        Err(e) => {
            checks.push(ssm_failure(e));
            for name in ["FlakeHub login", "target resolves"] {
                checks.push(check(
                    name,
                    Status::Skip,
                    "needs the target from the SSM parameter",
                    None,
                ));
            }
            return checks;
        }
    };
    let (Some(flake), Some(shown)) = (&resolved.flake, &resolved.shown) else {
        return checks;
    };

    // The two steps a run takes before it changes anything, taken once
    // each with a short budget: what fails here fails every run.
    // `logged_in`: by this doctor, just now.
    let logged_in = if !login_wanted {
        checks.push(check(
            "FlakeHub login",
            Status::Skip,
            "login = false: fh uses the credentials this machine already has",
            None,
        ));
        false
    } else if !nixd_ok {
        checks.push(check(
            "FlakeHub login",
            Status::Skip,
            "needs determinate-nixd",
            None,
        ));
        false
    } else {
        let c = steps::login(agent, &resolved.redactor, principal.as_deref()).await;
        let ok = c.status == Status::Pass;
        checks.push(c);
        ok
    };
    if !fh_ok {
        checks.push(check("target resolves", Status::Skip, "needs fh", None));
        return checks;
    }
    checks.push(
        steps::resolve(
            agent,
            &resolved.redactor,
            flake,
            shown,
            resolved.settings.action.value,
            logged_in,
        )
        .await,
    );
    checks
}

fn ssm_failure(e: Failure) -> Check {
    match e {
        Failure::Ssm(e @ (SsmError::Denied { .. } | SsmError::NotFound { .. })) => check(
            "SSM parameter",
            Status::Fail,
            e.to_string(),
            Some(
                "create the parameter in the instance's region, and allow the instance role ssm:GetParameter on it (and kms:Decrypt on its key for a SecureString)",
            ),
        ),
        Failure::Input(e) => check(
            "SSM parameter",
            Status::Fail,
            e.to_string(),
            Some(
                "fix the parameter's value (check it with `nixos-ami-agent validate --ssm-value VALUE`): an output reference, or TOML with flake/action/reboot",
            ),
        ),
        e => {
            let fix = causes::network_fix(&e.to_string());
            check("SSM parameter", Status::Fail, e.to_string(), fix.as_deref())
        }
    }
}

/// `fh apply` refuses to run without `nix` on its PATH; look where the
/// agent's children look.
fn nix_for_fh(agent: &crate::config::Agent) -> Check {
    let path = search_path(&agent.current_system, std::env::var_os("PATH").as_deref());
    match find_in(&path, "nix") {
        Some(nix) => check(
            "nix for fh",
            Status::Pass,
            format!("fh will run {}", nix.display()),
            None,
        ),
        None => check(
            "nix for fh",
            Status::Fail,
            format!(
                "no nix on the PATH the agent gives fh ({}): `fh apply` would fail with \
                 \"nix is not installed or not on the PATH\"",
                path.to_string_lossy()
            ),
            Some(
                "the running system must carry nix in its sw/bin (Determinate's NixOS module and \
                 nixpkgs' nix module install it), or the unit's PATH must have it \
                 (systemd.services.nixos-ami-agent.path)",
            ),
        ),
    }
}

fn state_dir(dir: &Path) -> Check {
    use nix::unistd::{AccessFlags, access};
    // What `run` refuses, doctor fails: it follows no link.
    if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        return check(
            "state directory",
            Status::Fail,
            format!(
                "{} is a symbolic link; the agent refuses to follow it",
                dir.display()
            ),
            Some("remove the link: the agent creates the directory itself (0700)"),
        );
    }
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let detail = if existing == dir {
        format!("{} is writable", dir.display())
    } else {
        format!(
            "{} does not exist yet; {} is writable, so it can be created",
            dir.display(),
            existing.display()
        )
    };
    match access(existing, AccessFlags::W_OK | AccessFlags::X_OK) {
        Ok(()) => check("state directory", Status::Pass, detail, None),
        Err(e) => check(
            "state directory",
            Status::Fail,
            format!("{} is not writable: {e}", existing.display()),
            Some("run the agent as root (the unit does), or set [agent] state-dir"),
        ),
    }
}

/// The instance role, as FlakeHub sees it: STS GetCallerIdentity with the
/// role's credentials, and the principal Determinate's documentation says
/// to register for `determinate-nixd login aws`.
async fn role(
    imds: &Imds,
    region: &str,
    endpoint: &str,
    backoff: Backoff,
) -> (Check, Option<String>) {
    const NAME: &str = "instance role";
    let fail = |detail: String, fix: Option<&str>| (check(NAME, Status::Fail, detail, fix), None);
    match imds.role_name().await {
        Ok(Some(_)) => {}
        Ok(None) => return fail("no instance profile is attached".into(), Some(ROLE_NEEDS)),
        Err(e) => return fail(e.to_string(), None),
    }
    let sdk = match crate::aws::sdk_config(&crate::aws::Options::agent(region, endpoint, backoff))
        .await
    {
        Ok(sdk) => sdk,
        Err(e @ crate::aws::SetupError::NoCaCertificates(_)) => {
            return fail(
                e.to_string(),
                Some("install CA certificates (NixOS: security.pki)"),
            );
        }
        Err(e) => return fail(e.to_string(), None),
    };
    let sts = aws_sdk_sts::config::Builder::from(&sdk)
        .interceptor(crate::aws::REPLY_LIMIT)
        .build();
    match aws_sdk_sts::Client::from_conf(sts)
        .get_caller_identity()
        .send()
        .await
    {
        Ok(who) => {
            // From the wire: shown escaped and bounded.
            let arn = crate::text::shown(who.arn().unwrap_or_default(), 300);
            let arn = arn.as_str();
            match flakehub_principal(arn) {
                Some(principal) => (
                    check(
                        NAME,
                        Status::Pass,
                        format!(
                            "the instance is {arn}; register {principal} under ARNs in the FlakeHub organisation's settings"
                        ),
                        None,
                    ),
                    Some(principal),
                ),
                None => (
                    check(
                        NAME,
                        Status::Warn,
                        format!(
                            "the credentials are {arn}, not an instance role (assumed-role/ROLE/i-...)"
                        ),
                        Some("on EC2, let the instance profile's role provide the credentials"),
                    ),
                    None,
                ),
            }
        }
        Err(e) => {
            let described = crate::aws::describe(&e);
            // The fix that matches the cause: a network that does not
            // reach STS is not solved by attaching a role.
            let fix = causes::network_fix(&described).unwrap_or_else(|| ROLE_NEEDS.to_owned());
            let sts = sts_endpoint(region);
            fail(
                format!("STS GetCallerIdentity ({sts}) failed: {described}"),
                Some(&fix),
            )
        }
    }
}

fn sts_endpoint(region: &str) -> String {
    format!("sts.{region}.amazonaws.com")
}

/// `arn:aws:sts::123456789012:assumed-role/web/i-0abc` →
/// `arn:aws:iam::123456789012:assumed-role/web/i-*`, the form
/// Determinate's "Log in with AWS STS" guide registers for EC2 instances.
pub fn flakehub_principal(arn: &str) -> Option<String> {
    let rest = arn.strip_prefix("arn:")?;
    let mut parts = rest.splitn(5, ':');
    let (partition, service, _region, account, resource) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    let role = resource.strip_prefix("assumed-role/")?.split('/').next()?;
    (service == "sts" && !role.is_empty() && !account.is_empty())
        .then(|| format!("arn:{partition}:iam::{account}:assumed-role/{role}/i-*"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principal_from_caller_arn() {
        assert_eq!(
            flakehub_principal("arn:aws:sts::123456789012:assumed-role/web-fleet/i-0abc")
                .as_deref(),
            Some("arn:aws:iam::123456789012:assumed-role/web-fleet/i-*")
        );
        assert_eq!(
            flakehub_principal("arn:aws-cn:sts::123456789012:assumed-role/r/i-1").as_deref(),
            Some("arn:aws-cn:iam::123456789012:assumed-role/r/i-*")
        );
        assert_eq!(
            flakehub_principal("arn:aws:iam::123456789012:user/alice"),
            None
        );
        assert_eq!(flakehub_principal("garbage"), None);
    }

    #[test]
    fn state_dir_checks_the_nearest_existing_ancestor() {
        let d = tempfile::tempdir().unwrap();
        let c = state_dir(&d.path().join("a/b"));
        assert_eq!(c.status, Status::Pass, "{c:?}");
        assert!(c.detail.contains("does not exist yet"), "{c:?}");
    }
}
