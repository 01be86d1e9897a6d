//! The structure the loss and autodiff passes produce: which gradients exist, where the
//! backward nodes live, and what is never differentiated.
use qplc_compiler::{build_forward, load_model_def, BlockKind, BuildOptions, Graph, NodeId, Scope};
use qplc_ops::{DType, Op, ReduceOp, TensorType};
use qplc_passes::{
    append_backward, append_loss, AutodiffPass, LossPass, PartitionPass, PassContext, PassManager,
};
use serde_json::json;

fn weight(g: &mut Graph, name: &str, shape: &[usize], trainable: bool, s: &Scope) -> NodeId {
    let id = g
        .add(
            Op::Weight {
                name: name.into(),
                ty: TensorType::new(shape.to_vec(), DType::F32),
            },
            &[],
            s,
        )
        .unwrap();
    g.node_mut(id).trainable = trainable;
    id
}

/// x → linear(w1) → linear(w2) → sum = loss, with w1/w2 trainable as given.
fn two_linears(w1_trainable: bool, w2_trainable: bool) -> (Graph, NodeId, NodeId) {
    let mut g = Graph::new();
    let s0 = Scope::new("layers.0", BlockKind::Decoder, Some(0));
    let s1 = Scope::new("layers.1", BlockKind::Decoder, Some(1));
    let x = g
        .add(
            Op::Input {
                name: "x".into(),
                ty: TensorType::new([3, 4], DType::F32),
            },
            &[],
            &s0,
        )
        .unwrap();
    let w1 = weight(&mut g, "w1", &[5, 4], w1_trainable, &s0);
    let w2 = weight(&mut g, "w2", &[2, 5], w2_trainable, &s1);
    let h = g.add(Op::Linear, &[x, w1], &s0).unwrap();
    let y = g.add(Op::Linear, &[h, w2], &s1).unwrap();
    let flat = g.add(Op::Reshape { shape: [6].into() }, &[y], &s1).unwrap();
    let loss = g
        .add(
            Op::Reduce {
                op: ReduceOp::Sum,
                axis: 0,
                keepdim: false,
            },
            &[flat],
            &Scope::new("loss", BlockKind::Loss, None),
        )
        .unwrap();
    g.set_output("loss", loss);
    (g, w1, w2)
}

fn grad_outputs(g: &Graph) -> Vec<String> {
    let mut v: Vec<String> = g
        .outputs
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| n.starts_with("grad:"))
        .collect();
    v.sort();
    v
}

#[test]
fn frozen_weight_gets_no_gradient_but_passes_activation_gradients_through() {
    let (mut g, w1, w2) = two_linears(true, false);
    let before = g.g.node_count();
    append_backward(&mut g).unwrap();
    g.verify().unwrap();
    assert_eq!(grad_outputs(&g), ["grad:w1"]);
    // w2 is used by its forward linear and by the dx product through it, nothing else:
    // no `gᵀ·h` product for the frozen weight.
    let users: Vec<Op> = g.users(w2).iter().map(|u| g.node(*u).op.clone()).collect();
    assert_eq!(users.len(), 2, "{users:?}");
    assert!(users.contains(&Op::Linear));
    assert!(users.contains(&Op::MatMul {
        ta: false,
        tb: false
    }));
    // w1's gradient is a [5, 4] product gᵀ·x.
    let gw1 = g.output("grad:w1").unwrap();
    assert_eq!(g.node(gw1).ty, g.node(w1).ty);
    assert_eq!(
        g.node(gw1).op,
        Op::MatMul {
            ta: true,
            tb: false
        }
    );
    assert!(g.g.node_count() > before);
}

#[test]
fn nothing_upstream_of_the_first_trainable_weight_is_differentiated() {
    // Only w2 trainable: no gradient reaches layer 0 at all.
    let (mut g, _, _) = two_linears(false, true);
    let before: Vec<NodeId> = g.g.node_indices().collect();
    append_backward(&mut g).unwrap();
    assert_eq!(grad_outputs(&g), ["grad:w2"]);
    for id in g.g.node_indices().filter(|id| !before.contains(id)) {
        assert_ne!(g.node(id).layer, Some(0), "{:?} in layer 0", g.node(id).op);
    }
}

#[test]
fn backward_nodes_carry_the_block_and_layer_of_their_forward_node() {
    let (mut g, _, _) = two_linears(true, true);
    let before: Vec<NodeId> = g.g.node_indices().collect();
    append_backward(&mut g).unwrap();
    let gw1 = g.output("grad:w1").unwrap();
    let gw2 = g.output("grad:w2").unwrap();
    assert_eq!(
        (g.node(gw1).block, g.node(gw1).layer),
        (BlockKind::Decoder, Some(0))
    );
    assert_eq!(g.node(gw1).module, "layers.0");
    assert_eq!(g.node(gw2).layer, Some(1));
    // The loss seed lives in the loss block.
    let seeds: Vec<NodeId> =
        g.g.node_indices()
            .filter(|id| !before.contains(id))
            .filter(|id| matches!(g.node(*id).op, Op::Fill { value, .. } if value == 1.0))
            .collect();
    assert_eq!(seeds.len(), 1);
    assert_eq!(g.node(seeds[0]).block, BlockKind::Loss);
}

