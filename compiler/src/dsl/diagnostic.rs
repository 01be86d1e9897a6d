//! Errors for people (STYLE.md, "ripgrep / cargo"): what went wrong, where
//! (`file:line:column`, with the source line underlined) and what was expected.
use std::fmt;
use std::sync::Arc;

/// A byte range in a model file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Self {
        Span { start, end }
    }
    /// The smallest span covering both.
    pub fn to(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }
}

/// A model file's name and text, shared by the AST and every diagnostic about it.
#[derive(Debug, PartialEq, Eq)]
pub struct Source {
    pub path: String,
    pub text: String,
}

impl Source {
    pub fn new(path: impl Into<String>, text: impl Into<String>) -> Arc<Self> {
        Arc::new(Source {
            path: path.into(),
            text: text.into(),
        })
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = self.text[line_start..offset].chars().count() + 1;
        (line, col)
    }

    fn line_text(&self, line: usize) -> &str {
        self.text.lines().nth(line - 1).unwrap_or("")
    }
}

/// One located error. `Display` renders it the way rustc does:
///
/// ```text
/// error: unknown op `lineer`
///   --> models/llama.qplm:40:7
///    |
/// 40 |   q = lineer(h, q_proj)
///    |       ^^^^^^
///    = expected one of: linear, ...
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic(Box<DiagnosticData>);

/// The parts of a [`Diagnostic`] (boxed so that `Result<_, Diagnostic>` stays small).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagnosticData {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// The whole source line the error is on.
    pub source_line: String,
    /// Underlined characters of `source_line`: start column (1-based) and width.
    pub underline: (usize, usize),
    /// Extra lines: what was expected, what to do.
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn new(source: &Source, span: Span, message: impl Into<String>) -> Self {
        let (line, column) = source.line_col(span.start);
        let source_line = source.line_text(line).to_string();
        let (end_line, end_col) = source.line_col(span.end);
        let line_chars = source_line.chars().count();
        let width = if end_line == line {
            end_col.saturating_sub(column)
        } else {
            (line_chars + 1).saturating_sub(column)
        }
        .max(1);
        Diagnostic(Box::new(DiagnosticData {
            file: source.path.clone(),
            line,
            column,
            message: message.into(),
            source_line,
            underline: (column, width),
            notes: Vec::new(),
        }))
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.0.notes.push(note.into());
        self
    }
}

impl std::ops::Deref for Diagnostic {
    type Target = DiagnosticData;
    fn deref(&self) -> &DiagnosticData {
        &self.0
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let num = self.line.to_string();
        let pad = " ".repeat(num.len());
        writeln!(f, "error: {}", self.message)?;
        writeln!(f, "{pad}--> {}:{}:{}", self.file, self.line, self.column)?;
        writeln!(f, "{pad} |")?;
        writeln!(f, "{num} | {}", self.source_line)?;
        // Tabs keep their width so the caret stays under the span.
        let lead: String = self
            .source_line
            .chars()
            .take(self.underline.0 - 1)
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        write!(f, "{pad} | {lead}{}", "^".repeat(self.underline.1))?;
        for n in &self.notes {
            write!(f, "\n{pad} = {n}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostic {}
