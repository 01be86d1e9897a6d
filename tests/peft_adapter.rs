//! LoRA adapters end to end on the tiny Llama fixture: a PEFT-made adapter
//! (tests/fixtures/peft-lora, scripts/make_peft_fixtures.py: rank 4, alpha 8, all-linear,
//! random B) gives PEFT's logits; the lora pass at init leaves the model unchanged (check 24);
//! our writer produces PEFT's key names (check 50) and reads back to the same model; the
//! reader's key forms and errors (spec §11.1).
use qplc_compiler::config::LoadedConfig;
use qplc_ops::DType;
use qplc_passes::LoraPass;
use qplc_runtime::adapter_init::init_lora_weights;
use qplc_runtime::model::{LoadedModel, ModelDir};
use qplc_runtime::peft::{read_adapter, write_adapter, AdapterConfig};
use qplc_runtime::HostTensor;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `input_ids` and `logits` of an expected.safetensors.
fn expected(dir: &Path) -> (Vec<i32>, Vec<f32>) {
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as i32)
        .collect();
    let logits = st
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (ids, logits)
}

/// max |a − b| / max |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    let d = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
    d / scale
}

fn with_adapter(dir: &Path) -> anyhow::Result<LoadedModel> {
    let model = ModelDir::open(&fixture("llama-gqa"), None)?.with_adapter(dir)?;
    LoadedModel::load(&model, 32, DType::F32)
}

#[test]
fn peft_adapter_logits_match_peft() {
    let (ids, want) = expected(&fixture("peft-lora"));
    let loaded = with_adapter(&fixture("peft-lora")).unwrap();
    let got = loaded.logits(&ids).unwrap();
    let err = rel_err(got.as_f32(), &want);
    eprintln!("max |qplc − PEFT| / max |logit| = {err:.3e}");
    assert!(err <= 1e-4, "relative error {err:.3e}");
    // The adapter really changes the model (so the comparison tests the branch, at α/r = 2).
    let (_, base) = expected(&fixture("llama-gqa"));
    assert!(rel_err(&base, &want) > 0.1);
}

fn lora_config(body: &str) -> LoadedConfig {
    let text = format!(
        "model_dir = \"m\"\noutput_dir = \"o\"\nsequence_len = 64\nlr = 1e-4\n{body}\n[[datasets]]\ndataset_path = \"d.txt\"\n"
    );
    LoadedConfig::from_str(Path::new("t.toml"), &text).unwrap()
}

/// The base model with the lora pass of `cfg` applied and PEFT-style init (seeded).
fn base_with_fresh_lora(cfg: &LoadedConfig) -> (LoadedModel, LoraPass) {
    let model = ModelDir::open(&fixture("llama-gqa"), None).unwrap();
    let mut loaded = LoadedModel::load(&model, 32, DType::F32).unwrap();
    let pass = LoraPass::from_config(cfg).unwrap();
    pass.apply(&mut loaded.built.graph).unwrap();
    loaded.built.graph.verify().unwrap();
    loaded
        .weights
        .extend(init_lora_weights(&loaded.built.graph, 1234));
    (loaded, pass)
}

#[test]
fn lora_at_init_leaves_the_base_output_unchanged() {
    // Check 24 with a bf16 adapter (casts in the branch) and all linear layers.
    let cfg = lora_config("lora_rank = 8\nlora_weight_dtype = \"bfloat16\"");
    let (loaded, _) = base_with_fresh_lora(&cfg);
    let (ids, base) = expected(&fixture("llama-gqa"));
    let plain = LoadedModel::load(
        &ModelDir::open(&fixture("llama-gqa"), None).unwrap(),
        32,
        DType::F32,
    )
    .unwrap();
    let want = plain.logits(&ids).unwrap();
    let got = loaded.logits(&ids).unwrap();
    assert_eq!(
        got.as_f32(),
        want.as_f32(),
        "B = 0 must add exactly nothing"
    );
    assert!(rel_err(got.as_f32(), &base) < 1e-4);
    // A is really random (U(−1/√in, 1/√in)), so the zero comes from B.
    let a = &loaded.weights["model.layers.0.self_attn.q_proj.lora_A.weight"];
    assert!(a.as_f32().iter().any(|&x| x != 0.0));
    assert!(a.as_f32().iter().all(|&x| x.abs() <= 1.0 / 8.0)); // in = 64
}

fn safetensors_keys(path: &Path) -> Vec<(String, safetensors::Dtype)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut k: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype()))
        .collect();
    k.sort();
    k
}