#[test]
fn a_value_used_twice_receives_the_sum_of_both_contributions() {
    let mut g = Graph::new();
    let s = Scope::new("m", BlockKind::Decoder, Some(0));
    let w = weight(&mut g, "w", &[3], true, &s);
    let sq = g
        .add(Op::Binary(qplc_ops::BinaryOp::Mul), &[w, w], &s)
        .unwrap();
    let loss = g
        .add(
            Op::Reduce {
                op: ReduceOp::Sum,
                axis: 0,
                keepdim: false,
            },
            &[sq],
            &s,
        )
        .unwrap();
    g.set_output("loss", loss);
    append_backward(&mut g).unwrap();
    g.verify().unwrap();
    let gw = g.output("grad:w").unwrap();
    assert_eq!(g.node(gw).op, Op::Binary(qplc_ops::BinaryOp::Add));
}

#[test]
fn trainable_weight_the_loss_ignores_gets_a_zero_gradient_and_a_note() {
    let (mut g, _, _) = two_linears(true, false);
    let s = Scope::new("unused", BlockKind::Decoder, Some(0));
    weight(&mut g, "unused", &[2], true, &s);
    let notes = append_backward(&mut g).unwrap();
    let gu = g.output("grad:unused").unwrap();
    assert!(matches!(g.node(gu).op, Op::Fill { value, .. } if value == 0.0));
    assert!(notes.iter().any(|n| n.contains("`unused`")), "{notes:?}");
}

#[test]
fn autodiff_without_a_loss_output_says_which_pass_is_missing() {
    let mut g = Graph::new();
    let e = append_backward(&mut g).unwrap_err().to_string();
    assert!(e.contains("run the loss pass first"), "{e}");
}

fn tiny_llama(dtype: DType) -> Graph {
    let cfg = json!({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": true
    });
    let def = load_model_def(Some("llama"), None).unwrap();
    build_forward(&def, &cfg, &BuildOptions { seq_len: 8, dtype })
        .unwrap()
        .graph
}

#[test]
fn loss_pass_shifts_labels_and_casts_bf16_logits_to_f32() {
    let mut g = tiny_llama(DType::BF16);
    let loss = append_loss(&mut g).unwrap();
    g.verify().unwrap();
    assert_eq!(g.output("loss"), Some(loss));
    // The unfused form; the fuse pass turns it into `CrossEntropy` (passes/tests/fuse.rs).
    assert_eq!(g.node(loss).op, Op::Nll);
    assert_eq!(
        g.node(loss).ty,
        TensorType::new(Vec::<usize>::new(), DType::F32)
    );
    assert_eq!(g.node(loss).block, BlockKind::Loss);
    let ops = g.operands(loss);
    assert_eq!(g.node(ops[0]).op, Op::LogSoftmax);
    let z = g.operands(ops[0])[0];
    assert_eq!(g.node(z).op, Op::Cast { to: DType::F32 });
    assert_eq!(g.node(ops[1]).op, Op::Concat { axis: 0 });
    let labels = g
        .inputs()
        .into_iter()
        .find(|(n, _)| n == "labels")
        .unwrap()
        .1;
    assert_eq!(g.node(labels).ty, TensorType::new([8], DType::I32));
    assert_eq!(g.node(labels).block, BlockKind::Inputs);
}

#[test]
fn tied_embedding_gets_one_gradient_summing_embedding_and_head_uses() {
    let mut g = tiny_llama(DType::F32);
    for (_, id) in g.weights() {
        g.node_mut(id).trainable = true;
    }
    append_loss(&mut g).unwrap();
    append_backward(&mut g).unwrap();
    g.verify().unwrap();
    let names = grad_outputs(&g);
    // 2 layers × 9 tensors + embedding + final norm; no separate lm_head (tied).
    assert_eq!(names.len(), 20, "{names:?}");
    let ge = g.output("grad:model.embed_tokens.weight").unwrap();
    assert_eq!(g.node(ge).op, Op::Binary(qplc_ops::BinaryOp::Add));
    let parts: Vec<Op> = g
        .operands(ge)
        .iter()
        .map(|o| g.node(*o).op.clone())
        .collect();
    assert!(parts
        .iter()
        .any(|o| matches!(o, Op::EmbeddingBackward { vocab: 64 })));
}

#[test]
fn loss_and_autodiff_run_in_the_pass_manager_before_partition() {
    let mut g = tiny_llama(DType::BF16);
    for (name, id) in g.weights() {
        if name.contains("q_proj") {
            g.node_mut(id).trainable = true;
        }
    }
    let mut pm = PassManager::new();
    pm.add(LossPass).add(AutodiffPass).add(PartitionPass);
    pm.verify_each(true);
    let mut cx = PassContext::new(8, 2, "uniform");
    let run = pm.run(g, &mut cx).unwrap();
    assert_eq!(
        grad_outputs(&run.graph),
        [
            "grad:model.layers.0.self_attn.q_proj.weight",
            "grad:model.layers.1.self_attn.q_proj.weight"
        ]
    );
    // One packed attention backward per layer, shared by the q (and no k/v) gradient.
    let packed = run
        .graph
        .g
        .node_indices()
        .filter(|id| matches!(run.graph.node(*id).op, Op::AttentionBackward { .. }))
        .count();
    assert_eq!(packed, 2);
    // Gradients are bf16 like the weights.
    let gq = run
        .graph
        .output("grad:model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(run.graph.node(gq).ty.dtype, DType::BF16);
    assert!(cx.partition.is_some());
}
