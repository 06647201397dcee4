//! User data, end to end: each form the brief lists, run through the real
//! binary against the doubles, with exact argv and state asserted.

use nixos_ami_agent_tests::harness::{REF, Scenario, gzip, toml_user_data};

fn applied_once(s: &Scenario, action: &str) {
    assert_eq!(
        s.call_lines(),
        [
            "determinate-nixd login aws".to_owned(),
            format!("fh resolve --json {REF}"),
            s.fetch_line(REF),
            format!("fh apply nixos {REF} {action}"),
        ]
    );
}

#[test]
fn toml_user_data_applies_once_in_order() {
    let s = Scenario::new();
    s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    applied_once(&s, "switch");
    assert_eq!(s.current_system(), s.store_path("new-system"));
    assert_eq!(s.system_profile(), s.store_path("new-system"));
    let st = s.state();
    assert_eq!(st["instance-id"], "i-0123456789abcdef0");
    assert_eq!(st["last-run"]["outcome"], "applied");
    assert_eq!(st["last-run"]["target"]["flake"], REF);
    assert_eq!(st["last-run"]["target"]["source"], "user data");
    assert_eq!(
        st["last-run"]["store-path"],
        s.store_path("new-system").display().to_string()
    );
    assert_eq!(st["last-applied"], st["last-run"]);
}

#[test]
fn second_run_is_idempotent_and_says_why() {
    let s = Scenario::new();
    s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
    assert_eq!(s.run(&["run"]).code, 0);
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    let applies = s
        .call_lines()
        .iter()
        .filter(|l| l.starts_with("fh apply"))
        .count();
    assert_eq!(applies, 1, "{:?}", s.call_lines());
    assert!(
        out.stderr
            .contains("nothing to do: the running system and the boot default are already"),
        "{out:?}"
    );
    assert_eq!(s.state()["last-run"]["outcome"], "unchanged");
    assert_eq!(s.state()["last-applied"]["outcome"], "applied");
}

#[test]
fn gzipped_user_data_is_transparent() {
    let s = Scenario::new();
    s.user_data(gzip(&toml_user_data(&format!(
        "flake = \"{REF}\"\naction = \"boot\"\nreboot = \"never\""
    ))));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    applied_once(&s, "boot");
    assert_eq!(s.system_profile(), s.store_path("new-system"));
    assert_eq!(
        s.current_system(),
        s.store_path("old-system"),
        "boot leaves the running system alone"
    );
}

#[test]
fn json_user_data_from_terraform_jsonencode() {
    let s = Scenario::new();
    s.user_data(format!(
        r#"{{"nixos-ami-agent": {{"flake": "{REF}", "action": "test", "login": false}}}}"#
    ));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        s.call_lines(),
        [
            format!("fh resolve --json {REF}"),
            s.fetch_line(REF),
            format!("fh apply nixos {REF} test")
        ]
    );
    assert_eq!(s.current_system(), s.store_path("new-system"));
    // fh sets the system profile for every action, `test` included (fh
    // `src/cli/cmd/apply/mod.rs`: `apply_path_to_profile` before the
    // switch script); `test` only leaves the boot loader alone.
    assert_eq!(
        s.nix_call_lines().last().map(String::as_str),
        Some(
            format!(
                "nix --extra-experimental-features nix-command flakes build --no-link --max-jobs 0 --profile {} {}",
                s.path("profiles/system").display(),
                s.store_path("new-system").display()
            )
            .as_str()
        )
    );
}

fn mime(parts: &[(&str, &str)]) -> String {
    let mut m =
        String::from("Content-Type: multipart/mixed; boundary=\"//\"\nMIME-Version: 1.0\n\n");
    for (ctype, body) in parts {
        m.push_str(&format!(
            "--//\nContent-Type: {ctype}\nMIME-Version: 1.0\n\n{body}\n"
        ));
    }
    m.push_str("--//--\n");
    m
}

