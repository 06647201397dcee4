//! Settings: raw layers from each source, validated and merged into one
//! [`Settings`] value that everything downstream takes.
//!
//! Layers, lowest first: built-in defaults, the image's config file, user
//! data. The fleet's SSM parameter, when used, is applied on top by
//! [`Settings::with_parameter`] once it has been read.

pub mod document;
pub mod output_ref;
pub mod parameter;

/// The checks every value that ends up in a program's argv or a request
/// shares: present, bounded, one plain token that cannot pass for a flag.
/// Reasons never quote the value (it may come from a SecureString).
fn plain_token(raw: &str, max_len: usize) -> Result<(), String> {
    if raw.is_empty() {
        return Err("is empty".into());
    }
    if raw.len() > max_len {
        return Err(format!("is longer than {max_len} characters"));
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or control characters".into());
    }
    if raw.starts_with('-') {
        return Err("starts with `-`, which a program would read as a flag".into());
    }
    Ok(())
}

use crate::health::{Health, HealthLayer};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

pub use output_ref::OutputRef;
pub use parameter::{ParameterName, ParameterSettings};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Switch,
    Boot,
    Test,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Switch => "switch",
            Action::Boot => "boot",
            Action::Test => "test",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RebootPolicy {
    Never,
    IfNeeded,
    Always,
}

impl RebootPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RebootPolicy::Never => "never",
            RebootPolicy::IfNeeded => "if-needed",
            RebootPolicy::Always => "always",
        }
    }
}

/// Where a setting came from, for messages, `plan` and the state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    ConfigFile(PathBuf),
    UserData,
    SsmParameter { name: String, version: i64 },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("built-in default"),
            Source::ConfigFile(p) => write!(f, "config file {}", p.display()),
            Source::UserData => f.write_str("user data"),
            Source::SsmParameter { name, version } => {
                write!(f, "SSM parameter {name} (version {version})")
            }
        }
    }
}

/// A value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sourced<T> {
    pub value: T,
    pub source: Source,
}

/// The settings keys as any source writes them (TOML or JSON), before
/// validation. `A` is what the `[agent]` table may hold: the config file's
/// agent settings, or [`serde::de::IgnoredAny`] where only its presence
/// matters (user data may not set it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Document<A = serde::de::IgnoredAny> {
    pub flake: Option<String>,
    pub ssm_parameter: Option<String>,
    pub action: Option<Action>,
    pub reboot: Option<RebootPolicy>,
    pub login: Option<bool>,
    pub health: Option<crate::health::HealthDoc>,
    pub agent: Option<A>,
}

impl<A> Default for Document<A> {
    fn default() -> Self {
        Self {
            flake: None,
            ssm_parameter: None,
            action: None,
            reboot: None,
            login: None,
            health: None,
            agent: None,
        }
    }
}

/// What the instance should converge to, as settings name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Flake(OutputRef),
    Ssm(ParameterName),
}

/// One source's settings, each key checked on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub source: Source,
    pub target: Option<Target>,
    pub action: Option<Action>,
    pub reboot: Option<RebootPolicy>,
    pub login: Option<bool>,
    pub health: HealthLayer,
}

/// A setting that was refused: which source, which key, why. The key and
/// the reason may quote the input, so they are shown with control
/// characters escaped and cut to a bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{}: {}{}",
    crate::text::escape_controls(&origin.to_string()),
    key.as_ref().map(|k| format!("key `{}`: ", crate::text::shown(k, 200))).unwrap_or_default(),
    crate::text::shown(reason, 2000)
)]
pub struct SettingsError {
    pub origin: Source,
    pub key: Option<String>,
    pub reason: String,
}

impl SettingsError {
    pub fn new(source: &Source, key: Option<&str>, reason: impl Into<String>) -> Self {
        Self {
            origin: source.clone(),
            key: key.map(str::to_owned),
            reason: reason.into(),
        }
    }

    pub fn from_doc(source: &Source, e: document::DocError) -> Self {
        let mut reason = e.describe();
        // Only the image's config file may set `[agent]`: offered anywhere
        // else, it would be a key that is then refused.
        if !matches!(source, Source::ConfigFile(_)) {
            reason = reason.replace(", `agent`", "");
        }
        Self {
            origin: source.clone(),
            key: e.key.clone(),
            reason,
        }
    }
}

