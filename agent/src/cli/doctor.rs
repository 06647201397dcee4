//! `doctor [--json]`: runs every precondition check and prints each with
//! its result and, on failure, what to do. Exit 0 only when none failed.

use crate::config::{self, Config};
use crate::doctor::{self, Status};
use crate::exit::{self, Failure};
use crate::run::Environment;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
}

impl DoctorArgs {
    /// Returns the exit code itself: a failed check is a result to show,
    /// not an error to log.
    pub async fn run(
        self,
        explicit_config: Option<PathBuf>,
        env: &Environment,
    ) -> Result<u8, Failure> {
        let (path, explicit) = match explicit_config {
            Some(p) => (p, true),
            None => (PathBuf::from(config::DEFAULT_PATH), false),
        };
        let checks = doctor::run(Config::load(&path, explicit), &path, env).await;
        let ok = !checks.iter().any(|c| c.status == Status::Fail);
        if self.json {
            let v = serde_json::json!({"ok": ok, "checks": checks});
            println!(
                "{}",
                serde_json::to_string_pretty(&v).expect("checks serialise")
            );
        } else {
            for c in &checks {
                let mark = match c.status {
                    Status::Pass => "ok  ",
                    Status::Warn => "WARN",
                    Status::Fail => "FAIL",
                    Status::Skip => "skip",
                };
                println!("{mark}  {:<17} {}", c.name, c.detail);
                if let Some(fix) = &c.fix {
                    println!("      {:<17} fix: {fix}", "");
                }
            }
            println!(
                "{}",
                if ok {
                    "all checks passed"
                } else {
                    "some checks failed"
                }
            );
        }
        Ok(if ok { exit::OK } else { exit::FAILED })
    }
}
