//! The model definition language (DESIGN.md "Model DSL"): one `.qplm` file per architecture
//! family declares the config.json keys it reads, the checkpoint tensors it expects and the
//! forward computation of its pipeline blocks. The language is described in
//! `models/README.md`; this module only parses it (binding is `crate::build`).
mod ast;
mod diagnostic;
mod lexer;
mod parser;

pub use ast::{
    BinOp, Block, ConfigKey, Expr, ExprKind, InputDecl, KwArg, ModelDef, Path, Segment, Stmt, UnOp,
    ValueKind, WeightDecl, WeightKind,
};
pub use diagnostic::{Diagnostic, DiagnosticData, Source, Span};

use std::path::Path as FsPath;

impl ModelDef {
    /// Parses model-file text; `path` names the file in error messages.
    pub fn parse(path: &str, text: &str) -> Result<ModelDef, Diagnostic> {
        parser::parse(path, text)
    }

    /// Reads and parses a model file.
    pub fn from_file(path: &FsPath) -> Result<ModelDef, DslLoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| DslLoadError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok(ModelDef::parse(&path.display().to_string(), &text)?)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DslLoadError {
    #[error("cannot read model definition `{path}`: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(#[from] Diagnostic),
}
