//! The fleet's SSM parameter through aws-sdk-ssm against the double:
//! request shape, region choice, selectors, faults, bad values, secrets,
//! and instance-role credentials from IMDS.

use nixos_ami_agent_tests::harness::rt;
use nixos_ami_agent_tests::harness::{
    REF, REF_NEW_KERNEL, STATIC_ACCESS_KEY, Scenario, toml_user_data,
};
use nixos_ami_agent_tests::imds::ROLE_ACCESS_KEY;
use nixos_ami_agent_tests::ssm::{Fault, Param, Ssm, SsmDouble};
use nixos_ami_agent_tests::tls::TestCa;

const PARAM: &str = "/fleets/web/target";

fn scenario(param_name: &str, p: Param) -> Scenario {
    let s = Scenario::new();
    s.user_data(toml_user_data(&format!("ssm-parameter = \"{param_name}\"")));
    s.ssm.with(|x| x.params.insert(param_name.into(), p));
    s
}

#[test]
fn bare_reference_in_a_string_parameter() {
    let s = scenario(PARAM, Param::string(&format!("{REF}\n"), 3));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(s.current_system(), s.store_path("new-system"));
    let reqs = s.ssm.with(|x| x.requests.clone());
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.target.as_deref(), Some("AmazonSSM.GetParameter"));
    assert_eq!(
        r.content_type.as_deref(),
        Some("application/x-amz-json-1.1")
    );
    assert_eq!(
        r.body,
        serde_json::json!({"Name": PARAM, "WithDecryption": true})
    );
    // Region: the instance's, from IMDS (no AWS_REGION in the environment).
    assert_eq!(
        r.credential(),
        Some((STATIC_ACCESS_KEY.into(), "eu-west-1".into()))
    );
    assert_eq!(
        s.imds
            .with(|i| i.gets_of("/latest/meta-data/placement/region")),
        1
    );
    let t = &s.state()["last-run"]["target"];
    assert_eq!(t["flake"], REF);
    assert_eq!(t["ssm-parameter"], PARAM);
    assert_eq!(t["ssm-version"], 3);
    assert_eq!(t["source"], format!("SSM parameter {PARAM} (version 3)"));
}

#[test]
fn aws_region_overrides_the_instance_region() {
    let mut s = scenario(PARAM, Param::string(REF, 1));
    s.env.push(("AWS_REGION".into(), "ap-southeast-2".into()));
    assert_eq!(s.run(&["run"]).code, 0);
    let r = s.ssm.with(|x| x.requests[0].clone());
    assert_eq!(r.credential().unwrap().1, "ap-southeast-2");
    assert_eq!(
        s.imds
            .with(|i| i.gets_of("/latest/meta-data/placement/region")),
        0
    );
}

#[test]
fn arn_names_its_own_region_and_labels_pass_through() {
    let arn = "arn:aws:ssm:us-east-2:123456789012:parameter/fleets/web:canary";
    let s = scenario(arn, Param::string(REF, 9));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    let r = s.ssm.with(|x| x.requests[0].clone());
    assert_eq!(r.name(), Some(arn));
    assert_eq!(r.credential().unwrap().1, "us-east-2");

    let s = scenario("/fleets/web:canary", Param::string(REF, 2));
    assert_eq!(s.run(&["run"]).code, 0);
    assert_eq!(
        s.ssm
            .with(|x| x.requests[0].name().map(str::to_owned))
            .as_deref(),
        Some("/fleets/web:canary")
    );
}

