use anyhow::Result;
use qplc_compiler::config::LoadedConfig;
use qplc_runtime::step_runner::BackendChoice;
use qplc_runtime::trainer::{run as train, RunOptions};
use std::path::PathBuf;

/// Train: compile the config and run it on the CPU backend (LoRA or full fine-tune).
#[derive(clap::Args)]
#[command(
    after_help = "Outputs go to output_dir/<UTC timestamp>/: the copied config, the data \
cache (data/), TensorBoard events, checkpoints (global_step*/, latest) and epoch<N>/ models.\n\n\
Examples:\n  qplc run examples/tiny-lora.toml\n  \
qplc run examples/tiny-lora.toml --resume      # continue the newest run in output_dir"
)]
pub struct Args {
    /// qlora-pipe-lite TOML config.
    config: PathBuf,
    /// Resume the newest run directory of output_dir from its latest checkpoint.
    #[arg(long, alias = "resume_from_checkpoint")]
    resume: bool,
    /// Where the forward/backward passes run: `cpu`, `cuda` (GPU 0) or `cuda:N` (needs a
    /// build with the `cuda` feature).
    #[arg(long, default_value = "cpu", value_parser = BackendChoice::parse)]
    backend: BackendChoice,
}

pub fn run(a: Args) -> Result<()> {
    let cfg = LoadedConfig::from_file(&a.config)?;
    let summary = train(
        &cfg,
        &RunOptions {
            resume: a.resume,
            backend: a.backend,
        },
    )?;
    println!(
        "run directory: {} (global step {})",
        summary.run_dir.display(),
        summary.global_step
    );
    Ok(())
}
