//! What an adversarial pass against the agent found: each defect where a
//! test double or an assumption was kinder than the world (a reply that
//! does not parse, a signal from someone else, a redirect, a planted link,
//! a FIFO, an endless reply, huge numbers, forged log lines), one test
//! each, against the built binary.

use nixos_ami_agent_tests::harness::{
    Output, REF, REF_NEW_KERNEL, Scenario, finish, gzip, toml_user_data,
};
use nixos_ami_agent_tests::imds::{self, ImdsDouble};
use nixos_ami_agent_tests::ssm::{self, Param, SsmDouble};
use nixos_ami_agent_tests::standin::Mode;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

const SECRET: &str = "secret-org/secret-flake/0.1#nixosConfigurations.hidden";
const PARAM: &str = "/fleets/secret";

fn scenario(settings: &str) -> Scenario {
    let s = Scenario::new();
    s.user_data(toml_user_data(settings));
    s
}

fn is_root() -> bool {
    nix_uid() == 0
}

fn nix_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Everything the agent wrote or shows afterwards, for secret sweeps.
fn all_output(s: &Scenario, run: &Output) -> String {
    let status = s.run(&["status"]);
    let json = s.run(&["status", "--json"]);
    let state = std::fs::read_to_string(s.path("state/state.json")).unwrap_or_default();
    format!(
        "{}{}{}{}{}{}",
        run.stdout, run.stderr, status.stdout, status.stderr, json.stdout, state
    )
}