impl Layer {
    /// Validates one document. The `[agent]` table must already have been
    /// taken out by the caller that is allowed to have it.
    pub fn from_document<A>(doc: Document<A>, source: Source) -> Result<Self, SettingsError> {
        if doc.agent.is_some() {
            return Err(SettingsError::new(
                &source,
                Some("agent"),
                "the [agent] table can only be set in the image's config file",
            ));
        }
        let target = match (doc.flake, doc.ssm_parameter) {
            (Some(_), Some(_)) => {
                return Err(SettingsError::new(
                    &source,
                    Some("flake"),
                    "`flake` and `ssm-parameter` are both set; set one of them",
                ));
            }
            (Some(f), None) => Some(Target::Flake(OutputRef::parse(&f).map_err(|why| {
                SettingsError::new(
                    &source,
                    Some("flake"),
                    format!("not a FlakeHub output reference: it {why}"),
                )
            })?)),
            (None, Some(p)) => Some(Target::Ssm(ParameterName::parse(&p).map_err(|why| {
                SettingsError::new(
                    &source,
                    Some("ssm-parameter"),
                    format!("not an SSM parameter name: it {why}"),
                )
            })?)),
            (None, None) => None,
        };
        let health = match doc.health {
            Some(h) => HealthLayer::from_doc(h, &source)?,
            None => HealthLayer::default(),
        };
        Ok(Self {
            source,
            target,
            action: doc.action,
            reboot: doc.reboot,
            login: doc.login,
            health,
        })
    }
}

/// Validated, merged settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub target: Option<Sourced<Target>>,
    pub action: Sourced<Action>,
    pub reboot: Sourced<RebootPolicy>,
    pub login: Sourced<bool>,
    /// The health gate, from the layers that were merged; after a switch
    /// it is merged again with the new system's config file (see
    /// [`crate::health`]).
    pub health: Health,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            target: None,
            action: Sourced {
                value: Action::Switch,
                source: Source::Default,
            },
            reboot: Sourced {
                value: RebootPolicy::IfNeeded,
                source: Source::Default,
            },
            login: Sourced {
                value: true,
                source: Source::Default,
            },
            health: Health::default(),
        }
    }
}

