//! The whole tiny Llama (tests/fixtures/llama-gqa: GQA, llama3 rope, untied head) built by
//! the model builder, plus the loss and autodiff passes with every weight trainable, run on
//! the CPU backend in f32:
//! * every parameter's gradient against PyTorch autograd (scripts/make_grad_fixtures.py,
//!   float64 reference): max |Δ| ≤ 1e-4 · max |reference| per tensor;
//! * sampled entries against central finite differences of the forward graph.
use qplc_compiler::{build_forward, load_model_def, BuildOptions, Graph};
use qplc_ops::DType;
use qplc_passes::{append_backward, append_loss, cross_entropy_rules, fuse, grad_output_name};
use qplc_runtime::checkpoint::Checkpoint;
use qplc_runtime::executor::Program;
use qplc_runtime::{CpuBackend, HostTensor};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::PathBuf;

const T: usize = 32;

fn fixture() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/llama-gqa"
    ))
}

fn f32_tensor(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn fixture_ids() -> Vec<i32> {
    let bytes = std::fs::read(fixture().join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as i32)
        .collect()
}

/// Forward graph of the fixture with the loss; `train` adds the backward graph with every
/// weight trainable.
fn graph(train: bool) -> Graph {
    graph_in(train, DType::F32)
}

fn graph_in(train: bool, dtype: DType) -> Graph {
    let dir = fixture();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let def = load_model_def(Some("llama"), None).unwrap();
    let built = build_forward(&def, &cfg, &BuildOptions { seq_len: T, dtype }).unwrap();
    let mut g = built.graph;
    append_loss(&mut g).unwrap();
    if train {
        for (_, id) in g.weights() {
            g.node_mut(id).trainable = true;
        }
        append_backward(&mut g).unwrap();
        // As the pipeline runs it: the loss and its backward fused (passes/src/fuse.rs).
        fuse(&mut g, &cross_entropy_rules()).unwrap();
    }
    g.verify().unwrap();
    g
}

fn inputs(ids: &[i32]) -> HashMap<String, HostTensor> {
    [
        ("input_ids".to_string(), HostTensor::i32([T], ids.to_vec())),
        (
            "position_ids".to_string(),
            HostTensor::i32([T], (0..T as i32).collect()),
        ),
        // labels = input ids; the loss pass shifts them (HF convention).
        ("labels".to_string(), HostTensor::i32([T], ids.to_vec())),
    ]
    .into()
}

#[test]
fn llama_gradients_match_pytorch_autograd_for_every_parameter() {
    let g = graph(true);
    let weights = Checkpoint::open(&fixture())
        .unwrap()
        .load_graph_weights(&g)
        .unwrap();
    let ids = fixture_ids();
    let inputs = inputs(&ids);
    let result = Program::new(&g, &[])
        .unwrap()
        .run(&CpuBackend::new(), &|n| weights.get(n), &|n| inputs.get(n))
        .unwrap();

    let bytes = std::fs::read(fixture().join("grads.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let want_loss = f64::from_le_bytes(st.tensor("loss").unwrap().data()[..8].try_into().unwrap());
    let loss = result.get("loss").unwrap().as_f32()[0] as f64;
    eprintln!("loss {loss} vs PyTorch {want_loss}");
    assert!(
        (loss - want_loss).abs() <= 1e-5,
        "loss {loss} vs {want_loss}"
    );

    let mut names: Vec<String> = weights.keys().cloned().collect();
    names.sort();
    assert_eq!(names.len(), 21, "every parameter of the fixture");
    let mut worst = 0.0f64;
    for name in &names {
        let got = result
            .get(&grad_output_name(name))
            .unwrap_or_else(|| panic!("no gradient output for {name}"));
        let want = f32_tensor(&st, name);
        assert_eq!(got.as_f32().len(), want.len(), "{name}");
        let scale = want.iter().fold(0f64, |m, &x| m.max(x.abs() as f64));
        let err = got
            .as_f32()
            .iter()
            .zip(&want)
            .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
        let rel = err / scale;
        eprintln!("{name}: max |Δ| {err:.3e} / max |g| {scale:.3e} = {rel:.2e}");
        worst = worst.max(rel);
        assert!(rel <= 1e-4, "{name}: relative error {rel:e}");
    }
    eprintln!("worst relative error over all parameters: {worst:.2e}");
}

/// Mean next-token NLL of the logits in f64 (the finite differences need more precision than
/// the f32 loss output carries).
fn loss_f64(logits: &[f32], ids: &[i32], v: usize) -> f64 {
    let mut total = 0.0;
    for t in 0..T - 1 {
        let row = &logits[t * v..(t + 1) * v];
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        total += lse - row[ids[t + 1] as usize] as f64;
    }
    total / (T - 1) as f64
}

#[test]
fn llama_gradients_match_finite_differences_on_sampled_weights() {
    let train = graph(true);
    let fwd = graph(false);
    let ckpt = Checkpoint::open(&fixture()).unwrap();
    let mut weights = ckpt.load_graph_weights(&train).unwrap();
    let ids = fixture_ids();
    let inputs = inputs(&ids);
    let backend = CpuBackend::new();
    let result = Program::new(&train, &[])
        .unwrap()
        .run(&backend, &|n| weights.get(n), &|n| inputs.get(n))
        .unwrap();
    let forward = Program::new(&fwd, &["logits"]).unwrap();
    let v = 512;
    let eps = 4e-3f32;
    let sampled = [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ];
    for name in sampled {
        let analytic = result
            .get(&grad_output_name(name))
            .unwrap()
            .as_f32()
            .to_vec();
        let scale = analytic.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
        // The entry with the largest gradient, and two others spread over the tensor.
        let argmax = (0..analytic.len())
            .max_by(|&a, &b| analytic[a].abs().total_cmp(&analytic[b].abs()))
            .unwrap();
        for j in [argmax, analytic.len() / 3, analytic.len() * 5 / 7] {
            let mut at = |delta: f32| {
                let x0 = weights[name].as_f32()[j];
                weights.get_mut(name).unwrap().as_f32_mut()[j] = x0 + delta;
                let out = forward
                    .run(&backend, &|n| weights.get(n), &|n| inputs.get(n))
                    .unwrap();
                weights.get_mut(name).unwrap().as_f32_mut()[j] = x0;
                loss_f64(out.get("logits").unwrap().as_f32(), &ids, v)
            };
            let num = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            let err = (analytic[j] as f64 - num).abs();
            eprintln!(
                "{name}[{j}]: analytic {:.6e} numeric {num:.6e} |Δ|/max|g| {:.2e}",
                analytic[j],
                err / scale
            );
            assert!(
                err <= 2e-3 * scale,
                "{name}[{j}]: analytic {} vs numeric {num}",
                analytic[j]
            );
        }
    }
}

#[test]
fn bf16_training_graph_runs_and_its_gradients_track_the_f32_ones() {
    // bf16 weights and activations, f32 loss: the Cast rule sends the loss gradient back to
    // bf16 and every gradient comes out in the weight's dtype.
    let ckpt = Checkpoint::open(&fixture()).unwrap();
    let ids = fixture_ids();
    let inputs = inputs(&ids);
    let run = |dtype: DType| {
        let g = graph_in(true, dtype);
        let w = ckpt.load_graph_weights(&g).unwrap();
        let out = Program::new(&g, &[])
            .unwrap()
            .run(&CpuBackend::new(), &|n| w.get(n), &|n| inputs.get(n))
            .unwrap();
        (w.keys().cloned().collect::<Vec<_>>(), out)
    };
    let (names, bf) = run(DType::BF16);
    let (_, f) = run(DType::F32);
    let mut worst = 0f32;
    for name in names {
        let key = grad_output_name(&name);
        let (a, b) = (bf.get(&key).unwrap(), f.get(&key).unwrap());
        assert_eq!(a.ty.dtype, DType::BF16, "{name}");
        let scale = b.as_f32().iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = a
            .as_f32()
            .iter()
            .zip(b.as_f32())
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(a.as_f32().iter().all(|x| x.is_finite()), "{name}");
        // bf16 keeps 8 bits of mantissa; through two layers the gradients stay within a
        // few percent of the f32 ones.
        assert!(err <= 0.1 * scale, "{name}: {err} vs max {scale}");
        worst = worst.max(err / scale);
    }
    eprintln!("bf16 vs f32 gradients: worst max |Δ| / max |g| = {worst:.2e}");
}