// 1. A SecureString's value must not reach any output when SSM's 200
// reply does not parse (the SDK's own error rendering carries the body),
// and no error body is copied whole.
#[test]
fn a_secure_string_in_a_reply_that_does_not_parse_is_never_shown() {
    let s = scenario(&format!("ssm-parameter = \"{PARAM}\""));
    let body = serde_json::json!({"Parameter": {
        "Name": PARAM, "Type": "SecureString", "Value": SECRET, "Version": 1,
        "LastModifiedDate": "not a timestamp",
    }})
    .to_string()
    .into_bytes();
    s.ssm.with(|x| {
        for _ in 0..200 {
            x.faults.push_back(ssm::Fault::Raw {
                status: 200,
                body: body.clone(),
            });
        }
    });
    let out = s.run(&["run"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(
        out.stderr.contains("could not be read or parsed"),
        "{out:?}"
    );
    let everything = all_output(&s, &out);
    assert!(!everything.contains("secret-org"), "{everything}");
    assert!(s.calls().is_empty());
}

#[test]
fn a_huge_error_body_is_not_copied_anywhere() {
    let s = scenario(&format!("ssm-parameter = \"{PARAM}\""));
    let mut body = b"{\"__type\":\"InternalServerError\",\"message\":\"".to_vec();
    body.extend(std::iter::repeat_n(b'x', 30 << 20));
    body.extend_from_slice(b"\"}");
    s.ssm.with(|x| {
        for _ in 0..3 {
            x.faults.push_back(ssm::Fault::Raw {
                status: 500,
                body: body.clone(),
            });
        }
    });
    let mut s = s;
    s.set_agent("retry-budget", "\"2s\"");
    let out = s.run(&["run"]);
    assert_ne!(out.code, 0, "{out:?}");
    let state = std::fs::metadata(s.path("state/state.json")).unwrap().len();
    assert!(state < 16 << 10, "state.json is {state} bytes");
    assert!(
        out.stderr.len() < 256 << 10,
        "stderr is {} bytes",
        out.stderr.len()
    );
}

// 2. A signal to the agent is passed on to the program it runs, which is
// waited for; the interruption is recorded before the agent ends (by that
// signal) and releases the lock.
fn wait_for_file(path: &Path, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.is_empty()
        {
            return s;
        }
        assert!(start.elapsed() < limit, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn signal_during_apply(signal: i32, mode: Mode) -> (Scenario, Output, i32, Duration) {
    let mut s = scenario(&format!("flake = \"{REF}\""));
    s.behaviour.apply = mode;
    let child = s.spawn(&["run"]);
    let agent = child.id() as i32;
    let fh: i32 = wait_for_file(&s.path("standin/pid-apply"), Duration::from_secs(20))
        .trim()
        .parse()
        .unwrap();
    assert!(alive(fh));
    let start = Instant::now();
    // SAFETY: sending a signal to the agent we started.
    unsafe { libc::kill(agent, signal) };
    let out = finish(child, Duration::from_secs(30));
    let took = start.elapsed();
    // The moment the agent is gone (and its lock with it), so is fh.
    assert!(!alive(fh), "fh (pid {fh}) outlived the agent: {out:?}");
    (s, out, fh, took)
}

#[test]
fn sigterm_sigint_and_sighup_are_passed_on_and_recorded() {
    for (signal, name) in [
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGHUP, "SIGHUP"),
    ] {
        let (s, out, _, took) = signal_during_apply(signal, Mode::Hang);
        assert_eq!(
            out.code, 75,
            "{name}: temporary, the next run redoes it: {out:?}"
        );
        assert!(took < Duration::from_secs(5), "{name}: {took:?}");
        let last = &s.state()["last-run"];
        assert_eq!(last["outcome"], "failed", "{name}: {last}");
        assert!(
            last["message"]
                .as_str()
                .unwrap()
                .contains(&format!("interrupted by {name}")),
            "{name}: {last}"
        );
        assert!(
            out.stderr.contains(&format!("passing {name} on to")),
            "{out:?}"
        );
        // The lock is free and the next run redoes the apply.
        let mut again = s;
        again.behaviour.apply = Mode::Ok;
        let next = again.run(&["run"]);
        assert_eq!(next.code, 0, "{name}: {next:?}");
        assert_eq!(again.current_system(), again.store_path("new-system"));
    }
}

#[test]
fn a_program_ignoring_sigterm_is_killed_after_the_grace_period() {
    let (s, out, _, took) = signal_during_apply(libc::SIGTERM, Mode::HangIgnoringTerm);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(15),
        "waited for the grace period, then SIGKILL: {took:?}"
    );
    assert_eq!(s.state()["last-run"]["outcome"], "failed");
}

#[test]
fn a_stop_while_waiting_on_imds_ends_at_once() {
    let s = scenario(&format!("flake = \"{REF}\""));
    s.imds.with(|i| {
        for _ in 0..100 {
            i.token_faults.push_back(imds::Fault::Status(500));
        }
    });
    let child = s.spawn(&["run"]);
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    // SAFETY: sending a signal to the agent we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = finish(child, Duration::from_secs(10));
    assert_eq!(out.code, 75, "{out:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(s.calls().is_empty());
}

// 3. `reboot = "always"` survives a run killed after the apply (during a
// user-data script, or when the scripts cannot even start).
fn mime_with_script(settings: &str, script: &str) -> String {
    format!(
        "Content-Type: multipart/mixed; boundary=\"B\"\nMIME-Version: 1.0\n\n\
         --B\nContent-Type: text/x-nixos-ami-agent\n\n{settings}\n\
         --B\nContent-Type: text/x-shellscript\n\n{script}\n--B--\n"
    )
}

#[test]
fn reboot_always_is_not_lost_when_a_script_kills_the_run() {
    let mut s = Scenario::new();
    s.user_data(mime_with_script(
        &format!("flake = \"{REF}\"\nreboot = \"always\""),
        "#!/bin/sh\nkill -KILL $PPID\nsleep 5",
    ));
    s.with_bus(true, true);
    let out = s.run(&["run"]);
    assert_eq!(out.signal, Some(libc::SIGKILL), "{out:?}");
    assert!(s.reboot_requests().is_empty());
    assert_eq!(s.current_system(), s.store_path("new-system"));
    let next = s.run(&["run"]);
    assert_eq!(next.code, 0, "{next:?}");
    assert_eq!(
        s.reboot_requests(),
        ["login1.Reboot(false)"],
        "the next run asks for the reboot the applied target needs: {next:?}"
    );
    assert_eq!(
        s.call_lines()
            .iter()
            .filter(|l| l.starts_with("fh apply"))
            .count(),
        1
    );
}

#[test]
fn reboot_always_is_not_lost_when_the_scripts_cannot_start() {
    let mut s = Scenario::new();
    s.user_data(mime_with_script(
        &format!("flake = \"{REF}\"\nreboot = \"always\""),
        "#!/bin/sh\ntrue",
    ));
    s.with_bus(true, true);
    // The scripts directory is a file: it cannot be created.
    std::fs::create_dir_all(s.path("state")).unwrap();
    std::fs::write(s.path("state/scripts"), "in the way").unwrap();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 74, "{out:?}");
    assert!(out.stderr.contains("scripts"), "{out:?}");
    assert_eq!(s.state()["last-applied"]["reboot"]["needed"], true);
    std::fs::remove_file(s.path("state/scripts")).unwrap();
    let next = s.run(&["run"]);
    assert_eq!(next.code, 0, "{next:?}");
    assert_eq!(s.reboot_requests(), ["login1.Reboot(false)"], "{next:?}");
}

// 4. No redirects, ever: IMDS (user data, the token) and SSM.
#[test]
fn an_imds_redirect_is_not_followed() {
    for on_token in [false, true] {
        let mut other = imds::Imds::default();
        other.user_data = Some(toml_user_data(&format!("flake = \"{REF}\"")));
        let elsewhere =
            ImdsDouble::start(nixos_ami_agent_tests::harness::rt(), other, Duration::ZERO);
        let s = scenario(&format!("flake = \"{REF}\""));
        let fault = |status, path: &str| imds::Fault::Redirect {
            status,
            location: format!("{}{path}", elsewhere.url()),
        };
        s.imds.with(|i| {
            if on_token {
                i.token_faults.push_back(fault(308, "/latest/api/token"));
            } else {
                // The instance id is answered; the user data redirected.
                i.get_faults.push_back(imds::Fault::Delay(Duration::ZERO));
                i.get_faults.push_back(fault(307, "/latest/user-data"));
            }
        });
        let out = s.run(&["run"]);
        assert_ne!(out.code, 0, "{out:?}");
        assert!(out.stderr.contains("30"), "{out:?}");
        assert!(
            elsewhere.with(|i| i.requests.is_empty()),
            "the redirect was followed (token sent elsewhere): {:?}",
            elsewhere.with(|i| i.requests.clone())
        );
        assert!(s.calls().is_empty(), "nothing applied: {:?}", s.calls());
    }
}

#[test]
fn an_ssm_redirect_is_not_followed() {
    let elsewhere = SsmDouble::start(nixos_ami_agent_tests::harness::rt(), ssm::Ssm::default());
    elsewhere.with(|x| x.params.insert(PARAM.into(), Param::string(REF, 1)));
    let s = scenario(&format!("ssm-parameter = \"{PARAM}\""));
    s.ssm.with(|x| {
        for _ in 0..50 {
            x.faults.push_back(ssm::Fault::Redirect {
                status: 307,
                location: format!("{}/", elsewhere.url()),
            });
        }
    });
    let out = s.run(&["run"]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(elsewhere.with(|x| x.requests.is_empty()), "followed");
    assert!(s.calls().is_empty());
}

// 5. The state directory: repaired when it can be, refused when it
// cannot; no file is opened through a link.
#[test]
fn a_world_writable_state_directory_is_repaired() {
    let s = scenario(&format!("flake = \"{REF}\""));
    std::fs::create_dir(s.path("state")).unwrap();
    std::fs::set_permissions(s.path("state"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    let mode = std::fs::metadata(s.path("state"))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o700);
    assert!(out.stderr.contains("now 0700"), "{out:?}");
}

#[test]
fn a_state_directory_owned_by_someone_else_is_taken_over() {
    if !is_root() {
        eprintln!("SKIPPED: only root can give a directory to another user");
        return;
    }
    let s = scenario(&format!("flake = \"{REF}\""));
    std::fs::create_dir(s.path("state")).unwrap();
    std::os::unix::fs::chown(s.path("state"), Some(65534), Some(65534)).unwrap();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(s.path("state")).unwrap().uid(), 0);
}

#[test]
fn a_state_directory_that_is_a_link_is_refused() {
    let s = scenario(&format!("flake = \"{REF}\""));
    std::fs::create_dir(s.path("elsewhere")).unwrap();
    std::os::unix::fs::symlink(s.path("elsewhere"), s.path("state")).unwrap();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 74, "{out:?}");
    assert!(out.stderr.contains("symbolic link"), "{out:?}");
    assert!(
        std::fs::read_dir(s.path("elsewhere"))
            .unwrap()
            .next()
            .is_none()
    );
    assert!(s.calls().is_empty());
}

#[test]
fn a_planted_temporary_file_link_is_not_written_through() {
    let s = scenario(&format!("flake = \"{REF}\""));
    std::fs::create_dir(s.path("state")).unwrap();
    std::fs::write(s.path("victim"), "precious").unwrap();
    std::os::unix::fs::symlink(s.path("victim"), s.path("state/.state.json.tmp")).unwrap();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        std::fs::read_to_string(s.path("victim")).unwrap(),
        "precious"
    );
    assert_eq!(s.state()["last-run"]["outcome"], "applied");
}

// 6. Huge durations: no panic, from IMDS or from the config file.
#[test]
fn a_huge_token_ttl_from_imds_is_capped() {
    let s = scenario(&format!("flake = \"{REF}\""));
    s.imds.with(|i| {
        i.token_faults
            .push_back(imds::Fault::TokenTtl("18446744073709551615".into()))
    });
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
}

#[test]
fn huge_durations_in_the_config_file_are_refused() {
    for key in [
        "retry-budget",
        "apply-timeout",
        "script-timeout",
        "lock-wait",
        "command-timeout",
    ] {
        let mut s = scenario(&format!("flake = \"{REF}\""));
        s.set_agent(key, "\"300000000000y\"");
        let out = s.run(&["run"]);
        assert_eq!(out.code, 78, "{key}: {out:?}");
        assert!(out.stderr.contains(&format!("agent.{key}")), "{out:?}");
        assert!(out.stderr.contains("7 days"), "{out:?}");
    }
}

// 7. SSM replies are bounded, endless ones too.
#[test]
fn an_endless_ssm_reply_is_cut_off() {
    let s = scenario(&format!("ssm-parameter = \"{PARAM}\""));
    s.ssm.with(|x| x.faults.push_back(ssm::Fault::Endless));
    let start = Instant::now();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 69, "{out:?}");
    assert!(out.stderr.contains("larger than 64 KiB"), "{out:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(s.calls().is_empty());
}

// 8. State and lock files that are not regular files, and inputs without
// a size.
#[test]
fn a_fifo_state_file_does_not_hang_run_or_status() {
    let s = scenario(&format!("flake = \"{REF}\""));
    std::fs::create_dir(s.path("state")).unwrap();
    nix_mkfifo(&s.path("state/state.json"));
    let status = finish(s.spawn(&["status"]), Duration::from_secs(10));
    assert_eq!(status.code, 74, "{status:?}");
    assert!(status.stderr.contains("FIFO"), "{status:?}");
    let out = finish(s.spawn(&["run"]), Duration::from_secs(30));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("moved to"), "{out:?}");
}

