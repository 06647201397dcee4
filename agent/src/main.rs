use clap::Parser;
use nixos_ami_agent::{cli::Cli, exit, log};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    log::init(cli.log, cli.default_log_level());
    // One thread: the agent waits on the network and on children, and a
    // single thread means no other thread can fork while a freshly written
    // user-data script is still open for writing (ETXTBSY).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    ExitCode::from(runtime.block_on(cli.run()))
}
