//! Boot tests: the agent under a real systemd (PID 1 in a systemd-nspawn
//! container), started by the repository's unit files. Ignored by plain
//! `cargo test` (they need root, systemd-nspawn and a Debian rootfs);
//! `scripts/test` runs them with `--ignored` when the machine allows and
//! says loudly when it does not.

use nixos_ami_agent_tests::container::{
    BOOT_UNIT, Container, FETCH_UNIT, INSTANCE_ID, REF, REF_BROKEN, REF_BROKEN_AFTER_REBOOT,
    REF_NEW_KERNEL, REF_NEXT, unavailable,
};
use nixos_ami_agent_tests::harness::toml_user_data;
use nixos_ami_agent_tests::imds::TOKEN_PREFIX;
use nixos_ami_agent_tests::standin::Mode;
use std::time::Duration;

const APPLIED: &str = "3f88d658b85143fcbb03f62a0a791e73";
const NOTHING_TO_DO: &str = "9e9b458c8dc141e9a75f3eb338906dc8";
const FAILED: &str = "07dbe6e6e7384bc8a3aedd0784ddc7c8";
const ROLLED_BACK: &str = "71e23dba107e468494c831ed1fa05bbc";
const PHASES: &str = "d83fcfe263434edda3992e11922913c2";
const FETCHED: &str = "0aa4216b344d48ac89b65ded8963555c";
const FAKE_STORE: &str = "/var/lib/fake-nixos/store";
const LIMIT: Duration = Duration::from_secs(120);

fn skip() -> bool {
    if let Some(why) = unavailable() {
        eprintln!("SKIPPED: container boot tests cannot run here: {why}");
        return true;
    }
    false
}

fn events<'a>(journal: &'a [serde_json::Value], id: &str) -> Vec<&'a serde_json::Value> {
    journal.iter().filter(|e| e["MESSAGE_ID"] == id).collect()
}

fn field<'a>(e: &'a serde_json::Value, key: &str) -> &'a str {
    e[key].as_str().unwrap_or("")
}

