//! `nixos-ami-agent fetch` (what nixos-ami-agent-fetch.service runs at
//! boot) and the fetch phase of a run: the closure is downloaded with
//! `fh fetch REF LINK` before the switch, a run finds it there and only
//! switches, and nothing about a fetch can break or change a run.

use nixos_ami_agent_tests::harness::{REF, REF_NEW_KERNEL, Scenario, toml_user_data};
use nixos_ami_agent_tests::ssm::Param;
use nixos_ami_agent_tests::standin::{FlakeHub, Mode};

const PARAM: &str = "/fleets/web/target";

fn scenario(settings: &str) -> Scenario {
    let s = Scenario::new();
    s.user_data(toml_user_data(settings));
    s
}

fn flake() -> String {
    format!("flake = \"{REF}\"")
}

/// The phases a record (a run's, the fetch's) holds, in order.
fn phase_names(record: &serde_json::Value) -> Vec<&str> {
    record["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect()
}

fn fetch_json(s: &Scenario) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(s.path("state/fetch.json")).unwrap()).unwrap()
}

#[test]
fn fetch_downloads_the_closure_and_the_run_only_switches() {
    let s = scenario(&flake());
    let out = s.run(&["fetch"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        s.call_lines(),
        [
            "determinate-nixd login aws".to_owned(),
            format!("fh resolve --json {REF}"),
            s.boot_fetch_line(REF),
        ]
    );
    // Nothing changed: no switch, no state, no history of runs.
    assert_eq!(s.current_system(), s.store_path("old-system"));
    assert!(!s.path("state/state.json").exists());
    assert!(!s.path("state/runs.json").exists());
    let link = std::fs::read_link(s.path("state/fetched-at-boot")).unwrap();
    assert_eq!(link, s.store_path("new-system"));
    let f = fetch_json(&s);
    assert_eq!(f["outcome"], "fetched");
    assert_eq!(
        f["store-path"],
        s.store_path("new-system").display().to_string()
    );
    assert_eq!(f["flake"], REF);
    assert_eq!(phase_names(&f), ["metadata", "login", "resolve", "fetch"]);
    assert!(out.stderr.contains("fetch phases: metadata "), "{out:?}");
    assert_eq!(s.downloads().len(), 1);

    // The run: no second fetch, the closure was there; the root goes once
    // the system profile holds it.
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        s.call_lines()[3..],
        [
            "determinate-nixd login aws".to_owned(),
            format!("fh resolve --json {REF}"),
            format!("fh apply nixos {REF} switch"),
        ]
    );
    assert_eq!(s.downloads().len(), 1, "not downloaded again");
    assert_eq!(s.current_system(), s.store_path("new-system"));
    assert!(std::fs::symlink_metadata(s.path("state/fetched-at-boot")).is_err());
    assert!(
        out.stderr.contains("is here: fetched at boot in "),
        "{out:?}"
    );
    let run = &s.state()["last-run"];
    // The first run of this boot: its phases start with the boot.
    assert_eq!(
        phase_names(run),
        [
            "boot", "metadata", "login", "resolve", "fetch", "switch", "verify", "health"
        ]
    );
    assert!(run["after-boot-ms"].as_u64().is_some(), "{run}");
    let status = s.run(&["status"]);
    assert!(status.stdout.contains("  phases:     boot "), "{status:?}");
    assert!(
        status.stdout.contains("fetch 0 ms (fetched at boot in "),
        "{status:?}"
    );
    assert!(
        status.stdout.contains("last fetch:   fetched at "),
        "{status:?}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&s.run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(json["fetch"]["outcome"], "fetched");
    assert!(json["last-run"]["phases"].is_array());
}

#[test]
fn a_run_without_a_fetch_fetches_first_then_switches() {
    let s = scenario(&flake());
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    let calls = s.call_lines();
    assert_eq!(calls[2], s.fetch_line(REF));
    assert_eq!(calls[3], format!("fh apply nixos {REF} switch"));
    // fh apply copies nothing that is not already there.
    assert_eq!(s.downloads().len(), 1);
    assert!(out.stderr.contains("run phases: boot "), "{out:?}");
    // A second run of the same boot has no boot phase.
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("run phases: metadata "), "{out:?}");
    assert!(s.state()["last-run"]["after-boot-ms"].is_null());
}

