//! SSM parameter names as the `ssm-parameter` setting may give them, and the
//! values such a parameter may hold.

use super::document::{self, DocError};
use super::output_ref::OutputRef;
use super::{Action, RebootPolicy};
use serde::Deserialize;

const MAX_LEN: usize = 2048;

/// `name`, `name:label`, `name:version` or
/// `arn:PARTITION:ssm:REGION:ACCOUNT:parameter/NAME[:selector]`, checked
/// for the characters SSM allows so a typo fails before any request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParameterName {
    raw: String,
    region: Option<String>,
}

impl ParameterName {
    pub fn parse(raw: &str) -> Result<Self, String> {
        super::plain_token(raw, MAX_LEN)?;
        if let Some(arn) = raw.strip_prefix("arn:") {
            let parts: Vec<&str> = arn.splitn(5, ':').collect();
            let [partition, service, region, account, resource] = parts[..] else {
                return Err(
                    "is not a valid ARN (arn:aws:ssm:REGION:ACCOUNT:parameter/NAME)".into(),
                );
            };
            if !partition.starts_with("aws") || service != "ssm" {
                return Err("is an ARN, but not of an SSM parameter".into());
            }
            if region.is_empty()
                || !region
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return Err("is an ARN with an invalid region".into());
            }
            if account.len() != 12 || !account.chars().all(|c| c.is_ascii_digit()) {
                return Err("is an ARN with an invalid account id (12 digits)".into());
            }
            let Some(name) = resource.strip_prefix("parameter/") else {
                return Err("is an ARN, but not of the form ...:parameter/NAME".into());
            };
            check_name_and_selector(name, true)?;
            return Ok(Self {
                raw: raw.to_owned(),
                region: Some(region.to_owned()),
            });
        }
        check_name_and_selector(raw, false)?;
        Ok(Self {
            raw: raw.to_owned(),
            region: None,
        })
    }

    /// Exactly what GetParameter's `Name` gets.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The region an ARN names: the parameter lives there, whatever the
    /// instance's region is.
    pub fn arn_region(&self) -> Option<&str> {
        self.region.as_deref()
    }

    /// Whether GetParameter's reply (`Parameter.Name`) is about this
    /// parameter: SSM answers with the name without a `:label` or
    /// `:version` selector, or with the ARN for a parameter asked for by
    /// ARN (whose resource drops a hierarchy's leading `/`).
    pub fn matches_reply(&self, reply_name: &str) -> bool {
        bare_name(&self.raw) == bare_name(reply_name)
    }
}

/// `fleets/web` for `/fleets/web`, `/fleets/web:canary` and
/// `arn:aws:ssm:R:A:parameter/fleets/web:3`.
pub(crate) fn bare_name(s: &str) -> &str {
    let name = match s.strip_prefix("arn:") {
        Some(arn) => arn
            .splitn(5, ':')
            .nth(4)
            .and_then(|r| r.strip_prefix("parameter/"))
            .unwrap_or(s),
        None => s,
    };
    let name = name.split_once(':').map_or(name, |(n, _)| n);
    name.trim_start_matches('/')
}

