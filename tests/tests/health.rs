//! The health gate after a switch, and the rollback when it fails. The
//! systemd double on a private bus follows the running system (the
//! stand-ins' `current-system` link), so what it reports changes with a
//! rollback as it would on a machine; `switch-to-configuration` is a
//! stand-in in each system's `bin/`, as on NixOS.

use nixos_ami_agent_tests::harness::{Output, REF, Scenario, toml_user_data};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

const ROLLED_BACK_ID: &str = "71e23dba107e468494c831ed1fa05bbc";

fn scenario(extra: &str) -> Scenario {
    let s = Scenario::new();
    s.user_data(toml_user_data(&format!("flake = \"{REF}\"\n{extra}")));
    s
}

fn applies(s: &Scenario) -> usize {
    s.call_lines()
        .iter()
        .filter(|l| l.starts_with("fh apply"))
        .count()
}

fn assert_rolled_back(s: &Scenario, out: &Output, why: &str) {
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("rolled back to"), "{out:?}");
    assert!(out.stderr.contains(why), "{why}: {out:?}");
    assert!(out.stderr.contains(ROLLED_BACK_ID), "{out:?}");
    assert_eq!(s.current_system(), s.store_path("old-system"));
    assert_eq!(s.system_profile(), s.store_path("old-system"));
    let state = s.state();
    assert_eq!(
        state["last-run"]["health"]["state"], "rolled-back",
        "{state}"
    );
    assert_eq!(
        state["rejected"][0]["store-path"],
        s.store_path("new-system").display().to_string(),
        "{state}"
    );
}

#[test]
fn a_healthy_switch_is_kept() {
    let mut s = scenario("");
    s.units_on("new-system", &[("web.service", "active")]);
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("with action switch; healthy"),
        "{out:?}"
    );
    assert_eq!(s.current_system(), s.store_path("new-system"));
    assert_eq!(
        s.switch_lines(),
        ["switch-to-configuration new-system switch"]
    );
    let state = s.state();
    assert_eq!(state["last-run"]["health"]["state"], "healthy", "{state}");
    assert_eq!(state["last-applied"]["health"]["state"], "healthy");
    assert_eq!(
        state["last-run"]["health"]["previous"],
        s.store_path("old-system").display().to_string()
    );
    assert!(state.get("rejected").is_none(), "{state}");
    assert!(s.nix_call_lines().iter().all(|l| !l.contains("--set")));
}

