//! `qplc compile` runs the fuse pass after autodiff (DESIGN "The flow"): the plan's graph
//! computes the loss with the fused, vocabulary-chunked cross-entropy, and `--dump-after
//! fuse` shows it.
use std::path::Path;
use std::process::Command;

#[test]
fn compile_fuses_the_loss_and_dumps_after_fuse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qplc"))
        .args([
            "compile",
            "examples/tiny-lora.toml",
            "--out",
            dir.path().to_str().unwrap(),
            "--format",
            "text",
            "--dump-after",
            "fuse",
        ])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = std::fs::read_to_string(dir.path().join("after-fuse.txt")).unwrap();
    assert!(dump.contains("cross_entropy_backward"), "{dump}");
    for unfused in ["log_softmax", "nll", "nll_backward"] {
        assert!(
            !dump.contains(&format!(" = {unfused}(")),
            "`{unfused}` left after fuse"
        );
    }
    let plan = std::fs::read_to_string(dir.path().join("plan.json")).unwrap();
    assert!(plan.contains("\"cross_entropy\""));
    assert!(!plan.contains("\"log_softmax\""));
}
