//! Names and tokens, decided once from the image and the command line:
//! the AMI name as NixOS/amis writes it (`<prefix><label>-<system>.<run-id>`,
//! so a lookup by name such as Terraform's `name` filter keeps working),
//! the tags that mark what this tool made, idempotency tokens, and the
//! SSM parameter names. Pure.

use crate::image_info::ImageInfo;
use sha2::{Digest, Sha256};

/// The tag every snapshot and image this tool makes carries.
pub const MANAGED_BY: (&str, &str) = ("ManagedBy", "nixos-ami-publish");
/// Which image file a snapshot or AMI was made from (a store path: one
/// content, one path).
pub const SOURCE_TAG: &str = "nixos-ami-publish:source";
/// The snapshot ids of an AMI, also on the AMI (read back by `prune`).
pub const SNAPSHOTS_TAG: &str = "nixos-ami-publish:snapshots";
/// The SSM parameters `upload` wrote for this AMI (read back by `prune`).
pub const PARAMETERS_TAG: &str = "nixos-ami-publish:ssm-parameters";
pub const LABEL_TAG: &str = "nixos-ami-publish:label";
/// Set on a snapshot once every block is in and EBS completed it: a
/// snapshot without it is what an interrupted upload left (EC2 may call
/// it `completed` all the same: moto does), never reused.
pub const COMPLETE_TAG: &str = "nixos-ami-publish:complete";
pub const REVISION_TAG: &str = "nixos-ami-publish:flake-revision";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct NameError {
    pub what: &'static str,
    pub reason: String,
}

/// `<prefix><label>-<system>[.<run-id>]`. EC2 allows 3–128 characters of
/// letters, digits, `()[] ./-'@_`.
pub fn ami_name(prefix: &str, info: &ImageInfo, run_id: Option<&str>) -> Result<String, NameError> {
    if let Some(id) = run_id
        && (id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(NameError {
            what: "--run-id",
            reason: format!(
                "{:?} may hold only letters, digits, `-`, `_` and `.`",
                nixos_ami_agent::text::shown(id, 80)
            ),
        });
    }
    let name = format!(
        "{prefix}{}-{}{}",
        info.label,
        info.system.as_str(),
        run_id.map(|id| format!(".{id}")).unwrap_or_default()
    );
    let allowed = |c: char| c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c);
    if !prefix.chars().all(allowed) {
        return Err(NameError {
            what: "--prefix",
            reason: format!(
                "{:?}: AMI names may hold only letters, digits and ()[] ./-'@_",
                nixos_ami_agent::text::shown(prefix, 80)
            ),
        });
    }
    if !(3..=128).contains(&name.len()) {
        return Err(NameError {
            what: "--prefix",
            reason: format!("the AMI name {name:?} must be 3 to 128 characters"),
        });
    }
    Ok(name)
}

/// 64 hex characters, the longest client token EC2 and EBS accept; the
/// same inputs give the same token, so a retried request is recognised.
pub fn token(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// `<P>/<system>/latest` and `<P>/<system>/<label>`, like AWS's public
/// parameters for its own AMIs.
pub fn ssm_parameters(prefix: &str, info: &ImageInfo) -> Result<[String; 2], NameError> {
    let p = prefix.trim_end_matches('/');
    let bad = |reason: String| NameError {
        what: "--ssm-parameter-prefix",
        reason,
    };
    if !p.starts_with('/') {
        return Err(bad(format!(
            "{:?} must start with `/` (a hierarchy, e.g. /nixos-amis)",
            nixos_ami_agent::text::shown(p, 80)
        )));
    }
    let first = p.trim_start_matches('/').split('/').next().unwrap_or("");
    if first.to_ascii_lowercase().starts_with("aws")
        || first.to_ascii_lowercase().starts_with("ssm")
    {
        return Err(bad(
            "SSM parameter names may not begin with aws or ssm".into()
        ));
    }
    if !p
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c))
        || p.contains("//")
    {
        return Err(bad(format!(
            "{:?} may hold only letters, digits and _.-/",
            nixos_ami_agent::text::shown(p, 80)
        )));
    }
    let system = info.system.as_str();
    let names = [
        format!("{p}/{system}/latest"),
        format!("{p}/{system}/{}", info.label),
    ];
    if names
        .iter()
        .any(|n| n.len() > 1011 || n.matches('/').count() > 15)
    {
        return Err(bad("too long or too deep for SSM (15 levels)".into()));
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_info::ImageInfo;
    use std::path::Path;

    fn info() -> ImageInfo {
        ImageInfo::parse(
            br#"{"label":"26.05.20260601.abcdef0","boot_mode":"uefi","system":"aarch64-linux","file":"/f","logical_bytes":"1"}"#,
            Path::new("/i/nix-support/image-info.json"),
        )
        .unwrap()
    }

    #[test]
    fn names_as_nixos_amis_writes_them() {
        assert_eq!(
            ami_name("determinate/nixos/epoch-1/", &info(), Some("123-1")).unwrap(),
            "determinate/nixos/epoch-1/26.05.20260601.abcdef0-aarch64-linux.123-1"
        );
        assert_eq!(
            ami_name("smoketest/", &info(), None).unwrap(),
            "smoketest/26.05.20260601.abcdef0-aarch64-linux"
        );
        assert_eq!(
            ami_name("x/", &info(), Some("a b")).unwrap_err().what,
            "--run-id"
        );
        assert_eq!(
            ami_name("x{y}/", &info(), None).unwrap_err().what,
            "--prefix"
        );
        assert!(ami_name(&"p".repeat(120), &info(), None).is_err());
    }

    #[test]
    fn tokens_are_stable_and_64_characters() {
        let t = token(&["name", "ami-1"]);
        assert_eq!(t.len(), 64);
        assert_eq!(t, token(&["name", "ami-1"]));
        assert_ne!(t, token(&["namea", "mi-1"]), "parts are separated");
    }

    #[test]
    fn parameters_like_aws_public_ones() {
        assert_eq!(
            ssm_parameters("/nixos-amis/", &info()).unwrap(),
            [
                "/nixos-amis/aarch64-linux/latest".to_owned(),
                "/nixos-amis/aarch64-linux/26.05.20260601.abcdef0".to_owned()
            ]
        );
        for bad in ["nixos-amis", "/aws/x", "/ssm-x", "/a b", "/a//b"] {
            assert!(ssm_parameters(bad, &info()).is_err(), "{bad}");
        }
    }
}
