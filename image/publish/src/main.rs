use clap::Parser;
use nixos_ami_publish::cli::{self, Cli};
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { cli::USAGE } else { cli::OK });
        }
    };
    // The AWS SDK's transport logs bodies at trace level: capped.
    let mut filter =
        EnvFilter::try_from_env("NIXOS_AMI_PUBLISH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    for noisy in [
        "aws_smithy_runtime",
        "aws_smithy_http_client",
        "aws_config",
        "hyper",
        "rustls",
    ] {
        filter = filter.add_directive(format!("{noisy}=warn").parse().expect("a valid directive"));
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime");
    ExitCode::from(runtime.block_on(cli.run()))
}