#[test]
fn toml_value_sets_action_and_reboot_over_user_data() {
    let mut s = Scenario::new();
    s.with_bus(true, false);
    s.user_data(toml_user_data(&format!(
        "ssm-parameter = \"{PARAM}\"\naction = \"test\"\nreboot = \"never\""
    )));
    let v = format!("flake = \"{REF_NEW_KERNEL}\"\naction = \"switch\"\nreboot = \"if-needed\"\n");
    s.ssm
        .with(|x| x.params.insert(PARAM.into(), Param::string(&v, 4)));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        s.call_lines()
            .contains(&format!("fh apply nixos {REF_NEW_KERNEL} switch")),
        "{:?}",
        s.call_lines()
    );
    let reboot = &s.state()["last-run"]["reboot"];
    assert_eq!(reboot["policy"], "if-needed");
    assert_eq!(
        reboot["needed"], true,
        "the new kernel differs from the booted one: {reboot}"
    );
}

#[test]
fn config_file_parameter_overridden_by_user_data_flake() {
    let mut s = Scenario::new();
    s.defaults = format!("ssm-parameter = \"{PARAM}\"");
    s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
    assert_eq!(s.run(&["run"]).code, 0);
    assert!(
        s.ssm.with(|x| x.requests.is_empty()),
        "user data's flake replaced the image's parameter"
    );
}

#[test]
fn image_default_parameter_is_used_without_user_data() {
    let mut s = Scenario::new();
    s.defaults = format!("ssm-parameter = \"{PARAM}\"");
    s.ssm
        .with(|x| x.params.insert(PARAM.into(), Param::string(REF, 1)));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(s.current_system(), s.store_path("new-system"));
}

#[test]
fn parameter_not_found_names_it_and_runs_nothing() {
    let s = Scenario::new();
    s.user_data(toml_user_data("ssm-parameter = \"/fleets/missing\""));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 69, "{out:?}");
    assert!(
        out.stderr.contains(
            "SSM parameter /fleets/missing was not found in eu-west-1 (ParameterNotFound)"
        ),
        "{out:?}"
    );
    assert!(s.calls().is_empty());
    assert_eq!(s.ssm.with(|x| x.requests.len()), 1, "not retried");
}

#[test]
fn access_denied_says_what_the_role_needs() {
    let s = scenario(PARAM, Param::string(REF, 1));
    s.ssm.with(|x| x.faults.push_back(Fault::AccessDenied));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 69, "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "access to SSM parameter {PARAM} in eu-west-1 was denied (AccessDeniedException)"
        )),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("ssm:GetParameter") && out.stderr.contains("kms:Decrypt"),
        "{out:?}"
    );
    assert!(s.calls().is_empty());
}

#[test]
fn throttling_and_5xx_are_retried() {
    let s = scenario(PARAM, Param::string(REF, 1));
    s.ssm.with(|x| {
        x.faults
            .extend([Fault::Throttling, Fault::Status500, Fault::Throttling])
    });
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(s.ssm.with(|x| x.requests.len()), 4);
    assert!(out.stderr.contains("ThrottlingException"), "{out:?}");
}

#[test]
fn hanging_ssm_is_timed_out_and_retried() {
    let mut s = scenario(PARAM, Param::string(REF, 1));
    s.set_agent("retry-budget", "\"3s\"");
    s.ssm.with(|x| {
        x.faults.push_back(nixos_ami_agent_tests::ssm::Fault::Delay(
            std::time::Duration::from_secs(30),
        ))
    });
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(s.ssm.with(|x| x.requests.len()), 2);
}

#[test]
fn throttled_past_the_budget_is_tempfail() {
    let mut s = scenario(PARAM, Param::string(REF, 1));
    s.set_agent("retry-budget", "\"1s\"");
    s.ssm.with(|x| x.always_throttle = true);
    let out = s.run(&["run"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "SSM parameter {PARAM} in eu-west-1: gave up after"
        )),
        "{out:?}"
    );
    assert!(s.calls().is_empty());
}

