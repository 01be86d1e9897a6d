//! The `recompute` pass (DESIGN "Passes"): activation checkpointing as a graph rewrite
//! (spec §5.5). For each decoder layer it decides which forward values the backward reads
//! from storage and which it recomputes; a recomputed value gets a copy of the part of the
//! layer's forward that produces it, marked `Node::recompute`, and the backward reads the
//! copy. `Graph::topo_order` runs recompute nodes just before their first reader, so the
//! forward's originals die during the forward and the copies live only during the layer's
//! backward.
//!
//! * `layer` (the reference's scheme): only what leaves the layer (its output, the next
//!   layer's input) is kept; everything else of the layer the backward reads is recomputed
//!   from the layer input.
//! * `auto`: never recomputes an expensive op (products, attention, embedding lookups) and,
//!   per layer, stores the fewest bytes that let the backward recompute everything else
//!   it reads — a minimum cut, as torch.compile's partitioner computes it (`min_cut`).
//! * `none`: the pass changes nothing.
//!
//! Dropout is recomputed to the same mask by construction: its mask is a function of the
//! key input, the node's salt and the element index (qplc_ops::dropout), all of which the
//! copy shares — the fix of spec §5.5's quirk (the reference redraws the mask).
//!
//! Runs after `autodiff` (it needs the backward to know what is saved) and after `fuse`:
//! it then copies the kernels that will actually run, and fusion cannot undo it — egg
//! hash-conses e-nodes, so a copy whose operands are the original's operands (a chain's
//! first op, reading the layer input) would be merged back into its original.
use crate::autodiff::GRAD_PREFIX;
use crate::min_cut::{FlowNetwork, INFINITE};
use crate::pass::{Pass, PassContext};
use anyhow::bail;
use petgraph::visit::{EdgeRef, NodeIndexable};
use petgraph::Direction;
use qplc_compiler::{BlockKind, Graph, NodeId, Scope};
use qplc_ops::Op;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

/// `activation_checkpointing` (qplc extension of spec §3, semantics of §5.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointPolicy {
    None,
    Layer,
    Auto,
}

impl FromStr for CheckpointPolicy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "none" => CheckpointPolicy::None,
            "layer" => CheckpointPolicy::Layer,
            "auto" => CheckpointPolicy::Auto,
            other => bail!("expected \"none\", \"layer\" or \"auto\", got \"{other}\""),
        })
    }
}

impl fmt::Display for CheckpointPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckpointPolicy::None => "none",
            CheckpointPolicy::Layer => "layer",
            CheckpointPolicy::Auto => "auto",
        })
    }
}

/// What the pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecomputeStats {
    /// Decoder layers with at least one recomputed value.
    pub layers: usize,
    /// Forward values the backward now reads from a copy.
    pub recomputed_values: usize,
    /// Nodes added (the copies, with the chains that produce them).
    pub nodes_added: usize,
    /// Bytes of the values no longer held from forward to backward.
    pub bytes_released: u64,
}

pub struct RecomputePass {
    pub policy: CheckpointPolicy,
    /// `activation_offload`: mark the kept layer inputs for host memory (plan only; the
    /// runtime does not copy them yet, so the device figures still count them).
    pub offload: bool,
}

impl RecomputePass {
    /// `activation_checkpointing` and `activation_offload` of a training config.
    pub fn from_config(cfg: &qplc_compiler::config::LoadedConfig) -> anyhow::Result<Self> {
        let policy = cfg
            .config
            .activation_checkpointing
            .parse()
            .map_err(|e| cfg.error("activation_checkpointing", format!("{e}")))?;
        Ok(RecomputePass {
            policy,
            offload: cfg.config.activation_offload,
        })
    }
}

impl Pass for RecomputePass {
    fn name(&self) -> &str {
        "recompute"
    }
    fn run(&self, mut graph: Graph, cx: &mut PassContext) -> anyhow::Result<Graph> {
        let s = recompute(&mut graph, self.policy)?;
        if self.offload && self.policy != CheckpointPolicy::None {
            cx.offloaded = layer_inputs_kept_for_backward(&graph);
        }
        if self.policy != CheckpointPolicy::None {
            cx.notes.push(format!(
                "activation checkpointing `{}`: {} values of {} decoder layers recomputed \
                 in the backward ({} nodes added)",
                self.policy, s.recomputed_values, s.layers, s.nodes_added
            ));
        }
        Ok(graph)
    }
}

/// Weight of a stored byte against one recomputed op in `min_cut_saved`: above the ops of
/// any one layer, so bytes always decide first.
const PER_BYTE: u64 = 1 << 16;

/// Ops `auto` never recomputes: recomputing them costs a product's FLOPs.
fn expensive(op: &Op) -> bool {
    matches!(
        op,
        Op::Linear | Op::MatMul { .. } | Op::Attention { .. } | Op::Embedding
    )
}

