//! The `control` pass (spec §6.2): a Control Adapter on the residual delta of each selected
//! decoder layer. With `h` the layer input and `o` its output, the layer output becomes
//!
//! ```text
//! o' = o + cast_back(((δ·Q) ⊙ λ_t)·Qᵀ),   δ = cast(o − h)
//! λ_t = pos_t·expm1(S) + neg_t·expm1(−S)
//! ```
//!
//! where `Q [H, r]` and `S [r]` are trainable weights in the adapter dtype, and `pos_t`,
//! `neg_t` ∈ {0, 1} say whether the effective class of position `t` is +1 or −1 (class 0:
//! both 0, the adapter is off).
//!
//! * Effective class (§6.2.3 step 3): the class of token `t+1`, the last position padded
//!   with 0 — the same shift as the labels of the loss (checks 25–27). The unshifted classes
//!   are the graph input [`CONTROL_CLASSES`] (i32 `[T]`, from the data pipeline).
//! * The masks come from the class value `c` itself, `pos = (c² + c)/2`, `neg = (c² − c)/2`,
//!   so the selection needs no comparison op and is exact for c ∈ {−1, 0, 1}.
//! * `expm1` is `exp(x) − 1` in the adapter dtype: its absolute error (one ulp of 1) is below
//!   the rounding of the residual sum `o + a` it feeds, and at S = 0 it is exactly 0, so the
//!   model at init equals the base model (check 25).
//! * Dropout on δ (§6.2.3 step 1) is an `Op::Dropout` keyed by the `dropout_key` input, as
//!   for LoRA branches; evaluation feeds an inactive key, so it is the identity there.
//!
//! Weights are named `model.layers.<i>.control_Q` / `control_S`; the adapter file key is
//! `base_model.model.` + that name (spec §6.2.8, check 50).
use crate::pass::{Pass, PassContext};
use anyhow::{bail, Context, Result};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use qplc_compiler::config::{LoadedConfig, Mode};
use qplc_compiler::{BlockKind, Graph, NodeId, Scope};
use qplc_ops::{BinaryOp, DType, Op, Shape, TensorType, UnaryOp};
use std::collections::{BTreeMap, BTreeSet};

/// Name of the per-token class input (i32 `[T]`, values −1, 0, 1; not shifted).
pub const CONTROL_CLASSES: &str = "control_classes";

/// Which of the two Control Adapter tensors a weight is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ControlRole {
    /// `Q [H, r]`, orthonormal columns.
    Q,
    /// `S [r]`, log eigen-offsets (zero at init).
    S,
}

impl ControlRole {
    pub fn segment(self) -> &'static str {
        match self {
            ControlRole::Q => "control_Q",
            ControlRole::S => "control_S",
        }
    }
}

/// The graph weight name of a Control Adapter tensor of decoder layer `layer`.
pub fn control_weight_name(layer: usize, role: ControlRole) -> String {
    format!("model.layers.{layer}.{}", role.segment())
}

/// The inverse of [`control_weight_name`]: `(layer, role)`.
pub fn parse_control_weight_name(name: &str) -> Option<(usize, ControlRole)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, seg) = rest.split_once('.')?;
    let role = match seg {
        "control_Q" => ControlRole::Q,
        "control_S" => ControlRole::S,
        _ => return None,
    };
    Some((layer.parse().ok()?, role))
}

/// Adds Control Adapters to the selected decoder layers.
#[derive(Clone, Debug)]
pub struct ControlPass {
    /// `layers_to_transform`; `None` = every decoder layer.
    pub layers: Option<BTreeSet<usize>>,
    pub rank: usize,
    /// `lora_weight_dtype`: dtype of Q, S and of the branch computation.
    pub dtype: DType,
    pub dropout: f64,
}