impl Settings {
    /// Merges layers, lowest first. A higher layer's target replaces a
    /// lower one's whatever its kind (user data `flake` overrides an image
    /// default `ssm-parameter`).
    pub fn merge<'a>(layers: impl IntoIterator<Item = &'a Layer>) -> Self {
        let mut s = Settings::default();
        let mut health = vec![];
        for layer in layers {
            health.push(&layer.health);
            if let Some(t) = &layer.target {
                s.target = Some(Sourced {
                    value: t.clone(),
                    source: layer.source.clone(),
                });
            }
            if let Some(a) = layer.action {
                s.action = Sourced {
                    value: a,
                    source: layer.source.clone(),
                };
            }
            if let Some(r) = layer.reboot {
                s.reboot = Sourced {
                    value: r,
                    source: layer.source.clone(),
                };
            }
            if let Some(l) = layer.login {
                s.login = Sourced {
                    value: l,
                    source: layer.source.clone(),
                };
            }
        }
        s.health = Health::merge(health);
        s
    }

    /// The fleet's parameter decides the target, and `action`/`reboot`
    /// where its value sets them.
    pub fn with_parameter(mut self, p: ParameterSettings, source: Source) -> Self {
        self.target = Some(Sourced {
            value: Target::Flake(p.flake),
            source: source.clone(),
        });
        if let Some(a) = p.action {
            self.action = Sourced {
                value: a,
                source: source.clone(),
            };
        }
        if let Some(r) = p.reboot {
            self.reboot = Sourced { value: r, source };
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::IgnoredAny;

    fn layer(source: Source, toml: &str) -> Result<Layer, SettingsError> {
        let doc: Document<IgnoredAny> =
            document::from_toml(toml).map_err(|e| SettingsError::from_doc(&source, e))?;
        Layer::from_document(doc, source)
    }

    fn config() -> Source {
        Source::ConfigFile("/etc/nixos-ami-agent/config.toml".into())
    }

    #[test]
    fn defaults() {
        let s = Settings::merge([]);
        assert_eq!(s.target, None);
        assert_eq!(s.action.value, Action::Switch);
        assert_eq!(s.reboot.value, RebootPolicy::IfNeeded);
        assert!(s.login.value);
        assert_eq!(s.login.source, Source::Default);
    }

    #[test]
    fn user_data_overrides_config_key_by_key() {
        let image = layer(
            config(),
            "ssm-parameter = \"/fleet/web\"\nreboot = \"never\"\nlogin = false",
        )
        .unwrap();
        let user = layer(
            Source::UserData,
            "flake = \"o/f/0.1#nixosConfigurations.w\"\naction = \"boot\"",
        )
        .unwrap();
        let s = Settings::merge([&image, &user]);
        assert_eq!(
            s.target,
            Some(Sourced {
                value: Target::Flake(OutputRef::parse("o/f/0.1#nixosConfigurations.w").unwrap()),
                source: Source::UserData
            })
        );
        assert_eq!(
            s.action,
            Sourced {
                value: Action::Boot,
                source: Source::UserData
            }
        );
        assert_eq!(
            s.reboot,
            Sourced {
                value: RebootPolicy::Never,
                source: config()
            }
        );
        assert_eq!(
            s.login,
            Sourced {
                value: false,
                source: config()
            }
        );
    }

    #[test]
    fn user_data_ssm_overrides_config_flake() {
        let image = layer(config(), "flake = \"o/f/0.1#x\"").unwrap();
        let user = layer(Source::UserData, "ssm-parameter = \"/fleet/web:canary\"").unwrap();
        let s = Settings::merge([&image, &user]);
        assert!(
            matches!(s.target.unwrap().value, Target::Ssm(p) if p.as_str() == "/fleet/web:canary")
        );
    }

    #[test]
    fn parameter_overrides_action_and_reboot() {
        let user = layer(
            Source::UserData,
            "ssm-parameter = \"/p\"\naction = \"test\"\nlogin = false",
        )
        .unwrap();
        let src = Source::SsmParameter {
            name: "/p".into(),
            version: 7,
        };
        let p = parameter::parse_value("flake = \"o/f/1#x\"\nreboot = \"always\"", false).unwrap();
        let s = Settings::merge([&user]).with_parameter(p, src.clone());
        assert_eq!(s.target.unwrap().source, src);
        assert_eq!(s.action.value, Action::Test);
        assert_eq!(
            s.reboot,
            Sourced {
                value: RebootPolicy::Always,
                source: src
            }
        );
        assert!(!s.login.value);
    }

    #[test]
    fn errors_name_source_key_and_reason() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            (
                "flake = \"o/f/0.1#x\"\nssm-parameter = \"/p\"",
                Some("flake"),
                "both set",
            ),
            ("flake = \"/nix/store/abc\"", Some("flake"), "store paths"),
            ("flake = \"\"", Some("flake"), "empty"),
            ("flake = \"-rf\"", Some("flake"), "flag"),
            ("flake = 3", Some("flake"), "expected a string"),
            (
                "ssm-parameter = \"a b\"",
                Some("ssm-parameter"),
                "whitespace",
            ),
            (
                "action = \"dry-activate\"",
                Some("action"),
                "unknown variant",
            ),
            ("reboot = \"sometimes\"", Some("reboot"), "unknown variant"),
            ("login = \"yes\"", Some("login"), "bool"),
            (
                "flakes = \"o/f/0.1#x\"",
                Some("flakes"),
                "unknown field `flakes`",
            ),
            (
                "[agent]\nfh = \"/bin/sh\"",
                Some("agent"),
                "only be set in the image",
            ),
        ];
        for (toml, key, reason) in cases {
            let e = layer(Source::UserData, toml).expect_err(toml);
            assert_eq!(e.origin, Source::UserData, "{toml}");
            assert_eq!(e.key.as_deref(), *key, "{toml}: {e}");
            assert!(e.reason.contains(reason), "{toml}: {e}");
            assert!(e.to_string().starts_with("user data: "), "{e}");
        }
    }
}
