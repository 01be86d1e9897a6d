//! Graphviz DOT renderings: the full graph (one node per op, clustered by pipeline layer)
//! and the collapsed view (one box per pipeline layer).
use super::{collapse, format_count};
use crate::graph::Graph;
use crate::plan::LayerList;
use qplc_ops::Op;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Escapes a string for a double-quoted DOT label (`\n` stays a line break).
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Every node, labelled `op / type / module`; inputs, weights and fills have their own
/// shapes and colours, trainable weights are highlighted; one cluster per pipeline layer.
pub fn to_dot(graph: &Graph) -> String {
    let list = LayerList::of_graph(graph);
    let mut clusters: BTreeMap<Option<usize>, Vec<String>> = BTreeMap::new();
    for id in graph.g.node_indices() {
        let n = graph.node(id);
        let (shape, style) = match &n.op {
            Op::Input { .. } => ("invhouse", "filled\", fillcolor=\"#cfe2ff"),
            Op::Weight { .. } if n.trainable => ("cylinder", "filled\", fillcolor=\"#ffb870"),
            Op::Weight { .. } => ("cylinder", "filled\", fillcolor=\"#fff3bf"),
            Op::Fill { .. } => ("diamond", "filled\", fillcolor=\"#e9ecef"),
            _ => ("box", "rounded"),
        };
        let head = match &n.op {
            Op::Input { name, .. } => format!("input {name}"),
            Op::Weight { name, .. } => name.clone(),
            op => op.name().to_string(),
        };
        let label = format!(
            "{}\\n{}\\n{}",
            esc(&head),
            esc(&n.ty.to_string()),
            esc(&n.module)
        );
        let line = format!(
            "    n{} [label=\"{label}\", shape={shape}, style=\"{style}\"];",
            id.index()
        );
        clusters.entry(list.entry_of(n)).or_default().push(line);
    }
    let mut out = String::from(
        "digraph qplc {\n  rankdir=TB;\n  node [fontname=\"monospace\", fontsize=10];\n",
    );
    for (entry, lines) in &clusters {
        match entry {
            Some(e) => {
                let _ = writeln!(
                    out,
                    "  subgraph cluster_{e} {{\n    label=\"{}\";\n    style=dashed;",
                    esc(&list.entries[*e].label())
                );
                for l in lines {
                    let _ = writeln!(out, "{l}");
                }
                out.push_str("  }\n");
            }
            None => {
                for l in lines {
                    let _ = writeln!(out, "{}", &l[2..]);
                }
            }
        }
    }
    for id in graph.g.node_indices() {
        for (pos, o) in graph.operands(id).iter().enumerate() {
            // Operand positions matter for non-commutative ops; label them when there is
            // more than one.
            if graph.operands(id).len() > 1 {
                let _ = writeln!(
                    out,
                    "  n{} -> n{} [headlabel=\"{pos}\", labelfontsize=8];",
                    o.index(),
                    id.index()
                );
            } else {
                let _ = writeln!(out, "  n{} -> n{};", o.index(), id.index());
            }
        }
    }
    for (name, id) in &graph.outputs {
        let _ = writeln!(
            out,
            "  out_{0} [label=\"{0}\", shape=house, style=filled, fillcolor=\"#d3f9d8\"];\n  n{1} -> out_{0};",
            esc(name).replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_"),
            id.index()
        );
    }
    out.push_str("}\n");
    out
}

/// One box per pipeline layer (inputs → embedding → each decoder layer → norm → head
/// (→ loss)), labelled with its parameter count and FLOPs; a dashed edge marks a weight
/// read by two layers (tied embeddings, spec §5.4).
pub fn to_dot_collapsed(graph: &Graph) -> String {
    let c = collapse(graph);
    let mut out = String::from(
        "digraph qplc_layers {\n  rankdir=TB;\n  node [shape=box, style=rounded, fontname=\"monospace\", fontsize=10];\n",
    );
    for b in &c.boxes {
        let _ = writeln!(
            out,
            "  l{} [label=\"{}\\n{} params\\n{} FLOPs\"];",
            b.index,
            esc(&b.label),
            format_count(b.params),
            format_count(b.flops)
        );
    }
    for e in &c.edges {
        if e.weights_only {
            let _ = writeln!(
                out,
                "  l{} -> l{} [style=dashed, label=\"tied\"];",
                e.from, e.to
            );
        } else {
            let _ = writeln!(out, "  l{} -> l{};", e.from, e.to);
        }
    }
    out.push_str("}\n");
    out
}
