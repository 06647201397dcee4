//! Crash safety: the agent SIGKILLed at each step, then run again. Every
//! time the second run ends in the right outcome (applied once, or
//! retried), state.json is valid, and no temp files pile up. The lock is a
//! flock, so a dead run never holds it.

use nixos_ami_agent_tests::harness::{Output, REF, Scenario, finish, toml_user_data};
use nixos_ami_agent_tests::imds::Fault;
use nixos_ami_agent_tests::standin::Mode;
use std::time::{Duration, Instant};

fn scenario() -> Scenario {
    let s = Scenario::new();
    s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
    s
}

/// The state dir holds the state, the run history, the lock, scripts, and
/// at most the one fixed-name temp file per file that a write interrupted
/// at the wrong moment leaves.
fn state_is_sound(s: &Scenario) {
    let dir = s.path("state");
    if let Ok(text) = std::fs::read_to_string(dir.join("state.json")) {
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("state.json is not JSON ({e}): {text}"));
        assert_eq!(v["format"], 1, "{v}");
    }
    if let Ok(text) = std::fs::read_to_string(dir.join("runs.json")) {
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("runs.json is not JSON ({e}): {text}"));
        assert!(v.is_array(), "{v}");
    }
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert!(
                [
                    "state.json",
                    "runs.json",
                    "lock",
                    "scripts",
                    ".state.json.tmp",
                    ".runs.json.tmp",
                    // The fetched closure's GC root: left by a run killed
                    // between its fetch and its switch, for the next one.
                    "fetched",
                ]
                .contains(&name.as_str()),
                "unexpected file in the state dir: {name}"
            );
        }
    }
}

fn killed(out: &Output) {
    assert_eq!(out.code, -1, "the agent was not killed: {out:?}");
}

fn second_run_applies(s: &mut Scenario) -> Output {
    s.behaviour.login = Mode::Ok;
    s.behaviour.apply = Mode::Ok;
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(s.current_system(), s.store_path("new-system"));
    assert!(
        matches!(
            s.state()["last-run"]["outcome"].as_str(),
            Some("applied" | "unchanged")
        ),
        "{}",
        s.state()
    );
    state_is_sound(s);
    assert!(
        !s.path("state/.state.json.tmp").exists(),
        "a finished run leaves no temp file"
    );
    out
}

fn applies(s: &Scenario) -> usize {
    s.call_lines()
        .iter()
        .filter(|l| l.starts_with("fh apply"))
        .count()
}

/// Runs the agent and SIGKILLs it once `when` holds.
fn kill_when(s: &Scenario, when: impl Fn(&Scenario) -> bool) -> Output {
    let mut child = s.spawn(&["run"]);
    let start = Instant::now();
    while !when(s) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the kill point was never reached"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the agent ended before the kill point: {status}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    finish(child, Duration::from_secs(10))
}

#[test]
fn killed_after_the_token_while_fetching_user_data() {
    let mut s = scenario();
    // The second GET (user data) hangs; instance-id answers at once.
    s.imds.with(|i| {
        i.get_faults.extend([
            Fault::Delay(Duration::ZERO),
            Fault::Delay(Duration::from_secs(20)),
        ])
    });
    killed(&kill_when(&s, |s| {
        s.imds.with(|i| i.gets_of("/latest/user-data") > 0)
    }));
    state_is_sound(&s);
    assert_eq!(
        s.state()["last-run"]["outcome"],
        "running",
        "the interrupted run is visible"
    );
    let out = second_run_applies(&mut s);
    assert!(out.stderr.contains("did not finish"), "{out:?}");
    assert_eq!(applies(&s), 1);
}

#[test]
fn killed_during_login() {
    let mut s = scenario();
    s.behaviour.login = Mode::KillAgent;
    killed(&s.run(&["run"]));
    state_is_sound(&s);
    assert_eq!(applies(&s), 0);
    second_run_applies(&mut s);
    assert_eq!(applies(&s), 1);
}

#[test]
fn killed_during_apply_is_retried() {
    let mut s = scenario();
    s.behaviour.apply = Mode::Hang;
    killed(&kill_when(&s, |s| applies(s) == 1));
    state_is_sound(&s);
    second_run_applies(&mut s);
    assert_eq!(applies(&s), 2, "the interrupted apply is done again");
}

