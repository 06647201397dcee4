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

/// This boot's ID (a UUID the kernel draws at boot; systemd-nspawn gives
/// each container boot its own): `None` if it cannot be read, or is not a
/// short line of hex digits and dashes.
pub fn boot_id(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(64)
        .read_to_string(&mut text)
        .ok()?;
    let id = text.trim();
    let ok = !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    ok.then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_id_is_read_as_the_kernel_writes_it() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("boot_id");
        std::fs::write(&f, "5f3c1a2e-0b7d-4c1e-9a55-00000000000a\n").unwrap();
        assert_eq!(
            boot_id(&f).as_deref(),
            Some("5f3c1a2e-0b7d-4c1e-9a55-00000000000a")
        );
        for junk in ["", "\n", "not a uuid", "../etc/passwd"] {
            std::fs::write(&f, junk).unwrap();
            assert_eq!(boot_id(&f), None, "{junk:?}");
        }
        assert_eq!(boot_id(&d.path().join("missing")), None);
    }
}
