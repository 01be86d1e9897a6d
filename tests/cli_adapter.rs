//! `qplc score --adapter` and `qplc generate --adapter` with the PEFT fixture
//! (tests/fixtures/peft-lora, scripts/make_peft_fixtures.py).
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

fn ok_json(args: &[&str]) -> serde_json::Value {
    let out = qplc(args);
    assert!(
        out.status.success(),
        "qplc {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

const SCORE: [&str; 10] = [
    "score",
    "--model",
    "tests/fixtures/llama-gqa",
    "--text",
    "tests/fixtures/text.txt",
    "--seq-len",
    "32",
    "--max-tokens",
    "32",
    "--json",
];

#[test]
fn score_with_a_peft_adapter_matches_peft_nll() {
    let mut args = SCORE.to_vec();
    args.extend(["--adapter", "tests/fixtures/peft-lora"]);
    let s = ok_json(&args);
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/peft-lora/expected.json")).unwrap(),
    )
    .unwrap();
    let (got, want) = (
        s["mean_nll"].as_f64().unwrap(),
        expected["mean_nll"].as_f64().unwrap(),
    );
    assert!((got - want).abs() < 1e-5, "qplc {got} vs PEFT {want}");
    // And the adapter matters: the base model scores differently.
    let base = ok_json(&SCORE)["mean_nll"].as_f64().unwrap();
    assert!((base - got).abs() > 0.01, "base {base} vs adapter {got}");
}

#[test]
fn score_with_a_missing_adapter_folder_fails_with_the_path() {
    let mut args = SCORE.to_vec();
    args.extend(["--adapter", "tests/fixtures/no-such-adapter"]);
    let out = qplc(&args);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such-adapter") && err.contains("adapter_config.json"),
        "{err}"
    );
}

#[test]
fn generate_accepts_an_adapter() {
    let v = ok_json(&[
        "generate",
        "--model",
        "tests/fixtures/llama-gqa",
        "--adapter",
        "tests/fixtures/peft-lora",
        "--prompt",
        "Four score",
        "--raw",
        "--max-new-tokens",
        "3",
        "--json",
    ]);
    assert!(!v["new_ids"].as_array().unwrap().is_empty());
}