/// `in_arn`: the name as an ARN writes it, after `parameter/`, where a
/// hierarchy's leading `/` is left out.
fn check_name_and_selector(s: &str, in_arn: bool) -> Result<(), String> {
    let (name, selector) = match s.split_once(':') {
        Some((n, sel)) => (n, Some(sel)),
        None => (s, None),
    };
    let bare = name.trim_start_matches('/');
    if bare.is_empty() {
        return Err("has an empty name".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'))
    {
        return Err(
            "has characters SSM does not allow in names (letters, digits, `_ . - /`)".into(),
        );
    }
    if name.contains("//") || name.ends_with('/') {
        return Err("has an empty path component".into());
    }
    // SSM's naming rules (Systems Manager user guide, "Parameter Store:
    // naming constraints"): a hierarchy starts with `/`, and no name
    // starts with `aws` or `ssm`, in any case, with or without the `/`.
    let lower = bare.to_ascii_lowercase();
    if lower.starts_with("aws") || lower.starts_with("ssm") {
        return Err("starts with `aws` or `ssm`, which SSM reserves".into());
    }
    if !in_arn && bare.contains('/') && !name.starts_with('/') {
        return Err(format!(
            "is a hierarchy without its leading `/`: SSM needs /{name}"
        ));
    }
    if let Some(sel) = selector {
        let ok_label = !sel.is_empty()
            && sel.len() <= 100
            && sel
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok_label {
            return Err("has an invalid `:label` or `:version` selector".into());
        }
    }
    Ok(())
}

/// What a parameter's value asks for: a target and, optionally, how to
/// apply it. The fleet's parameter wins over user data for these keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParameterSettings {
    pub flake: OutputRef,
    pub action: Option<Action>,
    pub reboot: Option<RebootPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ParameterDocument {
    flake: Option<String>,
    action: Option<Action>,
    reboot: Option<RebootPolicy>,
}

/// Why a value was refused, never quoting a SecureString.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueError {
    pub key: Option<String>,
    pub reason: String,
}

/// A value is a bare output ref (one line, no `=`), or TOML settings with
/// `flake` and optionally `action`/`reboot`.
pub fn parse_value(value: &str, secret: bool) -> Result<ParameterSettings, ValueError> {
    let trimmed = value.trim();
    // A reference first: its version requirement may hold `=` (`=1.2.3`,
    // `>=0.1`), which alone would look like TOML. No TOML document is a
    // valid reference (an organisation has no `=`, quote or space).
    if let Ok(flake) = OutputRef::parse(trimmed) {
        return Ok(ParameterSettings {
            flake,
            action: None,
            reboot: None,
        });
    }
    let is_toml = trimmed.contains('\n') || trimmed.contains('=') || trimmed.starts_with('#');
    if !is_toml {
        let flake = OutputRef::parse(trimmed).map_err(|reason| ValueError {
            key: None,
            reason: format!("the value is not a FlakeHub output reference: it {reason}"),
        })?;
        return Ok(ParameterSettings {
            flake,
            action: None,
            reboot: None,
        });
    }
    let doc: ParameterDocument = document::from_toml(value).map_err(|e: DocError| {
        // An unknown key's name is part of the secret value: name only the
        // keys everyone knows.
        let key = match e.key.clone() {
            Some(k) if secret && !matches!(k.as_str(), "flake" | "action" | "reboot") => None,
            k => k,
        };
        let reason = if secret {
            // serde's messages can quote the offending value.
            match e.position {
                Some((l, c)) => format!(
                    "invalid TOML settings at line {l}, column {c} (details withheld: SecureString)"
                ),
                None => "invalid TOML settings (details withheld: SecureString)".into(),
            }
        } else {
            e.describe()
        };
        ValueError { key, reason }
    })?;
    let Some(flake) = doc.flake else {
        return Err(ValueError {
            key: Some("flake".into()),
            reason: "missing: the value must name the output reference to apply".into(),
        });
    };
    let flake = OutputRef::parse(&flake).map_err(|reason| ValueError {
        key: Some("flake".into()),
        reason: format!("not a FlakeHub output reference: it {reason}"),
    })?;
    Ok(ParameterSettings {
        flake,
        action: doc.action,
        reboot: doc.reboot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssm_naming_rules() {
        for (raw, why) in [
            ("fleets/web/target", "SSM needs /fleets/web/target"),
            ("ssm/fleet", "reserves"),
            ("/AWS-fleet/web", "reserves"),
            ("awsfleet", "reserves"),
        ] {
            let e = ParameterName::parse(raw).unwrap_err();
            assert!(e.contains(why), "{raw}: {e}");
        }
        for ok in [
            "/fleets/web/target",
            "web-target",
            "/fleets/ssmweb",
            "my-ssm",
        ] {
            ParameterName::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        // An ARN writes a hierarchy without its leading slash.
        ParameterName::parse("arn:aws:ssm:eu-west-1:123456789012:parameter/fleets/web").unwrap();
    }

    #[test]
    fn replies_match_the_parameter_asked_for() {
        let p = |s: &str| ParameterName::parse(s).unwrap();
        assert!(p("/fleets/web").matches_reply("/fleets/web"));
        assert!(p("/fleets/web:canary").matches_reply("/fleets/web"));
        assert!(p("/fleets/web:7").matches_reply("/fleets/web"));
        assert!(p("plain").matches_reply("plain"));
        let arn = p("arn:aws:ssm:eu-west-1:123456789012:parameter/fleets/web:canary");
        assert!(arn.matches_reply("/fleets/web"));
        assert!(arn.matches_reply("arn:aws:ssm:eu-west-1:123456789012:parameter/fleets/web"));
        assert!(!p("/fleets/web").matches_reply("/fleets/other"));
        assert!(!p("/fleets/web").matches_reply("/fleets/web/child"));
        assert!(!p("/fleets/web").matches_reply(""));
    }

    #[test]
    fn names_labels_versions_and_arns() {
        for ok in [
            "fleet-web",
            "/fleets/web/target",
            "/fleets/web/target:canary",
            "/fleets/web/target:42",
            "arn:aws:ssm:eu-west-1:123456789012:parameter/fleets/web",
            "arn:aws-cn:ssm:cn-north-1:123456789012:parameter/web:prod",
        ] {
            ParameterName::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        assert_eq!(
            ParameterName::parse("arn:aws:ssm:eu-west-1:123456789012:parameter/x")
                .unwrap()
                .arn_region(),
            Some("eu-west-1")
        );
        assert_eq!(ParameterName::parse("/x").unwrap().arn_region(), None);
    }

    #[test]
    fn bad_names() {
        for bad in [
            "",
            "-x",
            "--option",
            "a b",
            "a\nb",
            "a$(id)",
            "/",
            "a//b",
            "a:",
            "a:b c",
            "arn:aws:s3:eu-west-1:123456789012:parameter/x",
            "arn:aws:ssm:eu-west-1:123:parameter/x",
            "arn:aws:ssm:eu-west-1:123456789012:document/x",
        ] {
            assert!(ParameterName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bare_reference_value() {
        let s = parse_value("org/flake/0.1#nixosConfigurations.web\n", false).unwrap();
        assert_eq!(s.flake.as_str(), "org/flake/0.1#nixosConfigurations.web");
        assert_eq!((s.action, s.reboot), (None, None));
        // A version requirement with `=` is still a reference, not TOML.
        for r in [
            "org/flake/=1.2.3#nixosConfigurations.web",
            "org/flake/>=0.1,<0.2#nixosConfigurations.web",
        ] {
            assert_eq!(parse_value(r, false).unwrap().flake.as_str(), r);
        }
        // And one-line TOML is still TOML.
        let s = parse_value("flake=\"org/flake/0.1#x\"", false).unwrap();
        assert_eq!(s.flake.as_str(), "org/flake/0.1#x");
    }

    #[test]
    fn toml_value() {
        let v = "flake = \"org/flake/0.2#nixosConfigurations.web\"\naction = \"boot\"\nreboot = \"always\"\n";
        let s = parse_value(v, false).unwrap();
        assert_eq!(s.action, Some(Action::Boot));
        assert_eq!(s.reboot, Some(RebootPolicy::Always));
        let with_header = format!("#nixos-ami-agent\n{v}");
        assert_eq!(parse_value(&with_header, false).unwrap(), s);
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = parse_value("action = \"boot\"", false).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("flake"));
        let e = parse_value("flake = \"org/f/1#x\"\nlogin = false", false).unwrap_err();
        assert!(e.reason.contains("login"), "{e:?}");
        let e = parse_value("flake = \"/nix/store/abc\"", false).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("flake"));
        let e = parse_value("/nix/store/abc-system", false).unwrap_err();
        assert!(e.reason.contains("store paths"), "{e:?}");
    }

    #[test]
    fn secret_values_are_not_quoted() {
        let e = parse_value("flake = \"org/f/1#x\"\naction = \"hunter2\"", true).unwrap_err();
        assert!(!e.reason.contains("hunter2"), "{e:?}");
        assert!(e.reason.contains("line 2"), "{e:?}");
        let e = parse_value("hunter2 and more", true).unwrap_err();
        assert!(!e.reason.contains("hunter2"), "{e:?}");
        let e = parse_value("hunter2 = 1", true).unwrap_err();
        assert_eq!(e.key, None, "an unknown key's name is secret too");
        let e = parse_value("action = 1", true).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("action"));
    }
}