#[test]
#[ignore = "boots containers: needs root and systemd-nspawn (scripts/test runs it)"]
fn first_boot_applies_then_second_boot_finds_nothing_to_do() {
    if skip() {
        return;
    }
    let mut c = Container::new(Some(&toml_user_data(&format!("flake = \"{REF}\""))));
    // The boot takes longer than the download: the boot's fetch has the
    // closure in the store before the boot run starts.
    c.behaviour.download_ms = 500;
    c.slow_boot(3.0);
    let code = c.boot(LIMIT, |_| {});
    assert_eq!(code, 0, "{}", c.console());
    assert_eq!(
        c.call_lines_in(FETCH_UNIT),
        [
            "determinate-nixd login aws".to_owned(),
            format!("fh resolve --json {REF}"),
            format!("fh fetch {REF} /var/lib/nixos-ami-agent/fetched-at-boot"),
        ],
        "{}",
        c.journal_text()
    );
    assert_eq!(
        c.call_lines_in(BOOT_UNIT),
        [
            "determinate-nixd login aws".to_owned(),
            format!("fh resolve --json {REF}"),
            format!("fh apply nixos {REF} switch"),
        ],
        "the boot run found the closure fetched and only switched:\n{}",
        c.journal_text()
    );
    let downloads = c.downloads();
    assert_eq!(downloads.len(), 1, "{downloads:?}");
    assert_eq!(downloads[0].path, "new-system");
    assert_eq!(downloads[0].unit.as_deref(), Some(FETCH_UNIT));
    assert!(
        !c.path("/var/lib/nixos-ami-agent/fetched-at-boot").exists(),
        "the GC root is dropped once the system profile holds the closure"
    );
    let boots = c.boot_ids();
    assert_eq!(boots.len(), 1);
    assert_eq!(
        c.show(&boots[0], "Result"),
        "success",
        "{}",
        c.report(&boots[0]).0
    );
    assert_eq!(c.show(&boots[0], "ExecMainStatus"), "0");
    let journal = c.journal();
    let applied = events(&journal, APPLIED);
    assert_eq!(applied.len(), 1, "{}", c.journal_text());
    let e = applied[0];
    assert_eq!(field(e, "INSTANCE_ID"), INSTANCE_ID);
    assert_eq!(field(e, "FLAKE_REF"), REF);
    assert_eq!(
        field(e, "STORE_PATH"),
        "/var/lib/fake-nixos/store/new-system"
    );
    assert_eq!(field(e, "SYSLOG_IDENTIFIER"), "nixos-ami-agent");
    let fh_lines: Vec<_> = journal
        .iter()
        .filter(|e| field(e, "STEP") == "apply" && field(e, "STREAM") == "stderr")
        .collect();
    assert!(
        fh_lines
            .iter()
            .any(|e| field(e, "MESSAGE").starts_with("applying ")),
        "fh's output lands in the journal tagged with its step:\n{}",
        c.journal_text()
    );
    println!(
        "systemctl status after the first boot:\n{}",
        c.report(&boots[0]).0
    );

    // Where the first boot's time went, in the journal and in `status`.
    let phases: Vec<_> = events(&journal, PHASES)
        .into_iter()
        .map(|e| (field(e, "_SYSTEMD_UNIT"), field(e, "PHASES_MS")))
        .collect();
    assert_eq!(phases.len(), 2, "{phases:?}");
    let run_phases = phases
        .iter()
        .find(|(u, _)| *u == BOOT_UNIT)
        .map(|(_, p)| *p)
        .unwrap();
    let names: Vec<&str> = run_phases
        .split(' ')
        .map(|p| p.split('=').next().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "boot", "metadata", "login", "resolve", "fetch", "switch", "verify", "health"
        ],
        "{run_phases}"
    );
    let state = c.state();
    assert!(
        state["last-run"]["after-boot-ms"].as_u64().unwrap() > 3000,
        "converged after the 3 s boot: {state}"
    );
    let fetch_note = state["last-run"]["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["phase"] == "fetch")
        .and_then(|p| p["note"].as_str())
        .unwrap_or_default()
        .to_owned();
    assert!(fetch_note.starts_with("fetched at boot in "), "{state}");
    assert_eq!(c.reported(&boots[0], "fetch", "Result"), "success");
    assert_eq!(c.reported(&boots[0], "fetch", "ExecMainStatus"), "0");
    println!(
        "boot to converged: {:?}; phases: {run_phases}",
        c.boot_to_converged(&boots[0])
    );

    // Second boot of the same instance.
    let code = c.boot(LIMIT, |_| {});
    assert_eq!(code, 0, "{}", c.console());
    let fetched: Vec<_> = events(&c.journal(), FETCHED)
        .into_iter()
        .map(|e| {
            (
                field(e, "OUTCOME").to_owned(),
                field(e, "MESSAGE").to_owned(),
            )
        })
        .collect();
    assert_eq!(fetched.len(), 2, "{fetched:?}");
    assert_eq!(fetched[1].0, "nothing", "{fetched:?}");
    assert_eq!(c.downloads().len(), 1, "nothing downloaded again");
    assert_eq!(
        c.call_lines()
            .iter()
            .filter(|l| l.starts_with("fh apply"))
            .count(),
        1,
        "not re-applied"
    );
    let journal = c.journal();
    let boots = c.boot_ids();
    assert_eq!(boots.len(), 2);
    let nothing: Vec<_> = events(&journal, NOTHING_TO_DO)
        .into_iter()
        .filter(|e| field(e, "_BOOT_ID") == boots[1])
        .collect();
    assert_eq!(nothing.len(), 1, "{}", c.journal_text());
    assert!(
        field(nothing[0], "MESSAGE")
            .contains("nothing to do: the running system and the boot default are already")
    );
    assert_eq!(c.show(&boots[1], "Result"), "success");
}

#[test]
#[ignore = "boots containers: needs root and systemd-nspawn (scripts/test runs it)"]
fn bad_user_data_fails_with_65_and_is_not_restarted() {
    if skip() {
        return;
    }
    let mut c = Container::new(Some(&toml_user_data(
        "flake = \"my-org/web/0.1#x\"\naction = \"swtich\"",
    )));
    assert_eq!(c.boot(LIMIT, |_| {}), 0, "{}", c.console());
    let boot = &c.boot_ids()[0];
    assert_eq!(c.show(boot, "Result"), "exit-code", "{}", c.report(boot).0);
    assert_eq!(c.show(boot, "ExecMainStatus"), "65");
    assert_eq!(
        c.show(boot, "NRestarts"),
        "0",
        "65 is permanent: RestartPreventExitStatus"
    );
    // Only the boot's own activation of the booted system ran.
    assert!(
        c.calls()
            .iter()
            .all(|x| x.prog == "switch-to-configuration" && x.argv == ["old-system", "test"]),
        "{:?}",
        c.calls()
    );
    let journal = c.journal();
    let failed = events(&journal, FAILED);
    assert_eq!(failed.len(), 1, "{}", c.journal_text());
    assert!(
        field(failed[0], "MESSAGE").contains("user data: key `action`"),
        "{}",
        c.journal_text()
    );
    assert_eq!(field(failed[0], "EXIT_CODE"), "65");
    assert_eq!(field(failed[0], "INSTANCE_ID"), INSTANCE_ID);
    assert!(
        c.report(boot)
            .0
            .contains("Status: \"failed: user data: key `action`"),
        "{}",
        c.report(boot).0
    );
}

