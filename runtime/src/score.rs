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
    for t in 0..ids.len().saturating_sub(1) {
        let row = &data[t * v..(t + 1) * v];
        let target = ids[t + 1] as usize;
        if target >= v {
            bail!("token id {target} is outside the vocabulary of {v}");
        }
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        // −log p = log Σ exp(x − max) + (max − x_target); subtracting before adding keeps
        // the small log-sum term when the logits are large (max + ln Σ would swallow it).
        total += sum.ln() + (max - row[target] as f64);
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

    #[test]
    fn a_text_shorter_than_seq_len_is_one_window_of_all_tokens() {
        let v = 3;
        let mut seen = Vec::new();
        let mut fwd = |w: &[i32]| {
            seen.push(w.len());
            Ok(HostTensor::f32([w.len(), v], vec![0.0; w.len() * v]))
        };
        let s = score(&[0, 1, 2], 16, &mut fwd).unwrap();
        assert_eq!((s.windows, s.window_len, s.predictions), (1, 3, 2));
        assert_eq!(seen, vec![3]);
    }

    #[test]
    fn fewer_than_two_tokens_cannot_be_scored() {
        let mut fwd = |_: &[i32]| -> Result<HostTensor> { unreachable!() };
        let e = score(&[5], 4, &mut fwd).unwrap_err();
        assert!(e.to_string().contains("at least 2"), "{e}");
    }

    #[test]
    fn logits_of_the_wrong_length_are_an_error() {
        let mut fwd = |_: &[i32]| Ok(HostTensor::f32([2, 3], vec![0.0; 6]));
        let e = score(&[0, 1, 2, 0], 4, &mut fwd).unwrap_err();
        assert!(
            format!("{e:#}").contains("do not match 4 token ids"),
            "{e:#}"
        );
    }

    #[test]
    fn large_logits_do_not_overflow_the_log_softmax() {
        let mut fwd = |w: &[i32]| Ok(HostTensor::f32([w.len(), 2], vec![1e30; w.len() * 2]));
        let s = score(&[0, 1], 2, &mut fwd).unwrap();
        assert!((s.mean_nll - 2f64.ln()).abs() < 1e-12, "{}", s.mean_nll);
    }

    #[test]
    fn dumped_logits_read_back_with_ids_and_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logits.safetensors");
        let logits = HostTensor::f32([2, 3], vec![0.5, -1.0, 2.0, 3.0, 4.0, 5.0]);
        dump_logits(&path, &[7, 8], &logits).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let ids = st.tensor("input_ids").unwrap();
        assert_eq!(ids.dtype(), safetensors::Dtype::I32);
        assert_eq!(ids.shape(), &[2]);
        assert_eq!(ids.data(), &[7, 0, 0, 0, 8, 0, 0, 0]);
        let l = st.tensor("logits").unwrap();
        assert_eq!(
            (l.dtype(), l.shape()),
            (safetensors::Dtype::F32, &[2usize, 3][..])
        );
        let back: Vec<f32> = l
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(back, logits.as_f32());
    }
}
