//! Training end to end through the CLI: resume continuity (spec §9.5, check 47) and
//! checkpoint atomicity under a hard kill.
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The tiny LoRA example with its paths made absolute and `extra` settings on top.
fn config(dir: &Path, epochs: u32, extra: &str) -> PathBuf {
    let text = std::fs::read_to_string(root().join("examples/tiny-lora.toml")).unwrap();
    let ex = root().join("examples");
    let text = text
        .replace(
            "model_dir = \"../tests/fixtures/llama-gqa\"",
            &format!(
                "model_dir = \"{}\"",
                ex.join("../tests/fixtures/llama-gqa").display()
            ),
        )
        .replace(
            "output_dir = \"../target/runs/tiny-lora\"",
            &format!("output_dir = \"{}\"", dir.join("out").display()),
        )
        .replace(
            "dataset_path = \"data/tiny.txt\"",
            &format!("dataset_path = \"{}\"", ex.join("data/tiny.txt").display()),
        )
        .replace("epochs = 1", &format!("epochs = {epochs}\n{extra}"));
    let p = dir.join("cfg.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn run(cfg: &Path, resume: bool) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qplc"));
    cmd.arg("run").arg(cfg);
    if resume {
        cmd.arg("--resume");
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "qplc run failed:\n{stderr}");
    stderr
}

/// `(step, loss text)` of every step line.
fn losses(log: &str) -> Vec<(u32, String)> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split("step: ").nth(1)?;
            let step: u32 = rest.split(' ').next()?.parse().ok()?;
            let loss = rest.split("loss: ").nth(1)?.split(',').next()?.to_string();
            Some((step, loss))
        })
        .collect()
}

fn only_run_dir(out: &Path) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs.pop().unwrap()
}

#[test]
fn resume_after_raising_epochs_matches_an_uninterrupted_run_bitwise() {
    let straight = tempfile::tempdir().unwrap();
    let log_full = run(&config(straight.path(), 2, ""), false);

    let split = tempfile::tempdir().unwrap();
    let log_a = run(&config(split.path(), 1, ""), false);
    let log_b = run(&config(split.path(), 2, ""), true);
    assert!(
        log_b.contains("Resuming training from checkpoint"),
        "{log_b}"
    );
    assert!(!log_b.contains("initial evaluation loss"), "{log_b}");

    let mut resumed = losses(&log_a);
    resumed.extend(losses(&log_b));
    let full = losses(&log_full);
    assert_eq!(full.len(), 70);
    assert_eq!(resumed, full);

    for epoch in ["epoch1", "epoch2"] {
        let a = std::fs::read(
            only_run_dir(&straight.path().join("out"))
                .join(epoch)
                .join("adapter_model.safetensors"),
        )
        .unwrap();
        let b = std::fs::read(
            only_run_dir(&split.path().join("out"))
                .join(epoch)
                .join("adapter_model.safetensors"),
        )
        .unwrap();
        assert!(a == b, "{epoch}: adapters differ");
    }
}

#[test]
fn a_kill_at_any_moment_leaves_the_latest_checkpoint_loadable() {
    let dir = tempfile::tempdir().unwrap();
    // A checkpoint after every step.
    let cfg = config(dir.path(), 3, "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "checkpoint_interval_hours = 1",
        "checkpoint_interval_hours = 0.0",
    );
    std::fs::write(&cfg, text).unwrap();
    let mut rng = 12345u64;
    for round in 0..6 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_qplc"))
            .arg("run")
            .arg(&cfg)
            .args(if round == 0 { vec![] } else { vec!["--resume"] })
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(std::time::Duration::from_millis(20 + (rng >> 33) % 200));
        let _ = child.kill();
        let _ = child.wait();
        let out = dir.path().join("out");
        if !out.is_dir() || std::fs::read_dir(&out).unwrap().next().is_none() {
            continue; // killed before the run directory existed
        }
        let run_dir = only_run_dir(&out);
        if let Some((state, tensors)) = qplc_runtime::trainer::state::load_latest(&run_dir).unwrap()
        {
            assert_eq!(state.tensor_names.len(), tensors.len());
        }
    }
    // And training still completes from whatever was left.
    run(&cfg, true);
}

