//! Every run reports its outcome to SSM Compliance on its own instance
//! (`report-compliance = true`): COMPLIANT when it runs its target,
//! NON_COMPLIANT with the reason otherwise; a SecureString target is never
//! revealed; a report that fails never changes the run's result.

use nixos_ami_agent_tests::harness::{INSTANCE_ID, REF, Scenario, toml_user_data};
use nixos_ami_agent_tests::ssm::{Fault, Param};
use nixos_ami_agent_tests::ssm_compliance::parameter_key;
use nixos_ami_agent_tests::standin::Mode;

const TYPE: &str = "Custom:NixOSAmiAgent";

fn scenario(settings: &str) -> Scenario {
    let mut s = Scenario::new();
    s.user_data(toml_user_data(settings));
    s.set_agent("report-compliance", "true");
    s
}

fn fleet() -> Scenario {
    let s = scenario("ssm-parameter = \"/fleets/web\"");
    s.ssm
        .with(|x| x.params.insert("/fleets/web".into(), Param::string(REF, 7)));
    s
}

/// The item the instance reported, and its execution summary.
fn reported(s: &Scenario) -> (serde_json::Value, serde_json::Value) {
    s.ssm.with(|x| {
        let c = x
            .compliance
            .get(&(INSTANCE_ID.to_owned(), TYPE.to_owned()))
            .unwrap_or_else(|| panic!("nothing reported: {:?}", x.compliance));
        assert_eq!(c.resource_type, "ManagedInstance");
        assert_eq!(c.items.len(), 1, "{:?}", c.items);
        (c.items[0].clone(), c.execution.clone())
    })
}

fn puts(s: &Scenario) -> usize {
    s.ssm.with(|x| {
        x.requests
            .iter()
            .filter(|r| r.target.as_deref() == Some("AmazonSSM.PutComplianceItems"))
            .count()
    })
}

