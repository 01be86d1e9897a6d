//! The collapsed view: one box per pipeline layer of spec §5.3 with its parameter count and
//! FLOPs, and the edges between layers. Shared by the DOT, JSON and text renderings.
use super::node_flops;
use crate::graph::Graph;
use crate::plan::LayerList;
use qplc_ops::Op;
use serde::Serialize;
use std::collections::BTreeSet;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CollapsedBox {
    /// Index in the layer list.
    pub index: usize,
    /// `DecoderLayer 3`.
    pub label: String,
    pub class: &'static str,
    pub nodes: usize,
    /// Parameters the layer reads (a tied weight counts in each layer that reads it).
    pub params: u64,
    pub flops: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct CollapsedEdge {
    pub from: usize,
    pub to: usize,
    /// True when the only values crossing are weights (a tied embedding).
    pub weights_only: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CollapsedGraph {
    pub boxes: Vec<CollapsedBox>,
    pub edges: Vec<CollapsedEdge>,
    /// Nodes whose block/layer is not on the layer list (a decoder node without a layer).
    pub unplaced: usize,
}

/// One box per layer-list entry that has nodes.
pub fn collapse(graph: &Graph) -> CollapsedGraph {
    let list = LayerList::of_graph(graph);
    let params = list.params_per_entry(graph, false);
    let mut nodes = vec![0usize; list.len()];
    let mut flops = vec![0u64; list.len()];
    let mut unplaced = 0;
    let mut activation_edges = BTreeSet::new();
    let mut weight_edges = BTreeSet::new();
    for id in graph.g.node_indices() {
        let n = graph.node(id);
        let Some(e) = list.entry_of(n) else {
            unplaced += 1;
            continue;
        };
        nodes[e] += 1;
        flops[e] += node_flops(graph, id);
        let is_weight = matches!(n.op, Op::Weight { .. });
        for u in graph.users(id) {
            if let Some(t) = list.entry_of(graph.node(u)) {
                if t != e {
                    if is_weight {
                        weight_edges.insert((e, t));
                    } else {
                        activation_edges.insert((e, t));
                    }
                }
            }
        }
    }
    let boxes = list
        .entries
        .iter()
        .filter(|entry| nodes[entry.index] > 0)
        .map(|entry| CollapsedBox {
            index: entry.index,
            label: entry.label(),
            class: entry.class(),
            nodes: nodes[entry.index],
            params: params[entry.index],
            flops: flops[entry.index],
        })
        .collect();
    let mut edges: Vec<CollapsedEdge> = activation_edges
        .iter()
        .map(|&(from, to)| CollapsedEdge {
            from,
            to,
            weights_only: false,
        })
        .chain(
            weight_edges
                .difference(&activation_edges)
                .map(|&(from, to)| CollapsedEdge {
                    from,
                    to,
                    weights_only: true,
                }),
        )
        .collect();
    edges.sort();
    CollapsedGraph {
        boxes,
        edges,
        unplaced,
    }
}
