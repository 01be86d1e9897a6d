//! Recursive-descent parser for `.qplm` files (grammar in models/README.md).
use super::ast::*;
use super::diagnostic::{Diagnostic, Source, Span};
use super::lexer::{lex, Tok, Token};
use crate::graph::BlockKind;
use std::sync::Arc;

/// Parses a model file. `path` is only used in error messages.
pub fn parse(path: &str, text: &str) -> Result<ModelDef, Diagnostic> {
    let source = Source::new(path, text);
    let tokens = lex(&source)?;
    let mut p = Parser {
        source: source.clone(),
        tokens,
        pos: 0,
    };
    p.file()
}

struct Parser {
    source: Arc<Source>,
    tokens: Vec<Token>,
    pos: usize,
}

type PResult<T> = Result<T, Diagnostic>;

const BLOCK_KINDS: &[&str] = &["embedding", "decoder", "norm", "head"];

impl Parser {
    fn peek(&self) -> &Tok {
        &self.tokens[self.pos].tok
    }
    fn peek_at(&self, k: usize) -> &Tok {
        &self.tokens[(self.pos + k).min(self.tokens.len() - 1)].tok
    }
    fn span(&self) -> Span {
        self.tokens[self.pos].span
    }
    fn prev_span(&self) -> Span {
        self.tokens[self.pos.saturating_sub(1)].span
    }
    fn bump(&mut self) -> Token {
        let t = self.tokens[self.pos].clone();
        if self.pos + 1 < self.tokens.len() {
            self.pos += 1;
        }
        t
    }
    fn error(&self, span: Span, msg: impl Into<String>) -> Diagnostic {
        Diagnostic::new(&self.source, span, msg)
    }
    /// "expected X, found Y" at the current token.
    fn unexpected(&self, expected: &str) -> Diagnostic {
        self.error(
            self.span(),
            format!("expected {expected}, found {}", self.peek().describe()),
        )
    }
    fn eat(&mut self, t: &Tok) -> bool {
        if self.peek() == t {
            self.bump();
            true
        } else {
            false
        }
    }
    fn expect(&mut self, t: Tok, what: &str) -> PResult<Span> {
        if *self.peek() == t {
            Ok(self.bump().span)
        } else {
            Err(self.unexpected(what))
        }
    }
    fn is_ident(&self, word: &str) -> bool {
        matches!(self.peek(), Tok::Ident(s) if s == word)
    }
    fn ident(&mut self, what: &str) -> PResult<(String, Span)> {
        match self.peek().clone() {
            Tok::Ident(s) if !is_reserved(&s) => Ok((s, self.bump().span)),
            _ => Err(self.unexpected(what)),
        }
    }
    fn skip_newlines(&mut self) {
        while self.eat(&Tok::Newline) {}
    }
    fn end_of_line(&mut self) -> PResult<()> {
        match self.peek() {
            Tok::Newline => {
                self.skip_newlines();
                Ok(())
            }
            Tok::Eof | Tok::RBrace => Ok(()),
            _ => Err(self.unexpected("end of line")),
        }
    }

