//! `status` never hides a failure: every run that got the lock is in the
//! run history with its exit code, also runs that ended before the
//! instance was known; `--wait` blocks until this boot's run has ended
//! and exits with its code.

use nixos_ami_agent_tests::harness::{REF, Scenario, toml_user_data};
use nixos_ami_agent_tests::imds::Fault;
use nixos_ami_agent_tests::standin::Mode;
use std::time::{Duration, Instant};

#[test]
fn a_run_that_never_reached_imds_is_shown_failed() {
    let mut s = Scenario::new();
    s.set_agent("retry-budget", "\"1s\"");
    s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
    s.imds.with(|i| {
        for _ in 0..1000 {
            i.token_faults.push_back(Fault::Status(500));
        }
    });
    let out = s.run(&["run"]);
    assert_eq!(out.code, 75, "{out:?}");
    let status = s.run(&["status"]);
    assert_eq!(status.code, 0, "{status:?}");
    assert!(
        status.stdout.contains("result:       failed (exit 75)"),
        "{status:?}"
    );
    assert!(!status.stdout.contains("no run recorded yet"), "{status:?}");
    let json = s.run(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["result"]["exit-code"], 75, "{v}");
    assert_eq!(v["result"]["result"], "failed");
    assert_eq!(v["runs"].as_array().unwrap().len(), 1);
}

#[test]
fn every_outcome_is_kept_with_its_exit_code() {
    let s = Scenario::new();
    s.user_data(b"#nixos-ami-agent\naction = \"swtich\"\n".to_vec());
    assert_eq!(s.run(&["run"]).code, 65);
    s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
    assert_eq!(s.run(&["run"]).code, 0);
    assert_eq!(s.run(&["run"]).code, 0);
    let status = s.run(&["status"]);
    assert!(
        status
            .stdout
            .contains("result:       nothing to do (exit 0)"),
        "{status:?}"
    );
    assert!(status.stdout.contains("recent runs:"), "{status:?}");
    assert!(status.stdout.contains("failed (exit 65)"), "{status:?}");
    assert!(status.stdout.contains("applied (exit 0)"), "{status:?}");
    // Bounded.
    for _ in 0..25 {
        s.run(&["run"]);
    }
    let v: serde_json::Value = serde_json::from_str(&s.run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(v["runs"].as_array().unwrap().len(), 20);
}

#[test]
fn wait_returns_the_boot_runs_exit_code() {
    let mut s = Scenario::new();
    s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
    // Nothing ran yet: bounded by --timeout, 75.
    let start = Instant::now();
    let none = s.run(&["status", "--wait", "--timeout", "1s"]);
    assert_eq!(none.code, 75, "{none:?}");
    assert!(start.elapsed() < Duration::from_secs(10));

    // A run in progress: --wait blocks until it ends, then exits with
    // its code.
    s.behaviour.apply = Mode::Hang;
    let run = s.spawn(&["run"]);
    let t = Instant::now();
    while !s.path("standin/pid-apply").exists() {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let waiting = s.spawn(&["status", "--wait", "--timeout", "60s"]);
    std::thread::sleep(Duration::from_millis(700));
    // SAFETY: a signal to the agent we started.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    let ran = nixos_ami_agent_tests::harness::finish(run, Duration::from_secs(30));
    assert_eq!(ran.code, 75, "{ran:?}");
    let waited = nixos_ami_agent_tests::harness::finish(waiting, Duration::from_secs(30));
    assert_eq!(waited.code, 75, "the run's code: {waited:?}");
    assert!(
        waited.stdout.contains("result:       failed (exit 75)"),
        "{waited:?}"
    );

    // Finished: at once.
    s.behaviour.apply = Mode::Fail;
    assert_eq!(s.run(&["run"]).code, 1);
    let done = s.run(&["status", "--wait"]);
    assert_eq!(done.code, 1, "{done:?}");
}
