//! Greedy decoding (`qplc generate`). Shapes are static in a compiled graph, so the graph is
//! built once for prompt + budget tokens and every step re-runs the whole prefix, padded:
//! attention is causal, so the logits at the last real position do not depend on the
//! padding. O(T²) in total but simple and exact; a KV cache comes with the CUDA backend.
use crate::model::{LoadedModel, ModelDir};
use anyhow::{bail, Result};
use qplc_ops::DType;

pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// New tokens, including the EOS that stopped generation (as transformers reports).
    pub new_ids: Vec<u32>,
}

/// Index of the largest value; the first one on ties, as torch.argmax.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

pub fn greedy(
    model: &ModelDir,
    prompt_ids: &[u32],
    max_new_tokens: usize,
    eos_id: Option<u32>,
) -> Result<Generation> {
    if prompt_ids.is_empty() {
        bail!("the prompt has no tokens");
    }
    let total = prompt_ids.len() + max_new_tokens;
    if let Some(max) = model.max_positions() {
        if total > max {
            bail!("prompt ({} tokens) + {max_new_tokens} new tokens exceeds the model's max_position_embeddings {max}", prompt_ids.len());
        }
    }
    let loaded = LoadedModel::load(model, total, DType::F32)?;
    let vocab = loaded.built.info.vocab_size;
    let mut ids: Vec<i32> = prompt_ids.iter().map(|&x| x as i32).collect();
    let mut new_ids = Vec::new();
    while new_ids.len() < max_new_tokens {
        let n = ids.len();
        let mut padded = ids.clone();
        padded.resize(total, 0);
        let logits = loaded.logits(&padded)?;
        let row = &logits.as_f32()[(n - 1) * vocab..n * vocab];
        let next = argmax(row) as u32;
        new_ids.push(next);
        ids.push(next as i32);
        if Some(next) == eos_id {
            break;
        }
    }
    Ok(Generation {
        prompt_ids: prompt_ids.to_vec(),
        new_ids,
    })
}