#[test]
fn bad_value_names_the_parameter_and_runs_nothing() {
    for (value, reason) in [
        ("/nix/store/abc-nixos-system", "store paths"),
        ("action = \"boot\"", "key `flake`: missing"),
        (
            "flake = \"o/f/1#x\"\nlogin = false",
            "unknown field `login`",
        ),
        ("--option substituters", "whitespace"),
    ] {
        let s = scenario(PARAM, Param::string(value, 5));
        let log = s.path("script-ran");
        // A script alongside must not run either: bad input runs nothing.
        let ud = format!(
            "Content-Type: multipart/mixed; boundary=\"B\"\n\n--B\nContent-Type: text/x-nixos-ami-agent\n\n\
             ssm-parameter = \"{PARAM}\"\n--B\nContent-Type: text/x-shellscript\n\n#!/bin/sh\ntouch {}\n--B--\n",
            log.display()
        );
        s.user_data(ud);
        let out = s.run(&["run"]);
        assert_eq!(out.code, 65, "{value}: {out:?}");
        assert!(
            out.stderr
                .contains(&format!("SSM parameter {PARAM} (version 5): ")),
            "{value}: {out:?}"
        );
        assert!(out.stderr.contains(reason), "{value}: {out:?}");
        assert!(s.calls().is_empty());
        assert!(!log.exists(), "{value}: the script ran");
    }
}

#[test]
fn secure_string_value_never_appears_anywhere() {
    // A ref that is itself the secret, as when the flake name is private.
    let secret_ref = "secret-org/hush-hush-flake/0.1#nixosConfigurations.web";
    let mut s = scenario(
        PARAM,
        Param::secure(&format!("flake = \"{secret_ref}\"\n"), 2),
    );
    s.behaviour
        .store_paths
        .insert(secret_ref.into(), s.store_path("new-system"));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        s.call_lines()
            .contains(&format!("fh apply nixos {secret_ref} switch")),
        "fh still gets the real ref"
    );
    let status = s.run(&["status"]);
    let status_json = s.run(&["status", "--json"]);
    let plan = s.run(&["plan"]);
    let state = std::fs::read_to_string(s.path("state/state.json")).unwrap();
    for (what, text) in [
        ("run stderr", &out.stderr),
        ("run stdout", &out.stdout),
        ("status", &status.stdout),
        ("status --json", &status_json.stdout),
        ("plan", &plan.stdout),
        ("plan stderr", &plan.stderr),
        ("state", &state),
    ] {
        assert!(
            !text.contains("hush-hush"),
            "{what} leaks the SecureString:\n{text}"
        );
    }
    let placeholder = format!("<SecureString {PARAM}>");
    assert!(
        out.stderr.contains(&format!("resolving {placeholder}")),
        "fh's own lines are redacted too: {out:?}"
    );
    assert!(status.stdout.contains(&placeholder), "{status:?}");
    assert_eq!(s.state()["last-run"]["target"]["secret"], true);
}

#[test]
fn secure_string_bad_value_is_not_quoted() {
    let s = scenario(
        PARAM,
        Param::secure("flake = \"o/f/1#x\"\naction = \"hush-hush\"", 1),
    );
    let out = s.run(&["run"]);
    assert_eq!(out.code, 65, "{out:?}");
    assert!(
        out.stderr.contains("details withheld: SecureString"),
        "{out:?}"
    );
    assert!(!out.stderr.contains("hush-hush"), "{out:?}");
}

/// As on EC2: no static keys, the SDK's default chain finds the instance
/// role through IMDS (the double), and the request is signed with it.
#[test]
fn instance_role_credentials_from_imds() {
    let mut s = scenario(PARAM, Param::string(REF, 1));
    s.imds.with(|i| i.role = Some("web-fleet-role".into()));
    s.use_instance_role();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    let r = s.ssm.with(|x| x.requests[0].clone());
    assert_eq!(
        r.credential(),
        Some((ROLE_ACCESS_KEY.into(), "eu-west-1".into()))
    );
    assert!(
        s.imds
            .with(|i| i.gets_of("/latest/meta-data/iam/security-credentials/web-fleet-role"))
            >= 1
    );
}

