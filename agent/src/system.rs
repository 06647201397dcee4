//! Reading the system links (`current-system`, the system profile,
//! `booted-system`) as store paths. Links are resolved fully, as
//! switch-to-configuration does with `readlink -f`.

use crate::config::Agent;
use crate::plan::{BootFiles, SystemView};
use std::path::{Path, PathBuf};

pub fn canonical(p: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(p).ok()
}

pub fn view(agent: &Agent) -> SystemView {
    SystemView {
        current: canonical(&agent.current_system),
        profile: canonical(&agent.system_profile),
    }
}

pub fn boot_files(system: &Path) -> BootFiles {
    BootFiles {
        kernel: canonical(&system.join("kernel")),
        initrd: canonical(&system.join("initrd")),
        kernel_modules: canonical(&system.join("kernel-modules")),
    }
}
