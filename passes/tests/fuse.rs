//! The fuse pass's egg rules on real model graphs: the loss pass's `Nll(LogSoftmax)` and the
//! backward autodiff derives from it become `CrossEntropy` / `CrossEntropyBackward`, and
//! nothing outside the loss changes. (That the two forms compute the same loss and
//! gradients is tests/fuse_loss.rs, which runs them on the CPU.)
use qplc_compiler::dump::{DumpFormat, DumpView};
use qplc_compiler::{build_forward, load_model_def, BlockKind, BuildOptions, Graph};
use qplc_ops::{BinaryOp, DType, Op, ReduceOp, UnaryOp};
use qplc_passes::{
    append_backward, append_loss, cross_entropy_rules, fuse, op_symbol, AutodiffPass, FusePass,
    FuseRule, LossPass, PartitionPass, PassContext, PassManager, SchedulePass,
};
use serde_json::json;
use std::collections::BTreeMap;

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

fn count(g: &Graph, pred: impl Fn(&Op) -> bool) -> usize {
    g.g.node_indices()
        .filter(|id| pred(&g.node(*id).op))
        .count()
}

/// Op-name histogram of the nodes outside the loss block.
fn outside_loss(g: &Graph) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for id in g.g.node_indices() {
        let n = g.node(id);
        if n.block != BlockKind::Loss {
            *m.entry(n.op.name()).or_default() += 1;
        }
    }
    m
}

fn trained(dtype: DType) -> Graph {
    let mut g = tiny_llama(dtype);
    for (_, id) in g.weights() {
        g.node_mut(id).trainable = true;
    }
    append_loss(&mut g).unwrap();
    append_backward(&mut g).unwrap();
    g.verify().unwrap();
    g
}

#[test]
fn loss_and_its_backward_become_the_fused_cross_entropy_on_a_llama_graph() {
    for dtype in [DType::F32, DType::BF16] {
        let mut g = trained(dtype);
        assert_eq!(count(&g, |o| *o == Op::Nll), 1);
        assert_eq!(count(&g, |o| *o == Op::NllBackward), 1);
        let before_outside = outside_loss(&g);
        let outputs_before: Vec<String> = g.outputs.iter().map(|(n, _)| n.clone()).collect();

        let stats = fuse(&mut g, &cross_entropy_rules()).unwrap();
        g.verify().unwrap();
        assert_eq!(
            stats.fired.iter().map(String::as_str).collect::<Vec<_>>(),
            ["cross-entropy", "cross-entropy-backward"]
        );
        assert_eq!(stats.rewritten, 2);
        for gone in [Op::Nll, Op::NllBackward, Op::LogSoftmax] {
            assert_eq!(count(&g, |o| *o == gone), 0, "{gone:?} left");
        }
        assert_eq!(count(&g, |o| *o == Op::CrossEntropy), 1);
        assert_eq!(count(&g, |o| *o == Op::CrossEntropyBackward), 1);
        let loss = g.output("loss").unwrap();
        assert_eq!(g.node(loss).op, Op::CrossEntropy);
        assert_eq!(g.node(loss).block, BlockKind::Loss);
        // The fused ops read the f32 logits and the shifted labels directly.
        let ops = g.operands(loss);
        // f32 logits reach the loss as the head's output, bf16 ones through a cast.
        let z_op = if dtype == DType::F32 {
            Op::Linear
        } else {
            Op::Cast { to: DType::F32 }
        };
        assert_eq!(g.node(ops[0]).op, z_op);
        assert_eq!(g.node(ops[1]).op, Op::Concat { axis: 0 });
        // Nothing outside the loss moved; every output is still there.
        assert_eq!(outside_loss(&g), before_outside);
        let outputs_after: Vec<String> = g.outputs.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(outputs_after, outputs_before);
        // Nothing of the unfused backward is left over in the loss block: only the fused
        // backward and the cast of its result back to the logits' dtype follow it.
        let ceb =
            g.g.node_indices()
                .find(|id| g.node(*id).op == Op::CrossEntropyBackward)
                .unwrap();
        let dead_exp = g.g.node_indices().any(|id| {
            g.node(id).block == BlockKind::Loss && g.node(id).op == Op::Unary(UnaryOp::Exp)
        });
        assert!(!dead_exp);
        assert_eq!(g.operands(ceb)[0], ops[0]);
    }
}