impl ControlPass {
    pub fn from_config(cfg: &LoadedConfig) -> Result<ControlPass> {
        if cfg.mode() != Mode::ControlAdapter {
            bail!(
                "the control pass needs Control Adapter mode, the config is in {:?}",
                cfg.mode()
            );
        }
        let c = &cfg.config;
        let rank = c
            .lora_rank
            .context("lora_rank is required for Control Adapters")? as usize;
        let dtype = DType::parse(&c.lora_weight_dtype)
            .with_context(|| format!("unknown lora_weight_dtype `{}`", c.lora_weight_dtype))?;
        Ok(ControlPass {
            layers: cfg.layers(),
            rank,
            dtype,
            dropout: c.lora_dropout,
        })
    }

    /// Adds the adapters; returns the adapted layer indices in order.
    pub fn apply(&self, graph: &mut Graph) -> Result<Vec<usize>> {
        if !self.dtype.is_float() {
            bail!("Control Adapter weights must be float, got {}", self.dtype);
        }
        if self.rank == 0 {
            bail!("lora_rank must be at least 1");
        }
        let bounds = layer_bounds(graph)?;
        if let Some(sel) = &self.layers {
            if let Some(bad) = sel.iter().find(|l| !bounds.contains_key(l)) {
                bail!(
                    "layers_to_transform selects layer {bad}, but the model has {} decoder layers",
                    bounds.len()
                );
            }
        }
        let chosen: Vec<usize> = bounds
            .keys()
            .copied()
            .filter(|l| self.layers.as_ref().is_none_or(|s| s.contains(l)))
            .collect();
        if chosen.is_empty() {
            return Ok(chosen);
        }
        let masks = class_masks(graph, self.dtype)?;
        let key = if self.dropout > 0.0 {
            Some(crate::lora::dropout_key_input(graph)?)
        } else {
            None
        };
        // Adapting layer i replaces its output; layer i+1's input is then that new value
        // (δ must be measured from what the layer actually received).
        let mut replaced: BTreeMap<NodeId, NodeId> = BTreeMap::new();
        for &layer in &chosen {
            let (h, o) = bounds[&layer];
            let h = replaced.get(&h).copied().unwrap_or(h);
            let new = add_adapter(graph, layer, (h, o), masks, self, key)?;
            replaced.insert(o, new);
        }
        Ok(chosen)
    }
}

impl Pass for ControlPass {
    fn name(&self) -> &str {
        "control"
    }
    fn run(&self, mut graph: Graph, cx: &mut PassContext) -> Result<Graph> {
        let layers = self.apply(&mut graph)?;
        cx.notes.push(format!(
            "control: {} Control Adapters (layers {:?}), rank {}, adapter dtype {}",
            layers.len(),
            layers,
            self.rank,
            self.dtype
        ));
        Ok(graph)
    }
}

/// For each decoder layer, `(input, output)`: the one activation entering the layer from
/// outside (the residual stream) and the one node of the layer used outside it.
pub fn layer_bounds(graph: &Graph) -> Result<BTreeMap<usize, (NodeId, NodeId)>> {
    let mut inputs: BTreeMap<usize, BTreeSet<NodeId>> = BTreeMap::new();
    let mut outputs: BTreeMap<usize, BTreeSet<NodeId>> = BTreeMap::new();
    for id in graph.g.node_indices() {
        let n = graph.node(id);
        let (BlockKind::Decoder, Some(layer)) = (n.block, n.layer) else {
            continue;
        };
        let ins = inputs.entry(layer).or_default();
        for o in graph.operands(id) {
            let on = graph.node(o);
            let outside = on.block != BlockKind::Decoder || on.layer != Some(layer);
            if outside && !on.op.is_leaf() {
                ins.insert(o);
            }
        }
        if n.op.is_leaf() {
            continue;
        }
        let used_outside = graph.users(id).into_iter().any(|u| {
            let un = graph.node(u);
            un.block != BlockKind::Decoder || un.layer != Some(layer)
        }) || graph.outputs.iter().any(|(_, out)| *out == id);
        if used_outside {
            outputs.entry(layer).or_default().insert(id);
        }
    }
    let mut bounds = BTreeMap::new();
    for (layer, ins) in inputs {
        let outs = outputs.remove(&layer).unwrap_or_default();
        if ins.len() != 1 || outs.len() != 1 {
            bail!(
                "decoder layer {layer} has {} incoming activations and {} outgoing ones; a Control Adapter needs exactly one of each (the residual stream)",
                ins.len(),
                outs.len()
            );
        }
        let (h, o) = (*ins.first().unwrap(), *outs.first().unwrap());
        if graph.node(h).ty.shape != graph.node(o).ty.shape {
            bail!(
                "decoder layer {layer}: input {} and output {} differ in shape",
                graph.node(h).ty,
                graph.node(o).ty
            );
        }
        bounds.insert(layer, (h, o));
    }
    Ok(bounds)
}

