//! The graph IR: a DAG of ops on petgraph's `StableGraph` (indices survive node removal,
//! which passes rely on). Edge weights are operand positions.
use petgraph::stable_graph::{NodeIndex, StableGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use qplc_ops::{Op, OpError, TensorType};
use serde::{Deserialize, Serialize};
use std::fmt;

pub type NodeId = NodeIndex<u32>;

/// Which pipeline layer of spec §5.3 a node belongs to. Partitioning works on this list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    /// PrepareInputs: ids, positions, labels, classes.
    Inputs,
    Embedding,
    /// DecoderLayer; the layer index is in `Node::layer`.
    Decoder,
    /// Final norm.
    Norm,
    /// LM head (projection, logit scale, soft-cap).
    Head,
    Loss,
}

impl BlockKind {
    /// The reference's pipeline class name (spec §5.6), matched by `type:<regex>`.
    pub fn pipe_class(self) -> &'static str {
        match self {
            BlockKind::Inputs => "PrepareInputsPipe",
            BlockKind::Embedding => "EmbeddingPipe",
            BlockKind::Decoder => "DecoderLayerPipe",
            BlockKind::Norm => "NormPipe",
            BlockKind::Head => "LmHeadPipe",
            BlockKind::Loss => "LossPipe",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub ty: TensorType,
    /// Hierarchical HF-style module name, e.g. `model.layers.3.self_attn.q_proj`.
    pub module: String,
    pub block: BlockKind,
    /// Decoder layer index, for nodes inside a decoder layer.
    pub layer: Option<usize>,
    /// For weights: whether the optimiser updates it (set by adapter passes).
    #[serde(default)]
    pub trainable: bool,
    /// Set by the `recompute` pass on the copies of forward values that a layer's backward
    /// recomputes: [`Graph::topo_order`] runs such a node as late as possible, just before
    /// its first reader, or the copy would live as long as the value it replaces.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recompute: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("in module `{module}`: {source}")]
    Op {
        module: String,
        #[source]
        source: OpError,
    },
    #[error("operand {0:?} does not exist in the graph")]
    MissingOperand(NodeId),
    #[error("the graph has a cycle through node {0:?}")]
    Cycle(NodeId),
    #[error("node {id:?} (`{module}`): stored type {stored} but its op infers {inferred}")]
    TypeMismatch {
        id: NodeId,
        module: String,
        stored: TensorType,
        inferred: TensorType,
    },
}

/// Where new nodes go: module name, pipeline block and layer.
#[derive(Clone, Debug)]
pub struct Scope {
    pub module: String,
    pub block: BlockKind,
    pub layer: Option<usize>,
}

impl Scope {
    pub fn new(module: impl Into<String>, block: BlockKind, layer: Option<usize>) -> Self {
        Scope {
            module: module.into(),
            block,
            layer,
        }
    }
    pub fn child(&self, name: &str) -> Scope {
        let module = if self.module.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.module)
        };
        Scope {
            module,
            ..self.clone()
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Graph {
    pub g: StableGraph<Node, usize>,
    /// Named results, e.g. `logits`, `loss`.
    pub outputs: Vec<(String, NodeId)>,
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node after inferring its type from the operands' types.
    pub fn add(
        &mut self,
        op: Op,
        operands: &[NodeId],
        scope: &Scope,
    ) -> Result<NodeId, GraphError> {
        let mut tys = Vec::with_capacity(operands.len());
        for &o in operands {
            tys.push(
                self.g
                    .node_weight(o)
                    .ok_or(GraphError::MissingOperand(o))?
                    .ty
                    .clone(),
            );
        }
        let ty = op.infer(&tys).map_err(|source| GraphError::Op {
            module: scope.module.clone(),
            source,
        })?;
        let id = self.g.add_node(Node {
            op,
            ty,
            module: scope.module.clone(),
            block: scope.block,
            layer: scope.layer,
            trainable: false,
            recompute: false,
        });
        for (i, &o) in operands.iter().enumerate() {
            self.g.add_edge(o, id, i);
        }
        Ok(id)
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.g[id]
    }

    /// Operands of a node, in operand order.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut e: Vec<(usize, NodeId)> = self
            .g
            .edges_directed(id, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        e.sort_unstable_by_key(|(i, _)| *i);
        e.into_iter().map(|(_, s)| s).collect()
    }

    /// Nodes that use this node's value (each once, in index order).
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut u: Vec<NodeId> = self
            .g
            .edges_directed(id, Direction::Outgoing)
            .map(|e| e.target())
            .collect();
        u.sort_unstable();
        u.dedup();
        u
    }

    /// A deterministic topological order: Kahn's algorithm taking the smallest ready index,
    /// except that `recompute` nodes run on demand: each is placed just before the first
    /// other node that reads it (directly or through other recompute nodes), and those
    /// nobody else reads come last. Without recompute nodes this is plain Kahn's order.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, GraphError> {
        use petgraph::visit::NodeIndexable;
        use std::cmp::Reverse;
        use std::collections::{BinaryHeap, HashMap};
        let mut indeg: HashMap<NodeId, usize> = HashMap::new();
        let mut ready = BinaryHeap::new();
        // Recompute nodes whose operands are all available: they count as available to
        // their users without being placed yet.
        let mut deferred: Vec<NodeId> = Vec::new();
        for id in self.g.node_indices() {
            let d = self.g.edges_directed(id, Direction::Incoming).count();
            indeg.insert(id, d);
            if d == 0 {
                if self.g[id].recompute {
                    deferred.push(id);
                } else {
                    ready.push(Reverse(id));
                }
            }
        }
        let any_recompute = !deferred.is_empty() || self.g.node_weights().any(|n| n.recompute);
        let mut order = Vec::with_capacity(self.g.node_count());
        let mut placed = vec![false; self.g.node_bound()];
        let mut available = 0usize;
        loop {
            // Make deferred nodes available, releasing their users.
            while let Some(id) = deferred.pop() {
                available += 1;
                for e in self.g.edges_directed(id, Direction::Outgoing) {
                    let d = indeg.get_mut(&e.target()).expect("node in graph");
                    *d -= 1;
                    if *d == 0 {
                        if self.g[e.target()].recompute {
                            deferred.push(e.target());
                        } else {
                            ready.push(Reverse(e.target()));
                        }
                    }
                }
            }
            let Some(Reverse(id)) = ready.pop() else {
                break;
            };
            available += 1;
            if any_recompute {
                self.place_recomputed_operands(id, &mut placed, &mut order);
            }
            placed[id.index()] = true;
            order.push(id);
            for e in self.g.edges_directed(id, Direction::Outgoing) {
                let d = indeg.get_mut(&e.target()).expect("node in graph");
                *d -= 1;
                if *d == 0 {
                    if self.g[e.target()].recompute {
                        deferred.push(e.target());
                    } else {
                        ready.push(Reverse(e.target()));
                    }
                }
            }
        }
        if available != self.g.node_count() {
            let stuck = indeg
                .into_iter()
                .filter(|(_, d)| *d > 0)
                .map(|(id, _)| id)
                .min()
                .expect("some node is stuck");
            return Err(GraphError::Cycle(stuck));
        }
        // Recompute nodes only outputs (or nothing) read.
        for id in self.g.node_indices() {
            if self.g[id].recompute && !placed[id.index()] {
                self.place_recomputed_operands(id, &mut placed, &mut order);
                placed[id.index()] = true;
                order.push(id);
            }
        }
        Ok(order)
    }