#[test]
fn a_unit_failed_by_the_switch_is_rolled_back_and_rejected() {
    let mut s = scenario("");
    s.units_on("new-system", &[("web.service", "failed")]);
    let out = s.run(&["run"]);
    assert_rolled_back(&s, &out, "failed units: web.service");
    // The rollback, with the exact argv: the profile back, then the
    // previous system's own switch-to-configuration.
    let profile = s.path("profiles/system");
    let old = s.store_path("old-system");
    assert!(
        s.nix_call_lines().contains(&format!(
            "nix-env --profile {} --set {}",
            profile.display(),
            old.display()
        )),
        "{:?}",
        s.nix_call_lines()
    );
    assert_eq!(
        s.switch_lines(),
        [
            "switch-to-configuration new-system switch",
            "switch-to-configuration old-system switch"
        ]
    );
    let state = s.state();
    let health = &state["last-run"]["health"];
    assert_eq!(
        health["problems"][0], "failed units: web.service",
        "{health}"
    );
    assert!(
        health["rollback"]
            .as_str()
            .unwrap()
            .ends_with("it is healthy"),
        "{health}"
    );
    assert!(
        state["rejected"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("web.service")
    );

    // The next run (the unit's restart, the timer, a boot) does not apply
    // it again: permanent, so not restarted (65).
    let again = s.run(&["run"]);
    assert_eq!(again.code, 65, "{again:?}");
    assert!(again.stderr.contains("was rolled back at"), "{again:?}");
    assert!(again.stderr.contains("forget-rejected"), "{again:?}");
    assert_eq!(applies(&s), 1, "not applied again");
    assert_eq!(s.current_system(), s.store_path("old-system"));

    let status = s.run(&["status"]);
    assert!(
        status.stdout.contains(&format!(
            "rejected:     {} ({REF})",
            s.store_path("new-system").display()
        )),
        "{status:?}"
    );
    assert!(status.stdout.contains("health:     unhealthy, rolled back"));

    // Forgotten: applied again (and rolled back again, still failing).
    let forget = s.run(&[
        "forget-rejected",
        &s.store_path("new-system").display().to_string(),
    ]);
    assert_eq!(forget.code, 0, "{forget:?}");
    let third = s.run(&["run"]);
    assert_eq!(third.code, 1, "{third:?}");
    assert_eq!(applies(&s), 2);
}

#[test]
fn a_new_store_path_for_the_same_target_is_applied() {
    let mut s = scenario("");
    s.units_on("new-system", &[("web.service", "failed")]);
    assert_eq!(s.run(&["run"]).code, 1);
    // The fleet's owner fixed the configuration: same reference, another
    // store path.
    s.add_system("fixed-system");
    s.behaviour
        .store_paths
        .insert(REF.into(), s.store_path("fixed-system"));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(s.current_system(), s.store_path("fixed-system"));
    assert_eq!(applies(&s), 2);
}

#[test]
fn forget_rejected_names_what_it_forgets() {
    let mut s = scenario("");
    s.units_on("new-system", &[("web.service", "failed")]);
    assert_eq!(s.run(&["run"]).code, 1);
    let unknown = s.run(&["forget-rejected", "/nix/store/not-rejected"]);
    assert_eq!(unknown.code, 64, "{unknown:?}");
    assert!(unknown.stderr.contains("is not rejected"), "{unknown:?}");
    let all = s.run(&["forget-rejected"]);
    assert_eq!(all.code, 0, "{all:?}");
    assert!(all.stdout.contains("forgot "), "{all:?}");
    assert!(s.state().get("rejected").is_none());
    let none = s.run(&["forget-rejected"]);
    assert!(none.stdout.contains("nothing rejected"), "{none:?}");
}

#[test]
fn a_unit_that_failed_before_the_apply_is_not_blamed() {
    let mut s = scenario("");
    s.units_on("old-system", &[("legacy.service", "failed")]);
    s.units_on("new-system", &[("legacy.service", "failed")]);
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        s.state()["last-run"]["health"]["failed-before"][0],
        "legacy.service"
    );
}

#[test]
fn required_units_must_be_active() {
    let mut s = scenario("[health]\nrequired-units = [\"web.service\", \"db.service\"]");
    s.units_on(
        "new-system",
        &[("web.service", "active"), ("db.service", "inactive")],
    );
    let out = s.run(&["run"]);
    assert_rolled_back(&s, &out, "required unit db.service is inactive, not active");

    // A unit that does not exist at all is not active either.
    let mut s = scenario("[health]\nrequired-units = [\"missing.service\"]");
    s.units_on("new-system", &[]);
    let out = s.run(&["run"]);
    assert_rolled_back(&s, &out, "required unit missing.service: no such unit");

    let mut s = scenario("[health]\nrequired-units = [\"web.service\"]");
    s.units_on("new-system", &[("web.service", "active")]);
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
}

/// `commands` come from the image's config file only.
fn with_command(s: &mut Scenario, script: &str) {
    let path = s.path("check.sh");
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    s.defaults = format!(
        "[health]\ntimeout = \"5s\"\ncommands = [{{ argv = [\"{}\", \"--probe\"], timeout = \"2s\" }}]\n",
        path.display()
    );
}

#[test]
fn a_command_check_passes_fails_or_passes_after_retries() {
    let mut s = scenario("");
    with_command(&mut s, "exit 0");
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");

    let mut s = scenario("");
    with_command(&mut s, "echo 'web: not ready' >&2; exit 3");
    let out = s.run(&["run"]);
    assert_rolled_back(&s, &out, "--probe failed: exit status 3");
    assert!(
        out.stderr.contains("web: not ready"),
        "its output is logged: {out:?}"
    );

    // Comes up on the third attempt: retried within health.timeout.
    let mut s = scenario("");
    let count = s.path("attempts");
    with_command(
        &mut s,
        &format!(
            "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; [ $n -ge 3 ]",
            c = count.display()
        ),
    );
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(std::fs::read_to_string(&count).unwrap().trim(), "3");
}

#[test]
fn user_data_may_not_add_commands() {
    let s = scenario("[health]\ncommands = [{ argv = [\"/bin/true\"] }]");
    let out = s.run(&["run"]);
    assert_eq!(out.code, 65, "{out:?}");
    assert!(
        out.stderr.contains(
            "user data: key `health.commands`: can only be set in the image's config file"
        ),
        "{out:?}"
    );
    assert_eq!(applies(&s), 0, "nothing applied on bad input");
}

