//! What the instance's user data asks of the agent, sniffed in the order
//! the brief fixes: gzip (transparently), MIME multipart, `#nixos-ami-agent`
//! TOML, JSON with a `"nixos-ami-agent"` key, a `#!` script, or nothing for
//! us. Never treats anything as a Nix expression.
//!
//! Pure: bytes in, [`UserData`] out. The content is never logged (it may
//! hold secrets); callers log [`Digest`] instead.

pub mod gzip;
pub mod mime;

use crate::settings::document::{self};
use crate::settings::{Document, Layer, SettingsError, Source};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use std::fmt;

pub const HEADER: &str = "#nixos-ami-agent";
pub const JSON_KEY: &str = "nixos-ami-agent";

/// Which form the user data had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// No user data (IMDS 404) or zero bytes.
    Absent,
    Mime,
    Toml,
    Json,
    Script,
    /// Something for another tool; the agent leaves it alone.
    NotForUs,
}

impl Kind {
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Absent => "no user data",
            Kind::Mime => "MIME multipart",
            Kind::Toml => "#nixos-ami-agent TOML settings",
            Kind::Json => "JSON with a \"nixos-ami-agent\" key",
            Kind::Script => "a #! script",
            Kind::NotForUs => "not addressed to nixos-ami-agent (no settings, no #! script)",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    /// `user data` or `part 3 (setup.sh)`.
    pub label: String,
    pub body: Vec<u8>,
    pub digest: Digest,
}

/// Size and SHA-256: what logs and state say about content they must not
/// show.
#[derive(Clone, PartialEq, Eq, serde::Serialize)]
pub struct Digest {
    pub size: usize,
    pub sha256: String,
}

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        let sha256 = Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Self {
            size: bytes.len(),
            sha256,
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes, sha256 {}", self.size, self.sha256)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserData {
    pub kind: Kind,
    pub settings: Option<Layer>,
    pub scripts: Vec<Script>,
    /// MIME parts left to other tools, as `part 1 (text/cloud-config)`.
    pub ignored: Vec<String>,
}

impl UserData {
    pub fn absent() -> Self {
        Self {
            kind: Kind::Absent,
            settings: None,
            scripts: vec![],
            ignored: vec![],
        }
    }
}

fn invalid(reason: impl Into<String>) -> SettingsError {
    SettingsError::new(&Source::UserData, None, reason)
}

pub fn sniff(raw: &[u8]) -> Result<UserData, SettingsError> {
    // One inflate budget for the whole user data, every layer and part.
    let mut budget = gzip::Budget::default();
    let inflated;
    let bytes = if gzip::is_gzip(raw) {
        inflated = gzip::inflate(raw, &mut budget).map_err(invalid)?;
        &inflated[..]
    } else {
        raw
    };
    let one = |kind, settings, scripts| UserData {
        kind,
        settings,
        scripts,
        ignored: vec![],
    };
    if bytes.is_empty() {
        return Ok(UserData::absent());
    }
    if mime::looks_like_mime(bytes) {
        return from_mime(bytes, &mut budget);
    }
    if is_header(bytes) {
        return Ok(one(
            Kind::Toml,
            Some(toml_layer(without_bom(bytes))?),
            vec![],
        ));
    }
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        if let Some(layer) = json_layer(bytes)? {
            return Ok(one(Kind::Json, Some(layer), vec![]));
        }
        return Ok(one(Kind::NotForUs, None, vec![]));
    }
    if bytes.starts_with(b"#!") {
        check_interpreter(bytes).map_err(|why| invalid(format!("the user data {why}")))?;
        let script = Script {
            label: "user data".into(),
            digest: Digest::of(bytes),
            body: bytes.to_vec(),
        };
        return Ok(one(Kind::Script, None, vec![script]));
    }
    Ok(one(Kind::NotForUs, None, vec![]))
}

fn without_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes)
}

/// The `#nixos-ami-agent` header on the first line that is not blank.
/// Forgiven, because the intent is plain: a UTF-8 byte order mark, blank
/// lines and indentation before it (an indented heredoc), and a space
/// after the `#`. TOML itself ignores all of these.
fn is_header(bytes: &[u8]) -> bool {
    let first = without_bom(bytes)
        .split(|&b| b == b'\n')
        .map(<[u8]>::trim_ascii)
        .find(|l| !l.is_empty())
        .unwrap_or_default();
    let rest = first.strip_prefix(b"#").map(<[u8]>::trim_ascii_start);
    rest == Some(&HEADER.as_bytes()[1..])
}

