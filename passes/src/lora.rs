//! The `lora` pass (spec §6.1): for each targeted `y = Linear(x, W[, b])` it adds the branch
//! `y' = y + cast_back(s · Linear(Linear(cast(x), A), B))` with `A [r, in]` and `B [out, r]`
//! trainable weights in the adapter dtype and `s = α/r` (`α/√r` for rsLoRA adapters).
//!
//! The branch is left as plain ops (cast, linear, linear, scale, cast, add): the fuse pass
//! turns `x·W + ((x·A)·B)·s` into one LoRA-linear with an egg rule (DESIGN "Passes"), so
//! this pass does no fusing of its own.
//!
//! Adapter weights are `Op::Weight` nodes named `<module>.lora_A.weight` /
//! `<module>.lora_B.weight`, where `<module>` is the HF module path of the linear; the PEFT
//! file key is `base_model.model.` + that name (spec §9.6, check 50; `runtime::peft`).
//!
//! Dropout on the branch input (spec §6.1.2, PEFT's `lora_B(lora_A(dropout(x)))`): with
//! `lora_dropout > 0` each branch gets an `Op::Dropout` after the cast to the adapter dtype,
//! keyed by the graph input `dropout_key` (i32 `[3]`, see `qplc_ops::dropout::key_words`)
//! that the trainer feeds per micro-batch, with a salt derived from the module path so
//! every branch draws its own mask and a rebuilt graph draws the same ones (resume). With
//! `lora_dropout = 0` no op and no input are added.
use crate::pass::{Pass, PassContext};
use crate::targets::{LoraSelection, ModuleMatch};
use anyhow::{bail, Context, Result};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use qplc_compiler::config::{LoadedConfig, Mode};
use qplc_compiler::{BlockKind, Graph, NodeId, Scope};
use qplc_ops::{dropout, DType, Op, TensorType};
use std::collections::{BTreeMap, HashMap};

/// Name of the dropout key input (i32 `[3]`: seed low, seed high, active flag); evaluation
/// feeds active = 0.
pub const DROPOUT_KEY: &str = "dropout_key";

/// Which of the two LoRA matrices a weight is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraRole {
    /// `A [r, in]`, the down-projection.
    A,
    /// `B [out, r]`, the up-projection (zero at init).
    B,
}

impl LoraRole {
    /// The module segment PEFT uses (`lora_A` / `lora_B`).
    pub fn segment(self) -> &'static str {
        match self {
            LoraRole::A => "lora_A",
            LoraRole::B => "lora_B",
        }
    }
}

/// The graph weight name of a LoRA matrix of `module`: `<module>.lora_A.weight`.
pub fn lora_weight_name(module: &str, role: LoraRole) -> String {
    format!("{module}.{}.weight", role.segment())
}

/// The inverse of [`lora_weight_name`]: `(module, role)` for a LoRA weight name.
pub fn parse_lora_weight_name(name: &str) -> Option<(&str, LoraRole)> {
    if let Some(m) = name.strip_suffix(".lora_A.weight") {
        Some((m, LoraRole::A))
    } else {
        name.strip_suffix(".lora_B.weight")
            .map(|m| (m, LoraRole::B))
    }
}

