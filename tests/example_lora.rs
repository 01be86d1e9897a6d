//! examples/lora.toml (SmolLM2-135M-Instruct, the GPU-vs-CPU loss-curve run of notes/CUDA.md)
//! stays valid: it compiles against the model's config.json alone, and, where the fetch
//! scripts' model and text are present, its data makes exactly 50 optimizer steps.
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// config.json as scripts/fetch_smollm2.py writes it (transformers 5.24); compiling needs
/// nothing else from the model folder.
const SMOLLM2_CONFIG: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "dtype": "float32",
  "eos_token_id": 2,
  "head_dim": 64,
  "hidden_act": "silu",
  "hidden_size": 576,
  "initializer_range": 0.02,
  "intermediate_size": 1536,
  "max_position_embeddings": 8192,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 9,
  "num_hidden_layers": 30,
  "num_key_value_heads": 3,
  "pad_token_id": 2,
  "pretraining_tp": 1,
  "rms_norm_eps": 9.999999747378752e-06,
  "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
  "tie_word_embeddings": true,
  "unk_token_id": 0,
  "use_cache": true,
  "vocab_size": 49152
}"#;

/// A copy of the example at `dir/examples/lora.toml`, so its relative paths
/// (`../target/smollm2/...`) point into `dir`.
fn example_in(dir: &Path) -> PathBuf {
    let examples = dir.join("examples");
    std::fs::create_dir_all(&examples).unwrap();
    let toml = examples.join("lora.toml");
    std::fs::copy(root().join("examples/lora.toml"), &toml).unwrap();
    toml
}

fn qplc(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qplc"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("qplc runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn example_lora_compiles_against_smollm2_config() {
    let dir = tempfile::tempdir().unwrap();
    let toml = example_in(dir.path());
    let model = dir.path().join("target/smollm2/smollm2-hf");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("config.json"), SMOLLM2_CONFIG).unwrap();
    let plan = dir.path().join("plan");
    let (ok, stdout, stderr) = qplc(&[
        "compile",
        toml.to_str().unwrap(),
        "--out",
        plan.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert!(ok, "qplc compile examples/lora.toml failed:\n{stderr}");
    // Rank 16 on all seven linear layers of 30 decoder layers:
    // 16 · (q 576+576, k 576+192, v 576+192, o 576+576, gate/up 576+1536 twice, down 1536+576).
    let trainable = 30 * 16 * (1152 + 768 + 768 + 1152 + 3 * 2112);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plan.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["trainable_params"], trainable, "{stdout}");
    assert_eq!(report["seq_len"], 512, "{stdout}");
    assert!(
        stdout.contains("lora: 210 adapted linear modules, rank 16"),
        "all-linear on 30 layers means 7 · 30 adapters:\n{stdout}"
    );
}

#[test]
fn example_lora_makes_fifty_steps_of_hamlet() {
    let data = root().join("target/smollm2");
    let (model, text) = (data.join("smollm2-hf"), data.join("hamlet.txt"));
    if !model.join("tokenizer.json").exists() || !text.exists() {
        eprintln!(
            "skipped: {} or {} missing (scripts/fetch_smollm2.py and scripts/fetch_text.py write them)",
            model.display(),
            text.display()
        );
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = qplc(&[
        "data",
        "examples/lora.toml",
        "--cache-dir",
        cache.path().to_str().unwrap(),
    ]);
    assert!(ok, "qplc data examples/lora.toml failed:\n{stderr}");
    // GAS 1 and one epoch: a step per training sequence.
    assert!(
        stdout.contains("(train 50 = "),
        "expected 50 training sequences:\n{stdout}"
    );
}