#[test]
fn an_applied_target_is_compliant_with_what_it_runs() {
    let s = fleet();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    let (item, exec) = reported(&s);
    assert_eq!(item["Status"], "COMPLIANT", "{item}");
    assert_eq!(item["Id"], "nixos-configuration");
    assert_eq!(item["Title"], format!("runs {REF}"));
    let d = &item["Details"];
    let new = s.store_path("new-system").display().to_string();
    assert_eq!(d["Target"], REF);
    assert_eq!(d["StorePath"], new);
    assert_eq!(d["Running"], new);
    assert_eq!(d["ExitCode"], "0");
    assert_eq!(d["Result"], "applied");
    assert_eq!(d["SsmParameter"], "/fleets/web");
    assert_eq!(d["SsmVersion"], "7");
    assert_eq!(d["Action"], "switch");
    assert_eq!(d["Health"], "healthy");
    assert_eq!(
        exec["ExecutionId"],
        format!("v7 {} new-system", parameter_key("/fleets/web"))
    );
    assert_eq!(exec["ExecutionType"], "nixos-ami-agent run");
    assert!(exec["ExecutionTime"].is_number(), "{exec}");
    assert!(
        out.stderr.contains("compliance: reported COMPLIANT"),
        "{out:?}"
    );

    // The next run, nothing to do: reported again (the time moves on).
    let again = s.run(&["run"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(puts(&s), 2);
    let (item, _) = reported(&s);
    assert_eq!(item["Status"], "COMPLIANT");
    assert_eq!(item["Details"]["Result"], "nothing to do");
}

#[test]
fn a_failed_run_is_non_compliant_with_its_reason_and_exit_code() {
    let mut s = fleet();
    s.behaviour.apply = Mode::Fail;
    s.set_agent("retry-budget", "\"1s\"");
    let out = s.run(&["run"]);
    assert_ne!(out.code, 0, "{out:?}");
    let (item, exec) = reported(&s);
    assert_eq!(item["Status"], "NON_COMPLIANT", "{item}");
    assert_eq!(item["Severity"], "HIGH", "{item}");
    let title = item["Title"].as_str().unwrap();
    assert!(
        title.starts_with(&format!("failed (exit {}): ", out.code)),
        "{title}"
    );
    assert_eq!(item["Details"]["ExitCode"], out.code.to_string());
    assert_eq!(
        item["Details"]["Running"],
        s.store_path("old-system").display().to_string()
    );
    assert_eq!(
        exec["ExecutionId"],
        format!("v7 {} old-system", parameter_key("/fleets/web"))
    );
}

#[test]
fn the_reason_is_the_runs_own_failure() {
    // Applied and healthy, but a user-data script failed: the run failed
    // for that, not for its apply.
    let s = scenario("");
    s.user_data(
        "Content-Type: multipart/mixed; boundary=\"B\"\n\n--B\nContent-Type: text/x-nixos-ami-agent\n\n\
         ssm-parameter = \"/fleets/web\"\n--B\nContent-Type: text/x-shellscript\n\n#!/bin/sh\nexit 3\n--B--\n",
    );
    s.ssm
        .with(|x| x.params.insert("/fleets/web".into(), Param::string(REF, 7)));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 1, "{out:?}");
    let (item, _) = reported(&s);
    assert_eq!(item["Status"], "NON_COMPLIANT");
    assert_eq!(
        item["Title"], "failed (exit 1): 1 user-data script(s) failed",
        "{item}"
    );
    assert_eq!(item["Details"]["Message"], "1 user-data script(s) failed");
}

#[test]
fn a_report_waits_for_ssm_to_know_the_instance() {
    // Early in the first boot the SSM agent has not registered yet.
    let s = fleet();
    s.ssm.with(|x| {
        x.op_faults.insert(
            "PutComplianceItems".into(),
            [Fault::Raw {
                status: 400,
                body: br#"{"__type":"InvalidResourceId","message":"The resource ID isn't valid."}"#
                    .to_vec(),
            }]
            .into(),
        )
    });
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(puts(&s), 2, "retried: {out:?}");
    assert_eq!(reported(&s).0["Status"], "COMPLIANT");
}

#[test]
fn a_rolled_back_target_is_critical() {
    let mut s = fleet();
    s.units_on("new-system", &[("web.service", "failed")]);
    let out = s.run(&["run"]);
    assert_eq!(out.code, 1, "{out:?}");
    let (item, _) = reported(&s);
    assert_eq!(item["Status"], "NON_COMPLIANT");
    assert_eq!(item["Severity"], "CRITICAL");
    assert!(
        item["Title"].as_str().unwrap().contains("web.service"),
        "{item}"
    );
    assert_eq!(item["Details"]["Health"], "rolled-back");
}

#[test]
fn no_target_is_compliant() {
    let s = scenario("reboot = \"never\"");
    assert_eq!(s.run(&["run"]).code, 0);
    let (item, exec) = reported(&s);
    assert_eq!(item["Status"], "COMPLIANT");
    assert_eq!(item["Title"], "no target configured");
    assert_eq!(exec["ExecutionId"], "- - old-system");
}

#[test]
fn a_securestring_target_is_never_reported() {
    const SECRET: &str = "hush-org/hush-flake/0.1#nixosConfigurations.web";
    for apply in [Mode::Ok, Mode::Fail] {
        let mut s = scenario("ssm-parameter = \"/fleets/secret\"");
        s.ssm.with(|x| {
            x.params
                .insert("/fleets/secret".into(), Param::secure(SECRET, 2))
        });
        s.behaviour
            .store_paths
            .insert(SECRET.into(), s.store_path("new-system"));
        s.behaviour.apply = apply;
        s.set_agent("retry-budget", "\"1s\"");
        s.run(&["run"]);
        let (item, exec) = reported(&s);
        let all = format!("{item} {exec}");
        for secret in ["hush-org", "hush-flake"] {
            assert!(!all.contains(secret), "{apply:?}: {all}");
        }
        assert_eq!(item["Details"]["Target"], "<SecureString /fleets/secret>");
    }
}

#[test]
fn reporting_is_retried_when_throttled() {
    let s = fleet();
    s.ssm.with(|x| {
        x.op_faults.insert(
            "PutComplianceItems".into(),
            [Fault::Throttling, Fault::Status500].into(),
        )
    });
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(puts(&s), 3);
    assert_eq!(reported(&s).0["Status"], "COMPLIANT");
}

#[test]
fn a_report_that_fails_never_fails_the_run() {
    // Denied (the role lacks ssm:PutComplianceItems), always throttled
    // past the budget, and an instance SSM does not manage.
    for case in ["denied", "throttled", "unmanaged"] {
        let mut s = fleet();
        s.set_agent("retry-budget", "\"1s\"");
        match case {
            "denied" => s.ssm.with(|x| {
                x.op_faults
                    .insert("PutComplianceItems".into(), [Fault::AccessDenied].into());
            }),
            "throttled" => s.ssm.with(|x| {
                x.op_faults.insert(
                    "PutComplianceItems".into(),
                    std::iter::repeat_n(Fault::Throttling, 500).collect(),
                );
            }),
            _ => s.ssm.with(|x| x.instances.clear()),
        }
        let out = s.run(&["run"]);
        assert_eq!(out.code, 0, "{case}: {out:?}");
        assert_eq!(s.current_system(), s.store_path("new-system"), "{case}");
        assert!(
            out.stderr.contains(
                "compliance: the outcome could not be reported to SSM, the run's result stands"
            ),
            "{case}: {out:?}"
        );
        if case == "denied" {
            assert!(out.stderr.contains("ssm:PutComplianceItems"), "{out:?}");
        }
        if case == "unmanaged" {
            assert!(out.stderr.contains("not a managed node"), "{out:?}");
        }
        assert!(s.ssm.with(|x| x.compliance.is_empty()), "{case}");
        assert_eq!(s.state()["last-run"]["outcome"], "applied", "{case}");
    }
}

#[test]
fn off_by_default() {
    let mut s = fleet();
    s.agent.retain(|(k, _)| k != "report-compliance");
    assert_eq!(s.run(&["run"]).code, 0);
    assert_eq!(puts(&s), 0);
}

#[test]
fn a_run_that_never_learned_the_instance_reports_nothing() {
    let s = fleet();
    assert_eq!(s.run(&["run"]).code, 0);
    // IMDS has no instance ID for the next run (its first GET): it fails
    // before it records itself, though IMDS still answers the region. The
    // previous run's record must not be reported again as this one's.
    s.imds.with(|i| {
        i.get_faults
            .push_back(nixos_ami_agent_tests::imds::Fault::Status(404))
    });
    let out = s.run(&["run"]);
    assert_eq!(out.code, 69, "{out:?}");
    assert_eq!(puts(&s), 1, "{out:?}");
}

#[test]
fn the_outcome_is_out_before_the_report_is_sent() {
    // SSM holds the report (each attempt times out) until the retry
    // budget (4 s here) runs out: the console line must not wait for it.
    let s = fleet();
    s.ssm.with(|x| {
        x.op_faults.insert(
            "PutComplianceItems".into(),
            std::iter::repeat_n(Fault::Delay(std::time::Duration::from_secs(30)), 20).collect(),
        )
    });
    let mut child = s.spawn(&["run"]);
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let drain = std::thread::spawn(move || {
        let mut v = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut v).ok();
        v
    });
    let mut outcome_at = None;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.unwrap();
        if line.starts_with("nixos-ami-agent: run finished at") {
            outcome_at = Some(std::time::Instant::now());
        }
    }
    let status = child.wait().unwrap();
    let exited_at = std::time::Instant::now();
    let stderr = drain.join().unwrap();
    assert!(status.success(), "{stderr}");
    let outcome_at = outcome_at.expect("an outcome line");
    assert!(
        exited_at - outcome_at >= std::time::Duration::from_secs(2),
        "the outcome line came only {:?} before the end, after the report:\n{stderr}",
        exited_at - outcome_at
    );
    assert!(
        stderr.contains("compliance: the outcome could not be reported"),
        "{stderr}"
    );
}
