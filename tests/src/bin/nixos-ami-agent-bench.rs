//! Benchmarks: what the agent costs and how fast it reacts, next to the
//! floor, in one run, against the same local doubles as the tests.
//!
//! nixos-ami-agent-bench [--smoke] [--out FILE]
//! nixos-ami-agent-bench --profile noop|apply|ssm PROGRAM [ARGS...]
//!
//! `--profile` sets up one case's doubles and runs the agent once under
//! PROGRAM (`perf record -g`, `strace -f -r -o FILE`, ...), to see where
//! the time goes.
//!
//! Reports medians over repeated runs and ratios measured in the same run
//! (the machine is shared and noisy); asserts nothing about time.

use nixos_ami_agent_tests::ebs::{Ebs, EbsDouble, write_nixos_like_image};
use nixos_ami_agent_tests::harness::{
    REF, Scenario, publish_command, rt, toml_user_data, workspace_bin,
};
use nixos_ami_agent_tests::ssm::{Fault, Param};
use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Usage {
    wall: Duration,
    cpu: Duration,
    max_rss_kib: i64,
    code: i32,
}

/// Runs a command to completion and reads its own resource usage (wait4),
/// not the harness's.
fn measure(mut cmd: Command) -> Usage {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let start = Instant::now();
    let child = cmd.spawn().expect("spawn");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, and status and ru outlive the call.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid, "wait4 failed");
    let wall = start.elapsed();
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    std::mem::forget(child);
    Usage {
        wall,
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        max_rss_kib: ru.ru_maxrss,
        code,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Clone, Copy)]
enum Case {
    NoOp,
    Apply,
    SsmNoOp,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::NoOp => "no-op (flake already applied)",
            Case::Apply => "apply (flake)",
            Case::SsmNoOp => "no-op via SSM parameter",
        }
    }
}

fn scenario(case: Case) -> Scenario {
    let s = Scenario::new();
    match case {
        Case::SsmNoOp => {
            s.user_data(toml_user_data("ssm-parameter = \"/fleets/web\""));
            s.ssm
                .with(|x| x.params.insert("/fleets/web".into(), Param::string(REF, 1)));
        }
        _ => {
            s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
        }
    }
    if !matches!(case, Case::Apply) {
        for link in ["run/current-system", "profiles/system"] {
            std::fs::remove_file(s.path(link)).unwrap();
            std::os::unix::fs::symlink(s.store_path("new-system"), s.path(link)).unwrap();
        }
    }
    s
}

fn floor_command(s: &Scenario, case: Case) -> Command {
    let cmd = s.command(&["run"]);
    let program = workspace_bin("bench-floor");
    let mut floor = Command::new(program);
    // The same environment (stand-in directory, endpoints).
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            floor.env(k, v);
        }
    }
    // fh needs `nix`: the floor gives the stand-ins the PATH the agent
    // gives them (the running system's sw/bin first).
    let mut path = std::ffi::OsString::from(format!(
        "/run/wrappers/bin:{}/sw/bin:",
        s.path("run/current-system").display()
    ));
    path.push(
        cmd.get_envs()
            .find(|(k, _)| *k == "PATH")
            .and_then(|(_, v)| v)
            .unwrap_or_default(),
    );
    floor.env("PATH", path);
    floor.arg(s.imds.url());
    if matches!(case, Case::SsmNoOp) {
        floor.args(["--ssm", &s.ssm.url(), "/fleets/web"]);
    }
    floor.arg("--login").arg(s.path("bin/determinate-nixd"));
    floor.arg("--resolve").arg(s.path("bin/fh")).arg(REF);
    if matches!(case, Case::Apply) {
        floor.arg("--apply");
    }
    floor
}

struct Row {
    case: &'static str,
    agent_wall: f64,
    floor_wall: f64,
    agent_cpu: f64,
    floor_cpu: f64,
    agent_rss: f64,
    floor_rss: f64,
}

fn overhead(iterations: usize) -> Vec<Row> {
    let mut rows = vec![];
    for case in [Case::NoOp, Case::Apply, Case::SsmNoOp] {
        let (mut aw, mut fw, mut ac, mut fc, mut ar, mut fr) =
            (vec![], vec![], vec![], vec![], 0i64, 0i64);
        for i in 0..iterations + 1 {
            // Alternate which goes first, so drift hits both alike.
            let mut pair = [None, None];
            for which in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
                let s = scenario(case);
                let u = if which == 0 {
                    measure(s.command(&["run"]))
                } else {
                    measure(floor_command(&s, case))
                };
                assert_eq!(
                    u.code,
                    0,
                    "{} ({}) failed",
                    case.name(),
                    if which == 0 { "agent" } else { "floor" }
                );
                pair[which] = Some(u);
            }
            if i == 0 {
                continue; // warm-up: page cache, first spawn
            }
            let [a, f] = pair.map(Option::unwrap);
            aw.push(ms(a.wall));
            fw.push(ms(f.wall));
            ac.push(ms(a.cpu));
            fc.push(ms(f.cpu));
            ar = ar.max(a.max_rss_kib);
            fr = fr.max(f.max_rss_kib);
        }
        rows.push(Row {
            case: case.name(),
            agent_wall: median(aw),
            floor_wall: median(fw),
            agent_cpu: median(ac),
            floor_cpu: median(fc),
            agent_rss: ar as f64 / 1024.0,
            floor_rss: fr as f64 / 1024.0,
        });
    }
    rows
}

/// Lag from the moment IMDS starts accepting to the agent's first
/// successful token request.
fn late_imds(trials: usize, max_delay_ms: u64) -> Vec<f64> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut lags = vec![];
    for _ in 0..trials {
        let delay = Duration::from_millis(rng.below(max_delay_ms + 1));
        let mut s = Scenario::with_imds_delay(delay);
        s.set_agent("retry-budget", "\"60s\"");
        s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
        let u = measure(s.command(&["run"]));
        assert_eq!(u.code, 0);
        let since = s
            .imds
            .listening_since
            .lock()
            .unwrap()
            .expect("IMDS started");
        let first = s.imds.with(|i| {
            i.requests
                .iter()
                .find(|r| r.method == "PUT" && r.status == 200)
                .map(|r| r.at)
                .expect("a token")
        });
        lags.push(ms(first.saturating_duration_since(since)));
    }
    lags
}

