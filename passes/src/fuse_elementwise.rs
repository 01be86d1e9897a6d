//! The `fuse_elementwise` pass: chains of elementwise ops become one [`Op::Fused`] node, so
//! a backend runs them as one kernel that reads each operand once and writes one result,
//! instead of one kernel (and one full-size intermediate buffer) per op. The training graphs
//! are full of such chains: each LoRA output is `Add(base, Cast(lora))`, SwiGLU is
//! `Mul(Silu(Add(..)), Add(..))`, and the backward sums a layer input's gradient over
//! `Cast`s of the adapters' f32 gradients (`Add(Add(Cast(a), Cast(b)), c)`).
//!
//! Grouping is greedy, from each group's last op (its *root*) back through its operands: an
//! operand joins when it is fusable ([`Op::is_fusable`], float in and out), has the root's
//! shape, is not a graph output, has the root's `recompute` flag, and every one of its users
//! is already in the group (its value is needed nowhere else, so no buffer of it must exist).
//! A one-operand step (unary, cast, scale) that other nodes read too is *copied* into the
//! group instead (its operands stay inputs): each group recomputes it, and once every reader
//! has copied it, its buffer no longer exists either. Under checkpointing SwiGLU's
//! `silu(gate)` is read by the recomputed down-projection input and by the backward.
//! A small-k product whose value only the group reads becomes a step too (`Op::Fused`).
//! A region of a graph is a DAG, not a tree, which is why this is a walk over users rather
//! than egg rewrites (egg extracts trees; [`crate::fuse`] keeps using it for the
//! cross-entropy patterns). Singletons stay as they are.
//!
//! Exact: a fused step rounds to its own dtype as the op alone would (see `Op::Fused`), so
//! results are bit for bit those of the unfused graph; tests check it on whole training steps.
//! Runs after `simplify` (which merges duplicate casts first) and after `recompute`: a
//! forward value the backward reads from its recomputed copy is then read by the forward
//! alone and fuses with it; a group never mixes recomputed and original nodes (the flag
//! decides where `Graph::topo_order` places a node).
use crate::fuse::{remove_dead, replace_uses};
use crate::pass::{Pass, PassContext};
use anyhow::{Context, Result};
use qplc_compiler::{Graph, NodeId, Scope};
use qplc_ops::{FusedArg, FusedStep, Op};
use std::collections::{HashMap, HashSet};

/// Most steps in one fused node: keeps generated kernels short and register use low.
pub const MAX_STEPS: usize = 24;
/// Most distinct operands of one fused node.
pub const MAX_INPUTS: usize = 12;
/// Longest inner dimension of a product a group takes in (a LoRA rank): such a product is
/// bound by writing its result, which it then no longer does.
pub const MAX_PRODUCT_K: usize = 64;

/// What one run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FuseElementwiseStats {
    /// Fused nodes made.
    pub groups: usize,
    /// Elementwise nodes they replace.
    pub nodes: usize,
}

pub struct FuseElementwisePass {
    /// `fuse_elementwise` of the config (on unless turned off).
    pub enabled: bool,
}

impl FuseElementwisePass {
    pub fn from_config(cfg: &qplc_compiler::config::LoadedConfig) -> Self {
        FuseElementwisePass {
            enabled: cfg.config.fuse_elementwise,
        }
    }
}

impl Pass for FuseElementwisePass {
    fn name(&self) -> &str {
        "fuse_elementwise"
    }

    fn run(&self, mut graph: Graph, cx: &mut PassContext) -> Result<Graph> {
        if !self.enabled {
            return Ok(graph);
        }
        let s = fuse_elementwise(&mut graph)?;
        if s.groups > 0 {
            cx.notes.push(format!(
                "fuse_elementwise: {} elementwise op(s) run as {} fused kernel(s)",
                s.nodes, s.groups
            ));
        }
        Ok(graph)
    }
}

fn fusable(graph: &Graph, id: NodeId) -> bool {
    let n = graph.node(id);
    n.op.is_fusable()
        && n.ty.dtype.is_float()
        && graph
            .operands(id)
            .iter()
            .all(|&o| graph.node(o).ty.dtype.is_float())
}

/// A step cheap enough to compute in every group that reads it rather than store: one
/// operand, a few instructions an element.
fn copyable(graph: &Graph, id: NodeId) -> bool {
    matches!(
        graph.node(id).op,
        Op::Unary(_) | Op::Cast { .. } | Op::Scale { .. } | Op::AddScalar { .. }
    )
}

