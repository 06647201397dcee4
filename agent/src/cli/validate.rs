//! `validate [--ssm-value] [--json] FILE...`: the same sniffing and checks
//! as `run`, offline, so an operator finds a mistake before launching a
//! fleet (or pushing a parameter value to one). `-` reads standard input.
//! Never "valid" for what the agent would refuse or ignore.

use crate::exit::{self, Failure};
use crate::settings::{SettingsError, Source, Target, parameter};
use crate::userdata::{self, Digest, Kind};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

/// EC2 refuses user data over 16 KB (before base64); IMDS never serves
/// more (EC2 user guide, "Instance user data").
pub const EC2_USER_DATA_MAX: usize = 16 * 1024;

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// User-data files, exactly as they will be given to EC2 (`-`: standard
    /// input). Each is checked; the exit code is 65 if any is invalid.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// The files are SSM parameter values (a bare output reference, or
    /// TOML with `flake` and optionally `action` and `reboot`), not user
    /// data: check one before pushing it to a fleet.
    #[arg(long)]
    pub ssm_value: bool,
    /// One JSON document: an array with one result per file.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    file: String,
    valid: bool,
    /// What the agent takes it for.
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Why it may have been meant for the agent, when it is not for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    settings: serde_json::Map<String, serde_json::Value>,
    scripts: Vec<String>,
    ignored: Vec<String>,
}

impl ValidateArgs {
    /// The exit code: everything is printed here, once.
    pub fn run(self) -> Result<u8, Failure> {
        let mut reports = vec![];
        for file in &self.files {
            let raw = if file.as_os_str() == "-" {
                super::read_stdin()?
            } else {
                super::read_user_data(file)?
            };
            let name = crate::text::escape_controls(&file.display().to_string()).into_owned();
            reports.push(if self.ssm_value {
                ssm_value(name, &raw)
            } else {
                user_data(name, &raw)
            });
        }
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&reports).expect("reports serialise")
            );
        } else {
            for r in &reports {
                print(r);
            }
        }
        Ok(if reports.iter().all(|r| r.valid) {
            exit::OK
        } else {
            exit::DATAERR
        })
    }
}

fn report(file: String, kind: &str) -> Report {
    Report {
        file,
        valid: false,
        kind: kind.into(),
        error: None,
        hint: None,
        sha256: None,
        settings: Default::default(),
        scripts: vec![],
        ignored: vec![],
    }
}

fn user_data(file: String, raw: &[u8]) -> Report {
    let mut r = report(file, "user data");
    r.sha256 = Some(Digest::of(raw).sha256);
    if raw.len() > EC2_USER_DATA_MAX {
        r.error = Some(format!(
            "{} bytes: EC2 accepts at most {EC2_USER_DATA_MAX} bytes of user data (before base64). \
             Gzip it (the agent inflates it), or move the settings to an SSM parameter",
            raw.len()
        ));
        return r;
    }
    let ud = match userdata::sniff(raw) {
        Ok(ud) => ud,
        Err(e) => {
            r.error = Some(e.to_string());
            return r;
        }
    };
    r.kind = ud.kind.describe().into();
    if matches!(ud.kind, Kind::NotForUs | Kind::Absent) {
        r.error = Some(
            SettingsError::new(
                &Source::UserData,
                None,
                "the agent would ignore it. Start TOML settings with a first line \
                 `#nixos-ami-agent`, or wrap JSON settings in {\"nixos-ami-agent\": {...}}",
            )
            .to_string(),
        );
        r.hint = userdata::near_miss(raw).map(str::to_owned);
        return r;
    }
    r.valid = true;
    if let Some(l) = &ud.settings {
        let s = &mut r.settings;
        match &l.target {
            Some(Target::Flake(f)) => {
                s.insert("flake".into(), f.as_str().into());
            }
            Some(Target::Ssm(p)) => {
                s.insert("ssm-parameter".into(), p.as_str().into());
            }
            None => {}
        }
        if let Some(a) = l.action {
            s.insert("action".into(), a.as_str().into());
        }
        if let Some(b) = l.reboot {
            s.insert("reboot".into(), b.as_str().into());
        }
        if let Some(login) = l.login {
            s.insert("login".into(), login.into());
        }
    }
    r.scripts = ud
        .scripts
        .iter()
        .map(|s| format!("{} ({})", s.label, s.digest))
        .collect();
    r.ignored = ud.ignored.clone();
    r
}

fn ssm_value(file: String, raw: &[u8]) -> Report {
    let mut r = report(file, "SSM parameter value");
    r.sha256 = Some(Digest::of(raw).sha256);
    let text = match std::str::from_utf8(raw) {
        Ok(t) => t,
        Err(e) => {
            r.error = Some(format!("not UTF-8 (byte {})", e.valid_up_to()));
            return r;
        }
    };
    // SSM's limit for a standard parameter (an advanced one takes 8 KB).
    if raw.len() > 4096 {
        r.error = Some(format!(
            "{} bytes: a standard SSM parameter holds at most 4096 (advanced: 8192)",
            raw.len()
        ));
        return r;
    }
    match parameter::parse_value(text, false) {
        Ok(p) => {
            r.valid = true;
            r.settings.insert("flake".into(), p.flake.as_str().into());
            if let Some(a) = p.action {
                r.settings.insert("action".into(), a.as_str().into());
            }
            if let Some(b) = p.reboot {
                r.settings.insert("reboot".into(), b.as_str().into());
            }
        }
        Err(e) => {
            r.error = Some(match e.key {
                Some(k) => format!("key `{k}`: {}", e.reason),
                None => e.reason,
            });
        }
    }
    r
}

fn print(r: &Report) {
    if !r.valid {
        println!(
            "{}: invalid: {}",
            r.file,
            r.error.as_deref().unwrap_or("invalid")
        );
        if let Some(h) = &r.hint {
            println!("  hint: {h}");
        }
        return;
    }
    println!(
        "{}: valid: {}{}",
        r.file,
        r.kind,
        r.sha256
            .as_deref()
            .map(|s| format!(" (sha256 {s})"))
            .unwrap_or_default()
    );
    if r.settings.is_empty() && r.kind != "a #! script" {
        println!("  no target (the image's default applies)");
    }
    for (k, v) in &r.settings {
        match v {
            serde_json::Value::String(s) => println!("  {k} = {s}"),
            other => println!("  {k} = {other}"),
        }
    }
    for s in &r.scripts {
        println!("  script {s}: runs once per instance");
    }
    for p in &r.ignored {
        println!("  {p}: for another tool, left alone");
    }
}
