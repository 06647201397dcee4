//! sd_notify as systemd sees it: a datagram socket stands in for
//! `NOTIFY_SOCKET` and collects every message the agent sends.

use nixos_ami_agent_tests::harness::{REF, Scenario, toml_user_data};
use std::os::unix::net::UnixDatagram;

fn with_notify_socket(s: &mut Scenario) -> UnixDatagram {
    let path = s.path("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_nonblocking(true).unwrap();
    s.env
        .push(("NOTIFY_SOCKET".into(), path.display().to_string()));
    sock
}

fn messages(sock: &UnixDatagram) -> Vec<String> {
    let mut out = vec![];
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned());
    }
    out
}

#[test]
fn status_at_each_step_then_ready() {
    let mut s = Scenario::new();
    let marker = s.path("script-env");
    s.user_data(format!(
        "Content-Type: multipart/mixed; boundary=\"B\"\n\n--B\nContent-Type: text/x-nixos-ami-agent\n\n\
         flake = \"{REF}\"\n--B\nContent-Type: text/x-shellscript\n\n#!/bin/sh\nenv > {}\n--B--\n",
        marker.display()
    ));
    let sock = with_notify_socket(&mut s);
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    let m = messages(&sock);
    assert_eq!(
        m,
        [
            "STATUS=reading instance metadata".to_owned(),
            "STATUS=fetching user data".to_owned(),
            "STATUS=logging in to FlakeHub".to_owned(),
            format!("STATUS=resolving {REF}"),
            format!("STATUS=fetching {REF}"),
            format!("STATUS=applying {REF}"),
            format!("STATUS=checking the health of {REF}"),
            "STATUS=running user-data script part 2".to_owned(),
            format!(
                "READY=1\nSTATUS=applied {REF} ({}) with action switch; healthy",
                s.store_path("new-system").display()
            ),
        ]
    );
    let script_env = std::fs::read_to_string(&marker).unwrap();
    assert!(
        !script_env.contains("NOTIFY_SOCKET"),
        "children must not speak for the unit"
    );

    let again = s.run(&["run"]);
    assert_eq!(again.code, 0);
    let last = messages(&sock).pop().unwrap();
    assert!(
        last.starts_with(
            "READY=1\nSTATUS=nothing to do: the running system and the boot default are already"
        ),
        "{last}"
    );
}

#[test]
fn failure_sets_status_without_ready() {
    let mut s = Scenario::new();
    s.user_data(toml_user_data("action = \"swtich\""));
    let sock = with_notify_socket(&mut s);
    let out = s.run(&["run"]);
    assert_eq!(out.code, 65, "{out:?}");
    let m = messages(&sock);
    assert!(!m.iter().any(|x| x.contains("READY=1")), "{m:?}");
    let last = m.last().unwrap();
    assert!(
        last.starts_with("STATUS=failed: user data: key `action`"),
        "{last}"
    );
}

#[test]
fn config_error_is_reported_too() {
    let mut s = Scenario::new();
    s.defaults = "frobnicate = 1".into();
    let sock = with_notify_socket(&mut s);
    assert_eq!(s.run(&["run"]).code, 78);
    let m = messages(&sock);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(m[0].starts_with("STATUS=failed: config file"), "{m:?}");
}
