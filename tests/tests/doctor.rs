//! `doctor` against healthy doubles, and against each broken one: it must
//! pass the first and name the failing precondition, with what to do, in
//! each of the others.

use nixos_ami_agent_tests::harness::{Output, REF, Scenario, toml_user_data};
use nixos_ami_agent_tests::ssm::{Fault, Param};

/// An instance as it should be: IMDSv2 only, a role, a readable parameter.
fn healthy() -> Scenario {
    let mut s = Scenario::new();
    s.imds.with(|i| i.role = Some("web-fleet-role".into()));
    s.use_instance_role();
    s.user_data(toml_user_data("ssm-parameter = \"/fleets/web\""));
    s.ssm
        .with(|x| x.params.insert("/fleets/web".into(), Param::string(REF, 3)));
    s
}

fn doctor(s: &Scenario) -> (Output, serde_json::Value) {
    let out = s.run(&["doctor"]);
    let json = s.run(&["doctor", "--json"]);
    assert_eq!(out.code, json.code);
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
    assert!(s.calls().is_empty(), "doctor runs no program");
    assert!(!s.path("state").exists(), "doctor writes nothing");
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