#[test]
fn forward_only_graph_gets_the_fused_forward() {
    let mut g = tiny_llama(DType::F32);
    append_loss(&mut g).unwrap();
    let stats = fuse(&mut g, &cross_entropy_rules()).unwrap();
    g.verify().unwrap();
    assert_eq!(stats.fired.len(), 1);
    assert_eq!(count(&g, |o| *o == Op::CrossEntropy), 1);
    assert_eq!(count(&g, |o| *o == Op::LogSoftmax || *o == Op::Nll), 0);
}

#[test]
fn log_softmax_with_another_user_is_kept_for_that_user() {
    let mut g = tiny_llama(DType::F32);
    let loss = append_loss(&mut g).unwrap();
    let ls = g.operands(loss)[0];
    g.set_output("logprobs", ls);
    fuse(&mut g, &cross_entropy_rules()).unwrap();
    g.verify().unwrap();
    assert_eq!(g.node(g.output("loss").unwrap()).op, Op::CrossEntropy);
    assert_eq!(g.node(g.output("logprobs").unwrap()).op, Op::LogSoftmax);
}

#[test]
fn graph_without_the_pattern_is_left_alone() {
    let mut g = tiny_llama(DType::F32);
    let before = g.g.node_count();
    let stats = fuse(&mut g, &cross_entropy_rules()).unwrap();
    assert_eq!(stats.rewritten, 0);
    assert_eq!(stats.removed, 0);
    assert_eq!(g.g.node_count(), before);
}

#[test]
fn op_symbols_carry_parameters_so_rules_match_exact_ops() {
    let sum = |axis, keepdim| Op::Reduce {
        op: ReduceOp::Sum,
        axis,
        keepdim,
    };
    assert_eq!(op_symbol(&Op::LogSoftmax), "log_softmax");
    assert_ne!(op_symbol(&sum(1, true)), op_symbol(&sum(0, true)));
    assert_ne!(op_symbol(&sum(1, true)), op_symbol(&sum(1, false)));
    assert_ne!(
        op_symbol(&Op::Binary(BinaryOp::Sub)),
        op_symbol(&Op::Binary(BinaryOp::Add))
    );
    for s in [
        op_symbol(&sum(1, true)),
        op_symbol(&Op::Scale { factor: 0.5 }),
    ] {
        assert!(!s.contains([' ', '(', ')']), "{s}");
    }
}

#[test]
fn a_bad_rule_is_reported_with_its_name() {
    let rule = FuseRule {
        name: "broken".into(),
        ops: vec![Op::LogSoftmax],
        lhs: "(log_softmax ?z".into(),
        rhs: "?z".into(),
    };
    let mut g = tiny_llama(DType::F32);
    let e = fuse(&mut g, &[rule]).unwrap_err().to_string();
    assert!(e.contains("broken"), "{e}");
}

#[test]
fn pipeline_runs_fuse_after_autodiff_and_can_dump_after_it() {
    let mut g = tiny_llama(DType::BF16);
    for (name, id) in g.weights() {
        if name.contains("q_proj") {
            g.node_mut(id).trainable = true;
        }
    }
    let mut pm = PassManager::new();
    pm.add(LossPass)
        .add(AutodiffPass)
        .add(FusePass::standard())
        .add(PartitionPass)
        .add(SchedulePass);
    pm.verify_each(true);
    pm.dump_after("fuse", DumpFormat::Json, DumpView::Full)
        .unwrap();
    let mut cx = PassContext::new(8, 2, "uniform");
    let run = pm.run(g, &mut cx).unwrap();
    assert_eq!(run.dumps.len(), 1);
    assert_eq!(run.dumps[0].file_name(), "after-fuse.json");
    assert!(run.dumps[0].text.contains("cross_entropy_backward"));
    assert!(!run.dumps[0].text.contains("\"nll\""));
    assert!(
        cx.notes.iter().any(|n| n.starts_with("fuse:")),
        "{:?}",
        cx.notes
    );
    assert_eq!(count(&run.graph, |o| *o == Op::CrossEntropyBackward), 1);
}