#[test]
#[ignore = "boots containers: needs root and systemd-nspawn (scripts/test runs it)"]
fn imds_late_by_seconds_is_waited_for() {
    if skip() {
        return;
    }
    let mut c = Container::new(Some(&toml_user_data(&format!("flake = \"{REF}\""))));
    c.write_doubles_config(4000);
    assert_eq!(c.boot(LIMIT, |_| {}), 0, "{}", c.console());
    let boot = &c.boot_ids()[0];
    assert_eq!(c.show(boot, "Result"), "success", "{}", c.journal_text());
    assert_eq!(
        c.show(boot, "NRestarts"),
        "0",
        "waited within the run, no restart"
    );
    assert_eq!(
        events(&c.journal(), APPLIED).len(),
        1,
        "{}",
        c.journal_text()
    );
    assert!(
        c.journal_text().contains("cannot connect"),
        "{}",
        c.journal_text()
    );
}

#[test]
#[ignore = "boots containers: needs root and systemd-nspawn (scripts/test runs it)"]
fn fh_failing_twice_is_restarted_by_systemd_and_succeeds() {
    if skip() {
        return;
    }
    let mut c = Container::new(Some(&toml_user_data(&format!("flake = \"{REF}\""))));
    c.behaviour.apply_fail_times = 2;
    assert_eq!(c.boot(LIMIT, |_| {}), 0, "{}", c.console());
    let boot = &c.boot_ids()[0];
    let (status, show) = c.report(boot);
    assert_eq!(
        c.show(boot, "NRestarts"),
        "2",
        "{status}\n{show}\n{}",
        c.journal_text()
    );
    assert_eq!(c.show(boot, "Result"), "success", "{}", c.report(boot).0);
    let journal = c.journal();
    assert_eq!(events(&journal, FAILED).len(), 2, "{}", c.journal_text());
    assert_eq!(events(&journal, APPLIED).len(), 1);
    assert_eq!(
        c.call_lines()
            .iter()
            .filter(|l| l.starts_with("fh apply"))
            .count(),
        3
    );
    println!("systemctl status after two restarts:\n{status}");
}

#[test]
#[ignore = "boots containers: needs root and systemd-nspawn (scripts/test runs it)"]
fn new_kernel_reboots_and_the_next_boot_finds_it_done() {
    if skip() {
        return;
    }
    let mut c = Container::new(Some(&toml_user_data(&format!(
        "flake = \"{REF_NEW_KERNEL}\""
    ))));
    assert_eq!(c.boot(LIMIT, |_| {}), 0, "{}", c.console());
    assert_eq!(
        c.boots,
        2,
        "the container rebooted once:\n{}",
        c.journal_text()
    );
    let boots = c.boot_ids();
    assert_eq!(boots.len(), 2);
    let journal = c.journal();
    let on = |boot: &str, id: &str| {
        events(&journal, id)
            .into_iter()
            .filter(|e| field(e, "_BOOT_ID") == boot)
            .count()
    };
    assert_eq!(on(&boots[0], APPLIED), 1, "{}", c.journal_text());
    // The agent's own "reboot requested from logind" races the shutdown
    // that stops it, so the proof that logind (not the systemd fallback)
    // took the request is logind's own journal entry on the first boot.
    assert!(
        c.journal_text().contains("requesting a reboot: kernel"),
        "{}",
        c.journal_text()
    );
    let logind: Vec<_> = c
        .journal_matching(&["SYSLOG_IDENTIFIER=systemd-logind"])
        .into_iter()
        .filter(|e| field(e, "_BOOT_ID") == boots[0])
        .map(|e| field(&e, "MESSAGE").to_owned())
        .collect();
    assert!(
        logind.iter().any(|m| m == "System is rebooting."),
        "logind did not take the reboot request: {logind:?}"
    );
    assert_eq!(on(&boots[1], NOTHING_TO_DO), 1, "{}", c.journal_text());
    assert_eq!(
        c.call_lines()
            .iter()
            .filter(|l| l.starts_with("fh apply"))
            .count(),
        1,
        "not re-applied"
    );
    assert_eq!(c.show(&boots[1], "Result"), "success");
    let state = c.state();
    assert_eq!(state["last-run"]["outcome"], "unchanged");
    assert_eq!(state["last-applied"]["reboot"]["requested"], true);
    assert_eq!(state["last-run"]["reboot"]["needed"], false, "{state}");
}

