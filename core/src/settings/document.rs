//! Turning TOML or JSON text into typed documents, with errors that say
//! which key was wrong and where, so every source reports alike.

use serde::de::DeserializeOwned;

/// A parse or type error in a settings document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocError {
    /// Dotted path of the offending key, when the error is about one.
    pub key: Option<String>,
    /// 1-based line and column in the document.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl DocError {
    /// `line 3, column 10: message`, for messages that name the key inline.
    pub fn describe(&self) -> String {
        match self.position {
            Some((l, c)) => format!("line {l}, column {c}: {}", self.message),
            None => self.message.clone(),
        }
    }
}

pub fn from_toml<T: DeserializeOwned>(text: &str) -> Result<T, DocError> {
    let de = toml::Deserializer::parse(text).map_err(|e| toml_error(text, &e, None))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = key_of(e.path());
        toml_error(text, e.inner(), key)
    })
}

/// Deserializes `T` from a JSON document; `strip` is a leading path segment
/// that wraps the settings (`nixos-ami-agent`) and is left out of key names.
pub fn from_json<T: DeserializeOwned>(bytes: &[u8], strip: &str) -> Result<T, DocError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let path = path
            .strip_prefix(strip)
            .map(|p| p.trim_start_matches('.').to_owned())
            .unwrap_or(path);
        json_error(e.inner(), key_of_str(&path))
    })?;
    de.end().map_err(|e| json_error(&e, None))?;
    Ok(value)
}

fn json_error(e: &serde_json::Error, key: Option<String>) -> DocError {
    // serde_json appends " at line L column C" to its Display; keep the bare
    // message and report the position ourselves.
    let text = e.to_string();
    let message = match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    };
    let position = (e.line() > 0).then(|| (e.line(), e.column()));
    let message = friendly(&message, key.as_deref());
    DocError {
        key,
        position,
        message,
    }
}

fn toml_error(text: &str, e: &toml::de::Error, key: Option<String>) -> DocError {
    let position = e.span().map(|span| line_col(text, span.start));
    let message = friendly(e.message().trim(), key.as_deref());
    DocError {
        key,
        position,
        message,
    }
}

/// The keys whose values are one of a few words.
const CHOICES: &[(&str, &str)] = &[
    ("action", "`switch`, `boot` or `test`"),
    ("reboot", "`never`, `if-needed` or `always`"),
];

/// The parsers' messages in the operator's words: what a key takes
/// instead of a Rust type name, and the known key nearest a mistyped one.
fn friendly(message: &str, key: Option<&str>) -> String {
    let last = key.map(|k| k.rsplit('.').next().unwrap_or(k));
    if let Some(choices) = last.and_then(|k| CHOICES.iter().find(|(c, _)| *c == k))
        && (message.contains("wanted string") || message.starts_with("invalid type"))
    {
        return format!("must be one of {}", choices.1);
    }
    let mut out = message
        .replace("wanted string or table", "expected a string")
        .replace("expected struct Document", "expected a table of settings")
        .replace("struct Document", "a table of settings");
    if let (Some(rest), Some(unknown)) = (
        out.split_once(", expected one of ")
            .map(|(_, r)| r.to_owned()),
        out.strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
            .map(str::to_owned),
    ) {
        let known: Vec<&str> = rest.split(", ").map(|k| k.trim_matches('`')).collect();
        if let Some(near) = nearest(&unknown, &known) {
            out.push_str(&format!("; did you mean `{near}`?"));
        }
    }
    out
}

/// The known key within two edits of `word` (a typo), if one is.
fn nearest<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    }
    known
        .iter()
        .map(|k| (distance(&word.to_ascii_lowercase(), k), *k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| k)
}

fn key_of(path: &serde_path_to_error::Path) -> Option<String> {
    key_of_str(&path.to_string())
}

fn key_of_str(path: &str) -> Option<String> {
    // serde_path_to_error says `?` where no key is known (a syntax error).
    (!path.is_empty() && path != "." && path != "?").then(|| path.to_owned())
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[allow(dead_code)]
        a: Option<bool>,
    }

    #[test]
    fn toml_type_error_names_key_and_position() {
        let e = from_toml::<Doc>("\n\na = \"yes\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("a"));
        assert_eq!(e.position, Some((3, 5)));
        assert!(e.message.contains("bool"), "{e:?}");
    }

    #[test]
    fn toml_syntax_error_has_position() {
        let e = from_toml::<Doc>("a = true\nb = [\n").unwrap_err();
        // The unclosed array is reported where it starts or where input ends.
        assert!(matches!(e.position, Some((2 | 3, _))), "{e:?}");
        assert_eq!(e.key, None);
    }

    #[test]
    fn messages_in_the_operators_words() {
        assert_eq!(
            friendly("wanted string or table", Some("reboot")),
            "must be one of `never`, `if-needed` or `always`"
        );
        assert_eq!(
            friendly(
                "unknown variant `swtich`, expected one of `switch`, `boot`, `test`",
                Some("action")
            ),
            "unknown variant `swtich`, expected one of `switch`, `boot`, `test`"
        );
        assert_eq!(
            friendly(
                "unknown field `flakes`, expected one of `flake`, `ssm-parameter`",
                None
            ),
            "unknown field `flakes`, expected one of `flake`, `ssm-parameter`; did you mean `flake`?"
        );
        assert!(
            !friendly("unknown field `zzzzzz`, expected one of `flake`", None)
                .contains("did you mean")
        );
        assert_eq!(
            friendly("invalid type: integer `5`, expected struct Document", None),
            "invalid type: integer `5`, expected a table of settings"
        );
        assert_eq!(key_of_str("?"), None);
    }

    #[test]
    fn json_error_strips_wrapper_from_key() {
        #[derive(Debug, Deserialize)]
        struct Outer {
            #[serde(rename = "w")]
            #[allow(dead_code)]
            inner: Doc,
        }
        let e = from_json::<Outer>(b"{\"w\": {\n \"a\": 3}}", "w").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("a"));
        assert_eq!(e.position.map(|p| p.0), Some(2));
        assert!(!e.message.contains(" at line "), "{e:?}");
    }
}
