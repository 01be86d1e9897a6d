//! `qplc bench` end to end on the CPU backend: the tiny shape compiles, trains for a few steps
//! with the host Adam, and reports finite numbers in both output formats.
use std::process::Command;

fn qplc(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qplc"))
        .args(args)
        .output()
        .expect("qplc runs")
}

#[test]
fn bench_tiny_lora_on_cpu_prints_a_finite_loss_and_throughput() {
    let out = qplc(&[
        "bench",
        "--shape",
        "tiny",
        "--backend",
        "cpu",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--seq",
        "64",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .expect("a RESULT line");
    let r: serde_json::Value = serde_json::from_str(line).unwrap();
    let loss = r["loss"].as_f64().unwrap();
    // Random init with std 0.02 gives near-uniform predictions over the 512-token vocabulary.
    assert!(
        loss.is_finite() && (loss - 512f64.ln()).abs() < 0.5,
        "loss {loss}"
    );
    assert!(r["tok_s"].as_f64().unwrap() > 0.0);
    assert!(r["step_s"].as_f64().unwrap() > 0.0);
    assert!(r["mfu"].as_f64().unwrap() > 0.0);
    assert_eq!(r["mode"], "lora");
    assert_eq!(r["seq"], 64);
    // tests/fixtures/llama-gqa's layout: embed + head 2·512·64, 2 layers of
    // (q 64·64 + k,v 2·64·32 + o 64·64 + mlp 3·64·128 + norms 2·64), final norm 64.
    let layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64;
    assert_eq!(r["params"], 2 * 512 * 64 + 2 * layer + 64);
    // LoRA r = 16 on 7 linears per layer: r·(in + out) each.
    let lora = 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64));
    assert_eq!(r["trainable"], 2 * lora);
    assert!(r["peak_bytes"].as_u64().unwrap() > 4 * r["params"].as_u64().unwrap());
    // The compile report's prediction is at bf16 sizes; the CPU holds f32, so only its
    // presence and order of magnitude are checked here (the GPU comparison: BENCHMARKS.md).
    let predicted = r["predicted_peak_bytes"].as_u64().unwrap();
    assert!(predicted > 2 * r["params"].as_u64().unwrap(), "{line}");
    // peft_baseline.py's RESULT keys, so the two lines can be read by one script.
    for key in [
        "model",
        "mode",
        "seq",
        "gc",
        "params_B",
        "step_s",
        "tok_s",
        "peak_GiB",
        "mfu_vs_989",
        "loss",
    ] {
        assert!(r.get(key).is_some(), "RESULT lacks `{key}`: {line}");
    }
}

#[test]
fn bench_full_fine_tune_on_cpu_trains_every_weight() {
    let out = qplc(&[
        "bench",
        "--shape",
        "tiny",
        "--mode",
        "full",
        "--backend",
        "cpu",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--seq",
        "64",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("tok/s") && stdout.contains("MFU"),
        "{stdout}"
    );
    let params = stdout
        .split_whitespace()
        .skip_while(|w| *w != "params")
        .nth(1)
        .unwrap()
        .to_string();
    assert_eq!(params, "139584", "{stdout}");
    let trainable = stdout
        .split_whitespace()
        .skip_while(|w| *w != "trainable")
        .nth(1)
        .unwrap()
        .trim_end_matches(',')
        .to_string();
    assert_eq!(params, trainable, "{stdout}");
}

#[test]
fn bench_gc_without_the_recompute_pass_says_so() {
    let out = qplc(&[
        "bench",
        "--shape",
        "tiny",
        "--backend",
        "cpu",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--seq",
        "64",
        "--gc",
    ]);
    if out.status.success() {
        // The recompute pass is present in this tree: --gc must then have trained.
        assert!(String::from_utf8_lossy(&out.stdout).contains(" gc "));
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--gc needs the recompute pass"), "{err}");
    }
}

#[test]
fn bench_refuses_an_unknown_shape() {
    let out = qplc(&["bench", "--shape", "gpt-5", "--backend", "cpu"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown shape `gpt-5`"), "{err}");
}

#[test]
fn bench_takes_the_shape_of_a_model_folder() {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama-gqa");
    let out = qplc(&[
        "bench",
        "--model",
        model,
        "--backend",
        "cpu",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--seq",
        "64",
        "--rank",
        "4",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap();
    let r: serde_json::Value = serde_json::from_str(line).unwrap();
    // The fixture has the tiny shape's layout; rank 4 is a quarter of rank 16's adapters.
    assert_eq!(r["params"], 139584);
    assert_eq!(r["trainable"], 8192);
    assert!(r["loss"].as_f64().unwrap().is_finite());
}