#[test]
fn resume_without_any_run_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1, "");
    let out = Command::new(env!("CARGO_BIN_EXE_qplc"))
        .args(["run", cfg.to_str().unwrap(), "--resume"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has no run directory to resume"), "{err}");
}

#[test]
fn a_run_writes_the_reference_layout_and_tensorboard_tags() {
    let dir = tempfile::tempdir().unwrap();
    let log = run(&config(dir.path(), 1, ""), false);
    assert!(log.contains("initial evaluation loss"), "{log}");
    assert!(log.contains("TRAINING COMPLETE!"), "{log}");
    let run_dir = only_run_dir(&dir.path().join("out"));
    for p in [
        "cfg.toml",
        "latest",
        "global_step35",
        "epoch1/adapter_model.safetensors",
        "epoch1/adapter_config.json",
    ] {
        assert!(
            run_dir.join(p).exists(),
            "{p} missing in {}",
            run_dir.display()
        );
    }
    let events = std::fs::read_dir(&run_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .expect("an event file");
    let scalars = qplc_runtime::log::tfevents::read_scalars(&events).unwrap();
    let mut tags: Vec<&str> = scalars.iter().map(|(t, _, _)| t.as_str()).collect();
    tags.sort();
    tags.dedup();
    let mut want = qplc_runtime::log::scalars::tags(qplc_compiler::config::Mode::Lora, true);
    want.sort();
    assert_eq!(tags, want);
    // 35 steps, one train/loss each.
    assert_eq!(
        scalars.iter().filter(|(t, _, _)| t == "train/loss").count(),
        35
    );
    // "all-linear" is written as the adapted modules, every one of them and nothing else
    // (the trained graph's adapter products are linears too, and `accumulate` turns some base
    // products into matmuls), and the adapter reads back (README's quick start).
    let acfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("epoch1/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let want = [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ];
    assert_eq!(acfg["target_modules"], serde_json::json!(want));
    let out = Command::new(env!("CARGO_BIN_EXE_qplc"))
        .current_dir(root())
        .args(["score", "--model", "tests/fixtures/llama-gqa", "--adapter"])
        .arg(run_dir.join("epoch1"))
        .args(["--text", "examples/data/tiny.txt", "--seq-len", "64"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "score --adapter failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `config` with LoRA dropout switched on.
fn with_dropout(cfg: PathBuf, p: f64) -> PathBuf {
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("lora_dropout = 0.0"));
    let text = text.replace("lora_dropout = 0.0", &format!("lora_dropout = {p}"));
    std::fs::write(&cfg, text).unwrap();
    cfg
}

#[test]
fn resume_with_lora_dropout_draws_the_uninterrupted_runs_masks_bitwise() {
    // Masks are a function of (run seed, step, micro-batch, node) only (spec §14 item 5).
    let straight = tempfile::tempdir().unwrap();
    let log_full = run(&with_dropout(config(straight.path(), 2, ""), 0.1), false);
    let split = tempfile::tempdir().unwrap();
    let log_a = run(&with_dropout(config(split.path(), 1, ""), 0.1), false);
    let log_b = run(&with_dropout(config(split.path(), 2, ""), 0.1), true);
    let mut resumed = losses(&log_a);
    resumed.extend(losses(&log_b));
    let full = losses(&log_full);
    assert_eq!(full.len(), 70);
    assert_eq!(resumed, full);

    // Dropout is really on: from step 2 (B ≠ 0) the losses leave the run without it.
    let plain = tempfile::tempdir().unwrap();
    let log_plain = run(&config(plain.path(), 1, ""), false);
    let plain = losses(&log_plain);
    assert_eq!(
        plain[0], full[0],
        "B = 0 at step 1: no branch output to drop"
    );
    let differing = plain
        .iter()
        .zip(&full)
        .skip(1)
        .filter(|(a, b)| a != b)
        .count();
    assert!(differing > 30, "{differing} of 34 steps differ");
}