#[test]
fn nothing_to_fetch_when_the_system_runs_the_target_or_there_is_none() {
    let s = scenario(&flake());
    assert_eq!(s.run(&["run"]).code, 0);
    let before = s.call_lines().len();
    let out = s.run(&["fetch"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        !s.call_lines()[before..]
            .iter()
            .any(|l| l.starts_with("fh fetch")),
        "{:?}",
        s.call_lines()
    );
    assert_eq!(fetch_json(&s)["outcome"], "nothing");
    assert!(out.stderr.contains("nothing to fetch: "), "{out:?}");

    let s = Scenario::new();
    let out = s.run(&["fetch"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(s.calls().is_empty());
    assert_eq!(fetch_json(&s)["message"], "nothing to fetch: no target");
}

#[test]
fn bad_user_data_fetches_nothing() {
    let s = scenario("flake = \"my-org/web/0.1#x\"\naction = \"swtich\"");
    let out = s.run(&["fetch"]);
    assert_eq!(out.code, 65, "{out:?}");
    assert!(s.calls().is_empty());
    let f = fetch_json(&s);
    assert_eq!(f["outcome"], "failed");
    assert!(
        f["message"].as_str().unwrap().contains("key `action`"),
        "{f}"
    );
    assert!(!s.path("state/state.json").exists());
}

/// A fetch that fails exits non-zero (the unit records it, `ExecStart=-`)
/// and leaves nothing behind; the run fetches and switches anyway.
#[test]
fn a_failed_fetch_changes_nothing_and_the_run_still_converges() {
    let mut s = scenario(&flake());
    s.behaviour.fetch = Mode::Fail;
    let out = s.run(&["fetch"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("fetch failed: fetch: fh fetch failed (exit status 1)"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("the run fetches what is missing"),
        "{out:?}"
    );
    assert_eq!(fetch_json(&s)["outcome"], "failed");
    assert!(std::fs::symlink_metadata(s.path("state/fetched-at-boot")).is_err());
    // The run's own fetch fails too; fh apply downloads.
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("fetching failed (fetch: fh fetch failed (exit status 1)); fh apply fetches what is missing"),
        "{out:?}"
    );
    assert_eq!(s.current_system(), s.store_path("new-system"));
    assert_eq!(s.downloads().len(), 1);
}

/// As strict as fh: `fh fetch` starts `nix` from its PATH; with none
/// there it fails as fh does, and the run still converges or fails
/// exactly as `fh apply` decides.
#[test]
fn fetch_gives_fh_the_systems_nix() {
    let s = scenario(&flake());
    let out = s.run(&["fetch"]);
    assert_eq!(out.code, 0, "{out:?}");
    let nix = s.nix_call_lines();
    assert!(
        nix.iter().any(|l| l.contains(" copy ")
            && l.contains("--from https://cache.flakehub.com/")
            && l.contains(&format!(
                "--out-link {}",
                s.path("state/fetched-at-boot").display()
            ))),
        "{nix:?}"
    );
    let s = scenario(&flake());
    std::fs::remove_file(s.store_path("old-system/sw/bin/nix")).unwrap();
    let out = s.run(&["fetch"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("Could not run nix"), "{out:?}");
}

/// A private flake: FlakeHub gives fh a scoped token only after the login,
/// so the fetch logs in first, as a run does.
#[test]
fn a_private_flake_is_fetched_after_the_login() {
    let mut s = scenario(&flake());
    s.behaviour.private = true;
    let out = s.run(&["fetch"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(fetch_json(&s)["outcome"], "fetched");

    let mut s = scenario(&format!("{}\nlogin = false", flake()));
    s.behaviour.private = true;
    let out = s.run(&["fetch"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(
        out.stderr
            .contains("access to this output reference is not authorized"),
        "{out:?}"
    );
}

/// FlakeHub unreachable: the fetch gives up within its budget (it only
/// saves time) and says so.
#[test]
fn flakehub_unreachable_fails_the_fetch_within_the_budget() {
    let mut s = scenario(&flake());
    s.set_agent("retry-budget", "\"1s\"");
    s.behaviour.flakehub = Some(FlakeHub::Unreachable);
    let out = s.run(&["fetch"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(out.stderr.contains("resolve: gave up after"), "{out:?}");
    assert_eq!(fetch_json(&s)["outcome"], "failed");
}

/// The fetch is read-only towards the state: it neither takes the run's
/// lock nor waits for it, and a rolled-back target is not fetched.
#[test]
fn fetch_does_not_wait_for_a_run_and_skips_a_rejected_target() {
    use std::os::fd::AsRawFd;
    let s = scenario(&flake());
    std::fs::create_dir_all(s.path("state")).unwrap();
    let lock = std::fs::File::create(s.path("state/lock")).unwrap();
    // SAFETY: flock on a file this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let out = s.run(&["fetch"]);
    assert_eq!(out.code, 0, "{out:?}");
    drop(lock);
    std::fs::remove_file(s.path("state/fetched-at-boot")).unwrap();

    let state = serde_json::json!({
        "format": 1,
        "instance-id": "i-0123456789abcdef0",
        "rejected": [{
            "store-path": s.store_path("new-system").display().to_string(),
            "flake": REF,
            "at": "2026-11-30T00:00:00Z",
            "reason": "web.service failed"
        }]
    });
    std::fs::write(s.path("state/state.json"), state.to_string()).unwrap();
    let before = s.call_lines().len();
    let out = s.run(&["fetch"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        !s.call_lines()[before..]
            .iter()
            .any(|l| l.starts_with("fh fetch"))
    );
    assert!(
        fetch_json(&s)["message"]
            .as_str()
            .unwrap()
            .contains("was rolled back at 2026-11-30T00:00:00Z"),
        "{}",
        fetch_json(&s)
    );
}

/// A fetch for a target that is no longer wanted does not keep its
/// closure from the collector: the next run drops the root.
#[test]
fn a_stale_fetch_is_released_by_the_next_run() {
    let s = scenario(&flake());
    assert_eq!(s.run(&["fetch"]).code, 0);
    // The operator names another target before the run.
    s.user_data(toml_user_data(&format!(
        "flake = \"{REF_NEW_KERNEL}\"\nreboot = \"never\""
    )));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(s.current_system(), s.store_path("kernel-system"));
    for link in ["state/fetched", "state/fetched-at-boot"] {
        assert!(std::fs::symlink_metadata(s.path(link)).is_err(), "{link}");
    }
    let downloads: Vec<String> = s.downloads().into_iter().map(|d| d.path).collect();
    assert_eq!(downloads, ["new-system", "kernel-system"]);
}

/// A SecureString target is shown as its placeholder in the fetch's log
/// and record too; fh still gets the real reference.
#[test]
fn a_secure_string_target_stays_secret_in_the_fetch() {
    let secret_ref = "secret-org/hush-hush-flake/0.1#nixosConfigurations.web";
    let mut s = Scenario::new();
    s.user_data(toml_user_data(&format!("ssm-parameter = \"{PARAM}\"")));
    s.ssm.with(|x| {
        x.params.insert(
            PARAM.into(),
            Param::secure(&format!("flake = \"{secret_ref}\"\n"), 2),
        )
    });
    s.behaviour
        .store_paths
        .insert(secret_ref.into(), s.store_path("new-system"));
    let out = s.run(&["fetch"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(s.call_lines().contains(&s.boot_fetch_line(secret_ref)));
    let record = std::fs::read_to_string(s.path("state/fetch.json")).unwrap();
    for (what, text) in [("stderr", &out.stderr), ("fetch.json", &record)] {
        assert!(!text.contains("hush-hush"), "{what}: {text}");
    }
    assert!(
        record.contains(&format!("<SecureString {PARAM}>")),
        "{record}"
    );
}

/// A release published between the run's resolve and its fetch: `fh
/// fetch` (and `fh apply`, which resolves again) would get a store path
/// the run neither decided on nor checked against the rejected ones. The
/// run applies nothing and fails for now (75); the next one decides again.
#[test]
fn a_target_that_moves_during_the_runs_fetch_is_not_applied() {
    let mut s = scenario(&flake());
    s.behaviour.moved_to = Some(s.store_path("kernel-system"));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "resolved to {} but to {} a moment later, while it was being fetched",
            s.store_path("new-system").display(),
            s.store_path("kernel-system").display()
        )),
        "{out:?}"
    );
    assert!(!s.call_lines().iter().any(|l| l.starts_with("fh apply")));
    assert_eq!(s.current_system(), s.store_path("old-system"));
    for link in ["state/fetched", "state/fetched-at-boot"] {
        assert!(std::fs::symlink_metadata(s.path(link)).is_err(), "{link}");
    }
}

/// The run's fetch fails after a while, and meanwhile a release was
/// published: `fh apply` would resolve again and switch to it. The run
/// resolves again first, and applies nothing.
#[test]
fn a_target_that_moves_while_the_runs_fetch_fails_is_not_applied() {
    let mut s = scenario(&flake());
    s.behaviour.fetch = Mode::Fail;
    s.behaviour.moved_to = Some(s.store_path("kernel-system"));
    s.behaviour.resolve_moves_after = 1;
    let out = s.run(&["run"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(out.stderr.contains("after the fetch failed"), "{out:?}");
    assert!(!s.call_lines().iter().any(|l| l.starts_with("fh apply")));
    assert_eq!(s.current_system(), s.store_path("old-system"));
}

/// An apply that fails keeps the fetched closure rooted for the restart,
/// which then only switches; a run that fails before it resolves keeps
/// nothing (it cannot tell what is still wanted).
#[test]
fn a_failed_apply_keeps_the_fetched_closure_for_the_next_run() {
    let mut s = scenario(&flake());
    assert_eq!(s.run(&["fetch"]).code, 0);
    s.behaviour.apply_fail_times = 1;
    let out = s.run(&["run"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(
        std::fs::read_link(s.path("state/fetched-at-boot")).unwrap(),
        s.store_path("new-system")
    );
    let before = s.call_lines().len();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    let again = &s.call_lines()[before..];
    assert!(
        !again.iter().any(|l| l.starts_with("fh fetch")),
        "{again:?}"
    );
    assert_eq!(s.current_system(), s.store_path("new-system"));
    assert!(std::fs::symlink_metadata(s.path("state/fetched-at-boot")).is_err());
    assert_eq!(s.downloads().len(), 1);
}

/// Nix refuses an out-link path that holds something other than a link
/// (addPermRoot: "already exists"); so does the stand-in. The run's fetch
/// fails with a warning, and `fh apply` still converges.
#[test]
fn a_file_in_the_links_place_fails_only_the_fetch() {
    let s = scenario(&flake());
    std::fs::create_dir_all(s.path("state")).unwrap();
    std::fs::write(s.path("state/fetched"), "not a link").unwrap();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("already exists"), "{out:?}");
    assert!(
        out.stderr
            .contains("fetching failed (fetch: fh fetch failed"),
        "{out:?}"
    );
    assert_eq!(s.current_system(), s.store_path("new-system"));
}
