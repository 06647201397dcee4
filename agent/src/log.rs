//! Logging: to the journal with structured fields when run by systemd
//! (stderr is the journal: `JOURNAL_STREAM`) or with `--log journald`;
//! human-readable lines on stderr otherwise.
//!
//! Fields become journal fields as they are (`step` → `STEP`, the run
//! span's `instance_id` → `INSTANCE_ID`), and the three outcomes carry a
//! stable `MESSAGE_ID`, so `journalctl -u nixos-ami-agent MESSAGE_ID=...`
//! finds every apply, every no-op and every failure.
//!
//! Transport crates are capped at `warn` whatever the filter says, also a
//! more specific directive (`aws_smithy_runtime::client::orchestrator=trace`):
//! the cap is a filter of its own on every layer, not a directive the
//! environment can outbid. At trace level they print request and response
//! bodies, which would carry IMDS tokens and SecureString values; and
//! `LOG_SENSITIVE_BODIES`, which makes the SDK print them unredacted, is
//! removed from the environment before anything reads it.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
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
    /// The target was unhealthy after the switch and the previous system
    /// was put back; its store path is rejected.
    pub const ROLLED_BACK: &str = "71e23dba107e468494c831ed1fa05bbc";
    /// Where a run's (or the boot's fetch's) time went: `PHASES_MS`
    /// (`login=900 fetch=8100 ...`) and, for the first run of a boot,
    /// `SINCE_BOOT_MS`.
    pub const PHASES: &str = "d83fcfe263434edda3992e11922913c2";
    /// The boot's fetch ended: `OUTCOME` is `fetched`, `nothing` or
    /// `failed`; `STORE_PATH` what it fetched.
    pub const FETCHED: &str = "0aa4216b344d48ac89b65ded8963555c";
}

const CAPPED: &[&str] = &[
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "aws_smithy_http_client",
    "aws_sigv4",
    "aws_config",
    "aws_credential_types",
    "aws_runtime",
    "aws_sdk_ssm",
    "aws_sdk_sts",
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

/// `NIXOS_AMI_AGENT_LOG`, else `default`.
fn filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_env(FILTER_ENV).unwrap_or_else(|_| EnvFilter::new(default))
}

/// Whether an event may pass the cap: anything at warn or above, and
/// anything not from a transport crate.
fn within_cap(meta: &tracing::Metadata<'_>) -> bool {
    *meta.level() <= tracing::Level::WARN
        || !CAPPED.iter().any(|c| {
            meta.target() == *c
                || meta
                    .target()
                    .strip_prefix(c)
                    .is_some_and(|rest| rest.starts_with("::"))
        })
}

/// `default` is the level when `NIXOS_AMI_AGENT_LOG` is unset: `info`,
/// or `off` for a command whose output says all (`doctor`).
pub fn init(target: Target, default: &str) {
    // SAFETY: called first thing in main, before the runtime starts any
    // thread: nothing reads the environment concurrently.
    unsafe { std::env::remove_var("LOG_SENSITIVE_BODIES") };
    let cap = tracing_subscriber::filter::filter_fn(within_cap);
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
                    .with(filter(default))
                    .with(layer.with_filter(cap))
                    .init();
                return;
            }
            Err(e) => {
                eprintln!("nixos-ami-agent: cannot log to the journal ({e}); logging to stderr")
            }
        }
    }
    // Colours only for a terminal, and never with NO_COLOR set
    // (no-color.org: present and not empty).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::registry()
        .with(filter(default))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(ansi)
                .with_filter(cap),
        )
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
    fn the_cap_holds_for_more_specific_targets() {
        use tracing::Level;
        use tracing::callsite::Identifier;
        use tracing::field::FieldSet;
        use tracing::metadata::Kind;
        struct Cs;
        impl tracing::Callsite for Cs {
            fn set_interest(&self, _: tracing::subscriber::Interest) {}
            fn metadata(&self) -> &tracing::Metadata<'_> {
                unreachable!()
            }
        }
        static CS: Cs = Cs;
        let meta = |target: &'static str, level: Level| {
            tracing::Metadata::new(
                "e",
                target,
                level,
                None,
                None,
                None,
                FieldSet::new(&[], Identifier(&CS)),
                Kind::EVENT,
            )
        };
        assert!(!within_cap(&meta("aws_smithy_runtime", Level::DEBUG)));
        assert!(!within_cap(&meta(
            "aws_smithy_runtime::client::orchestrator",
            Level::TRACE
        )));
        assert!(within_cap(&meta("aws_smithy_runtime::client", Level::WARN)));
        assert!(
            within_cap(&meta("aws_smithy_runtime_api_x", Level::DEBUG)),
            "another crate"
        );
        assert!(within_cap(&meta("nixos_ami_agent::run", Level::TRACE)));
    }

    #[test]
    fn message_ids_are_distinct_128_bit_ids() {
        let ids = [
            message_id::APPLIED,
            message_id::NOTHING_TO_DO,
            message_id::FAILED,
            message_id::ROLLED_BACK,
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
            4
        );
    }
}
