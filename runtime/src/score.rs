//! Perplexity of a text under a model (`qplc score`). The windowing rule is the one of
//! scripts/reference_ppl.py, so the two numbers are comparable: consecutive,
//! non-overlapping windows of exactly N tokens (the incomplete tail dropped; a text
//! shorter than N is one window of all its tokens), each scored from a fresh context,
//! every next-token prediction weighted equally; log-softmax in f64.
use crate::HostTensor;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;

#[derive(Clone, Debug, Serialize)]
pub struct Score {
    /// Tokens scored (windows × window length).
    pub tokens: usize,
    pub predictions: usize,
    pub windows: usize,
    pub window_len: usize,
    pub mean_nll: f64,
    pub perplexity: f64,
    pub window_mean_nll: Vec<f64>,
}

/// The windows `score` evaluates: `(start, len)` pairs.
pub fn windows(n_tokens: usize, seq_len: usize) -> Vec<(usize, usize)> {
    if n_tokens < seq_len {
        return if n_tokens >= 2 {
            vec![(0, n_tokens)]
        } else {
            Vec::new()
        };
    }
    (0..n_tokens / seq_len)
        .map(|k| (k * seq_len, seq_len))
        .collect()
}

/// Sum over t of −log softmax(logits[t])[ids[t+1]], for t = 0..T−2.
pub fn window_nll(logits: &HostTensor, ids: &[i32]) -> Result<f64> {
    let dims = logits.shape().dims();
    if dims.len() != 2 || dims[0] != ids.len() {
        bail!(
            "logits of shape {} do not match {} token ids",
            logits.shape(),
            ids.len()
        );
    }
    let v = dims[1];
    let data = logits.as_f32();
    let mut total = 0.0;
    for t in 0..ids.len() - 1 {
        let row = &data[t * v..(t + 1) * v];
        let target = ids[t + 1] as usize;
        if target >= v {
            bail!("token id {target} is outside the vocabulary of {v}");
        }
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        total += max + sum.ln() - row[target] as f64;
    }
    Ok(total)
}

/// Scores `ids` in windows of `seq_len` with `forward(window ids) → logits [len, V]`.
pub fn score(
    ids: &[i32],
    seq_len: usize,
    forward: &mut dyn FnMut(&[i32]) -> Result<HostTensor>,
) -> Result<Score> {
    let wins = windows(ids.len(), seq_len);
    if wins.is_empty() {
        bail!("the text has {} token(s); at least 2 are needed", ids.len());
    }
    let window_len = wins[0].1;
    let mut window_mean_nll = Vec::with_capacity(wins.len());
    let mut total = 0.0;
    for (k, &(start, len)) in wins.iter().enumerate() {
        let w = &ids[start..start + len];
        let logits = forward(w).with_context(|| format!("window {k}"))?;
        let nll = window_nll(&logits, w)?;
        total += nll;
        window_mean_nll.push(nll / (len - 1) as f64);
    }
    let predictions = wins.len() * (window_len - 1);
    let mean_nll = total / predictions as f64;
    Ok(Score {
        tokens: wins.len() * window_len,
        predictions,
        windows: wins.len(),
        window_len,
        mean_nll,
        perplexity: mean_nll.exp(),
        window_mean_nll,
    })
}

/// Writes `input_ids` (I32 [T]) and `logits` (F32 [T, V]) to a safetensors file.
pub fn dump_logits(path: &Path, ids: &[i32], logits: &HostTensor) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let id_bytes: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
    let logit_bytes: Vec<u8> = logits
        .as_f32()
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let tensors = vec![
        (
            "input_ids",
            TensorView::new(Dtype::I32, vec![ids.len()], &id_bytes)?,
        ),
        (
            "logits",
            TensorView::new(Dtype::F32, logits.shape().dims().to_vec(), &logit_bytes)?,
        ),
    ];
    safetensors::tensor::serialize_to_file(tensors, None, path)
        .with_context(|| format!("cannot write `{}`", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_drop_the_tail_and_short_texts_form_one_window() {
        assert_eq!(windows(10, 4), vec![(0, 4), (4, 4)]);
        assert_eq!(windows(3, 4), vec![(0, 3)]);
        assert!(windows(1, 4).is_empty());
    }

    #[test]
    fn uniform_logits_give_nll_ln_v() {
        let v = 7;
        let ids: Vec<i32> = (0..9).map(|i| i % v as i32).collect();
        let mut fwd = |w: &[i32]| Ok(HostTensor::f32([w.len(), v], vec![0.5; w.len() * v]));
        let s = score(&ids, 4, &mut fwd).unwrap();
        assert_eq!((s.windows, s.predictions, s.tokens), (2, 6, 8));
        assert!((s.mean_nll - (v as f64).ln()).abs() < 1e-12);
        assert!((s.perplexity - v as f64).abs() < 1e-9);
    }

    #[test]
    fn a_confident_correct_model_scores_near_zero() {
        let v = 5;
        let ids = vec![0, 1, 2, 3];
        let mut fwd = |w: &[i32]| {
            let mut l = vec![0.0; w.len() * v];
            for t in 0..w.len() - 1 {
                l[t * v + w[t + 1] as usize] = 50.0;
            }
            Ok(HostTensor::f32([w.len(), v], l))
        };
        let s = score(&ids, 4, &mut fwd).unwrap();
        assert!(s.mean_nll < 1e-15, "{}", s.mean_nll);
    }
}
