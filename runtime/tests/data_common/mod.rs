//! Shared setup for the data pipeline tests: the fixture tokenizer (a real byte-level BPE
//! trained with HF `tokenizers` by scripts/make_fixtures.py; BOS `<s>` = 0, EOS `</s>` = 1)
//! and configs written around small inputs.
#![allow(dead_code)]
use qplc_compiler::config::LoadedConfig;
use qplc_runtime::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

pub fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-gqa")
}

pub fn inputs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data")
}

pub fn tokenizer() -> Tokenizer {
    Tokenizer::open(&model_dir()).unwrap()
}

/// A LoRA config in `dir` with `extra` top-level keys and `datasets` (TOML `[[datasets]]`
/// tables); relative dataset paths resolve against `dir`.
pub fn config(dir: &Path, extra: &str, datasets: &str) -> LoadedConfig {
    let text = format!(
        "model_dir = {:?}\noutput_dir = \"out\"\nlr = 1e-3\nlora_rank = 4\n{extra}\n{datasets}\n",
        model_dir().display().to_string()
    );
    let text = if text.contains("sequence_len") {
        text
    } else {
        format!("sequence_len = 64\n{text}")
    };
    LoadedConfig::from_str(&dir.join("config.toml"), &text).unwrap()
}

/// One `[[datasets]]` table.
pub fn dataset(path: &Path, more: &str) -> String {
    format!(
        "[[datasets]]\ndataset_path = {:?}\n{more}\n",
        path.display().to_string()
    )
}