#[test]
fn killed_after_apply_before_the_state_write_is_not_applied_again() {
    let mut s = scenario();
    s.behaviour.apply = Mode::KillAgent;
    killed(&s.run(&["run"]));
    state_is_sound(&s);
    assert_eq!(s.state()["last-run"]["outcome"], "running");
    let out = second_run_applies(&mut s);
    assert!(out.stderr.contains("nothing to do"), "{out:?}");
    assert_eq!(applies(&s), 1, "the system already switched: applied once");
    assert_eq!(s.state()["last-run"]["outcome"], "unchanged");
}

#[test]
fn killed_during_a_script_does_not_run_it_again() {
    let s = Scenario::new();
    let runs = s.path("script-runs");
    s.user_data(format!(
        "#!/bin/sh\necho run >> {}\nkill -KILL $PPID\nsleep 5\n",
        runs.display()
    ));
    killed(&s.run(&["run"]));
    state_is_sound(&s);
    let out = s.run(&["run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("already ran on this instance (interrupted)"),
        "{out:?}"
    );
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n");
    let status = s.run(&["status"]);
    assert!(
        status.stdout.contains("interrupted (not run again)"),
        "{status:?}"
    );
}

/// A crash during a state write leaves the old state.json (the new one is
/// only renamed into place when complete) and a temp file, complete or
/// not; the next run must neither trip over it nor keep it.
#[test]
fn interrupted_state_write_leaves_a_usable_state() {
    for leftover in [
        &b""[..],
        b"{\"format\": 1, \"instance-id\": \"i-0",
        b"\0\0\0\0",
    ] {
        let mut s = scenario();
        assert_eq!(s.run(&["run"]).code, 0);
        std::fs::write(s.path("state/.state.json.tmp"), leftover).unwrap();
        second_run_applies(&mut s);
        assert_eq!(applies(&s), 1);
    }
}

/// SIGKILL at random moments, over and over: whatever was hit (IMDS,
/// state writes, login, resolve, apply), the state stays sound, and a run
/// left alone converges.
#[test]
fn killed_at_random_moments() {
    let mut s = scenario();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..40 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let mut child = s.spawn(&["run"]);
        std::thread::sleep(Duration::from_micros(rng % 30_000));
        let _ = child.kill();
        let out = finish(child, Duration::from_secs(30));
        assert!(matches!(out.code, -1 | 0), "{out:?}");
        state_is_sound(&s);
    }
    second_run_applies(&mut s);
    assert!(applies(&s) >= 1);
}

/// A run started while another one holds the lock waits for it, then finds
/// nothing to do: exactly one applies.
#[test]
fn two_runs_started_together_apply_once() {
    let mut s = scenario();
    s.set_agent("lock-wait", "\"30s\"");
    let a = s.spawn(&["run"]);
    let b = s.spawn(&["run"]);
    let (a, b) = (
        finish(a, Duration::from_secs(60)),
        finish(b, Duration::from_secs(60)),
    );
    assert_eq!((a.code, b.code), (0, 0), "{a:?}\n{b:?}");
    assert_eq!(applies(&s), 1, "{:?}", s.call_lines());
    let both = format!("{}{}", a.stderr, b.stderr);
    assert!(
        both.contains("nothing to do"),
        "the second run found the first one's work: {both}"
    );
}

/// `status` while a run is applying always reads a whole state.
#[test]
fn status_during_a_run_is_consistent() {
    let mut s = scenario();
    s.behaviour.apply = Mode::Hang;
    s.set_agent("apply-timeout", "\"20s\"");
    let run = s.spawn(&["run"]);
    for _ in 0..50 {
        let st = s.run(&["status", "--json"]);
        assert_eq!(st.code, 0, "{st:?}");
        let v: serde_json::Value =
            serde_json::from_str(&st.stdout).unwrap_or_else(|e| panic!("{e}: {}", st.stdout));
        // Nothing yet, the run history alone (before the state file), or
        // a whole state with it.
        assert!(
            v.is_null() || v["format"] == 1 || (v["format"].is_null() && v["runs"].is_array()),
            "{v}"
        );
    }
    let mut run = run;
    run.kill().unwrap();
    let _ = finish(run, Duration::from_secs(10));
}
