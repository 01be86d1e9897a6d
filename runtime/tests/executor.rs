//! The executor on small hand-built graphs: results equal op-by-op evaluation, values are
//! freed after their last use, only what the requested outputs need runs, and missing or
//! mistyped inputs and weights are named in the error.
use qplc_compiler::{BlockKind, Graph, NodeId, Scope};
use qplc_ops::{DType, Op, TensorType, UnaryOp};
use qplc_runtime::executor::{run_graph, ExecError, Program};
use qplc_runtime::{CpuBackend, HostTensor};
use std::collections::HashMap;

fn scope(module: &str) -> Scope {
    Scope::new(module, BlockKind::Decoder, Some(0))
}

/// ids → embedding → rms_norm (= `hidden`) → linear head (= `logits`).
fn tiny_lm() -> (Graph, NodeId, NodeId) {
    let mut g = Graph::new();
    let s = scope("model");
    let ids = g
        .add(
            Op::Input {
                name: "input_ids".into(),
                ty: TensorType::new([3], DType::I32),
            },
            &[],
            &s,
        )
        .unwrap();
    let weight = |g: &mut Graph, name: &str, shape: &[usize]| {
        g.add(
            Op::Weight {
                name: name.into(),
                ty: TensorType::new(shape.to_vec(), DType::F32),
            },
            &[],
            &s,
        )
        .unwrap()
    };
    let emb = weight(&mut g, "model.embed_tokens.weight", &[5, 4]);
    let norm_w = weight(&mut g, "model.norm.weight", &[4]);
    let head = weight(&mut g, "lm_head.weight", &[6, 4]);
    let x = g.add(Op::Embedding, &[ids, emb], &s).unwrap();
    let hidden = g
        .add(
            Op::RmsNorm {
                eps: 1e-6,
                offset: 0.0,
            },
            &[x, norm_w],
            &s,
        )
        .unwrap();
    let logits = g.add(Op::Linear, &[hidden, head], &s).unwrap();
    g.set_output("hidden", hidden);
    g.set_output("logits", logits);
    (g, hidden, logits)
}

fn tiny_weights() -> HashMap<String, HostTensor> {
    let seq = |n: usize, k: f32| (0..n).map(|i| (i as f32 * k).sin()).collect::<Vec<_>>();
    HashMap::from([
        (
            "model.embed_tokens.weight".to_string(),
            HostTensor::f32([5, 4], seq(20, 0.7)),
        ),
        (
            "model.norm.weight".to_string(),
            HostTensor::f32([4], seq(4, 1.3)),
        ),
        (
            "lm_head.weight".to_string(),
            HostTensor::f32([6, 4], seq(24, 0.3)),
        ),
    ])
}

fn ids() -> HashMap<String, HostTensor> {
    HashMap::from([("input_ids".to_string(), HostTensor::i32([3], vec![4, 0, 2]))])
}

#[test]
fn graph_results_equal_op_by_op_evaluation() {
    let (g, _, _) = tiny_lm();
    let w = tiny_weights();
    let inputs = ids();
    let cpu = CpuBackend::new();
    let res = run_graph(&cpu, &g, &|n| w.get(n), &|n| inputs.get(n), &[]).unwrap();
    let x = cpu
        .eval(
            &Op::Embedding,
            &[&inputs["input_ids"], &w["model.embed_tokens.weight"]],
        )
        .unwrap();
    let h = cpu
        .eval(
            &Op::RmsNorm {
                eps: 1e-6,
                offset: 0.0,
            },
            &[&x, &w["model.norm.weight"]],
        )
        .unwrap();
    let l = cpu.eval(&Op::Linear, &[&h, &w["lm_head.weight"]]).unwrap();
    assert_eq!(res.get("hidden").unwrap(), &h);
    assert_eq!(res.get("logits").unwrap(), &l);
    assert_eq!(res.stats.nodes_executed, 3);
}

#[test]
fn requesting_hidden_runs_no_head_and_needs_no_head_weight() {
    let (g, _, _) = tiny_lm();
    let mut w = tiny_weights();
    w.remove("lm_head.weight");
    let inputs = ids();
    let res = run_graph(
        &CpuBackend::new(),
        &g,
        &|n| w.get(n),
        &|n| inputs.get(n),
        &["hidden"],
    )
    .unwrap();
    assert_eq!(res.outputs.len(), 1);
    assert_eq!(res.stats.nodes_executed, 2);
}

