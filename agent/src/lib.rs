//! nixos-ami-agent: turns a freshly launched EC2 instance into the NixOS
//! configuration its operator named.
//!
//! The flow reads as sources → settings → plan → steps → state:
//! [`imds`] and [`ssm`] fetch, [`userdata`] sniffs, [`settings`] validates
//! and layers, [`plan`] decides, [`steps`] run the programs, [`state`]
//! remembers. [`run`] strings them together; [`cli`] is the front door.
//!
//! The pure part (user data, settings, config, plan: no network, no
//! processes, no state) is its own crate, `nixos-ami-agent-core`, so that
//! it can be fuzzed and tested without the AWS SDK; it is re-exported here
//! under the same paths.

/// The gate's settings and verdict (pure); [`health`] observes.
pub use nixos_ami_agent_core::health as health_rules;
pub use nixos_ami_agent_core::{config, phases, plan, settings, text, userdata};

pub mod aws;
pub mod cli;
pub mod compliance;
pub mod doctor;
pub mod exit;
pub mod fetch;
pub mod fleet;
pub mod gate;
pub mod health;
pub mod history;
pub mod imds;
pub mod log;
pub mod notify;
pub mod process;
pub mod reboot;
pub mod redact;
pub mod retry;
pub mod role;
pub mod run;
pub mod safe_dir;
pub mod ssm;
pub mod state;
pub mod steps;
pub mod stop;
pub mod system;
pub mod systemd;
pub mod timing;
