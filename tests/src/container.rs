//! Boot tests: a Debian rootfs with systemd as PID 1, booted with
//! `systemd-nspawn --private-network`, one overlay per scenario. Inside:
//! the repository's unit files (only `@bindir@` substituted), the agent,
//! the stand-ins, and the doubles on the container's own loopback, where
//! 169.254.169.254 exists only for it. Everything is asserted from outside
//! after the container powered off: files, the persistent journal, and the
//! `systemctl status`/`show` a reporter unit wrote before powering off.

use crate::harness::workspace_bin;
use crate::standin::{Behaviour, Call};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const REF: &str = "my-org/web/0.1#nixosConfigurations.web";
/// Resolves to a system with another kernel: `if-needed` reboots.
pub const REF_NEW_KERNEL: &str = "my-org/web/0.2#nixosConfigurations.web";
/// Resolves to a third system with the booted kernel.
pub const REF_NEXT: &str = "my-org/web/0.3#nixosConfigurations.web";
/// Resolves to a system whose switch starts a unit that fails.
pub const REF_BROKEN: &str = "my-org/web/0.4#nixosConfigurations.web";
/// Resolves to a system with another kernel whose unit fails only once
/// it is the booted system: healthy in place, unhealthy after the reboot.
pub const REF_BROKEN_AFTER_REBOOT: &str = "my-org/web/0.5#nixosConfigurations.web";
pub const INSTANCE_ID: &str = "i-0c0ffee0c0ffee000";
const FAKE: &str = "/var/lib/fake-nixos";
/// Off every PATH: only the fake systems' `sw/bin` links to it.
const FAKE_NIX: &str = "/usr/lib/fake-nix/nix";
/// Every fake system's `bin/switch-to-configuration` links to it.
const FAKE_SWITCH: &str = "/usr/lib/fake-nix/switch-to-configuration";
/// The boot run, every later run, and the boot's fetch.
pub const AGENT_UNITS: [&str; 3] = [
    "nixos-ami-agent.service",
    "nixos-ami-agent-run.service",
    FETCH_UNIT,
];
pub const BOOT_UNIT: &str = "nixos-ami-agent.service";
pub const FETCH_UNIT: &str = "nixos-ami-agent-fetch.service";

/// Why the boot tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if !nix_is_root() {
        return Some("not root (overlay mounts and systemd-nspawn need root)".into());
    }
    for tool in ["systemd-nspawn", "journalctl", "debootstrap"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            return Some(format!(
                "{tool} is missing (Debian: systemd-container, debootstrap)"
            ));
        }
    }
    None
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn property(show: &str, key: &str) -> String {
    show.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_default()
        .to_owned()
}

/// The cached rootfs, built by `tests/containers/rootfs.sh` when missing.
pub fn rootfs() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("containers/rootfs.sh");
    let out = Command::new(&script).output().expect("run rootfs.sh");
    assert!(
        out.status.success(),
        "rootfs.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

pub struct Container {
    dir: tempfile::TempDir,
    pub root: PathBuf,
    mounted: bool,
    pub behaviour: Behaviour,
    /// Boots so far (an nspawn exit of 133 is a reboot, and boots again).
    pub boots: u32,
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.root).status();
        }
    }
}

fn unit_text(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/systemd")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap()
        .replace("@bindir@", "/usr/local/bin")
}

