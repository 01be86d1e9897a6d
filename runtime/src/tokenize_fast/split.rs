//! Hand-written equivalents of the two byte-level pre-tokeniser regexes, matched the way the
//! regex engine does (leftmost-first alternation, greedy with backtracking), one piece at a
//! time. Every character belongs to some alternative, so the pieces tile the text.
use super::classes::{case_insensitive, Cat, Classes};

/// GPT-2's pattern: HF `ByteLevel { use_regex: true }` uses it verbatim.
pub const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama-3's `Split` pattern (also used by many tokenizers derived from it).
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    Gpt2,
    Llama3,
}

pub struct Splitter {
    pattern: Pattern,
    classes: Classes,
    /// For the case-insensitive contractions of Llama-3: the characters matching each of
    /// s, t, m, d, r, e, v, l.
    fold: [Vec<char>; 8],
}

const FOLD_LETTERS: [char; 8] = ['s', 't', 'm', 'd', 'r', 'e', 'v', 'l'];

impl Splitter {
    pub fn new(pattern: Pattern) -> Splitter {
        Splitter {
            pattern,
            classes: Classes::new(),
            fold: FOLD_LETTERS.map(case_insensitive),
        }
    }

    /// Calls `piece` with every piece of `text`, in order.
    pub fn split<'t>(&self, text: &'t str, mut piece: impl FnMut(&'t str)) {
        let mut pos = 0;
        while pos < text.len() {
            let end = match self.pattern {
                Pattern::Gpt2 => self.gpt2_at(text, pos),
                Pattern::Llama3 => self.llama3_at(text, pos),
            };
            debug_assert!(end > pos);
            piece(&text[pos..end]);
            pos = end;
        }
    }

    #[inline]
    fn cat(&self, c: char) -> Cat {
        self.classes.of(c)
    }

    /// `'s|'t|'re|'ve|'m|'ll|'d` at `pos` (which holds `'`), with `is(letter, c)` deciding
    /// whether `c` matches a pattern letter; the end of the match.
    fn contraction(
        &self,
        text: &str,
        pos: usize,
        is: impl Fn(usize, char) -> bool,
    ) -> Option<usize> {
        let p1 = pos + 1;
        let c1 = char_at(text, p1)?;
        // s t m d
        if (0..4).any(|k| is(k, c1)) {
            return Some(p1 + c1.len_utf8());
        }
        let p2 = p1 + c1.len_utf8();
        let c2 = char_at(text, p2)?;
        // re ve ll
        let two = (is(4, c1) && is(5, c2)) || (is(6, c1) && is(5, c2)) || (is(7, c1) && is(7, c2));
        two.then_some(p2 + c2.len_utf8())
    }

    fn run(&self, text: &str, mut pos: usize, cat: Cat, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            match char_at(text, pos) {
                Some(c) if self.cat(c) == cat => {
                    pos += c.len_utf8();
                    n += 1;
                }
                _ => break,
            }
        }
        pos
    }

    /// `\s+(?!\S)|\s+` at `pos` (which holds white space).
    fn trailing_space(&self, text: &str, pos: usize) -> usize {
        let end = self.run(text, pos, Cat::Space, usize::MAX);
        if end == text.len() {
            return end;
        }
        // Backtrack one character so the next piece can start with it (` word`), unless
        // that leaves nothing, when `\s+` takes the one character.
        let last = text[..end].chars().next_back().expect("non-empty run");
        let shorter = end - last.len_utf8();
        if shorter > pos {
            shorter
        } else {
            end
        }
    }

    fn gpt2_at(&self, text: &str, pos: usize) -> usize {
        let c0 = char_at(text, pos).expect("pos inside text");
        if c0 == '\'' {
            const LOWER: [char; 8] = FOLD_LETTERS;
            if let Some(end) = self.contraction(text, pos, |k, c| c == LOWER[k]) {
                return end;
            }
        }
        let k0 = self.cat(c0);
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
        let (start, cat) = if c0 == ' ' {
            match char_at(text, pos + 1).map(|c| self.cat(c)) {
                Some(k) if k != Cat::Space => (pos + 1, k),
                _ => (pos, Cat::Space),
            }
        } else {
            (pos, k0)
        };
        if cat != Cat::Space {
            return self.run(text, start, cat, usize::MAX);
        }
        self.trailing_space(text, pos)
    }

    fn llama3_at(&self, text: &str, pos: usize) -> usize {
        let c0 = char_at(text, pos).expect("pos inside text");
        if c0 == '\'' {
            let fold = &self.fold;
            if let Some(end) = self.contraction(text, pos, |k, c| fold[k].contains(&c)) {
                return end;
            }
        }
        let k0 = self.cat(c0);
        let l0 = c0.len_utf8();
        // `[^\r\n\p{L}\p{N}]?\p{L}+`
        if k0 == Cat::Letter {
            return self.run(text, pos, Cat::Letter, usize::MAX);
        }
        let c1 = char_at(text, pos + l0);
        let k1 = c1.map(|c| self.cat(c));
        if k0 != Cat::Number && c0 != '\r' && c0 != '\n' && k1 == Some(Cat::Letter) {
            return self.run(text, pos + l0, Cat::Letter, usize::MAX);
        }
        // `\p{N}{1,3}`
        if k0 == Cat::Number {
            return self.run(text, pos, Cat::Number, 3);
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        let others = if k0 == Cat::Other {
            Some(pos)
        } else if c0 == ' ' && k1 == Some(Cat::Other) {
            Some(pos + 1)
        } else {
            None
        };
        if let Some(start) = others {
            let mut end = self.run(text, start, Cat::Other, usize::MAX);
            let bytes = text.as_bytes();
            while end < bytes.len() && (bytes[end] == b'\r' || bytes[end] == b'\n') {
                end += 1;
            }
            return end;
        }
        // `\s*[\r\n]+`: white space through its last line break.
        let end = self.run(text, pos, Cat::Space, usize::MAX);
        if let Some(i) = text.as_bytes()[pos..end]
            .iter()
            .rposition(|&b| b == b'\r' || b == b'\n')
        {
            return pos + i + 1;
        }
        self.trailing_space(text, pos)
    }
}

#[inline]
fn char_at(text: &str, pos: usize) -> Option<char> {
    text.get(pos..)?.chars().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(p: Pattern, text: &str) -> Vec<&str> {
        let s = Splitter::new(p);
        let mut out = vec![];
        s.split(text, |x| out.push(x));
        out
    }

    #[test]
    fn gpt2_pieces() {
        assert_eq!(
            pieces(Pattern::Gpt2, "Hello world's  end!!\n\n x 123"),
            ["Hello", " world", "'s", " ", " end", "!!", "\n\n", " x", " 123"]
        );
    }

    #[test]
    fn llama3_pieces() {
        assert_eq!(
            pieces(Pattern::Llama3, "Hello WORLD'S  end!!\n\n x 12345\t\tok  "),
            [
                "Hello", " WORLD", "'S", " ", " end", "!!\n\n", " x", " ", "123", "45", "\t",
                "\tok", "  "
            ]
        );
    }
}
