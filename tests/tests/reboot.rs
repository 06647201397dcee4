//! Reboots: when one is needed, the state records the request before the
//! agent asks logind (or systemd) over D-Bus, and the run after the reboot
//! finds it done instead of asking again. The bus is a private
//! dbus-daemon with doubles; the host's system bus is never used.

use nixos_ami_agent_tests::harness::{REF, REF_NEW_KERNEL, Scenario, toml_user_data};

fn scenario(settings: &str) -> Scenario {
    let s = Scenario::new();
    s.user_data(toml_user_data(settings));
    s
}

#[test]
fn new_kernel_reboots_once_through_logind() {
    let mut s = scenario(&format!("flake = \"{REF_NEW_KERNEL}\""));
    s.with_bus(true, true);
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        s.reboot_requests(),
        ["login1.Reboot(false)"],
        "logind first, not interactive"
    );
    let r = &s.state()["last-run"]["reboot"];
    assert_eq!(
        (r["needed"].as_bool(), r["requested"].as_bool()),
        (Some(true), Some(true)),
        "{r}"
    );
    assert!(
        r["reason"].as_str().unwrap().contains("kernel, initrd"),
        "{r}"
    );
    assert_eq!(s.state()["last-applied"]["reboot"]["requested"], true);
    assert!(
        out.stderr.contains("reboot requested from logind"),
        "{out:?}"
    );

    let status = s.run(&["status"]);
    assert!(
        status
            .stdout
            .contains("reboot:     needed, requested (policy if-needed): kernel, initrd"),
        "{status:?}"
    );
    let plan = s.run(&["plan"]);
    assert!(
        plan.stdout
            .contains("the last run found a reboot needed: kernel, initrd"),
        "{plan:?}"
    );

    s.reboot_into_profile();
    let after = s.run(&["run"]);
    assert_eq!(after.code, 0, "{after:?}");
    assert!(after.stderr.contains("nothing to do"), "{after:?}");
    assert_eq!(s.reboot_requests().len(), 1, "no second reboot");
    assert_eq!(
        s.call_lines()
            .iter()
            .filter(|l| l.starts_with("fh apply"))
            .count(),
        1,
        "not re-applied"
    );
    assert_eq!(s.state()["last-run"]["reboot"]["needed"], false);
}

/// The machine came back on the old kernel (the boot loader did not take
/// the new system): asking again would loop, so the agent does not.
#[test]
fn a_reboot_that_did_not_take_is_not_requested_again() {
    let mut s = scenario(&format!("flake = \"{REF_NEW_KERNEL}\""));
    s.with_bus(true, false);
    assert_eq!(s.run(&["run"]).code, 0);
    s.new_boot(); // rebooted, into the old system again
    let again = s.run(&["run"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(s.reboot_requests().len(), 1);
    assert!(
        again
            .stderr
            .contains("was already requested; not rebooting again"),
        "{again:?}"
    );
}

/// logind said yes, but this boot goes on (a run came before the
/// shutdown, or the reboot never happened): the request made in this very
/// boot is not taken as done, so the run asks again; after a reboot that
/// came back on the old kernel it is, and nothing loops.
#[test]
fn a_request_this_boot_did_not_carry_out_is_asked_again() {
    let mut s = scenario(&format!("flake = \"{REF_NEW_KERNEL}\""));
    s.with_bus(true, false);
    assert_eq!(s.run(&["run"]).code, 0);
    let same_boot = s.run(&["run"]);
    assert_eq!(same_boot.code, 0, "{same_boot:?}");
    assert_eq!(s.reboot_requests().len(), 2, "{same_boot:?}");
    s.new_boot();
    let after = s.run(&["run"]);
    assert_eq!(after.code, 0, "{after:?}");
    assert_eq!(s.reboot_requests().len(), 2, "{after:?}");
}

#[test]
fn without_logind_systemd_starts_reboot_target() {
    let mut s = scenario(&format!("flake = \"{REF_NEW_KERNEL}\""));
    s.with_bus(false, true);
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        s.reboot_requests(),
        ["systemd1.StartUnit(reboot.target, replace-irreversibly)"]
    );
    assert!(
        out.stderr.contains("reboot requested from systemd"),
        "{out:?}"
    );
}

#[test]
fn no_bus_fails_and_the_next_run_asks_again() {
    // `boot`: the health gate (which would roll back a switch it cannot
    // judge) is for the next boot.
    let mut s = scenario(&format!("flake = \"{REF_NEW_KERNEL}\"\naction = \"boot\""));
    s.without_bus();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("reboot: cannot connect to the system D-Bus"),
        "{out:?}"
    );
    let r = &s.state()["last-run"]["reboot"];
    assert_eq!(
        (r["needed"].as_bool(), r["requested"].as_bool()),
        (Some(true), Some(false)),
        "{r}"
    );

    s.with_bus(true, false);
    let retry = s.run(&["run"]);
    assert_eq!(retry.code, 0, "{retry:?}");
    assert_eq!(s.reboot_requests(), ["login1.Reboot(false)"]);
    assert_eq!(
        s.call_lines()
            .iter()
            .filter(|l| l.starts_with("fh apply"))
            .count(),
        1
    );
}

#[test]
fn policies() {
    // never: the need is recorded, nothing is asked.
    let mut s = scenario(&format!("flake = \"{REF_NEW_KERNEL}\"\nreboot = \"never\""));
    s.with_bus(true, true);
    assert_eq!(s.run(&["run"]).code, 0);
    assert!(s.reboot_requests().is_empty());
    assert!(
        s.state()["last-run"]["reboot"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("reboot = never (kernel")
    );

    // always: after a run that changed the system, and only then.
    let mut s = scenario(&format!("flake = \"{REF}\"\nreboot = \"always\""));
    s.with_bus(true, true);
    assert_eq!(s.run(&["run"]).code, 0);
    assert_eq!(s.reboot_requests().len(), 1);
    s.reboot_into_profile();
    assert_eq!(s.run(&["run"]).code, 0);
    assert_eq!(s.reboot_requests().len(), 1);

    // if-needed, same kernel: no reboot.
    let mut s = scenario(&format!("flake = \"{REF}\""));
    s.with_bus(true, true);
    assert_eq!(s.run(&["run"]).code, 0);
    assert!(s.reboot_requests().is_empty());
    assert_eq!(s.state()["last-run"]["reboot"]["needed"], false);

    // test never reboots (a reboot would undo it).
    let mut s = scenario(&format!(
        "flake = \"{REF_NEW_KERNEL}\"\naction = \"test\"\nreboot = \"always\""
    ));
    s.with_bus(true, true);
    assert_eq!(s.run(&["run"]).code, 0);
    assert!(s.reboot_requests().is_empty());
}
