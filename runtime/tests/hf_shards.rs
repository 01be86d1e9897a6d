//! Full fine-tune outputs (spec §9.6): the bf16 state dict as HF safetensors shards with
//! `model.safetensors.index.json` when it exceeds the shard limit (5 GB in training; 100 KB
//! here, on the tiny fixture), a single `model.safetensors` otherwise, and either folder
//! loads back through our own checkpoint reader to the same logits.
use qplc_ops::DType;
use qplc_runtime::checkpoint::Checkpoint;
use qplc_runtime::hf_weights::{write_full_model, INDEX_FILE, SINGLE_FILE};
use qplc_runtime::model::{LoadedModel, ModelDir};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-gqa")
}

const LIMIT: u64 = 100_000;

fn logits(dir: &Path) -> Vec<f32> {
    let m = LoadedModel::load(&ModelDir::open(dir, None).unwrap(), 16, DType::F32).unwrap();
    m.logits(&(0..16).map(|i| (i * 13) % 500).collect::<Vec<i32>>())
        .unwrap()
        .as_f32()
        .to_vec()
}

#[test]
fn state_dict_over_the_limit_is_sharded_with_an_index_and_loads_back_identically() {
    let base =
        LoadedModel::load(&ModelDir::open(&fixture(), None).unwrap(), 16, DType::F32).unwrap();
    let weights = base.weights.clone();

    let sharded = tempfile::tempdir().unwrap();
    let single = tempfile::tempdir().unwrap();
    let w = write_full_model(sharded.path(), &fixture(), &weights, LIMIT).unwrap();
    let one = write_full_model(single.path(), &fixture(), &weights, u64::MAX).unwrap();
    assert_eq!(one.files, [SINGLE_FILE]);
    assert!(!single.path().join(INDEX_FILE).exists());

    let n = w.files.len() - 1;
    assert!(n >= 2, "{:?}", w.files);
    for (k, f) in w.files[..n].iter().enumerate() {
        assert_eq!(*f, format!("model-{:05}-of-{n:05}.safetensors", k + 1));
    }
    assert_eq!(w.files[n], INDEX_FILE);
    assert!(!sharded.path().join(SINGLE_FILE).exists());

    // The index names every tensor once, in the shard that holds it; total_size is the sum
    // of the tensors' bf16 bytes; no shard is over the limit unless one tensor alone is.
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sharded.path().join(INDEX_FILE)).unwrap())
            .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), weights.len());
    let mut total = 0u64;
    let mut per_file: BTreeMap<String, u64> = BTreeMap::new();
    for f in &w.files[..n] {
        let bytes = std::fs::read(sharded.path().join(f)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get("format"))
                .map(String::as_str),
            Some("pt")
        );
        let mut size = 0u64;
        let mut largest = 0u64;
        for (name, view) in st.tensors() {
            assert_eq!(map[&name], f.as_str(), "{name}");
            assert_eq!(view.dtype(), safetensors::Dtype::BF16);
            let b = view.data().len() as u64;
            size += b;
            largest = largest.max(b);
        }
        assert!(size <= LIMIT || size == largest, "{f}: {size} bytes");
        total += size;
        per_file.insert(f.clone(), size);
    }
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
    assert_eq!(total, w.total_size);
    let expected: u64 = weights.values().map(|t| 2 * t.shape().numel() as u64).sum();
    assert_eq!(total, expected);

    // Config and tokenizer came along; the base model's own weights did not.
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(sharded.path().join(f).is_file(), "{f} missing");
    }
    Checkpoint::open(sharded.path()).unwrap();

    // Both folders are loadable HF models with the same (bf16-rounded) weights.
    let (a, b) = (logits(sharded.path()), logits(single.path()));
    assert_eq!(a, b);
    // And the weights are the trained ones, rounded: close to the originals' logits.
    let orig = logits(&fixture());
    let scale = orig.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = a
        .iter()
        .zip(&orig)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        d / scale < 0.05,
        "bf16 rounding moved logits by {}",
        d / scale
    );
}
