//! `doctor` against healthy doubles, and against each broken one: it must
//! pass the first and name the failing precondition, with its cause and
//! the fix for that cause, in each of the others; print each result once,
//! on stdout; and take seconds, not a run's minutes of patience.

use nixos_ami_agent_tests::harness::{Output, REF, Scenario, toml_user_data};
use nixos_ami_agent_tests::ssm::{Fault, Param};
use nixos_ami_agent_tests::standin::{FlakeHub, Mode};

/// An instance as it should be: IMDSv2 only, a role, a readable parameter.
fn healthy() -> Scenario {
    let mut s = Scenario::new();
    s.imds.with(|i| i.role = Some("web-fleet-role".into()));
    s.use_instance_role();
    s.user_data(toml_user_data("ssm-parameter = \"/fleets/web\""));
    s.ssm
        .with(|x| x.params.insert("/fleets/web".into(), Param::string(REF, 3)));
    // Private, as most fleets' flakes are: resolve needs the login first.
    s.behaviour.private = true;
    s
}

/// Runs `doctor` and `doctor --json`, as an operator would: without
/// NIXOS_AMI_AGENT_LOG, so stderr must be empty (the checks say it all).
fn doctor(s: &Scenario) -> (Output, serde_json::Value) {
    let out = s.run_without_log_filter(&["doctor"]);
    let json = s.run_without_log_filter(&["doctor", "--json"]);
    assert_eq!(out.code, json.code);
    for o in [&out, &json] {
        assert_eq!(o.stderr, "", "doctor printed besides its checks: {o:?}");
    }
    let v = serde_json::from_str(&json.stdout).unwrap_or_else(|e| panic!("{e}: {json:?}"));
    (out, v)
}

fn status<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {v}"))
}

#[test]
fn healthy_instance_passes_and_names_the_principal() {
    let s = healthy();
    let (out, v) = doctor(&s);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(v["ok"], true, "{v}");
    for c in v["checks"].as_array().unwrap() {
        assert_eq!(c["status"], "pass", "{c}");
    }
    let role = status(&v, "instance role")["detail"].as_str().unwrap();
    assert!(
        role.contains("arn:aws:sts::123456789012:assumed-role/web-fleet-role/i-0123456789abcdef0"),
        "{role}"
    );
    assert!(
        role.contains("register arn:aws:iam::123456789012:assumed-role/web-fleet-role/i-*"),
        "{role}"
    );
    assert!(
        status(&v, "SSM parameter")["detail"]
            .as_str()
            .unwrap()
            .contains(REF)
    );
    assert!(out.stdout.contains("all checks passed"), "{out:?}");
    let resolved = status(&v, "target resolves")["detail"].as_str().unwrap();
    assert_eq!(
        resolved,
        format!(
            "{REF} resolves to {}; a run would apply it (switch)",
            s.store_path("new-system").display()
        )
    );
    // Login, then resolve (the flake is private), once each per doctor;
    // never an apply.
    let login = "determinate-nixd login aws".to_owned();
    let resolve = format!("fh resolve --json {REF}");
    assert_eq!(s.call_lines(), [&*login, &*resolve, &*login, &*resolve]);
    assert!(!s.path("state").exists(), "doctor writes no state");
    assert_eq!(s.current_system(), s.store_path("old-system"));
    assert!(s.sts.with(|x| {
        x.requests
            .iter()
            .any(|r| r.contains("Action=GetCallerIdentity"))
    }));
}

#[test]
fn no_instance_profile() {
    let s = healthy();
    s.imds.with(|i| i.role = None);
    let (out, v) = doctor(&s);
    assert_eq!(out.code, 1, "{out:?}");
    let c = status(&v, "instance role");
    assert_eq!(c["status"], "fail");
    assert_eq!(c["detail"], "no instance profile is attached");
    assert!(
        c["fix"]
            .as_str()
            .unwrap()
            .contains("associate-iam-instance-profile"),
        "{c}"
    );
    assert!(out.stdout.contains("FAIL  instance role"), "{out:?}");
    // The other checks still ran.
    assert_eq!(status(&v, "user data")["status"], "pass");
}

