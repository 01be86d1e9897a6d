//! Activation checkpointing (passes/src/recompute.rs, spec §5.5) on the CPU backend:
//! * gradients and loss are bitwise those of the graph without the pass, for full
//!   fine-tuning and for LoRA with dropout > 0 (the recomputed mask is the forward's), on
//!   tests/fixtures/llama-gqa;
//! * the executor's peak of live activations drops on an 8-layer model;
//! * the compile report's `peak_live_bytes` equals what the executor measures.
use qplc_compiler::config::LoadedConfig;
use qplc_compiler::{build_forward, load_model_def, BuildOptions, Graph, PlanConfig, PlanModel};
use qplc_ops::dropout::key_words;
use qplc_ops::DType;
use qplc_passes::{
    append_backward, append_loss, cross_entropy_rules, fuse, recompute, CheckpointPolicy, LoraPass,
    PassContext, PassManager, RecomputePass, DROPOUT_KEY, GRAD_PREFIX,
};
use qplc_runtime::adapter_init::init_lora_weights;
use qplc_runtime::executor::{Program, RunResult};
use qplc_runtime::model::{LoadedModel, ModelDir};
use qplc_runtime::{CpuBackend, HostTensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const T: usize = 64;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-gqa")
}

#[derive(Clone, Copy, Debug)]
enum Training {
    FullFt,
    Lora { dropout: f64 },
}

struct Model {
    graph: Graph,
    weights: HashMap<String, HostTensor>,
    num_layers: usize,
    info: qplc_compiler::ModelInfo,
}

fn lora_pass(dropout: f64) -> LoraPass {
    let text = format!(
        "model_dir = \"m\"\noutput_dir = \"o\"\nsequence_len = {T}\nlr = 1e-4\nlora_rank = 4\n\
         lora_dropout = {dropout}\n[[datasets]]\ndataset_path = \"d.txt\"\n"
    );
    LoraPass::from_config(&LoadedConfig::from_str(Path::new("t.toml"), &text).unwrap()).unwrap()
}

/// Adapters, loss, backward and the loss fusion, as `qplc compile` runs them before the
/// `recompute` pass; LoRA B is non-zero so the branches matter.
fn train_graph(
    mut graph: Graph,
    mut weights: HashMap<String, HostTensor>,
    how: Training,
) -> (Graph, HashMap<String, HostTensor>) {
    match how {
        Training::FullFt => {
            for (_, id) in graph.weights() {
                graph.node_mut(id).trainable = true;
            }
        }
        Training::Lora { dropout } => {
            lora_pass(dropout).apply(&mut graph).unwrap();
            let mut init = init_lora_weights(&graph, 7);
            for (name, t) in init.iter_mut() {
                if name.ends_with(".lora_B.weight") {
                    for (i, v) in t.as_f32_mut().iter_mut().enumerate() {
                        *v = ((i * 37 % 11) as f32 - 5.0) * 0.05;
                    }
                }
            }
            weights.extend(init);
        }
    }
    append_loss(&mut graph).unwrap();
    append_backward(&mut graph).unwrap();
    fuse(&mut graph, &cross_entropy_rules()).unwrap();
    graph.verify().unwrap();
    (graph, weights)
}

/// The llama-gqa fixture with its real weights.
fn fixture_model(how: Training) -> Model {
    let dir = ModelDir::open(&fixture(), None).unwrap();
    let loaded = LoadedModel::load(&dir, T, DType::F32).unwrap();
    let info = loaded.built.info.clone();
    let (graph, weights) = train_graph(loaded.built.graph, loaded.weights, how);
    Model {
        graph,
        weights,
        num_layers: info.num_layers,
        info,
    }
}