    fn file(&mut self) -> PResult<ModelDef> {
        let mut def = ModelDef {
            name: String::new(),
            source: self.source.clone(),
            config: Vec::new(),
            weights: Vec::new(),
            inputs: Vec::new(),
            blocks: Vec::new(),
            outputs: Vec::new(),
            outputs_span: Span::default(),
        };
        self.skip_newlines();
        if !self.is_ident("model") {
            return Err(self
                .unexpected("`model <name>` as the first line")
                .note("a model file starts with e.g. `model llama`"));
        }
        self.bump();
        def.name = self.ident("the architecture name")?.0;
        self.end_of_line()?;
        let mut seen_outputs = false;
        loop {
            self.skip_newlines();
            let (word, span) = match self.peek().clone() {
                Tok::Eof => break,
                Tok::Ident(w) => (w, self.span()),
                _ => return Err(self.section_expected()),
            };
            match word.as_str() {
                "config" => {
                    self.bump();
                    self.section(|p| {
                        let k = p.config_key()?;
                        def.config.push(k);
                        Ok(())
                    })?
                }
                "weights" => {
                    self.bump();
                    self.section(|p| {
                        let w = p.weight_decl()?;
                        def.weights.push(w);
                        Ok(())
                    })?
                }
                "inputs" => {
                    self.bump();
                    self.section(|p| {
                        let i = p.input_decl()?;
                        def.inputs.push(i);
                        Ok(())
                    })?
                }
                "block" => {
                    self.bump();
                    let b = self.block()?;
                    def.blocks.push(b);
                }
                "outputs" => {
                    self.bump();
                    def.outputs_span = span;
                    seen_outputs = true;
                    self.expect(Tok::LBrace, "`{`")?;
                    loop {
                        self.skip_newlines();
                        if self.eat(&Tok::RBrace) {
                            break;
                        }
                        def.outputs.push(self.ident("an output name or `}`")?);
                        if !self.eat(&Tok::Comma) && *self.peek() != Tok::Newline {
                            self.expect(Tok::RBrace, "`,` or `}`")?;
                            break;
                        }
                    }
                    self.end_of_line()?
                }
                _ => return Err(self.section_expected()),
            }
        }
        if !seen_outputs {
            return Err(self
                .error(self.span(), "the model file has no `outputs` section")
                .note("expected `outputs { logits, hidden }`"));
        }
        Ok(def)
    }

    fn section_expected(&self) -> Diagnostic {
        self.unexpected("a section").note(
            "expected one of: `config {`, `weights {`, `inputs {`, `block <kind> … {`, `outputs {`",
        )
    }

    /// `{ entry* }` where each entry ends at a newline.
    fn section(&mut self, mut entry: impl FnMut(&mut Self) -> PResult<()>) -> PResult<()> {
        self.expect(Tok::LBrace, "`{`")?;
        self.skip_newlines();
        while !matches!(self.peek(), Tok::RBrace | Tok::Eof) {
            entry(self)?;
            self.end_of_line()?;
        }
        self.expect(Tok::RBrace, "`}`")?;
        self.end_of_line()
    }

    fn config_key(&mut self) -> PResult<ConfigKey> {
        let (name, span) = self.ident("a config.json key name")?;
        self.expect(Tok::Colon, "`:` and a type after the key name")?;
        let ty_span = self.span();
        let kind = match self.peek().clone() {
            Tok::Ident(t) => ValueKind::parse(&t),
            _ => None,
        }
        .ok_or_else(|| {
            self.error(ty_span, format!("unknown type {}", self.peek().describe()))
                .note(format!(
                    "expected one of: {} (add `?` for a key that may be null)",
                    ValueKind::NAMES.join(", ")
                ))
        })?;
        self.bump();
        let optional = self.eat(&Tok::Question);
        let ty_span = ty_span.to(self.prev_span());
        let default = if self.eat(&Tok::Assign) {
            Some(self.expr()?)
        } else {
            None
        };
        Ok(ConfigKey {
            name,
            span,
            kind,
            optional,
            ty_span,
            default,
        })
    }

    /// A dotted path; `{var}` segments are loop variables, numbers are allowed as names.
    fn path(&mut self, what: &str) -> PResult<Path> {
        let start = self.span();
        let mut segments = vec![self.segment(what)?];
        while self.eat(&Tok::Dot) {
            segments.push(self.segment("a path segment after `.`")?);
        }
        Ok(Path {
            segments,
            span: start.to(self.prev_span()),
        })
    }

    fn segment(&mut self, what: &str) -> PResult<Segment> {
        match self.peek().clone() {
            Tok::Ident(s) => {
                self.bump();
                Ok(Segment::Name(s))
            }
            Tok::Int(i) => {
                self.bump();
                Ok(Segment::Name(i.to_string()))
            }
            Tok::LBrace => {
                self.bump();
                let (v, _) = self.ident("a loop variable name inside `{ }`")?;
                self.expect(Tok::RBrace, "`}` closing the loop variable")?;
                Ok(Segment::Var(v))
            }
            _ => Err(self.unexpected(what)),
        }
    }

