//! `fleet status` against the SSM double holding a fleet's compliance
//! reports: a real agent run's, and a simulated fleet of 1 000 instances
//! in the form the agent reports (one item, the execution ID
//! `vVERSION KEY SYSTEM`, KEY the first 4 bytes of the SHA-256 of the
//! parameter's name without its leading `/` or selector, in hex). Text
//! and JSON, and the exit code a CI gate reads.

use nixos_ami_agent_tests::harness::{INSTANCE_ID, Output, REF, Scenario, toml_user_data};
use nixos_ami_agent_tests::ssm::{Compliance, Fault, Instance, Param};
use nixos_ami_agent_tests::ssm_compliance::parameter_key;

const TYPE: &str = "Custom:NixOSAmiAgent";

fn operator() -> Scenario {
    let mut s = Scenario::new();
    s.env.push(("AWS_REGION".into(), "eu-west-1".into()));
    s
}

/// An instance's report as the agent writes it, for /fleets/web.
fn report(s: &Scenario, id: &str, version: i64, system: &str, status: &str, title: &str) {
    report_for(s, "/fleets/web", id, version, system, status, title);
}

fn report_for(
    s: &Scenario,
    parameter: &str,
    id: &str,
    version: i64,
    system: &str,
    status: &str,
    title: &str,
) {
    let item = serde_json::json!({
        "Id": "nixos-configuration",
        "Title": title,
        "Severity": if status == "COMPLIANT" { "INFORMATIONAL" } else { "HIGH" },
        "Status": status,
        "Details": {"Target": REF, "StorePath": format!("/nix/store/{system}")},
    });
    s.ssm.with(|x| {
        x.compliance.insert(
            (id.to_owned(), TYPE.to_owned()),
            Compliance {
                resource_id: id.into(),
                resource_type: "ManagedInstance".into(),
                compliance_type: TYPE.into(),
                execution: serde_json::json!({
                    "ExecutionTime": now() - 600.0,
                    "ExecutionId": format!("v{version} {} {system}", parameter_key(parameter)),
                    "ExecutionType": "nixos-ami-agent run",
                }),
                items: vec![item],
            },
        );
    });
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn fleet_status(s: &Scenario, extra: &[&str]) -> (Output, serde_json::Value) {
    let mut args = vec!["fleet", "status"];
    args.extend(extra);
    let text = s.run(&args);
    args.push("--json");
    let json = s.run(&args);
    assert_eq!(text.code, json.code, "{text:?}\n{json:?}");
    let v = if json.code <= 1 {
        serde_json::from_str(&json.stdout).unwrap_or_else(|e| panic!("{e}: {json:?}"))
    } else {
        serde_json::Value::Null
    };
    (text, v)
}

fn requests(s: &Scenario, op: &str) -> usize {
    let target = format!("AmazonSSM.{op}");
    s.ssm.with(|x| {
        x.requests
            .iter()
            .filter(|r| r.target.as_deref() == Some(target.as_str()))
            .count()
    })
}

#[test]
fn a_converged_fleet_of_1000_exits_0() {
    let s = operator();
    s.ssm
        .with(|x| x.params.insert("/fleets/web".into(), Param::string(REF, 8)));
    for n in 0..1000 {
        report(
            &s,
            &format!("i-{n:017x}"),
            8,
            "new-system",
            "COMPLIANT",
            "runs it",
        );
    }
    // Another fleet in the region, on an older version of its own
    // parameter and failing: not this fleet's.
    for n in 0..20 {
        report_for(
            &s,
            "/fleets/api",
            &format!("i-a{n:016x}"),
            2,
            "api-system",
            "NON_COMPLIANT",
            "failed (exit 75): x",
        );
    }
    let (out, v) = fleet_status(&s, &["--parameter", "/fleets/web"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("SSM parameter /fleets/web: version 8, {REF}")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(
            "1000 instances report in eu-west-1 (Custom:NixOSAmiAgent): 1000 converged, 0 not"
        ),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.trim_end().ends_with("converged"),
        "{}",
        out.stdout
    );
    assert_eq!(v["converged"], true);
    assert_eq!(v["instances"].as_array().unwrap().len(), 1000);
    assert_eq!(v["groups"].as_array().unwrap().len(), 1);
    assert_eq!(v["groups"][0]["target"], REF);
    // 50 a page (1 020 reports: 21 pages), twice (text and JSON); details
    // for one instance per group.
    assert_eq!(requests(&s, "ListResourceComplianceSummaries"), 42);
    assert_eq!(requests(&s, "ListComplianceItems"), 2);
}

#[test]
fn failures_and_stragglers_are_listed_first_and_exit_1() {
    let s = operator();
    s.ssm
        .with(|x| x.params.insert("/fleets/web".into(), Param::string(REF, 8)));
    for n in 0..990 {
        report(
            &s,
            &format!("i-{n:017x}"),
            8,
            "new-system",
            "COMPLIANT",
            "runs it",
        );
    }
    for n in 990..995 {
        report(
            &s,
            &format!("i-{n:017x}"),
            7,
            "old-system",
            "COMPLIANT",
            "runs it",
        );
    }
    for n in 995..1000 {
        report(
            &s,
            &format!("i-{n:017x}"),
            8,
            "old-system",
            "NON_COMPLIANT",
            "failed (exit 1): health: rolled back: failed units: web.service",
        );
    }
    let (out, v) = fleet_status(&s, &["--parameter", "/fleets/web"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout.contains("990 converged, 10 not"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("not converged (10):"), "{}", out.stdout);
    assert!(
        out.stdout.contains(
            "v8  10m ago  failed (exit 1): health: rolled back: failed units: web.service"
        ),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("behind: its last run read version 7, the parameter is at 8"),
        "{}",
        out.stdout
    );
    assert_eq!(v["converged"], false);
    assert_eq!(v["not-converged"], 10);
    assert_eq!(v["compliant"], 995);
    let first = &v["instances"][0];
    assert_eq!(first["converged"], false, "{first}");
    assert_eq!(v["groups"][0]["instances"], 990);
    assert_eq!(v["groups"].as_array().unwrap().len(), 3, "{}", v["groups"]);
}

#[test]
fn a_tagged_instance_that_never_reported_is_not_converged() {
    let s = operator();
    s.ssm.with(|x| {
        x.instances = ["i-a", "i-b", "i-c", "i-other"]
            .iter()
            .map(|id| Instance {
                id: (*id).into(),
                tags: vec![(
                    "Fleet".into(),
                    if *id == "i-other" { "db" } else { "web" }.into(),
                )],
            })
            .collect();
        // More than a page of others with the tag of another fleet.
        x.instances.extend((0..120).map(|n| Instance {
            id: format!("i-db{n:03}"),
            tags: vec![("Fleet".into(), "db".into())],
        }));
    });
    report(&s, "i-a", 3, "new-system", "COMPLIANT", "runs it");
    report(&s, "i-b", 3, "new-system", "COMPLIANT", "runs it");
    report(
        &s,
        "i-other",
        1,
        "db-system",
        "NON_COMPLIANT",
        "failed (exit 75): x",
    );
    let (out, v) = fleet_status(&s, &["--tag", "Fleet=web"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(v["reporting"], 2, "i-other has another tag: {v}");
    assert_eq!(v["not-reporting"], serde_json::json!(["i-c"]));
    assert!(out.stdout.contains("never reported (1)"), "{}", out.stdout);
    assert!(out.stdout.contains("with tag Fleet=web"), "{}", out.stdout);
}

#[test]
fn an_agent_run_reports_and_the_fleet_sees_it_without_its_secret() {
    const SECRET: &str = "hush-org/hush-flake/0.1#nixosConfigurations.web";
    let mut s = Scenario::new();
    s.user_data(toml_user_data("ssm-parameter = \"/fleets/secret\""));
    s.set_agent("report-compliance", "true");
    s.ssm.with(|x| {
        x.params
            .insert("/fleets/secret".into(), Param::secure(SECRET, 4))
    });
    s.behaviour
        .store_paths
        .insert(SECRET.into(), s.store_path("new-system"));
    assert_eq!(s.run(&["run"]).code, 0);

    s.env.push(("AWS_REGION".into(), "eu-west-1".into()));
    let (out, v) = fleet_status(&s, &["--parameter", "/fleets/secret"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(v["instances"][0]["instance-id"], INSTANCE_ID);
    assert_eq!(v["instances"][0]["ssm-version"], 4);
    assert_eq!(v["instances"][0]["system"], "new-system");
    assert_eq!(v["parameter"]["value"], "<SecureString /fleets/secret>");
    for text in [&out.stdout, &out.stderr, &v.to_string()] {
        assert!(!text.contains("hush"), "{text}");
    }
    // The operator's read asked for no decryption.
    assert!(s.ssm.with(|x| {
        x.requests.iter().any(|r| {
            r.target.as_deref() == Some("AmazonSSM.GetParameter")
                && r.body["WithDecryption"] == false
        })
    }));
}

#[test]
fn aws_refusing_or_throttling() {
    let s = operator();
    report(&s, "i-a", 1, "new-system", "COMPLIANT", "runs it");
    s.ssm.with(|x| {
        x.op_faults.insert(
            "ListResourceComplianceSummaries".into(),
            [Fault::Throttling, Fault::Status500].into(),
        )
    });
    let out = s.run(&["fleet", "status"]);
    assert_eq!(out.code, 0, "throttling is retried: {out:?}");

    s.ssm.with(|x| {
        x.op_faults.insert(
            "ListResourceComplianceSummaries".into(),
            [Fault::AccessDenied].into(),
        )
    });
    let out = s.run(&["fleet", "status"]);
    assert_eq!(out.code, 69, "{out:?}");
    assert!(
        out.stderr
            .contains("you need ssm:ListResourceComplianceSummaries"),
        "{out:?}"
    );
    assert_eq!(
        out.stderr.matches("AccessDenied").count(),
        1,
        "once: {out:?}"
    );
}

#[test]
fn nothing_reporting_and_no_region() {
    let s = operator();
    let (out, v) = fleet_status(&s, &[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.contains("no instance reports"), "{}", out.stdout);
    assert_eq!(v["converged"], false);

    let mut s = Scenario::new();
    s.env
        .push(("AWS_CONFIG_FILE".into(), "/nonexistent".into()));
    let out = s.run(&["fleet", "status"]);
    assert_eq!(out.code, 64, "{out:?}");
    assert!(out.stderr.contains("--region"), "{out:?}");

    let bad = s.run(&["fleet", "status", "--tag", "Fleet"]);
    assert_eq!(bad.code, 64, "{bad:?}");
    assert!(bad.stderr.contains("KEY=VALUE"), "{bad:?}");
}

#[test]
fn a_label_names_the_version_to_wait_for_and_tag_pages_are_followed() {
    let s = operator();
    // Version 9 is labelled canary; the rest of the fleet reads stable (8).
    s.ssm.with(|x| {
        x.params
            .insert("/fleets/web:canary".into(), Param::string(REF, 9));
        x.instances = (0..60)
            .map(|n| Instance {
                id: format!("i-{n:03}"),
                tags: vec![(
                    "Canary".into(),
                    if n < 55 { "false" } else { "true" }.into(),
                )],
            })
            .collect();
    });
    for n in 0..55 {
        report(
            &s,
            &format!("i-{n:03}"),
            8,
            "old-system",
            "COMPLIANT",
            "runs it",
        );
    }
    for n in 55..60 {
        report(
            &s,
            &format!("i-{n:03}"),
            9,
            "new-system",
            "COMPLIANT",
            "runs it",
        );
    }
    let (out, v) = fleet_status(
        &s,
        &["--parameter", "/fleets/web:canary", "--tag", "Canary=true"],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(v["reporting"], 5);
    // The fleet as a whole is behind the canary version.
    let (out, v) = fleet_status(
        &s,
        &["--parameter", "/fleets/web:canary", "--tag", "Canary=false"],
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(v["not-converged"], 55);
    // DescribeInstanceInformation's pages of 50: 5 canaries (1 page) and
    // 55 others (2 pages), for text and JSON.
    assert_eq!(requests(&s, "DescribeInstanceInformation"), 2 * (1 + 2));
}

#[test]
fn without_credentials_it_says_so_at_once() {
    let mut s = operator();
    s.env_remove.push("AWS_ACCESS_KEY_ID".into());
    s.env_remove.push("AWS_SECRET_ACCESS_KEY".into());
    let out = s.run(&["fleet", "status"]);
    assert_eq!(out.code, 69, "{out:?}");
    assert!(out.stderr.contains("no AWS credentials"), "{out:?}");
    assert_eq!(requests(&s, "ListResourceComplianceSummaries"), 0);
}

#[test]
fn reasons_not_shown_when_listcomplianceitems_is_denied() {
    let s = operator();
    report(
        &s,
        "i-a",
        1,
        "old-system",
        "NON_COMPLIANT",
        "failed (exit 1): x",
    );
    s.ssm.with(|x| {
        x.op_faults
            .insert("ListComplianceItems".into(), [Fault::AccessDenied].into())
    });
    let out = s.run(&["fleet", "status"]);
    assert_eq!(out.code, 1, "not converged, and said: {out:?}");
    assert!(out.stdout.contains("HIGH (not fetched)"), "{out:?}");
    assert!(
        out.stderr.contains("reasons and targets not shown"),
        "{out:?}"
    );
}
