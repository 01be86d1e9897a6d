//! Tokens of the model language. Newlines end statements, except inside `( )` and `[ ]`
//! so that long calls and shapes can be wrapped; `#` starts a comment.
use super::diagnostic::{Diagnostic, Source, Span};

#[derive(Clone, Debug, PartialEq)]
pub enum Tok {
    Ident(String),
    Int(i64),
    Float(f64),
    Str(String),
    Newline,
    LBrace,
    RBrace,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Colon,
    Dot,
    Question,
    /// `??`: null coalescing.
    Coalesce,
    Assign,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Plus,
    Minus,
    Star,
    /// `**`
    Pow,
    Slash,
    /// `//`: integer (floor) division, as in Python.
    FloorDiv,
    Percent,
    Eof,
}

impl Tok {
    /// How the token is named in "expected …, found …" messages.
    pub fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("`{s}`"),
            Tok::Int(i) => format!("number `{i}`"),
            Tok::Float(x) => format!("number `{x}`"),
            Tok::Str(s) => format!("string \"{s}\""),
            Tok::Newline => "end of line".into(),
            Tok::Eof => "end of file".into(),
            other => format!("`{}`", other.symbol()),
        }
    }

    fn symbol(&self) -> &'static str {
        match self {
            Tok::LBrace => "{",
            Tok::RBrace => "}",
            Tok::LParen => "(",
            Tok::RParen => ")",
            Tok::LBracket => "[",
            Tok::RBracket => "]",
            Tok::Comma => ",",
            Tok::Colon => ":",
            Tok::Dot => ".",
            Tok::Question => "?",
            Tok::Coalesce => "??",
            Tok::Assign => "=",
            Tok::Eq => "==",
            Tok::Ne => "!=",
            Tok::Lt => "<",
            Tok::Le => "<=",
            Tok::Gt => ">",
            Tok::Ge => ">=",
            Tok::Plus => "+",
            Tok::Minus => "-",
            Tok::Star => "*",
            Tok::Pow => "**",
            Tok::Slash => "/",
            Tok::FloorDiv => "//",
            Tok::Percent => "%",
            _ => "",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    pub tok: Tok,
    pub span: Span,
}