    fn weight_decl(&mut self) -> PResult<WeightDecl> {
        let name = self.path("a tensor name such as `model.norm.weight`")?;
        let kind = if self.eat(&Tok::Colon) {
            WeightKind::Tensor(self.dims()?)
        } else if self.eat(&Tok::Assign) {
            WeightKind::Alias(self.path("the name of the tensor it is tied to")?)
        } else {
            return Err(self
                .unexpected("`:` and a shape, or `=` and a tied tensor name")
                .note("e.g. `model.norm.weight: [hidden_size]`"));
        };
        let cond = if self.is_ident("if") {
            self.bump();
            Some(self.expr()?)
        } else {
            None
        };
        Ok(WeightDecl {
            span: name.span.to(self.prev_span()),
            name,
            kind,
            cond,
        })
    }

    /// `[e, e, …]`
    fn dims(&mut self) -> PResult<Vec<Expr>> {
        self.expect(Tok::LBracket, "`[` starting a shape")?;
        let mut dims = Vec::new();
        while !self.eat(&Tok::RBracket) {
            dims.push(self.expr()?);
            if !self.eat(&Tok::Comma) {
                self.expect(Tok::RBracket, "`,` or `]`")?;
                break;
            }
        }
        Ok(dims)
    }

    fn input_decl(&mut self) -> PResult<InputDecl> {
        let (name, span) = self.ident("an input name")?;
        self.expect(Tok::Colon, "`:` and a type such as `i32[seq_len]`")?;
        let (dtype, dtype_span) = self.ident("an element type such as `i32`")?;
        let shape = self.dims()?;
        Ok(InputDecl {
            name,
            span,
            dtype,
            dtype_span,
            shape,
        })
    }

    fn block(&mut self) -> PResult<Block> {
        let kind_span = self.span();
        let kind = match self.peek() {
            Tok::Ident(k) => match k.as_str() {
                "embedding" => Some(BlockKind::Embedding),
                "decoder" => Some(BlockKind::Decoder),
                "norm" => Some(BlockKind::Norm),
                "head" => Some(BlockKind::Head),
                _ => None,
            },
            _ => None,
        }
        .ok_or_else(|| {
            self.unexpected("a block kind")
                .note(format!("expected one of: {}", BLOCK_KINDS.join(", ")))
        })?;
        self.bump();
        let module = if matches!(self.peek(), Tok::Ident(w) if w != "repeat") {
            Some(self.path("a module path")?)
        } else {
            None
        };
        let repeat = if self.is_ident("repeat") {
            self.bump();
            Some(self.expr()?)
        } else {
            None
        };
        let body = self.stmts()?;
        self.end_of_line()?;
        Ok(Block {
            kind,
            kind_span,
            module,
            repeat,
            body,
        })
    }

    /// `{ stmt* }`
    fn stmts(&mut self) -> PResult<Vec<Stmt>> {
        self.expect(Tok::LBrace, "`{`")?;
        self.skip_newlines();
        let mut out = Vec::new();
        while !matches!(self.peek(), Tok::RBrace | Tok::Eof) {
            out.push(self.stmt()?);
            self.end_of_line()?;
        }
        self.expect(Tok::RBrace, "`}`")?;
        Ok(out)
    }

    fn stmt(&mut self) -> PResult<Stmt> {
        if self.is_ident("if") {
            return self.if_stmt();
        }
        if self.is_ident("module") && *self.peek_at(1) != Tok::Assign {
            self.bump();
            let path = self.path("a module name such as `self_attn`")?;
            let body = self.stmts()?;
            return Ok(Stmt::Module { path, body });
        }
        let (name, span) = self.ident("a statement (`name = …`, `if …`, `module …`)")?;
        self.expect(Tok::Assign, "`=`")?;
        let value = self.expr()?;
        Ok(Stmt::Assign { name, span, value })
    }

    fn if_stmt(&mut self) -> PResult<Stmt> {
        self.bump(); // if
        let cond = self.expr()?;
        let then = self.stmts()?;
        let els = if self.is_ident("else") {
            self.bump();
            if self.is_ident("if") {
                vec![self.if_stmt()?]
            } else {
                self.stmts()?
            }
        } else {
            Vec::new()
        };
        Ok(Stmt::If { cond, then, els })
    }