/// A bias-free product of two f32 operands over at most `MAX_PRODUCT_K` terms, f32 result.
fn small_f32_product(graph: &Graph, id: NodeId) -> bool {
    let n = graph.node(id);
    let ops = graph.operands(id);
    if !n.op.is_fusable_product() || ops.len() != 2 || n.ty.dtype != qplc_ops::DType::F32 {
        return false;
    }
    if ops
        .iter()
        .any(|&o| graph.node(o).ty.dtype != qplc_ops::DType::F32)
    {
        return false;
    }
    let a = &graph.node(ops[0]).ty.shape;
    let k = match n.op {
        Op::MatMul { ta: true, .. } => a.dims()[a.rank() - 2],
        _ => a.last(),
    };
    k <= MAX_PRODUCT_K
}

/// The groups (each in topological order, root last), found on the unchanged graph.
fn find_groups(graph: &Graph, order: &[NodeId]) -> Vec<Vec<NodeId>> {
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let outputs: HashSet<NodeId> = graph.outputs.iter().map(|(_, id)| *id).collect();
    let mut taken: HashSet<NodeId> = HashSet::new();
    // One-operand steps copied into groups while other users still read them.
    let mut copied: HashSet<NodeId> = HashSet::new();
    let mut groups = Vec::new();
    for &root in order.iter().rev() {
        if taken.contains(&root) || copied.contains(&root) || !fusable(graph, root) {
            continue;
        }
        let rn = graph.node(root);
        let mut members: HashSet<NodeId> = HashSet::from([root]);
        let mut inputs: HashSet<NodeId> = graph.operands(root).into_iter().collect();
        loop {
            let mut cands: Vec<NodeId> = inputs.iter().copied().collect();
            cands.sort_by_key(|id| std::cmp::Reverse(pos[id]));
            // A value whose readers are all in the group joins it; a one-operand step read
            // elsewhere too (SwiGLU's `silu(gate)`, which a recomputed product input and the
            // backward both read) is copied into the group instead (`copyable`).
            let next = cands.into_iter().find_map(|p| {
                let n = graph.node(p);
                let eligible = !taken.contains(&p)
                    && !outputs.contains(&p)
                    && fusable(graph, p)
                    && n.ty.shape == rn.ty.shape;
                if !eligible {
                    return None;
                }
                let users = graph.users(p);
                if users.iter().any(|u| copied.contains(u)) {
                    return None;
                }
                // A copy leaves the node where it is, so it may cross the recompute flag
                // (the backward copying a recomputed `silu`); a joining node moves into the
                // group and may not.
                if users.iter().all(|u| members.contains(u)) && n.recompute == rn.recompute {
                    Some((p, false))
                } else {
                    copyable(graph, p).then_some((p, true))
                }
            });
            let Some((p, copy)) = next else { break };
            if copy {
                // Its operands stay inputs: the copy reads them, the original still exists.
                if members.len() + 1 > MAX_STEPS {
                    break;
                }
                let mut grown = inputs.clone();
                grown.remove(&p);
                grown.extend(graph.operands(p));
                if grown.len() > MAX_INPUTS {
                    break;
                }
                members.insert(p);
                copied.insert(p);
                inputs = grown;
                continue;
            }
            let mut grown = inputs.clone();
            grown.remove(&p);
            grown.extend(
                graph
                    .operands(p)
                    .into_iter()
                    .filter(|o| !members.contains(o)),
            );
            if members.len() + 1 > MAX_STEPS || grown.len() > MAX_INPUTS {
                break;
            }
            members.insert(p);
            inputs = grown;
        }
        // One small-k f32 product whose value only this group reads becomes a step: the
        // group is its epilogue (a LoRA up-projection's cast and add into the base output).
        let product = inputs.iter().copied().find(|&p| {
            let n = graph.node(p);
            !taken.contains(&p)
                && !outputs.contains(&p)
                && small_f32_product(graph, p)
                && n.ty.shape == rn.ty.shape
                && n.recompute == rn.recompute
                && graph.users(p).iter().all(|u| members.contains(u))
        });
        if let Some(p) = product {
            let mut grown = inputs.clone();
            grown.remove(&p);
            grown.extend(graph.operands(p));
            if members.len() < MAX_STEPS && grown.len() <= MAX_INPUTS {
                members.insert(p);
            }
        }
        if members.len() > 1 {
            let mut g: Vec<NodeId> = members.into_iter().collect();
            g.sort_by_key(|id| pos[id]);
            taken.extend(g.iter().copied().filter(|m| !copied.contains(m)));
            groups.push(g);
        }
    }
    groups.sort_by_key(|g| pos[g.last().expect("groups are not empty")]);
    groups
}