/// `(pos, neg)`, each `[T, 1]` in `dtype`: 1 where the effective (shifted) class is +1
/// (resp. −1), else 0. Adds the [`CONTROL_CLASSES`] input if the graph has none.
fn class_masks(graph: &mut Graph, dtype: DType) -> Result<(NodeId, NodeId)> {
    let t = graph
        .inputs()
        .into_iter()
        .find(|(n, _)| n == "input_ids")
        .map(|(_, id)| graph.node(id).ty.shape.dims()[0])
        .context("the control pass needs the `input_ids` input [T]")?;
    let cty = TensorType::new([t], DType::I32);
    let classes = match graph
        .inputs()
        .into_iter()
        .find(|(n, _)| n == CONTROL_CLASSES)
    {
        Some((_, id)) => {
            if graph.node(id).ty != cty {
                bail!(
                    "the graph already has a `{CONTROL_CLASSES}` input of type {}, expected {cty}",
                    graph.node(id).ty
                );
            }
            id
        }
        None => graph.add(
            Op::Input {
                name: CONTROL_CLASSES.into(),
                ty: cty,
            },
            &[],
            &Scope::new(CONTROL_CLASSES, BlockKind::Inputs, None),
        )?,
    };
    let scope = Scope::new(CONTROL_CLASSES, BlockKind::Inputs, None);
    // spec §6.2.3 step 3: position t uses the class of token t+1; the last position gets 0.
    let pad = graph.add(
        Op::Fill {
            value: 0.0,
            ty: TensorType::new([1], DType::I32),
        },
        &[],
        &scope,
    )?;
    let shifted = if t > 1 {
        let tail = graph.add(
            Op::Slice {
                axis: 0,
                start: 1,
                end: t,
            },
            &[classes],
            &scope,
        )?;
        graph.add(Op::Concat { axis: 0 }, &[tail, pad], &scope)?
    } else {
        pad
    };
    let c = graph.add(Op::Cast { to: dtype }, &[shifted], &scope)?;
    let c = graph.add(
        Op::Reshape {
            shape: Shape::new(vec![t, 1]),
        },
        &[c],
        &scope,
    )?;
    let c2 = graph.add(Op::Unary(UnaryOp::Square), &[c], &scope)?;
    let pos = graph.add(Op::Binary(BinaryOp::Add), &[c2, c], &scope)?;
    let pos = graph.add(Op::Scale { factor: 0.5 }, &[pos], &scope)?;
    let neg = graph.add(Op::Binary(BinaryOp::Sub), &[c2, c], &scope)?;
    let neg = graph.add(Op::Scale { factor: 0.5 }, &[neg], &scope)?;
    Ok((pos, neg))
}