    // Expressions, lowest precedence first:
    // cond-expr (`a if c else b`) < `??` < or < and < not < comparisons < + - < * / // % < unary - < ** < postfix
    pub fn expr(&mut self) -> PResult<Expr> {
        let then = self.coalesce()?;
        if self.is_ident("if") && !matches!(self.peek_at(1), Tok::Newline) {
            self.bump();
            let cond = self.coalesce()?;
            if !self.is_ident("else") {
                return Err(self
                    .unexpected("`else`")
                    .note("a conditional expression is `a if condition else b`"));
            }
            self.bump();
            let els = self.expr()?;
            let span = then.span.to(els.span);
            return Ok(Expr {
                kind: ExprKind::Cond {
                    then: Box::new(then),
                    cond: Box::new(cond),
                    els: Box::new(els),
                },
                span,
            });
        }
        Ok(then)
    }

    fn binary(l: Expr, op: BinOp, r: Expr) -> Expr {
        let span = l.span.to(r.span);
        Expr {
            kind: ExprKind::Binary(op, Box::new(l), Box::new(r)),
            span,
        }
    }

    fn coalesce(&mut self) -> PResult<Expr> {
        let mut l = self.or()?;
        while self.eat(&Tok::Coalesce) {
            let r = self.or()?;
            l = Self::binary(l, BinOp::Coalesce, r);
        }
        Ok(l)
    }

    fn or(&mut self) -> PResult<Expr> {
        let mut l = self.and()?;
        while self.is_ident("or") {
            self.bump();
            let r = self.and()?;
            l = Self::binary(l, BinOp::Or, r);
        }
        Ok(l)
    }

    fn and(&mut self) -> PResult<Expr> {
        let mut l = self.not()?;
        while self.is_ident("and") {
            self.bump();
            let r = self.not()?;
            l = Self::binary(l, BinOp::And, r);
        }
        Ok(l)
    }

    fn not(&mut self) -> PResult<Expr> {
        if self.is_ident("not") {
            let start = self.bump().span;
            let e = self.not()?;
            let span = start.to(e.span);
            return Ok(Expr {
                kind: ExprKind::Unary(UnOp::Not, Box::new(e)),
                span,
            });
        }
        self.comparison()
    }

    fn comparison(&mut self) -> PResult<Expr> {
        let l = self.additive()?;
        let op = match self.peek() {
            Tok::Eq => BinOp::Eq,
            Tok::Ne => BinOp::Ne,
            Tok::Lt => BinOp::Lt,
            Tok::Le => BinOp::Le,
            Tok::Gt => BinOp::Gt,
            Tok::Ge => BinOp::Ge,
            _ => return Ok(l),
        };
        self.bump();
        let r = self.additive()?;
        Ok(Self::binary(l, op, r))
    }

    fn additive(&mut self) -> PResult<Expr> {
        let mut l = self.multiplicative()?;
        loop {
            let op = match self.peek() {
                Tok::Plus => BinOp::Add,
                Tok::Minus => BinOp::Sub,
                _ => return Ok(l),
            };
            self.bump();
            let r = self.multiplicative()?;
            l = Self::binary(l, op, r);
        }
    }

    fn multiplicative(&mut self) -> PResult<Expr> {
        let mut l = self.unary()?;
        loop {
            let op = match self.peek() {
                Tok::Star => BinOp::Mul,
                Tok::Slash => BinOp::Div,
                Tok::FloorDiv => BinOp::FloorDiv,
                Tok::Percent => BinOp::Rem,
                _ => return Ok(l),
            };
            self.bump();
            let r = self.unary()?;
            l = Self::binary(l, op, r);
        }
    }

    fn unary(&mut self) -> PResult<Expr> {
        if *self.peek() == Tok::Minus {
            let start = self.bump().span;
            let e = self.unary()?;
            let span = start.to(e.span);
            return Ok(Expr {
                kind: ExprKind::Unary(UnOp::Neg, Box::new(e)),
                span,
            });
        }
        self.power()
    }

    fn power(&mut self) -> PResult<Expr> {
        let base = self.postfix()?;
        if self.eat(&Tok::Pow) {
            // Right-associative and binding tighter than unary minus on its left, as in Python.
            let exp = self.unary()?;
            return Ok(Self::binary(base, BinOp::Pow, exp));
        }
        Ok(base)
    }

