//! The `accumulate` pass: `Add(c, MatMul(a, b))` becomes `MatMul(a, b, c)`, a product whose
//! epilogue adds `c` (cuBLASLt reads it while writing the result). The backward is full of
//! such sums: a layer input's gradient is `dq·Wq + dk·Wk + dv·Wv + …`, and a full fine-tune's
//! residual stream is `x + o_proj(a)`. Each add was a kernel reading two full-size tensors
//! and writing a third; now the product reads one more operand in its epilogue.
//!
//! Only narrow-float (bf16/f16) sums: there the fused form rounds once, `round(a·b + c)`,
//! where the add rounded the product first, `round(round(a·b) + c)` — closer to the exact
//! value, not bit-equal to the unfused graph. f32 graphs (the reference, and the adapters'
//! own f32 products, which run on skinny kernels without an epilogue) are left as they are.
//!
//! An add stays an add where `fuse_elementwise` would make it part of a longer chain (its
//! only reader is itself elementwise, e.g. a LoRA output `base + cast(lora)` feeding the
//! residual add): that chain already reads the product once, with no extra pass to save.
//! Roots go first (reverse topological order), so in `((p₁ + p₂) + p₃)` the outer add takes
//! `p₃`, after which the inner add's only reader is a product and it takes `p₂` in turn.
//! Runs after `recompute` (which decides on the plain graph) and before `fuse_elementwise`.
use crate::fuse::remove_dead;
use crate::pass::{Pass, PassContext};
use anyhow::Result;
use petgraph::Direction;
use qplc_compiler::{Graph, NodeId};
use qplc_ops::{BinaryOp, DType, Op};

pub struct AccumulatePass;

impl Pass for AccumulatePass {
    fn name(&self) -> &str {
        "accumulate"
    }

    fn run(&self, mut graph: Graph, cx: &mut PassContext) -> Result<Graph> {
        let n = accumulate(&mut graph)?;
        if n > 0 {
            cx.notes.push(format!(
                "accumulate: {n} add(s) of a product run in the product's epilogue"
            ));
        }
        Ok(graph)
    }
}

/// Rewrites the adds (module doc); returns how many became accumulating products.
pub fn accumulate(graph: &mut Graph) -> Result<usize> {
    let mut merged = 0;
    let mut dead = Vec::new();
    let mut order = graph.topo_order()?;
    order.reverse();
    for id in order {
        if !is_narrow_add(graph, id) || feeds_a_chain(graph, id) {
            continue;
        }
        let ops = graph.operands(id);
        // The later term of a sum first (autodiff appends each new contribution last).
        let Some((slot, (op, a, b))) = [1, 0]
            .into_iter()
            .find_map(|s| absorbable(graph, ops[s], id).map(|p| (s, p)))
        else {
            continue;
        };
        let (p, c) = (ops[slot], ops[1 - slot]);
        let incoming: Vec<_> = graph
            .g
            .edges_directed(id, Direction::Incoming)
            .map(|e| petgraph::visit::EdgeRef::id(&e))
            .collect();
        for e in incoming {
            graph.g.remove_edge(e);
        }
        graph.g.add_edge(a, id, 0);
        graph.g.add_edge(b, id, 1);
        graph.g.add_edge(c, id, 2);
        let module = graph.node(p).module.clone();
        let node = graph.node_mut(id);
        node.op = op;
        node.module = module;
        dead.push(p);
        merged += 1;
    }
    remove_dead(graph, dead);
    graph.verify()?;
    Ok(merged)
}

/// A same-type, non-broadcasting add of bf16/f16 tensors.
fn is_narrow_add(graph: &Graph, id: NodeId) -> bool {
    let n = graph.node(id);
    if n.op != Op::Binary(BinaryOp::Add) || !n.ty.dtype.is_float() || n.ty.dtype == DType::F32 {
        return false;
    }
    let ops = graph.operands(id);
    ops.len() == 2 && ops[0] != ops[1] && ops.iter().all(|&o| graph.node(o).ty == n.ty)
}

/// Whether the add's one reader is an elementwise op of its shape, which `fuse_elementwise`
/// would join it to.
fn feeds_a_chain(graph: &Graph, id: NodeId) -> bool {
    let users = graph.users(id);
    let is_output = graph.outputs.iter().any(|(_, o)| *o == id);
    match users[..] {
        [u] if !is_output => {
            let n = graph.node(u);
            n.op.is_fusable() && n.ty.shape == graph.node(id).ty.shape
        }
        _ => false,
    }
}

