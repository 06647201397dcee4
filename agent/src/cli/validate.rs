//! `validate FILE`: the same sniffing and checks as `run`, offline, so an
//! operator finds a typo before launching a fleet.

use crate::exit::Failure;
use crate::settings::{SettingsError, Source, Target};
use crate::userdata::{self, Digest, Kind};
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The user-data file, exactly as it will be given to EC2.
    pub file: PathBuf,
}

impl ValidateArgs {
    pub fn run(self) -> Result<(), Failure> {
        let raw = super::read_user_data(&self.file)?;
        let name = self.file.display();
        let invalid = |e: SettingsError| {
            println!("{name}: invalid: {e}");
            Failure::Input(e)
        };
        let ud = userdata::sniff(&raw).map_err(invalid)?;
        if matches!(ud.kind, Kind::NotForUs | Kind::Absent) {
            return Err(invalid(SettingsError::new(
                &Source::UserData,
                None,
                format!(
                    "{}; the agent would ignore it. Start TOML settings with a first line \
                     `#nixos-ami-agent`, or wrap JSON settings in {{\"nixos-ami-agent\": {{...}}}}",
                    ud.kind.describe()
                ),
            )));
        }
        println!(
            "{name}: valid: {} ({})",
            ud.kind.describe(),
            Digest::of(&raw)
        );
        if let Some(l) = &ud.settings {
            match &l.target {
                Some(Target::Flake(f)) => println!("  flake = {}", f.as_str()),
                Some(Target::Ssm(p)) => println!("  ssm-parameter = {}", p.as_str()),
                None => println!("  no target (the image's default applies)"),
            }
            if let Some(a) = l.action {
                println!("  action = {}", a.as_str());
            }
            if let Some(r) = l.reboot {
                println!("  reboot = {}", r.as_str());
            }
            if let Some(login) = l.login {
                println!("  login = {login}");
            }
        }
        for s in &ud.scripts {
            println!(
                "  script {} ({}): runs once per instance",
                s.label, s.digest
            );
        }
        for p in &ud.ignored {
            println!("  {p}: for another tool, left alone");
        }
        Ok(())
    }
}
