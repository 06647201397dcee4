//! The pure core of nixos-ami-agent: what it reads from untrusted input
//! and what it decides, with no network, no processes and no state.
//!
//! [`userdata`] sniffs the instance's user data (gzip, MIME, TOML, JSON,
//! scripts), [`settings`] validates and layers what it and the config file
//! say, [`config`] reads the image's config file, and [`plan`] decides
//! whether to apply, what to verify and whether to reboot; [`health`]
//! judges the system after a switch; [`phases`] says where a run's time
//! went; [`text`] makes
//! outside text safe to show. The agent crate
//! does the effects around it; the fuzzer and the property tests need
//! nothing else.

pub mod compliance;
pub mod config;
pub mod fleet;
pub mod health;
pub mod phases;
pub mod plan;
pub mod settings;
pub mod text;
pub mod userdata;