/// Rewrites `graph` so that each decoder layer's backward reads recomputed copies instead
/// of the stored forward values the policy does not keep.
pub fn recompute(graph: &mut Graph, policy: CheckpointPolicy) -> anyhow::Result<RecomputeStats> {
    let mut stats = RecomputeStats::default();
    if policy == CheckpointPolicy::None {
        return Ok(stats);
    }
    if graph.g.node_indices().any(|id| graph.node(id).recompute) {
        bail!("the graph has recompute nodes already: run the `recompute` pass once");
    }
    let bound = graph.g.node_bound();
    // Forward = what the non-gradient outputs (loss, logits…) depend on; the rest is the
    // backward the autodiff pass appended.
    let mut forward = vec![false; bound];
    let mut stack: Vec<NodeId> = graph
        .outputs
        .iter()
        .filter(|(n, _)| !n.starts_with(GRAD_PREFIX))
        .map(|(_, id)| *id)
        .collect();
    while let Some(id) = stack.pop() {
        if !std::mem::replace(&mut forward[id.index()], true) {
            stack.extend(graph.operands(id));
        }
    }
    let is_output = {
        let mut o = vec![false; bound];
        for (_, id) in &graph.outputs {
            o[id.index()] = true;
        }
        o
    };
    let layer = layer_of_table(graph, &forward);
    // Kept in every policy: what leaves its layer (read by the forward of another block or
    // layer, or an output) — the next layer's input, stored anyway.
    let mut kept = vec![false; bound];
    let mut read_back = vec![false; bound];
    let mut members: BTreeMap<usize, Vec<NodeId>> = BTreeMap::new();
    for id in graph.g.node_indices() {
        let Some(k) = layer[id.index()] else {
            continue;
        };
        let users = graph.users(id);
        kept[id.index()] = is_output[id.index()]
            || users
                .iter()
                .any(|&u| forward[u.index()] && layer[u.index()] != Some(k));
        read_back[id.index()] = users.iter().any(|&u| !forward[u.index()]);
        members.entry(k).or_default().push(id);
    }
    if policy == CheckpointPolicy::Auto {
        for nodes in members.values() {
            for id in min_cut_saved(graph, nodes, &kept, &read_back) {
                kept[id.index()] = true;
            }
        }
    }
    let saved: Vec<NodeId> = members
        .values()
        .flatten()
        .copied()
        .filter(|id| !kept[id.index()] && read_back[id.index()])
        .collect();

    let mut copies: HashMap<NodeId, NodeId> = HashMap::new();
    let mut layers = std::collections::BTreeSet::new();
    for &v in &saved {
        let k = layer[v.index()].expect("saved values are in a layer");
        let before = graph.g.node_count();
        let copy = copy_chain(graph, v, k, &kept, &layer, &mut copies)?;
        stats.nodes_added += graph.g.node_count() - before;
        // Move the backward's reads (edge weight = operand position) to the copy.
        let reads: Vec<(petgraph::stable_graph::EdgeIndex<u32>, NodeId, usize)> = graph
            .g
            .edges_directed(v, Direction::Outgoing)
            .filter(|e| !graph.node(e.target()).recompute && !forward[e.target().index()])
            .map(|e| (e.id(), e.target(), *e.weight()))
            .collect();
        for (e, user, pos) in reads {
            graph.g.remove_edge(e);
            graph.g.add_edge(copy, user, pos);
        }
        stats.recomputed_values += 1;
        stats.bytes_released += graph.node(v).ty.bytes() as u64;
        layers.insert(k);
    }
    stats.layers = layers.len();
    Ok(stats)
}

