//! `Graph::topo_order` with `recompute` nodes (set by the passes' `recompute` pass): they
//! run just before their first other reader, not where Kahn's smallest-index rule would put
//! them, so a recomputed value lives only as long as the backward needs it.
use qplc_compiler::{BlockKind, Graph, NodeId, Scope};
use qplc_ops::{DType, Op, TensorType, UnaryOp};

fn unary(g: &mut Graph, x: NodeId, s: &Scope) -> NodeId {
    g.add(Op::Unary(UnaryOp::Tanh), &[x], s).unwrap()
}

/// x → a → b (the "forward"), then c, d (the "backward") and r = tanh(x) read by d only.
fn graph(lazy: bool) -> (Graph, [NodeId; 6]) {
    let mut g = Graph::new();
    let s = Scope::new("m", BlockKind::Decoder, Some(0));
    let x = g
        .add(
            Op::Input {
                name: "x".into(),
                ty: TensorType::new([4], DType::F32),
            },
            &[],
            &s,
        )
        .unwrap();
    let a = unary(&mut g, x, &s);
    let b = unary(&mut g, a, &s);
    let c = unary(&mut g, b, &s);
    let r = unary(&mut g, x, &s);
    let d = g
        .add(Op::Binary(qplc_ops::BinaryOp::Add), &[c, r], &s)
        .unwrap();
    g.node_mut(r).recompute = lazy;
    g.set_output("d", d);
    (g, [x, a, b, c, r, d])
}

#[test]
fn without_recompute_nodes_the_order_is_smallest_index_first() {
    let (g, [x, a, b, c, r, d]) = graph(false);
    // r (index 4) is ready after x but waits behind a, b, c only by index.
    assert_eq!(g.topo_order().unwrap(), [x, a, b, c, r, d]);
}

#[test]
fn a_recompute_node_runs_just_before_its_first_reader() {
    let mut g = Graph::new();
    let s = Scope::new("m", BlockKind::Decoder, Some(0));
    let x = g
        .add(
            Op::Input {
                name: "x".into(),
                ty: TensorType::new([4], DType::F32),
            },
            &[],
            &s,
        )
        .unwrap();
    // Built in the order a pass appends: the recomputed chain r1 → r2 has small indices,
    // the long chain c1..c3 that runs first has larger ones.
    let r1 = unary(&mut g, x, &s);
    let r2 = unary(&mut g, r1, &s);
    let c1 = unary(&mut g, x, &s);
    let c2 = unary(&mut g, c1, &s);
    let c3 = unary(&mut g, c2, &s);
    let d = g
        .add(Op::Binary(qplc_ops::BinaryOp::Add), &[c3, r2], &s)
        .unwrap();
    g.set_output("d", d);
    assert_eq!(g.topo_order().unwrap(), [x, r1, r2, c1, c2, c3, d]);
    g.node_mut(r1).recompute = true;
    g.node_mut(r2).recompute = true;
    assert_eq!(g.topo_order().unwrap(), [x, c1, c2, c3, r1, r2, d]);
    g.verify().unwrap();
}

#[test]
fn recompute_nodes_only_outputs_read_come_last() {
    let (mut g, [x, a, b, c, r, d]) = graph(true);
    g.set_output("r", r);
    assert_eq!(g.topo_order().unwrap(), [x, a, b, c, r, d]);
    let lonely = unary(&mut g, a, &Scope::new("m", BlockKind::Decoder, Some(0)));
    g.node_mut(lonely).recompute = true;
    g.set_output("lonely", lonely);
    let order = g.topo_order().unwrap();
    assert_eq!(order.last(), Some(&lonely));
    assert_eq!(order.len(), 7);
}

#[test]
fn a_cycle_through_recompute_nodes_is_still_reported() {
    let (mut g, [_, a, _, _, r, _]) = graph(true);
    g.g.add_edge(r, a, 1);
    g.g.add_edge(a, r, 1);
    assert!(g.topo_order().is_err());
}
