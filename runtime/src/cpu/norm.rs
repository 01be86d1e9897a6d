//! Normalisations over the last axis, one row per rayon task, statistics in f64 and the
//! result in f32 (HF computes these in f32 whatever the model dtype; the f64 sums only make
//! the mean more exact than f32 accumulation would).
use rayon::prelude::*;

/// Rows this short are batched per task so that rayon's per-task cost stays small.
fn min_rows(h: usize) -> usize {
    (4096 / h.max(1)).max(1)
}

/// `x · rsqrt(mean(x²) + eps) · (offset + w)`: HF's `LlamaRMSNorm` (offset 0) and
/// `GemmaRMSNorm` (offset 1), both computed in f32.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f64, offset: f64, h: usize, out: &mut [f32]) {
    if h == 0 {
        return;
    }
    let eps = eps as f32;
    let offset = offset as f32;
    out.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .with_min_len(min_rows(h))
        .for_each(|(o, x)| {
            let ms = (x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / h as f64) as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                *o = x * r * (offset + w);
            }
        });
}

/// `(x − mean) / sqrt(var + eps) · w (+ b)` with the biased variance, as `torch.nn.LayerNorm`.
pub(crate) fn layer_norm(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    eps: f64,
    h: usize,
    out: &mut [f32],
) {
    if h == 0 {
        return;
    }
    out.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .with_min_len(min_rows(h))
        .for_each(|(o, x)| {
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / h as f64;
            let r = (1.0 / (var + eps).sqrt()) as f32;
            let mean = mean as f32;
            for (i, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                let y = (x - mean) * r * w[i];
                *o = match b {
                    Some(b) => y + b[i],
                    None => y,
                };
            }
        });
}
