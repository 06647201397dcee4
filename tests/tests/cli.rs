//! The command line: `plan` changes nothing, `status` reads state,
//! `validate` checks files offline, config errors, the run lock, help.

use nixos_ami_agent_tests::harness::{REF, Scenario, finish, toml_user_data};
use nixos_ami_agent_tests::ssm::Param;
use nixos_ami_agent_tests::standin::Mode;
use std::time::{Duration, Instant};

#[test]
fn plan_reads_but_changes_nothing() {
    let s = Scenario::new();
    s.user_data(
        "Content-Type: multipart/mixed; boundary=\"B\"\n\n--B\nContent-Type: text/x-nixos-ami-agent\n\n\
         ssm-parameter = \"/fleets/web\"\nreboot = \"never\"\n--B\nContent-Type: text/x-shellscript\n\n#!/bin/sh\ntrue\n--B--\n"
    );
    s.ssm.with(|x| {
        x.params
            .insert("/fleets/web".into(), Param::string(REF, 12))
    });
    let out = s.run(&["plan"]);
    assert_eq!(out.code, 0, "{out:?}");
    for line in [
        "instance:   i-0123456789abcdef0",
        &format!("target:     {REF}  [SSM parameter /fleets/web (version 12)]"),
        "action:     switch  [built-in default]",
        "reboot:     never  [user data]",
        "login:      true  [built-in default]",
        "script:     part 2 (",
        "1. determinate-nixd login aws",
        &format!("2. fh resolve --json {REF}"),
        &format!("3. fh apply nixos {REF} switch"),
        "4. run user-data script part 2",
    ] {
        assert!(
            out.stdout.contains(line),
            "missing {line:?}:\n{}",
            out.stdout
        );
    }
    assert!(s.calls().is_empty(), "plan ran {:?}", s.calls());
    assert!(!s.path("state").exists(), "plan wrote state");
    assert_eq!(s.current_system(), s.store_path("old-system"));

    let json = s.run(&["plan", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["target"]["value"], REF);
    assert_eq!(v["scripts"][0]["will-run"], true);
    assert_eq!(
        v["reboot"],
        serde_json::json!({"value": "never", "source": "user data"})
    );
    // Typed for a script: a boolean, and the user data as fields (its
    // content is never shown; its size and hash identify it).
    assert_eq!(
        v["login"],
        serde_json::json!({"value": true, "source": "built-in default"})
    );
    assert_eq!(v["user-data"]["kind"], "mime", "{v}");
    assert_eq!(v["user-data"]["description"], "MIME multipart", "{v}");
    assert!(v["user-data"]["size"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["user-data"]["sha256"].as_str().unwrap().len(), 64, "{v}");
}

#[test]
fn plan_offline_from_a_file_touches_no_network() {
    let s = Scenario::new();
    let file = s.path("ud.toml");
    std::fs::write(
        &file,
        toml_user_data("ssm-parameter = \"/fleets/web:canary\"\naction = \"boot\""),
    )
    .unwrap();
    let out = s.run(&["plan", "--user-data", file.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("unknown (offline plan from a file)"),
        "{out:?}"
    );
    assert!(
        out.stdout
            .contains("<the value of SSM parameter /fleets/web:canary, read at run time>"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("action:     boot  [user data]"),
        "{out:?}"
    );
    assert!(s.imds.with(|i| i.requests.is_empty()));
    assert!(s.ssm.with(|x| x.requests.is_empty()));
}

#[test]
fn status_for_people_and_machines() {
    let s = Scenario::new();
    let out = s.run(&["status"]);
    assert_eq!(out.code, 0);
    assert!(out.stdout.starts_with("no run recorded yet"), "{out:?}");
    assert_eq!(s.run(&["status", "--json"]).stdout.trim(), "null");

    s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
    assert_eq!(s.run(&["run"]).code, 0);
    let out = s.run(&["status"]);
    assert_eq!(out.code, 0, "{out:?}");
    for line in [
        "instance:     i-0123456789abcdef0",
        "last run:     applied at ",
        &format!("  target:     {REF} (from user data)"),
        "  action:     switch",
        "  reboot:     not needed (policy if-needed)",
    ] {
        assert!(
            out.stdout.contains(line),
            "missing {line:?}:\n{}",
            out.stdout
        );
    }
    let mut json: serde_json::Value =
        serde_json::from_str(&s.run(&["status", "--json"]).stdout).unwrap();
    // The state file as it is, plus the run history's `result` and `runs`.
    let obj = json.as_object_mut().unwrap();
    assert_eq!(obj.remove("result").unwrap()["exit-code"], 0);
    assert_eq!(obj.remove("runs").unwrap().as_array().unwrap().len(), 1);
    assert_eq!(json, s.state());
}

#[test]
fn validate_checks_files_offline() {
    let s = Scenario::new();
    let write = |name: &str, body: &[u8]| {
        let p = s.path(name);
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    };
    let good = write(
        "good",
        &toml_user_data(&format!("flake = \"{REF}\"\nreboot = \"always\"")),
    );
    let out = s.run(&["validate", &good]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("valid: #nixos-ami-agent TOML settings"),
        "{out:?}"
    );
    assert!(out.stdout.contains(&format!("flake = {REF}")), "{out:?}");

    let bad = write(
        "bad",
        b"#nixos-ami-agent\nflake = \"o/f/0.1#x\"\n\naction = \"swtich\"\n",
    );
    let out = s.run(&["validate", &bad]);
    assert_eq!(out.code, 65, "{out:?}");
    assert!(
        out.stdout
            .contains("key `action`: line 4, column 10: unknown variant `swtich`"),
        "{out:?}"
    );

    let json = write(
        "bad.json",
        b"{\"nixos-ami-agent\": {\n  \"flake\": \"o/f/0.1#x\",\n  \"login\": 1\n}}",
    );
    let out = s.run(&["validate", &json]);
    assert_eq!(out.code, 65, "{out:?}");
    assert!(
        out.stdout.contains("key `login`: line 3, column"),
        "{out:?}"
    );

    let other = write("nix", b"{ pkgs, ... }: { }\n");
    assert_eq!(s.run(&["validate", &other]).code, 65);
    let missing = s.path("missing").display().to_string();
    assert_eq!(s.run(&["validate", &missing]).code, 64);
    assert!(
        s.imds.with(|i| i.requests.is_empty()),
        "validate is offline"
    );
}

#[test]
fn invalid_config_file_is_78_and_touches_nothing() {
    for (defaults, agent, reason) in [
        ("flake = \"not a ref\"", None, "config file"),
        ("", Some(("retry-budget", "\"soon\"")), "agent.retry-budget"),
        ("", Some(("fh", "\"relative/fh\"")), "agent.fh"),
        ("frobnicate = true", None, "unknown field `frobnicate`"),
    ] {
        let mut s = Scenario::new();
        s.defaults = defaults.into();
        if let Some((k, v)) = agent {
            s.set_agent(k, v);
        }
        s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
        let out = s.run(&["run"]);
        assert_eq!(out.code, 78, "{reason}: {out:?}");
        assert!(out.stderr.contains(reason), "{reason}: {out:?}");
        assert!(s.imds.with(|i| i.requests.is_empty()), "{reason}");
        assert!(s.calls().is_empty());
    }
}

#[test]
fn second_run_waits_then_says_another_run_is_in_progress() {
    let mut s = Scenario::new();
    s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
    s.behaviour.apply = Mode::Hang;
    s.set_agent("apply-timeout", "\"30s\"");
    s.set_agent("lock-wait", "\"500ms\"");
    let first = s.spawn(&["run"]);
    // Wait until the first run is applying (it holds the lock).
    let start = Instant::now();
    while !s.call_lines().iter().any(|l| l.starts_with("fh apply")) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "first run never applied"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = s.run(&["run"]);
    assert_eq!(second.code, 75, "{second:?}");
    assert!(
        second.stderr.contains("another run is in progress"),
        "{second:?}"
    );
    // The status of a run in progress reads consistent state.
    let status = s.run(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["last-run"]["outcome"], "running");
    // SIGKILL: the kernel releases a dead run's lock; the next run
    // proceeds and notices the interruption.
    let mut first = first;
    first.kill().unwrap();
    let _ = finish(first, Duration::from_secs(10));
    s.behaviour.apply = Mode::Ok;
    let again = s.run(&["run"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stderr.contains("did not finish"), "{again:?}");
}

#[test]
fn help_teaches_and_documents_exit_codes() {
    let s = Scenario::new();
    let out = s.run(&["--help"]);
    assert_eq!(out.code, 0);
    for text in [
        "#nixos-ami-agent",
        "ssm-parameter",
        "Exit codes:",
        "  65  ",
        "  69  ",
        "  75  ",
        "  78  ",
        "validate",
    ] {
        assert!(
            out.stdout.contains(text),
            "--help lacks {text:?}:\n{}",
            out.stdout
        );
    }
    let out = s.run(&["frobnicate"]);
    assert_eq!(out.code, 64, "{out:?}");
}

#[test]
fn man_pages_and_completions_generate() {
    let s = Scenario::new();
    let out_dir = s.path("assets");
    let out = s.run(&["generate-assets", "--out", out_dir.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    for page in ["", "-run", "-plan", "-status", "-validate", "-doctor"] {
        let p = out_dir.join(format!("man/nixos-ami-agent{page}.1"));
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{}: not roff",
            p.display()
        );
    }
    let main = std::fs::read_to_string(out_dir.join("man/nixos-ami-agent.1")).unwrap();
    assert!(
        main.contains("Exit codes") && main.contains("doctor"),
        "the man page teaches what --help does"
    );
    for (file, needle) in [
        ("nixos-ami-agent.bash", "complete -F"),
        ("_nixos-ami-agent", "#compdef nixos-ami-agent"),
        ("nixos-ami-agent.fish", "complete -c nixos-ami-agent"),
    ] {
        let text = std::fs::read_to_string(out_dir.join("completions").join(file)).unwrap();
        assert!(text.contains(needle) && text.contains("validate"), "{file}");
    }
    assert!(
        !s.run(&["--help"]).stdout.contains("generate-assets"),
        "packaging detail stays out of --help"
    );
}

/// One line per run on stdout, for the machine's console (the units send
/// stdout there too): what the smoke test and an operator reading
/// `aws ec2 get-console-output` look for. No secret in it.
#[test]
fn run_prints_one_outcome_line_on_stdout() {
    use nixos_ami_agent_tests::harness::{REF, Scenario, toml_user_data};
    let line = |out: &nixos_ami_agent_tests::harness::Output| -> String {
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(lines.len(), 1, "{out:?}");
        assert!(
            lines[0].starts_with("nixos-ami-agent: run finished at "),
            "{out:?}"
        );
        lines[0].to_owned()
    };
    let s = Scenario::new();
    s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
    let first = line(&s.run(&["run"]));
    assert!(
        first.contains(": applied (exit 0): applied my-org/web/0.1#"),
        "{first}"
    );
    let second = line(&s.run(&["run"]));
    assert!(
        second.contains(": nothing to do (exit 0): nothing to do"),
        "{second}"
    );
    let bad = Scenario::new();
    bad.user_data(toml_user_data("action = \"swtich\""));
    let failed = line(&bad.run(&["run"]));
    assert!(
        failed.contains(": failed (exit 65): user data: key `action`"),
        "{failed}"
    );
}

// Issue 14: validate never says valid for what the agent would refuse or
// ignore, explains near misses, takes several files, `-`, `--json` and
// SSM values, and prints each error once.
#[test]
fn validate_catches_what_would_fail_on_the_instance() {
    let s = Scenario::new();
    let write = |name: &str, body: &[u8]| {
        let p = s.path(name);
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    };
    let cases: &[(&str, &[u8], &str)] = &[
        (
            "typo-header",
            b"#!nixos-ami-agent\nflake = \"o/f/0.1#x\"\n",
            "`#nixos-ami-agent` (no `!`)",
        ),
        (
            "too-big",
            format!(
                "#nixos-ami-agent\n#{}\nflake = \"o/f/0.1#x\"\n",
                "x".repeat(17_000)
            )
            .leak()
            .as_bytes(),
            "at most 16384 bytes",
        ),
        (
            "no-slash",
            b"#nixos-ami-agent\nssm-parameter = \"fleets/web/target\"\n",
            "SSM needs /fleets/web/target",
        ),
        (
            "reserved",
            b"#nixos-ami-agent\nssm-parameter = \"ssm/fleet\"\n",
            "which SSM reserves",
        ),
        (
            "cloud-config",
            b"#cloud-config\npackages: [git]\n",
            "hint: this is cloud-init's format",
        ),
        (
            "reboot-number",
            b"#nixos-ami-agent\nreboot = 5\n",
            "key `reboot`: line 2, column 10: must be one of `never`, `if-needed` or `always`",
        ),
        (
            "near-key",
            b"#nixos-ami-agent\nflakes = \"o/f/0.1#x\"\n",
            "`login`, `health`; did you mean `flake`?",
        ),
        (
            "github",
            b"#nixos-ami-agent\nflake = \"github:o/f#x\"\n",
            "publish it",
        ),
        (
            "trailing-comma.json",
            b"{\"nixos-ami-agent\": {\"flake\": \"o/f/0.1#x\",}}",
            "user data: line 1, column 43: trailing comma",
        ),
    ];
    for (name, body, needle) in cases {
        let f = write(name, body);
        let out = s.run(&["validate", &f]);
        assert_eq!(out.code, 65, "{name}: {out:?}");
        assert!(out.stdout.contains(needle), "{name}: {out:?}");
        assert!(
            !out.stderr.contains("failed:"),
            "{name}: printed once, on stdout: {out:?}"
        );
    }

    // Forgiven near misses are valid, and so is MIME after an mbox line.
    let bom = write(
        "bom",
        "\u{feff}\n  #nixos-ami-agent\n  flake = \"o/f/0.1#x\"\n".as_bytes(),
    );
    let mbox = write(
        "mbox",
        b"From nobody Mon Jan  1 00:00:00 2024\nMIME-Version: 1.0\n\
          Content-Type: multipart/mixed; boundary=\"B\"\n\n--B\n\
          Content-Type: text/x-nixos-ami-agent\n\nflake = \"o/f/0.1#x\"\n--B--\n",
    );
    let bad = write("bad", b"#nixos-ami-agent\naction = \"swtich\"\n");
    let out = s.run(&["validate", &bom, &mbox, &bad]);
    assert_eq!(out.code, 65, "one of three invalid: {out:?}");
    assert!(out.stdout.contains(&format!("{bom}: valid")), "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("{mbox}: valid: MIME multipart")),
        "{out:?}"
    );
    assert!(out.stdout.contains(&format!("{bad}: invalid")), "{out:?}");

    let json = s.run(&["validate", "--json", &bom, &bad]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("one JSON document");
    assert_eq!(v[0]["valid"], true, "{v}");
    assert_eq!(v[0]["settings"]["flake"], "o/f/0.1#x");
    assert_eq!(v[1]["valid"], false);
    assert!(v[1]["error"].as_str().unwrap().contains("swtich"), "{v}");

    // SSM parameter values, before they reach a fleet.
    let bare = write("value", b"my-org/web/0.2#nixosConfigurations.web\n");
    let toml = write(
        "value.toml",
        b"flake = \"my-org/web/0.2#nixosConfigurations.web\"\nreboot = \"never\"\n",
    );
    let wrong = write(
        "value-bad.toml",
        b"flake = \"my-org/web/0.2#x\"\nreboot = \"sometimes\"\n",
    );
    let out = s.run(&["validate", "--ssm-value", &bare, &toml]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("reboot = never"), "{out:?}");
    let out = s.run(&["validate", "--ssm-value", &wrong]);
    assert_eq!(out.code, 65, "{out:?}");
    assert!(out.stdout.contains("key `reboot`"), "{out:?}");

    // Standard input.
    let mut c = s.command(&["validate", "-"]);
    c.stdin(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"#nixos-ami-agent\nflake = \"o/f/0.1#x\"\n")
        .unwrap();
    let out = nixos_ami_agent_tests::harness::finish(child, std::time::Duration::from_secs(30));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("-: valid"), "{out:?}");
}

// `plan --json` says what went wrong in JSON, not nothing.
#[test]
fn plan_json_reports_invalid_input_as_json() {
    let s = Scenario::new();
    let f = s.path("bad");
    std::fs::write(&f, b"#nixos-ami-agent\naction = \"swtich\"\n").unwrap();
    let out = s.run(&["plan", "--json", "--user-data", f.to_str().unwrap()]);
    assert_eq!(out.code, 65, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["exit-code"], 65);
    assert!(v["error"].as_str().unwrap().contains("swtich"), "{v}");
}
