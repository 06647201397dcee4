//! Logging: to the journal with structured fields when run by systemd
//! (stderr is the journal: `JOURNAL_STREAM`) or with `--log journald`;
//! human-readable lines on stderr otherwise.
//!
//! Fields become journal fields as they are (`step` → `STEP`, the run
//! span's `instance_id` → `INSTANCE_ID`), and the three outcomes carry a
//! stable `MESSAGE_ID`, so `journalctl -u nixos-ami-agent MESSAGE_ID=...`
//! finds every apply, every no-op and every failure.
//!
//! Transport crates are capped at `warn` whatever the filter says: at trace
//! level they print request and response bodies, which would carry IMDS
//! tokens and SecureString values.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub const FILTER_ENV: &str = "NIXOS_AMI_AGENT_LOG";
pub const SYSLOG_IDENTIFIER: &str = "nixos-ami-agent";

/// `MESSAGE_ID`s of the outcome events. Never change them: operators'
/// queries and alerts depend on them.
pub mod message_id {
    /// The system was switched to (or made to boot) the target.
    pub const APPLIED: &str = "3f88d658b85143fcbb03f62a0a791e73";
    /// The run found nothing to do (already converged, or no target).
    pub const NOTHING_TO_DO: &str = "9e9b458c8dc141e9a75f3eb338906dc8";
    /// The run failed; `EXIT_CODE` says how.
    pub const FAILED: &str = "07dbe6e6e7384bc8a3aedd0784ddc7c8";
}

const CAPPED: &[&str] = &[
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "aws_smithy_http_client",
    "aws_sigv4",
    "aws_config",
    "aws_sdk_ssm",
    "hyper",
    "hyper_util",
    "reqwest",
    "h2",
    "rustls",
    "zbus",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The journal when stderr is connected to it, stderr otherwise.
    Auto,
    Stderr,
    Journald,
}

fn filter() -> EnvFilter {
    let mut filter = EnvFilter::try_from_env(FILTER_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    for target in CAPPED {
        filter = filter.add_directive(format!("{target}=warn").parse().expect("valid directive"));
    }
    filter
}

pub fn init(target: Target) {
    let journald = match target {
        Target::Stderr => false,
        Target::Journald => true,
        Target::Auto => stderr_is_journal(std::env::var("JOURNAL_STREAM").ok().as_deref()),
    };
    if journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_field_prefix(None)
                    .with_syslog_identifier(SYSLOG_IDENTIFIER.to_owned());
                tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .init();
                return;
            }
            Err(e) => {
                eprintln!("nixos-ami-agent: cannot log to the journal ({e}); logging to stderr")
            }
        }
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

/// systemd sets `JOURNAL_STREAM=DEV:INODE` for the stream it connects to
/// the journal; stderr is the journal when its device and inode match (it
/// may have been redirected since).
fn stderr_is_journal(journal_stream: Option<&str>) -> bool {
    let Some((dev, ino)) = journal_stream.and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_match_stderr() {
        assert!(!stderr_is_journal(None));
        assert!(!stderr_is_journal(Some("garbage")));
        assert!(!stderr_is_journal(Some("1:1")));
        let st = nix::sys::stat::fstat(std::io::stderr()).unwrap();
        assert!(stderr_is_journal(Some(&format!(
            "{}:{}",
            st.st_dev, st.st_ino
        ))));
    }

    #[test]
    fn message_ids_are_distinct_128_bit_ids() {
        let ids = [
            message_id::APPLIED,
            message_id::NOTHING_TO_DO,
            message_id::FAILED,
        ];
        for id in ids {
            assert_eq!(id.len(), 32);
            assert!(
                id.chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            );
        }
        assert_eq!(
            ids.iter().collect::<std::collections::HashSet<_>>().len(),
            3
        );
    }
}