/// A script's first line must name its interpreter by path (the kernel
/// runs `#!INTERPRETER`; a bare word fails on the instance with "No such
/// file or directory", long after `validate` could have said so).
fn check_interpreter(body: &[u8]) -> Result<(), String> {
    let line = body.split(|&b| b == b'\n').next().unwrap_or_default();
    let rest = String::from_utf8_lossy(&line[2..]);
    let interpreter = rest.split_whitespace().next().unwrap_or("");
    if interpreter.starts_with('/') {
        return Ok(());
    }
    let shown = crate::text::shown(interpreter, 60);
    let hint = if interpreter.eq_ignore_ascii_case("nixos-ami-agent") {
        ": settings start with the line `#nixos-ami-agent` (no `!`)"
    } else if interpreter.is_empty() {
        ""
    } else {
        ", such as `#!/bin/sh` or `#!/usr/bin/env bash`"
    };
    Err(format!(
        "starts with `#!` but names no interpreter path (`#!{shown}`): a script's first line is \
         `#!/path/to/interpreter`{hint}"
    ))
}

/// Why user data that is not for the agent may have been meant for it,
/// for `validate` and the run's log: what it looks like instead.
pub fn near_miss(raw: &[u8]) -> Option<&'static str> {
    let bytes = without_bom(raw);
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]);
    let first = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let lower = first.to_ascii_lowercase();
    if lower.starts_with("#cloud-config")
        || lower.starts_with("#include")
        || lower.starts_with("#cloud-boothook")
    {
        return Some(
            "this is cloud-init's format; the image runs no cloud-init: put the settings under a first \
             line `#nixos-ami-agent`, or in a MIME part of type text/x-nixos-ami-agent",
        );
    }
    if lower.contains("nixos-ami-agent") {
        return Some(
            "the first line mentions nixos-ami-agent but is not the header `#nixos-ami-agent`",
        );
    }
    let compact: String = text.split_whitespace().collect();
    if compact.len() >= 16
        && compact.len().is_multiple_of(4)
        && compact
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='))
        && compact
            .chars()
            .any(|c| c.is_ascii_digit() || c == '+' || c == '/' || c == '=')
    {
        return Some(
            "it looks base64-encoded: give EC2 the text itself (the console, the CLI's \
             --user-data and Terraform's user_data encode it; only a raw API call encodes it once)",
        );
    }
    let nix_like = first.starts_with('{')
        && (text.contains("config") || text.contains("pkgs"))
        && (text.contains("}:") || text.contains("imports"));
    if nix_like {
        return Some(
            "it looks like a NixOS configuration (amazon-init's format); this agent applies a flake \
             output from FlakeHub: `flake = \"ORG/FLAKE/VERSION#nixosConfigurations.NAME\"` under \
             `#nixos-ami-agent`",
        );
    }
    None
}

fn utf8<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str, SettingsError> {
    std::str::from_utf8(bytes).map_err(|e| {
        invalid(format!(
            "{what} is not valid UTF-8 (byte {})",
            e.valid_up_to()
        ))
    })
}

fn toml_layer(bytes: &[u8]) -> Result<Layer, SettingsError> {
    let text = utf8(bytes, "the TOML settings")?;
    let doc: Document =
        document::from_toml(text).map_err(|e| SettingsError::from_doc(&Source::UserData, e))?;
    Layer::from_document(doc, Source::UserData)
}

/// `None` when the JSON is not addressed to us (valid JSON without our
/// key); an error when it is ours but wrong, or is broken JSON that
/// mentions our key (an operator's typo must not be silently ignored).
fn json_layer(bytes: &[u8]) -> Result<Option<Layer>, SettingsError> {
    #[derive(Deserialize)]
    struct Wrapper {
        #[serde(rename = "nixos-ami-agent")]
        settings: Document,
    }
    let mentions_us = bytes
        .windows(JSON_KEY.len() + 2)
        .any(|w| w == format!("\"{JSON_KEY}\"").as_bytes());
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(serde_json::Value::Object(map)) if map.contains_key(JSON_KEY) => {}
        Ok(_) => return Ok(None),
        Err(_) if !mentions_us => return Ok(None),
        Err(_) => {}
    }
    let w: Wrapper = document::from_json(bytes, JSON_KEY)
        .map_err(|e| SettingsError::from_doc(&Source::UserData, e))?;
    Layer::from_document(w.settings, Source::UserData).map(Some)
}