#[test]
fn intermediates_are_freed_after_their_last_use() {
    // x → a → b → c → d, each [4, 8] f32 (128 bytes): at most two are ever alive.
    let mut g = Graph::new();
    let s = scope("chain");
    let ty = TensorType::new([4, 8], DType::F32);
    let mut v = g
        .add(
            Op::Input {
                name: "x".into(),
                ty: ty.clone(),
            },
            &[],
            &s,
        )
        .unwrap();
    for _ in 0..4 {
        v = g.add(Op::Unary(UnaryOp::Tanh), &[v], &s).unwrap();
    }
    g.set_output("y", v);
    let x = HostTensor::f32([4, 8], vec![0.5; 32]);
    let res = run_graph(
        &CpuBackend::new(),
        &g,
        &|_| None,
        &|n| (n == "x").then_some(&x),
        &["y"],
    )
    .unwrap();
    assert_eq!(res.stats.peak_activation_bytes, 2 * ty.bytes());
    assert_eq!(res.stats.final_activation_bytes, ty.bytes());
    assert_eq!(res.stats.buffers_freed, 4);
    let want = (0..4).fold(0.5f64, |a, _| a.tanh()) as f32;
    let y = res.get("y").unwrap().as_f32();
    assert!(
        y.iter().all(|&v| (v - want).abs() < 1e-6),
        "{y:?} vs {want}"
    );
}

#[test]
fn a_value_used_twice_lives_until_its_second_use() {
    // x → a; b = a·a... expressed as add(a, tanh(a)): `a` must survive the tanh.
    let mut g = Graph::new();
    let s = scope("fork");
    let ty = TensorType::new([2], DType::F32);
    let x = g
        .add(
            Op::Input {
                name: "x".into(),
                ty,
            },
            &[],
            &s,
        )
        .unwrap();
    let a = g.add(Op::Scale { factor: 2.0 }, &[x], &s).unwrap();
    let t = g.add(Op::Unary(UnaryOp::Neg), &[a], &s).unwrap();
    let y = g
        .add(Op::Binary(qplc_ops::BinaryOp::Sub), &[a, t], &s)
        .unwrap();
    g.set_output("y", y);
    let xin = HostTensor::f32([2], vec![1.0, 3.0]);
    let res = run_graph(&CpuBackend::new(), &g, &|_| None, &|_| Some(&xin), &[]).unwrap();
    assert_eq!(res.get("y").unwrap().as_f32(), &[4.0, 12.0]);
    // x is freed after a; a and t after y.
    assert_eq!(res.stats.buffers_freed, 3);
}

#[test]
fn missing_input_and_weight_are_named() {
    let (g, _, _) = tiny_lm();
    let w = tiny_weights();
    let inputs = ids();
    let cpu = CpuBackend::new();
    let err = run_graph(&cpu, &g, &|n| w.get(n), &|_| None, &[]).unwrap_err();
    assert!(matches!(err, ExecError::MissingInput { ref name, .. } if name == "input_ids"));
    assert!(
        err.to_string().contains("input `input_ids` (i32[3])"),
        "{err}"
    );
    let err = run_graph(&cpu, &g, &|_| None, &|n| inputs.get(n), &[]).unwrap_err();
    assert!(
        err.to_string()
            .contains("weight `model.embed_tokens.weight`"),
        "{err}"
    );
}

#[test]
fn mistyped_weight_reports_expected_and_given_types() {
    let (g, _, _) = tiny_lm();
    let mut w = tiny_weights();
    w.insert(
        "model.norm.weight".into(),
        HostTensor::f32([5], vec![1.0; 5]),
    );
    let inputs = ids();
    let err = run_graph(
        &CpuBackend::new(),
        &g,
        &|n| w.get(n),
        &|n| inputs.get(n),
        &[],
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("weight `model.norm.weight`")
            && msg.contains("expects f32[4]")
            && msg.contains("given f32[5]"),
        "{msg}"
    );
}

#[test]
fn kernel_errors_name_the_node_and_module() {
    let (g, _, _) = tiny_lm();
    let w = tiny_weights();
    let bad = HashMap::from([("input_ids".to_string(), HostTensor::i32([3], vec![0, 9, 1]))]);
    let err = run_graph(&CpuBackend::new(), &g, &|n| w.get(n), &|n| bad.get(n), &[]).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("embedding") && msg.contains("`model`") && msg.contains("token id 9"),
        "{msg}"
    );
}

#[test]
fn unknown_output_lists_the_available_ones() {
    let (g, _, _) = tiny_lm();
    let err = Program::new(&g, &["loss"]).unwrap_err();
    assert!(err.to_string().contains("`hidden`, `logits`"), "{err}");
}

#[test]
fn a_program_runs_again_with_new_inputs() {
    let (g, _, _) = tiny_lm();
    let w = tiny_weights();
    let p = Program::new(&g, &["logits"]).unwrap();
    let cpu = CpuBackend::with_threads(2).unwrap();
    let first = ids();
    let second = HashMap::from([("input_ids".to_string(), HostTensor::i32([3], vec![1, 1, 1]))]);
    let a = p.run(&cpu, &|n| w.get(n), &|n| first.get(n)).unwrap();
    let b = p.run(&cpu, &|n| w.get(n), &|n| second.get(n)).unwrap();
    let (a, b) = (
        a.get("logits").unwrap().as_f32(),
        b.get("logits").unwrap().as_f32(),
    );
    assert_ne!(a, b);
    // Equal ids give equal rows.
    assert_eq!(b[0..6], b[6..12]);
}