impl Container {
    /// A fresh machine (overlay over the cached rootfs) with the agent
    /// installed and enabled, the doubles, a fake NixOS system layout, and
    /// the reporter.
    pub fn new(user_data: Option<&[u8]>) -> Self {
        let lower = rootfs();
        let base = Path::new("/var/tmp");
        let dir = tempfile::Builder::new()
            .prefix("nixos-ami-agent-boot.")
            .tempdir_in(base)
            .unwrap();
        let root = dir.path().join("merged");
        for d in ["upper", "work", "merged"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            dir.path().join("upper").display(),
            dir.path().join("work").display()
        );
        let ok = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&root)
            .status()
            .unwrap();
        assert!(ok.success(), "overlay mount failed");
        let mut c = Self {
            dir,
            root,
            mounted: true,
            behaviour: Behaviour::default(),
            boots: 0,
        };
        c.setup(user_data);
        c
    }

    /// Unique per container: nspawn keeps per-machine state by name.
    fn name(&self) -> String {
        let dir = self.dir.path().file_name().unwrap().to_string_lossy();
        format!(
            "agent-{}",
            dir.rsplit('.')
                .next()
                .unwrap_or("boot")
                .to_ascii_lowercase()
        )
    }

    pub fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    pub fn write(&self, inside: &str, contents: impl AsRef<[u8]>) {
        let p = self.path(inside);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, contents).unwrap();
    }

    fn executable(&self, inside: &str, contents: &str) {
        use std::os::unix::fs::PermissionsExt;
        self.write(inside, contents);
        std::fs::set_permissions(self.path(inside), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }

    fn enable(&self, unit: &str, target: &str) {
        let wants = self.path(&format!("/etc/systemd/system/{target}.wants"));
        std::fs::create_dir_all(&wants).unwrap();
        let _ = std::fs::remove_file(wants.join(unit));
        std::os::unix::fs::symlink(format!("/etc/systemd/system/{unit}"), wants.join(unit))
            .unwrap();
    }

    fn setup(&mut self, user_data: Option<&[u8]>) {
        // The repository's units, as packaged.
        self.write(
            "/etc/systemd/system/nixos-ami-agent.service",
            unit_text("nixos-ami-agent.service"),
        );
        self.write(
            "/etc/systemd/system/nixos-ami-agent-run.service",
            unit_text("nixos-ami-agent-run.service"),
        );
        self.write(
            &format!("/etc/systemd/system/{FETCH_UNIT}"),
            unit_text(FETCH_UNIT),
        );
        self.write(
            "/etc/systemd/system/nixos-ami-agent-run.timer",
            unit_text("nixos-ami-agent-run.timer"),
        );
        self.write(
            "/usr/lib/systemd/system-preset/80-nixos-ami-agent.preset",
            unit_text("80-nixos-ami-agent.preset"),
        );
        self.enable("nixos-ami-agent.service", "multi-user.target");
        // What the test environment adds: the SSM double's endpoint.
        // Credentials come from the instance role, through IMDS, as on EC2.
        for unit in AGENT_UNITS {
            self.write(
                &format!("/etc/systemd/system/{unit}.d/test-endpoints.conf"),
                "[Unit]\nAfter=doubles.service fake-nixos-boot.service\n\n\
                 [Service]\nEnvironment=AWS_ENDPOINT_URL_SSM=http://127.0.0.1:4566\n",
            );
        }
        self.write(
            "/etc/nixos-ami-agent/config.toml",
            format!(
                "[agent]\nfh = \"/usr/local/bin/fh\"\ndeterminate-nixd = \"/usr/local/bin/determinate-nixd\"\n\
                 current-system = \"{FAKE}/current-system\"\nbooted-system = \"{FAKE}/booted-system\"\n\
                 system-profile = \"{FAKE}/profile\"\nnix-env = \"{FAKE}/current-system/sw/bin/nix-env\"\n\
                 retry-budget = \"30s\"\n"
            ),
        );

        // The doubles, on the container's private loopback.
        if let Some(ud) = user_data {
            self.write("/etc/doubles/user-data", ud);
        }
        self.write_doubles_config(0);
        self.write(
            "/etc/systemd/system/doubles.service",
            "[Unit]\nDescription=IMDS and SSM test doubles\nDefaultDependencies=no\nAfter=local-fs.target\n\n\
             [Service]\nExecStartPre=/usr/sbin/ip addr add 169.254.169.254/32 dev lo\n\
             ExecStart=/usr/local/bin/nixos-ami-agent-doubles /etc/doubles/config.json\n\n\
             [Install]\nWantedBy=multi-user.target\n",
        );
        self.enable("doubles.service", "multi-user.target");

        // A NixOS-like system layout: store paths with kernel, initrd and
        // modules; at each boot the boot default becomes the booted and
        // the running system, as NixOS's stage 2 does.
        for (system, kernel) in [
            ("old-system", "1"),
            ("new-system", "1"),
            ("kernel-system", "2"),
            ("next-system", "1"),
            ("broken-system", "1"),
            ("late-broken-system", "2"),
        ] {
            let s = format!("{FAKE}/store/{system}");
            std::fs::create_dir_all(self.path(&s)).unwrap();
            for (name, target) in [
                ("kernel", format!("kernel-{kernel}")),
                ("initrd", format!("initrd-{kernel}")),
                ("kernel-modules", "modules-1".into()),
            ] {
                std::fs::create_dir_all(self.path(&format!("{FAKE}/store/{target}"))).unwrap();
                std::os::unix::fs::symlink(
                    format!("{FAKE}/store/{target}"),
                    self.path(&format!("{s}/{name}")),
                )
                .unwrap();
            }
            // `nix` only in the system's sw/bin, as on NixOS: the unit's
            // own PATH (Debian's default) must not find it.
            std::fs::create_dir_all(self.path(&format!("{s}/sw/bin"))).unwrap();
            for name in ["nix", "nix-env"] {
                std::os::unix::fs::symlink(FAKE_NIX, self.path(&format!("{s}/sw/bin/{name}")))
                    .unwrap();
            }
            std::fs::create_dir_all(self.path(&format!("{s}/bin"))).unwrap();
            std::os::unix::fs::symlink(
                FAKE_SWITCH,
                self.path(&format!("{s}/bin/switch-to-configuration")),
            )
            .unwrap();
        }
        std::os::unix::fs::symlink(
            format!("{FAKE}/store/old-system"),
            self.path(&format!("{FAKE}/profile")),
        )
        .unwrap();
        self.write(
            "/etc/systemd/system/fake-nixos-boot.service",
            format!(
                "[Unit]\nDescription=Point booted-system and current-system at the boot default\n\
                 DefaultDependencies=no\nAfter=local-fs.target\n\n\
                 [Service]\nType=oneshot\n\
                 ExecStart=/bin/sh -c 'ln -sfn $(readlink -f {FAKE}/profile) {FAKE}/booted-system && \
                 ln -sfn $(readlink -f {FAKE}/profile) {FAKE}/current-system'\n\
                 # Stage 2 activates the booted system: its units are there.\n\
                 ExecStart=-/bin/sh -c '\"$(readlink -f {FAKE}/booted-system)/bin/switch-to-configuration\" test'\n\n\
                 [Install]\nWantedBy=multi-user.target\n"
            ),
        );
        self.enable("fake-nixos-boot.service", "multi-user.target");
        for (r, system) in [
            (REF, "new-system"),
            (REF_NEW_KERNEL, "kernel-system"),
            (REF_NEXT, "next-system"),
            (REF_BROKEN, "broken-system"),
            (REF_BROKEN_AFTER_REBOOT, "late-broken-system"),
        ] {
            self.behaviour
                .store_paths
                .insert(r.into(), format!("{FAKE}/store/{system}").into());
        }
        // The units a system brings, started by its switch-to-configuration
        // under the container's systemd.
        self.write(
            &format!("{FAKE}/store/broken-system/units/web.service"),
            "[Service]\nType=oneshot\nExecStart=/bin/false\n",
        );
        self.write(
            &format!("{FAKE}/store/late-broken-system/units/driver.service"),
            format!(
                "[Service]\nType=oneshot\nRemainAfterExit=yes\n\
                 ExecStart=/bin/sh -c 'test \"$(readlink -f {FAKE}/booted-system)\" != {FAKE}/store/late-broken-system'\n"
            ),
        );
        self.behaviour.unit_dir = Some("/run/systemd/system".into());
        // The booted system is in the store; every other is downloaded
        // (by `fh fetch` or `fh apply`) once.
        self.behaviour.valid = vec!["old-system".into()];
        self.behaviour.current_system = format!("{FAKE}/current-system").into();
        self.behaviour.system_profile = format!("{FAKE}/profile").into();

        // The reporter: once the agent's unit has settled (and the
        // scenario's extra condition holds), it records `systemctl status`
        // and `show`, then powers off, unless a reboot is already queued.
        self.executable(
            "/usr/local/bin/test-report",
            r#"#!/bin/sh
u=nixos-ami-agent.service
boot=$(tr -d - < /proc/sys/kernel/random/boot_id)
out=/var/lib/test-report/$boot
mkdir -p /var/lib/test-report
settled() {
  # One call, so one consistent snapshot of the unit from PID 1. A boot
  # run that ended is active (exited) on success, failed otherwise.
  snap=$(systemctl show -p ActiveState -p SubState -p Job -p ExecMainStartTimestampMonotonic $u)
  echo "$snap" | grep -qxE 'ActiveState=(inactive|failed)|SubState=exited' || return 1
  echo "$snap" | grep -qE '^Job=.+' && return 1
  echo "$snap" | grep -qE '^ExecMainStartTimestampMonotonic=0?$' && return 1
  systemctl show -p ActiveState nixos-ami-agent-run.service | grep -qx 'ActiveState=activating' && return 1
  [ -e /etc/test-scenario/ignore-fetch ] || ! systemctl show -p ActiveState nixos-ami-agent-fetch.service | grep -qx 'ActiveState=activating' || return 1
  [ ! -x /etc/test-scenario/wait-for ] || /etc/test-scenario/wait-for
}
# Settled twice in a row, half a second apart: no restart pending.
wait_settled() {
  while :; do
    if settled; then
      sleep 0.5
      settled && break
    fi
    sleep 0.2
  done
}
wait_settled
# A scenario's action once the run has settled (once per boot), then
# settle again.
if [ -x /etc/test-scenario/after ] && [ ! -e "$out.after" ]; then
  /etc/test-scenario/after > "$out.after" 2>&1
  wait_settled
fi
systemctl status $u --no-pager --lines=0 > "$out.status" 2>&1
systemctl show $u > "$out.show"
systemctl show nixos-ami-agent-fetch.service > "$out.fetch"
systemctl show > "$out.manager"
systemctl is-system-running > "$out.system" 2>&1
if ! systemctl list-jobs --no-legend | grep -qE 'reboot.target|poweroff.target'; then
  systemctl poweroff
fi
"#,
        );
        self.write(
            "/etc/systemd/system/test-report.service",
            "[Unit]\nDescription=Report on nixos-ami-agent and power off\n\n\
             [Service]\nExecStart=/usr/local/bin/test-report\n\n[Install]\nWantedBy=multi-user.target\n",
        );
        self.enable("test-report.service", "multi-user.target");
    }

    pub fn write_doubles_config(&self, imds_delay_ms: u64) {
        let config = serde_json::json!({
            "imds": "169.254.169.254:80",
            "ssm": "127.0.0.1:4566",
            "imds_delay_ms": imds_delay_ms,
            "instance_id": INSTANCE_ID,
            "region": "eu-west-1",
            "role": "web-fleet-role",
            "user_data_file": self.path("/etc/doubles/user-data").exists().then_some("/etc/doubles/user-data"),
            "params_dir": "/etc/doubles/params",
        });
        self.write("/etc/doubles/config.json", config.to_string());
    }

    /// Sets an SSM parameter (re-read by the double at each request).
    pub fn set_parameter(&self, name: &str, value: &str, version: i64) {
        let v = serde_json::json!({"type": "String", "value": value, "version": version});
        self.write(
            &format!("/etc/doubles/params/{}.json", name.trim_start_matches('/')),
            v.to_string(),
        );
    }

    /// A shell script the reporter runs once per boot after the unit has
    /// settled; it then waits for the unit to settle again.
    pub fn after_settled(&self, shell: &str) {
        self.executable("/etc/test-scenario/after", &format!("#!/bin/sh\n{shell}\n"));
    }

    /// A condition the reporter waits for besides the unit settling.
    pub fn wait_for(&self, shell: &str) {
        self.executable(
            "/etc/test-scenario/wait-for",
            &format!("#!/bin/sh\n{shell}\n"),
        );
    }

    /// Enables the watch timer with a short interval, as the NixOS module
    /// does (a drop-in resetting the package's values).
    pub fn enable_timer(&self, interval: &str, delay: &str) {
        self.write(
            "/etc/systemd/system/nixos-ami-agent-run.timer.d/interval.conf",
            // One empty assignment resets every OnXxxSec= of the unit
            // (a second one would also drop the first value set here).
            format!(
                "[Timer]\nOnActiveSec=\nOnActiveSec={interval}\n\
                 OnUnitInactiveSec={interval}\nRandomizedDelaySec={delay}\n"
            ),
        );
        self.enable("nixos-ami-agent-run.timer", "timers.target");
    }

    /// Boots until the container powers off (following reboots), with
    /// `during` called while it runs. Returns nspawn's last exit status.
    pub fn boot(&mut self, limit: Duration, mut during: impl FnMut(&Container)) -> i32 {
        let standin = self.path(crate::standin::DEFAULT_DIR);
        std::fs::create_dir_all(&standin).unwrap();
        crate::standin::write_behaviour(&standin, &self.behaviour);
        let start = Instant::now();
        loop {
            self.boots += 1;
            let bin = |name: &str, inside: &str| {
                format!("--bind-ro={}:{inside}", workspace_bin(name).display())
            };
            let log =
                std::fs::File::create(self.dir.path().join(format!("console-{}.log", self.boots)))
                    .unwrap();
            let mut child = Command::new("systemd-nspawn")
                .args([
                    "--quiet",
                    "--boot",
                    "--register=no",
                    "--keep-unit",
                    "--private-network",
                    "--console=passive",
                ])
                .arg(format!("--machine={}", self.name()))
                .arg("-D")
                .arg(&self.root)
                .arg(bin("nixos-ami-agent", "/usr/local/bin/nixos-ami-agent"))
                .arg(bin("fake-fh", "/usr/local/bin/fh"))
                .arg(bin(
                    "fake-determinate-nixd",
                    "/usr/local/bin/determinate-nixd",
                ))
                .arg(bin(
                    "nixos-ami-agent-doubles",
                    "/usr/local/bin/nixos-ami-agent-doubles",
                ))
                .arg(bin("fake-nix", FAKE_NIX))
                .arg(bin("fake-switch-to-configuration", FAKE_SWITCH))
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("systemd-nspawn starts");
            let status = loop {
                if let Some(s) = child.try_wait().unwrap() {
                    break s;
                }
                if start.elapsed() > limit {
                    // SIGTERM: nspawn asks the container to shut down.
                    let _ = Command::new("kill").arg(child.id().to_string()).status();
                    std::thread::sleep(Duration::from_secs(5));
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "the container did not power off within {limit:?}:\n{}\n--- agent journal\n{}",
                        self.console(),
                        self.journal_text()
                    );
                }
                during(self);
                std::thread::sleep(Duration::from_millis(100));
            };
            let code = status.code().unwrap_or(-1);
            if code != 133 || self.boots >= 5 {
                return code;
            }
        }
    }

    pub fn console(&self) -> String {
        (1..=self.boots)
            .map(|b| {
                std::fs::read_to_string(self.dir.path().join(format!("console-{b}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n--- reboot ---\n")
    }

    /// The agent units' journal entries (boot run, later runs, the boot's
    /// fetch), all boots, as JSON objects.
    pub fn journal(&self) -> Vec<serde_json::Value> {
        self.journal_matching(&[
            "-u",
            AGENT_UNITS[0],
            "-u",
            AGENT_UNITS[1],
            "-u",
            AGENT_UNITS[2],
        ])
    }

    /// Entries of the machine's journal over all boots, filtered by
    /// `journalctl` arguments (`-u UNIT`, `FIELD=VALUE`).
    pub fn journal_matching(&self, filter: &[&str]) -> Vec<serde_json::Value> {
        let out = Command::new("journalctl")
            .arg("-D")
            .arg(self.path("/var/log/journal"))
            .args(["-o", "json", "--no-pager"])
            .args(filter)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// `MESSAGE` lines of the agent's journal, for failure output.
    pub fn journal_text(&self) -> String {
        self.journal()
            .iter()
            .map(|e| {
                format!(
                    "{} {}",
                    e["_BOOT_ID"]
                        .as_str()
                        .unwrap_or("?")
                        .get(..8)
                        .unwrap_or("?"),
                    e["MESSAGE"].as_str().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn boot_ids(&self) -> Vec<String> {
        let out = Command::new("journalctl")
            .arg("-D")
            .arg(self.path("/var/log/journal"))
            .args(["--list-boots", "--no-pager", "-o", "json"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|b| b["boot_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The reporter's `systemctl status` and `show` for one boot.
    pub fn report(&self, boot_id: &str) -> (String, String) {
        let read = |ext: &str| {
            std::fs::read_to_string(self.path(&format!("/var/lib/test-report/{boot_id}.{ext}")))
                .unwrap_or_default()
        };
        (read("status"), read("show"))
    }

    pub fn show(&self, boot_id: &str, key: &str) -> String {
        let (_, show) = self.report(boot_id);
        property(&show, key)
    }

    /// A property of the fetch unit (`fetch`), of the manager (`manager`)
    /// or `systemctl is-system-running` (`system`), as the reporter saw
    /// them at the end of a boot.
    pub fn reported(&self, boot_id: &str, what: &str, key: &str) -> String {
        let text =
            std::fs::read_to_string(self.path(&format!("/var/lib/test-report/{boot_id}.{what}")))
                .unwrap_or_default();
        if key.is_empty() {
            return text.trim().to_owned();
        }
        property(&text, key)
    }

    /// From the first boot's start (the container's PID 1, systemd's
    /// `UserspaceTimestampMonotonic`) to the boot run's READY=1 (its
    /// `ActiveEnterTimestampMonotonic`): boot to converged. Both on the
    /// host's monotonic clock, which a container shares.
    pub fn boot_to_converged(&self, boot_id: &str) -> Option<Duration> {
        let us = |s: String| s.parse::<u64>().ok().filter(|v| *v > 0);
        let start = us(self.reported(boot_id, "manager", "UserspaceTimestampMonotonic"))?;
        let ready = us(self.show(boot_id, "ActiveEnterTimestampMonotonic"))?;
        Some(Duration::from_micros(ready.checked_sub(start)?))
    }

    /// A unit wanted by multi-user.target that takes `secs` (a slow part
    /// of the boot: multi-user.target, and so the boot run, waits for
    /// it). It writes when it started and ended (Unix ms) to
    /// `/var/lib/slow-boot.{start,done}`.
    pub fn slow_boot(&self, secs: f64) {
        self.write(
            "/etc/systemd/system/slow-boot.service",
            format!(
                "[Unit]\nDescription=A slow part of the boot\n\n\
                 [Service]\nType=oneshot\nRemainAfterExit=yes\n\
                 ExecStart=/bin/sh -c 'date +%%s%%3N > /var/lib/slow-boot.start; sleep {secs}; date +%%s%%3N > /var/lib/slow-boot.done'\n\n\
                 [Install]\nWantedBy=multi-user.target\n"
            ),
        );
        self.enable("slow-boot.service", "multi-user.target");
    }

    /// When the slow unit started and ended (Unix ms).
    pub fn slow_boot_times(&self) -> Option<(u64, u64)> {
        let read = |f: &str| {
            std::fs::read_to_string(self.path(f))
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()
        };
        Some((
            read("/var/lib/slow-boot.start")?,
            read("/var/lib/slow-boot.done")?,
        ))
    }

    /// The reporter does not wait for the boot's fetch to end (one that
    /// hangs).
    pub fn ignore_fetch(&self) {
        self.write("/etc/test-scenario/ignore-fetch", "");
    }

    /// Without the boot's fetch (masked, as `fetchAtBoot = false` does):
    /// the boot run downloads after the boot, as before.
    pub fn mask_fetch(&self) {
        let p = self.path(&format!("/etc/systemd/system/{FETCH_UNIT}"));
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink("/dev/null", p).unwrap();
    }

    /// The calls of `fh` and `determinate-nixd` made in one unit.
    pub fn call_lines_in(&self, unit: &str) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.unit.as_deref() == Some(unit))
            .filter(|c| matches!(c.prog.as_str(), "fh" | "determinate-nixd"))
            .map(|c| format!("{} {}", c.prog, c.argv.join(" ")))
            .collect()
    }

    /// Every download the `nix` stand-in made.
    pub fn downloads(&self) -> Vec<crate::standin::Download> {
        crate::standin::downloads(&self.path(crate::standin::DEFAULT_DIR))
    }

    pub fn calls(&self) -> Vec<Call> {
        crate::standin::calls(&self.path(crate::standin::DEFAULT_DIR))
    }

    pub fn call_lines(&self) -> Vec<String> {
        crate::standin::call_lines(&self.path(crate::standin::DEFAULT_DIR))
    }

    pub fn state(&self) -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(self.path("/var/lib/nixos-ami-agent/state.json"))
                .unwrap_or_default(),
        )
        .unwrap_or_default()
    }
}