#[test]
fn a_fifo_lock_file_is_refused_without_waiting() {
    let s = scenario(&format!("flake = \"{REF}\""));
    std::fs::create_dir(s.path("state")).unwrap();
    nix_mkfifo(&s.path("state/lock"));
    let start = Instant::now();
    let out = finish(s.spawn(&["run"]), Duration::from_secs(30));
    assert_eq!(out.code, 74, "{out:?}");
    assert!(out.stderr.contains("not a regular file"), "{out:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_state_file_linked_to_dev_zero_is_set_aside() {
    let s = scenario(&format!("flake = \"{REF}\""));
    std::fs::create_dir(s.path("state")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", s.path("state/state.json")).unwrap();
    let status = finish(s.spawn(&["status"]), Duration::from_secs(10));
    assert_eq!(status.code, 74, "{status:?}");
    let out = finish(s.spawn(&["run"]), Duration::from_secs(30));
    assert_eq!(out.code, 0, "{out:?}");
}

#[test]
fn validate_and_config_read_at_most_a_bound() {
    let s = Scenario::new();
    let out = finish(s.spawn(&["validate", "/dev/zero"]), Duration::from_secs(10));
    assert_eq!(out.code, 64, "{out:?}");
    assert!(out.stderr.contains("larger than 1 MiB"), "{out:?}");
    let mut c = std::process::Command::new(nixos_ami_agent_tests::harness::workspace_bin(
        "nixos-ami-agent",
    ));
    c.args(["--config", "/dev/zero", "status"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .env_clear();
    let out = finish(c.spawn().unwrap(), Duration::from_secs(10));
    assert_eq!(out.code, 78, "{out:?}");
}

fn nix_mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string and mode.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

// 9. One inflate cap for the whole user data.
#[test]
fn many_small_gzipped_parts_cannot_inflate_past_the_cap() {
    use base64_lite::encode;
    let script = [b"#!/bin/sh\n".as_slice(), &vec![b'#'; 200 << 10]].concat();
    let part = encode(&gzip(&script));
    let mut ud = String::from("Content-Type: multipart/mixed; boundary=\"B\"\n\n");
    for _ in 0..8 {
        ud.push_str(&format!(
            "--B\nContent-Type: text/x-shellscript\nContent-Transfer-Encoding: base64\n\n{part}\n"
        ));
    }
    ud.push_str("--B--\n");
    let s = Scenario::new();
    s.user_data(ud);
    let out = s.run(&["run"]);
    assert_eq!(out.code, 65, "{out:?}");
    assert!(out.stderr.contains("the whole user data"), "{out:?}");
    assert!(!s.path("state/scripts").exists());
}

/// A tiny base64 encoder: the tests crate does not need a dependency for it.
mod base64_lite {
    pub fn encode(data: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

// 10. Text from outside cannot forge log lines or drive a terminal.
#[test]
fn a_newline_in_an_ignored_parts_content_type_forges_no_log_line() {
    let s = Scenario::new();
    s.user_data(format!(
        "Content-Type: multipart/mixed; boundary=\"B\"\n\n\
         --B\nContent-Type: =?utf-8?q?text/x-other=0A2026-01-01T00:00:00Z_ERROR_forged?=\n\nx\n\
         --B\nContent-Type: text/x-nixos-ami-agent\n\nflake = \"{REF}\"\n--B--\n"
    ));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        !out.stderr
            .lines()
            .any(|l| l.starts_with("2026-01-01T00:00:00Z")),
        "a forged line: {out:?}"
    );
}

#[test]
fn escapes_reach_neither_plan_nor_validate_nor_the_log() {
    let s = Scenario::new();
    let ud = s.path("ud.toml");
    // TOML's own escape: the key holds real ESC characters once parsed.
    std::fs::write(&ud, "#nixos-ami-agent\n\"\\u001b[2J\\u001b[31mred\" = 1\n").unwrap();
    for args in [
        vec!["validate", ud.to_str().unwrap()],
        vec!["plan", "--user-data", ud.to_str().unwrap()],
    ] {
        let out = s.run(&args);
        assert_eq!(out.code, 65, "{args:?}: {out:?}");
        assert!(!out.stdout.contains('\u{1b}'), "{args:?}: {out:?}");
        assert!(!out.stderr.contains('\u{1b}'), "{args:?}: {out:?}");
        assert!(
            out.stdout.contains("\\u{1b}") || out.stderr.contains("\\u{1b}"),
            "{out:?}"
        );
    }
}

#[test]
fn a_carriage_return_from_fh_is_shown_escaped() {
    let mut s = scenario(&format!("flake = \"{REF}\""));
    s.behaviour.apply_stderr =
        Some("copying 10%\r2026-01-01T00:00:00Z ERROR forged\u{1b}[2K\n".into());
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!out.stderr.contains('\r'), "{out:?}");
    assert!(!out.stderr.contains('\u{1b}'), "{out:?}");
    assert!(out.stderr.contains("copying 10%\\r2026"), "{out:?}");
}

// 11. Set-aside state files never overwrite one another.
#[test]
fn two_unusable_state_files_in_one_second_are_both_kept() {
    let s = scenario(&format!("flake = \"{REF}\""));
    std::fs::create_dir(s.path("state")).unwrap();
    for garbage in ["first garbage", "second garbage"] {
        std::fs::write(s.path("state/state.json"), garbage).unwrap();
        let out = s.run(&["run"]);
        assert_eq!(out.code, 0, "{out:?}");
    }
    let mut kept: Vec<String> = std::fs::read_dir(s.path("state"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.json.unusable-")
        })
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    kept.sort();
    assert_eq!(kept, ["first garbage", "second garbage"]);
}

// 12. Endpoints are base URLs: a query or a fragment is a config error.
#[test]
fn an_imds_endpoint_with_a_query_is_a_config_error() {
    for bad in ["?x=1", "#frag"] {
        let mut s = scenario(&format!("flake = \"{REF}\""));
        s.set_agent("imds-endpoint", &format!("\"{}/{bad}\"", s.imds.url()));
        let out = s.run(&["run"]);
        assert_eq!(out.code, 78, "{bad}: {out:?}");
        assert!(out.stderr.contains("agent.imds-endpoint"), "{out:?}");
        assert!(s.imds.with(|i| i.requests.is_empty()));
    }
}

// Also noted: an SSM reply about another parameter is not this one's value.
#[test]
fn an_ssm_reply_naming_another_parameter_is_refused() {
    let s = scenario(&format!("ssm-parameter = \"{PARAM}\""));
    s.ssm.with(|x| {
        x.params
            .insert(PARAM.into(), Param::string(REF_NEW_KERNEL, 1));
        x.faults
            .push_back(ssm::Fault::OtherName("/fleets/other".into()));
    });
    let out = s.run(&["run"]);
    assert_eq!(out.code, 69, "{out:?}");
    assert!(out.stderr.contains("names another parameter"), "{out:?}");
    assert!(s.calls().is_empty());
}

#[test]
fn an_ssm_reply_over_the_limit_is_refused_before_it_is_parsed() {
    let s = scenario(&format!("ssm-parameter = \"{PARAM}\""));
    let mut body =
        br#"{"Parameter":{"Name":"/fleets/secret","Type":"String","Version":1,"Value":""#.to_vec();
    body.extend(std::iter::repeat_n(b'x', 2 << 20));
    body.extend_from_slice(b"\"}}");
    s.ssm
        .with(|x| x.faults.push_back(ssm::Fault::Raw { status: 200, body }));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 69, "{out:?}");
    assert!(out.stderr.contains("larger than 64 KiB"), "{out:?}");
    assert_eq!(s.ssm.with(|x| x.requests.len()), 1, "not retried");
}

// Also noted: redaction of a SecureString target covers the reference and
// its ORG/FLAKE/VERSION part, which fh's URLs carry without the `#`.
#[test]
fn a_secure_targets_flake_part_in_fhs_urls_is_masked() {
    let mut s = scenario(&format!("ssm-parameter = \"{PARAM}\""));
    s.ssm
        .with(|x| x.params.insert(PARAM.into(), Param::secure(SECRET, 1)));
    s.behaviour
        .store_paths
        .insert(SECRET.into(), s.store_path("new-system"));
    s.behaviour.apply_stderr = Some(
        "GET https://api.flakehub.com/f/secret-org/secret-flake/0.1/output/nixosConfigurations.hidden\n"
            .into(),
    );
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    let everything = all_output(&s, &out);
    assert!(!everything.contains("secret-org"), "{everything}");
    assert!(
        out.stderr
            .contains(&format!("<SecureString {PARAM}>/output/")),
        "{out:?}"
    );
}

// The instance role's credentials are read with the agent's own bounded
// IMDS client: an endless reply costs neither memory nor a log line.
#[test]
fn an_endless_credentials_reply_is_cut_off() {
    let mut s = scenario(&format!("ssm-parameter = \"{PARAM}\""));
    s.ssm
        .with(|x| x.params.insert(PARAM.into(), Param::string(REF, 1)));
    s.imds.with(|i| {
        i.role = Some("web-role".into());
        i.endless_paths
            .push("/latest/meta-data/iam/security-credentials/web-role".into());
    });
    s.use_instance_role();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(out.stderr.contains("larger than 1024 KiB"), "{out:?}");
    assert!(
        out.stderr.len() < 256 << 10,
        "stderr is {} bytes",
        out.stderr.len()
    );
    // SAFETY: getrusage only fills the struct.
    let maxrss_kib = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut u);
        u.ru_maxrss
    };
    assert!(maxrss_kib < 200 << 10, "a child used {maxrss_kib} KiB");
    assert!(s.calls().is_empty());
}

// The transport crates' cap holds against a more specific filter, and the
// SDK's switch for logging bodies unredacted is taken away.
#[test]
fn no_filter_directive_outbids_the_transport_cap() {
    let mut s = scenario(&format!("ssm-parameter = \"{PARAM}\""));
    s.ssm
        .with(|x| x.params.insert(PARAM.into(), Param::secure(SECRET, 1)));
    s.behaviour
        .store_paths
        .insert(SECRET.into(), s.store_path("new-system"));
    s.imds.with(|i| i.role = Some("web-role".into()));
    s.use_instance_role();
    s.env.push((
        "NIXOS_AMI_AGENT_LOG".into(),
        "trace,aws_smithy_runtime::client::orchestrator=trace,aws_smithy_http_client=trace,reqwest=trace,hyper_util=trace".into(),
    ));
    s.env.push(("LOG_SENSITIVE_BODIES".into(), "true".into()));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    let everything = all_output(&s, &out);
    for secret in [
        "secret-org",
        imds::TOKEN_PREFIX,
        imds::ROLE_SECRET_KEY,
        "imds-double-session-token",
    ] {
        assert!(
            !everything.contains(secret),
            "{secret} leaked:\n{everything}"
        );
    }
}

// A state directory taken over from another user: what they left in it is
// not trusted (a lock they hold, a forged state).
#[test]
fn what_another_user_left_in_the_state_directory_is_not_trusted() {
    if !is_root() {
        eprintln!("SKIPPED: only root can make files another user's");
        return;
    }
    let s = Scenario::new();
    s.user_data(mime_with_script(
        &format!("flake = \"{REF}\""),
        &format!("#!/bin/sh\ntouch {}", s.path("script-ran").display()),
    ));
    let dir = s.path("state");
    std::fs::create_dir(&dir).unwrap();
    // Their lock, held; their state, claiming the script ran.
    let lock = std::fs::File::create(dir.join("lock")).unwrap();
    lock.try_lock().unwrap();
    std::fs::write(
        dir.join("state.json"),
        serde_json::json!({"format": 1, "instance-id": "i-0123456789abcdef0",
            "scripts": [{"label": "part 2", "size": 1, "sha256": "x", "started": "2026-01-01T00:00:00Z", "result": "exit status 0", "success": true}]})
        .to_string(),
    )
    .unwrap();
    for p in [&dir, &dir.join("lock"), &dir.join("state.json")] {
        std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
    }
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("replacing it"), "{out:?}");
    assert!(
        s.path("script-ran").exists(),
        "the forged record was not believed: {out:?}"
    );
    drop(lock);
}