#[test]
fn ssm_access_denied() {
    let s = healthy();
    // Once for each of the two runs (text and JSON).
    s.ssm
        .with(|x| x.faults.extend([Fault::AccessDenied, Fault::AccessDenied]));
    let (out, v) = doctor(&s);
    assert_eq!(out.code, 1, "{out:?}");
    let c = status(&v, "SSM parameter");
    assert_eq!(c["status"], "fail");
    assert!(c["detail"].as_str().unwrap().contains("denied"), "{c}");
    assert!(
        c["fix"].as_str().unwrap().contains("ssm:GetParameter"),
        "{c}"
    );
    assert!(c["fix"].as_str().unwrap().contains("kms:Decrypt"), "{c}");
}

#[test]
fn imds_disabled() {
    let s = healthy();
    s.imds.with(|i| i.token_forbidden = true);
    let (out, v) = doctor(&s);
    assert_eq!(out.code, 1, "{out:?}");
    let c = status(&v, "IMDS");
    assert_eq!(c["status"], "fail");
    assert!(
        c["fix"]
            .as_str()
            .unwrap()
            .contains("--http-endpoint enabled"),
        "{c}"
    );
    for name in ["instance role", "user data", "SSM parameter"] {
        assert_eq!(status(&v, name)["status"], "skip", "{name}");
    }
}

#[test]
fn program_missing() {
    let mut s = healthy();
    s.set_agent(
        "fh",
        &format!("{:?}", s.path("bin/not-there").display().to_string()),
    );
    let (out, v) = doctor(&s);
    assert_eq!(out.code, 1, "{out:?}");
    let c = status(&v, "fh");
    assert_eq!(c["status"], "fail");
    assert!(
        c["detail"].as_str().unwrap().ends_with("does not exist"),
        "{c}"
    );
    assert_eq!(status(&v, "determinate-nixd")["status"], "pass");
}

#[test]
fn imdsv1_still_allowed_is_a_warning() {
    let s = healthy();
    s.imds.with(|i| i.allow_v1 = true);
    let (out, v) = doctor(&s);
    assert_eq!(out.code, 0, "a warning is not a failure: {out:?}");
    let c = status(&v, "IMDSv2 required");
    assert_eq!(c["status"], "warn");
    assert!(
        c["fix"]
            .as_str()
            .unwrap()
            .contains("http_tokens = \"required\""),
        "{c}"
    );
}

#[test]
fn invalid_user_data_and_config() {
    let s = healthy();
    s.user_data(toml_user_data("action = \"swtich\""));
    let (out, v) = doctor(&s);
    assert_eq!(out.code, 1, "{out:?}");
    let c = status(&v, "user data");
    assert_eq!(c["status"], "fail");
    assert!(
        c["detail"].as_str().unwrap().contains("key `action`"),
        "{c}"
    );
    assert!(
        c["fix"]
            .as_str()
            .unwrap()
            .contains("nixos-ami-agent validate"),
        "{c}"
    );

    let mut s = healthy();
    s.defaults = "frobnicate = 1".into();
    let (out, v) = doctor(&s);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(status(&v, "config file")["status"], "fail");
}

#[test]
fn credentials_that_are_not_an_instance_role() {
    let mut s = healthy();
    // Static keys, as on a developer machine: STS names a user.
    s.env_remove.clear();
    s.env
        .retain(|(k, _)| k != "AWS_EC2_METADATA_SERVICE_ENDPOINT");
    let (out, v) = doctor(&s);
    let c = status(&v, "instance role");
    assert_eq!(c["status"], "warn", "{c}");
    assert!(
        c["detail"]
            .as_str()
            .unwrap()
            .contains("not an instance role"),
        "{c}"
    );
    assert_eq!(out.code, 0, "{out:?}");
}

#[test]
fn no_nix_for_fh_fails_and_says_where_it_looked() {
    let s = healthy();
    for system in ["old-system", "new-system", "kernel-system"] {
        std::fs::remove_file(s.store_path(&format!("{system}/sw/bin/nix"))).unwrap();
    }
    let (out, v) = doctor(&s);
    assert_eq!(out.code, 1, "{out:?}");
    let c = status(&v, "nix for fh");
    assert_eq!(c["status"], "fail", "{c}");
    let detail = c["detail"].as_str().unwrap();
    assert!(
        detail.contains("nix is not installed or not on the PATH"),
        "{c}"
    );
    assert!(detail.contains("/run/wrappers/bin:"), "{c}");
    assert!(c["fix"].as_str().unwrap().contains("sw/bin"), "{c}");
}