/// Without a role the chain has nothing; early in boot that may heal, so it
/// is retried, then reported as temporary.
#[test]
fn no_instance_role_is_tempfail_after_the_budget() {
    let mut s = scenario(PARAM, Param::string(REF, 1));
    s.set_agent("retry-budget", "\"1s\"");
    s.use_instance_role();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(out.stderr.to_lowercase().contains("credentials"), "{out:?}");
    assert!(s.ssm.with(|x| x.requests.is_empty()));
}

/// A system without CA certificates cannot verify AWS: a clear, permanent
/// error before any request (the SDK alone fails late and opaquely).
#[test]
fn no_ca_certificates_is_a_clear_permanent_error() {
    let mut s = scenario(PARAM, Param::string(REF, 1));
    trust_only(&mut s, "empty");
    let out = s.run(&["run"]);
    assert_eq!(out.code, 69, "{out:?}");
    assert!(out.stderr.contains("no CA certificates found"), "{out:?}");
    assert!(!out.stderr.contains("panicked"), "{out:?}");
    assert!(s.ssm.with(|x| x.requests.is_empty()));
    assert!(s.calls().is_empty());
}

/// SSM over HTTPS, as on EC2: the agent verifies the endpoint against the
/// system's trust store (here only `SSL_CERT_FILE`, holding a test CA).
fn tls_scenario(trusted: &TestCa, served_by: &TestCa) -> Scenario {
    let mut s = Scenario::new();
    s.user_data(toml_user_data(&format!("ssm-parameter = \"{PARAM}\"")));
    s.ssm = SsmDouble::start_tls(rt(), Ssm::default(), served_by);
    s.ssm
        .with(|x| x.params.insert(PARAM.into(), Param::string(REF, 1)));
    std::fs::write(s.path("ca.pem"), &trusted.ca_pem).unwrap();
    trust_only(&mut s, "ca.pem");
    s
}

/// The system's trust store is the scenario's `file` and nothing else.
fn trust_only(s: &mut Scenario, file: &str) {
    std::fs::create_dir_all(s.path("no-certs")).unwrap();
    let var = |name: &str, path: &str| (name.to_owned(), s.path(path).display().to_string());
    let vars = [var("SSL_CERT_FILE", file), var("SSL_CERT_DIR", "no-certs")];
    s.env.extend(vars);
}

#[test]
fn https_endpoint_signed_by_a_trusted_ca_is_read() {
    let ca = TestCa::new("nixos-ami-agent test CA");
    let s = tls_scenario(&ca, &ca);
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(s.ssm.with(|x| x.requests.len()), 1);
    assert_eq!(s.current_system(), s.store_path("new-system"));
}

/// A certificate from a CA the system does not trust is refused: nothing
/// is read, nothing applied.
#[test]
fn https_endpoint_signed_by_an_unknown_ca_is_refused() {
    let trusted = TestCa::new("nixos-ami-agent test CA");
    let impostor = TestCa::new("impostor CA");
    let mut s = tls_scenario(&trusted, &impostor);
    s.set_agent("retry-budget", "\"1s\"");
    let out = s.run(&["run"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(
        out.stderr
            .contains("invalid peer certificate: UnknownIssuer"),
        "{out:?}"
    );
    assert!(s.ssm.refused.load(std::sync::atomic::Ordering::SeqCst) > 0);
    assert!(s.ssm.with(|x| x.requests.is_empty()));
    assert!(s.calls().is_empty(), "{:?}", s.calls());
}

/// The SDK's service-agnostic `AWS_ENDPOINT_URL` (a VPC endpoint, a
/// LocalStack) reaches SSM too, not only `AWS_ENDPOINT_URL_SSM`.
#[test]
fn generic_endpoint_url_is_honoured() {
    let mut s = scenario(PARAM, Param::string(REF, 1));
    s.env_remove.push("AWS_ENDPOINT_URL_SSM".into());
    s.env.push(("AWS_ENDPOINT_URL".into(), s.ssm.url()));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(s.ssm.with(|x| x.requests.len()), 1);
}
