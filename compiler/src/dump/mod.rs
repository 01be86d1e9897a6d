//! Graph dumps for people and golden tests: a line-per-node text form, JSON, Graphviz DOT
//! (the full graph, or one box per pipeline layer) and SVG rendered by Graphviz.
//! `qplc compile --dump-after PASS --format dot|svg|json|text` prints these.
mod collapsed;
mod dot;
mod json;
mod svg;
mod text;

pub use collapsed::{collapse, CollapsedBox, CollapsedEdge, CollapsedGraph};
pub use dot::{to_dot, to_dot_collapsed};
pub use json::{to_json, to_json_collapsed};
pub use svg::dot_to_svg;
pub use text::{to_text, to_text_collapsed};

use crate::graph::{Graph, NodeId};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error(
        "SVG output needs Graphviz's `dot` program, which was not found on PATH; install \
         Graphviz (`apt-get install graphviz`, `brew install graphviz`) or use `--format dot`"
    )]
    GraphvizMissing,
    #[error("Graphviz `dot -Tsvg` failed: {0}")]
    Graphviz(String),
    #[error("unknown dump format `{0}`; accepted: text, json, dot, svg")]
    UnknownFormat(String),
    #[error("unknown dump view `{0}`; accepted: full, collapsed")]
    UnknownView(String),
    #[error("cannot serialise the dump: {0}")]
    Json(#[from] serde_json::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DumpFormat {
    Text,
    Json,
    Dot,
    Svg,
}

impl DumpFormat {
    /// File extension for a dump in this format.
    pub fn extension(self) -> &'static str {
        match self {
            DumpFormat::Text => "txt",
            DumpFormat::Json => "json",
            DumpFormat::Dot => "dot",
            DumpFormat::Svg => "svg",
        }
    }
}

impl FromStr for DumpFormat {
    type Err = DumpError;
    fn from_str(s: &str) -> Result<Self, DumpError> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "text" | "txt" => DumpFormat::Text,
            "json" => DumpFormat::Json,
            "dot" => DumpFormat::Dot,
            "svg" => DumpFormat::Svg,
            _ => return Err(DumpError::UnknownFormat(s.to_string())),
        })
    }
}

impl fmt::Display for DumpFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DumpFormat::Text => "text",
            DumpFormat::Json => "json",
            DumpFormat::Dot => "dot",
            DumpFormat::Svg => "svg",
        })
    }
}

/// Every node (`Full`) or one box per pipeline layer of spec §5.3 (`Collapsed`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DumpView {
    #[default]
    Full,
    Collapsed,
}

impl FromStr for DumpView {
    type Err = DumpError;
    fn from_str(s: &str) -> Result<Self, DumpError> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "full" => DumpView::Full,
            "collapsed" | "layers" => DumpView::Collapsed,
            _ => return Err(DumpError::UnknownView(s.to_string())),
        })
    }
}

/// Renders a graph in one format and view.
pub fn render(graph: &Graph, format: DumpFormat, view: DumpView) -> Result<String, DumpError> {
    Ok(match (format, view) {
        (DumpFormat::Text, DumpView::Full) => to_text(graph),
        (DumpFormat::Text, DumpView::Collapsed) => to_text_collapsed(graph),
        (DumpFormat::Json, DumpView::Full) => serde_json::to_string_pretty(&to_json(graph))?,
        (DumpFormat::Json, DumpView::Collapsed) => {
            serde_json::to_string_pretty(&to_json_collapsed(graph))?
        }
        (DumpFormat::Dot, DumpView::Full) => to_dot(graph),
        (DumpFormat::Dot, DumpView::Collapsed) => to_dot_collapsed(graph),
        (DumpFormat::Svg, DumpView::Full) => dot_to_svg(&to_dot(graph))?,
        (DumpFormat::Svg, DumpView::Collapsed) => dot_to_svg(&to_dot_collapsed(graph))?,
    })
}

/// FLOPs of one node (its op applied to its operands' types).
pub fn node_flops(graph: &Graph, id: NodeId) -> u64 {
    let tys: Vec<_> = graph
        .operands(id)
        .iter()
        .map(|&o| graph.node(o).ty.clone())
        .collect();
    let n = graph.node(id);
    n.op.flops(&tys, &n.ty)
}

/// `%12`: how dumps name a node (its stable index).
pub fn value_name(id: NodeId) -> String {
    format!("%{}", id.index())
}

/// Counts with SI suffixes for labels: `950`, `12.6K`, `7.24M`, `1.30G`, `3.10T`.
pub fn format_count(n: u64) -> String {
    const UNITS: [(f64, &str); 4] = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")];
    let x = n as f64;
    for (scale, suffix) in UNITS {
        if x >= scale {
            let v = x / scale;
            return if v >= 100.0 {
                format!("{v:.0}{suffix}")
            } else if v >= 10.0 {
                format!("{v:.1}{suffix}")
            } else {
                format!("{v:.2}{suffix}")
            };
        }
    }
    n.to_string()
}

/// The op's attributes as `key=value` pairs, taken from its serde form so that a new op
/// or field shows up in dumps without touching this module. Types are left out (the dump
/// prints the result type anyway).
pub(crate) fn op_attributes(op: &qplc_ops::Op) -> Vec<(String, serde_json::Value)> {
    // A fused chain reads as its steps, `s1 = add(x1, s0)`, not as nested JSON.
    if let qplc_ops::Op::Fused { steps } = op {
        let text: Vec<String> = steps
            .iter()
            .enumerate()
            .map(|(i, st)| {
                let args: Vec<String> = st
                    .args
                    .iter()
                    .map(|a| match a {
                        qplc_ops::FusedArg::Input(k) => format!("x{k}"),
                        qplc_ops::FusedArg::Step(j) => format!("s{j}"),
                    })
                    .collect();
                let attrs: Vec<String> = op_attributes(&st.op)
                    .iter()
                    .map(|(k, v)| match v {
                        serde_json::Value::String(s) => format!("{k}={s}"),
                        v => format!("{k}={v}"),
                    })
                    .collect();
                let attrs = if attrs.is_empty() {
                    String::new()
                } else {
                    format!("{{{}}}", attrs.join(","))
                };
                format!("s{i}={}{attrs}({})", st.op.name(), args.join(","))
            })
            .collect();
        return vec![("steps".into(), serde_json::Value::String(text.join("; ")))];
    }
    let Ok(serde_json::Value::Object(outer)) = serde_json::to_value(op) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (_, inner) in outer {
        match inner {
            serde_json::Value::Object(fields) => {
                for (k, v) in fields {
                    if k != "ty" {
                        out.push((k, v));
                    }
                }
            }
            // Unary/Binary carry their function, which the op name already says.
            serde_json::Value::String(_) => {}
            v => out.push(("value".to_string(), v)),
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests;