#[test]
fn imds_unreachable_is_said_within_seconds_and_once() {
    let mut s = healthy();
    // Nothing listens there: every request is refused.
    s.env.push((
        "AWS_EC2_METADATA_SERVICE_ENDPOINT".into(),
        "http://127.0.0.1:9".into(),
    ));
    // The run's patience, as on an image: doctor must not use it.
    s.set_agent("retry-budget", "\"10m\"");
    let (out, v) = doctor(&s);
    assert_eq!(out.code, 1, "{out:?}");
    let c = status(&v, "IMDS");
    assert_eq!(c["status"], "fail", "{c}");
    let detail = c["detail"].as_str().unwrap();
    // The agent's own account of its attempts: within doctor's 5 s budget.
    let secs: f64 = detail
        .split(" in ")
        .nth(1)
        .and_then(|t| t.split('s').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no time in {detail}"));
    assert!(secs <= 5.5, "doctor waited {secs}s for IMDS: {detail}");
    assert!(detail.contains("127.0.0.1:9"), "{c}");
    for name in ["instance role", "FlakeHub login", "target resolves"] {
        assert_eq!(status(&v, name)["status"], "skip", "{name}");
    }
    // One line per check, not one per retry.
    assert!(out.stdout.lines().count() < 30, "{}", out.stdout);
}

#[test]
fn a_missing_config_file_is_not_called_valid() {
    const DEFAULT: &str = "/etc/nixos-ami-agent/config.toml";
    if std::path::Path::new(DEFAULT).exists() {
        eprintln!("SKIPPED: this machine has {DEFAULT}");
        return;
    }
    let s = healthy();
    // No --config: the default path, missing, as on a machine without the
    // NixOS module.
    let out = s.run_without_config_flag(&["doctor", "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    let c = status(&v, "config file");
    assert_eq!(c["status"], "warn", "{c}");
    let detail = c["detail"].as_str().unwrap();
    assert_eq!(
        detail,
        format!("{DEFAULT} does not exist; the built-in defaults apply")
    );
    assert!(c["fix"].as_str().unwrap().contains("NixOS module"), "{c}");
}

#[test]
fn sts_unreachable_says_so_and_suggests_the_network_not_a_role() {
    let mut s = healthy();
    s.env.retain(|(k, _)| k != "AWS_ENDPOINT_URL_STS");
    s.env
        .push(("AWS_ENDPOINT_URL_STS".into(), "http://127.0.0.1:9".into()));
    let (out, v) = doctor(&s);
    assert_eq!(out.code, 1, "{out:?}");
    let c = status(&v, "instance role");
    assert_eq!(c["status"], "fail", "{c}");
    let detail = c["detail"].as_str().unwrap();
    assert!(detail.contains("connection failed"), "{c}");
    // No Rust debug dump.
    for dump in ["DispatchFailure", "ConnectorError", "{ ", "source:"] {
        assert!(!detail.contains(dump), "{dump}: {c}");
    }
    let fix = c["fix"].as_str().unwrap();
    assert!(fix.contains("NAT gateway"), "{c}");
    assert!(!fix.contains("associate-iam-instance-profile"), "{c}");
}

#[test]
fn a_role_flakehub_does_not_know_is_told_what_to_register() {
    let mut s = healthy();
    s.behaviour.login = Mode::Fail;
    let (out, v) = doctor(&s);
    assert_eq!(out.code, 1, "{out:?}");
    let c = status(&v, "FlakeHub login");
    assert_eq!(c["status"], "fail", "{c}");
    assert!(
        c["detail"]
            .as_str()
            .unwrap()
            .starts_with("FlakeHub refused the instance role"),
        "{c}"
    );
    assert!(
        c["fix"].as_str().unwrap().starts_with(
            "register arn:aws:iam::123456789012:assumed-role/web-fleet-role/i-* under ARNs"
        ),
        "{c}"
    );
    // Resolve was still tried, and FlakeHub refused it: not logged in.
    let r = status(&v, "target resolves");
    assert_eq!(r["status"], "fail", "{r}");
    assert!(
        r["detail"].as_str().unwrap().contains("not logged in"),
        "{r}"
    );
    assert!(out.stdout.contains("FAIL  FlakeHub login"), "{out:?}");
    assert_eq!(
        out.stdout
            .matches("FlakeHub refused the instance role")
            .count(),
        1
    );
}

#[test]
fn each_resolve_failure_has_its_own_cause() {
    let cases: [(Option<FlakeHub>, bool, &str, &str); 5] = [
        // Not in store_paths: FlakeHub's 404.
        (None, false, "FlakeHub has no", "flakehub-push"),
        (
            Some(FlakeHub::Unauthorized),
            true,
            "may not read it",
            "register the role",
        ),
        (
            Some(FlakeHub::Forbidden),
            true,
            "refused access",
            "register the role",
        ),
        (
            Some(FlakeHub::Unreachable),
            true,
            "FlakeHub cannot be reached",
            "api.flakehub.com",
        ),
        (
            Some(FlakeHub::NoStorePath),
            true,
            "gave no store path",
            "include-output-paths: true",
        ),
    ];
    for (answer, known, detail, fix) in cases {
        let mut s = healthy();
        s.behaviour.flakehub = answer;
        if !known {
            s.behaviour.store_paths.clear();
        }
        let (out, v) = doctor(&s);
        assert_eq!(out.code, 1, "{answer:?}: {out:?}");
        assert_eq!(status(&v, "FlakeHub login")["status"], "pass", "{answer:?}");
        let c = status(&v, "target resolves");
        assert_eq!(c["status"], "fail", "{answer:?}: {c}");
        assert!(
            c["detail"].as_str().unwrap().contains(detail),
            "{answer:?}: {c}"
        );
        assert!(c["fix"].as_str().unwrap().contains(fix), "{answer:?}: {c}");
        assert!(!c["detail"].as_str().unwrap().contains("Backtrace"), "{c}");
    }
}

#[test]
fn without_login_a_private_flake_is_refused_and_the_login_is_named() {
    let s = healthy();
    s.user_data(toml_user_data(
        "ssm-parameter = \"/fleets/web\"\nlogin = false",
    ));
    let (out, v) = doctor(&s);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(status(&v, "FlakeHub login")["status"], "skip");
    let c = status(&v, "target resolves");
    assert!(
        c["detail"].as_str().unwrap().contains("not logged in"),
        "{c}"
    );
    assert!(c["fix"].as_str().unwrap().contains("login = true"), "{c}");
    assert!(
        s.call_lines()
            .iter()
            .all(|l| !l.starts_with("determinate-nixd"))
    );
}

#[test]
fn a_hung_resolve_is_cut_short() {
    let mut s = healthy();
    s.behaviour.resolve = Mode::Hang;
    s.set_agent("command-timeout", "\"2s\"");
    let (out, v) = doctor(&s);
    assert_eq!(out.code, 1, "{out:?}");
    let c = status(&v, "target resolves");
    assert!(
        c["detail"]
            .as_str()
            .unwrap()
            .contains("did not finish within 2s"),
        "{c}"
    );
    assert!(c["fix"].as_str().unwrap().contains("security group"), "{c}");
}

#[test]
fn a_rolled_back_target_is_a_warning_that_names_forget_rejected() {
    let mut s = healthy();
    s.units_on("new-system", &[("web.service", "failed")]);
    let run = s.run(&["run"]);
    assert_eq!(run.code, 1, "rolled back: {run:?}");
    let (out, v) = doctor(&s);
    assert_eq!(out.code, 0, "a warning: {out:?}");
    let c = status(&v, "target resolves");
    assert_eq!(c["status"], "warn", "{c}");
    assert!(
        c["detail"].as_str().unwrap().contains("a run refuses it"),
        "{c}"
    );
    assert!(c["detail"].as_str().unwrap().contains("web.service"), "{c}");
    assert!(
        c["fix"].as_str().unwrap().contains("forget-rejected"),
        "{c}"
    );
}

#[test]
fn the_target_from_user_data_is_resolved_too() {
    let s = healthy();
    s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
    let (out, v) = doctor(&s);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(status(&v, "SSM parameter")["status"], "skip");
    assert_eq!(status(&v, "target resolves")["status"], "pass");
    assert!(s.ssm.with(|x| x.requests.is_empty()));
}