    fn postfix(&mut self) -> PResult<Expr> {
        let mut e = self.atom()?;
        loop {
            match self.peek() {
                Tok::Dot => {
                    self.bump();
                    let (field, fspan) = match self.peek().clone() {
                        Tok::Ident(s) => (s, self.bump().span),
                        Tok::Int(i) => (i.to_string(), self.bump().span),
                        _ => return Err(self.unexpected("a field or module name after `.`")),
                    };
                    let span = e.span.to(fspan);
                    e = Expr {
                        kind: ExprKind::Field(Box::new(e), field),
                        span,
                    };
                }
                Tok::LBracket => {
                    self.bump();
                    let idx = self.expr()?;
                    let end = self.expect(Tok::RBracket, "`]`")?;
                    let span = e.span.to(end);
                    e = Expr {
                        kind: ExprKind::Index(Box::new(e), Box::new(idx)),
                        span,
                    };
                }
                _ => return Ok(e),
            }
        }
    }

    fn atom(&mut self) -> PResult<Expr> {
        let span = self.span();
        let kind = match self.peek().clone() {
            Tok::Int(i) => {
                self.bump();
                ExprKind::Int(i)
            }
            Tok::Float(x) => {
                self.bump();
                ExprKind::Float(x)
            }
            Tok::Str(s) => {
                self.bump();
                ExprKind::Str(s)
            }
            Tok::LParen => {
                self.bump();
                let mut e = self.expr()?;
                let end = self.expect(Tok::RParen, "`)`")?;
                e.span = span.to(end);
                return Ok(e);
            }
            Tok::LBracket => {
                let items = self.dims()?;
                return Ok(Expr {
                    kind: ExprKind::List(items),
                    span: span.to(self.prev_span()),
                });
            }
            Tok::Ident(w) => match w.as_str() {
                "true" => {
                    self.bump();
                    ExprKind::Bool(true)
                }
                "false" => {
                    self.bump();
                    ExprKind::Bool(false)
                }
                "null" => {
                    self.bump();
                    ExprKind::Null
                }
                w if is_reserved(w) => return Err(self.unexpected("an expression")),
                _ => {
                    self.bump();
                    if *self.peek() == Tok::LParen {
                        return self.call(w, span);
                    }
                    ExprKind::Var(w)
                }
            },
            _ => return Err(self.unexpected("an expression")),
        };
        Ok(Expr { kind, span })
    }

    /// `name(arg, …, key=value, …)`; positional arguments come first.
    fn call(&mut self, name: String, name_span: Span) -> PResult<Expr> {
        let open = self.bump().span; // (
        let mut args = Vec::new();
        let mut kwargs: Vec<KwArg> = Vec::new();
        while *self.peek() != Tok::RParen {
            if let (Tok::Ident(k), Tok::Assign) = (self.peek().clone(), self.peek_at(1)) {
                let kspan = self.bump().span;
                self.bump();
                let value = self.expr()?;
                if kwargs.iter().any(|a| a.name == k) {
                    return Err(self.error(kspan, format!("argument `{k}` given twice")));
                }
                kwargs.push(KwArg {
                    name: k,
                    span: kspan,
                    value,
                });
            } else {
                let e = self.expr()?;
                if !kwargs.is_empty() {
                    return Err(self
                        .error(e.span, "positional argument after a named one")
                        .note("put positional arguments first: `f(x, y, key=value)`"));
                }
                args.push(e);
            }
            if !self.eat(&Tok::Comma) {
                break;
            }
        }
        if matches!(self.peek(), Tok::RBrace | Tok::Eof) {
            // Newlines inside `( )` are not statement ends, so a missing `)` is only
            // noticed lines later: point at the parenthesis that is left open.
            let (line, _) = self.source.line_col(self.span().start);
            return Err(self.error(open, "this `(` is never closed").note(format!(
                "expected `,` or `)` before {} on line {line}",
                self.peek().describe()
            )));
        }
        let end = self.expect(Tok::RParen, "`,` or `)`")?;
        Ok(Expr {
            kind: ExprKind::Call {
                name,
                name_span,
                args,
                kwargs,
            },
            span: name_span.to(end),
        })
    }
}

fn is_reserved(w: &str) -> bool {
    matches!(
        w,
        "if" | "else" | "and" | "or" | "not" | "true" | "false" | "null"
    )
}
