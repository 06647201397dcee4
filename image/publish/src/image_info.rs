//! `nix-support/image-info.json`, as nixpkgs'
//! `nixos/maintainers/scripts/ec2/amazon-image.nix` writes it: `label`
//! (`system.nixos.version`), `system`, `boot_mode`, and either one disk
//! (`file`, `logical_bytes`, also under `disks.root`) or, for the ZFS
//! variant, `disks.boot` and `disks.root`. `logical_bytes` is a JSON
//! string there (jq `--arg`); a number is accepted too. Newer revisions
//! add `registerImage` (architecture, boot mode, root device, volume type,
//! ENA, IMDS, SR-IOV, TPM), which is honoured when present.
//!
//! Pure: bytes in, a validated [`ImageInfo`] out; every error names the
//! file and the field.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    X86_64Linux,
    Aarch64Linux,
}

impl System {
    pub fn as_str(self) -> &'static str {
        match self {
            System::X86_64Linux => "x86_64-linux",
            System::Aarch64Linux => "aarch64-linux",
        }
    }

    /// EC2's name for the architecture.
    pub fn architecture(self) -> &'static str {
        match self {
            System::X86_64Linux => "x86_64",
            System::Aarch64Linux => "arm64",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    LegacyBios,
    Uefi,
}

impl BootMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BootMode::LegacyBios => "legacy-bios",
            BootMode::Uefi => "uefi",
        }
    }
}

/// One disk of the image and the device it is attached as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// `root`, or `boot` for the ZFS variant's boot disk.
    pub role: String,
    pub file: PathBuf,
    pub logical_bytes: u64,
    pub device_name: String,
}

/// What RegisterImage gets besides the snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub root_device_name: String,
    pub volume_type: String,
    pub ena_support: bool,
    pub imds_support: String,
    pub sriov_net_support: String,
    /// `v2.0` when the image info asks for it.
    pub tpm_support: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub path: PathBuf,
    pub label: String,
    pub system: System,
    pub boot_mode: BootMode,
    /// The root device's disk first.
    pub disks: Vec<Disk>,
    pub registration: Registration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}{reason}", path.display(), field.as_ref().map(|f| format!("`{f}`: ")).unwrap_or_default())]
