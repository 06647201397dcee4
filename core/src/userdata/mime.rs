//! MIME multipart user data, as cloud-init and Terraform's
//! `cloudinit_config` write it. Only our two part types are taken; the
//! rest belongs to other tools and is named in the log, not parsed.

use super::gzip;

pub const SETTINGS_TYPE: &str = "text/x-nixos-ami-agent";
pub const SCRIPT_TYPE: &str = "text/x-shellscript";
/// Nesting that real tools produce is one or two levels; anything deeper is
/// hostile and would only cost stack.
const MAX_DEPTH: usize = 8;
const MAX_PARTS: usize = 100;

pub fn looks_like_mime(bytes: &[u8]) -> bool {
    let bytes = without_mbox_from(bytes);
    let head = &bytes[..bytes.len().min(32)];
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    if head.starts_with("content-type:") || head.starts_with("mime-version:") {
        return true;
    }
    // Our own formats and scripts say what they are on their first line
    // (`#nixos-ami-agent`, `#!`, JSON): a script that merely mentions
    // MIME-Version stays a script.
    if bytes.trim_ascii_start().starts_with(b"#") || bytes.trim_ascii_start().starts_with(b"{") {
        return false;
    }
    // cloud-init's rule (cloudinit/user_data.py, convert_string):
    // `mime-version:` anywhere in the first 4 KiB, in any case, so a
    // message whose first header is Subject, From or To is MIME too.
    bytes[..bytes.len().min(4096)]
        .to_ascii_lowercase()
        .windows(b"mime-version:".len())
        .any(|w| w == b"mime-version:")
}

/// Without a leading mbox `From ` line, which Python's email library
/// writes with `unixfrom` (and cloud-init's own test data holds): it is
/// no header, so neither detection nor parsing should see it.
pub fn without_mbox_from(bytes: &[u8]) -> &[u8] {
    match bytes.strip_prefix(b"From ") {
        Some(rest) => rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(&[][..], |i| &rest[i + 1..]),
        None => bytes,
    }
}

/// A leaf part we care about, already decoded (transfer encoding, gzip).
#[derive(Debug, PartialEq, Eq)]
pub enum Part {
    Settings { label: String, body: Vec<u8> },
    Script { label: String, body: Vec<u8> },
    Ignored { label: String, mimetype: String },
}

/// The parts, each body decoded; gzipped bodies draw on `budget`, shared
/// with the rest of the user data.
pub fn parts(bytes: &[u8], budget: &mut gzip::Budget) -> Result<Vec<Part>, String> {
    let mail = mailparse::parse_mail(without_mbox_from(bytes)).map_err(|e| format!("MIME: {e}"))?;
    let mut out = Vec::new();
    walk(&mail, 0, &mut out, budget)?;
    Ok(out)
}

fn walk(
    mail: &mailparse::ParsedMail<'_>,
    depth: usize,
    out: &mut Vec<Part>,
    budget: &mut gzip::Budget,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "MIME: multipart nested more than {MAX_DEPTH} levels deep"
        ));
    }
    if mail.ctype.mimetype.starts_with("multipart/") {
        for sub in &mail.subparts {
            walk(sub, depth + 1, out, budget)?;
        }
        return Ok(());
    }
    if out.len() >= MAX_PARTS {
        return Err(format!("MIME: more than {MAX_PARTS} parts"));
    }
    let label = label(out.len() + 1, mail);
    // From the user data, and logged: a Content-Type may carry any
    // character once its encoded words are decoded (a newline would forge
    // a log line), so it is shown escaped and cut.
    let mimetype = crate::text::shown(&mail.ctype.mimetype.to_ascii_lowercase(), 100);
    let mut body = || -> Result<Vec<u8>, String> {
        let raw = mail
            .get_body_raw()
            .map_err(|e| format!("MIME {label}: body cannot be decoded: {e}"))?;
        if gzip::is_gzip(&raw) {
            gzip::inflate(&raw, budget).map_err(|e| format!("MIME {label}: {e}"))
        } else {
            Ok(raw)
        }
    };
    out.push(match mimetype.as_str() {
        SETTINGS_TYPE => Part::Settings {
            body: body()?,
            label,
        },
        SCRIPT_TYPE => Part::Script {
            body: body()?,
            label,
        },
        _ => Part::Ignored { label, mimetype },
    });
    Ok(())
}

