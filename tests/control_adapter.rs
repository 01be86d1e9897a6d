//! Control Adapters (spec §6.2) on the tiny Llama (tests/fixtures/llama-gqa), CPU, f32:
//! the pass's forward (checks 25, 27, 29), the gradients of Q and S against the PyTorch
//! implementation of scripts/make_ca_fixtures.py (1e-4 relative), the exact-inverse property
//! (check 26) over random Q and S, and the regularisers (checks 30, 31).
use qplc_compiler::{build_forward, load_model_def, BuildOptions, Graph};
use qplc_ops::DType;
use qplc_passes::{
    append_backward, append_loss, control_weight_name, grad_output_name, ControlPass, ControlRole,
    CONTROL_CLASSES,
};
use qplc_runtime::adapter_init::Pcg32;
use qplc_runtime::checkpoint::Checkpoint;
use qplc_runtime::executor::Program;
use qplc_runtime::train::control_reg::{
    control_norm, init_control_q, newton_retraction, orthogonality_error, regularise_control,
};
use qplc_runtime::{CpuBackend, HostTensor};
use safetensors::SafeTensors;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

const H: usize = 64;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model_dir() -> PathBuf {
    root().join("tests/fixtures/llama-gqa")
}

/// Forward graph of length `t` with adapters of rank `rank` on `layers` (None = all); with
/// `train`, the loss and the backward graph too.
fn graph(t: usize, rank: usize, layers: Option<BTreeSet<usize>>, train: bool) -> Graph {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir().join("config.json")).unwrap())
            .unwrap();
    let def = load_model_def(Some("llama"), None).unwrap();
    let mut g = build_forward(
        &def,
        &cfg,
        &BuildOptions {
            seq_len: t,
            dtype: DType::F32,
        },
    )
    .unwrap()
    .graph;
    let pass = ControlPass {
        layers,
        rank,
        dtype: DType::F32,
        dropout: 0.0,
    };
    pass.apply(&mut g).unwrap();
    if train {
        append_loss(&mut g).unwrap();
        append_backward(&mut g).unwrap();
    }
    g.verify().unwrap();
    g
}

fn base_weights(g: &Graph) -> HashMap<String, HostTensor> {
    let ckpt = Checkpoint::open(&model_dir()).unwrap();
    let mut w = HashMap::new();
    for (name, id) in g.weights() {
        if name.contains("control_") {
            continue;
        }
        let qplc_ops::Op::Weight { ty, .. } = &g.node(id).op else {
            unreachable!()
        };
        w.insert(name.clone(), ckpt.load(&name, ty).unwrap());
    }
    w
}

fn run(
    g: &Graph,
    weights: &HashMap<String, HostTensor>,
    ids: &[i32],
    classes: &[i32],
    outputs: &[&str],
) -> HashMap<String, HostTensor> {
    let t = ids.len();
    let inputs: HashMap<&str, HostTensor> = [
        ("input_ids", HostTensor::i32([t], ids.to_vec())),
        (
            "position_ids",
            HostTensor::i32([t], (0..t as i32).collect()),
        ),
        ("labels", HostTensor::i32([t], ids.to_vec())),
        (CONTROL_CLASSES, HostTensor::i32([t], classes.to_vec())),
    ]
    .into();
    Program::new(g, outputs)
        .unwrap()
        .run(&CpuBackend::new(), &|n| weights.get(n), &|n| inputs.get(n))
        .unwrap()
        .outputs
}

fn ids(t: usize) -> Vec<i32> {
    (0..t as i32).map(|i| (i * 37 + 11) % 512).collect()
}

fn set_adapter(w: &mut HashMap<String, HostTensor>, layer: usize, q: Vec<f32>, s: Vec<f32>) {
    let r = s.len();
    w.insert(
        control_weight_name(layer, ControlRole::Q),
        HostTensor::f32([H, r], q),
    );
    w.insert(
        control_weight_name(layer, ControlRole::S),
        HostTensor::f32([r], s),
    );
}

fn random_s(rng: &mut Pcg32, r: usize, scale: f32) -> Vec<f32> {
    (0..r).map(|_| rng.uniform(-scale, scale)).collect()
}

#[test]
fn at_init_the_model_equals_the_base_model_for_every_class() {
    // check 25: S = 0 ⇒ λ = expm1(0) = 0 exactly, for +1, −1 and 0 alike.
    let t = 32;
    let r = 8;
    let g = graph(t, r, None, false);
    let base_g = {
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(model_dir().join("config.json")).unwrap(),
        )
        .unwrap();
        let def = load_model_def(Some("llama"), None).unwrap();
        build_forward(
            &def,
            &cfg,
            &BuildOptions {
                seq_len: t,
                dtype: DType::F32,
            },
        )
        .unwrap()
        .graph
    };
    let mut w = base_weights(&g);
    let base = run(&base_g, &w, &ids(t), &vec![0; t], &["logits"])["logits"].clone();
    for l in 0..2 {
        let q = init_control_q(H, r, DType::F32, 42, l as u64).unwrap();
        set_adapter(&mut w, l, q, vec![0.0; r]);
    }
    let mixed: Vec<i32> = (0..t as i32).map(|i| (i % 3) - 1).collect();
    for classes in [vec![1; t], vec![-1; t], vec![0; t], mixed] {
        let out = run(&g, &w, &ids(t), &classes, &["logits"]);
        assert_eq!(
            out["logits"].as_f32(),
            base.as_f32(),
            "classes {classes:?}: the adapter at init must be the identity"
        );
    }
}

