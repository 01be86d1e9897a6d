//! The `simplify` pass: removes work that the adapter and autodiff passes leave behind
//! without changing a single bit of any result.
//!
//! * **Identities**: `Scale{1.0}` (LoRA with `alpha = r`), a `Cast` to the dtype the value
//!   already has, a `Reshape` to the same shape, a `Transpose` by the identity permutation.
//!   Each is exact, so the node's users read its operand instead.
//! * **Common subexpressions**: two nodes with the same op and the same operands compute the
//!   same value (every op is a pure function of its operands — `Dropout` too: its mask is a
//!   hash of the key operand, the salt and the index), so the later one is dropped. The LoRA
//!   pass casts a layer's normed input to f32 once per adapted projection (q, k, v; gate,
//!   up): the copies merge into one buffer, which the backward would otherwise keep alive
//!   three times over.
//!
//! * **Loss casts**: the loss takes f32 logits (`logits.float()`, as transformers does), so
//!   a bf16 model has `CrossEntropy(Cast(z → f32))` and `Cast(CrossEntropyBackward(Cast(z →
//!   f32), ..) → bf16)`. Both ops read any float dtype and compute in f32 (f64 sums), and the
//!   backward rounds its result once to the logits' dtype, so reading `z` itself is exact and
//!   neither the f32 logits nor their f32 gradient (each 2 GiB at T = 4096, V = 128k) exist.
//!
//! * **Product casts**: a LoRA branch computes in f32 on `Cast(x → f32)` of the bf16 input
//!   (and the backward on `Cast(g → f32)` of the bf16 output gradient). A `Linear` / `MatMul`
//!   with such a cast next to an f32 operand reads the narrower value itself: a product of a
//!   bf16 and an f32 operand is the f32 product of the exactly widened values (the ops' type
//!   rule), so no bit changes, and a backend may read the bf16 values directly instead of an
//!   f32 copy twice their size (the CUDA backend's skinny kernels do).
//!
//! Must run before `recompute`, whose duplicated forward nodes are deliberate copies.
use crate::fuse::{remove_dead, replace_uses};
use crate::pass::{Pass, PassContext};
use anyhow::Result;
use qplc_compiler::{Graph, NodeId, Scope};
use qplc_ops::{DType, Op};
use std::collections::HashMap;

/// What one run removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimplifyStats {
    /// Nodes whose users now read their operand.
    pub identities: usize,
    /// Nodes merged into an earlier identical one.
    pub duplicates: usize,
    /// Nodes removed in all (the above and what became unused through them).
    pub removed: usize,
}

pub struct SimplifyPass;

impl Pass for SimplifyPass {
    fn name(&self) -> &str {
        "simplify"
    }

    fn run(&self, mut graph: Graph, cx: &mut PassContext) -> Result<Graph> {
        let s = simplify(&mut graph)?;
        if s.removed > 0 {
            cx.notes.push(format!(
                "simplify: {} identity op(s) and {} duplicate(s) removed ({} node(s) in all)",
                s.identities, s.duplicates, s.removed
            ));
        }
        Ok(graph)
    }
}

/// The operand a node passes through unchanged, if the node is an identity.
fn identity_of(graph: &Graph, id: NodeId) -> Option<NodeId> {
    let n = graph.node(id);
    let operands = graph.operands(id);
    let [x] = operands[..] else {
        return None;
    };
    if graph.node(x).ty != n.ty {
        return None;
    }
    let exact = match &n.op {
        Op::Scale { factor } => *factor == 1.0,
        Op::Cast { .. } | Op::Reshape { .. } => true,
        Op::Transpose { perm } => perm.iter().enumerate().all(|(i, p)| i == *p),
        _ => false,
    };
    exact.then_some(x)
}

