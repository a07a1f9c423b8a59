//! Making untrusted text safe to print. Anything a guest (or an image, or a
//! peer) sends may end up in a message Kiln prints on a terminal or writes
//! to a log; raw control characters there could move the cursor, clear the
//! screen, set the window title or forge further lines. Every message that
//! may carry such bytes goes through `sanitize` (or `Untrusted`) first.

use std::fmt;

/// Longest untrusted text kept in one message; the rest is cut with `…`.
pub const MAX_SHOWN: usize = 512;

/// Returns `s` with every control character (C0, DEL, C1, and the Unicode
/// bidirectional overrides) replaced by a visible escape (`\e`, `\n`,
/// `\x07`, `\u{202e}`), cut to `MAX_SHOWN` characters. Printable text,
/// including non-ASCII letters, is kept.
pub fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_SHOWN + 8));
    for (shown, c) in s.chars().enumerate() {
        if shown >= MAX_SHOWN {
            out.push('…');
            break;
        }
        push_escaped(&mut out, c);
    }
    out
}

/// Like `sanitize` for bytes that may not be UTF-8 (invalid bytes become
/// `\xNN`).
pub fn sanitize_bytes(b: &[u8]) -> String {
    let mut out = String::new();
    let mut shown = 0;
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            if shown >= MAX_SHOWN {
                out.push('…');
                return out;
            }
            push_escaped(&mut out, c);
            shown += 1;
        }
        for byte in chunk.invalid() {
            if shown >= MAX_SHOWN {
                out.push('…');
                return out;
            }
            out.push_str(&format!("\\x{byte:02x}"));
            shown += 1;
        }
    }
    out
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\x1b' => out.push_str("\\e"),
        '\\' => out.push('\\'),
        c if (c as u32) < 0x20 || c as u32 == 0x7f => {
            out.push_str(&format!("\\x{:02x}", c as u32));
        }
        // C1 controls (0x80..0x9f, e.g. CSI 0x9b) and bidi marks and
        // overrides: what validation refuses, printing escapes.
        c if is_unprintable(c) => {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
        c => out.push(c),
    }
}

/// Whether `c` must not reach a terminal as it is: control characters
/// (C0, DEL, C1) and the Unicode bidirectional marks and overrides (text
/// that reorders what follows it). Validation of untrusted text refuses
/// them; printing escapes them.
pub fn is_unprintable(c: char) -> bool {
    c.is_control()
        || matches!(
            c as u32,
            0x61c | 0x200e | 0x200f | 0x2028 | 0x2029 | 0x202a..=0x202e | 0x2066..=0x2069
        )
}

/// `s` made printable (each unprintable character as its escape) and cut
/// at a character boundary to at most `max` bytes, `…` marking a cut.
pub fn bounded(s: &str, max: usize) -> String {
    let mut out = String::new();
    let mut buf = String::new();
    for c in s.chars() {
        buf.clear();
        if is_unprintable(c) {
            buf.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            buf.push(c);
        }
        if out.len() + buf.len() > max {
            while !out.is_empty() && out.len() + '…'.len_utf8() > max {
                out.pop();
            }
            out.push('…');
            return out;
        }
        out.push_str(&buf);
    }
    out
}

/// Escapes control characters like `sanitize`, without cutting: for whole
/// messages that may contain guest bytes somewhere (the CLI's last line).
pub fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        push_escaped(&mut out, c);
    }
    out
}

/// Displays untrusted text sanitized: `format!("{}", Untrusted(&s))`.
pub struct Untrusted<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&sanitize(self.0))
    }
}

impl fmt::Debug for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", sanitize(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        let evil = "a\x1b]0;pwned\x07\x1b[2J\nline2\r\u{9b}31m\u{202e}x";
        let s = sanitize(evil);
        assert!(!s.chars().any(|c| c.is_control()), "{s:?}");
        assert_eq!(s, "a\\e]0;pwned\\x07\\e[2J\\nline2\\r\\u{9b}31m\\u{202e}x");
        assert_eq!(sanitize("grüße /tmp/x"), "grüße /tmp/x");
    }

    #[test]
    fn bytes_and_length() {
        assert_eq!(sanitize_bytes(b"ok\xff\x1b"), "ok\\xff\\e");
        let long = "x".repeat(MAX_SHOWN * 2);
        assert_eq!(sanitize(&long).chars().count(), MAX_SHOWN + 1);
        assert_eq!(format!("{}", Untrusted("a\nb")), "a\\nb");
    }
}