/// `part 2 (setup.sh)`: the filename only when it is plainly printable, as
/// it is text from the user data and ends up in logs.
fn label(n: usize, mail: &mailparse::ParsedMail<'_>) -> String {
    let filename = mail
        .get_content_disposition()
        .params
        .get("filename")
        .filter(|f| {
            f.len() <= 64
                && f.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        })
        .cloned();
    match filename {
        Some(f) => format!("part {n} ({f})"),
        None => format!("part {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn multipart(parts: &[(&str, &str, &str)]) -> String {
        let mut s = String::from(
            "Content-Type: multipart/mixed; boundary=\"MIMEBOUNDARY\"\nMIME-Version: 1.0\n\n",
        );
        for (ctype, extra_headers, body) in parts {
            s.push_str(&format!(
                "--MIMEBOUNDARY\nContent-Type: {ctype}\n{extra_headers}MIME-Version: 1.0\n\n{body}\n"
            ));
        }
        s.push_str("--MIMEBOUNDARY--\n");
        s
    }

    #[test]
    fn terraform_cloudinit_config_shape() {
        let ud = multipart(&[
            (
                "text/cloud-config",
                "Content-Disposition: attachment; filename=\"cloud.cfg\"\n",
                "#cloud-config\n",
            ),
            ("text/x-nixos-ami-agent", "", "flake = \"o/f/0.1#x\""),
            (
                "text/x-shellscript",
                "Content-Transfer-Encoding: base64\nContent-Disposition: attachment; filename=\"setup.sh\"\n",
                "IyEvYmluL3NoCmVjaG8gaGkK",
            ),
        ]);
        assert!(looks_like_mime(ud.as_bytes()));
        let p = parts(ud.as_bytes(), &mut gzip::Budget::default()).unwrap();
        assert_eq!(
            p,
            vec![
                Part::Ignored {
                    label: "part 1 (cloud.cfg)".into(),
                    mimetype: "text/cloud-config".into()
                },
                Part::Settings {
                    label: "part 2".into(),
                    body: b"flake = \"o/f/0.1#x\"".to_vec()
                },
                Part::Script {
                    label: "part 3 (setup.sh)".into(),
                    body: b"#!/bin/sh\necho hi\n".to_vec()
                },
            ]
        );
    }

    #[test]
    fn nested_multipart_is_walked_but_bounded() {
        let inner = multipart(&[("text/x-nixos-ami-agent", "", "login = false")])
            .replace("MIMEBOUNDARY", "INNER");
        let outer = multipart(&[(
            "multipart/mixed; boundary=\"INNER\"",
            "",
            inner.split_once("\n\n").unwrap().1,
        )]);
        let p = parts(outer.as_bytes(), &mut gzip::Budget::default()).unwrap();
        assert!(matches!(&p[..], [Part::Settings { body, .. }] if body == b"login = false"));

        let mut deep = String::from("x");
        for i in 0..20 {
            deep = format!(
                "Content-Type: multipart/mixed; boundary=\"B{i}\"\n\n--B{i}\n{deep}\n--B{i}--\n"
            );
        }
        let e = parts(deep.as_bytes(), &mut gzip::Budget::default()).unwrap_err();
        assert!(e.contains("nested"), "{e}");
    }

    #[test]
    fn hostile_filenames_are_not_echoed() {
        let ud = multipart(&[(
            "text/plain",
            "Content-Disposition: attachment; filename=\"$(reboot)\"\n",
            "x",
        )]);
        let p = parts(ud.as_bytes(), &mut gzip::Budget::default()).unwrap();
        assert_eq!(
            p,
            vec![Part::Ignored {
                label: "part 1".into(),
                mimetype: "text/plain".into()
            }]
        );
    }
}
