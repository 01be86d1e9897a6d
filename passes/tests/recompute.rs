//! The structure the `recompute` pass leaves (passes/src/recompute.rs, spec §5.5) on the
//! llama-gqa fixture's architecture, all weights trainable: what the backward still reads
//! from the forward, and where `Graph::topo_order` puts the recomputation.
use petgraph::visit::NodeIndexable;
use qplc_compiler::{build_forward, load_model_def, BlockKind, BuildOptions, Graph, NodeId};
use qplc_ops::{DType, Op};
use qplc_passes::{append_backward, append_loss, recompute, CheckpointPolicy, GRAD_PREFIX};

fn llama(layers: usize) -> Graph {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/llama-gqa/config.json"
    );
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    cfg["num_hidden_layers"] = layers.into();
    let def = load_model_def(Some("llama"), None).unwrap();
    let opts = BuildOptions {
        seq_len: 64,
        dtype: DType::F32,
    };
    let mut g = build_forward(&def, &cfg, &opts).unwrap().graph;
    for (_, id) in g.weights() {
        g.node_mut(id).trainable = true;
    }
    append_loss(&mut g).unwrap();
    append_backward(&mut g).unwrap();
    g
}

/// Ancestors of the non-gradient outputs.
fn forward_set(g: &Graph) -> Vec<bool> {
    let mut f = vec![false; g.g.node_bound()];
    let mut stack: Vec<NodeId> = g
        .outputs
        .iter()
        .filter(|(n, _)| !n.starts_with(GRAD_PREFIX))
        .map(|(_, id)| *id)
        .collect();
    while let Some(id) = stack.pop() {
        if !std::mem::replace(&mut f[id.index()], true) {
            stack.extend(g.operands(id));
        }
    }
    f
}

fn in_layer(g: &Graph, id: NodeId) -> Option<usize> {
    let n = g.node(id);
    match n.op {
        Op::Input { .. } | Op::Weight { .. } => None,
        _ if n.block == BlockKind::Decoder => n.layer,
        _ => None,
    }
}

/// Forward values of a decoder layer that some backward node reads, with whether the value
/// also feeds the forward outside its layer.
fn backward_reads(g: &Graph) -> Vec<(NodeId, bool)> {
    let f = forward_set(g);
    let mut out = Vec::new();
    for id in g.g.node_indices() {
        let Some(k) = in_layer(g, id).filter(|_| f[id.index()]) else {
            continue;
        };
        let users = g.users(id);
        let read = users.iter().any(|&u| !f[u.index()] && !g.node(u).recompute);
        if read {
            let leaves = users
                .iter()
                .any(|&u| f[u.index()] && in_layer(g, u) != Some(k));
            out.push((id, leaves));
        }
    }
    out
}

#[test]
fn layer_policy_leaves_the_backward_reading_only_layer_outputs() {
    let mut g = llama(3);
    assert!(
        backward_reads(&g).iter().any(|(_, leaves)| !leaves),
        "without the pass the backward reads a layer's inner values"
    );
    let n0 = g.g.node_count();
    let s = recompute(&mut g, CheckpointPolicy::Layer).unwrap();
    g.verify().unwrap();
    assert_eq!(s.layers, 3);
    assert!(s.recomputed_values > 0 && s.nodes_added >= s.recomputed_values);
    assert_eq!(g.g.node_count(), n0 + s.nodes_added);
    for (id, leaves) in backward_reads(&g) {
        assert!(
            leaves,
            "the backward still reads %{} ({})",
            id.index(),
            g.node(id).op.name()
        );
    }
}

/// Bytes of layer values the backward reads that do not leave their layer: what
/// checkpointing stores beyond the layer inputs.
fn stored_bytes(g: &Graph) -> usize {
    backward_reads(g)
        .into_iter()
        .filter(|(_, leaves)| !leaves)
        .map(|(id, _)| g.node(id).ty.bytes())
        .sum()
}

#[test]
fn auto_policy_stores_products_and_recomputes_the_cheap_ops() {
    let plain = llama(2);
    let mut g = plain.clone();
    let s = recompute(&mut g, CheckpointPolicy::Auto).unwrap();
    g.verify().unwrap();
    assert!(s.recomputed_values > 0);
    assert!(
        backward_reads(&g)
            .iter()
            .any(|(id, leaves)| !leaves && matches!(g.node(*id).op, Op::Linear)),
        "a product's output is stored"
    );
    let (auto, none) = (stored_bytes(&g), stored_bytes(&plain));
    assert!(
        0 < auto && auto < none,
        "auto stores {auto} B, none {none} B"
    );
    for id in g.g.node_indices() {
        let op = &g.node(id).op;
        if g.node(id).recompute {
            assert!(
                !matches!(op, Op::Linear | Op::MatMul { .. } | Op::Attention { .. }),
                "auto recomputes a `{}`",
                op.name()
            );
        }
    }
}

#[test]
fn auto_policy_stores_rotated_queries_rather_than_rotating_them_again() {
    // `q` (a product's output) and `rope(q)` are the same size: storing the rotated one
    // costs no more and spares the backward a rope (the tie-break of `min_cut_saved`).
    let mut g = llama(2);
    recompute(&mut g, CheckpointPolicy::Auto).unwrap();
    let reads = backward_reads(&g);
    assert!(
        reads
            .iter()
            .any(|(id, leaves)| !leaves && matches!(g.node(*id).op, Op::Rope(_))),
        "a rotated query or key is stored"
    );
    for id in g.g.node_indices() {
        let n = g.node(id);
        assert!(
            !(n.recompute && matches!(n.op, Op::Rope(_))),
            "auto recomputes a rope"
        );
    }
}

#[test]
fn none_policy_changes_nothing_and_the_pass_runs_once() {
    let mut g = llama(2);
    let before = qplc_compiler::dump::render(
        &g,
        qplc_compiler::dump::DumpFormat::Text,
        qplc_compiler::dump::DumpView::Full,
    )
    .unwrap();
    recompute(&mut g, CheckpointPolicy::None).unwrap();
    let after = qplc_compiler::dump::render(
        &g,
        qplc_compiler::dump::DumpFormat::Text,
        qplc_compiler::dump::DumpView::Full,
    )
    .unwrap();
    assert_eq!(before, after);
    recompute(&mut g, CheckpointPolicy::Layer).unwrap();
    let e = recompute(&mut g, CheckpointPolicy::Layer).unwrap_err();
    assert!(e.to_string().contains("once"), "{e}");
}

#[test]
fn recomputation_runs_in_the_backward_one_layer_after_another() {
    let layers = 4;
    let mut g = llama(layers);
    recompute(&mut g, CheckpointPolicy::Layer).unwrap();
    let order = g.topo_order().unwrap();
    let pos = |id: NodeId| order.iter().position(|&o| o == id).unwrap();
    let loss = pos(g.output("loss").unwrap());
    let mut spans = vec![(usize::MAX, 0usize); layers];
    for (p, &id) in order.iter().enumerate() {
        let n = g.node(id);
        if n.recompute {
            assert!(
                p > loss,
                "recompute node at step {p}, before the loss at {loss}"
            );
            let s = &mut spans[n.layer.unwrap()];
            *s = (s.0.min(p), s.1.max(p));
        }
    }
    // Backward goes from the last layer to the first; each layer's recomputation waits
    // until the layer after it is done with its own.
    for k in 0..layers - 1 {
        assert!(
            spans[k].0 > spans[k + 1].1,
            "layer {k} recomputes at {:?}, layer {} at {:?}",
            spans[k],
            k + 1,
            spans[k + 1]
        );
    }
}