fn from_mime(bytes: &[u8], budget: &mut gzip::Budget) -> Result<UserData, SettingsError> {
    let mut settings = None;
    let mut scripts = vec![];
    let mut ignored = vec![];
    for part in mime::parts(bytes, budget).map_err(invalid)? {
        match part {
            mime::Part::Settings { label, body } => {
                if settings.is_some() {
                    return Err(invalid(format!(
                        "MIME {label}: a second {} part; put all settings in one",
                        mime::SETTINGS_TYPE
                    )));
                }
                let layer = toml_layer(&body).map_err(|mut e| {
                    e.reason = format!("MIME {label}: {}", e.reason);
                    e
                })?;
                settings = Some(layer);
            }
            mime::Part::Script { label, body } => {
                if !body.starts_with(b"#!") {
                    return Err(invalid(format!(
                        "MIME {label}: a {} part must start with #! (an interpreter line)",
                        mime::SCRIPT_TYPE
                    )));
                }
                check_interpreter(&body).map_err(|why| invalid(format!("MIME {label} {why}")))?;
                scripts.push(Script {
                    label,
                    digest: Digest::of(&body),
                    body,
                });
            }
            mime::Part::Ignored { label, mimetype } => {
                ignored.push(format!("{label} ({mimetype})"))
            }
        }
    }
    let kind = if settings.is_none() && scripts.is_empty() {
        Kind::NotForUs
    } else {
        Kind::Mime
    };
    Ok(UserData {
        kind,
        settings,
        scripts,
        ignored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{Action, Target};
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn flake_of(u: &UserData) -> &str {
        match &u.settings.as_ref().unwrap().target {
            Some(Target::Flake(f)) => f.as_str(),
            other => panic!("{other:?}"),
        }
    }

    const TOML: &str =
        "#nixos-ami-agent\nflake = \"o/f/0.1#nixosConfigurations.web\"\naction = \"boot\"\n";

    #[test]
    fn toml_with_header() {
        let u = sniff(TOML.as_bytes()).unwrap();
        assert_eq!(u.kind, Kind::Toml);
        assert_eq!(flake_of(&u), "o/f/0.1#nixosConfigurations.web");
        assert_eq!(u.settings.unwrap().action, Some(Action::Boot));
        let crlf = TOML.replace('\n', "\r\n");
        assert_eq!(sniff(crlf.as_bytes()).unwrap().kind, Kind::Toml);
    }

    #[test]
    fn gzip_is_transparent() {
        let u = sniff(&gz(TOML.as_bytes())).unwrap();
        assert_eq!(u.kind, Kind::Toml);
        let s = sniff(&gz(b"#!/bin/sh\ntrue\n")).unwrap();
        assert_eq!(s.kind, Kind::Script);
    }

    #[test]
    fn gzip_bomb_is_refused() {
        let e = sniff(&gz(&vec![b'#'; 4 << 20])).unwrap_err();
        assert!(e.reason.contains("inflates to more than"), "{e}");
    }

    /// 100 small gzipped parts must not inflate to 100 times the cap.
    #[test]
    fn the_inflate_cap_holds_across_mime_parts() {
        use base64::Engine as _;
        let part = base64::engine::general_purpose::STANDARD.encode(gz(&[
            b"#!/bin/sh\n".as_slice(),
            &vec![b'#'; 200 << 10],
        ]
        .concat()));
        let mut ud = String::from("Content-Type: multipart/mixed; boundary=\"B\"\n\n");
        for _ in 0..8 {
            ud.push_str(&format!(
                "--B\nContent-Type: text/x-shellscript\nContent-Transfer-Encoding: base64\n\n{part}\n"
            ));
        }
        ud.push_str("--B--\n");
        assert!(ud.len() < 16 << 10, "fits in EC2 user data: {}", ud.len());
        let e = sniff(ud.as_bytes()).unwrap_err();
        assert!(e.reason.contains("the whole user data"), "{e}");
        // Four of them (~800 KiB) are within the cap.
        let four = ud.replacen(&format!("--B\nContent-Type: text/x-shellscript\nContent-Transfer-Encoding: base64\n\n{part}\n"), "", 4);
        assert_eq!(sniff(four.as_bytes()).unwrap().scripts.len(), 4);
    }

    #[test]
    fn json_terraform_jsonencode() {
        let u = sniff(br#"{"other-tool": 1, "nixos-ami-agent": {"ssm-parameter": "/fleet/web", "login": false}}"#).unwrap();
        assert_eq!(u.kind, Kind::Json);
        let l = u.settings.unwrap();
        assert!(matches!(l.target, Some(Target::Ssm(p)) if p.as_str() == "/fleet/web"));
        assert_eq!(l.login, Some(false));
    }

    #[test]
    fn json_errors_name_key_and_line() {
        let e = sniff(b"{\"nixos-ami-agent\": {\n  \"action\": \"reboot\"}}").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("action"));
        assert!(e.reason.contains("line 2"), "{e}");
        let e = sniff(b"{\"nixos-ami-agent\": {\"flake\": \"o/f/1#x\",}}").unwrap_err();
        assert!(e.reason.contains("line 1"), "{e}");
    }

    #[test]
    fn json_for_someone_else_is_not_for_us() {
        for other in [&b"{\"ignition\": {}}"[..], b"{not json at all", b"[1,2]"] {
            assert_eq!(sniff(other).unwrap().kind, Kind::NotForUs);
        }
    }

    #[test]
    fn script_is_kept_with_digest() {
        let body = b"#!/bin/sh\ndeterminate-nixd login aws\nfh apply nixos o/f/0.1#x\n";
        let u = sniff(body).unwrap();
        assert_eq!(u.kind, Kind::Script);
        assert_eq!(u.scripts.len(), 1);
        assert_eq!(u.scripts[0].body, body);
        assert_eq!(u.scripts[0].digest.size, body.len());
        assert_eq!(u.scripts[0].digest.sha256.len(), 64);
        assert!(u.settings.is_none());
    }

    #[test]
    fn anything_else_is_left_alone() {
        for other in [
            &b"{ config, pkgs, ... }: { services.nginx.enable = true; }"[..],
            b"#cloud-config\npackages: [git]\n",
            b"#nixos-ami-agentX\nflake = 1",
            b"\xff\xfe\x00garbage",
        ] {
            let u = sniff(other).unwrap();
            assert_eq!(u.kind, Kind::NotForUs, "{other:?}");
        }
        assert_eq!(sniff(b"").unwrap().kind, Kind::Absent);
    }

    #[test]
    fn toml_not_utf8() {
        let e = sniff(b"#nixos-ami-agent\nflake = \"\xff\"").unwrap_err();
        assert!(e.reason.contains("UTF-8"), "{e}");
    }

    #[test]
    fn mime_with_settings_scripts_and_others() {
        let ud = "Content-Type: multipart/mixed; boundary=\"B\"\nMIME-Version: 1.0\n\n\
                  --B\nContent-Type: text/cloud-config\n\n#cloud-config\n\
                  --B\nContent-Type: text/x-nixos-ami-agent\n\nflake = \"o/f/0.1#x\"\n\
                  --B\nContent-Type: text/x-shellscript\n\n#!/bin/sh\necho one\n\
                  --B\nContent-Type: text/x-shellscript\n\n#!/bin/sh\necho two\n\
                  --B--\n";
        let u = sniff(ud.as_bytes()).unwrap();
        assert_eq!(u.kind, Kind::Mime);
        assert_eq!(flake_of(&u), "o/f/0.1#x");
        assert_eq!(
            u.scripts
                .iter()
                .map(|s| s.label.as_str())
                .collect::<Vec<_>>(),
            ["part 3", "part 4"]
        );
        assert_eq!(u.ignored, ["part 1 (text/cloud-config)"]);
    }

    #[test]
    fn mime_as_cloud_init_recognises_it() {
        let body = "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"B\"\n\n\
                    --B\nContent-Type: text/x-nixos-ami-agent\n\nflake = \"o/f/0.1#x\"\n\
                    --B\nContent-Type: text/x-shellscript\n\n#!/bin/sh\necho one\n--B--\n";
        // Python's email library with unixfrom=True, as in cloud-init's
        // test data; and headers before MIME-Version.
        for ud in [
            format!("From nobody Mon Jan  1 00:00:00 2024\n{body}"),
            format!("Subject: web fleet\nFrom: ops@example.com\n{body}"),
            format!(
                "subject: x\r\n{}",
                body.replace("MIME-Version", "mime-version")
                    .replace('\n', "\r\n")
            ),
        ] {
            let u = sniff(ud.as_bytes()).unwrap();
            assert_eq!(u.kind, Kind::Mime, "{ud}");
            assert!(u.settings.is_some(), "{ud}");
            assert_eq!(u.scripts.len(), 1, "{ud}");
        }
        // Past the first 4 KiB, as for cloud-init: not MIME.
        let late = format!("Subject: x\nX-Pad: {}\n{body}", "p".repeat(4100));
        assert_eq!(sniff(late.as_bytes()).unwrap().kind, Kind::NotForUs);
        // A script that mentions MIME-Version stays a script.
        let script = "#!/bin/sh\nprintf 'MIME-Version: 1.0\\n' | sendmail ops\n";
        assert_eq!(sniff(script.as_bytes()).unwrap().kind, Kind::Script);
    }

    #[test]
    fn near_misses_are_forgiven_or_explained() {
        for ud in [
            "\u{feff}#nixos-ami-agent\nflake = \"o/f/0.1#x\"\n",
            "\n\n#nixos-ami-agent\nflake = \"o/f/0.1#x\"\n",
            "    #nixos-ami-agent\n    flake = \"o/f/0.1#x\"\n",
            "# nixos-ami-agent\nflake = \"o/f/0.1#x\"\n",
            "#nixos-ami-agent\r\nflake = \"o/f/0.1#x\"\r\n",
        ] {
            let u = sniff(ud.as_bytes()).unwrap_or_else(|e| panic!("{ud:?}: {e}"));
            assert_eq!(u.kind, Kind::Toml, "{ud:?}");
            assert!(u.settings.unwrap().target.is_some(), "{ud:?}");
        }
        let e = sniff(b"#!nixos-ami-agent\nflake = \"o/f/0.1#x\"\n").unwrap_err();
        assert!(e.reason.contains("`#nixos-ami-agent` (no `!`)"), "{e}");
        let e = sniff(b"#!bash\necho hi\n").unwrap_err();
        assert!(e.reason.contains("#!/usr/bin/env bash"), "{e}");
        assert!(sniff(b"#! /bin/sh\necho hi\n").is_ok());
        let mime = "Content-Type: multipart/mixed; boundary=\"B\"\n\n\
                    --B\nContent-Type: text/x-shellscript\n\n#!sh\necho hi\n--B--\n";
        let e = sniff(mime.as_bytes()).unwrap_err();
        assert!(e.reason.starts_with("MIME part 1 starts with `#!`"), "{e}");

        let hint = |ud: &str| {
            assert_eq!(sniff(ud.as_bytes()).unwrap().kind, Kind::NotForUs, "{ud}");
            near_miss(ud.as_bytes()).unwrap_or_else(|| panic!("no hint for {ud:?}"))
        };
        assert!(hint("#cloud-config\npackages: [git]\n").contains("cloud-init"));
        assert!(hint("#nixos-ami-agents\nflake = 1\n").contains("not the header"));
        assert!(hint("I25peG9zLWFtaS1hZ2VudApmbGFrZSA9ICJvL2YvMC4xI3giCg==\n").contains("base64"));
        assert!(
            hint("{ config, pkgs, ... }:\n{\n  services.nginx.enable = true;\n}\n")
                .contains("NixOS configuration")
        );
        assert_eq!(near_miss(b"just some text for another tool\n"), None);
    }

    #[test]
    fn mime_errors() {
        let two = "Content-Type: multipart/mixed; boundary=\"B\"\n\n\
                   --B\nContent-Type: text/x-nixos-ami-agent\n\nlogin = true\n\
                   --B\nContent-Type: text/x-nixos-ami-agent\n\nlogin = false\n--B--\n";
        assert!(sniff(two.as_bytes()).unwrap_err().reason.contains("second"));
        let bad = "Content-Type: multipart/mixed; boundary=\"B\"\n\n\
                   --B\nContent-Type: text/x-nixos-ami-agent\n\naction = 5\n--B--\n";
        let e = sniff(bad.as_bytes()).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("action"));
        assert!(e.reason.starts_with("MIME part 1: "), "{e}");
        let noshebang = "Content-Type: multipart/mixed; boundary=\"B\"\n\n\
                         --B\nContent-Type: text/x-shellscript\n\necho hi\n--B--\n";
        assert!(
            sniff(noshebang.as_bytes())
                .unwrap_err()
                .reason
                .contains("#!")
        );
        let only_others = "Content-Type: multipart/mixed; boundary=\"B\"\n\n\
                           --B\nContent-Type: text/cloud-config\n\n#cloud-config\n--B--\n";
        assert_eq!(sniff(only_others.as_bytes()).unwrap().kind, Kind::NotForUs);
    }
}