#[test]
#[ignore = "boots containers: needs root and systemd-nspawn (scripts/test runs it)"]
fn timer_applies_a_changed_ssm_parameter() {
    if skip() {
        return;
    }
    let mut c = Container::new(Some(&toml_user_data("ssm-parameter = \"/fleets/web\"")));
    c.set_parameter("/fleets/web", REF, 1);
    c.enable_timer("2s", "1s");
    c.wait_for("grep -q '\"store-path\": \"/var/lib/fake-nixos/store/next-system\"' /var/lib/nixos-ami-agent/state.json");
    let mut changed = false;
    let code = c.boot(LIMIT, |c| {
        if !changed && c.state()["last-applied"]["target"]["flake"] == REF {
            c.set_parameter("/fleets/web", REF_NEXT, 2);
            changed = true;
        }
    });
    assert_eq!(code, 0, "{}", c.console());
    assert!(changed);
    let applies: Vec<_> = c
        .call_lines()
        .into_iter()
        .filter(|l| l.starts_with("fh apply"))
        .collect();
    assert_eq!(
        applies,
        [
            format!("fh apply nixos {REF} switch"),
            format!("fh apply nixos {REF_NEXT} switch")
        ]
    );
    let journal = c.journal();
    let applied = events(&journal, APPLIED);
    assert_eq!(applied.len(), 2, "{}", c.journal_text());
    assert_eq!(field(applied[1], "SSM_PARAMETER"), "/fleets/web");
    assert_eq!(field(applied[1], "FLAKE_REF"), REF_NEXT);
    assert_eq!(c.state()["last-run"]["target"]["ssm-version"], 2);
    // The timer's run fetches first, then switches: the switch finds the
    // closure there.
    let run_calls = c.call_lines_in("nixos-ami-agent-run.service");
    let apply = run_calls
        .iter()
        .position(|l| *l == format!("fh apply nixos {REF_NEXT} switch"))
        .expect("the timer's run applied");
    assert_eq!(
        run_calls[apply - 1],
        format!("fh fetch {REF_NEXT} /var/lib/nixos-ami-agent/fetched"),
        "{run_calls:?}"
    );
    assert!(
        c.downloads()
            .iter()
            .any(|d| d.path == "next-system"
                && d.unit.as_deref() == Some("nixos-ami-agent-run.service")),
        "{:?}",
        c.downloads()
    );
    let raw = serde_json::to_string(&journal).unwrap();
    assert!(
        !raw.contains(TOKEN_PREFIX),
        "an IMDS token reached the journal"
    );
}

/// Every switch-to-configuration starts all active targets again (nixpkgs
/// switch-to-configuration-ng: "Start all active targets"), and
/// multi-user.target starts any inactive unit it wants. After a successful
/// boot run, that must not start a second run (which would apply the
/// target over an operator's own switch); a later run goes through
/// nixos-ami-agent-run.service.
#[test]
#[ignore = "boots containers: needs root and systemd-nspawn (scripts/test runs it)"]
fn a_switch_by_someone_else_starts_no_second_run() {
    if skip() {
        return;
    }
    let mut c = Container::new(Some(&toml_user_data(&format!("flake = \"{REF}\""))));
    // What a switch does to units, then a run on purpose.
    c.after_settled(
        "systemctl daemon-reload\n\
         systemctl start multi-user.target\n\
         sleep 2\n\
         systemctl show -p ActiveState -p SubState -p NRestarts nixos-ami-agent.service\n\
         systemctl start nixos-ami-agent-run.service\n\
         echo run-exit=$?",
    );
    assert_eq!(c.boot(LIMIT, |_| {}), 0, "{}", c.console());
    let boot = &c.boot_ids()[0];
    let after = std::fs::read_to_string(c.path(&format!("/var/lib/test-report/{boot}.after")))
        .expect("the reporter ran the scenario's switch");
    let journal = c.journal();
    let runs: Vec<_> = journal
        .iter()
        .filter(|e| field(e, "MESSAGE") == format!("instance {INSTANCE_ID}"))
        .map(|e| field(e, "_SYSTEMD_UNIT"))
        .collect();
    assert_eq!(
        runs,
        ["nixos-ami-agent.service", "nixos-ami-agent-run.service"],
        "one boot run, no run started by the switch, one run on purpose:\n{}",
        c.journal_text()
    );
    assert_eq!(events(&journal, APPLIED).len(), 1, "{}", c.journal_text());
    assert_eq!(events(&journal, NOTHING_TO_DO).len(), 1);
    assert_eq!(
        c.call_lines()
            .iter()
            .filter(|l| l.starts_with("fh apply"))
            .count(),
        1,
        "applied once"
    );
    assert!(
        after.contains("ActiveState=active") && after.contains("SubState=exited"),
        "the boot run stays active (exited): {after}"
    );
    assert!(after.contains("run-exit=0"), "{after}");
    assert_eq!(
        events(&journal, FETCHED).len(),
        1,
        "the switch started no second fetch either:\n{}",
        c.journal_text()
    );
}

