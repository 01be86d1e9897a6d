use anyhow::{Context, Result};
use qplc_ops::DType;
use qplc_runtime::model::{LoadedModel, ModelDir};
use qplc_runtime::score::{dump_logits, score, windows};
use qplc_runtime::tokenizer::Tokenizer;
use std::path::PathBuf;

/// Mean negative log-likelihood and perplexity of a text under a model (CPU, f32).
#[derive(clap::Args)]
#[command(
    after_help = "The text is tokenised without special tokens and cut into consecutive \
windows of exactly --seq-len tokens (the incomplete tail is dropped); each window is scored \
from a fresh context (the same rule as scripts/reference_ppl.py).\n\n\
Examples:\n  qplc score --model tests/fixtures/llama-gqa --text tests/fixtures/text.txt --seq-len 32\n  \
qplc score --model tests/fixtures/llama-gqa --adapter tests/fixtures/peft-lora --text tests/fixtures/text.txt --seq-len 32\n  \
qplc score --model ~/models/SmolLM2 --text hamlet.txt --seq-len 512 --max-tokens 2048 --json"
)]
pub struct Args {
    /// HF model folder.
    #[arg(long)]
    model: PathBuf,
    /// UTF-8 text file to score.
    #[arg(long)]
    text: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Score only the first N tokens of the text.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Use this model definition instead of the builtin one.
    #[arg(long)]
    model_definition: Option<PathBuf>,
    /// Apply a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Write the first window's token ids and logits to this safetensors file.
    #[arg(long, value_name = "FILE.safetensors")]
    dump_logits: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Where the forward passes run: `cpu`, or `cuda` (GPU 0; needs a build with the `cuda`
    /// feature).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    backend: String,
}

pub fn run(a: Args) -> Result<()> {
    let mut model = ModelDir::open(&a.model, a.model_definition.as_deref())?;
    if let Some(dir) = &a.adapter {
        model = model.with_adapter(dir)?;
    }
    let tokenizer = Tokenizer::open(&a.model)?;
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("cannot read `{}` as UTF-8 text", a.text.display()))?;
    let mut ids: Vec<i32> = tokenizer
        .encode(&text)?
        .into_iter()
        .map(|x| x as i32)
        .collect();
    if let Some(m) = a.max_tokens {
        ids.truncate(m);
    }
    let wins = windows(ids.len(), a.seq_len);
    let window_len = wins.first().map(|w| w.1).unwrap_or(a.seq_len);
    let loaded = LoadedModel::load(&model, window_len, DType::F32)?;
    let forward = super::backend::forward(&a.backend, &loaded)?;
    let mut first = true;
    let dump = a.dump_logits.clone();
    let s = score(&ids, a.seq_len, &mut |w| {
        let logits = forward.logits(w)?;
        if first {
            if let Some(p) = &dump {
                dump_logits(p, w, &logits)?;
            }
            first = false;
        }
        Ok(logits)
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!(
            "tokens {} ({} windows of {}), predictions {}\nmean NLL {:.6}\nperplexity {:.4}",
            s.tokens, s.windows, s.window_len, s.predictions, s.mean_nll, s.perplexity
        );
    }
    Ok(())
}
