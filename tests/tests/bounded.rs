//! Bounded waiting: whatever hangs (IMDS, SSM, a program), the run ends
//! with a message naming the step, within the configured budgets. The
//! harness kills (and fails) any run that takes longer than the limit.

use nixos_ami_agent_tests::harness::{REF, Scenario, finish, toml_user_data};
use nixos_ami_agent_tests::imds::Fault;
use nixos_ami_agent_tests::ssm::{Fault as SsmFault, Param};
use nixos_ami_agent_tests::standin::Mode;
use std::time::Duration;

/// Budgets of 2 s per remote step, 1 s per program attempt: a hung run
/// must end far inside this.
const LIMIT: Duration = Duration::from_secs(30);

fn scenario(settings: &str) -> Scenario {
    let mut s = Scenario::new();
    s.user_data(toml_user_data(settings));
    s.set_agent("retry-budget", "\"2s\"");
    s.set_agent("command-timeout", "\"1s\"");
    s
}

fn ends_tempfail(s: &Scenario, step: &str) {
    let out = finish(s.spawn(&["run"]), LIMIT);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(
        out.stderr.contains(step),
        "the failure names {step:?}: {out:?}"
    );
}

#[test]
fn imds_that_never_answers() {
    let s = scenario(&format!("flake = \"{REF}\""));
    s.imds.with(|i| {
        i.get_faults.extend(std::iter::repeat_n(
            Fault::Delay(Duration::from_secs(3600)),
            100,
        ))
    });
    ends_tempfail(&s, "IMDS instance id: gave up after");
}

#[test]
fn ssm_that_never_answers() {
    let s = scenario("ssm-parameter = \"/fleets/web\"");
    s.ssm.with(|x| {
        x.params.insert("/fleets/web".into(), Param::string(REF, 1));
        x.faults.extend(std::iter::repeat_n(
            SsmFault::Delay(Duration::from_secs(3600)),
            100,
        ));
    });
    ends_tempfail(&s, "SSM parameter /fleets/web in eu-west-1: gave up after");
}

#[test]
fn resolve_that_never_returns() {
    let mut s = scenario(&format!("flake = \"{REF}\""));
    s.behaviour.resolve = Mode::Hang;
    ends_tempfail(&s, "resolve: gave up after");
}

#[test]
fn apply_that_never_returns() {
    let mut s = scenario(&format!("flake = \"{REF}\""));
    s.set_agent("apply-timeout", "\"1s\"");
    s.behaviour.apply = Mode::Hang;
    ends_tempfail(&s, "apply: ");
}

#[test]
fn script_that_never_returns() {
    let mut s = Scenario::new();
    s.set_agent("script-timeout", "\"1s\"");
    s.user_data("#!/bin/sh\nsleep 3600 &\nsleep 3600\n");
    let out = finish(s.spawn(&["run"]), LIMIT);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("user-data script user data failed: timed out after 1s"),
        "{out:?}"
    );
}