// A bus (or logind) that never answers the reboot request: bounded, the
// request taken back, and the next run asks again.
#[test]
fn a_reboot_request_nobody_answers_is_bounded_and_asked_again() {
    // `boot`: no health gate asks the silent bus before the reboot does.
    let mut s = scenario(&format!("flake = \"{REF_NEW_KERNEL}\"\naction = \"boot\""));
    s.set_agent("reboot-timeout", "\"1s\"");
    let sock = s.path("silent-bus");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        let mut held = vec![];
        for c in listener.incoming().flatten() {
            held.push(c); // accepted, never answered
        }
    });
    s.env.push((
        "DBUS_SYSTEM_BUS_ADDRESS".into(),
        format!("unix:path={}", sock.display()),
    ));
    let start = Instant::now();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 1, "{out:?}");
    // The failed-units listing before the apply waits at most 10 s on the
    // same silent bus, then the reboot request its 1 s.
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    assert!(
        out.stderr
            .contains("the units failed before the apply could not be listed"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("no answer over D-Bus within 1s"),
        "{out:?}"
    );
    assert_eq!(s.state()["last-run"]["reboot"]["requested"], false);
    // The next run, with a bus that answers, asks for it.
    s.env.retain(|(k, _)| k != "DBUS_SYSTEM_BUS_ADDRESS");
    s.with_bus(true, true);
    let next = s.run(&["run"]);
    assert_eq!(next.code, 0, "{next:?}");
    assert_eq!(s.reboot_requests(), ["login1.Reboot(false)"]);
}