fn applies(c: &Container) -> usize {
    c.call_lines()
        .iter()
        .filter(|l| l.starts_with("fh apply"))
        .count()
}

fn running_system(c: &Container, link: &str) -> String {
    let path = c.path(&format!("/var/lib/fake-nixos/{link}"));
    match std::fs::read_link(&path) {
        Ok(p) => p.display().to_string(),
        // Seen once, under heavy load: say everything needed to find out.
        Err(e) => panic!(
            "{}: {e}; the directory holds {:?}\n--- console\n{}\n--- journal\n{}",
            path.display(),
            std::fs::read_dir(path.parent().unwrap())
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
                .unwrap_or_default(),
            c.console(),
            c.journal_text()
        ),
    }
}

// Under a real systemd: the target's switch starts a unit that fails.
// Rolled back in place; the unit file is gone; the restart and the next
// timer run do not apply it again.
#[test]
#[ignore = "boots containers: needs root and systemd-nspawn (scripts/test runs it)"]
fn a_switch_that_fails_a_unit_is_rolled_back() {
    if skip() {
        return;
    }
    let mut c = Container::new(Some(&toml_user_data(&format!("flake = \"{REF_BROKEN}\""))));
    c.enable_timer("2s", "1s");
    c.wait_for("journalctl -o cat -u nixos-ami-agent-run.service | grep -q 'was rolled back at'");
    c.after_settled(
        "systemctl show -p LoadState -p ActiveState web.service; ls /run/systemd/system",
    );
    assert_eq!(c.boot(LIMIT, |_| {}), 0, "{}", c.console());
    let boots = c.boot_ids();
    assert_eq!(boots.len(), 1, "no reboot");
    let journal = c.journal();
    assert_eq!(
        events(&journal, ROLLED_BACK).len(),
        1,
        "{}",
        c.journal_text()
    );
    assert_eq!(applies(&c), 1, "{}", c.journal_text());
    assert_eq!(
        running_system(&c, "current-system"),
        format!("{FAKE_STORE}/old-system")
    );
    assert_eq!(
        running_system(&c, "profile"),
        format!("{FAKE_STORE}/old-system")
    );
    // The boot unit: rolled back (1), restarted, then rejected (65, not
    // restarted again).
    assert_eq!(
        c.show(&boots[0], "ExecMainStatus"),
        "65",
        "{}",
        c.report(&boots[0]).0
    );
    let after =
        std::fs::read_to_string(c.path(&format!("/var/lib/test-report/{}.after", boots[0])))
            .unwrap();
    assert!(
        after.contains("LoadState=not-found"),
        "the unit file is gone: {after}"
    );
    let state = c.state();
    assert_eq!(
        state["rejected"][0]["store-path"],
        format!("{FAKE_STORE}/broken-system"),
        "{state}"
    );
    let health = &state["last-applied"]["health"];
    assert_eq!(health["state"], "rolled-back", "{state}");
    assert!(
        health["problems"][0]
            .as_str()
            .unwrap()
            .contains("web.service"),
        "{health}"
    );
    // The previous system, judged under real systemd after the rollback:
    // the removed unit that failed is not held against it.
    assert!(
        health["rollback"]
            .as_str()
            .unwrap()
            .ends_with("it is healthy"),
        "{health}"
    );
}

#[test]
#[ignore = "boots containers: needs root and systemd-nspawn (scripts/test runs it)"]
fn a_failing_http_check_rolls_back() {
    if skip() {
        return;
    }
    let mut c = Container::new(Some(&toml_user_data(&format!(
        "flake = \"{REF}\"\n[health]\ntimeout = \"3s\"\nhttp = [{{ url = \"http://127.0.0.1:9/healthz\" }}]"
    ))));
    assert_eq!(c.boot(LIMIT, |_| {}), 0, "{}", c.console());
    assert_eq!(
        running_system(&c, "current-system"),
        format!("{FAKE_STORE}/old-system")
    );
    let state = c.state();
    assert_eq!(state["last-applied"]["health"]["state"], "rolled-back");
    assert!(
        state["last-applied"]["health"]["problems"][0]
            .as_str()
            .unwrap()
            .contains("GET http://127.0.0.1:9/healthz"),
        "{state}"
    );
    assert_eq!(applies(&c), 1);
}

