//! Shared by simplify_exact.rs and fuse_elementwise_exact.rs: one LoRA training step of the
//! tiny Llama fixture (every linear adapted, rank 4), non-zero adapters so that every branch
//! and every adapter gradient is exercised, run on the CPU.
use qplc_compiler::{build_forward, load_model_def, BuildOptions, Graph};
use qplc_ops::{dropout, DType, Op};
use qplc_passes::{
    append_backward, append_loss, cross_entropy_rules, fuse, LoraPass, LoraSelection, ModuleMatch,
    DROPOUT_KEY,
};
use qplc_runtime::checkpoint::Checkpoint;
use qplc_runtime::executor::{Program, RunResult};
use qplc_runtime::{CpuBackend, HostTensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const T: usize = 24;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-gqa")
}

/// Forward, LoRA (rank 4, `alpha`), loss, backward and the cross-entropy fusion.
pub fn lora_graph(dtype: DType, dropout: f64, alpha: f64) -> Graph {
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
    g.verify().unwrap();
    g
}

/// The fixture's weights, and adapters drawn from a fixed sine so that both factors are
/// non-zero.
pub fn weights(g: &Graph) -> HashMap<String, HostTensor> {
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

/// Every output of `g` for a fixed token sequence (dropout active).
pub fn run(g: &Graph, w: &HashMap<String, HostTensor>) -> RunResult {
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

/// Asserts that two runs gave the same outputs, bit for bit.
pub fn assert_same_bits(a: &RunResult, b: &RunResult, what: &str) {
    let mut names: Vec<&String> = a.outputs.keys().collect();
    names.sort();
    assert_eq!(a.outputs.len(), b.outputs.len());
    for n in names {
        let (x, y) = (&a.outputs[n], &b.outputs[n]);
        assert_eq!(x.ty, y.ty, "{n}");
        let bits = |t: &HostTensor| t.as_f32().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert!(bits(x) == bits(y), "{what}: output `{n}` differs");
    }
}
