//! The `fuse_elementwise` pass changes no bit of any result: a whole LoRA training step on the
//! tiny Llama fixture (bf16 and f32, with and without dropout) gives the same loss and the
//! same gradient bits on the CPU with and without the pass, while the fused graph has far
//! fewer nodes and a lower activation peak.
use qplc_compiler::{build_forward, load_model_def, BuildOptions, Graph};
use qplc_ops::{dropout, DType, Op};
use qplc_passes::{
    append_backward, append_loss, cross_entropy_rules, fuse, fuse_elementwise, recompute, simplify,
    CheckpointPolicy, LoraPass, LoraSelection, ModuleMatch, DROPOUT_KEY,
};
use qplc_runtime::checkpoint::Checkpoint;
use qplc_runtime::executor::{Program, RunResult};
use qplc_runtime::{CpuBackend, HostTensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const T: usize = 24;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-gqa")
}

fn lora_graph(dtype: DType, dropout: f64, alpha: f64) -> Graph {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap())
            .unwrap();
    let def = load_model_def(Some("llama"), None).unwrap();
    let mut g = build_forward(&def, &cfg, &BuildOptions { seq_len: T, dtype })
        .unwrap()
        .graph;
    let pass = LoraPass {
        selection: LoraSelection::new(ModuleMatch::from_config(None), None),
        rank: 4,
        alpha,
        rslora: false,
        rank_of: BTreeMap::new(),
        alpha_of: BTreeMap::new(),
        dtype: DType::F32,
        dropout,
    };
    pass.apply(&mut g).unwrap();
    append_loss(&mut g).unwrap();
    append_backward(&mut g).unwrap();
    fuse(&mut g, &cross_entropy_rules()).unwrap();
    simplify(&mut g).unwrap();
    g.verify().unwrap();
    g
}

fn weights(g: &Graph) -> HashMap<String, HostTensor> {
    let ckpt = Checkpoint::open(&fixture()).unwrap();
    let mut w = HashMap::new();
    for (name, id) in g.weights() {
        let Op::Weight { ty, .. } = &g.node(id).op else {
            unreachable!()
        };
        let t = if name.contains("lora_") {
            let n = ty.shape.numel();
            let salt = name.len() as f32;
            let v = (0..n)
                .map(|i| (i as f32 * 0.37 + salt).sin() * 0.2)
                .collect();
            HostTensor::f32(ty.shape.clone(), v)
        } else {
            ckpt.load(&name, ty).unwrap()
        };
        w.insert(name, t);
    }
    w
}

fn run(g: &Graph, w: &HashMap<String, HostTensor>) -> RunResult {
    let ids: Vec<i32> = (0..T as i32).map(|i| (i * 11 + 5) % 60).collect();
    let seed = dropout::micro_batch_seed(42, 3, 0);
    let inputs: HashMap<&str, HostTensor> = [
        ("input_ids", HostTensor::i32([T], ids.clone())),
        (
            "position_ids",
            HostTensor::i32([T], (0..T as i32).collect()),
        ),
        ("labels", HostTensor::i32([T], ids)),
        (
            DROPOUT_KEY,
            HostTensor::i32([3], dropout::key_words(seed, true).to_vec()),
        ),
    ]
    .into();
    Program::new(g, &[])
        .unwrap()
        .run(&CpuBackend::new(), &|n| w.get(n), &|n| inputs.get(n))
        .unwrap()
}

#[test]
fn fusing_elementwise_chains_keeps_every_output_bit() {
    // alpha 8 with rank 4 keeps a Scale(2) in each branch (alpha = r would be simplified away).
    for (dtype, p, alpha) in [
        (DType::BF16, 0.0, 4.0),
        (DType::BF16, 0.25, 8.0),
        (DType::F32, 0.0, 8.0),
        (DType::F16, 0.1, 8.0),
    ] {
        let mut plain = lora_graph(dtype, p, alpha);
        // The trainer's order: checkpointing first (bf16 rows), then fusion of the copies too.
        if dtype == DType::BF16 {
            recompute(&mut plain, CheckpointPolicy::Layer).unwrap();
        }
        let mut fused = plain.clone();
        let stats = fuse_elementwise(&mut fused).unwrap();
        fused.verify().unwrap();
        assert!(stats.groups >= 10, "{dtype}: {stats:?}");
        assert!(fused.g.node_count() < plain.g.node_count());
        let w = weights(&plain);
        let (a, b) = (run(&plain, &w), run(&fused, &w));
        let mut names: Vec<&String> = a.outputs.keys().collect();
        names.sort();
        assert_eq!(a.outputs.len(), b.outputs.len());
        for n in names {
            let (x, y) = (&a.outputs[n], &b.outputs[n]);
            assert_eq!(x.ty, y.ty, "{n}");
            let bits = |t: &HostTensor| t.as_f32().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert!(bits(x) == bits(y), "{dtype} p={p}: output `{n}` differs");
        }
        eprintln!(
            "{dtype} p={p}: {stats:?}; nodes {} → {}; peak activations {} B → {} B",
            plain.g.node_count(),
            fused.g.node_count(),
            a.stats.peak_activation_bytes,
            b.stats.peak_activation_bytes
        );
        assert!(b.stats.peak_activation_bytes <= a.stats.peak_activation_bytes);
    }
}
