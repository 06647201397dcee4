//! The programs a run drives: login, resolve, apply, verify, and what
//! happens when each fails, hangs, is missing, or lies.

use nixos_ami_agent_tests::harness::{REF, Scenario, host_bin, toml_user_data};
use nixos_ami_agent_tests::standin::Mode;

fn scenario(settings: &str) -> Scenario {
    let s = Scenario::new();
    s.user_data(toml_user_data(settings));
    s
}

fn flake() -> String {
    format!("flake = \"{REF}\"")
}

#[test]
fn login_is_retried_until_it_works() {
    let mut s = scenario(&flake());
    s.behaviour.login_fail_times = 2;
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    let logins = s
        .call_lines()
        .iter()
        .filter(|l| *l == "determinate-nixd login aws")
        .count();
    assert_eq!(logins, 3);
    assert!(
        out.stderr.contains("failed to authenticate to FlakeHub"),
        "determinate-nixd's stderr is passed on: {out:?}"
    );
}

#[test]
fn login_failing_past_the_budget_is_tempfail_and_nothing_applied() {
    let mut s = scenario(&flake());
    s.set_agent("retry-budget", "\"1s\"");
    s.behaviour.login = Mode::Fail;
    let out = s.run(&["run"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(out.stderr.contains("login: gave up after"), "{out:?}");
    assert!(
        s.call_lines()
            .iter()
            .all(|l| l == "determinate-nixd login aws"),
        "{:?}",
        s.call_lines()
    );
    assert_eq!(s.current_system(), s.store_path("old-system"));
    assert_eq!(s.state()["last-run"]["outcome"], "failed");
}

#[test]
fn login_false_skips_login() {
    let s = scenario(&format!("{}\nlogin = false", flake()));
    assert_eq!(s.run(&["run"]).code, 0);
    assert_eq!(
        s.call_lines(),
        [
            format!("fh resolve --json {REF}"),
            s.fetch_line(REF),
            format!("fh apply nixos {REF} switch")
        ]
    );
}

#[test]
fn missing_programs_fail_before_anything_runs() {
    for (program, key) in [("fh", "fh"), ("determinate-nixd", "determinate-nixd")] {
        let mut s = scenario(&flake());
        s.set_agent(
            key,
            &format!("{:?}", s.path("bin/not-there").display().to_string()),
        );
        let out = s.run(&["run"]);
        assert_eq!(out.code, 69, "{program}: {out:?}");
        assert!(
            out.stderr.contains("not-there does not exist"),
            "{program}: {out:?}"
        );
        assert!(s.calls().is_empty(), "{program}: {:?}", s.calls());
    }
}

#[test]
fn resolve_is_retried() {
    let mut s = scenario(&flake());
    s.behaviour.resolve_fail_times = 2;
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        s.call_lines()
            .iter()
            .filter(|l| l.starts_with("fh resolve"))
            .count(),
        3
    );
}

#[test]
fn resolve_printing_garbage_is_a_permanent_failure() {
    let mut s = scenario(&flake());
    s.behaviour.resolve = Mode::BadJson;
    let out = s.run(&["run"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("no usable JSON with a store_path"),
        "{out:?}"
    );
    assert!(!s.call_lines().iter().any(|l| l.starts_with("fh apply")));
}

#[test]
fn apply_failure_exits_1_and_is_recorded() {
    let mut s = scenario(&flake());
    s.behaviour.apply = Mode::Fail;
    let out = s.run(&["run"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("apply: fh apply nixos failed (exit status 1)"),
        "{out:?}"
    );
    let st = s.state();
    assert_eq!(st["last-run"]["outcome"], "failed");
    assert!(
        st["last-run"]["message"]
            .as_str()
            .unwrap()
            .contains("fh apply nixos failed")
    );
    assert!(st.get("last-applied").is_none());
}

/// fh ignores switch-to-configuration's exit status; the agent does not.
#[test]
fn success_without_switching_is_caught_by_verify() {
    // fh sets the system profile before it runs switch-to-configuration
    // (fh `src/cli/cmd/apply/mod.rs`), so for `boot` a failed switch leaves
    // the profile at the target: only the reboot can tell.
    for action in ["switch", "test"] {
        let mut s = scenario(&format!("{}\naction = \"{action}\"", flake()));
        s.behaviour.apply = Mode::NoSwitch;
        let out = s.run(&["run"]);
        assert_eq!(out.code, 1, "{action}: {out:?}");
        assert!(
            out.stderr
                .contains("fh reported success but the system did not switch"),
            "{action}: {out:?}"
        );
        assert_eq!(s.state()["last-run"]["outcome"], "failed");
    }
}

#[test]
fn hanging_apply_is_killed_at_the_timeout() {
    let mut s = scenario(&flake());
    s.set_agent("apply-timeout", "\"1s\"");
    s.behaviour.apply = Mode::Hang;
    let out = s.run(&["run"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(
        out.stderr
            .contains("did not finish within 1s and was killed"),
        "{out:?}"
    );
    assert_eq!(s.state()["last-run"]["outcome"], "failed");
}

#[test]
fn hanging_login_is_killed_and_retried_within_the_budget() {
    let mut s = scenario(&flake());
    s.set_agent("command-timeout", "\"1s\"");
    s.set_agent("retry-budget", "\"2s\"");
    s.behaviour.login = Mode::Hang;
    let out = s.run(&["run"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(out.stderr.contains("login: gave up after"), "{out:?}");
}

#[test]
fn boot_compares_and_verifies_the_profile() {
    let mut s = scenario(&format!("{}\naction = \"boot\"", flake()));
    s.with_bus(true, false);
    assert_eq!(s.run(&["run"]).code, 0);
    assert_eq!(s.system_profile(), s.store_path("new-system"));
    assert_eq!(s.current_system(), s.store_path("old-system"));
    let r = &s.state()["last-run"]["reboot"];
    assert_eq!(r["needed"], true, "boot takes effect at the next boot: {r}");
    assert_eq!(s.reboot_requests(), ["login1.Reboot(false)"]);

    // The reboot did not happen yet (the same boot goes on): nothing to
    // apply, but the reboot is still needed and is asked for again.
    let same_boot = s.run(&["run"]);
    assert_eq!(same_boot.code, 0, "{same_boot:?}");
    assert_eq!(s.reboot_requests().len(), 2, "{same_boot:?}");

    // The reboot did not take (the machine came back on the old system):
    // nothing to apply, and no further request.
    s.new_boot();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("nothing to do: the boot default is already"),
        "{out:?}"
    );
    assert!(out.stderr.contains("already requested"), "{out:?}");
    let applies = s
        .call_lines()
        .iter()
        .filter(|l| l.starts_with("fh apply"))
        .count();
    assert_eq!(applies, 1);
    assert_eq!(s.reboot_requests().len(), 2);
}

#[test]
fn switch_with_a_partial_previous_state_applies_again() {
    // Running system already the target, boot default not: a switch is
    // still needed (someone ran `test`).
    let s = scenario(&flake());
    let current = s.path("run/current-system");
    std::fs::remove_file(&current).unwrap();
    std::os::unix::fs::symlink(s.store_path("new-system"), &current).unwrap();
    assert_eq!(s.run(&["run"]).code, 0);
    assert!(
        s.call_lines()
            .contains(&format!("fh apply nixos {REF} switch"))
    );
    assert_eq!(s.system_profile(), s.store_path("new-system"));
}

#[test]
fn interrupted_run_is_noticed_and_redone() {
    let s = scenario(&flake());
    std::fs::create_dir_all(s.path("state")).unwrap();
    let interrupted = serde_json::json!({
        "format": 1,
        "instance-id": "i-0123456789abcdef0",
        "scripts": [],
        "last-run": {"started": "2026-11-25T10:00:00Z", "outcome": "running", "action": "switch"}
    });
    std::fs::write(s.path("state/state.json"), interrupted.to_string()).unwrap();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("did not finish (crash or power loss)"),
        "{out:?}"
    );
    assert_eq!(s.state()["last-run"]["outcome"], "applied");
}

#[test]
fn unusable_state_is_set_aside_and_the_run_proceeds() {
    let s = scenario(&flake());
    std::fs::create_dir_all(s.path("state")).unwrap();
    std::fs::write(
        s.path("state/state.json"),
        "{\"format\": 1, \"instance-id\": ",
    )
    .unwrap();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("moved to"), "{out:?}");
    assert_eq!(s.state()["last-run"]["outcome"], "applied");
    let aside = std::fs::read_dir(s.path("state")).unwrap().filter(|e| {
        e.as_ref()
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("state.json.unusable-")
    });
    assert_eq!(aside.count(), 1);
}

/// A unit's PATH has no `nix` (nixpkgs `nixos/lib/systemd-lib.nix`), and
/// the harness gives the agent no `nix` on its PATH; fh refuses to apply
/// without `nix` (its stand-in too). The agent must hand fh the system's
/// programs.
#[test]
fn fh_gets_the_systems_programs_on_its_path() {
    let s = scenario(&flake());
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    let system_bin = format!("{}/sw/bin", s.path("run/current-system").display());
    for call in s.calls() {
        let path = call.path.unwrap_or_default();
        let dirs: Vec<&str> = path.split(':').collect();
        assert_eq!(
            dirs[..2],
            ["/run/wrappers/bin", system_bin.as_str()],
            "{} got PATH {path}",
            call.prog
        );
        assert_eq!(dirs[2..], [host_bin()], "then the agent's own PATH");
    }
    let nix = s.nix_call_lines();
    assert!(
        nix.iter()
            .any(|l| l.contains(" build ") && l.contains("--profile")),
        "fh set the profile through the system's nix: {nix:?}"
    );
    assert_eq!(s.current_system(), s.store_path("new-system"));
}

/// The stand-in is as strict as fh: with no `nix` anywhere on its PATH,
/// `fh apply` fails, and the agent says so and changes nothing.
#[test]
fn a_system_without_nix_fails_the_apply_as_fh_would() {
    let s = scenario(&flake());
    std::fs::remove_file(s.store_path("old-system/sw/bin/nix")).unwrap();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("nix is not installed or not on the PATH"),
        "{out:?}"
    );
    assert_eq!(s.current_system(), s.store_path("old-system"));
    assert_eq!(s.system_profile(), s.store_path("old-system"));
}

/// What belongs to the agent alone does not reach fh, determinate-nixd or
/// scripts; proxies and the rest of the environment do.
#[test]
fn agent_only_variables_are_not_passed_on() {
    let mut s = scenario(&flake());
    for (k, v) in [
        ("LD_LIBRARY_PATH", "/nonexistent"),
        ("LISTEN_FDS", "0"),
        ("LISTEN_PID", "1"),
        ("WATCHDOG_USEC", "1000000"),
        ("HTTPS_PROXY", "http://127.0.0.1:9"),
    ] {
        s.env.push((k.into(), v.into()));
    }
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    let calls = s.calls();
    assert!(calls.len() >= 3, "{calls:?}");
    for call in calls {
        for k in [
            "LD_LIBRARY_PATH",
            "LISTEN_FDS",
            "LISTEN_PID",
            "WATCHDOG_USEC",
            "NOTIFY_SOCKET",
        ] {
            assert!(!call.env.iter().any(|e| e == k), "{} got {k}", call.prog);
        }
        assert!(call.env.iter().any(|e| e == "HTTPS_PROXY"), "{}", call.prog);
    }
}