// Healthy in place on the old kernel; after the reboot into it a unit
// fails: back on the previous system after one more reboot, and no loop.
#[test]
#[ignore = "boots containers: needs root and systemd-nspawn (scripts/test runs it)"]
fn unhealthy_after_the_reboot_goes_back_with_one_more() {
    if skip() {
        return;
    }
    let mut c = Container::new(Some(&toml_user_data(&format!(
        "flake = \"{REF_BROKEN_AFTER_REBOOT}\""
    ))));
    assert_eq!(c.boot(LIMIT, |_| {}), 0, "{}", c.console());
    assert_eq!(c.boots, 3, "two reboots, then none:\n{}", c.journal_text());
    let boots = c.boot_ids();
    assert_eq!(boots.len(), 3);
    let journal = c.journal();
    let rolled: Vec<_> = events(&journal, ROLLED_BACK)
        .into_iter()
        .map(|e| field(e, "_BOOT_ID").to_owned())
        .collect();
    assert_eq!(rolled, [boots[1].clone()], "{}", c.journal_text());
    assert_eq!(applies(&c), 1);
    assert_eq!(
        running_system(&c, "booted-system"),
        format!("{FAKE_STORE}/old-system")
    );
    assert_eq!(c.show(&boots[2], "ExecMainStatus"), "65");
    let state = c.state();
    assert_eq!(state["last-applied"]["health"]["state"], "rolled-back");
    assert!(
        state["last-applied"]["health"]["problems"][0]
            .as_str()
            .unwrap()
            .contains("driver.service"),
        "{state}"
    );
}

/// How one first boot went: the download (by which unit, when), the slow
/// unit multi-user.target waited for, and boot to converged.
fn first_boot_timeline(c: &Container) -> (nixos_ami_agent_tests::standin::Download, (u64, u64)) {
    let downloads = c.downloads();
    let new: Vec<_> = downloads
        .iter()
        .filter(|d| d.path == "new-system")
        .cloned()
        .collect();
    assert_eq!(new.len(), 1, "downloaded once: {downloads:?}");
    let slow = c.slow_boot_times().expect("the slow unit ran");
    (new[0].clone(), slow)
}

/// The download starts as soon as the network is online, while the boot
/// goes on: the boot's fetch downloads during the slow unit, and the boot
/// run, after multi-user.target, only switches. Boot to converged is
/// about max(D, B) + switch (BENCHMARKS.md measures it).
#[test]
#[ignore = "boots containers: needs root and systemd-nspawn (scripts/test runs it)"]
fn the_download_overlaps_the_rest_of_the_boot() {
    if skip() {
        return;
    }
    let mut c = Container::new(Some(&toml_user_data(&format!("flake = \"{REF}\""))));
    c.behaviour.download_ms = 3000;
    c.slow_boot(4.0);
    assert_eq!(c.boot(LIMIT, |_| {}), 0, "{}", c.console());
    let boot = &c.boot_ids()[0];
    assert_eq!(c.show(boot, "Result"), "success", "{}", c.journal_text());
    let (download, (slow_start, slow_done)) = first_boot_timeline(&c);
    assert_eq!(download.unit.as_deref(), Some(FETCH_UNIT));
    assert!(
        download.started_ms < slow_done && download.finished_ms > slow_start,
        "the download ({}..{}) overlaps the slow unit ({slow_start}..{slow_done})",
        download.started_ms,
        download.finished_ms
    );
    assert!(
        !c.call_lines_in(BOOT_UNIT)
            .iter()
            .any(|l| l.starts_with("fh fetch")),
        "{:?}",
        c.call_lines_in(BOOT_UNIT)
    );
    assert_eq!(
        running_system(&c, "current-system"),
        format!("{FAKE_STORE}/new-system")
    );
    println!(
        "overlapped, D 3 s, B 4 s: boot to converged {:?}",
        c.boot_to_converged(boot)
    );
}