/// The fixture's architecture with `layers` decoder layers and deterministic weights.
fn generated_model(layers: usize, how: Training) -> Model {
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap())
            .unwrap();
    cfg["num_hidden_layers"] = layers.into();
    let def = load_model_def(Some("llama"), None).unwrap();
    let built = build_forward(
        &def,
        &cfg,
        &BuildOptions {
            seq_len: T,
            dtype: DType::F32,
        },
    )
    .unwrap();
    let mut weights = HashMap::new();
    for (k, (name, id)) in built.graph.weights().into_iter().enumerate() {
        let ty = &built.graph.node(id).ty;
        let n = ty.shape.numel();
        let norm = name.contains("norm");
        let data = (0..n)
            .map(|i| {
                let r = ((i * 2654435761 + k * 40503) % 1000) as f32 / 1000.0 - 0.5;
                if norm {
                    1.0 + 0.1 * r
                } else {
                    0.2 * r
                }
            })
            .collect();
        weights.insert(name, HostTensor::f32(ty.shape.clone(), data));
    }
    let (graph, weights) = train_graph(built.graph, weights, how);
    Model {
        graph,
        weights,
        num_layers: layers,
        info: built.info,
    }
}

fn inputs(g: &Graph) -> HashMap<String, HostTensor> {
    let ids: Vec<i32> = (0..T as i32).map(|i| (i * 7 + 3) % 500).collect();
    g.inputs()
        .into_iter()
        .map(|(name, _)| {
            let t = match name.as_str() {
                "input_ids" | "labels" => HostTensor::i32([T], ids.clone()),
                "position_ids" => HostTensor::i32([T], (0..T as i32).collect()),
                n if n == DROPOUT_KEY => HostTensor::i32([3], key_words(1234, true).to_vec()),
                other => panic!("the test does not know input `{other}`"),
            };
            (name, t)
        })
        .collect()
}

fn run(g: &Graph, weights: &HashMap<String, HostTensor>) -> RunResult {
    let inputs = inputs(g);
    Program::new(g, &[])
        .unwrap()
        .run(&CpuBackend::new(), &|n| weights.get(n), &|n| inputs.get(n))
        .unwrap()
}

/// As the trainer runs a step: for the loss and the gradients only (the forward's logits
/// and hidden state die at their last reader, as the compile report assumes).
fn run_step(g: &Graph, weights: &HashMap<String, HostTensor>) -> RunResult {
    let inputs = inputs(g);
    let names: Vec<&str> = g
        .outputs
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| *n == "loss" || n.starts_with(GRAD_PREFIX))
        .collect();
    Program::new(g, &names)
        .unwrap()
        .run(&CpuBackend::new(), &|n| weights.get(n), &|n| inputs.get(n))
        .unwrap()
}

fn with_policy(g: &Graph, policy: CheckpointPolicy) -> Graph {
    let mut g = g.clone();
    recompute(&mut g, policy).unwrap();
    g.verify().unwrap();
    g
}

fn assert_bitwise_equal(a: &RunResult, b: &RunResult, what: &str) {
    let mut names: Vec<&String> = a.outputs.keys().collect();
    names.sort();
    assert!(names.iter().filter(|n| n.starts_with(GRAD_PREFIX)).count() > 0);
    for name in names {
        let (x, y) = (a.outputs[name].as_f32(), b.outputs[name].as_f32());
        let same = x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "{what}: output `{name}` differs with recomputation");
    }
}

fn recompute_nodes(g: &Graph) -> usize {
    g.g.node_indices()
        .filter(|&id| g.node(id).recompute)
        .count()
}

#[test]
fn recomputed_gradients_are_bitwise_identical_full_ft_and_lora_with_dropout() {
    for how in [Training::FullFt, Training::Lora { dropout: 0.2 }] {
        let m = fixture_model(how);
        let base = run(&m.graph, &m.weights);
        for policy in [CheckpointPolicy::Layer, CheckpointPolicy::Auto] {
            let g = with_policy(&m.graph, policy);
            assert!(
                recompute_nodes(&g) > 0,
                "{how:?} {policy}: nothing recomputed"
            );
            let r = run(&g, &m.weights);
            assert_bitwise_equal(&base, &r, &format!("{how:?} {policy}"));
        }
    }
}

