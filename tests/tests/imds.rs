//! IMDSv2 against the double: token semantics and every fault the issue
//! lists. Each test asserts from the double's request log, not timings.

use nixos_ami_agent_tests::harness::{REF, Scenario, toml_user_data};
use nixos_ami_agent_tests::imds::{Fault, TOKEN_PREFIX};
use std::sync::atomic::Ordering;
use std::time::Duration;

fn scenario() -> Scenario {
    let s = Scenario::new();
    s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
    s
}

fn applied(s: &Scenario, out: &nixos_ami_agent_tests::harness::Output) {
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(s.current_system(), s.store_path("new-system"));
}

#[test]
fn one_token_with_ttl_reused_for_every_get_and_never_v1() {
    let s = scenario();
    let out = s.run(&["run"]);
    applied(&s, &out);
    let reqs = s.imds.with(|i| i.requests.clone());
    let puts: Vec<_> = reqs.iter().filter(|r| r.method == "PUT").collect();
    assert_eq!(puts.len(), 1, "{reqs:?}");
    assert_eq!(puts[0].path, "/latest/api/token");
    assert_eq!(puts[0].ttl.as_deref(), Some("21600"));
    let gets: Vec<_> = reqs.iter().filter(|r| r.method == "GET").collect();
    assert_eq!(
        gets.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
        ["/latest/meta-data/instance-id", "/latest/user-data"]
    );
    assert!(
        gets.iter().all(|r| r
            .token
            .as_deref()
            .is_some_and(|t| t.starts_with(TOKEN_PREFIX))),
        "IMDSv2 only: {gets:?}"
    );
    assert!(gets.iter().all(|r| r.status == 200));
}

#[test]
fn token_revoked_mid_run_gets_a_fresh_token() {
    let s = scenario();
    s.imds.with(|i| i.revoke_after_gets = Some(1));
    let out = s.run(&["run"]);
    applied(&s, &out);
    let reqs = s.imds.with(|i| i.requests.clone());
    assert_eq!(s.imds.with(|i| i.puts()), 2, "{reqs:?}");
    let statuses: Vec<_> = reqs
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str(), r.status))
        .collect();
    assert_eq!(
        statuses,
        [
            ("PUT", "/latest/api/token", 200),
            ("GET", "/latest/meta-data/instance-id", 200),
            ("GET", "/latest/user-data", 401),
            ("PUT", "/latest/api/token", 200),
            ("GET", "/latest/user-data", 200),
        ]
    );
}

#[test]
fn token_403_means_imds_disabled_fail_at_once() {
    let s = scenario();
    s.imds.with(|i| i.token_forbidden = true);
    let out = s.run(&["run"]);
    assert_eq!(out.code, 69, "{out:?}");
    assert!(
        out.stderr
            .contains("metadata service is disabled for this instance"),
        "{out:?}"
    );
    assert_eq!(
        s.imds.with(|i| i.requests.len()),
        1,
        "no retries, no unauthenticated fallback"
    );
    assert!(s.calls().is_empty());
}

#[test]
fn imds_not_up_yet_connection_refused_is_retried() {
    let s = Scenario::with_imds_delay(Duration::from_millis(700));
    s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
    let out = s.run(&["run"]);
    applied(&s, &out);
    assert!(
        out.stderr.contains("cannot connect"),
        "the refusals were seen and retried: {out:?}"
    );
}

#[test]
fn dropped_connections_are_retried() {
    let s = scenario();
    s.imds.drop_connections.store(3, Ordering::SeqCst);
    let out = s.run(&["run"]);
    applied(&s, &out);
    assert_eq!(s.imds.drop_connections.load(Ordering::SeqCst), 0);
}

#[test]
fn server_errors_are_retried() {
    let s = scenario();
    s.imds.with(|i| {
        i.token_faults.extend([Fault::Status(500)]);
        i.get_faults
            .extend([Fault::Status(500), Fault::Status(502)]);
    });
    let out = s.run(&["run"]);
    applied(&s, &out);
    let statuses: Vec<u16> = s
        .imds
        .with(|i| i.requests.iter().map(|r| r.status).collect());
    assert_eq!(statuses, [500, 200, 500, 502, 200, 200]);
}

#[test]
fn retry_after_on_503_is_honoured() {
    let s = scenario();
    s.imds.with(|i| {
        i.get_faults
            .push_back(Fault::Unavailable { retry_after: 1 })
    });
    let out = s.run(&["run"]);
    applied(&s, &out);
    let reqs = s.imds.with(|i| i.requests.clone());
    let i = reqs.iter().position(|r| r.status == 503).unwrap();
    let gap = reqs[i + 1].at - reqs[i].at;
    assert!(
        gap >= Duration::from_millis(900),
        "retried after {gap:?}, before Retry-After"
    );
}

#[test]
fn slow_reply_times_out_and_is_retried() {
    let s = scenario();
    s.imds
        .with(|i| i.get_faults.push_back(Fault::Delay(Duration::from_secs(3))));
    let out = s.run(&["run"]);
    applied(&s, &out);
    assert!(out.stderr.contains("timed out"), "{out:?}");
    assert_eq!(
        s.imds.with(|i| i.gets_of("/latest/meta-data/instance-id")),
        2
    );
}

#[test]
fn budget_exhausted_is_tempfail_and_runs_nothing() {
    let mut s = scenario();
    s.set_agent("retry-budget", "\"1s\"");
    s.imds.with(|i| {
        i.get_faults
            .extend(std::iter::repeat_n(Fault::Status(500), 500))
    });
    let out = s.run(&["run"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(
        out.stderr.contains("IMDS instance id: gave up after"),
        "{out:?}"
    );
    assert!(s.calls().is_empty());
    let gets = s.imds.with(|i| i.gets_of("/latest/meta-data/instance-id"));
    assert!(gets >= 3, "retried within the budget: {gets}");
}

#[test]
fn endpoint_env_overrides_config_file() {
    let mut s = scenario();
    // The config file points at a port where nothing listens.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    s.set_agent("imds-endpoint", &format!("\"http://{dead}\""));
    s.env
        .push(("AWS_EC2_METADATA_SERVICE_ENDPOINT".into(), s.imds.url()));
    let out = s.run(&["run"]);
    applied(&s, &out);
}

#[test]
fn user_data_404_is_no_user_data() {
    let s = Scenario::new();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    let r = s.imds.with(|i| i.requests.clone());
    assert!(
        r.iter()
            .any(|r| r.path == "/latest/user-data" && r.status == 404)
    );
    assert_eq!(s.state()["last-run"]["outcome"], "no-target");
}

/// IMDS is link-local: a proxy from the environment must never see the
/// token or the user data.
#[test]
fn imds_never_goes_through_a_proxy() {
    let mut s = scenario();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    for k in ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
        s.env.push((k.into(), format!("http://{dead}")));
    }
    s.env_remove.push("NO_PROXY".into());
    let out = s.run(&["run"]);
    applied(&s, &out);
}