/// `auto` for one layer (`nodes`, its forward values): the cheapest set of values to store
/// such that everything the backward reads can be recomputed from them, the values kept
/// anyway and the values from outside the layer, without recomputing an expensive op —
/// torch.compile's min-cut partitioner. Each value is an edge `in → out` costing its bytes;
/// expensive ops hang from the source (they must run in the forward); values the backward
/// reads feed the sink; kept values cost nothing to cut. Source side = computed in the
/// forward; the cut edges are the values to store.
///
/// Between cuts of equal bytes the one recomputing fewer ops wins: bytes are scaled by
/// `PER_BYTE` and every cheap op on the sink side (recomputed) costs 1 more. A LoRA query
/// `q = base + cast(lora)` and its rotated `rope(q)` are the same size; storing the second
/// spares the backward its rope, and storing a residual sum `x + o_proj(a)` rather than the
/// product spares it the add (and leaves the product to the `accumulate` pass).
fn min_cut_saved(
    graph: &Graph,
    nodes: &[NodeId],
    kept: &[bool],
    read_back: &[bool],
) -> Vec<NodeId> {
    let slot: HashMap<NodeId, usize> = nodes.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let (s, t) = (2 * nodes.len(), 2 * nodes.len() + 1);
    let mut net = FlowNetwork::new(2 * nodes.len() + 2);
    for (i, &id) in nodes.iter().enumerate() {
        let (v_in, v_out) = (2 * i, 2 * i + 1);
        let cost = if kept[id.index()] {
            0
        } else {
            graph.node(id).ty.bytes() as u64
        };
        net.add_edge(v_in, v_out, cost.saturating_mul(PER_BYTE));
        if expensive(&graph.node(id).op) {
            net.add_edge(s, v_in, INFINITE);
        } else {
            net.add_edge(s, v_in, 1);
        }
        if read_back[id.index()] {
            net.add_edge(v_out, t, INFINITE);
        }
        // Operands from outside the layer are stored anyway: no edge, nothing to pay.
        for o in graph.operands(id) {
            if let Some(&j) = slot.get(&o) {
                net.add_edge(2 * j + 1, v_in, INFINITE);
            }
        }
    }
    let (_, source_side) = net.min_cut(s, t);
    nodes
        .iter()
        .enumerate()
        .filter(|&(i, &id)| source_side[2 * i] && !source_side[2 * i + 1] && !kept[id.index()])
        .map(|(_, &id)| id)
        .collect()
}

/// The decoder layer each forward value is computed in (inputs and weights belong to
/// none), by node index; taken before copying adds nodes.
fn layer_of_table(graph: &Graph, forward: &[bool]) -> Vec<Option<usize>> {
    (0..graph.g.node_bound())
        .map(|i| {
            let id = NodeId::new(i);
            let n = graph.g.node_weight(id)?;
            if !forward[i]
                || n.block != BlockKind::Decoder
                || matches!(n.op, Op::Input { .. } | Op::Weight { .. })
            {
                return None;
            }
            n.layer
        })
        .collect()
}

/// The copy of `v` (a value of layer `k`), built from kept values and values outside the
/// layer; nodes already copied are reused.
fn copy_chain(
    graph: &mut Graph,
    v: NodeId,
    k: usize,
    kept: &[bool],
    layer: &[Option<usize>],
    copies: &mut HashMap<NodeId, NodeId>,
) -> anyhow::Result<NodeId> {
    let source =
        |id: NodeId| id.index() >= layer.len() || layer[id.index()] != Some(k) || kept[id.index()];
    // Iterative post-order: operands are copied before their users.
    let mut stack = vec![(v, false)];
    while let Some((n, expanded)) = stack.pop() {
        if copies.contains_key(&n) || source(n) {
            continue;
        }
        let operands = graph.operands(n);
        if !expanded {
            stack.push((n, true));
            stack.extend(operands.iter().rev().map(|&o| (o, false)));
            continue;
        }
        let mapped: Vec<NodeId> = operands
            .iter()
            .map(|o| copies.get(o).copied().unwrap_or(*o))
            .collect();
        let node = graph.node(n).clone();
        let scope = Scope::new(node.module.clone(), node.block, node.layer);
        let c = graph.add(node.op.clone(), &mapped, &scope)?;
        graph.node_mut(c).recompute = true;
        copies.insert(n, c);
    }
    Ok(copies[&v])
}

/// The values spec §5.5 offloads: each decoder layer's input (the embedding output or the
/// previous layer's output) where the backward or the recomputation reads it again.
pub fn layer_inputs_kept_for_backward(graph: &Graph) -> std::collections::BTreeSet<NodeId> {
    let bound = graph.g.node_bound();
    let mut forward = vec![false; bound];
    let mut stack: Vec<NodeId> = graph
        .outputs
        .iter()
        .filter(|(n, _)| !n.starts_with(GRAD_PREFIX))
        .map(|(_, id)| *id)
        .collect();
    while let Some(id) = stack.pop() {
        if !std::mem::replace(&mut forward[id.index()], true) {
            stack.extend(graph.operands(id));
        }
    }
    let forward_layer = |id: NodeId| {
        let n = graph.node(id);
        (forward[id.index()] && n.block == BlockKind::Decoder && !n.recompute)
            .then_some(n.layer)
            .flatten()
    };
    graph
        .g
        .node_indices()
        .filter(|&id| {
            let n = graph.node(id);
            if !forward[id.index()]
                || n.recompute
                || !matches!(n.block, BlockKind::Embedding | BlockKind::Decoder)
                || matches!(n.op, Op::Input { .. } | Op::Weight { .. })
            {
                return false;
            }
            let own = forward_layer(id);
            let users = graph.users(id);
            let feeds_next = users
                .iter()
                .any(|&u| forward_layer(u).is_some_and(|k| Some(k) != own));
            feeds_next
                && users
                    .iter()
                    .any(|&u| !forward[u.index()] || graph.node(u).recompute)
        })
        .collect()
}