/// A local HTTP server answering `status` for the first `bad` requests,
/// then 200.
fn http_server(status: u16, bad: u32) -> (String, Arc<AtomicU32>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/health", listener.local_addr().unwrap());
    let seen = Arc::new(AtomicU32::new(0));
    let count = seen.clone();
    std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            let code = if n <= bad { status } else { 200 };
            let _ = write!(
                c,
                "HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    (url, seen)
}

#[test]
fn an_http_probe_passes_fails_or_passes_within_the_grace() {
    let (url, _) = http_server(500, 0);
    let s = scenario(&format!("[health]\nhttp = [{{ url = \"{url}\" }}]"));
    assert_eq!(s.run(&["run"]).code, 0);

    let (url, seen) = http_server(503, u32::MAX);
    let s = scenario(&format!(
        "[health]\ntimeout = \"3s\"\nhttp = [{{ url = \"{url}\", timeout = \"1s\" }}]"
    ));
    let out = s.run(&["run"]);
    assert_rolled_back(&s, &out, "HTTP 503");
    assert!(seen.load(Ordering::SeqCst) >= 2, "retried");

    let (url, seen) = http_server(503, 2);
    let s = scenario(&format!(
        "[health]\ntimeout = \"20s\"\nhttp = [{{ url = \"{url}\" }}]"
    ));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(seen.load(Ordering::SeqCst), 3);

    // Nothing listening: refused, unhealthy.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = scenario(&format!(
        "[health]\ntimeout = \"2s\"\nhttp = [{{ url = \"http://127.0.0.1:{port}/\" }}]"
    ));
    let out = s.run(&["run"]);
    assert_rolled_back(&s, &out, "connection refused");
}

#[test]
fn an_http_probe_elsewhere_is_refused() {
    let s = scenario("[health]\nhttp = [{ url = \"http://192.0.2.1/healthz\" }]");
    let out = s.run(&["run"]);
    assert_eq!(out.code, 65, "{out:?}");
    assert!(
        out.stderr.contains("the host is not this machine"),
        "{out:?}"
    );
    assert_eq!(applies(&s), 0);
}

