//! `qplc bench`: training-step throughput of a model shape with random weights (issue 6).
use anyhow::{bail, Result};
use qplc_runtime::bench::shapes::ModelShape;
use qplc_runtime::bench::{run as bench, BenchOptions, Mode, ModelSource};
use qplc_runtime::step_runner::BackendChoice;
use std::path::PathBuf;

/// Time training steps of a model shape with random weights: tokens/s, step time, MFU, peak memory.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "The graph is what `qplc compile` builds for the equivalent config (LoRA rank r, \
alpha = r, all linear layers, dropout 0, f32 adapters; or a full fine-tune of every weight, bf16). \
Weights are random (normal std 0.02, norms 1, LoRA as PEFT) and stay in the backend's memory \
with the gradients and Adam state; one random sequence of --seq tokens, labels = ids.\n\
MFU: (4N LoRA | 6N full) x tokens / step time / 989 TFLOP/s; also peft_baseline.py's definition.\n\n\
Examples:\n  qplc bench --shape tiny --backend cpu --steps 2 --seq 32\n  \
qplc bench --shape llama-1b --mode lora --seq 4096 --backend cuda --json"
)]
pub struct Args {
    /// Model shape: llama-1b, llama-8b or tiny.
    #[arg(long, conflicts_with = "model", required_unless_present = "model")]
    shape: Option<String>,
    /// An HF model folder whose config.json gives the shape (its weights are not read).
    #[arg(long)]
    model: Option<PathBuf>,
    /// What is trained: `lora` adapters or `full` fine-tune.
    #[arg(long, default_value = "lora", value_parser = parse_mode)]
    mode: Mode,
    /// Tokens per step (one sequence).
    #[arg(long, default_value_t = 4096)]
    seq: usize,
    /// LoRA rank (alpha = rank).
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Activation checkpointing (the recompute pass).
    #[arg(long)]
    gc: bool,
    /// Selective checkpointing instead (`activation_checkpointing = "auto"`: products and
    /// attention are stored, the cheap ops between them recomputed; implies --gc).
    #[arg(long)]
    gc_auto: bool,
    /// Timed steps.
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// `cpu`, `cuda` (GPU 0) or `cuda:N`.
    #[arg(long, default_value = "cuda", value_parser = BackendChoice::parse)]
    backend: BackendChoice,
    /// Seed of the weights and tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one `RESULT {json}` line (peft_baseline.py's format) instead of the summary.
    #[arg(long)]
    json: bool,
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    match s {
        "lora" => Ok(Mode::Lora),
        "full" => Ok(Mode::Full),
        other => Err(format!("unknown mode `{other}` (expected lora or full)")),
    }
}

pub fn options(a: &Args) -> Result<BenchOptions> {
    let source = match (&a.shape, &a.model) {
        (Some(s), None) => ModelSource::Shape(ModelShape::by_name(s)?),
        (None, Some(d)) => ModelSource::Dir(d.clone()),
        _ => bail!("give exactly one of --shape and --model"),
    };
    if a.rank == 0 {
        bail!("--rank must be at least 1");
    }
    let mut o = BenchOptions::new(source, a.mode);
    o.seq = a.seq;
    o.rank = a.rank;
    o.gc = a.gc || a.gc_auto;
    o.gc_auto = a.gc_auto;
    o.steps = a.steps;
    o.warmup = a.warmup;
    o.backend = a.backend;
    o.seed = a.seed;
    Ok(o)
}

pub fn run(a: Args) -> Result<()> {
    let r = bench(&options(&a)?)?;
    if a.json {
        println!("{}", r.json_line());
    } else {
        print!("{}", r.text());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        let mut v = vec!["bench"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| c.args)
    }

    #[test]
    fn defaults_are_the_baselines_settings() {
        let a = parse(&["--shape", "llama-1b"]).unwrap();
        let o = options(&a).unwrap();
        assert_eq!((o.seq, o.rank, o.steps, o.warmup), (4096, 16, 8, 3));
        assert_eq!(o.mode, Mode::Lora);
        assert_eq!(o.backend, BackendChoice::Cuda(0));
        assert!(!o.gc);
        assert_eq!(o.lr, 1e-5);
    }

    #[test]
    fn flags_reach_the_options() {
        let a = parse(&[
            "--shape",
            "tiny",
            "--mode",
            "full",
            "--seq",
            "64",
            "--rank",
            "4",
            "--gc",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--backend",
            "cpu",
        ])
        .unwrap();
        let o = options(&a).unwrap();
        assert_eq!((o.seq, o.rank, o.steps, o.warmup), (64, 4, 2, 0));
        assert_eq!(o.mode, Mode::Full);
        assert_eq!(o.backend, BackendChoice::Cpu);
        assert!(o.gc);
    }

    #[test]
    fn bad_flags_are_refused_with_the_expected_values() {
        let e = parse(&["--shape", "tiny", "--mode", "qlora"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("expected lora or full"), "{e}");
        let e = parse(&["--shape", "tiny", "--backend", "tpu"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
        assert!(
            parse(&["--mode", "lora"]).is_err(),
            "a shape or model is required"
        );
        assert!(parse(&["--shape", "tiny", "--model", "x"]).is_err());
        let a = parse(&["--shape", "llama-70b"]).unwrap();
        let e = options(&a).unwrap_err().to_string();
        assert!(e.contains("expected one of"), "{e}");
        let a = parse(&["--shape", "tiny", "--rank", "0"]).unwrap();
        assert!(options(&a).is_err());
    }
}
