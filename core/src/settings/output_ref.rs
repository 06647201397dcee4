//! FlakeHub output references, the only kind of target `fh apply nixos` and
//! `fh resolve` accept: `{org}/{flake}/{version_req}#{attr_path}`.
//!
//! The value ends up in the argv of `fh`, so validation is strict: the
//! character sets are narrow enough that nothing can become a flag, a shell
//! metacharacter (we use no shell, but operators copy commands from logs)
//! or a second argument. Reasons never quote the value: it may come from a
//! SecureString.

use std::fmt;

/// What an operator can copy from an error message.
pub const EXAMPLE: &str = "my-org/my-flake/0.1#nixosConfigurations.my-host";
const URL_PREFIX: &str = "https://flakehub.com/f/";
const MAX_LEN: usize = 512;

/// A validated FlakeHub output reference, kept exactly as written (fh strips
/// the URL prefix itself).
#[derive(Clone, PartialEq, Eq)]
pub struct OutputRef(String);

impl OutputRef {
    pub fn parse(raw: &str) -> Result<Self, String> {
        check(raw)?;
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

// Debug goes through Display so that secret-aware code can rely on never
// formatting an OutputRef by accident: callers print `as_str()` explicitly.
impl fmt::Debug for OutputRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OutputRef(..)")
    }
}

fn check(raw: &str) -> Result<(), String> {
    super::plain_token(raw, MAX_LEN)?;
    let expected =
        format!("expected {{org}}/{{flake}}/{{version_req}}#{{attr_path}}, e.g. {EXAMPLE}");
    let rest = raw.strip_prefix(URL_PREFIX).unwrap_or(raw);
    if rest.starts_with('/') {
        return Err(format!(
            "is a path; fh accepts no paths or store paths, only FlakeHub output references ({expected})"
        ));
    }
    if rest.contains(':') {
        return Err(format!(
            "is a URL or flake reference, not a FlakeHub output reference ({expected}); \
             fh applies only flakes published to FlakeHub: publish it (for example with \
             DeterminateSystems/flakehub-push) and name the published output"
        ));
    }
    let Some((flake, attr)) = rest.split_once('#') else {
        return Err(format!("has no `#attr_path` ({expected})"));
    };
    let parts: Vec<&str> = flake.split('/').collect();
    let [org, name, version] = parts[..] else {
        return Err(format!(
            "must have exactly three `/`-separated parts before `#` ({expected})"
        ));
    };
    for (what, part) in [("organisation", org), ("flake name", name)] {
        if part.is_empty() {
            return Err(format!("has an empty {what} ({expected})"));
        }
        if part.starts_with(['.', '-'])
            || !part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(format!(
                "has an invalid {what}: use letters, digits, `.`, `_`, `-` ({expected})"
            ));
        }
    }
    if version.is_empty() {
        return Err(format!("has an empty version requirement ({expected})"));
    }
    if !version.chars().all(|c| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                '.' | '*' | '+' | '^' | '~' | '=' | '<' | '>' | ',' | '_' | '-'
            )
    }) {
        return Err(format!(
            "has an invalid version requirement: use a semver requirement such as `0.1`, `*` or `=1.2.3` ({expected})"
        ));
    }
    if attr.is_empty() {
        return Err(format!(
            "has an empty attribute path after `#` ({expected})"
        ));
    }
    if attr.starts_with('.') || attr.ends_with('.') || attr.contains("..") {
        return Err(format!(
            "has an attribute path with an empty component ({expected})"
        ));
    }
    if !attr
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '\'' | '"' | '+'))
    {
        return Err(format!(
            "has an invalid attribute path: use letters, digits, `.`, `_`, `-`, quotes ({expected})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_flakehub_output_references() {
        for ok in [
            EXAMPLE,
            "DeterminateSystems/fh/*#nixosConfigurations.web",
            "https://flakehub.com/f/my-org/my-flake/0.1#nixosConfigurations.x86_64-linux",
            "org/flake/=0.1.2#nixosConfigurations.\"host.example\"",
            "org/flake/>=0.1,<0.3#packages.x86_64-linux.default",
            "org/flake/0.1.2+rev-abc#nixosConfigurations.web",
        ] {
            assert!(OutputRef::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_everything_fh_would_not_take() {
        let cases = [
            ("", "is empty"),
            ("-o", "flag"),
            ("--option", "flag"),
            ("org/flake/0.1 #x", "whitespace"),
            ("org/flake/0.1#x\n--flag", "whitespace"),
            ("org/flake/0.1#x\u{7}", "control"),
            ("/nix/store/abc-nixos-system", "store paths"),
            ("https://flakehub.com/f//nix/store/x", "store paths"),
            ("github:org/repo#nixosConfigurations.x", "URL"),
            ("https://example.com/org/flake/0.1#x", "URL"),
            ("org/flake/0.1", "no `#attr_path`"),
            ("org/flake#x", "three"),
            ("org/flake/0.1/extra#x", "three"),
            ("/flake/0.1#x", "path"),
            ("org//0.1#x", "empty flake name"),
            ("org/flake/#x", "empty version"),
            ("org/flake/0.1#", "empty attribute"),
            ("org/flake/0.1#a..b", "empty component"),
            ("org/flake/0.1#$(reboot)", "invalid attribute path"),
            ("org/flake/0.1#`id`", "invalid attribute path"),
            ("org/fl;ake/0.1#x", "invalid flake name"),
            ("-org/flake/0.1#x", "flag"),
            ("org/-flake/0.1#x", "invalid flake name"),
            ("org/flake/0.1$x#x", "invalid version"),
        ];
        for (input, reason) in cases {
            let err = OutputRef::parse(input).expect_err(input);
            assert!(err.contains(reason), "{input:?}: {err}");
        }
        let long = format!("org/flake/0.1#{}", "a".repeat(600));
        assert!(OutputRef::parse(&long).unwrap_err().contains("longer"));
    }

    #[test]
    fn reasons_never_quote_the_value() {
        let secret = "s3cr3t-org/flake/0.1#x y";
        let err = OutputRef::parse(secret).unwrap_err();
        assert!(!err.contains("s3cr3t"), "{err}");
    }
}
