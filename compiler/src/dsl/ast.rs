//! The parsed form of a `.qplm` file. Every node keeps its span so that the builder's
//! binding errors can point into the file as precisely as the parser's.
use super::diagnostic::{Source, Span};
use crate::graph::BlockKind;
use std::sync::Arc;

/// One architecture family, as written in its model file.
#[derive(Clone, Debug)]
pub struct ModelDef {
    /// The name after `model` (e.g. `llama`).
    pub name: String,
    pub source: Arc<Source>,
    pub config: Vec<ConfigKey>,
    pub weights: Vec<WeightDecl>,
    pub inputs: Vec<InputDecl>,
    pub blocks: Vec<Block>,
    pub outputs: Vec<(String, Span)>,
    /// Span of the `outputs` keyword (for "missing output" errors).
    pub outputs_span: Span,
}

/// Value types of config.json keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    Int,
    Float,
    Bool,
    Str,
    Dict,
    List,
}

impl ValueKind {
    pub const NAMES: &'static [&'static str] = &["int", "float", "bool", "str", "dict", "list"];

    pub fn parse(s: &str) -> Option<ValueKind> {
        Some(match s {
            "int" => ValueKind::Int,
            "float" => ValueKind::Float,
            "bool" => ValueKind::Bool,
            "str" => ValueKind::Str,
            "dict" => ValueKind::Dict,
            "list" => ValueKind::List,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ValueKind::Int => "int",
            ValueKind::Float => "float",
            ValueKind::Bool => "bool",
            ValueKind::Str => "str",
            ValueKind::Dict => "dict",
            ValueKind::List => "list",
        }
    }
}

/// `name: type[?] [= default]` in the `config` section.
#[derive(Clone, Debug)]
pub struct ConfigKey {
    pub name: String,
    pub span: Span,
    pub kind: ValueKind,
    /// `int?`: the key may be null or absent (and then is `null` unless a default is given).
    pub optional: bool,
    pub ty_span: Span,
    pub default: Option<Expr>,
}

/// One segment of a dotted module/tensor path.
#[derive(Clone, Debug, PartialEq)]
pub enum Segment {
    Name(String),
    /// `{i}`: the value of a loop variable (the decoder layer index).
    Var(String),
}

/// A dotted path such as `model.layers.{i}.self_attn.q_proj.weight`.
#[derive(Clone, Debug, PartialEq)]
pub struct Path {
    pub segments: Vec<Segment>,
    pub span: Span,
}

impl Path {
    /// The loop variables the path mentions.
    pub fn vars(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Var(v) => Some(v.as_str()),
            Segment::Name(_) => None,
        })
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, s) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            match s {
                Segment::Name(n) => f.write_str(n)?,
                Segment::Var(v) => write!(f, "{{{v}}}")?,
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub enum WeightKind {
    /// `name: [dims]` — a checkpoint tensor.
    Tensor(Vec<Expr>),
    /// `name = other` — the same tensor as `other` (tied embeddings).
    Alias(Path),
}

/// One line of the `weights` section: `path: [dims] [if cond]` or `path = path [if cond]`.
#[derive(Clone, Debug)]
pub struct WeightDecl {
    pub name: Path,
    pub kind: WeightKind,
    pub cond: Option<Expr>,
    pub span: Span,
}

/// `name: dtype[dims]` in the `inputs` section.
#[derive(Clone, Debug)]
pub struct InputDecl {
    pub name: String,
    pub span: Span,
    pub dtype: String,
    pub dtype_span: Span,
    pub shape: Vec<Expr>,
}

/// `block <kind> [module path] [repeat <count>] { … }`.
#[derive(Clone, Debug)]
pub struct Block {
    pub kind: BlockKind,
    pub kind_span: Span,
    pub module: Option<Path>,
    pub repeat: Option<Expr>,
    pub body: Vec<Stmt>,
}

#[derive(Clone, Debug)]
pub enum Stmt {
    /// `name = expr` (a name may be rebound, e.g. the residual stream `x`).
    Assign {
        name: String,
        span: Span,
        value: Expr,
    },
    If {
        cond: Expr,
        then: Vec<Stmt>,
        els: Vec<Stmt>,
    },
    /// `module self_attn { … }`: nodes inside get the nested module name, and module
    /// arguments (`q_proj`) are relative to it.
    Module { path: Path, body: Vec<Stmt> },
}

#[derive(Clone, Debug)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    FloorDiv,
    Rem,
    Pow,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
    Coalesce,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::FloorDiv => "//",
            BinOp::Rem => "%",
            BinOp::Pow => "**",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "and",
            BinOp::Or => "or",
            BinOp::Coalesce => "??",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

#[derive(Clone, Debug)]
pub struct KwArg {
    pub name: String,
    pub span: Span,
    pub value: Expr,
}

#[derive(Clone, Debug)]
pub enum ExprKind {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Expr>),
    Var(String),
    /// `a.b`: a dict field (config dicts) or, as an op argument, a module path.
    Field(Box<Expr>, String),
    /// `a[b]`: a list element.
    Index(Box<Expr>, Box<Expr>),
    Call {
        name: String,
        name_span: Span,
        args: Vec<Expr>,
        kwargs: Vec<KwArg>,
    },
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `then if cond else els` (Python order).
    Cond {
        then: Box<Expr>,
        cond: Box<Expr>,
        els: Box<Expr>,
    },
}