// A stop while logind is being asked is, on a real machine, the reboot
// itself most of the time: logind took the request and the shutdown stops
// the agent before the answer arrives. The request stays on record (with
// this boot's ID): the next boot takes it as done, while a run in the same
// boot (the stop was something else) asks again.
#[test]
fn a_stop_during_the_reboot_request_keeps_it_for_the_next_boot() {
    // `boot`: no health gate asks the silent bus before the reboot does.
    let mut s = scenario(&format!("flake = \"{REF_NEW_KERNEL}\"\naction = \"boot\""));
    s.set_agent("reboot-timeout", "\"1h\"");
    let sock = s.path("silent-bus");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let (asked, asking) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = vec![];
        for c in listener.incoming().flatten() {
            held.push(c); // accepted, never answered
            let _ = asked.send(());
        }
    });
    s.env.push((
        "DBUS_SYSTEM_BUS_ADDRESS".into(),
        format!("unix:path={}", sock.display()),
    ));
    let child = s.spawn(&["run"]);
    // The first connection lists the failed units before the apply (and
    // gives up after 10 s); the second is the reboot request.
    for _ in 0..2 {
        asking
            .recv_timeout(Duration::from_secs(30))
            .expect("the agent never connected to the bus");
    }
    // SAFETY: a signal to the agent we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = finish(child, Duration::from_secs(30));
    assert_eq!(out.code, 75, "{out:?}");
    assert!(out.stderr.contains("before logind answered"), "{out:?}");
    let state = s.state();
    let boot = std::fs::read_to_string(s.path("run/boot_id")).unwrap();
    for record in ["last-run", "last-applied"] {
        let r = &state[record]["reboot"];
        assert_eq!(r["requested"], true, "{record}: {state}");
        assert_eq!(r["boot-id"], boot.trim(), "{record}: {state}");
    }

    // The same boot goes on (the stop was not the reboot): asked again.
    s.env.retain(|(k, _)| k != "DBUS_SYSTEM_BUS_ADDRESS");
    s.with_bus(true, true);
    let same_boot = s.run(&["run"]);
    assert_eq!(same_boot.code, 0, "{same_boot:?}");
    assert_eq!(s.reboot_requests(), ["login1.Reboot(false)"]);
    assert_eq!(
        s.call_lines()
            .iter()
            .filter(|l| l.starts_with("fh apply"))
            .count(),
        1,
        "asking again does not apply again"
    );

    // The machine rebooted into the new system: done, nothing asked.
    s.reboot_into_profile();
    let next_boot = s.run(&["run"]);
    assert_eq!(next_boot.code, 0, "{next_boot:?}");
    assert!(next_boot.stderr.contains("nothing to do"), "{next_boot:?}");
    assert_eq!(s.reboot_requests().len(), 1, "no second reboot");
    assert_eq!(s.state()["last-applied"]["reboot"]["requested"], true);
}

