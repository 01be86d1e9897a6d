//! The character classes the pre-tokeniser regexes use (`\p{L}`, `\p{N}`, `\s`, and the
//! case-insensitive letters of the Llama-3 contractions), taken from `regex-syntax` — the
//! Unicode tables the `regex` / `fancy-regex` engines behind HF `tokenizers` match with — so
//! the hand-written splitter classifies every code point exactly as the regex does.
use regex_syntax::hir::{Class, HirKind};

/// What a pre-tokeniser regex can tell apart about one character.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cat {
    /// `\p{L}`.
    Letter,
    /// `\p{N}`.
    Number,
    /// `\s` (Unicode `White_Space`).
    Space,
    /// Everything else: `[^\s\p{L}\p{N}]`.
    Other,
}

pub struct Classes {
    ascii: [Cat; 128],
    /// Disjoint, sorted code-point ranges (inclusive) of the non-`Other` classes.
    ranges: Vec<(u32, u32, Cat)>,
}

/// The code-point ranges of a one-class pattern such as `\p{L}` or `(?i:s)`.
pub fn class_ranges(pattern: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::parse(pattern).expect("a valid class pattern");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        HirKind::Literal(l) => {
            let c = std::str::from_utf8(&l.0)
                .ok()
                .and_then(|s| s.chars().next())
                .expect("a one-character literal");
            vec![(c as u32, c as u32)]
        }
        other => panic!("`{pattern}` is not a character class: {other:?}"),
    }
}

impl Classes {
    pub fn new() -> Classes {
        let mut ranges: Vec<(u32, u32, Cat)> = Vec::new();
        for (pattern, cat) in [
            (r"\p{L}", Cat::Letter),
            (r"\p{N}", Cat::Number),
            (r"\s", Cat::Space),
        ] {
            ranges.extend(class_ranges(pattern).into_iter().map(|(a, b)| (a, b, cat)));
        }
        ranges.sort_unstable_by_key(|r| r.0);
        let mut ascii = [Cat::Other; 128];
        for (c, slot) in ascii.iter_mut().enumerate() {
            *slot = lookup(&ranges, c as u32);
        }
        Classes { ascii, ranges }
    }

    #[inline]
    pub fn of(&self, c: char) -> Cat {
        let u = c as u32;
        if u < 128 {
            self.ascii[u as usize]
        } else {
            lookup(&self.ranges, u)
        }
    }
}

impl Default for Classes {
    fn default() -> Self {
        Self::new()
    }
}

fn lookup(ranges: &[(u32, u32, Cat)], u: u32) -> Cat {
    // The last range starting at or before `u`; the classes are disjoint, so it is the only
    // one that can hold `u`.
    let i = ranges.partition_point(|r| r.0 <= u);
    match i.checked_sub(1).map(|i| ranges[i]) {
        Some((_, end, cat)) if u <= end => cat,
        _ => Cat::Other,
    }
}

/// The characters `(?i:x)` matches for an ASCII letter `x` (Unicode simple case folding, so
/// `(?i:s)` also matches `ſ` U+017F).
pub fn case_insensitive(letter: char) -> Vec<char> {
    class_ranges(&format!("(?i:{letter})"))
        .into_iter()
        .flat_map(|(a, b)| (a..=b).filter_map(char::from_u32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_the_unicode_tables() {
        let c = Classes::new();
        assert_eq!(c.of('a'), Cat::Letter);
        assert_eq!(c.of('é'), Cat::Letter);
        assert_eq!(c.of('中'), Cat::Letter);
        assert_eq!(c.of('7'), Cat::Number);
        assert_eq!(c.of('²'), Cat::Number);
        assert_eq!(c.of('Ⅻ'), Cat::Number);
        assert_eq!(c.of(' '), Cat::Space);
        assert_eq!(c.of('\u{3000}'), Cat::Space);
        assert_eq!(c.of('\u{85}'), Cat::Space);
        assert_eq!(c.of('!'), Cat::Other);
        assert_eq!(c.of('\u{301}'), Cat::Other);
        assert_eq!(c.of('😀'), Cat::Other);
        assert!(case_insensitive('s').contains(&'ſ'));
        assert_eq!(case_insensitive('t'), vec!['T', 't']);
    }
}
