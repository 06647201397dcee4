//! Text from outside (user data, SSM values and replies, the output of the
//! programs the agent runs) on its way to a log line or a terminal.
//!
//! Control characters are shown escaped (`\n`, `\r`, `\u{1b}`), so such
//! text can neither forge a log line (a newline), rewrite a terminal (ESC,
//! CR, backspace) nor hide what follows it (bidirectional overrides); and
//! text of unknown length is cut to a bound before it is shown or stored.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Not control characters to Rust, but they reorder, hide or break what a
/// terminal, an editor or a log viewer shows: bidirectional marks and
/// overrides, zero-width and other format characters (Unicode category
/// Cf), line and paragraph separators (Zl, Zp).
fn is_bidi_override(c: char) -> bool {
    matches!(c,
        '\u{00ad}' | '\u{061c}' | '\u{180e}'
        | '\u{200b}'..='\u{200f}'
        | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{206f}'
        | '\u{feff}'
        | '\u{fff9}'..='\u{fffb}'
        | '\u{e0001}' | '\u{e0020}'..='\u{e007f}')
}

fn needs_escape(c: char) -> bool {
    (c.is_control() && c != '\t') || is_bidi_override(c)
}

/// `s` with every control character (but tab) and bidirectional override
/// escaped; borrowed when there is none.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// At most `max` bytes of `s` (cut at a character boundary), saying how
/// much was left out.
pub fn bounded(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… [{} more bytes]", &s[..end], s.len() - end))
}

/// Both: what a log line may quote from outside.
pub fn shown(s: &str, max: usize) -> String {
    escape_controls(&bounded(s, max)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_forge_or_rewrite() {
        assert_eq!(escape_controls("plain\ttext"), "plain\ttext");
        assert!(matches!(escape_controls("plain"), Cow::Borrowed(_)));
        assert_eq!(
            escape_controls("a\nfailed: forged\r\x1b[2Kb\x7f\u{85}"),
            "a\\nfailed: forged\\r\\u{1b}[2Kb\\u{7f}\\u{85}"
        );
        assert_eq!(escape_controls("x\u{202e}y"), "x\\u{202e}y");
        assert_eq!(
            escape_controls("a\u{200b}b\u{2028}c\u{feff}d\u{e0041}"),
            "a\\u{200b}b\\u{2028}c\\u{feff}d\\u{e0041}"
        );
        assert_eq!(escape_controls("naïve ✓"), "naïve ✓");
    }

    #[test]
    fn bounds_at_a_character_boundary() {
        assert_eq!(bounded("short", 10), "short");
        assert_eq!(bounded("ééé", 3), "é… [4 more bytes]");
        let long = "x".repeat(1000);
        assert_eq!(
            shown(&long, 10),
            format!("{}… [990 more bytes]", "x".repeat(10))
        );
    }
}