/// Calls and time to get through N throttled GetParameter calls.
fn throttling(ns: &[usize]) -> Vec<(usize, usize, f64, i32)> {
    ns.iter()
        .map(|&n| {
            let mut s = Scenario::new();
            s.set_agent("retry-budget", "\"120s\"");
            s.user_data(toml_user_data("ssm-parameter = \"/fleets/web\""));
            s.ssm.with(|x| {
                x.params.insert("/fleets/web".into(), Param::string(REF, 1));
                x.faults.extend(std::iter::repeat_n(Fault::Throttling, n));
            });
            let u = measure(s.command(&["run"]));
            let (calls, first, last) = s.ssm.with(|x| {
                (
                    x.requests.len(),
                    x.requests.first().map(|r| r.at),
                    x.requests.last().map(|r| r.at),
                )
            });
            let through = match (first, last) {
                (Some(a), Some(b)) => ms(b - a),
                _ => 0.0,
            };
            (n, calls, through, u.code)
        })
        .collect()
}

/// One contender of the upload benchmark.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Uploader {
    /// `nixos-ami-publish snapshot`: zero blocks skipped.
    Sparse,
    /// The same with `--all-blocks`: what upload-ami's EBS-direct mode
    /// sends.
    AllBlocks,
    /// `bench-floor ebs`: a bare loop of PutSnapshotBlock requests.
    Floor,
}

impl Uploader {
    fn name(self) -> &'static str {
        match self {
            Uploader::Sparse => "nixos-ami-publish (zero blocks skipped)",
            Uploader::AllBlocks => "every block sent (upload-ami's EBS-direct mode)",
            Uploader::Floor => "floor: bare PutSnapshotBlock loop",
        }
    }

    fn command(self, ebs: &EbsDouble, home: &std::path::Path, disk: &std::path::Path) -> Command {
        let disk = disk.to_str().expect("a UTF-8 temporary path");
        match self {
            Uploader::Floor => {
                let mut c = Command::new(workspace_bin("bench-floor"));
                c.args(["ebs", &ebs.url(), disk]);
                c
            }
            _ => {
                let mut args = vec!["snapshot", "--disk", disk, "--json"];
                if self == Uploader::AllBlocks {
                    args.push("--all-blocks");
                }
                publish_command(&ebs.url(), "eu-west-1", home, &args)
            }
        }
    }
}

struct UploadRow {
    who: Uploader,
    size: u64,
    wall: f64,
    cpu: f64,
    rss_mib: f64,
    blocks_sent: u64,
}

/// Runs `who` on `disk` and returns its usage and the blocks the double
/// accepted (counted there, not taken from the uploader's word).
fn upload_once(
    who: Uploader,
    ebs: &EbsDouble,
    home: &std::path::Path,
    disk: &std::path::Path,
) -> (Usage, u64) {
    use std::sync::atomic::Ordering;
    let before = ebs.blocks_put.load(Ordering::Relaxed);
    let u = measure(who.command(ebs, home, disk));
    assert_eq!(u.code, 0, "{} failed on {}", who.name(), disk.display());
    (u, ebs.blocks_put.load(Ordering::Relaxed) - before)
}

/// The upload benchmark: the same NixOS-like disk uploaded by each
/// contender, `iterations` times after a warm-up, in rotating order.
fn uploads(dir: &std::path::Path, size: u64, iterations: usize) -> (Vec<UploadRow>, usize) {
    let disk = dir.join("nixos.raw");
    let data = write_nixos_like_image(&disk, size, DATA_PERCENT, 42).expect("write the image");
    let ebs = EbsDouble::start(rt(), Ebs::default());
    let order = [Uploader::Sparse, Uploader::AllBlocks, Uploader::Floor];
    let mut samples: Vec<(Vec<f64>, Vec<f64>, i64, u64)> =
        order.iter().map(|_| (vec![], vec![], 0, 0)).collect();
    for i in 0..iterations + 1 {
        for k in 0..order.len() {
            let which = (i + k) % order.len();
            let (u, sent) = upload_once(order[which], &ebs, dir, &disk);
            if i == 0 {
                continue; // warm-up: the page cache, the double's first connections
            }
            let s = &mut samples[which];
            s.0.push(u.wall.as_secs_f64());
            s.1.push(u.cpu.as_secs_f64());
            s.2 = s.2.max(u.max_rss_kib);
            s.3 = sent;
        }
        // The double keeps digests only; forget the finished snapshots.
        ebs.with(|e| e.snapshots.clear());
    }
    let rows = order
        .iter()
        .zip(samples)
        .map(|(&who, (wall, cpu, rss, sent))| UploadRow {
            who,
            size,
            wall: median(wall),
            cpu: median(cpu),
            rss_mib: rss as f64 / 1024.0,
            blocks_sent: sent,
        })
        .collect();
    let _ = std::fs::remove_file(&disk);
    (rows, data.len())
}

/// Peak RSS of the sparse uploader as the disk grows (one run each).
fn upload_rss(dir: &std::path::Path, sizes: &[u64]) -> Vec<UploadRow> {
    let ebs = EbsDouble::start(rt(), Ebs::default());
    sizes
        .iter()
        .map(|&size| {
            let disk = dir.join(format!("rss-{size}.raw"));
            write_nixos_like_image(&disk, size, DATA_PERCENT, 42).expect("write the image");
            let (u, sent) = upload_once(Uploader::Sparse, &ebs, dir, &disk);
            let _ = std::fs::remove_file(&disk);
            ebs.with(|e| e.snapshots.clear());
            UploadRow {
                who: Uploader::Sparse,
                size,
                wall: u.wall.as_secs_f64(),
                cpu: u.cpu.as_secs_f64(),
                rss_mib: u.max_rss_kib as f64 / 1024.0,
                blocks_sent: sent,
            }
        })
        .collect()
}

/// Share of the benchmark image's 512 KiB blocks that hold data.
const DATA_PERCENT: u64 = 30;

/// The NixOS module's watch.interval and watch.randomizedDelay defaults.
const DEFAULT_INTERVAL: u64 = 900;
const DEFAULT_DELAY: u64 = 300;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Per-second GetParameter calls of a fleet on the watch timer, plus a
/// launch burst. Returns (peak, p99, mean) over the simulated horizon.
fn fleet(
    instances: u64,
    interval: u64,
    delay: u64,
    burst: u64,
    burst_window: u64,
    horizon: u64,
) -> (u64, u64, f64) {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut per_second = vec![0u64; horizon as usize];
    // A run takes about a second; the timer counts from its end.
    let period = |rng: &mut Rng| 1 + interval + rng.below(delay + 1);
    // One call at t0, then (`repeat`) one per timer period.
    let mut add = |t0: u64, rng: &mut Rng, repeat: bool| {
        let mut t = t0;
        while t < horizon {
            per_second[t as usize] += 1;
            if !repeat {
                break;
            }
            t += period(rng);
        }
    };
    // The running fleet: in steady state, its phases are spread evenly.
    for _ in 0..instances {
        let t0 = rng.below(interval + delay);
        add(t0, &mut rng, true);
    }
    // The burst: launched within the window, halfway through the horizon.
    // Each new instance reads the parameter twice at boot: its fetch, as
    // soon as the network is online (~10 s after launch), and its boot
    // run after multi-user.target (~20 s); then the timer's runs.
    for _ in 0..burst {
        let launch = horizon / 2 + rng.below(burst_window);
        add(launch + 10, &mut rng, false);
        add(launch + 20, &mut rng, true);
    }
    let mut sorted = per_second.clone();
    sorted.sort_unstable();
    let p99 = sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)];
    let mean = per_second.iter().sum::<u64>() as f64 / per_second.len() as f64;
    (*sorted.last().unwrap(), p99, mean)
}