// A stop during a user-data script: the run is interrupted (75), not a
// script failure (1); the script is recorded and not run again.
#[test]
fn a_stop_during_a_script_is_an_interruption() {
    let s = Scenario::new();
    let marker = s.path("script-started");
    s.user_data(mime_with_script(
        &format!("flake = \"{REF}\""),
        &format!("#!/bin/sh\ntouch {}\nsleep 30", marker.display()),
    ));
    let child = s.spawn(&["run"]);
    let start = Instant::now();
    while !marker.exists() {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: a signal to the agent we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = finish(child, Duration::from_secs(30));
    assert_eq!(out.code, 75, "{out:?}");
    assert!(out.stderr.contains("was stopped"), "{out:?}");
    let script = &s.state()["scripts"][0];
    assert!(
        script["result"]
            .as_str()
            .unwrap()
            .contains("interrupted by SIGTERM"),
        "{script}"
    );
    let next = s.run(&["run"]);
    assert_eq!(next.code, 0, "{next:?}");
    assert!(next.stderr.contains("not running it again"), "{next:?}");
}

// A stop while waiting for another run's lock ends at once.
#[test]
fn a_stop_while_waiting_for_the_lock_ends_at_once() {
    let mut s = scenario(&format!("flake = \"{REF}\""));
    s.set_agent("lock-wait", "\"1h\"");
    std::fs::create_dir(s.path("state")).unwrap();
    let lock = std::fs::File::create(s.path("state/lock")).unwrap();
    lock.try_lock().unwrap();
    let child = s.spawn(&["run"]);
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    // SAFETY: a signal to the agent we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = finish(child, Duration::from_secs(30));
    assert_eq!(out.code, 75, "{out:?}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(
        out.stderr
            .contains("interrupted by SIGTERM while waiting for the lock"),
        "{out:?}"
    );
    drop(lock);
}

// A secret straddling the place where a long line is cut is still masked.
#[test]
fn a_secret_across_the_line_cut_is_masked() {
    let mut s = scenario(&format!("ssm-parameter = \"{PARAM}\""));
    s.ssm
        .with(|x| x.params.insert(PARAM.into(), Param::secure(SECRET, 1)));
    s.behaviour
        .store_paths
        .insert(SECRET.into(), s.store_path("new-system"));
    for pad in [16 * 1024 - 20, 16 * 1024 - 5, 16 * 1024] {
        s.behaviour.apply_stderr = Some(format!("{} building {SECRET}\n", "x".repeat(pad)));
        let out = s.run(&["run"]);
        assert!(
            !out.stderr.contains("secret-org"),
            "pad {pad}: a prefix leaked"
        );
        std::fs::remove_dir_all(s.path("state")).unwrap();
        for link in ["run/current-system", "profiles/system"] {
            std::fs::remove_file(s.path(link)).unwrap();
            std::os::unix::fs::symlink(s.store_path("old-system"), s.path(link)).unwrap();
        }
    }
}

// Invisible and bidirectional characters from IMDS or fh reach no output.
#[test]
fn bidi_and_invisible_characters_from_outside_are_refused_or_escaped() {
    let mut s = scenario(&format!("flake = \"{REF}\""));
    s.behaviour
        .store_paths
        .insert(REF.into(), s.path("store/abc-\u{202e}desrever\u{200b}"));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("characters no store path holds"),
        "{out:?}"
    );
    let status = s.run(&["status"]);
    for text in [&out.stdout, &out.stderr, &status.stdout] {
        assert!(
            !text.contains('\u{202e}') && !text.contains('\u{200b}'),
            "{text}"
        );
    }
    let s = scenario(&format!("flake = \"{REF}\""));
    s.imds
        .with(|i| i.instance_id = "i-0abc\u{202e}\u{2066}gnp.exe".into());
    let out = s.run(&["run"]);
    assert_eq!(out.code, 69, "{out:?}");
    assert!(!out.stderr.contains('\u{202e}'), "{out:?}");
}

#[test]
fn doctor_fails_a_state_directory_that_run_refuses() {
    let mut s = scenario(&format!("flake = \"{REF}\""));
    std::fs::create_dir(s.path("elsewhere")).unwrap();
    std::os::unix::fs::symlink(s.path("elsewhere"), s.path("state")).unwrap();
    s.env.push(("X".into(), "y".into()));
    let out = s.run(&["doctor", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let c = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "state directory")
        .unwrap()
        .clone();
    assert_eq!(c["status"], "fail", "{c}");
    assert!(
        c["detail"].as_str().unwrap().contains("symbolic link"),
        "{c}"
    );
}
