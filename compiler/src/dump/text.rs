//! The textual dump: one line per node in topological order, for reading and for golden
//! "filetests" (Cranelift's habit, STYLE.md):
//! `%12 = linear(%3, %7) : f32[16, 64]  # model.layers.0.self_attn.q_proj`.
use super::{collapse, format_count, op_attributes, value_name};
use crate::graph::{BlockKind, Graph};
use std::fmt::Write;

/// One line per node, then one `output NAME = %N` line per graph output. A graph with a
/// cycle (which `verify` rejects) is printed in index order with a leading remark.
pub fn to_text(graph: &Graph) -> String {
    let mut out = String::new();
    let order = match graph.topo_order() {
        Ok(o) => o,
        Err(e) => {
            let _ = writeln!(out, "; not a DAG ({e}); nodes in index order");
            graph.g.node_indices().collect()
        }
    };
    for id in order {
        let n = graph.node(id);
        let _ = write!(out, "{} = {}", value_name(id), n.op.name());
        let attrs = op_attributes(&n.op);
        if !attrs.is_empty() {
            let parts: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = write!(out, "{{{}}}", parts.join(", "));
        }
        let operands: Vec<String> = graph.operands(id).into_iter().map(value_name).collect();
        if !operands.is_empty() {
            let _ = write!(out, "({})", operands.join(", "));
        }
        let _ = write!(out, " : {}  #", n.ty);
        if !n.module.is_empty() {
            let _ = write!(out, " {}", n.module);
        }
        let place = match (n.block, n.layer) {
            (BlockKind::Decoder, Some(i)) => format!("decoder {i}"),
            (b, _) => block_name(b),
        };
        let _ = write!(out, " [{place}]");
        if n.trainable {
            out.push_str(" trainable");
        }
        out.push('\n');
    }
    for (name, id) in &graph.outputs {
        let _ = writeln!(out, "output {name} = {}", value_name(*id));
    }
    out
}

/// One line per pipeline layer: `DecoderLayer 0: 12 nodes, 1.05M params, 33.6M FLOPs`.
pub fn to_text_collapsed(graph: &Graph) -> String {
    let c = collapse(graph);
    let mut out = String::new();
    for b in &c.boxes {
        let _ = writeln!(
            out,
            "{}: {} nodes, {} params, {} FLOPs",
            b.label,
            b.nodes,
            format_count(b.params),
            format_count(b.flops)
        );
    }
    if c.unplaced > 0 {
        let _ = writeln!(
            out,
            "{} nodes not on the layer list (decoder nodes without a layer)",
            c.unplaced
        );
    }
    out
}

/// The block's serde name (`inputs`, `embedding`, `decoder`, `norm`, `head`, `loss`).
fn block_name(b: BlockKind) -> String {
    match serde_json::to_value(b) {
        Ok(serde_json::Value::String(s)) => s,
        _ => b.pipe_class().to_string(),
    }
}