/// How long one run takes to apply a new target once it has read the
/// parameter (download from FlakeHub Cache and switch): uniform in this
/// range, seconds. An assumption, the same for both models.
const APPLY_SECS: (u64, u64) = (60, 120);
/// From `put-parameter` to the association's first command on an
/// instance (EventBridge delivery, State Manager scheduling): an
/// assumption.
const PUSH_START_SECS: f64 = 10.0;
/// SSM's standard-throughput GetParameter limit, per account and region.
const SSM_TPS: u64 = 40;

/// A rollout's simulated outcome: per-instance change-to-converged
/// latencies and the GetParameter calls it caused.
struct Rollout {
    p50: f64,
    p99: f64,
    all: f64,
    peak_tps: u64,
    mean_tps: f64,
    throttled: u64,
    /// Runs whose read outlasted the retry budget (exit 75): not
    /// converged by this rollout.
    gave_up: u64,
}

/// The agent's default retry budget, seconds.
const RETRY_BUDGET: f64 = 120.0;

/// SSM's limit as a per-second budget: a call over it is throttled and
/// retried after the agent's backoff (agent/src/retry.rs,
/// `Backoff::with_budget`: 50 ms doubling to 5 s, equal jitter); returns
/// when the call got through, or `None` when the retry budget ran out.
fn get_parameter(calls: &mut Vec<u64>, throttled: &mut u64, t0: f64, rng: &mut Rng) -> Option<f64> {
    let delay = |failures: u32, rng: &mut Rng| {
        let exp = (0.05 * f64::from(1u32 << (failures - 1).min(16))).min(5.0);
        exp / 2.0 + exp / 2.0 * (rng.below(1_000) as f64 / 1_000.0)
    };
    let mut t = t0;
    let mut failures = 0;
    loop {
        let sec = t as usize;
        if sec >= calls.len() {
            calls.resize(sec + 1, 0);
        }
        calls[sec] += 1;
        if calls[sec] <= SSM_TPS {
            return Some(t);
        }
        *throttled += 1;
        failures += 1;
        t += delay(failures, rng);
        if t - t0 > RETRY_BUDGET {
            return None;
        }
    }
}

fn summarize(mut latencies: Vec<f64>, calls: &[u64], throttled: u64, gave_up: u64) -> Rollout {
    latencies.sort_by(f64::total_cmp);
    let at = |q: usize| latencies[(latencies.len() * q / 100).min(latencies.len() - 1)];
    let all = *latencies.last().unwrap();
    let window = &calls[..(all.ceil() as usize).min(calls.len()).max(1)];
    Rollout {
        p50: at(50),
        p99: at(99),
        all,
        peak_tps: window.iter().copied().max().unwrap_or(0),
        mean_tps: window.iter().sum::<u64>() as f64 / window.len() as f64,
        throttled,
        gave_up,
    }
}

/// The pull model: the parameter changes at t = 0 and each instance sees
/// it at its next timer run (its phase spread evenly over its period).
fn rollout_by_timer(instances: u64, interval: u64, delay: u64) -> Rollout {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut calls = vec![0u64; 4 * 3600];
    let mut throttled = 0;
    let mut latencies = vec![];
    let mut gave_up = 0;
    for _ in 0..instances {
        let period = 1 + interval + rng.below(delay + 1);
        let mut next = rng.below(period) as f64;
        // A run that gave up is retried at the next timer run.
        let read = loop {
            match get_parameter(&mut calls, &mut throttled, next, &mut rng) {
                Some(t) => break t,
                None => {
                    gave_up += 1;
                    next += (1 + interval + rng.below(delay + 1)) as f64;
                }
            }
        };
        let apply = (APPLY_SECS.0 + rng.below(APPLY_SECS.1 - APPLY_SECS.0 + 1)) as f64;
        latencies.push(read + apply);
        // Its later runs (nothing to do) still read the parameter.
        let mut t = read + apply + 1.0 + (interval + rng.below(delay + 1)) as f64;
        while (t as usize) < calls.len() {
            get_parameter(&mut calls, &mut throttled, t, &mut rng);
            t += (1 + interval + rng.below(delay + 1)) as f64;
        }
    }
    summarize(latencies, &calls, throttled, gave_up)
}

/// The push model: the parameter's change starts the association, which
/// runs the agent on `concurrency` instances at a time (State Manager's
/// MaxConcurrency, a sliding window); `background` is a slow timer still
/// running as a safety net (0: none).
fn rollout_by_push(instances: u64, concurrency: u64, background: u64) -> Rollout {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut calls = vec![0u64; 4 * 3600];
    let mut throttled = 0;
    if background > 0 {
        for _ in 0..instances {
            let mut t = rng.below(background) as f64;
            while (t as usize) < calls.len() {
                calls[t as usize] += 1;
                t += background as f64;
            }
        }
    }
    // Free times of the association's slots.
    let mut slots = std::collections::BinaryHeap::new();
    for _ in 0..concurrency.min(instances) {
        slots.push(std::cmp::Reverse(PUSH_START_SECS.to_bits()));
    }
    let mut latencies = vec![];
    let mut gave_up = 0;
    for _ in 0..instances {
        let std::cmp::Reverse(free) = slots.pop().expect("a slot");
        let start = f64::from_bits(free);
        let done = match get_parameter(&mut calls, &mut throttled, start + 0.5, &mut rng) {
            Some(read) => {
                let apply = (APPLY_SECS.0 + rng.below(APPLY_SECS.1 - APPLY_SECS.0 + 1)) as f64;
                latencies.push(read + apply);
                read + apply
            }
            // The command failed (exit 75): counted against MaxErrors, and
            // the instance left to the next push or its timer.
            None => {
                gave_up += 1;
                start + RETRY_BUDGET
            }
        };
        slots.push(std::cmp::Reverse(done.to_bits()));
    }
    summarize(latencies, &calls, throttled, gave_up)
}

