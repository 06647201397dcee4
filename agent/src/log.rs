//! Logging: human-readable lines on stderr (journald integration comes with
//! the systemd unit). Transport crates are capped at `warn` whatever the
//! filter says: at trace level they print request and response bodies,
//! which would carry IMDS tokens and SecureString values.

use tracing_subscriber::EnvFilter;

pub const FILTER_ENV: &str = "NIXOS_AMI_AGENT_LOG";
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
];

pub fn init() {
    let mut filter = EnvFilter::try_from_env(FILTER_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    for target in CAPPED {
        filter = filter.add_directive(format!("{target}=warn").parse().expect("valid directive"));
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}