/// Replaces every fusable chain by one `Op::Fused` node.
pub fn fuse_elementwise(graph: &mut Graph) -> Result<FuseElementwiseStats> {
    let order = graph.topo_order()?;
    let groups = find_groups(graph, &order);
    let mut stats = FuseElementwiseStats::default();
    // Roots in topological order: a later group's operands that were earlier roots already
    // point at their fused nodes (`replace_uses`), and members are never replaced.
    for members in groups {
        let root = *members.last().expect("groups are not empty");
        let index: HashMap<NodeId, usize> =
            members.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let mut inputs: Vec<NodeId> = Vec::new();
        let mut steps = Vec::with_capacity(members.len());
        for &m in &members {
            let args = graph
                .operands(m)
                .into_iter()
                .map(|o| match index.get(&o) {
                    Some(&j) => FusedArg::Step(j),
                    None => FusedArg::Input(match inputs.iter().position(|&i| i == o) {
                        Some(k) => k,
                        None => {
                            inputs.push(o);
                            inputs.len() - 1
                        }
                    }),
                })
                .collect();
            steps.push(FusedStep {
                op: graph.node(m).op.clone(),
                args,
            });
        }
        let rn = graph.node(root).clone();
        let scope = Scope::new(rn.module.clone(), rn.block, rn.layer);
        let fused = graph
            .add(Op::Fused { steps }, &inputs, &scope)
            .with_context(|| format!("fusing the elementwise chain ending in `{}`", rn.module))?;
        let ty = &graph.node(fused).ty;
        anyhow::ensure!(
            *ty == rn.ty,
            "fused chain ending in `{}` infers {ty}, the chain gave {}",
            rn.module,
            rn.ty
        );
        graph.node_mut(fused).recompute = rn.recompute;
        replace_uses(graph, root, fused);
        remove_dead(graph, vec![root]);
        stats.groups += 1;
        stats.nodes += members.len();
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qplc_compiler::BlockKind;
    use qplc_ops::{BinaryOp, DType, TensorType, UnaryOp};

    fn scope() -> Scope {
        Scope::new("m", BlockKind::Decoder, Some(0))
    }

    /// Runs the pass, checks the graph, and returns (groups, nodes fused).
    fn fuse_checked(g: &mut Graph) -> (usize, usize) {
        let s = fuse_elementwise(g).unwrap();
        g.verify().unwrap();
        (s.groups, s.nodes)
    }

    fn input(g: &mut Graph, name: &str, shape: Vec<usize>, dtype: DType) -> NodeId {
        let ty = TensorType::new(shape, dtype);
        g.add(
            Op::Input {
                name: name.into(),
                ty,
            },
            &[],
            &scope(),
        )
        .unwrap()
    }

    #[test]
    fn a_lora_output_and_swiglu_become_one_node_each() {
        let mut g = Graph::new();
        let s = scope();
        let base = input(&mut g, "base", vec![4, 6], DType::BF16);
        let lora = input(&mut g, "lora", vec![4, 6], DType::F32);
        let up = input(&mut g, "up", vec![4, 6], DType::BF16);
        let c = g.add(Op::Cast { to: DType::BF16 }, &[lora], &s).unwrap();
        let gate = g.add(Op::Binary(BinaryOp::Add), &[base, c], &s).unwrap();
        let act = g.add(Op::Unary(UnaryOp::Silu), &[gate], &s).unwrap();
        let h = g.add(Op::Binary(BinaryOp::Mul), &[act, up], &s).unwrap();
        g.set_output("h", h);
        assert_eq!(fuse_checked(&mut g), (1, 4));
        let h = g.output("h").unwrap();
        // Operands in the order the steps first read them (the cast runs first).
        assert_eq!(g.operands(h), vec![lora, base, up]);
        let Op::Fused { steps } = &g.node(h).op else {
            panic!("not fused: {:?}", g.node(h).op)
        };
        assert_eq!(steps.len(), 4);
        assert_eq!(
            steps[3].args,
            vec![FusedArg::Step(2), FusedArg::Input(2)],
            "{steps:?}"
        );
        assert_eq!(g.g.node_count(), 4);
    }

    #[test]
    fn a_cheap_step_read_by_two_chains_is_computed_in_both() {
        // SwiGLU's backward under checkpointing: silu(gate) feeds the recomputed product
        // input h = silu·up and the up-projection's gradient g·silu.
        let mut g = Graph::new();
        let s = scope();
        let gate = input(&mut g, "gate", vec![4, 6], DType::BF16);
        let up = input(&mut g, "up", vec![4, 6], DType::BF16);
        let grad = input(&mut g, "grad", vec![4, 6], DType::BF16);
        let act = g.add(Op::Unary(UnaryOp::Silu), &[gate], &s).unwrap();
        let h = g.add(Op::Binary(BinaryOp::Mul), &[act, up], &s).unwrap();
        let d_up = g.add(Op::Binary(BinaryOp::Mul), &[grad, act], &s).unwrap();
        g.set_output("h", h);
        g.set_output("d_up", d_up);
        assert_eq!(fuse_checked(&mut g), (2, 4));
        // No node computes silu alone any more.
        assert!(g
            .g
            .node_indices()
            .all(|id| !matches!(g.node(id).op, Op::Unary(UnaryOp::Silu))));
        assert_eq!(g.operands(g.output("h").unwrap()), vec![gate, up]);
        // Operands in the order the steps first read them: the copied silu runs first.
        assert_eq!(g.operands(g.output("d_up").unwrap()), vec![gate, grad]);
    }

    #[test]
    fn values_read_elsewhere_stay_materialised() {
        let mut g = Graph::new();
        let s = scope();
        let a = input(&mut g, "a", vec![3, 5], DType::F32);
        let b = input(&mut g, "b", vec![3, 5], DType::F32);
        let w = input(&mut g, "w", vec![5], DType::F32);
        // `sum` is read by the fused tail and by `other`: it must keep its buffer.
        let sum = g.add(Op::Binary(BinaryOp::Add), &[a, b], &s).unwrap();
        let sq = g.add(Op::Unary(UnaryOp::Square), &[sum], &s).unwrap();
        let scaled = g.add(Op::Binary(BinaryOp::Mul), &[sq, w], &s).unwrap();
        let other = g
            .add(
                Op::Reduce {
                    op: qplc_ops::ReduceOp::Sum,
                    axis: 1,
                    keepdim: false,
                },
                &[sum],
                &s,
            )
            .unwrap();
        // A graph output is never absorbed either.
        let e = g.add(Op::Unary(UnaryOp::Exp), &[a], &s).unwrap();
        let e2 = g.add(Op::Scale { factor: 2.0 }, &[e], &s).unwrap();
        for (n, id) in [("scaled", scaled), ("other", other), ("e", e), ("e2", e2)] {
            g.set_output(n, id);
        }
        assert_eq!(fuse_checked(&mut g), (1, 2));
        let scaled = g.output("scaled").unwrap();
        // Broadcast operands (`w` is [5]) are fine.
        assert_eq!(g.operands(scaled), vec![sum, w]);
        assert_eq!(g.output("e"), Some(e));
        assert!(matches!(
            g.node(g.output("e2").unwrap()).op,
            Op::Scale { .. }
        ));
    }

    #[test]
    fn shape_changes_and_integer_casts_end_a_group() {
        let mut g = Graph::new();
        let s = scope();
        let a = input(&mut g, "a", vec![3, 1], DType::F32);
        let b = input(&mut g, "b", vec![1, 4], DType::F32);
        let ids = input(&mut g, "ids", vec![3, 4], DType::I32);
        let small = g.add(Op::Unary(UnaryOp::Exp), &[a], &s).unwrap();
        let big = g.add(Op::Binary(BinaryOp::Add), &[small, b], &s).unwrap();
        let f = g.add(Op::Cast { to: DType::F32 }, &[ids], &s).unwrap();
        let out = g.add(Op::Binary(BinaryOp::Mul), &[big, f], &s).unwrap();
        g.set_output("out", out);
        // exp is [3, 1] (not the root's shape) and the cast reads an integer: only add·mul.
        assert_eq!(fuse_checked(&mut g), (1, 2));
        assert_eq!(g.operands(g.output("out").unwrap()), vec![small, b, f]);
    }
}
