//! The CPU forward of every fixture model against transformers' logits
//! (tests/fixtures, made by scripts/make_fixtures.py): max relative error ≤ 1e-4 in f32,
//! mean next-token NLL within 1e-5.
use qplc_ops::DType;
use qplc_runtime::model::{LoadedModel, ModelDir};
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Expected {
    ids: Vec<i32>,
    logits: Vec<f32>,
    vocab: usize,
    nll: f64,
}

fn expected(dir: &Path) -> Expected {
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids_t = st.tensor("input_ids").unwrap();
    let ids: Vec<i32> = match ids_t.dtype() {
        safetensors::Dtype::I64 => ids_t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as i32)
            .collect(),
        safetensors::Dtype::I32 => ids_t
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        d => panic!("unexpected dtype {d:?}"),
    };
    let lt = st.tensor("logits").unwrap();
    let logits: Vec<f32> = lt
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let vocab = lt.shape()[1];
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    Expected {
        ids,
        logits,
        vocab,
        nll: json["mean_nll"].as_f64().unwrap(),
    }
}

/// Mean over positions 0..T-1 of −log softmax(logits[t])[ids[t+1]], in f64.
fn mean_nll(logits: &[f32], ids: &[i32], vocab: usize) -> f64 {
    let t = ids.len();
    let mut total = 0.0;
    for p in 0..t - 1 {
        let row = &logits[p * vocab..(p + 1) * vocab];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let lse = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        total += lse - row[ids[p + 1] as usize] as f64;
    }
    total / (t - 1) as f64
}

fn check(name: &str) {
    let dir = fixture(name);
    let exp = expected(&dir);
    let model = ModelDir::open(&dir, None).unwrap();
    let loaded = LoadedModel::load(&model, exp.ids.len(), DType::F32).unwrap();
    let got = loaded.logits(&exp.ids).unwrap();
    let got = got.as_f32();
    assert_eq!(got.len(), exp.logits.len());
    // Relative to the logits' scale: elementwise relative error explodes near zero.
    let scale = exp.logits.iter().fold(0f32, |m, x| m.max(x.abs()));
    let max_err = got
        .iter()
        .zip(&exp.logits)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        max_err / scale <= 1e-4,
        "{name}: max |Δlogit| {max_err} over max |logit| {scale} = {}",
        max_err / scale
    );
    let nll = mean_nll(got, &exp.ids, exp.vocab);
    eprintln!(
        "{name}: max rel {:.2e}, NLL {nll} vs {}",
        max_err / scale,
        exp.nll
    );
    assert!(
        (nll - exp.nll).abs() <= 1e-5,
        "{name}: NLL {nll} vs transformers {}",
        exp.nll
    );
}

#[test]
fn llama_with_grouped_kv_heads_and_llama3_rope_matches_transformers() {
    check("llama-gqa");
}

#[test]
fn llama_with_tied_embeddings_from_sharded_safetensors_matches_transformers() {
    check("llama-tied");
}

#[test]
fn mistral_with_sliding_window_shorter_than_sequence_matches_transformers() {
    check("mistral-swa");
}

#[test]
fn qwen2_with_qkv_bias_matches_transformers() {
    check("qwen2-bias");
}
