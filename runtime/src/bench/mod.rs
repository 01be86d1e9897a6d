//! `qplc bench` (issue 6 item 5): N training steps of a named model shape with random
//! weights, timed, with tokens/s, MFU and peak memory. The graph is what `qplc compile`
//! builds for the equivalent config (graph.rs); weights, gradients and optimiser state stay
//! in the backend's memory for the whole run (step.rs, cpu.rs, cuda.rs).
pub mod counting;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod flops;
pub mod graph;
pub mod random;
pub mod shapes;
pub mod step;

use crate::executor::Program;
use crate::step_runner::BackendChoice;
use crate::HostTensor;
use anyhow::{bail, Context, Result};
pub use flops::Mode;
pub use graph::ModelSource;
use qplc_ops::{dropout, DType};
use qplc_passes::{grad_output_name, DROPOUT_KEY};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Instant;

/// Everything `qplc bench` takes.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub source: ModelSource,
    pub mode: Mode,
    pub seq: usize,
    pub rank: usize,
    pub gc: bool,
    /// With `gc`: the `auto` (min-cut) policy instead of `layer`.
    pub gc_auto: bool,
    pub steps: usize,
    pub warmup: usize,
    pub backend: BackendChoice,
    /// Seed of the weights and the token sequence.
    pub seed: u64,
    /// peft_baseline.py's learning rate.
    pub lr: f64,
    /// Compute dtype of the base model (bf16 as the baseline).
    pub dtype: DType,
}

impl BenchOptions {
    pub fn new(source: ModelSource, mode: Mode) -> Self {
        BenchOptions {
            source,
            mode,
            seq: 4096,
            rank: 16,
            gc: false,
            gc_auto: false,
            steps: 8,
            warmup: 3,
            backend: BackendChoice::Cpu,
            seed: 0,
            lr: 1e-5,
            dtype: DType::BF16,
        }
    }
}

/// What a benchmark measured; serialised as the one-line `--json` result, with the keys of
/// peft_baseline.py's RESULT line where they mean the same.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub mode: Mode,
    pub seq: usize,
    pub gc: bool,
    pub gc_auto: bool,
    pub backend: String,
    pub device: String,
    /// Base-model parameters N.
    pub params: u64,
    #[serde(rename = "params_B")]
    pub params_b: f64,
    pub trainable: u64,
    pub step_s: f64,
    pub tok_s: f64,
    /// (4N | 6N) × tokens per step / step_s / 989 TFLOP/s (issue 6).
    pub mfu: f64,
    /// The baseline's definition (attention and recompute counted), for comparison with
    /// its `mfu_vs_989`.
    pub mfu_vs_989: f64,
    /// Peak bytes of live buffers: weights + optimiser state + the executor's buffers.
    pub peak_bytes: usize,
    #[serde(rename = "peak_GiB")]
    pub peak_gib: f64,
    /// What the compile report predicted for `peak_bytes` (issue 6: within 10%).
    pub predicted_peak_bytes: u64,
    /// `peak_bytes / predicted_peak_bytes`.
    pub measured_over_predicted: f64,
    /// Device-wide used memory (driver total − free), highest seen after a step's
    /// forward/backward; includes the CUDA context, cuBLAS workspace and pool slack.
    #[serde(rename = "device_used_GiB")]
    pub device_used_gib: Option<f64>,
    pub loss: f64,
    pub compile_s: f64,
    pub setup_s: f64,
}

const GIB: f64 = (1u64 << 30) as f64;

impl BenchReport {
    /// The human-readable summary.
    pub fn text(&self) -> String {
        let used = match self.device_used_gib {
            Some(g) => {
                format!("; device used {g:.2} GiB (driver: total - free, incl. context and pool)")
            }
            None => String::new(),
        };
        let mode = match self.mode {
            Mode::Lora => "lora",
            Mode::Full => "full",
        };
        format!(
            "bench {model} {mode} seq {seq}{gc} on {device} ({backend})\n\
             params {n} base ({nb:.3} B), trainable {t}\n\
             step {step:.4} s, {tok:.0} tok/s, MFU {mfu:.4} (4N/6N per token, 989 TFLOP/s), {mfub:.4} by peft_baseline.py's FLOPs\n\
             peak {peak} of live buffers (weights, Adam state, activations), predicted {pred} ({ratio:.3}×){used}\n\
             loss {loss:.4} (last step); compile {c:.1} s, setup {s:.1} s\n",
            model = self.model,
            seq = self.seq,
            gc = match (self.gc, self.gc_auto) {
                (true, true) => " gc-auto",
                (true, false) => " gc",
                _ => "",
            },
            device = self.device,
            backend = self.backend,
            n = self.params,
            nb = self.params_b,
            t = self.trainable,
            step = self.step_s,
            tok = self.tok_s,
            mfu = self.mfu,
            mfub = self.mfu_vs_989,
            peak = human_bytes(self.peak_bytes),
            pred = human_bytes(self.predicted_peak_bytes as usize),
            ratio = self.measured_over_predicted,
            loss = self.loss,
            c = self.compile_s,
            s = self.setup_s,
        )
    }

