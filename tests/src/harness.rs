//! One scenario = one temp dir laid out like a small NixOS system (store
//! paths, `current-system`, the system profile, `booted-system`), a config
//! file pointing the agent at it, the doubles, and the stand-ins. The agent
//! runs unprivileged with a scrubbed environment: loopback endpoints and
//! static fake credentials only.

use crate::dbus::BusDouble;
use crate::imds::{Imds, ImdsDouble};
use crate::ssm::{Ssm, SsmDouble};
use crate::standin::{self, Behaviour, Call};
use crate::sts::StsDouble;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The output ref most scenarios apply, and where it resolves.
pub const REF: &str = "my-org/web/0.1#nixosConfigurations.web";
/// Resolves to a system whose kernel differs from the booted one.
pub const REF_NEW_KERNEL: &str = "my-org/web/0.2#nixosConfigurations.web";
pub const STATIC_ACCESS_KEY: &str = "AKIDSTATICFAKEKEY000";

pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// A listener that accepts and closes the first N connections, as an IMDS
/// still coming up (or a middlebox) would.
pub struct Dropping {
    pub inner: tokio::net::TcpListener,
    pub drop: Arc<AtomicU32>,
}

impl axum::serve::Listener for Dropping {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.inner.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let pending = self.drop.load(Ordering::SeqCst);
            if pending > 0 {
                self.drop.store(pending - 1, Ordering::SeqCst);
                drop(stream);
                continue;
            }
            return (stream, addr);
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Serves `app` on `listener` (bound already, so its port is known) on the
/// doubles' runtime; `drop` connections are accepted and closed first.
pub fn serve(
    rt: &tokio::runtime::Runtime,
    listener: std::net::TcpListener,
    app: axum::Router,
    drop: Arc<AtomicU32>,
) {
    listener.set_nonblocking(true).unwrap();
    rt.spawn(async move {
        let inner = tokio::net::TcpListener::from_std(listener).unwrap();
        axum::serve(Dropping { inner, drop }, app).await.unwrap();
    });
}

/// A binary of this workspace, next to the test executable's directory
/// (`target/debug/deps/..`).
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(format!("{}_BIN", name.to_uppercase().replace('-', "_"))) {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace's binaries first (`cargo build --workspace --bins`; scripts/test does)",
        p.display()
    );
    p
}

pub struct Output {
    /// The exit code; -1 when the agent died of a signal.
    pub code: i32,
    /// The signal the agent died of, if it did.
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {} (signal {:?})\n--- stdout\n{}--- stderr\n{}",
            self.code, self.signal, self.stdout, self.stderr
        )
    }
}

pub struct Scenario {
    pub dir: tempfile::TempDir,
    pub imds: ImdsDouble,
    pub ssm: SsmDouble,
    pub sts: StsDouble,
    /// Top-level settings (image defaults) for the config file.
    pub defaults: String,
    /// `[agent]` keys overriding the scenario's.
    pub agent: Vec<(String, String)>,
    pub behaviour: Behaviour,
    pub env: Vec<(String, String)>,
    pub env_remove: Vec<String>,
    pub bus: Option<BusDouble>,
}

impl Default for Scenario {
    fn default() -> Self {
        Self::new()
    }
}

impl Scenario {
    pub fn new() -> Self {
        Self::with_imds_delay(Duration::ZERO)
    }

