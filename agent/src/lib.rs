//! nixos-ami-agent: turns a freshly launched EC2 instance into the NixOS
//! configuration its operator named.
//!
//! The flow reads as sources → settings → plan → steps → state:
//! [`imds`] and [`ssm`] fetch, [`userdata`] sniffs, [`settings`] validates
//! and layers, [`plan`] decides, [`steps`] run the programs, [`state`]
//! remembers. [`run`] strings them together; [`cli`] is the front door.

pub mod aws;
pub mod cli;
pub mod config;
pub mod doctor;
pub mod exit;
pub mod imds;
pub mod log;
pub mod notify;
pub mod plan;
pub mod process;
pub mod reboot;
pub mod redact;
pub mod retry;
pub mod run;
pub mod settings;
pub mod ssm;
pub mod state;
pub mod steps;
pub mod system;
pub mod userdata;
