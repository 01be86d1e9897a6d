//! `qplc cuda-check`: the GPU backend against the CPU reference (issue 6 acceptance; run on
//! the GPU machine by scripts/gpu-tests.sh).
use anyhow::{bail, Context, Result};
use qplc_ops::DType;
use qplc_runtime::cuda::check::{forward_check, lora_step_check, op_checks, table, CheckRow};
use qplc_runtime::cuda::CudaBackend;
use std::path::PathBuf;
use std::time::Instant;

/// Run every op, a forward pass and a LoRA training step on the GPU and on the CPU, and compare.
#[derive(clap::Args)]
#[command(
    after_help = "Inputs are drawn fresh each run from --seed (default: the clock; printed). \
GPU buffers are poisoned with NaN before each kernel runs. Tolerances: 1e-4 relative (f32), \
1e-2 (bf16), on ‖gpu − cpu‖ / ‖cpu‖. Exits 1 if any check fails.\n\n\
Example:\n  qplc cuda-check --model tests/fixtures/llama-gqa"
)]
pub struct Args {
    /// HF model folder for the forward and LoRA-step checks.
    #[arg(long, default_value = "tests/fixtures/llama-gqa")]
    model: PathBuf,
    /// Tokens per sequence in the model checks.
    #[arg(long, default_value_t = 32)]
    seq_len: usize,
    /// Random seed of the inputs.
    #[arg(long)]
    seed: Option<u64>,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Instead of the checks: compare the train/eval losses of two `qplc run` directories
    /// (e.g. `--backend cpu` and `--backend cuda` of one config) step by step, from their
    /// TensorBoard event files (exact f32 values).
    #[arg(long, num_args = 2, value_names = ["RUN_A", "RUN_B"])]
    compare_runs: Option<Vec<PathBuf>>,
}

/// `(tag, step) → value` of the event file in `run`.
fn run_scalars(run: &std::path::Path) -> Result<std::collections::BTreeMap<(String, i64), f64>> {
    let file = std::fs::read_dir(run)
        .with_context(|| format!("run directory `{}`", run.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("events.out.tfevents."))
        })
        .with_context(|| format!("no event file in `{}`", run.display()))?;
    Ok(qplc_runtime::log::tfevents::read_scalars(&file)?
        .into_iter()
        .map(|(t, s, v)| ((t, s), f64::from(v)))
        .collect())
}

/// Per-step loss parity of two runs; fails above 1e-4 relative (f32 training).
fn compare_runs(a: &std::path::Path, b: &std::path::Path) -> Result<()> {
    let (sa, sb) = (run_scalars(a)?, run_scalars(b)?);
    let mut worst = 0.0f64;
    let mut n = 0;
    for ((tag, step), va) in &sa {
        if tag != "train/loss" && tag != "eval/loss" {
            continue;
        }
        let vb = *sb
            .get(&(tag.clone(), *step))
            .with_context(|| format!("{tag} at step {step} missing in `{}`", b.display()))?;
        let rel = (va - vb).abs() / va.abs().max(1e-12);
        println!("{tag:<11} step {step:>4}: {va:.7} vs {vb:.7}  rel {rel:.2e}");
        worst = worst.max(rel);
        n += 1;
    }
    println!("{n} losses compared, max relative difference {worst:.2e}");
    if n == 0 || worst > 1e-4 {
        bail!("the runs' losses differ (max rel {worst:.2e}) or none were found");
    }
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    if let Some(runs) = &a.compare_runs {
        return compare_runs(&runs[0], &runs[1]);
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let start = Instant::now();
    let gpu = CudaBackend::new(a.device)?.with_poison(true);
    println!(
        "device {} — backend up (NVRTC compile + cuBLAS) in {:.2} s; seed {seed}",
        gpu.device_name(),
        start.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let mut rows: Vec<CheckRow> = op_checks(&gpu, seed);
    let ops_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for dtype in [DType::F32, DType::BF16] {
        for (what, r) in [
            (
                "forward",
                forward_check(&gpu, &a.model, a.seq_len, dtype, seed).map(|r| vec![r]),
            ),
            (
                "lora step",
                lora_step_check(&gpu, &a.model, a.seq_len, dtype, seed),
            ),
        ] {
            match r {
                Ok(v) => rows.extend(v),
                Err(e) => rows.push(CheckRow {
                    name: format!("{what} {}", dtype.name()),
                    dtype,
                    rel_err: f64::INFINITY,
                    max_abs: f64::INFINITY,
                    tol: 0.0,
                    failure: format!("{e:#}"),
                }),
            }
        }
    }
    let model_s = t.elapsed().as_secs_f64();
    print!("{}", table(&rows));
    let failed = rows.iter().filter(|r| !r.ok()).count();
    let worst = |d: DType| {
        rows.iter()
            .filter(|r| r.dtype == d && r.ok())
            .map(|r| r.rel_err)
            .fold(0.0f64, f64::max)
    };
    println!(
        "{} passed, {} failed (op checks {ops_s:.2} s, model checks {model_s:.2} s; worst passing rel err f32 {:.2e}, bf16 {:.2e})",
        rows.len() - failed,
        failed,
        worst(DType::F32),
        worst(DType::BF16),
    );
    if failed > 0 {
        bail!("{failed} GPU checks failed (seed {seed})");
    }
    Ok(())
}
