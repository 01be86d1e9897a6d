//! End-to-end tests through the `qplc` binary.
use std::path::Path;
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn qplc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qplc"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("qplc runs")
}

fn ok(args: &[&str]) -> String {
    let out = qplc(args);
    assert!(
        out.status.success(),
        "qplc {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = qplc(args);
    assert_eq!(out.status.code(), Some(1), "qplc {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn fixture(name: &str) -> String {
    root()
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn compile_tiny_lora_writes_plan_report_and_a_layer_graph() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plan");
    let stdout = ok(&[
        "compile",
        "examples/tiny-lora.toml",
        "--out",
        out.to_str().unwrap(),
        "--format",
        "dot,json,text",
    ]);
    assert!(stdout.contains("parameters:"), "{stdout}");
    for f in [
        "plan.json",
        "report.txt",
        "report.json",
        "graph.dot",
        "graph.layers.dot",
        "graph.json",
        "graph.txt",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let plan = qplc_compiler::Plan::read(&out.join("plan.json")).unwrap();
    assert_eq!(plan.model.num_layers, 2);
    plan.graph.verify().unwrap();
    // The collapsed view chains embedding → decoder layers → norm → head.
    let dot = std::fs::read_to_string(out.join("graph.layers.dot")).unwrap();
    let pos = |needle: &str| {
        dot.find(needle)
            .unwrap_or_else(|| panic!("`{needle}` not in the layer graph:\n{dot}"))
    };
    assert!(pos("Embedding") < pos("DecoderLayer 0"));
    assert!(pos("DecoderLayer 0") < pos("DecoderLayer 1"));
    assert!(pos("DecoderLayer 1") < pos("Norm"));
    assert!(pos("Norm") < pos("LmHead"));
}

#[test]
fn compile_dump_after_partition_writes_the_extra_dump() {
    let dir = tempfile::tempdir().unwrap();
    ok(&[
        "compile",
        "examples/tiny-lora.toml",
        "--out",
        dir.path().to_str().unwrap(),
        "--format",
        "text",
        "--dump-after",
        "partition",
    ]);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("after-partition")),
        "{names:?}"
    );
    let err = fails(&[
        "compile",
        "examples/tiny-lora.toml",
        "--out",
        dir.path().to_str().unwrap(),
        "--dump-after",
        "nonsense",
    ]);
    assert!(err.contains("no such pass"), "{err}");
}

#[test]
fn compile_rejects_a_bad_config_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(root().join("examples/tiny-lora.toml"))
        .unwrap()
        .replace("sequence_len = 64", "sequence_len = 100");
    std::fs::write(&cfg, &text).unwrap();
    let line = text
        .lines()
        .position(|l| l.starts_with("sequence_len"))
        .unwrap()
        + 1;
    let err = fails(&["compile", cfg.to_str().unwrap()]);
    assert!(
        err.contains(&format!(
            "bad.toml:{line}: `sequence_len`: must be a positive multiple of 64"
        )),
        "{err}"
    );
}

#[test]
fn unknown_model_type_lists_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "gpt_neox"}"#,
    )
    .unwrap();
    let err = fails(&["inspect", dir.path().to_str().unwrap()]);
    assert!(err.contains("gpt_neox"), "{err}");
    assert!(err.contains("llama, mistral, qwen2"), "{err}");
}

#[test]
fn inspect_lists_target_modules_and_parameters() {
    let out = ok(&["inspect", &fixture("llama-gqa"), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["arch"], "llama");
    assert_eq!(v["layers"], 2);
    let mods: Vec<&str> = v["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    for m in [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ] {
        assert!(mods.contains(&m), "{mods:?}");
    }
    // Untied vocab 512 × hidden 64 twice; per layer q,o 64×64, k,v 32×64 (2 KV heads of
    // 16), MLP 3 × 64×128, two norms; final norm.
    let layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64;
    assert_eq!(v["parameters"], 2 * 512 * 64 + 2 * layer + 64);
}

/// Same windows and numbers as scripts/reference_ppl.py on the fixture text
/// (tests/fixtures/README.md: 4 windows of 32, NLL 6.981134).
#[test]
fn score_matches_transformers_on_the_fixture_text() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("logits.safetensors");
    let out = ok(&[
        "score",
        "--model",
        &fixture("llama-gqa"),
        "--text",
        &fixture("text.txt"),
        "--seq-len",
        "32",
        "--json",
        "--dump-logits",
        dump.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["windows"], 4);
    assert_eq!(v["predictions"], 124);
    let nll = v["mean_nll"].as_f64().unwrap();
    assert!((nll - 6.981134).abs() < 1e-5, "{nll}");

    // The first window is the fixture's reference sequence: its logits match transformers'.
    let got = std::fs::read(&dump).unwrap();
    let got = safetensors::SafeTensors::deserialize(&got).unwrap();
    let want = std::fs::read(root().join("tests/fixtures/llama-gqa/expected.safetensors")).unwrap();
    let want = safetensors::SafeTensors::deserialize(&want).unwrap();
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let (g, w) = (
        f32s(got.tensor("logits").unwrap().data()),
        f32s(want.tensor("logits").unwrap().data()),
    );
    assert_eq!(g.len(), w.len());
    let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = g
        .iter()
        .zip(&w)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err / scale < 1e-4, "{err}");
}

#[test]
fn generate_is_deterministic_and_bounded() {
    let args = [
        "generate",
        "--model",
        &fixture("llama-tied"),
        "--prompt",
        "The quick brown fox",
        "--raw",
        "--max-new-tokens",
        "6",
        "--json",
    ];
    let a: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    let b: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    assert_eq!(a, b);
    let n = a["new_ids"].as_array().unwrap().len();
    assert!((1..=6).contains(&n));
}

#[test]
fn every_command_has_help_with_examples() {
    for cmd in ["compile", "score", "generate", "inspect"] {
        let out = ok(&[cmd, "--help"]);
        assert!(out.contains("Examples:"), "{cmd}: {out}");
    }
}