fn file_size(path: &std::path::Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

/// Runs `wrapper... agent --config ... run` with the scenario's
/// environment, and exits with its status.
fn profile(case: &str, wrapper: &[String]) -> ! {
    let case = match case {
        "noop" => Case::NoOp,
        "apply" => Case::Apply,
        "ssm" => Case::SsmNoOp,
        other => panic!("--profile: unknown case {other:?} (noop, apply, ssm)"),
    };
    assert!(!wrapper.is_empty(), "--profile CASE PROGRAM [ARGS...]");
    let s = scenario(case);
    let agent = s.command(&["run"]);
    let mut cmd = Command::new(&wrapper[0]);
    cmd.args(&wrapper[1..])
        .arg(agent.get_program())
        .args(agent.get_args())
        .env_clear();
    for (k, v) in agent.get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    let status = cmd.status().expect("run the wrapper");
    std::process::exit(status.code().unwrap_or(1));
}

/// `ListJobs` and `ListUnits*` entries, as systemd1(5) gives them.
type Job = (
    u32,
    String,
    String,
    String,
    zbus::OwnedObjectPath,
    zbus::OwnedObjectPath,
);
type Unit = (
    String,
    String,
    String,
    String,
    String,
    String,
    zbus::OwnedObjectPath,
    u32,
    String,
    zbus::OwnedObjectPath,
);

/// A log line's timestamp (the fmt layer's RFC 3339, first on the line).
fn stamp(line: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339(line.split_whitespace().next()?).ok()
}

/// The health gate on a healthy switch with no checks configured: from
/// `fh apply` (and so switch-to-configuration, which it waits for)
/// exiting to the verdict, read from the agent's own log. The floor: what
/// the gate cannot do without, over the same bus and systemd double, from
/// a bare zbus client: connect, GetUnitByPID, ListJobs twice a poll
/// (200 ms) apart, ListUnitsFiltered(failed).
fn gate_cost(iterations: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut gate, mut floor) = (vec![], vec![]);
    for _ in 0..iterations {
        let s = Scenario::new();
        s.user_data(toml_user_data(&format!("flake = \"{REF}\"")));
        let out = s.run(&["run"]);
        assert_eq!(out.code, 0, "{out:?}");
        let at = |needle: &str| {
            out.stderr
                .lines()
                .find(|l| l.contains(needle))
                .and_then(stamp)
                .unwrap_or_else(|| panic!("no {needle:?} in {}", out.stderr))
        };
        let switched = at("finished step=\"apply\"");
        let judged = at("healthy step=\"health\"");
        gate.push(judged.duration_since(switched).unwrap().as_secs_f64() * 1e3);

        let address = s.bus.as_ref().expect("the systemd double").address.clone();
        let took = rt().block_on(async move {
            let start = Instant::now();
            let conn = zbus::connection::Builder::address(address.as_str())
                .build()
                .await
                .unwrap();
            let m = zbus::Proxy::new(
                &conn,
                "org.freedesktop.systemd1",
                "/org/freedesktop/systemd1",
                "org.freedesktop.systemd1.Manager",
            )
            .await
            .unwrap();
            let _: zbus::OwnedObjectPath = m
                .call("GetUnitByPID", &(std::process::id(),))
                .await
                .unwrap();
            let jobs = || async {
                let _: Vec<Job> = m.call("ListJobs", &()).await.unwrap();
            };
            jobs().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            jobs().await;
            let _: Vec<Unit> = m
                .call("ListUnitsFiltered", &(vec!["failed"],))
                .await
                .unwrap();
            start.elapsed()
        });
        floor.push(took.as_secs_f64() * 1e3);
    }
    (gate, floor)
}

