//! Everything the agent parses from untrusted input: user data (after
//! gzip, MIME, TOML, JSON), an SSM parameter's value and name, the config
//! file (durations, the IMDS endpoint), and output references. No panic,
//! bounded memory (libFuzzer's -rss_limit_mb), nothing accepted may become
//! a flag or a second argument, and nothing shown may carry a control
//! character.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixos_ami_agent_core::config::{Config, MAX_DURATION};
use nixos_ami_agent_core::settings::{OutputRef, ParameterName, Target, parameter};
use nixos_ami_agent_core::{text, userdata};
use std::path::Path;

fn safe(arg: &str) {
    assert!(!arg.is_empty() && !arg.starts_with('-'), "{arg:?}");
    assert!(!arg.chars().any(|c| c.is_whitespace() || c.is_control()), "{arg:?}");
}

fn loggable(s: &str) {
    assert!(!s.chars().any(|c| c.is_control() && c != '\t'), "{s:?}");
}

fuzz_target!(|data: &[u8]| {
    match userdata::sniff(data) {
        Ok(ud) => {
            if let Some(Target::Flake(f)) = ud.settings.as_ref().and_then(|l| l.target.as_ref()) {
                safe(f.as_str());
            }
            let kept: usize = ud.scripts.iter().map(|s| s.body.len()).sum();
            assert!(kept <= data.len() + userdata::gzip::MAX_INFLATED);
            ud.ignored.iter().for_each(|p| loggable(p));
        }
        Err(e) => loggable(&e.to_string()),
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(p) = parameter::parse_value(&text, true) {
        safe(p.flake.as_str());
    }
    match Config::parse(&text, Path::new("/etc/nixos-ami-agent/config.toml")) {
        Ok(c) => {
            let a = &c.agent;
            for d in [a.retry_budget, a.command_timeout, a.apply_timeout, a.script_timeout, a.lock_wait] {
                assert!(d <= MAX_DURATION);
            }
            if let Ok(e) = a.imds_endpoint(None) {
                assert!(e.starts_with("http://") && !e.contains(['?', '#', '@']), "{e}");
            }
        }
        Err(e) => loggable(&e.to_string()),
    }
    if let Ok(r) = OutputRef::parse(&text) {
        safe(r.as_str());
    }
    if let Ok(p) = ParameterName::parse(&text) {
        safe(p.as_str());
        assert!(p.matches_reply(p.as_str()));
    }
    loggable(&text::escape_controls(&text));
});