/// The same boot without the fetch unit (masked): the boot run downloads
/// after multi-user.target, so D + B + switch. What the overlap saves.
#[test]
#[ignore = "boots containers: needs root and systemd-nspawn (scripts/test runs it)"]
fn without_the_fetch_unit_the_download_waits_for_the_boot() {
    if skip() {
        return;
    }
    let mut c = Container::new(Some(&toml_user_data(&format!("flake = \"{REF}\""))));
    c.behaviour.download_ms = 3000;
    c.slow_boot(4.0);
    c.mask_fetch();
    assert_eq!(c.boot(LIMIT, |_| {}), 0, "{}", c.console());
    let boot = &c.boot_ids()[0];
    assert_eq!(c.show(boot, "Result"), "success", "{}", c.journal_text());
    let (download, (_, slow_done)) = first_boot_timeline(&c);
    assert_eq!(download.unit.as_deref(), Some(BOOT_UNIT));
    assert!(download.started_ms >= slow_done);
    // The run's own fetch, then the switch: fh apply found it there.
    assert_eq!(
        c.call_lines_in(BOOT_UNIT),
        [
            "determinate-nixd login aws".to_owned(),
            format!("fh resolve --json {REF}"),
            format!("fh fetch {REF} /var/lib/nixos-ami-agent/fetched"),
            format!("fh apply nixos {REF} switch"),
        ]
    );
    println!(
        "sequential, D 3 s, B 4 s: boot to converged {:?}",
        c.boot_to_converged(boot)
    );
}

/// A fetch that fails (FlakeHub Cache refusing, say) breaks nothing: the
/// fetch unit is not failed, the system is not degraded, and the boot run
/// fetches and switches.
#[test]
#[ignore = "boots containers: needs root and systemd-nspawn (scripts/test runs it)"]
fn a_failing_fetch_still_converges() {
    if skip() {
        return;
    }
    let mut c = Container::new(Some(&toml_user_data(&format!("flake = \"{REF}\""))));
    c.behaviour.fetch = Mode::Fail;
    c.behaviour.download_ms = 500;
    c.slow_boot(2.0);
    assert_eq!(c.boot(LIMIT, |_| {}), 0, "{}", c.console());
    let boot = &c.boot_ids()[0];
    assert_eq!(c.show(boot, "Result"), "success", "{}", c.journal_text());
    assert_eq!(
        events(&c.journal(), APPLIED).len(),
        1,
        "{}",
        c.journal_text()
    );
    assert_eq!(
        running_system(&c, "current-system"),
        format!("{FAKE_STORE}/new-system")
    );
    // Recorded, not failed: ExecStart=- in the unit.
    assert_eq!(c.reported(boot, "fetch", "ExecMainStatus"), "1");
    assert_eq!(c.reported(boot, "fetch", "Result"), "success");
    assert_eq!(c.reported(boot, "fetch", "ActiveState"), "active");
    assert_eq!(c.reported(boot, "system", ""), "running");
    let fetched: Vec<_> = events(&c.journal(), FETCHED)
        .into_iter()
        .map(|e| field(e, "OUTCOME").to_owned())
        .collect();
    assert_eq!(fetched, ["failed"]);
    // fh apply downloaded it, after the run's own fetch failed too.
    let (download, _) = first_boot_timeline(&c);
    assert_eq!(download.unit.as_deref(), Some(BOOT_UNIT));
    assert!(
        c.journal_text()
            .contains("fh apply fetches what is missing"),
        "{}",
        c.journal_text()
    );
}

/// The fleet's parameter changes while the boot's fetch downloads the old
/// target: the boot run resolves again and switches to the new one; what
/// was fetched for the old one is not switched to, and its GC root goes.
#[test]
#[ignore = "boots containers: needs root and systemd-nspawn (scripts/test runs it)"]
fn a_target_that_changed_during_the_fetch_is_not_switched_to() {
    if skip() {
        return;
    }
    let mut c = Container::new(Some(&toml_user_data("ssm-parameter = \"/fleets/web\"")));
    c.set_parameter("/fleets/web", REF, 1);
    c.behaviour.download_ms = 2000;
    // The boot goes on until the parameter has changed (or 60 s).
    c.write(
        "/etc/systemd/system/slow-boot.service",
        "[Unit]\nDescription=A boot that waits for the test\n\n\
         [Service]\nType=oneshot\nRemainAfterExit=yes\n\
         ExecStart=/bin/sh -c 'for i in $(seq 600); do [ -e /var/lib/test-go ] && break; sleep 0.1; done'\n\n\
         [Install]\nWantedBy=multi-user.target\n",
    );
    let wants = c.path("/etc/systemd/system/multi-user.target.wants");
    std::os::unix::fs::symlink(
        "/etc/systemd/system/slow-boot.service",
        wants.join("slow-boot.service"),
    )
    .unwrap();
    let mut changed = false;
    let code = c.boot(LIMIT, |c| {
        if !changed
            && c.calls()
                .iter()
                .any(|x| x.prog == "fh" && x.argv.first().map(String::as_str) == Some("fetch"))
        {
            c.set_parameter("/fleets/web", REF_NEXT, 2);
            c.write("/var/lib/test-go", "");
            changed = true;
        }
    });
    assert_eq!(code, 0, "{}", c.console());
    assert!(
        changed,
        "the boot's fetch never started:\n{}",
        c.journal_text()
    );
    let boot = &c.boot_ids()[0];
    assert_eq!(c.show(boot, "Result"), "success", "{}", c.journal_text());
    assert_eq!(
        c.call_lines_in(FETCH_UNIT).last().map(String::as_str),
        Some(format!("fh fetch {REF} /var/lib/nixos-ami-agent/fetched-at-boot").as_str())
    );
    let switched: Vec<_> = c
        .calls()
        .into_iter()
        .filter(|x| x.prog == "switch-to-configuration")
        .map(|x| x.argv.join(" "))
        .collect();
    assert_eq!(
        switched,
        ["old-system test", "next-system switch"],
        "{}",
        c.journal_text()
    );
    assert_eq!(
        running_system(&c, "current-system"),
        format!("{FAKE_STORE}/next-system")
    );
    let state = c.state();
    assert_eq!(state["last-applied"]["target"]["ssm-version"], 2);
    assert_eq!(
        state["last-applied"]["store-path"],
        format!("{FAKE_STORE}/next-system")
    );
    for link in ["fetched", "fetched-at-boot"] {
        assert!(
            std::fs::symlink_metadata(c.path(&format!("/var/lib/nixos-ami-agent/{link}"))).is_err(),
            "no GC root is left for either closure: {link}"
        );
    }
}