pub struct InfoError {
    pub path: PathBuf,
    pub field: Option<String>,
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Bytes {
    Text(String),
    Number(u64),
}

#[derive(Deserialize)]
struct RawDisk {
    file: Option<String>,
    logical_bytes: Option<Bytes>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawMapping {
    device_name: Option<String>,
    ebs: Option<RawEbs>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawEbs {
    volume_type: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawRegister {
    architecture: Option<String>,
    boot_mode: Option<String>,
    root_device_name: Option<String>,
    ena_support: Option<bool>,
    imds_support: Option<String>,
    sriov_net_support: Option<String>,
    tpm_support: Option<String>,
    #[serde(default)]
    block_device_mappings: Vec<RawMapping>,
}

#[derive(Deserialize)]
struct Raw {
    label: Option<String>,
    system: Option<String>,
    boot_mode: Option<String>,
    file: Option<String>,
    logical_bytes: Option<Bytes>,
    #[serde(default)]
    disks: BTreeMap<String, RawDisk>,
    #[serde(rename = "registerImage")]
    register_image: Option<RawRegister>,
}

/// An image info file is a few hundred bytes.
const MAX_FILE: u64 = 1 << 20;

impl ImageInfo {
    pub fn load(path: &Path) -> Result<Self, InfoError> {
        use std::io::Read as _;
        let err = |reason: String| InfoError {
            path: path.to_owned(),
            field: None,
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| {
            err(format!(
                "cannot be read: {e} (build it with `nix build .#diskImages.<system>.aws`; the file is result/nix-support/image-info.json)"
            ))
        })?;
        let mut bytes = Vec::new();
        file.take(MAX_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| err(format!("cannot be read: {e}")))?;
        if bytes.len() as u64 > MAX_FILE {
            return Err(err("is larger than 1 MiB: not an image info file".into()));
        }
        Self::parse(&bytes, path)
    }

    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, InfoError> {
        let err = |field: Option<&str>, reason: String| InfoError {
            path: path.to_owned(),
            field: field.map(str::to_owned),
            reason,
        };
        let raw: Raw = serde_json::from_slice(bytes)
            .map_err(|e| err(None, format!("is not an image info file: {e}")))?;
        let label = raw
            .label
            .ok_or_else(|| err(Some("label"), "missing".into()))?;
        check_label(&label).map_err(|why| err(Some("label"), why))?;
        let system = match raw.system.as_deref() {
            Some("x86_64-linux") => System::X86_64Linux,
            Some("aarch64-linux") => System::Aarch64Linux,
            Some(other) => {
                return Err(err(
                    Some("system"),
                    format!(
                        "{:?} is not a system EC2 runs (x86_64-linux or aarch64-linux)",
                        nixos_ami_agent::text::shown(other, 80)
                    ),
                ));
            }
            None => return Err(err(Some("system"), "missing".into())),
        };
        let boot_mode = match raw.boot_mode.as_deref() {
            Some("legacy-bios") => BootMode::LegacyBios,
            Some("uefi") => BootMode::Uefi,
            Some(other) => {
                return Err(err(
                    Some("boot_mode"),
                    format!(
                        "{:?} is neither \"legacy-bios\" nor \"uefi\"",
                        nixos_ami_agent::text::shown(other, 80)
                    ),
                ));
            }
            None => return Err(err(Some("boot_mode"), "missing".into())),
        };
        if system == System::Aarch64Linux && boot_mode != BootMode::Uefi {
            return Err(err(
                Some("boot_mode"),
                "aarch64 instances boot with UEFI only".into(),
            ));
        }
        let reg = raw.register_image.unwrap_or_default();
        if let Some(arch) = &reg.architecture
            && arch != system.architecture()
        {
            return Err(err(
                Some("registerImage.Architecture"),
                format!(
                    "{arch:?} does not match system {} ({})",
                    system.as_str(),
                    system.architecture()
                ),
            ));
        }
        if let Some(mode) = &reg.boot_mode
            && mode != boot_mode.as_str()
        {
            return Err(err(
                Some("registerImage.BootMode"),
                format!("{mode:?} does not match boot_mode {:?}", boot_mode.as_str()),
            ));
        }
        let root_device_name = reg
            .root_device_name
            .clone()
            .unwrap_or_else(|| "/dev/xvda".into());
        check_device(&root_device_name)
            .map_err(|why| err(Some("registerImage.RootDeviceName"), why))?;
        let mapping = reg.block_device_mappings.first();
        let volume_type = mapping
            .and_then(|m| m.ebs.as_ref())
            .and_then(|e| e.volume_type.clone())
            .unwrap_or_else(|| "gp3".into());
        if let Some(d) = mapping.and_then(|m| m.device_name.as_ref())
            && *d != root_device_name
        {
            return Err(err(
                Some("registerImage.BlockDeviceMappings"),
                format!("the mapping's device {d:?} is not the root device {root_device_name:?}"),
            ));
        }
        let registration = Registration {
            root_device_name: root_device_name.clone(),
            volume_type,
            ena_support: reg.ena_support.unwrap_or(true),
            imds_support: reg.imds_support.unwrap_or_else(|| "v2.0".into()),
            sriov_net_support: reg.sriov_net_support.unwrap_or_else(|| "simple".into()),
            tpm_support: reg.tpm_support,
        };

        let base = path
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."));
        let resolve = |field: &str, f: &str| -> Result<PathBuf, InfoError> {
            if f.is_empty() {
                return Err(err(Some(field), "is empty".into()));
            }
            let p = PathBuf::from(f);
            // nixpkgs writes store paths; a relative one is taken from the
            // image's output directory (the parent of nix-support/).
            Ok(if p.is_absolute() { p } else { base.join(p) })
        };
        let bytes_of = |field: &str, b: Option<Bytes>| -> Result<u64, InfoError> {
            let n = match b {
                None => return Err(err(Some(field), "missing".into())),
                Some(Bytes::Number(n)) => n,
                Some(Bytes::Text(t)) => t.trim().parse::<u64>().map_err(|_| {
                    err(
                        Some(field),
                        format!(
                            "{:?} is not a number of bytes",
                            nixos_ami_agent::text::shown(&t, 40)
                        ),
                    )
                })?,
            };
            if n == 0 || n > MAX_VOLUME_BYTES {
                return Err(err(
                    Some(field),
                    format!("{n} bytes is not a disk EBS can hold (1 byte to 64 TiB)"),
                ));
            }
            Ok(n)
        };

        let mut disks = vec![];
        if raw.disks.contains_key("boot") {
            // The ZFS variant: a boot disk (the root device) and a root
            // pool disk next to it.
            for (role, device) in [
                ("boot", root_device_name.clone()),
                ("root", second_device(&root_device_name)),
            ] {
                let d = raw.disks.get(role).ok_or_else(|| {
                    err(
                        Some(&format!("disks.{role}")),
                        "missing (the ZFS variant has disks.boot and disks.root)".into(),
                    )
                })?;
                disks.push(Disk {
                    role: role.into(),
                    file: resolve(
                        &format!("disks.{role}.file"),
                        d.file.as_deref().unwrap_or(""),
                    )?,
                    logical_bytes: bytes_of(
                        &format!("disks.{role}.logical_bytes"),
                        clone_bytes(&d.logical_bytes),
                    )?,
                    device_name: device,
                });
            }
        } else {
            let root = raw.disks.get("root");
            let file = raw
                .file
                .or_else(|| root.and_then(|r| r.file.clone()))
                .ok_or_else(|| err(Some("file"), "missing".into()))?;
            let lb = raw
                .logical_bytes
                .or_else(|| root.and_then(|r| clone_bytes(&r.logical_bytes)));
            disks.push(Disk {
                role: "root".into(),
                file: resolve("file", &file)?,
                logical_bytes: bytes_of("logical_bytes", lb)?,
                device_name: root_device_name,
            });
        }
        Ok(Self {
            path: path.to_owned(),
            label,
            system,
            boot_mode,
            disks,
            registration,
        })
    }
}

/// EBS volumes are at most 64 TiB.
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;

fn clone_bytes(b: &Option<Bytes>) -> Option<Bytes> {
    match b {
        Some(Bytes::Text(t)) => Some(Bytes::Text(t.clone())),
        Some(Bytes::Number(n)) => Some(Bytes::Number(*n)),
        None => None,
    }
}

/// `/dev/xvdb` next to `/dev/xvda`.
fn second_device(root: &str) -> String {
    match root.strip_suffix('a') {
        Some(stem) => format!("{stem}b"),
        None => "/dev/xvdb".into(),
    }
}

/// The label goes into the AMI name and SSM parameter names: what
/// `system.nixos.version` looks like (`26.05.20260601.abcdef0`), nothing
/// that could break either.
fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() || label.len() > 64 {
        return Err("must be 1 to 64 characters".into());
    }
    if !label
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(format!(
            "{:?} may hold only letters, digits, `.`, `-` and `_` (it is system.nixos.version)",
            nixos_ami_agent::text::shown(label, 80)
        ));
    }
    Ok(())
}

fn check_device(d: &str) -> Result<(), String> {
    if d.starts_with("/dev/") && d.len() < 32 && d[5..].chars().all(|c| c.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err(format!(
            "{:?} is not a device name like /dev/xvda",
            nixos_ami_agent::text::shown(d, 40)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ImageInfo, InfoError> {
        ImageInfo::parse(
            json.as_bytes(),
            Path::new("/nix/store/x-image/nix-support/image-info.json"),
        )
    }

    /// What nixpkgs writes today (jq --arg makes logical_bytes a string).
    const TODAY: &str = r#"{
      "label": "26.05.20260601.abcdef0",
      "boot_mode": "legacy-bios",
      "system": "x86_64-linux",
      "logical_bytes": "4295467008",
      "file": "/nix/store/x-image/nixos-image-26.05.20260601.abcdef0-x86_64-linux.vhd",
      "disks": {"root": {"logical_bytes": "4295467008", "file": "/nix/store/x-image/nixos-image-26.05.20260601.abcdef0-x86_64-linux.vhd"}},
      "registerImage": {"Architecture": "x86_64", "BootMode": "legacy-bios", "RootDeviceName": "/dev/xvda",
        "VirtualizationType": "hvm", "EnaSupport": true, "ImdsSupport": "v2.0", "SriovNetSupport": "simple",
        "TpmSupport": null, "BlockDeviceMappings": [{"DeviceName": "/dev/xvda", "Ebs": {"VolumeType": "gp3"}}]}
    }"#;

    #[test]
    fn nixpkgs_today() {
        let i = parse(TODAY).unwrap();
        assert_eq!(i.label, "26.05.20260601.abcdef0");
        assert_eq!(i.system, System::X86_64Linux);
        assert_eq!(i.boot_mode, BootMode::LegacyBios);
        assert_eq!(i.disks.len(), 1);
        assert_eq!(i.disks[0].logical_bytes, 4_295_467_008);
        assert_eq!(i.disks[0].device_name, "/dev/xvda");
        assert_eq!(i.registration.volume_type, "gp3");
        assert_eq!(i.registration.tpm_support, None);
    }

    #[test]
    fn older_nixpkgs_without_register_image_and_a_number() {
        let i = parse(r#"{"label":"25.11.1","boot_mode":"uefi","system":"aarch64-linux","logical_bytes":4294967296,"file":"img.raw"}"#).unwrap();
        assert_eq!(i.system.architecture(), "arm64");
        assert_eq!(i.disks[0].file, PathBuf::from("/nix/store/x-image/img.raw"));
        assert_eq!(i.registration.root_device_name, "/dev/xvda");
        assert!(i.registration.ena_support);
    }

    #[test]
    fn zfs_variant_has_two_disks() {
        let i = parse(r#"{"label":"26.05.1","boot_mode":"uefi","system":"x86_64-linux",
          "disks":{"boot":{"logical_bytes":"1073741824","file":"/s/b.vhd"},"root":{"logical_bytes":"4294967296","file":"/s/r.vhd"}}}"#).unwrap();
        let d: Vec<_> = i
            .disks
            .iter()
            .map(|d| (d.role.as_str(), d.device_name.as_str()))
            .collect();
        assert_eq!(d, [("boot", "/dev/xvda"), ("root", "/dev/xvdb")]);
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        for (json, field, why) in [
            ("not json", None, "not an image info file"),
            (
                r#"{"system":"x86_64-linux","boot_mode":"uefi","file":"/f","logical_bytes":"1"}"#,
                Some("label"),
                "missing",
            ),
            (
                r#"{"label":"26.05.1","system":"riscv64-linux","boot_mode":"uefi","file":"/f","logical_bytes":"1"}"#,
                Some("system"),
                "not a system EC2 runs",
            ),
            (
                r#"{"label":"26.05.1","system":"x86_64-linux","boot_mode":"bios","file":"/f","logical_bytes":"1"}"#,
                Some("boot_mode"),
                "legacy-bios",
            ),
            (
                r#"{"label":"26.05.1","system":"aarch64-linux","boot_mode":"legacy-bios","file":"/f","logical_bytes":"1"}"#,
                Some("boot_mode"),
                "UEFI",
            ),
            (
                r#"{"label":"26.05.1","system":"x86_64-linux","boot_mode":"uefi","file":"/f","logical_bytes":"lots"}"#,
                Some("logical_bytes"),
                "not a number",
            ),
            (
                r#"{"label":"26.05.1","system":"x86_64-linux","boot_mode":"uefi","file":"/f","logical_bytes":"0"}"#,
                Some("logical_bytes"),
                "64 TiB",
            ),
            (
                r#"{"label":"26.05.1","system":"x86_64-linux","boot_mode":"uefi","logical_bytes":"1"}"#,
                Some("file"),
                "missing",
            ),
            (
                r#"{"label":"a b","system":"x86_64-linux","boot_mode":"uefi","file":"/f","logical_bytes":"1"}"#,
                Some("label"),
                "letters",
            ),
            (
                r#"{"label":"26.05.1","system":"x86_64-linux","boot_mode":"uefi","file":"/f","logical_bytes":"1","registerImage":{"Architecture":"arm64"}}"#,
                Some("registerImage.Architecture"),
                "does not match",
            ),
        ] {
            let e = parse(json).unwrap_err();
            assert_eq!(e.field.as_deref(), field, "{json}: {e}");
            assert!(e.reason.contains(why), "{json}: {e}");
            assert!(
                e.to_string()
                    .starts_with("/nix/store/x-image/nix-support/image-info.json: "),
                "{e}"
            );
        }
    }
}