/// `z` when `id` is a widening cast `Cast(z → f32)` of a narrower float.
fn widened_from(graph: &Graph, id: NodeId) -> Option<NodeId> {
    if graph.node(id).op != (Op::Cast { to: DType::F32 }) {
        return None;
    }
    let z = graph.operands(id)[0];
    let dt = graph.node(z).ty.dtype;
    (dt.is_float() && dt != DType::F32).then_some(z)
}

/// Rewrites the loss ops to read the logits in their own dtype (module doc); returns the
/// nodes whose users moved to a new node.
fn fold_loss_casts(graph: &mut Graph) -> Result<Vec<NodeId>> {
    let mut replaced = Vec::new();
    for id in graph.topo_order()? {
        if graph.g.node_weight(id).is_none() {
            continue;
        }
        let n = graph.node(id).clone();
        let scope = Scope::new(n.module.clone(), n.block, n.layer);
        match &n.op {
            Op::CrossEntropy => {
                let ops = graph.operands(id);
                if let Some(z) = widened_from(graph, ops[0]) {
                    let new = graph.add(Op::CrossEntropy, &[z, ops[1]], &scope)?;
                    replace_uses(graph, id, new);
                    replaced.push(id);
                }
            }
            Op::Cast { to } => {
                let b = graph.operands(id)[0];
                if graph.node(b).op != Op::CrossEntropyBackward {
                    continue;
                }
                let ops = graph.operands(b);
                match widened_from(graph, ops[0]) {
                    Some(z) if graph.node(z).ty.dtype == *to => {
                        let new =
                            graph.add(Op::CrossEntropyBackward, &[z, ops[1], ops[2]], &scope)?;
                        replace_uses(graph, id, new);
                        replaced.push(id);
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    Ok(replaced)
}

/// Rewrites products to read narrower floats instead of their f32 casts (module doc);
/// returns the nodes whose users moved to a new node.
fn fold_product_casts(graph: &mut Graph) -> Result<Vec<NodeId>> {
    let mut replaced = Vec::new();
    for id in graph.topo_order()? {
        if graph.g.node_weight(id).is_none() {
            continue;
        }
        let n = graph.node(id).clone();
        if !matches!(n.op, Op::Linear | Op::MatMul { .. }) || n.ty.dtype != DType::F32 {
            continue;
        }
        let mut ops = graph.operands(id);
        // With a bias the f32 sum is rounded by the op as a whole; keep those as they are.
        if ops.len() != 2 {
            continue;
        }
        let mut folded = false;
        for slot in 0..2 {
            if graph.node(ops[1 - slot]).ty.dtype != DType::F32 {
                continue;
            }
            if let Some(z) = widened_from(graph, ops[slot]) {
                ops[slot] = z;
                folded = true;
            }
        }
        if !folded {
            continue;
        }
        let scope = Scope::new(n.module.clone(), n.block, n.layer);
        let new = graph.add(n.op.clone(), &ops, &scope)?;
        anyhow::ensure!(
            graph.node(new).ty == n.ty,
            "simplify: folding a cast into {} changed its type from {} to {}",
            n.op.name(),
            n.ty,
            graph.node(new).ty
        );
        replace_uses(graph, id, new);
        replaced.push(id);
    }
    Ok(replaced)
}

/// Removes identities and merges duplicates, to a fixed point (merging two nodes can make
/// their users duplicates in turn; one pass in topological order catches that already, since
/// a node's operands are final when it is visited).
pub fn simplify(graph: &mut Graph) -> Result<SimplifyStats> {
    let mut stats = SimplifyStats::default();
    let mut replaced = fold_loss_casts(graph)?;
    stats.identities += replaced.len();
    // Key: the op's exact Debug form (f64 parameters print round-trip) and operand ids.
    let mut seen: HashMap<(String, Vec<NodeId>), NodeId> = HashMap::new();
    for id in graph.topo_order()? {
        if graph.g.node_weight(id).is_none() {
            continue;
        }
        if let Some(x) = identity_of(graph, id) {
            replace_uses(graph, id, x);
            replaced.push(id);
            stats.identities += 1;
            continue;
        }
        let n = graph.node(id);
        // Inputs and weights are bound by name; keep each node the runtime binds.
        if matches!(n.op, Op::Input { .. } | Op::Weight { .. }) {
            continue;
        }
        let key = (format!("{:?}", n.op), graph.operands(id));
        match seen.get(&key) {
            Some(&first) if graph.node(first).ty == graph.node(id).ty => {
                replace_uses(graph, id, first);
                replaced.push(id);
                stats.duplicates += 1;
            }
            _ => {
                seen.insert(key, id);
            }
        }
    }
    // After the identities: `Scale{1}` between a cast and a product is gone by now.
    let folded = fold_product_casts(graph)?;
    stats.identities += folded.len();
    replaced.extend(folded);
    stats.removed = remove_dead(graph, replaced);
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qplc_compiler::{BlockKind, Scope};
    use qplc_ops::{DType, TensorType, UnaryOp};

    fn scope() -> Scope {
        Scope::new("m", BlockKind::Decoder, Some(0))
    }

    fn input(g: &mut Graph, name: &str, dtype: DType) -> NodeId {
        g.add(
            Op::Input {
                name: name.into(),
                ty: TensorType::new(vec![4, 3], dtype),
            },
            &[],
            &scope(),
        )
        .unwrap()
    }

    #[test]
    fn identities_and_duplicates_go_and_the_rest_stays() {
        let mut g = Graph::new();
        let s = scope();
        let x = input(&mut g, "x", DType::BF16);
        let one = g.add(Op::Scale { factor: 1.0 }, &[x], &s).unwrap();
        let two = g.add(Op::Scale { factor: 2.0 }, &[x], &s).unwrap();
        let c1 = g.add(Op::Cast { to: DType::F32 }, &[one], &s).unwrap();
        let c2 = g.add(Op::Cast { to: DType::F32 }, &[x], &s).unwrap();
        let same = g.add(Op::Cast { to: DType::BF16 }, &[two], &s).unwrap();
        let e1 = g.add(Op::Unary(UnaryOp::Exp), &[c1], &s).unwrap();
        let e2 = g.add(Op::Unary(UnaryOp::Exp), &[c2], &s).unwrap();
        let sum = g
            .add(Op::Binary(qplc_ops::BinaryOp::Add), &[e1, e2], &s)
            .unwrap();
        g.set_output("sum", sum);
        g.set_output("same", same);
        let stats = simplify(&mut g).unwrap();
        g.verify().unwrap();
        // scale 1.0 and the bf16→bf16 cast; c2 merges into c1, then e2 into e1.
        assert_eq!(stats.identities, 2, "{stats:?}");
        assert_eq!(stats.duplicates, 2, "{stats:?}");
        assert_eq!(g.output("same"), Some(two));
        let sum = g.output("sum").unwrap();
        assert_eq!(g.operands(sum), vec![e1, e1]);
        assert_eq!(g.operands(e1), vec![c1]);
        assert_eq!(g.operands(c1), vec![x]);
        // x, scale 2.0, cast, exp, add.
        assert_eq!(g.g.node_count(), 5);
    }

    #[test]
    fn products_read_bf16_values_instead_of_their_f32_casts() {
        let mut g = Graph::new();
        let s = scope();
        // x [4, 3] bf16 (a layer input), a [4, 3] f32 (an adapter, as Linear's [out, in]).
        let x = input(&mut g, "x", DType::BF16);
        let a = input(&mut g, "a", DType::F32);
        let xf = g.add(Op::Cast { to: DType::F32 }, &[x], &s).unwrap();
        let h = g.add(Op::Linear, &[xf, a], &s).unwrap();
        // The A gradient reads the cast as the second operand: hᵀ · x.
        let ga = g
            .add(
                Op::MatMul {
                    ta: true,
                    tb: false,
                },
                &[h, xf],
                &s,
            )
            .unwrap();
        // Two casts: one folds; folding both would make a bf16 product.
        let y = input(&mut g, "y", DType::BF16);
        let yf = g.add(Op::Cast { to: DType::F32 }, &[y], &s).unwrap();
        let both = g
            .add(
                Op::MatMul {
                    ta: true,
                    tb: false,
                },
                &[xf, yf],
                &s,
            )
            .unwrap();
        g.set_output("h", h);
        g.set_output("ga", ga);
        g.set_output("both", both);
        let stats = simplify(&mut g).unwrap();
        g.verify().unwrap();
        assert_eq!(stats.identities, 3, "{stats:?}");
        let (h, ga) = (g.output("h").unwrap(), g.output("ga").unwrap());
        assert_eq!(g.operands(h), vec![x, a]);
        assert_eq!(g.operands(ga), vec![h, x]);
        assert_eq!(g.node(h).ty, TensorType::new(vec![4, 4], DType::F32));
        assert_eq!(g.node(ga).ty, TensorType::new(vec![4, 3], DType::F32));
        let both = g.output("both").unwrap();
        assert_eq!(g.operands(both), vec![x, yf]);
        assert_eq!(g.node(both).ty.dtype, DType::F32);
    }

    #[test]
    fn different_parameters_or_operands_are_not_merged() {
        let mut g = Graph::new();
        let s = scope();
        let x = input(&mut g, "x", DType::F32);
        let y = input(&mut g, "y", DType::F32);
        let a = g.add(Op::Scale { factor: 0.5 }, &[x], &s).unwrap();
        let b = g.add(Op::Scale { factor: 0.25 }, &[x], &s).unwrap();
        let c = g.add(Op::Scale { factor: 0.5 }, &[y], &s).unwrap();
        for (i, n) in [a, b, c].into_iter().enumerate() {
            g.set_output(&format!("o{i}"), n);
        }
        let stats = simplify(&mut g).unwrap();
        assert_eq!(stats, SimplifyStats::default());
        assert_eq!(g.g.node_count(), 5);
    }

    #[test]
    fn the_loss_reads_bf16_logits_without_f32_copies() {
        let mut g = Graph::new();
        let s = scope();
        let ty = |d| TensorType::new(vec![4, 3], d);
        let z = g
            .add(
                Op::Input {
                    name: "z".into(),
                    ty: ty(DType::BF16),
                },
                &[],
                &s,
            )
            .unwrap();
        let y = g
            .add(
                Op::Input {
                    name: "y".into(),
                    ty: TensorType::new(vec![4], DType::I32),
                },
                &[],
                &s,
            )
            .unwrap();
        let one = g
            .add(
                Op::Fill {
                    value: 1.0,
                    ty: TensorType::new(Vec::<usize>::new(), DType::F32),
                },
                &[],
                &s,
            )
            .unwrap();
        let wide = g.add(Op::Cast { to: DType::F32 }, &[z], &s).unwrap();
        let loss = g.add(Op::CrossEntropy, &[wide, y], &s).unwrap();
        let grad = g
            .add(Op::CrossEntropyBackward, &[wide, y, one], &s)
            .unwrap();
        let back = g.add(Op::Cast { to: DType::BF16 }, &[grad], &s).unwrap();
        g.set_output("loss", loss);
        g.set_output("dz", back);
        simplify(&mut g).unwrap();
        g.verify().unwrap();
        let (loss, dz) = (g.output("loss").unwrap(), g.output("dz").unwrap());
        assert_eq!(g.operands(loss), vec![z, y]);
        assert_eq!(g.node(dz).op, Op::CrossEntropyBackward);
        assert_eq!(g.operands(dz), vec![z, y, one]);
        assert_eq!(g.node(dz).ty, ty(DType::BF16));
        assert!(g.g.node_weight(wide).is_none(), "the f32 copy is gone");
    }
}
