//! A private D-Bus (a `dbus-daemon` on a socket in the scenario's temp
//! dir) with doubles of logind's and systemd's managers that record the
//! reboot requests they get. The agent finds it through
//! `DBUS_SYSTEM_BUS_ADDRESS`; it never sees the host's system bus.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

pub type Calls = Arc<Mutex<Vec<String>>>;

struct Login1 {
    calls: Calls,
}

#[zbus::interface(name = "org.freedesktop.login1.Manager")]
impl Login1 {
    fn reboot(&self, interactive: bool) {
        self.calls
            .lock()
            .unwrap()
            .push(format!("login1.Reboot({interactive})"));
    }
}

struct Systemd1 {
    calls: Calls,
}

#[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
impl Systemd1 {
    fn start_unit(&self, name: String, mode: String) -> zbus::OwnedObjectPath {
        self.calls
            .lock()
            .unwrap()
            .push(format!("systemd1.StartUnit({name}, {mode})"));
        zbus::OwnedObjectPath::try_from("/org/freedesktop/systemd1/job/1").unwrap()
    }
}

pub struct BusDouble {
    daemon: Child,
    pub address: String,
    pub calls: Calls,
    _connections: Vec<zbus::Connection>,
}

impl Drop for BusDouble {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

impl BusDouble {
    /// Starts the bus and the doubles asked for (`logind`, `systemd`).
    pub fn start(rt: &tokio::runtime::Runtime, dir: &Path, logind: bool, systemd: bool) -> Self {
        let socket = dir.join("system_bus_socket");
        let address = format!("unix:path={}", socket.display());
        // The daemon prints its address once it accepts connections; the
        // socket file alone appears at bind(), before listen().
        let mut daemon = Command::new("dbus-daemon")
            .args([
                "--session",
                "--nofork",
                "--nopidfile",
                "--print-address=1",
                "--address",
                &address,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon (Debian package dbus-daemon) is installed");
        let mut ready = String::new();
        BufReader::new(daemon.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert!(
            ready.starts_with("unix:"),
            "dbus-daemon did not start on {address}"
        );
        let calls = Calls::default();
        let mut connections = vec![];
        rt.block_on(async {
            let builder = || zbus::connection::Builder::address(address.as_str());
            if logind {
                let c = builder()
                    .name("org.freedesktop.login1")
                    .serve_at(
                        "/org/freedesktop/login1",
                        Login1 {
                            calls: calls.clone(),
                        },
                    )
                    .build()
                    .await
                    .expect("logind double on the private bus");
                connections.push(c);
            }
            if systemd {
                let c = builder()
                    .name("org.freedesktop.systemd1")
                    .serve_at(
                        "/org/freedesktop/systemd1",
                        Systemd1 {
                            calls: calls.clone(),
                        },
                    )
                    .build()
                    .await
                    .expect("systemd double on the private bus");
                connections.push(c);
            }
        });
        Self {
            daemon,
            address,
            calls,
            _connections: connections,
        }
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}