/// The LoRA scaling factor: `α/r`, or `α/√r` for rank-stabilised LoRA (PEFT `use_rslora`).
pub fn lora_scaling(alpha: f64, rank: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

/// Adds LoRA branches to the selected linear layers.
#[derive(Clone, Debug)]
pub struct LoraPass {
    pub selection: LoraSelection,
    /// Default rank `r`.
    pub rank: usize,
    /// Default `lora_alpha`; the project trains with α = r (spec §6.1.2), loaded PEFT
    /// adapters may use anything.
    pub alpha: f64,
    /// Scaling `α/√r` instead of `α/r` (PEFT `use_rslora`).
    pub rslora: bool,
    /// Per-module rank overrides by module path (PEFT `rank_pattern`, or the shapes of a
    /// loaded adapter).
    pub rank_of: BTreeMap<String, usize>,
    /// Per-module alpha overrides by module path (PEFT `alpha_pattern`).
    pub alpha_of: BTreeMap<String, f64>,
    /// `lora_weight_dtype`: the dtype of A, B and of the branch computation.
    pub dtype: DType,
    /// `lora_dropout`: the probability of zeroing an element of the branch input. Zero for
    /// adapters loaded for inference, where dropout is the identity.
    pub dropout: f64,
}

impl LoraPass {
    /// The pass for a LoRA training config: α = r (spec §6.1.1), targets from
    /// `target_modules` (default all-linear) and `layers_to_transform`.
    pub fn from_config(cfg: &LoadedConfig) -> Result<LoraPass> {
        if cfg.mode() != Mode::Lora {
            bail!(
                "the lora pass needs LoRA mode, the config is in {:?}",
                cfg.mode()
            );
        }
        let c = &cfg.config;
        let rank = c.lora_rank.context("lora_rank is required for LoRA")? as usize;
        let dtype = DType::parse(&c.lora_weight_dtype)
            .with_context(|| format!("unknown lora_weight_dtype `{}`", c.lora_weight_dtype))?;
        Ok(LoraPass {
            selection: LoraSelection::new(
                ModuleMatch::from_config(c.target_modules.as_ref()),
                cfg.layers(),
            ),
            rank,
            alpha: rank as f64,
            rslora: false,
            rank_of: BTreeMap::new(),
            alpha_of: BTreeMap::new(),
            dtype,
            dropout: c.lora_dropout,
        })
    }

    /// `(rank, scaling)` for a module.
    pub fn rank_and_scaling(&self, module: &str) -> (usize, f64) {
        let r = self.rank_of.get(module).copied().unwrap_or(self.rank);
        let a = self.alpha_of.get(module).copied().unwrap_or(self.alpha);
        (r, lora_scaling(a, r, self.rslora))
    }

    /// Adds the branches to `graph`; returns the targeted module paths in graph order.
    pub fn apply(&self, graph: &mut Graph) -> Result<Vec<String>> {
        if !self.dtype.is_float() {
            bail!("LoRA weights must be float, got {}", self.dtype);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("lora_dropout must be in [0, 1), got {}", self.dropout);
        }
        let targets = self.selection.resolve(graph)?;
        let key = if self.dropout > 0.0 && !targets.is_empty() {
            Some(dropout_key_input(graph)?)
        } else {
            None
        };
        let mut branches_of: HashMap<String, usize> = HashMap::new();
        let mut modules = Vec::new();
        // One A/B pair per module, even if a module's linear is applied several times.
        let mut pairs: HashMap<String, (NodeId, NodeId)> = HashMap::new();
        for id in targets {
            let module = graph.node(id).module.clone();
            let (rank, scaling) = self.rank_and_scaling(&module);
            if rank == 0 {
                bail!("LoRA rank of `{module}` must be at least 1");
            }
            let pair = match pairs.get(&module) {
                Some(p) => *p,
                None => {
                    let p = add_pair(graph, id, rank, self.dtype)?;
                    pairs.insert(module.clone(), p);
                    modules.push(module.clone());
                    p
                }
            };
            let drop = key.map(|key| {
                let k = branches_of.entry(module.clone()).or_default();
                *k += 1;
                Dropout {
                    key,
                    p: self.dropout,
                    salt: dropout::salt_of(&format!("{module}.lora_dropout#{k}")),
                }
            });
            add_branch(graph, id, pair, scaling, self.dtype, drop)?;
        }
        Ok(modules)
    }
}

impl Pass for LoraPass {
    fn name(&self) -> &str {
        "lora"
    }
    fn run(&self, mut graph: Graph, cx: &mut PassContext) -> Result<Graph> {
        let modules = self.apply(&mut graph)?;
        cx.notes.push(format!(
            "lora: {} adapted linear modules, rank {}, alpha {}, adapter dtype {}",
            modules.len(),
            self.rank,
            self.alpha,
            self.dtype
        ));
        if self.dropout > 0.0 {
            cx.notes.push(format!(
                "lora: dropout p = {} on every branch input (fed by input `{DROPOUT_KEY}`)",
                self.dropout
            ));
        }
        Ok(graph)
    }
}

/// The A and B weight nodes for the linear `id`, in its block and layer.
fn add_pair(graph: &mut Graph, id: NodeId, rank: usize, dtype: DType) -> Result<(NodeId, NodeId)> {
    let ops = graph.operands(id);
    let w = graph.node(ops[1]).ty.shape.dims().to_vec();
    let (out_f, in_f) = (w[0], w[1]);
    let n = graph.node(id);
    let module = n.module.clone();
    let scope = Scope::new(module.clone(), n.block, n.layer);
    let mut weight = |role: LoraRole, shape: [usize; 2]| -> Result<NodeId> {
        let ty = TensorType::new(shape.to_vec(), dtype);
        let op = Op::Weight {
            name: lora_weight_name(&module, role),
            ty,
        };
        let wid = graph.add(op, &[], &scope.child(role.segment()))?;
        graph.node_mut(wid).trainable = true;
        Ok(wid)
    };
    let a = weight(LoraRole::A, [rank, in_f])?;
    let b = weight(LoraRole::B, [out_f, rank])?;
    Ok((a, b))
}

/// The `dropout_key` input, added once per graph.
pub(crate) fn dropout_key_input(graph: &mut Graph) -> Result<NodeId> {
    let ty = TensorType::new([3], DType::I32);
    if let Some((_, id)) = graph.inputs().into_iter().find(|(n, _)| n == DROPOUT_KEY) {
        if graph.node(id).ty != ty {
            bail!(
                "the graph already has a `{DROPOUT_KEY}` input of type {}, expected {ty}",
                graph.node(id).ty
            );
        }
        return Ok(id);
    }
    Ok(graph.add(
        Op::Input {
            name: DROPOUT_KEY.to_string(),
            ty,
        },
        &[],
        &Scope::new(DROPOUT_KEY, BlockKind::Inputs, None),
    )?)
}

/// The dropout of one branch.
#[derive(Clone, Copy)]
struct Dropout {
    key: NodeId,
    p: f64,
    salt: u64,
}

/// `y' = y + cast_back(s · B(A(dropout(cast(x)))))`, redirecting every user of `y` (and any
/// graph output that was `y`) to `y'`.
fn add_branch(
    graph: &mut Graph,
    id: NodeId,
    (a, b): (NodeId, NodeId),
    scaling: f64,
    dtype: DType,
    drop: Option<Dropout>,
) -> Result<()> {
    let users: Vec<(NodeId, usize)> = graph
        .g
        .edges_directed(id, Direction::Outgoing)
        .map(|e| (e.target(), *e.weight()))
        .collect();
    let x = graph.operands(id)[0];
    let n = graph.node(id);
    let compute = n.ty.dtype;
    let scope = Scope::new(n.module.clone(), n.block, n.layer);
    let mut h = x;
    if graph.node(x).ty.dtype != dtype {
        h = graph.add(Op::Cast { to: dtype }, &[h], &scope)?;
    }
    if let Some(d) = drop {
        // PEFT drops the input after casting it to the adapter dtype.
        let op = Op::Dropout {
            p: d.p,
            salt: d.salt,
        };
        h = graph.add(op, &[h, d.key], &scope.child("lora_dropout"))?;
    }
    h = graph.add(Op::Linear, &[h, a], &scope.child(LoraRole::A.segment()))?;
    h = graph.add(Op::Linear, &[h, b], &scope.child(LoraRole::B.segment()))?;
    h = graph.add(Op::Scale { factor: scaling }, &[h], &scope)?;
    if dtype != compute {
        h = graph.add(Op::Cast { to: compute }, &[h], &scope)?;
    }
    let sum = graph.add(Op::Binary(qplc_ops::BinaryOp::Add), &[id, h], &scope)?;
    for (user, pos) in users {
        // A user may take `y` at several operand positions; move exactly this one.
        let e = graph
            .g
            .edges_connecting(id, user)
            .find(|er| *er.weight() == pos)
            .map(|er| er.id())
            .expect("edge listed above still exists");
        graph.g.remove_edge(e);
        graph.g.add_edge(sum, user, pos);
    }
    for (_, out) in graph.outputs.iter_mut() {
        if *out == id {
            *out = sum;
        }
    }
    Ok(())
}