    /// Appends the not yet placed recompute nodes `id` depends on, operands before users.
    /// Every non-recompute node among them is placed already (the caller's invariant).
    fn place_recomputed_operands(&self, id: NodeId, placed: &mut [bool], order: &mut Vec<NodeId>) {
        // Iterative post-order DFS: layers can hold long recompute chains.
        let mut stack: Vec<(NodeId, bool)> = self
            .operands(id)
            .into_iter()
            .rev()
            .map(|o| (o, false))
            .collect();
        while let Some((n, expanded)) = stack.pop() {
            if placed[n.index()] || !self.g[n].recompute {
                continue;
            }
            if expanded {
                placed[n.index()] = true;
                order.push(n);
                continue;
            }
            stack.push((n, true));
            for o in self.operands(n).into_iter().rev() {
                if !placed[o.index()] && self.g[o].recompute {
                    stack.push((o, false));
                }
            }
        }
    }

    pub fn set_output(&mut self, name: &str, id: NodeId) {
        self.outputs.retain(|(n, _)| n != name);
        self.outputs.push((name.to_string(), id));
    }

    pub fn output(&self, name: &str) -> Option<NodeId> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }

    /// Graph inputs (`Op::Input`) by name.
    pub fn inputs(&self) -> Vec<(String, NodeId)> {
        self.g
            .node_indices()
            .filter_map(|id| match &self.g[id].op {
                Op::Input { name, .. } => Some((name.clone(), id)),
                _ => None,
            })
            .collect()
    }

    /// Weights (`Op::Weight`) by checkpoint tensor name.
    pub fn weights(&self) -> Vec<(String, NodeId)> {
        self.g
            .node_indices()
            .filter_map(|id| match &self.g[id].op {
                Op::Weight { name, .. } => Some((name.clone(), id)),
                _ => None,
            })
            .collect()
    }

    pub fn param_count(&self) -> u64 {
        self.weights()
            .iter()
            .map(|(_, id)| self.g[*id].ty.shape.numel() as u64)
            .sum()
    }

    pub fn trainable_param_count(&self) -> u64 {
        self.weights()
            .iter()
            .filter(|(_, id)| self.g[*id].trainable)
            .map(|(_, id)| self.g[*id].ty.shape.numel() as u64)
            .sum()
    }

    /// FLOPs of one execution of the whole graph.
    pub fn flops(&self) -> u64 {
        self.g
            .node_indices()
            .map(|id| {
                let tys: Vec<TensorType> = self
                    .operands(id)
                    .iter()
                    .map(|o| self.g[*o].ty.clone())
                    .collect();
                self.g[id].op.flops(&tys, &self.g[id].ty)
            })
            .sum()
    }

    /// Checks the invariants every pass must keep: acyclic, operand positions dense, and
    /// every stored type equal to what its op infers. Run after each pass in tests.
    pub fn verify(&self) -> Result<(), GraphError> {
        self.topo_order()?;
        for id in self.g.node_indices() {
            let tys: Vec<TensorType> = self
                .operands(id)
                .iter()
                .map(|o| self.g[*o].ty.clone())
                .collect();
            let node = &self.g[id];
            let inferred = node.op.infer(&tys).map_err(|source| GraphError::Op {
                module: node.module.clone(),
                source,
            })?;
            if inferred != node.ty {
                return Err(GraphError::TypeMismatch {
                    id,
                    module: node.module.clone(),
                    stored: node.ty.clone(),
                    inferred,
                });
            }
        }
        for (_, id) in &self.outputs {
            if self.g.node_weight(*id).is_none() {
                return Err(GraphError::MissingOperand(*id));
            }
        }
        Ok(())
    }
}

impl fmt::Display for BlockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.pipe_class())
    }
}