/// Q, S and the branch for one layer; every user of `o` (and any output that was `o`) is
/// moved to `o'`, which is returned.
fn add_adapter(
    graph: &mut Graph,
    layer: usize,
    (h, o): (NodeId, NodeId),
    (pos, neg): (NodeId, NodeId),
    pass: &ControlPass,
    dropout_key: Option<NodeId>,
) -> Result<NodeId> {
    let (rank, dtype) = (pass.rank, pass.dtype);
    let users: Vec<(NodeId, usize)> = graph
        .g
        .edges_directed(o, Direction::Outgoing)
        .map(|e| (e.target(), *e.weight()))
        .collect();
    let oty = graph.node(o).ty.clone();
    let hidden = *oty
        .shape
        .dims()
        .last()
        .context("layer output has no axes")?;
    let base = Scope::new(
        format!("model.layers.{layer}"),
        BlockKind::Decoder,
        Some(layer),
    );
    let scope = base.child("control");
    let mut weight = |role: ControlRole, dims: Vec<usize>| -> Result<NodeId> {
        let op = Op::Weight {
            name: control_weight_name(layer, role),
            ty: TensorType::new(dims, dtype),
        };
        let id = graph.add(op, &[], &base.child(role.segment()))?;
        graph.node_mut(id).trainable = true;
        Ok(id)
    };
    let q = weight(ControlRole::Q, vec![hidden, rank])?;
    let s = weight(ControlRole::S, vec![rank])?;

    // λ⁺ = expm1(S), λ⁻ = expm1(−S) (§6.2.2).
    let es = graph.add(Op::Unary(UnaryOp::Exp), &[s], &scope)?;
    let lam_pos = graph.add(Op::AddScalar { value: -1.0 }, &[es], &scope)?;
    let ns = graph.add(Op::Unary(UnaryOp::Neg), &[s], &scope)?;
    let ens = graph.add(Op::Unary(UnaryOp::Exp), &[ns], &scope)?;
    let lam_neg = graph.add(Op::AddScalar { value: -1.0 }, &[ens], &scope)?;
    // [T, 1] ⊙ [r] → [T, r]: the per-token eigen-offsets (0 for class 0).
    let cp = graph.add(Op::Binary(BinaryOp::Mul), &[pos, lam_pos], &scope)?;
    let cn = graph.add(Op::Binary(BinaryOp::Mul), &[neg, lam_neg], &scope)?;
    let coef = graph.add(Op::Binary(BinaryOp::Add), &[cp, cn], &scope)?;

    let mut delta = graph.add(Op::Binary(BinaryOp::Sub), &[o, h], &scope)?;
    if oty.dtype != dtype {
        delta = graph.add(Op::Cast { to: dtype }, &[delta], &scope)?;
    }
    // Dropout acts on δ entering the adapter branch only, after the cast (§6.2.3 step 1,
    // check 28); the same counter-hash mask is regenerated in the backward (§14 item 5).
    if let Some(key) = dropout_key {
        let p = pass.dropout;
        let salt = qplc_ops::dropout::salt_of(&format!("model.layers.{layer}.control_dropout"));
        delta = graph.add(
            Op::Dropout { p, salt },
            &[delta, key],
            &scope.child("dropout"),
        )?;
    }
    let z = graph.add(
        Op::MatMul {
            ta: false,
            tb: false,
        },
        &[delta, q],
        &scope,
    )?;
    let zl = graph.add(Op::Binary(BinaryOp::Mul), &[z, coef], &scope)?;
    let mut a = graph.add(
        Op::MatMul {
            ta: false,
            tb: true,
        },
        &[zl, q],
        &scope,
    )?;
    if oty.dtype != dtype {
        a = graph.add(Op::Cast { to: oty.dtype }, &[a], &scope)?;
    }
    let sum = graph.add(Op::Binary(BinaryOp::Add), &[o, a], &scope)?;
    for (user, p) in users {
        let e = graph
            .g
            .edges_connecting(o, user)
            .find(|er| *er.weight() == p)
            .map(|er| er.id())
            .expect("edge listed above still exists");
        graph.g.remove_edge(e);
        graph.g.add_edge(sum, user, p);
    }
    for (_, out) in graph.outputs.iter_mut() {
        if *out == o {
            *out = sum;
        }
    }
    Ok(sum)
}
