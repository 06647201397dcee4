//! Secrets, across every scenario: a recognisable IMDS token (the double's
//! tokens start with IMDSv2-TOKEN-SECRET-), a SecureString target, and a
//! user-data body with a marker in its comments. Everything the agent
//! writes is captured (stderr at debug level, stdout, the state file,
//! `status`, `status --json`, `plan`, `plan --json`, `doctor`, `doctor
//! --json`) and none of them may contain any of the three.

use nixos_ami_agent_tests::harness::Scenario;
use nixos_ami_agent_tests::imds::TOKEN_PREFIX;
use nixos_ami_agent_tests::ssm::{Fault, Param};
use nixos_ami_agent_tests::standin::{FlakeHub, Mode};

const SECRET_REF: &str = "hush-org/hush-flake/0.1#nixosConfigurations.web";
const BODY_MARKER: &str = "USERDATA-BODY-SECRET";

type Configure = Box<dyn FnOnce(&mut Scenario)>;

fn scenario(configure: impl FnOnce(&mut Scenario)) -> Scenario {
    let mut s = Scenario::new();
    s.user_data(format!(
        "Content-Type: multipart/mixed; boundary=\"B\"\n\n--B\nContent-Type: text/x-nixos-ami-agent\n\n\
         # {BODY_MARKER}-1\nssm-parameter = \"/fleets/secret\"\n\
         --B\nContent-Type: text/x-shellscript\n\n#!/bin/sh\n# {BODY_MARKER}-2\ntrue\n--B--\n"
    ));
    s.ssm.with(|x| {
        x.params.insert(
            "/fleets/secret".into(),
            Param::secure(&format!("flake = \"{SECRET_REF}\"\n"), 3),
        )
    });
    s.behaviour
        .store_paths
        .insert(SECRET_REF.into(), s.store_path("kernel-system"));
    configure(&mut s);
    s
}

fn outputs(s: &Scenario) -> Vec<(String, String)> {
    let mut all = vec![];
    let run = s.run(&["run"]);
    all.push(("run stderr".into(), run.stderr));
    all.push(("run stdout".into(), run.stdout));
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["plan"],
        &["plan", "--json"],
        &["doctor"],
        &["doctor", "--json"],
    ] {
        let o = s.run(args);
        all.push((format!("{args:?} stdout"), o.stdout));
        all.push((format!("{args:?} stderr"), o.stderr));
    }
    if let Ok(state) = std::fs::read_to_string(s.path("state/state.json")) {
        all.push(("state.json".into(), state));
    }
    all
}

fn assert_clean(name: &str, s: &Scenario) {
    let all = outputs(s);
    for (what, text) in &all {
        for secret in [TOKEN_PREFIX, "hush-org", "hush-flake", BODY_MARKER] {
            assert!(
                !text.contains(secret),
                "{name}: {what} contains {secret:?}:\n{text}"
            );
        }
    }
    // The scenario did get far enough to have something to leak.
    let stderr = &all[0].1;
    assert!(
        stderr.contains("SSM parameter /fleets/secret"),
        "{name}: {stderr}"
    );
}

#[test]
fn no_scenario_leaks_a_secret() {
    let scenarios: Vec<(&str, Configure)> = vec![
        (
            "applied, with a reboot",
            Box::new(|s: &mut Scenario| {
                s.with_bus(true, false);
            }),
        ),
        (
            "apply fails",
            Box::new(|s: &mut Scenario| s.behaviour.apply = Mode::Fail),
        ),
        (
            "fh succeeds without switching",
            Box::new(|s: &mut Scenario| s.behaviour.apply = Mode::NoSwitch),
        ),
        (
            "login fails",
            Box::new(|s: &mut Scenario| {
                s.behaviour.login = Mode::Fail;
                s.set_agent("retry-budget", "\"1s\"");
            }),
        ),
        (
            "resolve prints garbage",
            Box::new(|s: &mut Scenario| s.behaviour.resolve = Mode::BadJson),
        ),
        (
            "resolve fails then works",
            Box::new(|s: &mut Scenario| s.behaviour.resolve_fail_times = 2),
        ),
        (
            "SSM throttles",
            Box::new(|s: &mut Scenario| {
                s.ssm
                    .with(|x| x.faults.extend([Fault::Throttling, Fault::Status500]));
            }),
        ),
        ("no reboot bus", Box::new(|_: &mut Scenario| {})),
        // fh names the reference in its errors (and FlakeHub's URL, which
        // holds the flake without its `#`).
        (
            "FlakeHub has no such output",
            Box::new(|s: &mut Scenario| {
                s.behaviour.store_paths.clear();
                s.set_agent("retry-budget", "\"1s\"");
            }),
        ),
        (
            "FlakeHub unreachable",
            Box::new(|s: &mut Scenario| {
                s.behaviour.flakehub = Some(FlakeHub::Unreachable);
                s.set_agent("retry-budget", "\"1s\"");
            }),
        ),
    ];
    for (name, configure) in scenarios {
        let s = scenario(configure);
        assert_clean(name, &s);
    }
}

#[test]
fn second_run_and_bad_secure_values_leak_nothing() {
    // Converged already: the nothing-to-do path.
    let mut s = scenario(|s| {
        let same_kernel = s.store_path("new-system");
        s.behaviour
            .store_paths
            .insert(SECRET_REF.into(), same_kernel);
    });
    s.with_bus(true, false);
    assert_eq!(s.run(&["run"]).code, 0);
    assert_clean("second run", &s);

    // A SecureString value that is invalid in several ways.
    for bad in [
        "flake = \"hush-org/hush-flake/0.1#x\"\naction = \"hush-flake\"",
        "hush-org/hush-flake/0.1#x y",
        "flake = [\"hush-flake\"]",
        "hush-flake = 1",
    ] {
        let s = scenario(|s| {
            s.ssm.with(|x| {
                x.params
                    .insert("/fleets/secret".into(), Param::secure(bad, 4))
            });
        });
        assert_clean(bad, &s);
    }
}

/// The secret target has a new kernel, so the first sweep scenario did
/// reach the reboot request.
#[test]
fn the_sweep_reaches_a_reboot() {
    let mut s = scenario(|_| {});
    s.with_bus(true, false);
    assert_eq!(s.run(&["run"]).code, 0);
    assert_eq!(s.reboot_requests().len(), 1);
}