#[test]
fn lora_dropout_masks_matter_so_the_identity_is_not_trivial() {
    // The same graph with another dropout seed gives other gradients: the bitwise test
    // above would catch a recomputation that drew a fresh mask.
    let m = fixture_model(Training::Lora { dropout: 0.2 });
    let g = with_policy(&m.graph, CheckpointPolicy::Layer);
    let a = run(&g, &m.weights);
    let mut inputs = inputs(&g);
    inputs.insert(
        DROPOUT_KEY.to_string(),
        HostTensor::i32([3], key_words(99, true).to_vec()),
    );
    let b = Program::new(&g, &[])
        .unwrap()
        .run(&CpuBackend::new(), &|n| m.weights.get(n), &|n| {
            inputs.get(n)
        })
        .unwrap();
    let name = a
        .outputs
        .keys()
        .find(|n| n.ends_with("lora_A.weight"))
        .unwrap();
    assert_ne!(a.outputs[name].as_f32(), b.outputs[name].as_f32());
}

/// Compiles `m` through recompute, partition and schedule on one stage.
fn compile(m: &Model, policy: CheckpointPolicy) -> qplc_compiler::Plan {
    let mut passes = PassManager::standard();
    passes
        .insert_before(
            "partition",
            RecomputePass {
                policy,
                offload: true,
            },
        )
        .unwrap();
    let mut cx = PassContext::new(T, 1, "uniform");
    cx.num_layers = Some(m.num_layers);
    qplc_passes::compile(
        m.graph.clone(),
        &passes,
        cx,
        PlanConfig::default(),
        PlanModel::from(&m.info),
    )
    .unwrap()
    .0
}

#[test]
fn checkpointing_lowers_the_measured_peak_and_the_report_predicts_it_exactly() {
    for how in [Training::FullFt, Training::Lora { dropout: 0.1 }] {
        let m = generated_model(8, how);
        let mut peaks = Vec::new();
        let mut outputs = 0;
        for policy in [
            CheckpointPolicy::None,
            CheckpointPolicy::Layer,
            CheckpointPolicy::Auto,
        ] {
            let plan = compile(&m, policy);
            let stats = run_step(&plan.graph, &m.weights).stats;
            let measured = stats.peak_activation_bytes as u64;
            let predicted = plan.report.stages[0].peak_live_bytes;
            eprintln!(
                "{how:?} {policy}: peak live activations measured {measured} B, predicted \
                 {predicted} B, arena {} B, outputs (gradients, loss) {} B",
                plan.report.stages[0].activation_bytes, stats.final_activation_bytes
            );
            assert_eq!(predicted, measured, "{how:?} {policy}");
            assert!(plan.report.stages[0].activation_bytes >= predicted);
            assert!(plan.report.total_device_bytes >= predicted + plan.report.total_weight_bytes);
            // One offloaded input per layer (the embedding output and layers 0..6's outputs).
            let offloaded = plan.report.stages[0].offloaded_bytes;
            let hidden = (T * 64 * 4) as u64;
            if policy == CheckpointPolicy::None {
                assert_eq!(offloaded, 0);
            } else {
                assert_eq!(offloaded, 8 * hidden, "{how:?} {policy}");
            }
            peaks.push(measured);
            outputs = stats.final_activation_bytes as u64;
        }
        // 8 layers: keeping one input per layer instead of all of a layer's saved values.
        // The gradients (outputs, held to the end) are the same in every policy: compare
        // what lies above them.
        let (none, layer) = (peaks[0] - outputs, peaks[1] - outputs);
        assert!(
            (layer as f64) < 0.5 * none as f64,
            "{how:?}: above the outputs: none {none} B, layer {layer} B"
        );
        assert!(peaks[2] < peaks[0], "{how:?}: auto {} B", peaks[2]);
    }
}