#[test]
fn position_t_uses_the_class_of_token_t_plus_one() {
    // check 27 with the adapter on the last layer only, whose output reaches the logits of
    // its own position only (final norm and head act per token).
    let t = 4;
    let r = 4;
    let g = graph(t, r, Some([1].into()), false);
    let mut w = base_weights(&g);
    let ids = ids(t);
    let q = init_control_q(H, r, DType::F32, 7, 1).unwrap();
    // S = 0 gives the base model (check 25).
    set_adapter(&mut w, 1, q.clone(), vec![0.0; r]);
    let base = run(&g, &w, &ids, &[0; 4], &["logits"])["logits"].clone();
    let mut rng = Pcg32::new(3, 4);
    set_adapter(&mut w, 1, q, random_s(&mut rng, r, 1.0));
    let logits = |classes: &[i32]| run(&g, &w, &ids, classes, &["logits"])["logits"].clone();
    let all_pos = logits(&[1; 4]);
    let all_neg = logits(&[-1; 4]);
    let v = 512;
    let row = |x: &HostTensor, i: usize| x.as_f32()[i * v..(i + 1) * v].to_vec();
    assert_ne!(row(&all_pos, 0), row(&base, 0), "the adapter is active");
    assert_ne!(row(&all_pos, 0), row(&all_neg, 0), "+1 and −1 differ");

    // classes [1, 1, −1, −1] → per-position transforms [+, −, −, none].
    let mixed = logits(&[1, 1, -1, -1]);
    assert_eq!(row(&mixed, 0), row(&all_pos, 0));
    assert_eq!(row(&mixed, 1), row(&all_neg, 1));
    assert_eq!(row(&mixed, 2), row(&all_neg, 2));
    assert_eq!(
        row(&mixed, 3),
        row(&base, 3),
        "the last position is the base output"
    );
    // A position whose next token is masked (class 0) equals the base.
    let masked = logits(&[1, 0, 1, 1]);
    assert_eq!(row(&masked, 0), row(&base, 0));
    assert_eq!(row(&masked, 1), row(&all_pos, 1));
}

#[test]
fn q_init_is_orthonormal_s_is_zero_and_each_layer_has_r_times_h_plus_1_parameters() {
    // check 29.
    for (h, r, seed) in [(64, 8, 1), (64, 64, 2), (300, 16, 3)] {
        let q = init_control_q(h, r, DType::F32, seed, 9).unwrap();
        let err = orthogonality_error(&q, h, r).sqrt();
        assert!(err < 1e-5, "‖QᵀQ − I‖_F = {err} for h={h} r={r}");
    }
    assert!(
        init_control_q(4, 8, DType::F32, 1, 1).is_err(),
        "rank > hidden"
    );
    let g = graph(64, 8, None, false);
    assert_eq!(g.trainable_param_count(), 2 * 8 * (H as u64 + 1));
    let w = qplc_runtime::train::control_reg::init_control_weights(&g, 42).unwrap();
    assert_eq!(w.len(), 4);
    for (name, t) in &w {
        assert_eq!(t.ty.dtype, DType::F32, "{name}");
        if name.ends_with("control_S") {
            assert!(t.as_f32().iter().all(|&x| x == 0.0));
        } else {
            assert!(orthogonality_error(t.as_f32(), H, 8).sqrt() < 1e-5);
        }
    }
}

/// `(I + Q diag(λ) Qᵀ) x` in f32, λ = exp(±S) − 1 as the graph computes it.
fn transform(q: &[f32], s: &[f32], sign: f32, x: &[f32]) -> Vec<f32> {
    let (h, r) = (x.len(), s.len());
    let lam: Vec<f32> = s.iter().map(|&v| (sign * v).exp() - 1.0).collect();
    let z: Vec<f32> = (0..r)
        .map(|j| (0..h).map(|i| x[i] * q[i * r + j]).sum::<f32>() * lam[j])
        .collect();
    (0..h)
        .map(|i| x[i] + (0..r).map(|j| q[i * r + j] * z[j]).sum::<f32>())
        .collect()
}

#[test]
fn the_minus_one_transform_is_the_exact_inverse_of_the_plus_one_transform() {
    // check 26, as a property over random orthonormal Q, random S and random x.
    let mut rng = Pcg32::new(2026, 11);
    for case in 0..200 {
        let h = 8 + (rng.next_u32() % 120) as usize;
        let r = 1 + (rng.next_u32() as usize % h.min(32));
        let q = init_control_q(h, r, DType::F32, case, 5).unwrap();
        let s = random_s(&mut rng, r, 2.0);
        let x: Vec<f32> = (0..h).map(|_| rng.uniform(-1.0, 1.0)).collect();
        for (first, second) in [(1.0, -1.0), (-1.0, 1.0)] {
            let y = transform(&q, &s, first, &transform(&q, &s, second, &x));
            let err = y
                .iter()
                .zip(&x)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 1e-5,
                "case {case} (h {h}, r {r}, max|S| {}): max error {err}",
                s.iter().fold(0f32, |m, v| m.max(v.abs()))
            );
        }
    }
}