#[test]
fn unhealthy_but_kept_when_rollback_is_off() {
    let mut s = scenario("[health]\nrollback = false");
    s.units_on("new-system", &[("web.service", "failed")]);
    let out = s.run(&["run"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("kept (health.rollback = false)"),
        "{out:?}"
    );
    assert_eq!(s.current_system(), s.store_path("new-system"));
    let state = s.state();
    assert_eq!(state["last-run"]["health"]["state"], "unhealthy");
    assert!(state.get("rejected").is_none(), "{state}");
    assert_eq!(s.switch_lines().len(), 1, "no rollback");
}

#[test]
fn the_gate_waits_for_the_job_queue() {
    // Restarts still running for a few polls, and the agent's own boot
    // job with multi-user.target waiting for it (first boot): settles.
    let mut s = scenario("");
    s.behaviour.busy_polls = 4;
    s.behaviour.booting = true;
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");

    // The agent's other unit waiting for this run's lock (a switch
    // started a failed boot unit again): not waited for.
    let mut s = scenario("[health]\ntimeout = \"3s\"");
    s.behaviour.sibling_waiting = true;
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");

    // A queue that never drains: not settled within health.timeout.
    let mut s = scenario("[health]\ntimeout = \"2s\"");
    s.behaviour.busy_polls = u32::MAX;
    let out = s.run(&["run"]);
    assert_rolled_back(&s, &out, "systemd did not settle within");
    assert!(out.stderr.contains("restarting.service"), "{out:?}");
}

#[test]
fn without_systemd_on_the_bus_the_gate_cannot_pass() {
    let mut s = scenario("[health]\ntimeout = \"3s\"");
    s.without_bus();
    let out = s.run(&["run"]);
    assert_rolled_back(&s, &out, "cannot reach systemd over the system D-Bus");
}

#[test]
fn boot_is_not_judged_before_the_reboot() {
    let mut s = scenario("action = \"boot\"\nreboot = \"never\"");
    s.units_on("new-system", &[("web.service", "failed")]);
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(s.state()["last-run"]["health"]["state"], "awaiting-boot");
    assert_eq!(s.switch_lines().len(), 1, "no rollback");
}

#[test]
fn boot_is_judged_after_the_reboot_and_rolled_back_with_one_more() {
    let mut s = scenario("action = \"boot\"");
    s.with_bus(true, false);
    s.units_on("new-system", &[("web.service", "failed")]);
    let first = s.run(&["run"]);
    assert_eq!(first.code, 0, "{first:?}");
    assert_eq!(
        s.state()["last-applied"]["health"]["state"],
        "awaiting-boot"
    );
    assert_eq!(s.reboot_requests().len(), 1);

    // Not judged in the same boot (the reboot is asked for again).
    let same_boot = s.run(&["run"]);
    assert_eq!(same_boot.code, 0, "{same_boot:?}");
    assert_eq!(
        s.state()["last-applied"]["health"]["state"],
        "awaiting-boot"
    );
    assert_eq!(s.reboot_requests().len(), 2);

    s.reboot_into_profile();
    let after = s.run(&["run"]);
    assert_eq!(after.code, 1, "{after:?}");
    assert!(
        after.stderr.contains("unhealthy after booting into"),
        "{after:?}"
    );
    assert!(after.stderr.contains(ROLLED_BACK_ID), "{after:?}");
    assert_eq!(
        s.switch_lines().last().unwrap(),
        "switch-to-configuration old-system boot"
    );
    assert_eq!(s.system_profile(), s.store_path("old-system"));
    assert_eq!(s.reboot_requests().len(), 3, "one reboot back");
    let state = s.state();
    assert_eq!(state["last-applied"]["health"]["state"], "rolled-back");
    assert_eq!(state["last-run"]["reboot"]["requested"], true, "{state}");
    // Judged before anything else: no login, no resolve in that run.
    assert_eq!(
        s.call_lines()
            .iter()
            .filter(|l| l.starts_with("determinate-nixd"))
            .count(),
        2,
        "{:?}",
        s.call_lines()
    );

    // Back on the previous system: the target is rejected, nothing is
    // applied, and no further reboot (no loop).
    s.reboot_into_profile();
    let back = s.run(&["run"]);
    assert_eq!(back.code, 65, "{back:?}");
    assert!(back.stderr.contains("was rolled back at"), "{back:?}");
    assert_eq!(s.reboot_requests().len(), 3);
    assert_eq!(applies(&s), 1);
    assert_eq!(s.current_system(), s.store_path("old-system"));
}

#[test]
fn a_healthy_boot_is_confirmed_once() {
    let mut s = scenario("action = \"boot\"");
    s.with_bus(true, false);
    assert_eq!(s.run(&["run"]).code, 0);
    s.reboot_into_profile();
    let after = s.run(&["run"]);
    assert_eq!(after.code, 0, "{after:?}");
    assert!(
        after
            .stderr
            .contains("checking its health before anything else")
    );
    assert!(after.stderr.contains("nothing to do"), "{after:?}");
    assert_eq!(s.state()["last-applied"]["health"]["state"], "healthy");
    let again = s.run(&["run"]);
    assert!(!again.stderr.contains("checking its health"), "{again:?}");
}

#[test]
fn a_switch_that_needs_a_reboot_is_judged_before_and_after_it() {
    let s = Scenario::new();
    s.user_data(toml_user_data(&format!(
        "flake = \"{}\"",
        nixos_ami_agent_tests::harness::REF_NEW_KERNEL
    )));
    let mut s = s;
    s.with_bus(true, false);
    let first = s.run(&["run"]);
    assert_eq!(first.code, 0, "{first:?}");
    assert!(first.stdout.contains("healthy"), "{first:?}");
    assert_eq!(
        s.state()["last-applied"]["health"]["state"],
        "awaiting-boot"
    );
    // The new kernel brings a failing unit.
    s.units_on("kernel-system", &[("driver.service", "failed")]);
    s.reboot_into_profile();
    let after = s.run(&["run"]);
    assert_eq!(after.code, 1, "{after:?}");
    assert!(after.stderr.contains("failed units: driver.service"));
    assert_eq!(s.system_profile(), s.store_path("old-system"));
    assert_eq!(s.reboot_requests().len(), 2);
}

#[test]
fn a_gate_that_did_not_finish_is_run_by_the_next_run() {
    let mut s = scenario("");
    let ready = s.path("ready");
    let started = s.path("check-started");
    with_command(
        &mut s,
        &format!(
            "touch {}; while [ ! -e {} ]; do sleep 0.1; done",
            started.display(),
            ready.display()
        ),
    );
    s.defaults = s.defaults.replace("timeout = \"2s\"", "timeout = \"60s\"");
    s.defaults = s.defaults.replace("timeout = \"5s\"", "timeout = \"60s\"");
    let child = s.spawn(&["run"]);
    let t = std::time::Instant::now();
    while !started.exists() {
        assert!(t.elapsed() < std::time::Duration::from_secs(30));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: a signal to the agent we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = nixos_ami_agent_tests::harness::finish(child, std::time::Duration::from_secs(30));
    assert_eq!(out.code, 75, "{out:?}");
    assert_eq!(s.state()["last-applied"]["health"]["state"], "pending");

    std::fs::write(&ready, "").unwrap();
    let next = s.run(&["run"]);
    assert_eq!(next.code, 0, "{next:?}");
    assert!(
        next.stderr.contains("checking health after the switch"),
        "{next:?}"
    );
    assert_eq!(s.state()["last-applied"]["health"]["state"], "healthy");
    assert_eq!(applies(&s), 1, "judged, not applied again");
}

fn signal_when(child: &std::process::Child, seen: impl Fn() -> bool) {
    let t = std::time::Instant::now();
    while !seen() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "never saw it"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: a signal to the agent we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

#[test]
fn a_rollback_stopped_halfway_is_finished_by_the_next_run() {
    let mut s = scenario("");
    s.units_on("new-system", &[("web.service", "failed")]);
    s.behaviour.switch_hang = Some("old-system".into());
    let child = s.spawn(&["run"]);
    signal_when(&child, || {
        s.switch_lines()
            .iter()
            .any(|l| l.ends_with("old-system switch"))
    });
    let out = nixos_ami_agent_tests::harness::finish(child, std::time::Duration::from_secs(30));
    assert_eq!(out.code, 75, "{out:?}");
    assert!(out.stderr.contains("the next run finishes it"), "{out:?}");
    let state = s.state();
    assert_eq!(
        state["last-run"]["health"]["state"], "rolling-back",
        "{state}"
    );
    assert!(
        state["rejected"][0]["store-path"].is_string(),
        "rejected at once"
    );
    assert_eq!(s.current_system(), s.store_path("new-system"));

    s.behaviour.switch_hang = None;
    let next = s.run(&["run"]);
    assert_eq!(next.code, 1, "{next:?}");
    assert!(
        next.stderr.contains("did not finish; finishing it"),
        "{next:?}"
    );
    assert!(
        !next.stderr.contains("checking health after the switch"),
        "the verdict stands: {next:?}"
    );
    assert_eq!(s.current_system(), s.store_path("old-system"));
    assert_eq!(s.state()["last-applied"]["health"]["state"], "rolled-back");
    assert_eq!(applies(&s), 1);
    assert!(
        !next.stderr.contains("determinate-nixd"),
        "before anything else: {next:?}"
    );
}

#[test]
fn a_failed_rollback_is_tried_again() {
    let mut s = scenario("");
    s.units_on("new-system", &[("web.service", "failed")]);
    s.behaviour.switch_fail = Some("old-system".into());
    let out = s.run(&["run"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("the rollback to"), "{out:?}");
    assert_eq!(s.current_system(), s.store_path("new-system"));
    assert_eq!(s.state()["last-run"]["health"]["state"], "rolling-back");
    // Still the rejected system running: the next run does not call it
    // nothing to do, it finishes the rollback.
    s.behaviour.switch_fail = None;
    let next = s.run(&["run"]);
    assert_eq!(next.code, 1, "{next:?}");
    assert_eq!(s.current_system(), s.store_path("old-system"));
    assert_eq!(s.state()["last-applied"]["health"]["state"], "rolled-back");
}

#[test]
fn a_run_that_died_after_the_switch_is_judged_by_the_next() {
    let mut s = scenario("");
    s.units_on("new-system", &[("web.service", "failed")]);
    s.behaviour.apply = nixos_ami_agent_tests::standin::Mode::KillAgent;
    let out = s.run(&["run"]);
    assert_ne!(out.code, 0, "{out:?}");
    assert_eq!(s.current_system(), s.store_path("new-system"));
    s.behaviour.apply = nixos_ami_agent_tests::standin::Mode::Ok;
    let next = s.run(&["run"]);
    assert_eq!(next.code, 1, "{next:?}");
    assert!(
        next.stderr.contains("checking health after the switch"),
        "{next:?}"
    );
    assert_eq!(s.current_system(), s.store_path("old-system"));
    assert_eq!(applies(&s), 1, "judged, not applied again");
}

#[test]
fn a_boot_gate_that_did_not_finish_resumes_as_one() {
    let mut s = scenario("action = \"boot\"");
    s.with_bus(true, false);
    assert_eq!(s.run(&["run"]).code, 0);
    s.reboot_into_profile();
    let started = s.path("check-started");
    let ready = s.path("ready");
    with_command(
        &mut s,
        &format!(
            "touch {}; while [ ! -e {} ]; do sleep 0.1; done; exit 1",
            started.display(),
            ready.display()
        ),
    );
    let child = s.spawn(&["run"]);
    signal_when(&child, || started.exists());
    let out = nixos_ami_agent_tests::harness::finish(child, std::time::Duration::from_secs(30));
    assert_eq!(out.code, 75, "{out:?}");
    assert_eq!(s.state()["last-applied"]["health"]["state"], "pending");
    std::fs::write(&ready, "").unwrap();
    let next = s.run(&["run"]);
    assert_eq!(next.code, 1, "{next:?}");
    assert!(
        next.stderr.contains("unhealthy after booting into"),
        "{next:?}"
    );
    assert_eq!(
        s.switch_lines().last().unwrap(),
        "switch-to-configuration old-system boot",
        "rolled back as the boot default, not in place"
    );
    assert_eq!(s.reboot_requests().len(), 2, "and the reboot back");
}

#[test]
fn the_reboot_back_is_asked_until_it_happens_but_never_loops() {
    let mut s = scenario("action = \"boot\"");
    s.with_bus(true, false);
    assert_eq!(s.run(&["run"]).code, 0);
    s.units_on("new-system", &[("web.service", "failed")]);
    s.reboot_into_profile();
    // Nobody takes the reboot back (no logind, systemd refuses).
    s.with_bus(false, false);
    let out = s.run(&["run"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(s.system_profile(), s.store_path("old-system"));
    assert!(s.reboot_requests().is_empty());
    // Same boot, still the rejected system: asked again, before anything.
    s.with_bus(true, false);
    let again = s.run(&["run"]);
    assert_eq!(again.code, 1, "{again:?}");
    assert!(
        again.stderr.contains("the reboot back was not carried out"),
        "{again:?}"
    );
    assert_eq!(s.reboot_requests().len(), 1);
    // The machine rebooted, but came back on the rejected system (its
    // boot loader did not take the previous one): no loop.
    s.new_boot();
    let later = s.run(&["run"]);
    assert!(later.stderr.contains("not rebooting again"), "{later:?}");
    assert_eq!(s.reboot_requests().len(), 1, "{later:?}");
}

#[test]
fn the_gate_ends_at_its_timeout_whatever_the_checks_say() {
    // A probe that accepts and never answers, with a long own timeout.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = vec![];
        for c in listener.incoming().flatten() {
            held.push(c);
        }
    });
    let s = scenario(&format!(
        "[health]\ntimeout = \"2s\"\nhttp = [{{ url = \"{url}\", timeout = \"10m\" }}, {{ url = \"{url}\", timeout = \"10m\" }}]"
    ));
    let start = std::time::Instant::now();
    let out = s.run(&["run"]);
    assert_rolled_back(&s, &out, "no answer within");
    assert!(
        out.stderr.contains("not checked: health.timeout ran out"),
        "{out:?}"
    );
    // Two gates (the target's, then the previous system's), 2 s each.
    assert!(
        start.elapsed() < std::time::Duration::from_secs(12),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn no_scripts_after_a_rollback() {
    let mut s = Scenario::new();
    let marker = s.path("script-ran");
    s.user_data(format!(
        "Content-Type: multipart/mixed; boundary=\"B\"\nMIME-Version: 1.0\n\n\
         --B\nContent-Type: text/x-nixos-ami-agent\n\nflake = \"{REF}\"\n\
         --B\nContent-Type: text/x-shellscript\n\n#!/bin/sh\ntouch {}\n--B--\n",
        marker.display()
    ));
    s.units_on("new-system", &[("web.service", "failed")]);
    assert_eq!(s.run(&["run"]).code, 1);
    assert!(!marker.exists());
    assert_eq!(s.run(&["run"]).code, 65);
    assert!(!marker.exists(), "nor for a rejected target");
}
