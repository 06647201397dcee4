//! Test doubles for nixos-ami-agent, and a harness that runs the real
//! binary against them. Everything binds 127.0.0.1 on ephemeral ports.
//!
//! - [`imds`]: IMDSv2 with real token semantics and fault injection;
//! - [`ssm`]: `AmazonSSM.GetParameter` over the AWS JSON 1.1 protocol;
//! - [`sts`]: `GetCallerIdentity` over the AWS Query protocol, for `doctor`;
//! - [`standin`]: the `fh` and `determinate-nixd` stand-ins (the
//!   `fake-fh` and `fake-determinate-nixd` binaries) that record argv;
//! - [`container`]: boot tests under systemd in `systemd-nspawn`;
//! - [`dbus`]: a private bus with logind and systemd doubles for reboots;
//! - [`harness`]: one temp dir per scenario with config, system links and
//!   doubles, and a way to run the agent in it;
//! - [`moto`] and [`aws_double`]: moto (EC2, EBS, SSM) with a double in
//!   front for what moto lacks, for `nixos-ami-publish`;
//! - [`ebs`]: a fast EBS direct API double for the upload benchmark.

pub mod aws_double;
pub mod container;
pub mod dbus;
pub mod ebs;
pub mod first_boot;
pub mod harness;
pub mod imds;
pub mod moto;
pub mod ssm;
pub mod ssm_compliance;
pub mod standin;
pub mod sts;
pub mod tls;