#[test]
fn mime_parts_settings_and_script_others_left_alone() {
    let s = Scenario::new();
    let marker = s.path("script-ran");
    s.user_data(mime(&[
        (
            "text/cloud-config; charset=\"us-ascii\"",
            "#cloud-config\nruncmd: [touch /should-not-happen]",
        ),
        ("text/x-nixos-ami-agent", &format!("flake = \"{REF}\"")),
        (
            "text/x-shellscript",
            &format!("#!/bin/sh\necho \"$PATH\" > {}", marker.display()),
        ),
    ]));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    applied_once(&s, "switch");
    let path = std::fs::read_to_string(&marker).expect("the script ran");
    // amazon-init's scripts found the system's programs; so do ours.
    let system_bin = format!(
        "/run/wrappers/bin:{}/sw/bin:",
        s.path("run/current-system").display()
    );
    assert!(path.starts_with(&system_bin), "{path}");
    assert!(
        out.stderr
            .contains("part 1 (text/cloud-config) is for another tool; left alone"),
        "{out:?}"
    );
    let scripts = &s.state()["scripts"];
    assert_eq!(scripts[0]["label"], "part 3");
    assert_eq!(scripts[0]["result"], "exit status 0");
    assert_eq!(scripts[0]["success"], true);
}

#[test]
fn shebang_script_runs_once_per_instance_like_amazon_init() {
    let s = Scenario::new();
    let log = s.path("runs");
    let script = format!(
        "#!/bin/sh\necho run >> {}\necho \"hello from the script\"\n",
        log.display()
    );
    s.user_data(script.clone());
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("hello from the script"),
        "script output reaches the log: {out:?}"
    );
    assert!(
        s.calls().is_empty(),
        "a script-only user data applies nothing itself"
    );
    assert_eq!(s.state()["last-run"]["outcome"], "no-target");

    // Same instance: not again, even when the script changed.
    s.user_data(script.replace("echo run", "echo changed"));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("already ran on this instance"),
        "{out:?}"
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "run\n");

    // An image made from this instance boots as a new instance: runs again.
    s.imds.with(|i| i.instance_id = "i-0fedcba987654321".into());
    assert_eq!(s.run(&["run"]).code, 0);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "run\nchanged\n");
    assert_eq!(s.state()["instance-id"], "i-0fedcba987654321");
}

#[test]
fn failing_script_is_recorded_not_rerun_and_exits_1() {
    let s = Scenario::new();
    s.user_data("#!/bin/sh\necho failing >&2\nexit 7\n");
    let out = s.run(&["run"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(s.state()["scripts"][0]["result"], "exit status 7");
    assert_eq!(s.state()["scripts"][0]["success"], false);
    let again = s.run(&["run"]);
    assert_eq!(again.code, 0, "recorded, not re-run: {again:?}");
}

#[test]
fn nix_expression_user_data_is_not_for_us() {
    let s = Scenario::new();
    s.user_data("{ config, pkgs, ... }: { services.nginx.enable = true; }\n");
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("not addressed to nixos-ami-agent"),
        "{out:?}"
    );
    assert!(s.calls().is_empty());
    assert_eq!(s.current_system(), s.store_path("old-system"));
}

#[test]
fn no_user_data_and_no_default_means_no_target() {
    let s = Scenario::new();
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("no user data"), "{out:?}");
    assert!(out.stderr.contains("nothing to do: no target"), "{out:?}");
    assert!(s.calls().is_empty());
    assert_eq!(s.imds.with(|i| i.gets_of("/latest/user-data")), 1);
}

/// Bad input: exit 65, the reason names source and key, nothing runs (no
/// stand-in is called, no script runs), and the failure is recorded.
#[test]
fn invalid_user_data_runs_nothing() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            toml_user_data("action = \"swtich\""),
            "user data: key `action`: line 2, column 10: unknown variant `swtich`",
        ),
        (
            toml_user_data(&format!(
                "flake = \"{REF}\"\nssm-parameter = \"/fleet/web\""
            )),
            "both set",
        ),
        (
            toml_user_data("flake = \"/nix/store/abc-nixos-system\""),
            "store paths",
        ),
        (toml_user_data("flake = \"--impure\""), "flag"),
        (
            toml_user_data("flake = \"org/flake/0.1#x\\n--option\""),
            "whitespace or control",
        ),
        (toml_user_data("[agent]\nfh = \"/bin/sh\""), "key `agent`"),
        (toml_user_data("flake = 42"), "key `flake`"),
        (toml_user_data("login = \"yes\""), "key `login`"),
        (
            br#"{"nixos-ami-agent": {"reboot": "maybe"}}"#.to_vec(),
            "key `reboot`: line 1",
        ),
        (gzip(&vec![b' '; 8 << 20]), "inflates to more than"),
        (
            mime(&[
                ("text/x-nixos-ami-agent", "flake = 1"),
                ("text/x-shellscript", "#!/bin/sh\ntouch /tmp/x"),
            ])
            .into_bytes(),
            "MIME part 1",
        ),
    ];
    for (ud, reason) in cases {
        let s = Scenario::new();
        s.user_data(ud);
        let out = s.run(&["run"]);
        assert_eq!(out.code, 65, "{reason}: {out:?}");
        assert!(out.stderr.contains(reason), "{reason}: {out:?}");
        assert!(s.calls().is_empty(), "{reason}: {:?}", s.calls());
        assert_eq!(s.state()["last-run"]["outcome"], "failed", "{reason}");
        assert!(
            s.state()["scripts"].as_array().unwrap().is_empty(),
            "{reason}"
        );
        assert_eq!(s.current_system(), s.store_path("old-system"));
    }
}

