//! Keeps secrets out of every line the agent writes: a target read from a
//! SecureString is replaced by `<SecureString NAME>` in its own messages,
//! in the state file, and in the lines passed on from `fh`.
//!
//! What is masked: the parameter's value, the output reference, and the
//! reference's `ORG/FLAKE/VERSION` part (fh's URLs carry it without the
//! `#`). A form fh would compute from them (a resolved version, a
//! percent-encoded URL) is not known here and is not masked; the README
//! says so (Reference, Logs and secrets).

use std::borrow::Cow;

#[derive(Debug, Default, Clone)]
pub struct Redactor {
    secrets: Vec<(String, String)>,
}

impl Redactor {
    pub fn placeholder(parameter: &str) -> String {
        format!("<SecureString {parameter}>")
    }

    pub fn add(&mut self, secret: &str, placeholder: &str) {
        let secret = secret.trim();
        if !secret.is_empty() && !self.secrets.iter().any(|(s, _)| s == secret) {
            self.secrets
                .push((secret.to_owned(), placeholder.to_owned()));
            // Longest first, so a value containing another secret (TOML
            // holding the flake ref) is replaced whole.
            self.secrets
                .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        }
    }

    pub fn apply<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for (secret, placeholder) in &self.secrets {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), placeholder));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_longest_first() {
        let mut r = Redactor::default();
        r.add("o/f/1#x", "<S p>");
        r.add("flake = \"o/f/1#x\"\n", "<S p>");
        assert_eq!(r.apply("applying o/f/1#x now"), "applying <S p> now");
        assert_eq!(r.apply("value flake = \"o/f/1#x\" end"), "value <S p> end");
        assert!(matches!(r.apply("nothing here"), Cow::Borrowed(_)));
        r.add("   ", "<x>");
        assert_eq!(r.apply("a   b"), "a   b");
    }
}
