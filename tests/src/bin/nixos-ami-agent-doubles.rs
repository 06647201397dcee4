//! The IMDS and SSM doubles as one program, for the boot-test containers:
//! `nixos-ami-agent-doubles CONFIG.json`, where the config names the
//! addresses (169.254.169.254:80 exists only on the container's private
//! loopback), the instance and its user data, and where the SSM
//! parameters' files are.

use nixos_ami_agent_tests::imds::{Imds, ImdsDouble};
use nixos_ami_agent_tests::ssm::{Ssm, SsmDouble};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Deserialize)]
struct Config {
    imds: std::net::SocketAddr,
    ssm: std::net::SocketAddr,
    #[serde(default)]
    imds_delay_ms: u64,
    instance_id: String,
    region: String,
    role: Option<String>,
    user_data_file: Option<PathBuf>,
    params_dir: PathBuf,
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: nixos-ami-agent-doubles CONFIG.json");
    let c: Config = serde_json::from_str(&std::fs::read_to_string(&path).expect("config"))
        .expect("config JSON");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let user_data = c
        .user_data_file
        .map(|f| std::fs::read(f).expect("user data file"));
    let mut imds = Imds::default();
    // The instance is a managed node (its SSM agent registered), so its
    // compliance reports are taken.
    let managed = nixos_ami_agent_tests::ssm::Instance {
        id: c.instance_id.clone(),
        tags: vec![],
    };
    (imds.user_data, imds.instance_id, imds.region, imds.role) =
        (user_data, c.instance_id, c.region, c.role);
    let _imds = ImdsDouble::start_at(&rt, c.imds, imds, Duration::from_millis(c.imds_delay_ms));
    let _ssm = SsmDouble::start_at(
        &rt,
        c.ssm,
        Ssm {
            params_dir: Some(c.params_dir),
            instances: vec![managed],
            ..Ssm::default()
        },
    );
    eprintln!(
        "doubles: IMDS on {} (after {} ms), SSM on {}",
        c.imds, c.imds_delay_ms, c.ssm
    );
    rt.block_on(std::future::pending::<()>());
}
