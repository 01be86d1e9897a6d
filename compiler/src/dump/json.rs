//! The JSON dump: nodes with id, op, attributes, type, module, block, layer and operands,
//! then the named outputs. Meant for tools (plots, diffing two compiles).
use super::{collapse, op_attributes};
use crate::graph::Graph;
use serde_json::{json, Map, Value};

pub fn to_json(graph: &Graph) -> Value {
    // Index order keeps the dump stable when a pass changes the topological order.
    let nodes: Vec<Value> = graph
        .g
        .node_indices()
        .map(|id| {
            let n = graph.node(id);
            let attrs: Map<String, Value> = op_attributes(&n.op).into_iter().collect();
            json!({
                "id": id.index(),
                "op": n.op.name(),
                "attrs": attrs,
                "type": n.ty.to_string(),
                "dtype": n.ty.dtype,
                "shape": n.ty.shape,
                "module": n.module,
                "block": n.block,
                "layer": n.layer,
                "trainable": n.trainable,
                "operands": graph.operands(id).iter().map(|o| o.index()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let outputs: Vec<Value> = graph
        .outputs
        .iter()
        .map(|(name, id)| json!({"name": name, "id": id.index()}))
        .collect();
    json!({"nodes": nodes, "outputs": outputs})
}

pub fn to_json_collapsed(graph: &Graph) -> Value {
    serde_json::to_value(collapse(graph)).unwrap_or(Value::Null)
}