/// The journal entries' time (`__REALTIME_TIMESTAMP`, µs) of a unit's
/// first line in the first boot, in ms.
fn first_line_ms(c: &Container, unit: &str) -> u64 {
    c.journal()
        .iter()
        .filter(|e| field(e, "_SYSTEMD_UNIT") == unit)
        .filter_map(|e| field(e, "__REALTIME_TIMESTAMP").parse::<u64>().ok())
        .min()
        .expect("the unit logged")
        / 1000
}

/// The download takes longer than the boot: neither multi-user.target nor
/// the boot run waits for the fetch unit. The run starts while the
/// download is in flight, its own fetch waits for that download (the
/// per-path lock) instead of making a second one, and it switches as
/// soon as the closure is there.
#[test]
#[ignore = "boots containers: needs root and systemd-nspawn (scripts/test runs it)"]
fn a_download_longer_than_the_boot_is_not_waited_for_twice() {
    if skip() {
        return;
    }
    let mut c = Container::new(Some(&toml_user_data(&format!("flake = \"{REF}\""))));
    c.behaviour.download_ms = 5000;
    c.slow_boot(1.0);
    assert_eq!(c.boot(LIMIT, |_| {}), 0, "{}", c.console());
    let boot = &c.boot_ids()[0];
    assert_eq!(c.show(boot, "Result"), "success", "{}", c.journal_text());
    let (download, (_, slow_done)) = first_boot_timeline(&c);
    assert_eq!(download.unit.as_deref(), Some(FETCH_UNIT));
    let run_start = first_line_ms(&c, BOOT_UNIT);
    assert!(
        slow_done < download.finished_ms && run_start < download.finished_ms,
        "the boot ({slow_done}) and the boot run ({run_start}) did not wait for the download \
         (ended {})",
        download.finished_ms
    );
    assert_eq!(
        running_system(&c, "current-system"),
        format!("{FAKE_STORE}/new-system")
    );
    println!(
        "overlapped, D 5 s, B 1 s: boot to converged {:?}",
        c.boot_to_converged(boot)
    );
}

/// The boot's fetch hangs (FlakeHub never answers it): the boot run does
/// not wait for it, downloads itself and converges; the hung fetch is no
/// failed unit and holds nothing the run needs.
#[test]
#[ignore = "boots containers: needs root and systemd-nspawn (scripts/test runs it)"]
fn a_hung_fetch_does_not_hold_the_run() {
    if skip() {
        return;
    }
    let mut c = Container::new(Some(&toml_user_data(&format!("flake = \"{REF}\""))));
    c.behaviour.fetch_hang_times = 1;
    c.behaviour.download_ms = 500;
    c.slow_boot(1.0);
    c.ignore_fetch();
    assert_eq!(c.boot(LIMIT, |_| {}), 0, "{}", c.console());
    let boot = &c.boot_ids()[0];
    assert_eq!(c.show(boot, "Result"), "success", "{}", c.journal_text());
    assert_eq!(c.reported(boot, "fetch", "ActiveState"), "activating");
    let (download, _) = first_boot_timeline(&c);
    assert_eq!(download.unit.as_deref(), Some(BOOT_UNIT));
    assert_eq!(
        running_system(&c, "current-system"),
        format!("{FAKE_STORE}/new-system")
    );
}
