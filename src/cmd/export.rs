use anyhow::{Context, Result};
use qplc_runtime::ca_files::read_control_adapter;
use qplc_runtime::checkpoint::Checkpoint;
use qplc_runtime::export::control_to_lora::{control_to_lora, write_lora_export, ExportTargets};
use qplc_runtime::export::fidelity::measure;
use std::path::PathBuf;

/// Convert trained adapters to other formats.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    ControlToLora(ControlToLora),
}

/// A Control Adapter as an additive PEFT LoRA (spec §11.3): per layer B = Q·diag(expm1 S),
/// A = Qᵀ·W_target, so B·A = Q diag(λ) Qᵀ W exactly.
#[derive(clap::Args)]
#[command(
    after_help = "The LoRA reproduces the adapter exactly only where the targets carry \
the whole layer delta (Cohere's parallel block with down_proj,o_proj); on sequential-block \
models the attention part is lost. --fidelity-text measures the loss: the mean KL divergence \
per predicted token between the model with the Control Adapter (every token in class +1, or \
−1 with --inverse) and the model with the exported LoRA.\n\n\
Examples:\n  qplc export control-to-lora --adapter run/epoch1 --model tests/fixtures/llama-gqa --out lora\n  \
qplc export control-to-lora --adapter run/epoch1 --model tests/fixtures/llama-gqa --inverse --out lora-inv --fidelity-text tests/fixtures/text.txt"
)]
pub struct ControlToLora {
    /// Control Adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,
    /// The base HF model folder the adapter was trained on.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Export the inverse transform, λ = expm1(−S).
    #[arg(long)]
    inverse: bool,
    /// Target weights: `down_proj`, `down_proj,o_proj` (Cohere) or `experts` (Mixtral w2).
    #[arg(long, default_value = "down_proj")]
    targets: String,
    /// Output folder for the PEFT LoRA.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Held-out text for the fidelity report.
    #[arg(long, value_name = "FILE")]
    fidelity_text: Option<PathBuf>,
    /// Tokens of the fidelity text used (BOS included).
    #[arg(long, default_value_t = 128)]
    fidelity_tokens: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    match a.what {
        What::ControlToLora(c) => control(c),
    }
}

fn control(a: ControlToLora) -> Result<()> {
    let targets = ExportTargets::parse(&a.targets)?;
    let ca = read_control_adapter(&a.adapter)?;
    let ckpt = Checkpoint::open(&a.model)?;
    let export = control_to_lora(&ca, &ckpt, a.inverse, targets)?;
    write_lora_export(&a.out, &export)?;
    let fidelity = match &a.fidelity_text {
        None => None,
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read `{}` as UTF-8 text", p.display()))?;
            Some(measure(
                &a.model,
                &ca,
                &a.out,
                a.inverse,
                &text,
                a.fidelity_tokens,
            )?)
        }
    };
    if a.json {
        let v = serde_json::json!({
            "out": a.out,
            "layers": ca.layers.keys().collect::<Vec<_>>(),
            "rank": ca.rank(),
            "inverse": a.inverse,
            "target_modules": targets.target_modules(),
            "tensors": export.tensors.len(),
            "fidelity": fidelity,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "wrote {} ({} layers, rank {}, targets {:?}{})",
            a.out.display(),
            ca.layers.len(),
            ca.rank(),
            targets.target_modules(),
            if a.inverse { ", inverse" } else { "" }
        );
        if let Some(f) = fidelity {
            println!(
                "fidelity on {} tokens: mean KL(control ‖ lora) = {:.6e} nats/token; KL(control ‖ base) = {:.6e}",
                f.tokens, f.kl_lora, f.kl_base
            );
        }
    }
    Ok(())
}