/// Neither the IMDS token nor the user data's content reaches the log, the
/// state or `status` (the log names size and SHA-256 instead), even at
/// debug level.
#[test]
fn tokens_and_user_data_content_are_never_logged() {
    use nixos_ami_agent_tests::imds::TOKEN_PREFIX;
    let s = Scenario::new();
    let ud = mime(&[
        (
            "text/x-nixos-ami-agent",
            &format!("# USERDATA-SECRET-1\nflake = \"{REF}\""),
        ),
        ("text/x-shellscript", "#!/bin/sh\n# USERDATA-SECRET-2\ntrue"),
    ]);
    s.user_data(ud.clone());
    let run = s.run(&["run"]);
    assert_eq!(run.code, 0, "{run:?}");
    let file = s.path("ud");
    std::fs::write(&file, &ud).unwrap();
    let sum = std::process::Command::new("sha256sum")
        .arg(&file)
        .output()
        .unwrap();
    let digest = String::from_utf8(sum.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert!(
        run.stderr
            .contains(&format!("{} bytes, sha256 {digest}", ud.len())),
        "{run:?}"
    );
    let status = s.run(&["status", "--json"]);
    let plan = s.run(&["plan"]);
    let state = std::fs::read_to_string(s.path("state/state.json")).unwrap();
    for (what, text) in [
        ("run", &run.stderr),
        ("status", &status.stdout),
        ("plan", &plan.stdout),
        ("plan log", &plan.stderr),
        ("state", &state),
    ] {
        assert!(
            !text.contains(TOKEN_PREFIX),
            "{what} leaks an IMDS token:\n{text}"
        );
        assert!(
            !text.contains("USERDATA-SECRET"),
            "{what} leaks user data:\n{text}"
        );
    }
}

// MIME as cloud-init recognises it: an mbox `From ` line first (Python's
// email library with unixfrom), headers before MIME-Version.
#[test]
fn mime_after_an_mbox_line_is_applied() {
    let s = Scenario::new();
    s.user_data(format!(
        "From nobody Mon Jan  1 00:00:00 2024\nSubject: web fleet\nMIME-Version: 1.0\n\
         Content-Type: multipart/mixed; boundary=\"B\"\n\n--B\n\
         Content-Type: text/x-nixos-ami-agent\n\nflake = \"{REF}\"\n--B--\n"
    ));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    applied_once(&s, "switch");
}

// An indented heredoc with a byte order mark is still our header.
#[test]
fn a_forgiven_header_is_applied() {
    let s = Scenario::new();
    s.user_data(format!(
        "\u{feff}\n    #nixos-ami-agent\n    flake = \"{REF}\"\n"
    ));
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    applied_once(&s, "switch");
}

// Not for us, but meant for us: the log says what it looks like.
#[test]
fn a_near_miss_is_explained_in_the_log() {
    let s = Scenario::new();
    s.user_data("#cloud-config\npackages: [git]\n");
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("cloud-init's format"), "{out:?}");
    assert!(s.call_lines().is_empty());

    let s = Scenario::new();
    s.user_data("#!nixos-ami-agent\nflake = \"x\"\n");
    let out = s.run(&["run"]);
    assert_eq!(out.code, 65, "refused, not run: {out:?}");
    assert!(out.stderr.contains("(no `!`)"), "{out:?}");
}