/// The product `p` as an accumulating `MatMul` and its two operands, if the add `add` may
/// take it in: a 2-D bias-free `Linear` or an unaccumulated `MatMul` of operands of its own
/// type, read by the add alone, in the same recompute region.
fn absorbable(graph: &Graph, p: NodeId, add: NodeId) -> Option<(Op, NodeId, NodeId)> {
    let n = graph.node(p);
    let ops = graph.operands(p);
    if ops.len() != 2
        || graph.users(p) != [add]
        || graph.outputs.iter().any(|(_, o)| *o == p)
        || n.recompute != graph.node(add).recompute
        || ops.iter().any(|&o| graph.node(o).ty.dtype != n.ty.dtype)
    {
        return None;
    }
    match n.op {
        Op::MatMul { ta, tb } => Some((Op::MatMul { ta, tb }, ops[0], ops[1])),
        Op::Linear if graph.node(ops[0]).ty.shape.rank() == 2 => Some((
            Op::MatMul {
                ta: false,
                tb: true,
            },
            ops[0],
            ops[1],
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qplc_compiler::{BlockKind, Scope};
    use qplc_ops::{TensorType, UnaryOp};

    fn scope() -> Scope {
        Scope::new("m", BlockKind::Decoder, Some(0))
    }

    fn input(g: &mut Graph, name: &str, shape: &[usize], dtype: DType) -> NodeId {
        let ty = TensorType::new(shape.to_vec(), dtype);
        let op = Op::Input {
            name: name.into(),
            ty,
        };
        g.add(op, &[], &scope()).unwrap()
    }

    const MM: Op = Op::MatMul {
        ta: false,
        tb: false,
    };
    const ADD: Op = Op::Binary(BinaryOp::Add);

    /// `dx = g₁·W₁ + g₂·W₂ + g₃·W₃` read by a non-elementwise op, in `dtype`.
    fn gradient_sum(dtype: DType) -> (Graph, NodeId) {
        let mut g = Graph::new();
        let s = scope();
        let mut terms = Vec::new();
        for i in 0..3 {
            let a = input(&mut g, &format!("g{i}"), &[4, 6], dtype);
            let w = input(&mut g, &format!("w{i}"), &[6, 5], dtype);
            terms.push(g.add(MM, &[a, w], &s).unwrap());
        }
        let s01 = g.add(ADD, &[terms[0], terms[1]], &s).unwrap();
        let sum = g.add(ADD, &[s01, terms[2]], &s).unwrap();
        let out = g.add(Op::Softmax, &[sum], &s).unwrap();
        g.set_output("out", out);
        (g, sum)
    }

    #[test]
    fn a_sum_of_bf16_products_becomes_a_chain_of_accumulating_products() {
        let (mut g, sum) = gradient_sum(DType::BF16);
        assert_eq!(accumulate(&mut g).unwrap(), 2);
        g.verify().unwrap();
        // The outer add took the last term; the inner add, now read by a product, the second.
        let outer = g.operands(sum);
        assert_eq!(g.node(sum).op, MM);
        assert_eq!(outer.len(), 3);
        let inner = outer[2];
        assert_eq!(g.node(inner).op, MM);
        assert_eq!(g.node(g.operands(inner)[2]).op, MM);
        assert!(!g.g.node_weights().any(|n| n.op == ADD));
    }

    #[test]
    fn f32_sums_and_sums_inside_elementwise_chains_stay_adds() {
        let (mut g, _) = gradient_sum(DType::F32);
        assert_eq!(accumulate(&mut g).unwrap(), 0);

        // base + lora read by another add only (a LoRA output feeding the residual add).
        let mut g = Graph::new();
        let s = scope();
        let x = input(&mut g, "x", &[4, 6], DType::BF16);
        let w = input(&mut g, "w", &[5, 6], DType::BF16);
        let d = input(&mut g, "delta", &[4, 5], DType::BF16);
        let r = input(&mut g, "residual", &[4, 5], DType::BF16);
        let base = g.add(Op::Linear, &[x, w], &s).unwrap();
        let out = g.add(ADD, &[base, d], &s).unwrap();
        let res = g.add(ADD, &[r, out], &s).unwrap();
        let y = g.add(Op::Unary(UnaryOp::Exp), &[res], &s).unwrap();
        g.set_output("y", y);
        assert_eq!(accumulate(&mut g).unwrap(), 0);
    }

    #[test]
    fn a_residual_add_of_a_linear_reads_the_residual_in_the_epilogue() {
        let mut g = Graph::new();
        let s = scope();
        let x = input(&mut g, "x", &[4, 6], DType::BF16);
        let w = input(&mut g, "w", &[5, 6], DType::BF16);
        let r = input(&mut g, "residual", &[4, 5], DType::BF16);
        let base = g.add(Op::Linear, &[x, w], &s).unwrap();
        let out = g.add(ADD, &[r, base], &s).unwrap();
        // Two readers: the add cannot join either one's chain.
        let a = g.add(Op::Unary(UnaryOp::Exp), &[out], &s).unwrap();
        let b = g.add(Op::Unary(UnaryOp::Neg), &[out], &s).unwrap();
        g.set_output("a", a);
        g.set_output("b", b);
        assert_eq!(accumulate(&mut g).unwrap(), 1);
        assert_eq!(
            g.node(out).op,
            Op::MatMul {
                ta: false,
                tb: true
            }
        );
        assert_eq!(g.operands(out), vec![x, w, r]);
        assert!(g.g.node_weight(base).is_none());
    }

    #[test]
    fn a_product_read_twice_or_across_the_recompute_boundary_stays() {
        // The outer add's last term read elsewhere too: that add stays, and so does the
        // inner one, whose only reader is then an add (a chain for fuse_elementwise).
        let (mut g, sum) = gradient_sum(DType::BF16);
        let last = g.operands(sum)[1];
        let extra = g.add(Op::Unary(UnaryOp::Exp), &[last], &scope()).unwrap();
        g.set_output("extra", extra);
        assert_eq!(accumulate(&mut g).unwrap(), 0);
        // A recomputed term runs where the backward needs it; the add is not recomputed.
        let (mut g, sum) = gradient_sum(DType::BF16);
        let last = g.operands(sum)[1];
        g.node_mut(last).recompute = true;
        assert_eq!(accumulate(&mut g).unwrap(), 0);
    }
}
