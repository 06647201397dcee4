//! moto (PyPI `moto[server]`), an independent implementation of EC2, EBS
//! and SSM: one server process on 127.0.0.1 per test, multi-region by the
//! signature's region. `scripts/test` installs it into
//! `target/tools/moto`; `MOTO_SERVER` names another `moto_server`.
//!
//! Where moto is laxer than AWS or lacks an action, [`crate::aws_double`]
//! stands in front of it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where `moto_server` is, if it is installed.
pub fn server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MOTO_SERVER") {
        return Some(p.into());
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tools/moto/bin/moto_server");
    p.exists().then_some(p)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Moto {
    /// Starts moto on a free loopback port and waits until it answers.
    pub fn start() -> Self {
        let bin = server().expect("moto_server is not installed (scripts/test installs it)");
        let port = free_port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("NO_PROXY", "*")
            // moto's own AMIs would not be ours anyway; fewer to list.
            .env("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "moto did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
