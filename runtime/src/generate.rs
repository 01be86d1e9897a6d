//! Greedy decoding (`qplc generate`). Shapes are static in a compiled graph, so the graph is
//! built once for prompt + budget tokens and every step re-runs the whole prefix, padded:
//! attention is causal, so the logits at the last real position do not depend on the
//! padding. O(T²) in total but simple and exact; a KV cache comes with the CUDA backend.
use crate::model::{LoadedModel, ModelDir};
use crate::HostTensor;
use anyhow::{bail, Context, Result};
use qplc_ops::DType;

#[derive(Clone, Debug, PartialEq, Eq)]
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

/// Greedy decoding with any forward function: `forward(prefix ids)` returns logits
/// `[R, V]` with `R ≥ prefix length` (rows past the prefix, from padding, are ignored).
/// There is no KV cache: each step recomputes the whole prefix.
pub fn greedy_with(
    prompt_ids: &[u32],
    max_new_tokens: usize,
    eos_id: Option<u32>,
    forward: &mut dyn FnMut(&[i32]) -> Result<HostTensor>,
) -> Result<Generation> {
    if prompt_ids.is_empty() {
        bail!("the prompt has no tokens");
    }
    let mut ids: Vec<i32> = prompt_ids.iter().map(|&x| x as i32).collect();
    let mut new_ids = Vec::new();
    while new_ids.len() < max_new_tokens {
        let n = ids.len();
        let logits = forward(&ids).with_context(|| format!("generating token {}", n + 1))?;
        let dims = logits.shape().dims();
        if dims.len() != 2 || dims[0] < n {
            bail!(
                "the forward returned logits of shape {} for {n} tokens",
                logits.shape()
            );
        }
        let vocab = dims[1];
        let next = argmax(&logits.as_f32()[(n - 1) * vocab..n * vocab]) as u32;
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

/// Greedy decoding on the CPU backend in f32, with the graph built once for
/// prompt + `max_new_tokens` positions.
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
    let mut forward = |ids: &[i32]| {
        let mut padded = ids.to_vec();
        padded.resize(total, 0);
        loaded.logits(&padded)
    };
    greedy_with(prompt_ids, max_new_tokens, eos_id, &mut forward)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake model that always predicts "last token + 1 (mod V)", padded to 8 rows.
    fn counting(v: usize) -> impl FnMut(&[i32]) -> Result<HostTensor> {
        move |ids: &[i32]| {
            let rows = 8;
            let mut l = vec![0.0; rows * v];
            for (t, &id) in ids.iter().enumerate() {
                l[t * v + (id as usize + 1) % v] = 1.0;
            }
            Ok(HostTensor::f32([rows, v], l))
        }
    }

    #[test]
    fn greedy_follows_the_argmax_until_the_budget() {
        let g = greedy_with(&[1], 3, None, &mut counting(10)).unwrap();
        assert_eq!(g.new_ids, vec![2, 3, 4]);
        assert_eq!(g.prompt_ids, vec![1]);
    }

    #[test]
    fn greedy_stops_at_eos_and_keeps_it() {
        let g = greedy_with(&[1, 2], 6, Some(4), &mut counting(10)).unwrap();
        assert_eq!(g.new_ids, vec![3, 4]);
    }

    #[test]
    fn argmax_takes_the_first_of_equal_maxima() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), 1);
    }

    #[test]
    fn logits_shorter_than_the_prefix_are_an_error() {
        let mut fwd = |_: &[i32]| Ok(HostTensor::f32([1, 3], vec![0.0; 3]));
        let e = greedy_with(&[1, 2], 1, None, &mut fwd).unwrap_err();
        assert!(format!("{e:#}").contains("for 2 tokens"), "{e:#}");
    }
}
