//! Everything the agent parses from untrusted input: user data (after
//! gzip, MIME, TOML, JSON), an SSM parameter's value, the config file, and
//! output references. No panic, bounded memory (libFuzzer's -rss_limit_mb),
//! and nothing accepted may become a flag or a second argument.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixos_ami_agent_core::config::Config;
use nixos_ami_agent_core::settings::{OutputRef, Target, parameter};
use nixos_ami_agent_core::userdata;
use std::path::Path;

fn safe(arg: &str) {
    assert!(!arg.is_empty() && !arg.starts_with('-'), "{arg:?}");
    assert!(!arg.chars().any(|c| c.is_whitespace() || c.is_control()), "{arg:?}");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(ud) = userdata::sniff(data) {
        if let Some(Target::Flake(f)) = ud.settings.as_ref().and_then(|l| l.target.as_ref()) {
            safe(f.as_str());
        }
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(p) = parameter::parse_value(&text, true) {
        safe(p.flake.as_str());
    }
    let _ = Config::parse(&text, Path::new("/etc/nixos-ami-agent/config.toml"));
    if let Ok(r) = OutputRef::parse(&text) {
        safe(r.as_str());
    }
});