fn f32_tensor(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn forward_and_q_s_gradients_match_the_pytorch_control_adapter() {
    let bytes = std::fs::read(root().join("tests/fixtures/ca_grads.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let i32s = |name: &str| -> Vec<i32> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let ids = i32s("input_ids");
    let classes = i32s("classes");
    assert!(classes.contains(&1) && classes.contains(&-1) && classes.contains(&0));
    let t = ids.len();
    let r = st.tensor("model.layers.0.control_S").unwrap().shape()[0];
    let g = graph(t, r, None, true);
    let mut w = base_weights(&g);
    for l in 0..2 {
        set_adapter(
            &mut w,
            l,
            f32_tensor(&st, &control_weight_name(l, ControlRole::Q)),
            f32_tensor(&st, &control_weight_name(l, ControlRole::S)),
        );
    }
    let out = run(&g, &w, &ids, &classes, &[]);

    let want_logits = f32_tensor(&st, "logits");
    let scale = want_logits.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = out["logits"]
        .as_f32()
        .iter()
        .zip(&want_logits)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("logits: max |Δ| {err:.3e} (max |logit| {scale:.3})");
    assert!(err <= 1e-5 * scale.max(1.0), "logits differ by {err}");

    let want_loss = f64::from_le_bytes(st.tensor("loss").unwrap().data()[..8].try_into().unwrap());
    let loss = out["loss"].as_f32()[0] as f64;
    assert!(
        (loss - want_loss).abs() <= 1e-5 * want_loss,
        "loss {loss} vs {want_loss}"
    );

    for l in 0..2 {
        for role in [ControlRole::Q, ControlRole::S] {
            let name = control_weight_name(l, role);
            let got = out[&grad_output_name(&name)].as_f32();
            let want = f32_tensor(&st, &grad_output_name(&name));
            let scale = want.iter().fold(0f64, |m, &x| m.max(x.abs() as f64));
            let err = got
                .iter()
                .zip(&want)
                .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
            eprintln!(
                "{name}: max |Δ| {err:.3e} / max |g| {scale:.3e} = {:.2e}",
                err / scale
            );
            assert!(scale > 0.0);
            assert!(
                err <= 1e-4 * scale,
                "{name}: relative error {:e}",
                err / scale
            );
        }
    }
}

#[test]
fn one_newton_step_squares_a_small_orthogonality_error() {
    // check 30: QᵀQ = I + E with ‖E‖ ~ ε → after one γ = 0.5 step the error is O(ε²) and the
    // reported metric is the error after the step.
    let (h, r) = (64, 8);
    let q0 = init_control_q(h, r, DType::F32, 1, 2).unwrap();
    let mut rng = Pcg32::new(9, 9);
    for eps in [1e-2f32, 3e-3] {
        let mut q: Vec<f32> = q0
            .iter()
            .map(|&x| x + eps * rng.uniform(-1.0, 1.0))
            .collect();
        let before = orthogonality_error(&q, h, r).sqrt();
        let reported = newton_retraction(&mut q, h, r, 0.5, DType::F32);
        let after = orthogonality_error(&q, h, r);
        assert_eq!(reported, after);
        let after = after.sqrt();
        eprintln!("‖E‖ {before:.3e} → {after:.3e}");
        assert!(after <= 2.0 * before * before + 1e-6, "{before} → {after}");
        assert!(after < before / 10.0);
    }
}

#[test]
fn s_decay_is_exactly_one_minus_eta_w_and_the_metrics_follow_it() {
    // check 31.
    let (h, r) = (16, 4);
    let mut q = init_control_q(h, r, DType::F32, 3, 3).unwrap();
    let s0 = vec![0.5f32, -0.25, 0.125, 1.0];
    let mut s = s0.clone();
    let (eta, w) = (2e-3 * 0.070888, 100.0);
    let m = regularise_control(&mut q, &mut s, h, r, DType::F32, 0.5, eta, w);
    for (a, b) in s.iter().zip(&s0) {
        assert_eq!(*a, ((1.0 - eta * w) * *b as f64) as f32);
    }
    let before = control_norm(&s0);
    assert_eq!(m.norm, control_norm(&s));
    assert_eq!(m.norm, (s[3] as f64).exp_m1().abs());
    assert_eq!(m.weight_decay, Some(before - m.norm));
    // No shrinkage when w = 0: S unchanged and no weight_decay metric.
    let mut s2 = s0.clone();
    let m2 = regularise_control(&mut q, &mut s2, h, r, DType::F32, 0.5, eta, 0.0);
    assert_eq!(s2, s0);
    assert_eq!(m2.weight_decay, None);
}