#[test]
fn written_adapter_has_peft_names_and_config_and_reads_back() {
    let cfg = lora_config(
        "lora_rank = 4\nlora_weight_dtype = \"bfloat16\"\ntarget_modules = [\"q_proj\", \"down_proj\"]\nlayers_to_transform = \"1\"",
    );
    let (mut loaded, pass) = base_with_fresh_lora(&cfg);
    // Non-zero B so that reading back is a real test.
    for (name, t) in loaded.weights.iter_mut() {
        if name.ends_with("lora_B.weight") {
            let n = t.as_f32().len();
            let v: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) * 0.05).collect();
            *t = HostTensor::f32(t.shape().clone(), v).cast(DType::BF16);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let config = AdapterConfig::from_pass(&pass, &loaded.built.graph, "base").unwrap();
    write_adapter(dir.path(), &loaded.built.graph, &loaded.weights, &config).unwrap();

    // Check 50: PEFT key names, no `.default`, adapter dtype; r = lora_alpha = lora_rank.
    let keys = safetensors_keys(&dir.path().join("adapter_model.safetensors"));
    let names: Vec<&str> = keys.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight",
            "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight",
        ]
    );
    assert!(keys.iter().all(|(_, d)| *d == safetensors::Dtype::BF16));
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"], 4);
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["layers_to_transform"], serde_json::json!([1]));
    assert_eq!(
        json["target_modules"],
        serde_json::json!(["q_proj", "down_proj"])
    );

    // The values read back are exactly the ones written.
    let back = with_adapter(dir.path()).unwrap();
    for (name, t) in &loaded.weights {
        if name.contains(".lora_") {
            assert_eq!(back.weights[name].as_f32(), t.as_f32(), "{name}");
        }
    }
    // Scoring computes the branch in f32 (as PEFT on an f32 base), training in the bf16
    // adapter dtype: the logits differ only by bf16 rounding in the branch.
    let (ids, _) = expected(&fixture("llama-gqa"));
    let want = loaded.logits(&ids).unwrap();
    let got = back.logits(&ids).unwrap();
    let err = rel_err(got.as_f32(), want.as_f32());
    assert!(err > 0.0 && err < 1e-3, "{err:.3e}");

    // For scripts/make_peft_fixtures.py --check-qplc DIR (PEFT loads what we wrote).
    if let Ok(out) = std::env::var("QPLC_PEFT_ROUNDTRIP_DIR") {
        let out = Path::new(&out);
        let mut c = config.clone();
        c.base_model_name_or_path = Some(fixture("llama-gqa").display().to_string());
        write_adapter(out, &loaded.built.graph, &loaded.weights, &c).unwrap();
        qplc_runtime::score::dump_logits(&out.join("qplc_logits.safetensors"), &ids, &got).unwrap();
    }
}

/// Copies the PEFT fixture with its keys renamed by `rename` (None drops the key).
fn renamed_fixture(rename: impl Fn(&str) -> Option<String>) -> tempfile::TempDir {
    use safetensors::tensor::TensorView;
    let src = fixture("peft-lora");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        dir.path().join("adapter_config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut views: Vec<(String, TensorView)> = Vec::new();
    for (name, v) in st.tensors() {
        if let Some(n) = rename(&name) {
            views.push((n, v));
        }
    }
    let meta: HashMap<String, String> = HashMap::new();
    safetensors::tensor::serialize_to_file(
        views,
        Some(meta),
        &dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    dir
}

#[test]
fn reader_accepts_the_one_model_form_and_adapter_name_segments() {
    let (ids, want) = expected(&fixture("peft-lora"));
    // `base_model.model.layers…` (the reference merge tool's form, spec §11.1) and
    // `….lora_A.default.weight` (PEFT's in-memory names).
    let dir = renamed_fixture(|n| {
        Some(
            n.replacen("base_model.model.model.", "base_model.model.", 1)
                .replace(".lora_A.weight", ".lora_A.default.weight"),
        )
    });
    let got = with_adapter(dir.path()).unwrap().logits(&ids).unwrap();
    assert!(rel_err(got.as_f32(), &want) <= 1e-4);
}

#[test]
fn a_lone_lora_matrix_is_an_error_naming_its_key() {
    let lone = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight";
    let dir = renamed_fixture(|n| {
        (n != "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight").then(|| n.to_string())
    });
    let e = format!("{:#}", read_adapter(dir.path()).unwrap_err());
    assert!(e.contains(lone) && e.contains("no matching lora_A"), "{e}");
}

#[test]
fn a_pickled_adapter_is_refused_with_a_conversion_hint() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("peft-lora").join("adapter_config.json"),
        dir.path().join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(dir.path().join("adapter_model.bin"), b"not really").unwrap();
    let e = format!("{:#}", read_adapter(dir.path()).unwrap_err());
    assert!(
        e.contains("safetensors only") && e.contains("save_file"),
        "{e}"
    );
}

#[test]
fn adapter_weights_outside_its_targets_are_an_error() {
    let dir = renamed_fixture(|n| Some(n.to_string()));
    let cfg_path = dir.path().join("adapter_config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    c["target_modules"] = serde_json::json!(["q_proj"]);
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    let e = format!("{:#}", with_adapter(dir.path()).err().unwrap());
    assert!(e.contains("does not select"), "{e}");
}

#[test]
fn adapter_config_round_trips_through_json() {
    let adapter = read_adapter(&fixture("peft-lora")).unwrap();
    let c = &adapter.config;
    assert_eq!((c.r, c.lora_alpha), (4, 8.0));
    assert_eq!(adapter.pairs.len(), 14);
    let again = AdapterConfig::from_json(&c.to_json(), Path::new("x")).unwrap();
    assert_eq!(&again, c);
}

#[test]
fn adapter_shapes_that_do_not_fit_the_model_are_an_error_naming_the_module() {
    // Swap the pairs of q_proj (in 64) and down_proj (in 128) of layer 0.
    let (q, d) = ("layers.0.self_attn.q_proj.", "layers.0.mlp.down_proj.");
    let dir = renamed_fixture(|n| {
        Some(if n.contains(q) {
            n.replace(q, d)
        } else {
            n.replace(d, q)
        })
    });
    let e = format!("{:#}", with_adapter(dir.path()).err().unwrap());
    assert!(e.contains("lora_A must be [r, "), "{e}");
}