pub fn lex(source: &Source) -> Result<Vec<Token>, Diagnostic> {
    let text = source.text.as_bytes();
    let mut out: Vec<Token> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < text.len() {
        let c = text[i];
        let start = i;
        let push = |out: &mut Vec<Token>, tok: Tok, end: usize| {
            out.push(Token {
                tok,
                span: Span::new(start, end),
            })
        };
        match c {
            b' ' | b'\t' | b'\r' => i += 1,
            b'#' => {
                while i < text.len() && text[i] != b'\n' {
                    i += 1;
                }
            }
            b'\n' => {
                i += 1;
                if depth == 0
                    && !matches!(
                        out.last(),
                        Some(Token {
                            tok: Tok::Newline,
                            ..
                        })
                    )
                {
                    push(&mut out, Tok::Newline, i);
                }
            }
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                while i < text.len() && (text[i].is_ascii_alphanumeric() || text[i] == b'_') {
                    i += 1;
                }
                push(&mut out, Tok::Ident(source.text[start..i].to_string()), i);
            }
            b'0'..=b'9' => {
                let (tok, end) = lex_number(source, start)?;
                i = end;
                push(&mut out, tok, i);
            }
            b'"' => {
                i += 1;
                while i < text.len() && text[i] != b'"' && text[i] != b'\n' {
                    i += 1;
                }
                if i >= text.len() || text[i] != b'"' {
                    return Err(Diagnostic::new(
                        source,
                        Span::new(start, i),
                        "unterminated string",
                    )
                    .note("expected a closing `\"` on the same line"));
                }
                i += 1;
                push(
                    &mut out,
                    Tok::Str(source.text[start + 1..i - 1].to_string()),
                    i,
                );
            }
            _ => {
                let next = text.get(i + 1).copied();
                let (tok, len) = match (c, next) {
                    (b'?', Some(b'?')) => (Tok::Coalesce, 2),
                    (b'=', Some(b'=')) => (Tok::Eq, 2),
                    (b'!', Some(b'=')) => (Tok::Ne, 2),
                    (b'<', Some(b'=')) => (Tok::Le, 2),
                    (b'>', Some(b'=')) => (Tok::Ge, 2),
                    (b'*', Some(b'*')) => (Tok::Pow, 2),
                    (b'/', Some(b'/')) => (Tok::FloorDiv, 2),
                    (b'{', _) => (Tok::LBrace, 1),
                    (b'}', _) => (Tok::RBrace, 1),
                    (b'(', _) => (Tok::LParen, 1),
                    (b')', _) => (Tok::RParen, 1),
                    (b'[', _) => (Tok::LBracket, 1),
                    (b']', _) => (Tok::RBracket, 1),
                    (b',', _) => (Tok::Comma, 1),
                    (b':', _) => (Tok::Colon, 1),
                    (b'.', _) => (Tok::Dot, 1),
                    (b'?', _) => (Tok::Question, 1),
                    (b'=', _) => (Tok::Assign, 1),
                    (b'<', _) => (Tok::Lt, 1),
                    (b'>', _) => (Tok::Gt, 1),
                    (b'+', _) => (Tok::Plus, 1),
                    (b'-', _) => (Tok::Minus, 1),
                    (b'*', _) => (Tok::Star, 1),
                    (b'/', _) => (Tok::Slash, 1),
                    (b'%', _) => (Tok::Percent, 1),
                    _ => {
                        let ch = source.text[start..].chars().next().unwrap_or('?');
                        return Err(Diagnostic::new(
                            source,
                            Span::new(start, start + ch.len_utf8()),
                            format!("unexpected character `{ch}`"),
                        ));
                    }
                };
                match tok {
                    Tok::LParen | Tok::LBracket => depth += 1,
                    Tok::RParen | Tok::RBracket => depth = depth.saturating_sub(1),
                    _ => {}
                }
                i += len;
                push(&mut out, tok, i);
            }
        }
    }
    if !matches!(
        out.last(),
        Some(Token {
            tok: Tok::Newline,
            ..
        }) | None
    ) {
        out.push(Token {
            tok: Tok::Newline,
            span: Span::new(text.len(), text.len()),
        });
    }
    out.push(Token {
        tok: Tok::Eof,
        span: Span::new(text.len(), text.len()),
    });
    Ok(out)
}

/// Integers, decimals and exponents (`1e-6`, `1.0e4`). A `.` followed by a non-digit is
/// left alone so that paths like `layers.0.mlp` still lex.
fn lex_number(source: &Source, start: usize) -> Result<(Tok, usize), Diagnostic> {
    let t = source.text.as_bytes();
    let mut i = start;
    let digits = |mut i: usize| {
        while i < t.len() && (t[i].is_ascii_digit() || t[i] == b'_') {
            i += 1;
        }
        i
    };
    i = digits(i);
    let mut float = false;
    if i + 1 < t.len() && t[i] == b'.' && t[i + 1].is_ascii_digit() {
        float = true;
        i = digits(i + 1);
    }
    if i < t.len() && (t[i] == b'e' || t[i] == b'E') {
        let mut j = i + 1;
        if j < t.len() && (t[j] == b'+' || t[j] == b'-') {
            j += 1;
        }
        if j < t.len() && t[j].is_ascii_digit() {
            float = true;
            i = digits(j);
        }
    }
    let s: String = source.text[start..i]
        .chars()
        .filter(|&c| c != '_')
        .collect();
    let bad = || {
        Diagnostic::new(
            source,
            Span::new(start, i),
            format!("invalid number `{}`", &source.text[start..i]),
        )
    };
    let tok = if float {
        Tok::Float(s.parse().map_err(|_| bad())?)
    } else {
        Tok::Int(s.parse().map_err(|_| bad())?)
    };
    Ok((tok, i))
}
