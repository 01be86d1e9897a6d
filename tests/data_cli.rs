//! `qplc data CONFIG.toml [--dump N]` end to end (issue 4): build, reuse, dump.
use std::path::Path;
use std::process::Command;

fn qplc_data(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qplc"))
        .arg("data")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn write_config(dir: &Path) -> String {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-gqa");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/tiny.txt");
    let text = format!(
        "model_dir = {:?}\noutput_dir = \"out\"\nlr = 1e-3\nlora_rank = 4\nsequence_len = 64\n\
         mask_tokens = true\n[[datasets]]\ndataset_path = {:?}\n",
        model.display().to_string(),
        data.display().to_string()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn data_command_builds_then_reuses_the_cache_and_dumps_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let (ok, out, err) = qplc_data(&[&config]);
    assert!(ok, "{err}");
    assert!(out.contains("(built)"), "{out}");
    assert!(
        out.contains("sequences: 78 of 64 tokens (train 77"),
        "{out}"
    );
    assert!(out.contains("masked: "), "{out}");
    // The default cache folder is <output_dir>/data_cache, next to the config.
    assert!(dir.path().join("out/data_cache").is_dir());

    let (ok, out, err) = qplc_data(&[&config, "--dump", "2"]);
    assert!(ok, "{err}");
    assert!(out.contains("reused, nothing tokenised"), "{out}");
    assert!(out.contains("#0 ids: (0) [c=+1]"), "{out}");
    assert!(out.contains("#1 text: [masked]<s>[+1]"), "{out}");
    assert!(!out.contains("#2 ids"), "{out}");
}

#[test]
fn data_command_reports_a_bad_dataset_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let text = std::fs::read_to_string(&config).unwrap();
    let bad = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/malformed.jsonl");
    let text = text.replace(
        "examples/data/tiny.txt",
        bad.strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap()
            .to_str()
            .unwrap(),
    );
    std::fs::write(&config, text).unwrap();
    let (ok, _, err) = qplc_data(&[&config]);
    assert!(!ok);
    assert!(err.contains("malformed.jsonl`:3:"), "{err}");
}
