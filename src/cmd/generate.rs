use anyhow::Result;
use qplc_runtime::chat::render_user_prompt;
use qplc_runtime::generate::greedy;
use qplc_runtime::model::ModelDir;
use qplc_runtime::tokenizer::Tokenizer;
use std::path::PathBuf;

/// Greedy generation from a prompt (CPU, f32): try a model or, later, an adapter.
#[derive(clap::Args)]
#[command(
    after_help = "The prompt is sent as one user message through the tokenizer's chat \
template (add_generation_prompt), unless --raw or the model has no template.\n\n\
Examples:\n  qplc generate --model ~/models/SmolLM2-135M-Instruct --prompt \"What is the capital of France?\"\n  \
qplc generate --model tests/fixtures/llama-gqa --prompt \"Once upon\" --raw --max-new-tokens 8"
)]
pub struct Args {
    /// HF model folder.
    #[arg(long)]
    model: PathBuf,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Tokenise the prompt as it is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Use this model definition instead of the builtin one.
    #[arg(long)]
    model_definition: Option<PathBuf>,
    /// Apply a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Print prompt ids, new ids and text as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let mut model = ModelDir::open(&a.model, a.model_definition.as_deref())?;
    if let Some(dir) = &a.adapter {
        model = model.with_adapter(dir)?;
    }
    let tok = Tokenizer::open(&a.model)?;
    let text = match (&tok.chat_template, a.raw) {
        (Some(t), false) => render_user_prompt(
            t,
            &a.prompt,
            tok.bos_token.as_deref(),
            tok.eos_token.as_deref(),
        )?,
        _ => a.prompt.clone(),
    };
    let prompt_ids = tok.encode(&text)?;
    let g = greedy(&model, &prompt_ids, a.max_new_tokens, tok.eos_id)?;
    let answer = tok.decode(&g.new_ids, true)?;
    if a.json {
        let v = serde_json::json!({
            "rendered_prompt": text,
            "prompt_ids": g.prompt_ids,
            "new_ids": g.new_ids,
            "text": answer,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{answer}");
    }
    Ok(())
}
