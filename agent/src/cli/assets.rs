//! `generate-assets --out DIR` (hidden): man pages and shell completions
//! from the clap definitions, for packaging (the Nix package installs
//! them).

use crate::exit::Failure;
use clap::{Args, CommandFactory};
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct AssetsArgs {
    /// Directory to write `man/*.1` and `completions/*` into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

impl AssetsArgs {
    pub fn run(self) -> Result<(), Failure> {
        generate(&self.out).map_err(|e| Failure::Usage(format!("{}: {e}", self.out.display())))
    }
}

pub fn generate(out: &Path) -> std::io::Result<()> {
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let cmd = super::Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "nixos-ami-agent", &completions)?;
    }
    Ok(())
}
