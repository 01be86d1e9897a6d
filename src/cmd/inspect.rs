use anyhow::Result;
use qplc_ops::DType;
use qplc_runtime::model::ModelDir;
use std::path::PathBuf;

/// Show a model folder's architecture, parameter count and targetable module names.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  qplc inspect tests/fixtures/llama-gqa\n  qplc inspect ~/models/Llama-3.2-1B --json"
)]
pub struct Args {
    /// HF model folder (config.json, *.safetensors, tokenizer.json).
    model_dir: PathBuf,
    /// Use this model definition instead of the builtin one for config.json's model_type.
    #[arg(long)]
    model_definition: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let model = ModelDir::open(&a.model_dir, a.model_definition.as_deref())?;
    // The sequence length does not change parameters or module names.
    let built = model.build(64, DType::BF16)?;
    let info = &built.info;
    let params = built.graph.param_count();
    if a.json {
        let v = serde_json::json!({
            "model_dir": a.model_dir,
            "arch": info.arch,
            "layers": info.num_layers,
            "hidden_size": info.hidden_size,
            "vocab_size": info.vocab_size,
            "parameters": params,
            "tie_word_embeddings": info.tie_word_embeddings,
            "target_modules": info.linear_modules,
            "config": info.config,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model        {}", a.model_dir.display());
    println!("architecture {}", info.arch);
    println!(
        "shape        {} layers, hidden {}, vocab {}{}",
        info.num_layers,
        info.hidden_size,
        info.vocab_size,
        if info.tie_word_embeddings {
            ", tied embeddings"
        } else {
            ""
        }
    );
    println!("parameters   {} ({:.1} M)", params, params as f64 / 1e6);
    println!(
        "target_modules (linear layers; LoRA's \"all-linear\" takes all but lm_head):\n  {}",
        info.linear_modules.join(", ")
    );
    Ok(())
}
