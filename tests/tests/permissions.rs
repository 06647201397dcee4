//! What the agent creates is root-only (0700 directories, 0600 files,
//! scripts 0700) and owned by the user running it; a state file it cannot
//! use is moved aside and the run starts fresh.

use nixos_ami_agent_tests::harness::{REF, Scenario, toml_user_data};
use std::os::unix::fs::MetadataExt;

fn mode_and_owner(s: &Scenario, rel: &str) -> (u32, u32) {
    let m = std::fs::metadata(s.path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    (m.mode() & 0o777, m.uid())
}

#[test]
fn created_root_only_and_owned_by_the_runner() {
    let mut s = Scenario::new();
    // A state dir whose parents do not exist yet.
    s.set_agent(
        "state-dir",
        &format!("{:?}", s.path("var/lib/agent").display().to_string()),
    );
    s.user_data(format!(
        "Content-Type: multipart/mixed; boundary=\"B\"\n\n--B\nContent-Type: text/x-nixos-ami-agent\n\n\
         flake = \"{REF}\"\n--B\nContent-Type: text/x-shellscript\n\n#!/bin/sh\ntrue\n--B--\n"
    ));
    assert_eq!(s.run(&["run"]).code, 0);
    let me = std::fs::metadata(s.path("config.toml")).unwrap().uid();
    for (rel, mode) in [
        ("var/lib/agent", 0o700),
        ("var/lib/agent/state.json", 0o600),
        ("var/lib/agent/lock", 0o600),
        ("var/lib/agent/scripts", 0o700),
        ("var/lib/agent/scripts/user-data-script-0", 0o700),
    ] {
        assert_eq!(mode_and_owner(&s, rel), (mode, me), "{rel}");
    }
}

#[test]
fn unreadable_state_is_moved_aside() {
    let s = Scenario::new();
    s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
    // Root reads any file whatever its mode; a directory in the state
    // file's place cannot be read by anyone.
    std::fs::create_dir_all(s.path("state/state.json/x")).unwrap();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("is not a regular file (a directory)"),
        "{out:?}"
    );
    assert_eq!(s.state()["last-run"]["outcome"], "applied");
    let aside: Vec<_> = std::fs::read_dir(s.path("state"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("state.json.unusable-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
}

#[test]
fn state_of_another_format_is_moved_aside() {
    let s = Scenario::new();
    s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
    std::fs::create_dir_all(s.path("state")).unwrap();
    std::fs::write(
        s.path("state/state.json"),
        r#"{"format": 2, "instance-id": "i-0123456789abcdef0"}"#,
    )
    .unwrap();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("has format 2 (this agent writes 1)"),
        "{out:?}"
    );
    assert_eq!(s.state()["format"], 1);
}
