//! LoRA dropout (spec §6.1.2, §14 item 5) on the CPU: the kernel's statistics and scaling,
//! one mask shared by the forward and the backward (checked against finite differences),
//! fresh masks per seed and per node, no op at p = 0, the identity when evaluating. Masks
//! are not compared with PyTorch: the generators differ (qplc_ops::dropout).
use qplc_compiler::config::LoadedConfig;
use qplc_compiler::{BlockKind, Graph, Scope};
use qplc_ops::dropout::{key_words, micro_batch_seed};
use qplc_ops::{DType, Op, ReduceOp, TensorType, UnaryOp};
use qplc_passes::{append_backward, grad_output_name, LoraPass, DROPOUT_KEY};
use qplc_runtime::adapter_init::init_lora_weights;
use qplc_runtime::executor::Program;
use qplc_runtime::model::{LoadedModel, ModelDir};
use qplc_runtime::{CpuBackend, HostTensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn key(seed: u64, active: bool) -> HostTensor {
    HostTensor::i32([3], key_words(seed, active).to_vec())
}

fn dropout(p: f64, salt: u64, x: &HostTensor, k: &HostTensor) -> HostTensor {
    CpuBackend::new()
        .eval(&Op::Dropout { p, salt }, &[x, k])
        .unwrap()
}

#[test]
fn kernel_keeps_about_one_minus_p_and_scales_kept_values_like_pytorch() {
    let n = 1 << 17;
    let x = HostTensor::f32([n / 512, 512], vec![1.5; n]);
    for p in [0.1, 0.5] {
        let y = dropout(p, 3, &x, &key(11, true));
        let scaled = 1.5f32 * (1.0 / (1.0 - p)) as f32;
        let kept = y.as_f32().iter().filter(|&&v| v != 0.0).count();
        assert!(y.as_f32().iter().all(|&v| v == 0.0 || v == scaled));
        let frac = kept as f64 / n as f64;
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        assert!((frac - (1.0 - p)).abs() < 5.0 * sd, "p {p}: kept {frac}");
    }
}

#[test]
fn inactive_key_or_p_zero_is_the_identity() {
    let x = HostTensor::f32([4, 8], (0..32).map(|i| i as f32 - 7.25).collect());
    assert_eq!(dropout(0.3, 1, &x, &key(5, false)).as_f32(), x.as_f32());
    assert_eq!(dropout(0.0, 1, &x, &key(5, true)).as_f32(), x.as_f32());
}

#[test]
fn masks_depend_on_seed_and_salt_and_repeat_exactly() {
    let x = HostTensor::f32([64, 64], vec![1.0; 4096]);
    let a = dropout(0.5, 1, &x, &key(9, true));
    assert_eq!(a.as_f32(), dropout(0.5, 1, &x, &key(9, true)).as_f32());
    assert_ne!(a.as_f32(), dropout(0.5, 2, &x, &key(9, true)).as_f32());
    assert_ne!(a.as_f32(), dropout(0.5, 1, &x, &key(10, true)).as_f32());
    // Per-step seeds of the trainer: every micro-batch of every step differs.
    let s0 = micro_batch_seed(42, 1, 0);
    for other in [micro_batch_seed(42, 1, 1), micro_batch_seed(42, 2, 0)] {
        assert_ne!(
            dropout(0.5, 1, &x, &key(s0, true)).as_f32(),
            dropout(0.5, 1, &x, &key(other, true)).as_f32()
        );
    }
}

/// loss = Σ (dropout(w) · c)², w trainable.
fn toy_graph(p: f64) -> Graph {
    let mut g = Graph::new();
    let s = Scope::new("toy", BlockKind::Decoder, Some(0));
    let ty = TensorType::new([8, 16], DType::F32);
    let w = g
        .add(
            Op::Weight {
                name: "w".into(),
                ty: ty.clone(),
            },
            &[],
            &s,
        )
        .unwrap();
    g.node_mut(w).trainable = true;
    let c = g
        .add(
            Op::Weight {
                name: "c".into(),
                ty,
            },
            &[],
            &s,
        )
        .unwrap();
    let k = g
        .add(
            Op::Input {
                name: DROPOUT_KEY.into(),
                ty: TensorType::new([3], DType::I32),
            },
            &[],
            &s,
        )
        .unwrap();
    let d = g.add(Op::Dropout { p, salt: 77 }, &[w, k], &s).unwrap();
    let m = g
        .add(Op::Binary(qplc_ops::BinaryOp::Mul), &[d, c], &s)
        .unwrap();
    let sq = g.add(Op::Unary(UnaryOp::Square), &[m], &s).unwrap();
    let flat = g
        .add(
            Op::Reshape {
                shape: [128].into(),
            },
            &[sq],
            &s,
        )
        .unwrap();
    let loss = g
        .add(
            Op::Reduce {
                op: ReduceOp::Sum,
                axis: 0,
                keepdim: false,
            },
            &[flat],
            &s,
        )
        .unwrap();
    g.set_output("loss", loss);
    g.set_output("dropped", d);
    append_backward(&mut g).unwrap();
    g.verify().unwrap();
    g
}

#[test]
fn backward_sees_the_forward_mask_finite_differences_agree() {
    let g = toy_graph(0.4);
    let w: Vec<f32> = (0..128).map(|i| 0.3 + (i % 7) as f32 * 0.1).collect();
    let c: Vec<f32> = (0..128).map(|i| 0.5 + (i % 5) as f32 * 0.2).collect();
    let k = key(123, true);
    let run = |w: &[f32]| {
        let weights: HashMap<&str, HostTensor> = [
            ("w", HostTensor::f32([8, 16], w.to_vec())),
            ("c", HostTensor::f32([8, 16], c.clone())),
        ]
        .into();
        let inputs: HashMap<&str, HostTensor> = [(DROPOUT_KEY, k.clone())].into();
        Program::new(&g, &[])
            .unwrap()
            .run(&CpuBackend::new(), &|n| weights.get(n), &|n| inputs.get(n))
            .unwrap()
            .outputs
    };
    let out = run(&w);
    let grad = out[&grad_output_name("w")].as_f32().to_vec();
    let dropped = out["dropped"].as_f32();
    let zeros = dropped.iter().filter(|&&v| v == 0.0).count();
    assert!(
        (20..80).contains(&zeros),
        "{zeros} of 128 dropped at p = 0.4"
    );
    for (i, (&d, &gi)) in dropped.iter().zip(&grad).enumerate() {
        // Exactly the dropped elements get no gradient: one mask for both directions.
        assert_eq!(d == 0.0, gi == 0.0, "element {i}");
        let h = 1e-2f32;
        let (mut wp, mut wm) = (w.clone(), w.clone());
        wp[i] += h;
        wm[i] -= h;
        let fd = (run(&wp)["loss"].as_f32()[0] as f64 - run(&wm)["loss"].as_f32()[0] as f64)
            / (2.0 * h as f64);
        let tol = 2e-3 * (1.0 + gi.abs() as f64);
        assert!(
            (fd - gi as f64).abs() < tol,
            "element {i}: analytic {gi} vs finite difference {fd}"
        );
    }
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-gqa")
}

fn lora_config(dropout: f64) -> LoadedConfig {
    let text = format!(
        "model_dir = \"m\"\noutput_dir = \"o\"\nsequence_len = 64\nlr = 1e-4\nlora_rank = 4\nlora_dropout = {dropout}\n[[datasets]]\ndataset_path = \"d.txt\"\n"
    );
    LoadedConfig::from_str(Path::new("t.toml"), &text).unwrap()
}

/// The fixture with LoRA branches (dropout `p`) and a non-zero B, so the branches matter.
fn lora_model(p: f64) -> LoadedModel {
    let model = ModelDir::open(&fixture(), None).unwrap();
    let mut loaded = LoadedModel::load(&model, 16, DType::F32).unwrap();
    let pass = LoraPass::from_config(&lora_config(p)).unwrap();
    pass.apply(&mut loaded.built.graph).unwrap();
    loaded.built.graph.verify().unwrap();
    let mut init = init_lora_weights(&loaded.built.graph, 7);
    for (name, t) in init.iter_mut() {
        if name.ends_with(".lora_B.weight") {
            for (i, v) in t.as_f32_mut().iter_mut().enumerate() {
                *v = ((i * 37 % 11) as f32 - 5.0) * 0.05;
            }
        }
    }
    loaded.weights.extend(init);
    loaded
}

fn logits(m: &LoadedModel, k: Option<&HostTensor>) -> Vec<f32> {
    let t = 16;
    let mut inputs: HashMap<&str, HostTensor> = [
        (
            "input_ids",
            HostTensor::i32([t], (0..t as i32).map(|i| (i * 5) % 50).collect()),
        ),
        (
            "position_ids",
            HostTensor::i32([t], (0..t as i32).collect()),
        ),
    ]
    .into();
    if let Some(k) = k {
        inputs.insert(DROPOUT_KEY, k.clone());
    }
    Program::new(&m.built.graph, &["logits"])
        .unwrap()
        .run(&CpuBackend::new(), &|n| m.weights.get(n), &|n| {
            inputs.get(n)
        })
        .unwrap()
        .outputs["logits"]
        .as_f32()
        .to_vec()
}

fn dropout_nodes(g: &Graph) -> Vec<u64> {
    g.g.node_indices()
        .filter_map(|id| match g.node(id).op {
            Op::Dropout { salt, .. } => Some(salt),
            _ => None,
        })
        .collect()
}

#[test]
fn lora_pass_adds_no_dropout_at_p_zero() {
    let m = lora_model(0.0);
    assert!(dropout_nodes(&m.built.graph).is_empty());
    assert!(m.built.graph.inputs().iter().all(|(n, _)| n != DROPOUT_KEY));
}

#[test]
fn lora_dropout_gives_each_branch_its_own_mask_and_evaluation_disables_it() {
    let plain = lora_model(0.0);
    let m = lora_model(0.1);
    let salts = dropout_nodes(&m.built.graph);
    // One dropout per adapted linear (7 per layer, all-linear), each with its own salt.
    let branches = m
        .built
        .graph
        .weights()
        .iter()
        .filter(|(n, _)| n.ends_with(".lora_A.weight"))
        .count();
    assert_eq!(salts.len(), branches);
    let mut distinct = salts.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), salts.len());
    // The same graph built again gets the same salts (resume relies on it).
    assert_eq!(dropout_nodes(&lora_model(0.1).built.graph), salts);

    let base = logits(&plain, None);
    // Evaluation (active = 0): exactly the model without dropout.
    assert_eq!(logits(&m, Some(&key(5, false))), base);
    // Training: masks change the output, reproducibly per seed.
    let a = logits(&m, Some(&key(5, true)));
    assert_ne!(a, base);
    assert_eq!(logits(&m, Some(&key(5, true))), a);
    assert_ne!(logits(&m, Some(&key(6, true))), a);
}