    /// IMDS starts listening only after `delay` (connections refused
    /// until then), as on an instance whose metadata service is not up.
    pub fn with_imds_delay(delay: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["store", "run", "profiles", "bin", "standin"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let store = root.join("store");
        for f in [
            "kernel-1",
            "kernel-2",
            "initrd-1",
            "initrd-2",
            "modules-1",
            "modules-2",
        ] {
            std::fs::create_dir_all(store.join(f)).unwrap();
        }
        for (system, k) in [
            ("old-system", "1"),
            ("new-system", "1"),
            ("kernel-system", "2"),
        ] {
            make_system(&store, system, k);
        }
        symlink(store.join("old-system"), root.join("run/current-system")).unwrap();
        symlink(store.join("old-system"), root.join("run/booted-system")).unwrap();
        symlink(store.join("old-system"), root.join("profiles/system")).unwrap();
        symlink(workspace_bin("fake-fh"), root.join("bin/fh")).unwrap();
        symlink(
            workspace_bin("fake-determinate-nixd"),
            root.join("bin/determinate-nixd"),
        )
        .unwrap();
        std::fs::write(root.join("empty"), "").unwrap();
        std::fs::write(root.join("run/boot_id"), boot_id(1)).unwrap();
        let mut behaviour = Behaviour {
            current_system: root.join("run/current-system"),
            system_profile: root.join("profiles/system"),
            ..Behaviour::default()
        };
        behaviour
            .store_paths
            .insert(REF.into(), store.join("new-system"));
        behaviour
            .store_paths
            .insert(REF_NEW_KERNEL.into(), store.join("kernel-system"));
        let imds = ImdsDouble::start(rt(), Imds::default(), delay);
        // The instance is a managed instance (its SSM agent registered),
        // so it may report compliance.
        let ssm = SsmDouble::start(
            rt(),
            Ssm {
                instances: vec![crate::ssm::Instance {
                    id: INSTANCE_ID.into(),
                    tags: vec![("Fleet".into(), "web".into())],
                }],
                ..Ssm::default()
            },
        );
        let sts = StsDouble::start(rt());
        // systemd is on the system bus of every NixOS machine: the health
        // gate asks it after each switch.
        let bus = BusDouble::start(rt(), root, Some(&root.join("standin")), false, false);
        Self {
            dir,
            imds,
            ssm,
            sts,
            defaults: String::new(),
            agent: vec![],
            behaviour,
            env: vec![],
            env_remove: vec![],
            bus: Some(bus),
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    pub fn store_path(&self, name: &str) -> PathBuf {
        self.path("store").join(name)
    }

    pub fn user_data(&self, bytes: impl Into<Vec<u8>>) -> &Self {
        let b = bytes.into();
        self.imds.with(|i| i.user_data = Some(b));
        self
    }

    pub fn set_agent(&mut self, key: &str, toml_value: &str) -> &mut Self {
        self.agent.retain(|(k, _)| k != key);
        self.agent.push((key.into(), toml_value.into()));
        self
    }

    /// A private system bus with logind and/or systemd doubles, for
    /// scenarios that reboot.
    pub fn with_bus(&mut self, logind: bool, systemd: bool) -> &BusDouble {
        self.bus = None; // its daemon gone before the next binds the socket
        self.bus = Some(BusDouble::start(
            rt(),
            self.dir.path(),
            Some(&self.path("standin")),
            logind,
            systemd,
        ));
        self.bus.as_ref().unwrap()
    }

    /// No system bus at all (the default has systemd on it, as every
    /// NixOS machine does; neither logind nor a reboot through systemd).
    pub fn without_bus(&mut self) -> &mut Self {
        self.bus = None;
        self
    }

    pub fn reboot_requests(&self) -> Vec<String> {
        self.bus.as_ref().map(BusDouble::calls).unwrap_or_default()
    }

    /// Credentials as on EC2: no static keys; the SDK's default chain finds
    /// the instance role (if the IMDS double has one) through IMDS.
    pub fn use_instance_role(&mut self) -> &mut Self {
        for k in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_EC2_METADATA_DISABLED",
        ] {
            self.env_remove.push(k.into());
        }
        self.env
            .push(("AWS_EC2_METADATA_SERVICE_ENDPOINT".into(), self.imds.url()));
        self
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("config.toml")
    }

    fn write_config(&self) {
        let r = self.root();
        let q = |p: &str| format!("{:?}", r.join(p).display().to_string());
        let mut agent: Vec<(String, String)> = vec![
            ("fh".into(), q("bin/fh")),
            ("determinate-nixd".into(), q("bin/determinate-nixd")),
            ("nix-env".into(), q("run/current-system/sw/bin/nix-env")),
            ("state-dir".into(), q("state")),
            ("current-system".into(), q("run/current-system")),
            ("booted-system".into(), q("run/booted-system")),
            ("boot-id".into(), q("run/boot_id")),
            ("system-profile".into(), q("profiles/system")),
            ("imds-endpoint".into(), format!("{:?}", self.imds.url())),
            ("retry-budget".into(), "\"4s\"".into()),
            ("command-timeout".into(), "\"10s\"".into()),
            ("apply-timeout".into(), "\"30s\"".into()),
            ("script-timeout".into(), "\"30s\"".into()),
            ("lock-wait".into(), "\"2s\"".into()),
        ];
        for (k, v) in &self.agent {
            agent.retain(|(key, _)| key != k);
            agent.push((k.clone(), v.clone()));
        }
        let mut text = format!("{}\n[agent]\n", self.defaults);
        for (k, v) in agent {
            text.push_str(&format!("{k} = {v}\n"));
        }
        std::fs::write(self.config_path(), text).unwrap();
        standin::write_behaviour(&self.path("standin"), &self.behaviour);
    }

    pub fn command(&self, args: &[&str]) -> Command {
        self.command_with(args, true)
    }

    fn command_with(&self, args: &[&str], config_flag: bool) -> Command {
        self.write_config();
        let mut c = Command::new(workspace_bin("nixos-ami-agent"));
        if config_flag {
            c.arg("--config").arg(self.config_path());
        }
        c.args(args);
        c.env_clear()
            .env("PATH", host_bin())
            .env("HOME", self.root())
            .env(standin::DIR_ENV, self.path("standin"))
            .env("NIXOS_AMI_AGENT_LOG", "debug")
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("AWS_ACCESS_KEY_ID", STATIC_ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", "static-fake-secret-key")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ENDPOINT_URL_SSM", self.ssm.url())
            .env("AWS_ENDPOINT_URL_STS", self.sts.url())
            .env("AWS_CONFIG_FILE", self.path("empty"))
            .env("AWS_SHARED_CREDENTIALS_FILE", self.path("empty"))
            // Never the host's system bus: a reboot request there would
            // reboot the machine running the tests.
            .env(
                "DBUS_SYSTEM_BUS_ADDRESS",
                match &self.bus {
                    Some(b) => b.address.clone(),
                    None => format!("unix:path={}", self.path("no-system-bus").display()),
                },
            );
        for (k, v) in &self.env {
            c.env(k, v);
        }
        for k in &self.env_remove {
            c.env_remove(k);
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args).spawn().expect("agent starts")
    }

    pub fn run(&self, args: &[&str]) -> Output {
        finish(self.spawn(args), Duration::from_secs(90))
    }

    /// As an operator runs a command: without `NIXOS_AMI_AGENT_LOG`.
    pub fn run_without_log_filter(&self, args: &[&str]) -> Output {
        let mut c = self.command(args);
        c.env_remove("NIXOS_AMI_AGENT_LOG");
        finish(c.spawn().expect("agent starts"), Duration::from_secs(90))
    }

    /// Without `--config`: the agent reads its default config path.
    pub fn run_without_config_flag(&self, args: &[&str]) -> Output {
        let mut c = self.command_with(args, false);
        finish(c.spawn().expect("agent starts"), Duration::from_secs(90))
    }

    pub fn calls(&self) -> Vec<Call> {
        standin::calls(&self.path("standin"))
    }

    /// `fh fetch REF LINK` as a run runs it: the link (the fetched
    /// closure's GC root) in the state directory.
    pub fn fetch_line(&self, reference: &str) -> String {
        format!(
            "fh fetch {reference} {}",
            self.path("state/fetched").display()
        )
    }

    /// `fh fetch REF LINK` as `nixos-ami-agent fetch` (the boot's fetch)
    /// runs it, with its own link.
    pub fn boot_fetch_line(&self, reference: &str) -> String {
        format!(
            "fh fetch {reference} {}",
            self.path("state/fetched-at-boot").display()
        )
    }

    /// Argv of every stand-in call, as `prog arg arg`.
    pub fn call_lines(&self) -> Vec<String> {
        standin::call_lines(&self.path("standin"))
    }

    /// Every `switch-to-configuration`, as `switch-to-configuration
    /// SYSTEM ACTION` (SYSTEM: the store directory's name).
    pub fn switch_lines(&self) -> Vec<String> {
        standin::switch_lines(&self.path("standin"))
    }

    /// What the systemd double reports while `system` runs: these units
    /// with these `ActiveState`s.
    pub fn units_on(&mut self, system: &str, units: &[(&str, &str)]) -> &mut Self {
        self.behaviour.units.insert(
            system.into(),
            units
                .iter()
                .map(|(u, s)| ((*u).to_owned(), (*s).to_owned()))
                .collect(),
        );
        self
    }

    /// Every download the `nix` stand-in made (a store path that was not
    /// valid yet).
    pub fn downloads(&self) -> Vec<crate::standin::Download> {
        crate::standin::downloads(&self.path("standin"))
    }

    /// Calls of the `nix` stand-in, as `nix arg arg`.
    pub fn nix_call_lines(&self) -> Vec<String> {
        standin::nix_call_lines(&self.path("standin"))
    }

    pub fn state(&self) -> serde_json::Value {
        let text =
            std::fs::read_to_string(self.path("state/state.json")).expect("state.json exists");
        serde_json::from_str(&text).expect("state.json is JSON")
    }

    pub fn current_system(&self) -> PathBuf {
        std::fs::canonicalize(self.path("run/current-system")).unwrap()
    }

    pub fn system_profile(&self) -> PathBuf {
        std::fs::canonicalize(self.path("profiles/system")).unwrap()
    }

    /// Another system in the store (the booted kernel), for a target
    /// that resolves to a new store path.
    pub fn add_system(&self, name: &str) -> PathBuf {
        make_system(&self.path("store"), name, "1")
    }

    /// What the machine does when it reboots: a new boot ID, and the boot
    /// default becomes the booted and the running system, as NixOS's
    /// stage 2 makes it.
    pub fn reboot_into_profile(&self) {
        self.new_boot();
        let profile = self.system_profile();
        for link in ["run/booted-system", "run/current-system"] {
            std::fs::remove_file(self.path(link)).unwrap();
            symlink(&profile, self.path(link)).unwrap();
        }
    }

    /// A new boot as the kernel shows it: the next boot ID. Which system
    /// it booted is the caller's to set (`run/booted-system`).
    pub fn new_boot(&self) {
        let file = self.path("run/boot_id");
        let now = std::fs::read_to_string(&file).unwrap();
        let n = u64::from_str_radix(now.trim().rsplit('-').next().unwrap(), 16).unwrap();
        std::fs::write(file, boot_id(n + 1)).unwrap();
    }
}

/// A NixOS-like system `store/NAME`: kernel, initrd and modules (kernel
/// and initrd number `kernel`), `sw/bin` with `nix`, and
/// `bin/switch-to-configuration`.
fn make_system(store: &Path, name: &str, kernel: &str) -> PathBuf {
    let s = store.join(name);
    std::fs::create_dir_all(&s).unwrap();
    symlink(store.join(format!("kernel-{kernel}")), s.join("kernel")).unwrap();
    symlink(store.join(format!("initrd-{kernel}")), s.join("initrd")).unwrap();
    symlink(store.join("modules-1"), s.join("kernel-modules")).unwrap();
    // Each system carries `nix`, as a NixOS system's `sw/bin` does;
    // nothing else on the agent's PATH has one.
    std::fs::create_dir_all(s.join("sw/bin")).unwrap();
    symlink(workspace_bin("fake-nix"), s.join("sw/bin/nix")).unwrap();
    symlink(workspace_bin("fake-nix"), s.join("sw/bin/nix-env")).unwrap();
    std::fs::create_dir_all(s.join("bin")).unwrap();
    symlink(
        workspace_bin("fake-switch-to-configuration"),
        s.join("bin/switch-to-configuration"),
    )
    .unwrap();
    s
}

/// A boot ID in the kernel's form (`/proc/sys/kernel/random/boot_id`).
fn boot_id(n: u64) -> String {
    format!("5f3c1a2e-0b7d-4c1e-9a55-{n:012x}\n")
}

/// The agent's PATH in these tests: this machine's /usr/bin and /bin
/// without any Nix program. Debian's nix (installed for the Nix lint)
/// lives in /usr/bin, and a stand-in finding it would run the real nix,
/// which reaches for the network; only the scenario's fake systems carry
/// a `nix`, as a NixOS system's `sw/bin` does.
pub fn host_bin() -> &'static str {
    static DIR: OnceLock<String> = OnceLock::new();
    DIR.get_or_init(|| {
        // Next to the workspace's binaries (target/debug/hostbin), built
        // once per build directory and shared by every test process.
        let dir = workspace_bin("nixos-ami-agent")
            .parent()
            .unwrap()
            .join("hostbin");
        if !dir.exists() {
            let tmp = tempfile::Builder::new()
                .prefix(".hostbin.")
                .tempdir_in(dir.parent().unwrap())
                .unwrap();
            for from in ["/usr/bin", "/bin"] {
                let Ok(entries) = std::fs::read_dir(from) else {
                    continue;
                };
                for e in entries.flatten() {
                    let name = e.file_name();
                    let link = tmp.path().join(&name);
                    if !name.to_string_lossy().starts_with("nix") && !link.exists() {
                        let _ = symlink(e.path(), link);
                    }
                }
            }
            // Another test process may have won the race; either is fine.
            let kept = tmp.keep();
            if std::fs::rename(&kept, &dir).is_err() {
                let _ = std::fs::remove_dir_all(&kept);
            }
        }
        dir.display().to_string()
    })
}

/// Waits for the agent, killing it (and failing the test) if it hangs.
/// `nixos-ami-publish ARGS` with a clean environment: fake static
/// credentials, every AWS endpoint at `endpoint` (loopback), IMDS off, no
/// configuration files, `home` as HOME.
pub fn publish_command(endpoint: &str, region: &str, home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(workspace_bin("nixos-ami-publish"));
    c.args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("AWS_ACCESS_KEY_ID", "AKIDPUBLISHTEST00001")
        .env("AWS_SECRET_ACCESS_KEY", "fake-secret")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_REGION", region)
        .env("NIXOS_AMI_PUBLISH_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// The IMDS double's instance.
pub const INSTANCE_ID: &str = "i-0123456789abcdef0";

pub fn finish(mut child: Child, limit: Duration) -> Output {
    use std::io::Read;
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).ok();
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).ok();
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            panic!(
                "the agent did not finish within {limit:?}; stderr:\n{}",
                e.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    use std::os::unix::process::ExitStatusExt;
    Output {
        code: status.code().unwrap_or(-1),
        signal: status.signal(),
        stdout: o.join().unwrap(),
        stderr: e.join().unwrap(),
    }
}

/// `#nixos-ami-agent` TOML user data.
pub fn toml_user_data(body: &str) -> Vec<u8> {
    format!("#nixos-ami-agent\n{body}\n").into_bytes()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}