/// Section 8: first boots in containers (systemd as PID 1), the closure's
/// download overlapping the boot or after it, for several (D, B).
fn first_boot_section(w: &mut String, smoke: bool) {
    use nixos_ami_agent_tests::first_boot::{Sample, measure};
    if let Some(why) = nixos_ami_agent_tests::container::unavailable() {
        writeln!(w, "SKIPPED: the container boots cannot run here: {why}.").unwrap();
        return;
    }
    let (pairs, reps): (&[(u64, u64)], usize) = if smoke {
        (&[(1, 1)], 1)
    } else {
        (&[(1, 4), (4, 1), (3, 3), (6, 3)], 3)
    };
    writeln!(
        w,
        "A first boot in a systemd-nspawn container (Debian's systemd as PID 1, the repository's unit \
         files; `tests/src/first_boot.rs`): the closure's download takes D (the `nix` stand-in, under a \
         per-path lock as the Nix daemon holds one), and a slow unit that `multi-user.target` waits for \
         takes B. Sequential: `nixos-ami-agent-fetch.service` masked (`fetchAtBoot = false`), so the boot \
         run downloads after `multi-user.target`, as before. Overlapped: the fetch unit downloads as soon \
         as the network is online, and the boot run only switches. Boot to converged is from the \
         container's PID 1 starting to the boot run's READY=1 (systemd's `UserspaceTimestampMonotonic` \
         and the unit's `ActiveEnterTimestampMonotonic`). Medians of {reps} boots per cell, the modes \
         alternating, all in this run. The switch itself (stand-in `switch-to-configuration`, the health \
         gate settling under the container's systemd) is the same in both.\n"
    )
    .unwrap();
    writeln!(
        w,
        "| D (download) | B (boot) | sequential | overlapped | saved | D + B | max(D, B) |"
    )
    .unwrap();
    writeln!(w, "|---|---|---|---|---|---|---|").unwrap();
    let mut example: Option<(u64, u64, Sample)> = None;
    for &(d, b) in pairs {
        let (mut seq, mut ovl) = (vec![], vec![]);
        for rep in 0..reps {
            for overlapped in if rep % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            } {
                eprintln!("first boot: D {d} s, B {b} s, overlapped {overlapped}");
                match measure(Duration::from_secs(d), Duration::from_secs(b), overlapped) {
                    Ok(s) if overlapped => {
                        ovl.push(s.boot_to_converged.as_secs_f64());
                        if example.is_none() && d > b {
                            example = Some((d, b, s));
                        }
                    }
                    Ok(s) => seq.push(s.boot_to_converged.as_secs_f64()),
                    Err(e) => {
                        writeln!(
                            w,
                            "\nFAILED: D {d} s, B {b} s, overlapped {overlapped}: {e}"
                        )
                        .unwrap();
                        return;
                    }
                }
            }
        }
        let (sm, om) = (median(seq), median(ovl));
        writeln!(
            w,
            "| {d} s | {b} s | {sm:.1} s | {om:.1} s | {:.1} s ({:.0} %) | {} s | {} s |",
            sm - om,
            (sm - om) * 100.0 / sm,
            d + b,
            d.max(b)
        )
        .unwrap();
    }
    let Some((d, b, s)) = example.or_else(|| {
        measure(Duration::from_secs(2), Duration::from_secs(1), true)
            .ok()
            .map(|s| (2, 1, s))
    }) else {
        return;
    };
    writeln!(
        w,
        "\nWhere one overlapped first boot's time went (D {d} s, B {b} s), from the journal: the \
         `PHASES_MS` of each unit's phases event (`MESSAGE_ID=d83fcfe263434edda3992e11922913c2`, \
         `journalctl -o json`), as `nixos-ami-agent status` shows them. The boot run's `boot` phase is \
         from the boot to its start (`multi-user.target`); its `fetch` found the closure there, or, \
         when the download takes longer than the boot, waited for the download in flight (the \
         per-path lock) instead of making a second one.\n"
    )
    .unwrap();
    let all = [
        "boot", "metadata", "login", "resolve", "fetch", "switch", "verify", "health",
    ];
    writeln!(w, "| unit | {} | finished after boot |", all.join(" | ")).unwrap();
    writeln!(w, "|---|{}---|", "---|".repeat(all.len())).unwrap();
    // `PHASES_MS` is `name=ms name=ms ...`, read here without the agent's
    // own parser.
    let row = |unit: &str, field: &str, since: Option<Duration>| {
        let cells: Vec<String> = all
            .iter()
            .map(|n| {
                field
                    .split_whitespace()
                    .filter_map(|p| p.split_once('='))
                    .find(|(k, _)| k == n)
                    .and_then(|(_, ms)| ms.parse::<f64>().ok())
                    .map_or("–".into(), |ms| format!("{:.2} s", ms / 1000.0))
            })
            .collect();
        format!(
            "| {unit} | {} | {} |",
            cells.join(" | "),
            since.map_or("–".into(), |d| format!("{:.2} s", d.as_secs_f64()))
        )
    };
    if let Some(f) = &s.fetch_phases {
        writeln!(w, "{}", row("nixos-ami-agent-fetch", f, None)).unwrap();
    }
    writeln!(
        w,
        "{}",
        row(
            "nixos-ami-agent (boot run)",
            &s.run_phases,
            s.run_since_boot
        )
    )
    .unwrap();
    writeln!(
        w,
        "\nThe closure was downloaded by `{}`; boot to converged from outside: {:.2} s.",
        s.downloaded_by.as_deref().unwrap_or("nobody"),
        s.boot_to_converged.as_secs_f64()
    )
    .unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--profile") {
        profile(&args[i + 1], &args[i + 2..]);
    }
    let smoke = args.iter().any(|a| a == "--smoke");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .map(|i| args[i + 1].clone());
    let agent = workspace_bin("nixos-ami-agent");
    // Shown relative to the checkout: no path of this machine in the file.
    let cwd = std::env::current_dir().unwrap_or_default();
    let shown = agent
        .strip_prefix(&cwd)
        .unwrap_or(&agent)
        .display()
        .to_string();
    let mut md = String::new();
    let w = &mut md;
    writeln!(w, "# Benchmarks\n").unwrap();
    writeln!(
        w,
        "Regenerate with `scripts/bench` (release build; this file is its output). Numbers are medians \
         over repeated runs on a shared, noisy machine; ratios are measured in the same run. Nothing here \
         is asserted by tests.\n"
    )
    .unwrap();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    writeln!(
        w,
        "Machine: {cpus} CPUs ({model}); agent: `{}`{}.\n",
        shown,
        if smoke {
            " (SMOKE RUN: too few iterations to mean anything)"
        } else {
            ""
        }
    )
    .unwrap();

    let iterations = if smoke { 2 } else { 30 };
    eprintln!("overhead: {iterations} iterations per case");
    let rows = overhead(iterations);
    writeln!(w, "## 1. Overhead over the floor\n").unwrap();
    writeln!(
        w,
        "One `nixos-ami-agent run` against the local doubles with stand-in `fh`/`determinate-nixd` that \
         return at once, versus the floor in the same run: a minimal client making the same IMDS (and SSM) \
         round trips and the same program spawns (`bench-floor`). {iterations} runs each after a warm-up, \
         alternating order. Targets: no-op ≤ 2× the floor and ≤ 20 ms over it; peak RSS ≤ 15 MiB.\n"
    )
    .unwrap();
    writeln!(w, "| case | agent wall | floor wall | ratio | overhead | agent CPU | floor CPU | agent peak RSS | floor peak RSS |").unwrap();
    writeln!(w, "|---|---|---|---|---|---|---|---|---|").unwrap();
    for r in &rows {
        writeln!(
            w,
            "| {} | {:.1} ms | {:.1} ms | {:.2}× | {:+.1} ms | {:.1} ms | {:.1} ms | {:.1} MiB | {:.1} MiB |",
            r.case,
            r.agent_wall,
            r.floor_wall,
            r.agent_wall / r.floor_wall,
            r.agent_wall - r.floor_wall,
            r.agent_cpu,
            r.floor_cpu,
            r.agent_rss,
            r.floor_rss
        )
        .unwrap();
    }
    writeln!(
        w,
        "\nThe SSM case costs more than the others because the floor's SSM request is a fixed, unsigned \
         POST over plain HTTP, while the agent sets up the AWS SDK (its configuration, endpoint rules and \
         credential chain, a SigV4 signature) and reads the system's CA certificates, which on Debian is a \
         walk over some 290 files in `/etc/ssl/certs` (`nixos-ami-agent-bench --profile ssm perf record -g` \
         shows where it goes). The certificates are read once and handed to the SDK, which would otherwise \
         read them a second time; the rest is the price of using the SDK rather than a hand-written client, \
         paid once per run."
    )
    .unwrap();

    let (trials, max_delay) = if smoke { (3, 500) } else { (25, 5000) };
    eprintln!("late IMDS: {trials} trials");
    let mut lags = late_imds(trials, max_delay);
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
    writeln!(w, "\n## 2. Late IMDS\n").unwrap();
    writeln!(
        w,
        "IMDS starts accepting connections at a random time within 0–{max_delay} ms after the agent \
         starts (connections refused until then). Lag = from the moment it accepts to the agent's first \
         successful token request; {trials} trials. The IMDS backoff starts at 50 ms and is capped at \
         150 ms with equal jitter (75–150 ms between tries), so the agent sends at most ~13 requests a \
         second while it waits. Targets: \
         median ≤ 100 ms, max ≤ 250 ms (cloud-init and amazon-init wait ≥ 1 s between tries).\n"
    )
    .unwrap();
    writeln!(w, "| trials | median lag | max lag | min lag |").unwrap();
    writeln!(w, "|---|---|---|---|").unwrap();
    writeln!(
        w,
        "| {} | {:.0} ms | {:.0} ms | {:.0} ms |",
        lags.len(),
        median(lags.clone()),
        lags.last().unwrap(),
        lags[0]
    )
    .unwrap();

    let ns: &[usize] = if smoke { &[2] } else { &[1, 3, 5, 10] };
    eprintln!("SSM throttling: {ns:?}");
    writeln!(w, "\n## 3. SSM throttling\n").unwrap();
    writeln!(
        w,
        "The SSM double answers `ThrottlingException` to the first N GetParameter calls. The SDK's own \
         retries are off; the agent's backoff (50 ms start, doubling, 5 s cap, jittered) retries within \
         `retry-budget` (120 s here).\n"
    )
    .unwrap();
    writeln!(
        w,
        "| throttled calls N | calls made | time to get through | exit |"
    )
    .unwrap();
    writeln!(w, "|---|---|---|---|").unwrap();
    for (n, calls, through, code) in throttling(ns) {
        writeln!(w, "| {n} | {calls} | {through:.0} ms | {code} |").unwrap();
    }

    eprintln!("fleet load simulation");
    writeln!(w, "\n## 4. Fleet load on SSM\n").unwrap();
    writeln!(
        w,
        "Simulated: 10 000 instances on the watch timer (each run ~1 s, then `OnUnitInactiveSec` = \
         interval plus a uniform random delay up to `RandomizedDelaySec`), plus a launch burst of 1 000 \
         instances within one minute (two calls each at boot: the boot's fetch ~10 s after launch, the boot \
         run ~20 s after), over 2 hours; per-second \
         GetParameter calls. SSM's standard-throughput limit for GetParameter is 40 TPS per account and \
         region.\n"
    )
    .unwrap();
    writeln!(
        w,
        "| interval | randomized delay | mean | p99 | peak | under 40 TPS |"
    )
    .unwrap();
    writeln!(w, "|---|---|---|---|---|---|").unwrap();
    let mut default = None;
    for (interval, delay) in [
        (60u64, 30u64),
        (300, 60),
        (600, 300),
        (900, 300),
        (1200, 600),
        (1800, 600),
    ] {
        let (peak, p99, mean) = fleet(10_000, interval, delay, 1_000, 60, 7200);
        let (steady_peak, _, _) = fleet(10_000, interval, delay, 0, 60, 7200);
        if (interval, delay) == (DEFAULT_INTERVAL, DEFAULT_DELAY) {
            default = Some((peak, p99, mean, steady_peak));
        }
        writeln!(
            w,
            "| {} min | {} min | {mean:.1}/s | {p99}/s | {peak}/s (without the burst: {steady_peak}/s) | {} |",
            interval as f64 / 60.0,
            delay as f64 / 60.0,
            if peak <= 40 { "yes" } else { "no" }
        )
        .unwrap();
    }
    let (peak, p99, mean, steady_peak) = default.expect("the default is simulated");
    let avg_period = 1.0 + DEFAULT_INTERVAL as f64 + DEFAULT_DELAY as f64 / 2.0;
    writeln!(
        w,
        "\nThe module's defaults are `watch.interval` = {} min and `watch.randomizedDelay` = {} min. \
         Arithmetic: each instance calls once every {}–{} s, {avg_period:.0} s on average, so 10 000 \
         instances make 10 000 / {avg_period:.0} ≈ {:.1} calls/s (simulated mean {mean:.1}/s, p99 {p99}/s, \
         peak {steady_peak}/s without the burst). A burst of 1 000 launches within 60 s adds ≈ 33.3 calls/s \
         for about a minute (every new instance reads the parameter twice at boot: its fetch, as soon as \
         the network is online, and its boot run, which must see a target that changed meanwhile; \
         section 8); together the busiest second of the simulation sees {peak} calls, {} the 40 TPS \
         limit. Most of the peak is the burst itself, which the timer settings cannot spread; a \
         throttled call is retried with backoff within the retry budget (section 3), so an occasional \
         excess costs seconds, not failures (a launch burst faster than ~15 instances a second keeps \
         the reads over the limit for as long as it lasts). The rows \
         above show what shorter settings cost: the peak without the burst is the timer's own, and \
         1 and 5 minutes exceed the limit with it alone.",
        DEFAULT_INTERVAL / 60,
        DEFAULT_DELAY / 60,
        1 + DEFAULT_INTERVAL,
        1 + DEFAULT_INTERVAL + DEFAULT_DELAY,
        10_000.0 / avg_period,
        if peak <= 40 { "under" } else { "over" }
    )
    .unwrap();

    eprintln!("rollout simulation");
    writeln!(
        w,
        "\n### Rolling out: the timer alone, or pushed by State Manager\n"
    )
    .unwrap();
    writeln!(
        w,
        "Simulated: 10 000 instances; the fleet's parameter changes at t = 0. Each run reads the \
         parameter (GetParameter, at most {SSM_TPS} per second; a throttled call is retried with the \
         agent's own backoff) and then applies the new target in {}–{} s (download and switch; an \
         assumption, the same for both models). Timer: each instance sees the change at its next run. \
         Push: the change starts the association (`ssm-documents/`, {PUSH_START_SECS:.0} s from \
         `put-parameter` to the first command, an assumption), which runs the agent on MaxConcurrency \
         instances at a time. Latency is from the change to the instance running the target; calls/s \
         are over the rollout, including the timer's own runs where one is on.\n",
        APPLY_SECS.0, APPLY_SECS.1
    )
    .unwrap();
    writeln!(
        w,
        "| model | p50 | p99 | all converged | GetParameter calls, mean | peak (retries included) | throttled calls | runs that gave up (exit 75) |"
    )
    .unwrap();
    writeln!(w, "|---|---|---|---|---|---|---|---|").unwrap();
    let minutes = |s: f64| format!("{:.1} min", s / 60.0);
    let rollouts: Vec<(String, Rollout)> = vec![
        (
            format!(
                "timer, {} min + up to {} min (the module's default)",
                DEFAULT_INTERVAL / 60,
                DEFAULT_DELAY / 60
            ),
            rollout_by_timer(10_000, DEFAULT_INTERVAL, DEFAULT_DELAY),
        ),
        (
            "timer, 5 min + up to 1 min".into(),
            rollout_by_timer(10_000, 300, 60),
        ),
        (
            "push, MaxConcurrency 10 % (1 000), no timer".into(),
            rollout_by_push(10_000, 1_000, 0),
        ),
        (
            "push, MaxConcurrency 100 %, no timer".into(),
            rollout_by_push(10_000, 10_000, 0),
        ),
        (
            "push, MaxConcurrency 200, 60 min timer as a safety net".into(),
            rollout_by_push(10_000, 200, 3600),
        ),
        (
            "push, MaxConcurrency 50, no timer".into(),
            rollout_by_push(10_000, 50, 0),
        ),
    ];
    for (name, r) in &rollouts {
        writeln!(
            w,
            "| {name} | {} | {} | {} | {:.1}/s | {}/s | {} | {} |",
            minutes(r.p50),
            minutes(r.p99),
            if r.gave_up == 0 {
                minutes(r.all)
            } else {
                format!("never in this push ({} gave up)", r.gave_up)
            },
            r.mean_tps,
            r.peak_tps,
            r.throttled,
            r.gave_up
        )
        .unwrap();
    }
    let (timer, push, all_at_once) = (&rollouts[0].1, &rollouts[2].1, &rollouts[3].1);
    writeln!(
        w,
        "\nAt MaxConcurrency 10 % the association runs the fleet in waves of 1 000, each as long as an \
         apply: the median instance runs the new target after {} (default timer: {}), the whole fleet \
         after {} (timer: {}), and each wave's 1 000 reads at once are throttled and retried \
         ({} throttled calls in all). All at once (100 %), the reads alone take 10 000 / {SSM_TPS} = \
         250 s, longer than a run's {RETRY_BUDGET:.0} s retry budget: {} runs give up (exit 75, \
         which MaxErrors counts), and the rest converge within {}. What pushing adds is not speed but control: a \
         canary first, waves, and MaxErrors stopping the rollout at the first unhealthy instances (the \
         health gate makes the command fail), instead of every instance taking the change within one \
         timer period. The timer stays useful as a slow safety net for an instance the push missed \
         (stopped, or launched during the rollout): at 60 minutes it adds 10 000 / 3 600 ≈ 2.8 \
         calls/s. Any interval of at least 250 s keeps 10 000 instances under {SSM_TPS} calls/s on \
         average (10 000 / 250 = 40); 15 minutes leaves room for launches and other callers (section 4).",
        minutes(push.p50),
        minutes(timer.p50),
        minutes(push.all),
        minutes(timer.all),
        push.throttled,
        all_at_once.gave_up,
        minutes(all_at_once.all),
    )
    .unwrap();

    let gib = 1u64 << 30;
    let (size, upload_iterations, rss_sizes) = if smoke {
        (64u64 << 20, 1, vec![32u64 << 20, 128 << 20])
    } else {
        (4 * gib, 5, vec![gib, 4 * gib, 8 * gib])
    };
    eprintln!("upload: {} MiB, {upload_iterations} iterations", size >> 20);
    // Under target/ (same file system as the build, cleaned with it).
    std::fs::create_dir_all("target").ok();
    let scratch = tempfile::Builder::new()
        .prefix("bench-upload-")
        .tempdir_in("target")
        .expect("a scratch directory");
    let (urows, data_blocks) = uploads(scratch.path(), size, upload_iterations);
    let total_blocks = size.div_ceil(512 << 10);
    writeln!(w, "\n## 5. Image upload (EBS direct)\n").unwrap();
    writeln!(
        w,
        "A {} MiB raw disk laid out like a NixOS image's ext4 (metadata at the start of every 128 MiB \
         group, file data in runs of 4 KiB–8 MiB in the first three quarters): {data_blocks} of its \
         {total_blocks} 512 KiB blocks ({:.0} %) hold data, the rest is zeros. Uploaded to a new \
         snapshot on a local EBS direct double (tests/src/ebs.rs: checks every block's SHA-256 and the \
         linear checksum, keeps digests only) by `nixos-ami-publish snapshot` (the uploader `upload` \
         uses: one reader, 16 senders, the AWS SDK), by the same with `--all-blocks` (every block, as \
         nixpkgs' upload-ami does in its EBS-direct mode), and by the floor (`bench-floor ebs`: one \
         connection, a bare loop of PutSnapshotBlock requests for the data blocks between \
         StartSnapshot and CompleteSnapshot; no SDK, no signing, no concurrency). {upload_iterations} \
         runs each after a warm-up, in rotating order; the disk is in the page cache; the double runs \
         in the benchmark's process on the same CPUs. MiB/s is of the logical size; CPU is the \
         uploader's own (user + system); blocks sent are counted by the double.\n",
        size >> 20,
        data_blocks as f64 * 100.0 / total_blocks as f64,
    )
    .unwrap();
    writeln!(
        w,
        "| uploader | wall | MiB/s (logical) | blocks sent | CPU per GiB | peak RSS | wall vs. floor |"
    )
    .unwrap();
    writeln!(w, "|---|---|---|---|---|---|---|").unwrap();
    let floor_wall = urows
        .iter()
        .find(|r| r.who == Uploader::Floor)
        .map(|r| r.wall)
        .unwrap_or(f64::NAN);
    for r in &urows {
        let gibs = r.size as f64 / gib as f64;
        writeln!(
            w,
            "| {} | {:.2} s | {:.0} | {} of {total_blocks} | {:.2} s | {:.1} MiB | {:.2}× |",
            r.who.name(),
            r.wall,
            (r.size >> 20) as f64 / r.wall,
            r.blocks_sent,
            r.cpu / gibs,
            r.rss_mib,
            r.wall / floor_wall
        )
        .unwrap();
    }
    eprintln!("upload: peak RSS by disk size");
    let rss_rows = upload_rss(scratch.path(), &rss_sizes);
    writeln!(
        w,
        "\nPeak RSS of `nixos-ami-publish snapshot` as the disk grows (same layout, {DATA_PERCENT} % of \
         blocks with data; one run each, right after the image is written, so its wall time is not \
         comparable with the table above): memory is the reader's queue and the senders' blocks \
         (16 + 16 × 512 KiB) plus the SDK, whatever the disk's size.\n"
    )
    .unwrap();
    writeln!(w, "| disk | blocks sent | wall | peak RSS |").unwrap();
    writeln!(w, "|---|---|---|---|").unwrap();
    for r in &rss_rows {
        writeln!(
            w,
            "| {} MiB | {} | {:.2} s | {:.1} MiB |",
            r.size >> 20,
            r.blocks_sent,
            r.wall,
            r.rss_mib
        )
        .unwrap();
    }
    drop(scratch);
    let by = |who| urows.iter().find(|r| r.who == who).expect("measured");
    let (sparse, all, floor) = (
        by(Uploader::Sparse),
        by(Uploader::AllBlocks),
        by(Uploader::Floor),
    );
    writeln!(
        w,
        "\nSkipping zero blocks sends {:.0} % of what sending every block sends and takes {:.2}× its \
         time and {:.2}× its CPU; against the floor, which sends the same blocks with none of the \
         uploader's machinery, the uploader takes {:.2}× the time (its 16 senders overlap what the \
         floor's one connection does in turn) and {:.2}× the CPU (the SDK: request signing, the \
         retry and timeout layers, a copy of each block into its request).",
        sparse.blocks_sent as f64 * 100.0 / all.blocks_sent.max(1) as f64,
        sparse.wall / all.wall,
        sparse.cpu / all.cpu,
        sparse.wall / floor.wall,
        sparse.cpu / floor.cpu,
    )
    .unwrap();

    writeln!(w, "\n## 6. Health gate\n").unwrap();
    let gate_iterations = if smoke { 2 } else { 20 };
    eprintln!("health gate: {gate_iterations} iterations");
    let (gate, gate_floor) = gate_cost(gate_iterations);
    let (gate_ms, gate_floor_ms) = (median(gate.clone()), median(gate_floor.clone()));
    writeln!(
        w,
        "A healthy `switch` with no checks configured, against the systemd double on a private bus \
         (settled at once, no unit failed): the time from `fh apply` exiting (it waits for \
         switch-to-configuration) to the verdict, from the agent's own log; {gate_iterations} runs. \
         The floor is what the gate cannot do without, from a bare zbus client over the same bus: \
         connect, `GetUnitByPID`, `ListJobs` twice a poll (200 ms) apart, `ListUnitsFiltered`. \
         Before the apply the agent also lists the failed units once (one call, not in this window).\n"
    )
    .unwrap();
    writeln!(w, "| | median | max | vs floor |").unwrap();
    writeln!(w, "|---|---|---|---|").unwrap();
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    writeln!(
        w,
        "| gate, switch to verdict | {gate_ms:.0} ms | {:.0} ms | {:+.0} ms ({:.2}×) |",
        max(&gate),
        gate_ms - gate_floor_ms,
        gate_ms / gate_floor_ms
    )
    .unwrap();
    writeln!(
        w,
        "| floor (the same calls, bare) | {gate_floor_ms:.0} ms | {:.0} ms | |",
        max(&gate_floor)
    )
    .unwrap();

    writeln!(w, "\n## 7. Footprint\n").unwrap();
    let release = agent
        .parent()
        .map(|d| d.ends_with("release"))
        .unwrap_or(false);
    let size = file_size(&agent).unwrap_or(0);
    writeln!(
        w,
        "Release profile: `opt-level = \"s\"`, `lto = \"fat\"`, `codegen-units = 1`, `panic = \"abort\"`, \
         `strip = true`; TLS is rustls with ring (no aws-lc, no OpenSSL), the AWS crates without default \
         features. Target: binary ≤ 10 MiB.\n"
    )
    .unwrap();
    writeln!(w, "| binary | size | build |").unwrap();
    writeln!(w, "|---|---|---|").unwrap();
    writeln!(
        w,
        "| `{}` | {:.1} MiB | {} |",
        shown,
        size as f64 / 1048576.0,
        if release {
            "release"
        } else {
            "debug (smoke run)"
        }
    )
    .unwrap();
    let ldd = Command::new("ldd")
        .arg(&agent)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut libs = vec![];
    for line in ldd.lines() {
        if let Some(path) = line
            .split("=>")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .filter(|p| p.starts_with('/'))
        {
            let real = std::fs::canonicalize(path).unwrap_or(path.into());
            libs.push((path.to_owned(), file_size(&real).unwrap_or(0)));
        }
    }
    writeln!(
        w,
        "\nRuntime dependencies (`ldd`): {}. On NixOS the package's closure is the binary plus glibc and \
         libgcc (its own closure is ~30–40 MiB, shared with the whole system), and the unit files, man \
         pages and completions (a few KiB); the programs it runs (`fh`, `determinate-nixd`) come from the \
         image.",
        libs.iter().map(|(p, s)| format!("`{p}` ({:.1} MiB)", *s as f64 / 1048576.0)).collect::<Vec<_>>().join(", ")
    )
    .unwrap();

    writeln!(w, "\n## 8. First boot: boot to converged\n").unwrap();
    first_boot_section(w, smoke);

    let noop = &rows[0];
    let rss = rows.iter().map(|r| r.agent_rss).fold(0.0, f64::max);
    let lag_median = median(lags.clone());
    let lag_max = *lags.last().unwrap();
    let mib = size as f64 / 1048576.0;
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    writeln!(w, "\n## Against the targets\n").unwrap();
    writeln!(w, "| target | measured | |").unwrap();
    writeln!(w, "|---|---|---|").unwrap();
    let ratio = noop.agent_wall / noop.floor_wall;
    let over = noop.agent_wall - noop.floor_wall;
    writeln!(
        w,
        "| no-op run ≤ 2× the floor | {ratio:.2}× | {} |",
        verdict(ratio <= 2.0)
    )
    .unwrap();
    writeln!(
        w,
        "| no-op run ≤ 20 ms over the floor | {over:+.1} ms | {} |",
        verdict(over <= 20.0)
    )
    .unwrap();
    let ssm = &rows[2];
    let (ssm_ratio, ssm_over) = (
        ssm.agent_wall / ssm.floor_wall,
        ssm.agent_wall - ssm.floor_wall,
    );
    writeln!(
        w,
        "| no-op run via SSM ≤ 2× the floor | {ssm_ratio:.2}× | {} (see §1) |",
        verdict(ssm_ratio <= 2.0)
    )
    .unwrap();
    writeln!(
        w,
        "| no-op run via SSM ≤ 20 ms over the floor | {ssm_over:+.1} ms | {} |",
        verdict(ssm_over <= 20.0)
    )
    .unwrap();
    writeln!(
        w,
        "| peak RSS ≤ 15 MiB | {rss:.1} MiB | {} |",
        verdict(rss <= 15.0)
    )
    .unwrap();
    writeln!(
        w,
        "| late IMDS: median lag ≤ 100 ms | {lag_median:.0} ms | {} |",
        verdict(lag_median <= 100.0)
    )
    .unwrap();
    writeln!(
        w,
        "| late IMDS: max lag ≤ 250 ms | {lag_max:.0} ms | {} |",
        verdict(lag_max <= 250.0)
    )
    .unwrap();
    writeln!(
        w,
        "| release binary ≤ 10 MiB | {mib:.1} MiB{} | {} |",
        if release { "" } else { " (debug)" },
        verdict(release && mib <= 10.0)
    )
    .unwrap();

    let rss_small = rss_rows.first().expect("measured");
    let rss_large = rss_rows.last().expect("measured");
    writeln!(
        w,
        "| upload: sparse sends only the data blocks | {} of {total_blocks} ({data_blocks} hold data) | {} |",
        sparse.blocks_sent,
        verdict(sparse.blocks_sent == data_blocks as u64)
    )
    .unwrap();
    writeln!(
        w,
        "| upload: peak RSS bounded (the {}× larger disk ≤ 1.25× the smaller's) | {:.1} MiB → {:.1} MiB | {} |",
        rss_large.size / rss_small.size,
        rss_small.rss_mib,
        rss_large.rss_mib,
        verdict(rss_large.rss_mib <= rss_small.rss_mib * 1.25)
    )
    .unwrap();

    match out {
        Some(path) => std::fs::write(&path, &md).unwrap(),
        None => print!("{md}"),
    }
}