    /// One JSON line, `RESULT {...}` as the baseline prints it.
    pub fn json_line(&self) -> String {
        format!(
            "RESULT {}",
            serde_json::to_string(self).expect("the report serialises")
        )
    }
}

/// `12.34 GiB`, or MiB below one GiB (the tiny shape).
fn human_bytes(b: usize) -> String {
    if b as f64 >= GIB {
        format!("{:.2} GiB", b as f64 / GIB)
    } else {
        format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// One random token sequence (fixed seed) with labels = ids, as the baseline's
/// `model(input_ids=x, labels=x)`; the graph shifts the labels.
pub fn bench_inputs(
    graph: &qplc_compiler::Graph,
    seq: usize,
    vocab: usize,
    seed: u64,
) -> Result<HashMap<String, HostTensor>> {
    let ids: Vec<i32> = (0..seq as u64)
        .map(|i| (random::mix(seed ^ random::mix(i)) % vocab as u64) as i32)
        .collect();
    let mut inputs = HashMap::new();
    for (name, _) in graph.inputs() {
        let t = match name.as_str() {
            "input_ids" | "labels" => HostTensor::i32([seq], ids.clone()),
            "position_ids" => HostTensor::i32([seq], (0..seq as i32).collect()),
            // Dropout is 0 in benchmarks; an inactive key makes any dropout the identity.
            n if n == DROPOUT_KEY => HostTensor::i32([3], dropout::key_words(seed, false).to_vec()),
            other => bail!("the benchmark cannot feed graph input `{other}`"),
        };
        inputs.insert(name, t);
    }
    Ok(inputs)
}

/// Compiles, initialises and times the benchmark.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    if opts.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if opts.seq < 2 {
        bail!("--seq must be at least 2 (a step predicts token t+1 from token t)");
    }
    let t0 = Instant::now();
    let dir = scratch_dir()?;
    let built = graph::build(opts, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let g = built?;
    let mut outputs = vec!["loss".to_string()];
    outputs.extend(g.trainable.iter().map(|(n, _)| grad_output_name(n)));
    let refs: Vec<&str> = outputs.iter().map(|s| s.as_str()).collect();
    let prog = Program::new(&g.graph, &refs)?;
    if g.vocab == 0 {
        bail!("config.json of `{}` has no vocab_size", g.model);
    }
    let inputs = bench_inputs(&g.graph, opts.seq, g.vocab, opts.seed)?;
    let compile_s = t0.elapsed().as_secs_f64();

    let m = match opts.backend {
        BackendChoice::Cpu => cpu::run(&g, &prog, &inputs, opts)?,
        #[cfg(feature = "cuda")]
        BackendChoice::Cuda(ordinal) => cuda::run(ordinal, &g, &prog, &inputs, opts)?,
        #[cfg(not(feature = "cuda"))]
        BackendChoice::Cuda(_) => bail!(
            "--backend cuda: this qplc was built without the `cuda` feature (cargo build --release --features cuda)"
        ),
    };
    let trainable = g
        .trainable
        .iter()
        .map(|(_, ty)| ty.shape.numel() as u64)
        .sum();
    let tokens = opts.seq as u64;
    let issue = flops::issue_flops(opts.mode, g.base_params, tokens);
    let baseline = flops::baseline_flops(
        opts.mode,
        g.base_params,
        g.layers,
        g.hidden,
        opts.seq,
        opts.gc,
    );
    Ok(BenchReport {
        model: g.model.clone(),
        mode: opts.mode,
        seq: opts.seq,
        gc: opts.gc,
        gc_auto: opts.gc_auto,
        backend: match opts.backend {
            BackendChoice::Cpu => "cpu".into(),
            BackendChoice::Cuda(i) => format!("cuda:{i}"),
        },
        device: m.device,
        params: g.base_params,
        params_b: g.base_params as f64 / 1e9,
        trainable,
        step_s: m.step_s,
        tok_s: tokens as f64 / m.step_s,
        mfu: flops::mfu(issue, m.step_s),
        mfu_vs_989: flops::mfu(baseline, m.step_s),
        peak_bytes: m.peak_bytes,
        peak_gib: m.peak_bytes as f64 / GIB,
        predicted_peak_bytes: g.predicted_peak_bytes,
        measured_over_predicted: m.peak_bytes as f64 / (g.predicted_peak_bytes.max(1) as f64),
        device_used_gib: m.device_used_bytes.map(|b| b as f64 / GIB),
        loss: m.loss,
        compile_s,
        setup_s: m.setup_s,
    })
}

/// A fresh folder for the generated config and plan (removed after compiling).
fn scratch_dir() -> Result<std::path::PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("qplc-bench-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the scratch folder `{}`", dir.display()))?;
    Ok(dir)
}
