//! `forget-rejected [STORE_PATH]`: lets a rolled-back store path be
//! applied again (after the operator fixed what made it unhealthy
//! elsewhere, a database it needed, say). Takes the run's lock, so it
//! never races a run that is recording a rejection.

use crate::config::Config;
use crate::exit::Failure;
use crate::state::Store;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// The rejected store path to forget (as `status` shows it); without
    /// one, every rejection is forgotten.
    pub store_path: Option<PathBuf>,
}

impl ForgetArgs {
    pub async fn run(self, config: &Config) -> Result<(), Failure> {
        let store = Store::open(&config.agent.state_dir)?;
        let _lock = store.lock(config.agent.lock_wait).await?;
        let Some(mut state) = store.read()? else {
            println!("nothing rejected (no state recorded yet)");
            return Ok(());
        };
        let forgotten: Vec<String> = match &self.store_path {
            None => state.rejected.drain(..).map(|r| r.store_path).collect(),
            Some(p) => {
                let p = p.to_string_lossy();
                let before = state.rejected.len();
                state.rejected.retain(|r| r.store_path != p);
                if state.rejected.len() == before {
                    return Err(Failure::Usage(format!(
                        "{} is not rejected (`nixos-ami-agent status` lists the rejected store paths)",
                        crate::text::escape_controls(&p)
                    )));
                }
                vec![p.into_owned()]
            }
        };
        if forgotten.is_empty() {
            println!("nothing rejected");
            return Ok(());
        }
        store.save(&state)?;
        for p in forgotten {
            tracing::info!("forgot the rejection of {p}");
            println!("forgot {p}: the next run may apply it again");
        }
        Ok(())
    }
}
