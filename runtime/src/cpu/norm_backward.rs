//! Gradients of the normalisations (`RmsNormBackward`, `RmsNormWeightGrad`,
//! `LayerNormBackward`, `LayerNormWeightGrad`). Row statistics are recomputed exactly as the
//! forward kernels compute them (f64 sums), and the per-row dot products are in f64.
//! Weight gradients sum over rows in fixed blocks whose partial sums are added in order, so
//! they do not depend on the thread count.
use rayon::prelude::*;

/// Rows per partial sum of a weight gradient.
const ROW_BLOCK: usize = 32;

fn rms_inv(x: &[f32], eps: f64) -> f32 {
    let h = x.len();
    let ms = (x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / h as f64) as f32;
    1.0 / (ms + eps as f32).sqrt()
}

/// `y = x·r·(offset + w)`, `r = (mean(x²) + eps)^−½`:
/// `dx_j = r·w'_j·g_j − (r³/H)·x_j·Σ_k g_k·w'_k·x_k`.
pub(crate) fn rms_norm_backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f64,
    offset: f64,
    h: usize,
    out: &mut [f32],
) {
    if h == 0 {
        return;
    }
    let offset = offset as f32;
    out.par_chunks_mut(h)
        .zip(x.par_chunks(h).zip(g.par_chunks(h)))
        .for_each(|(o, (x, g))| {
            let r = rms_inv(x, eps) as f64;
            let dot: f64 = x
                .iter()
                .zip(g)
                .zip(w)
                .map(|((&x, &g), &w)| x as f64 * g as f64 * (offset + w) as f64)
                .sum();
            let c = r * r * r * dot / h as f64;
            for (((o, &x), &g), &w) in o.iter_mut().zip(x).zip(g).zip(w) {
                *o = (r * (offset + w) as f64 * g as f64 - c * x as f64) as f32;
            }
        });
}

/// Σ over rows of `f(x_row, g_row)` (each an `[H]` contribution), in fixed row blocks.
fn sum_rows(
    x: &[f32],
    g: &[f32],
    h: usize,
    out: &mut [f32],
    f: impl Fn(&[f32], &[f32], &mut [f64]) + Sync,
) {
    if h == 0 {
        return;
    }
    let parts: Vec<Vec<f64>> = x
        .par_chunks(h * ROW_BLOCK)
        .zip(g.par_chunks(h * ROW_BLOCK))
        .map(|(xb, gb)| {
            let mut acc = vec![0.0f64; h];
            for (x, g) in xb.chunks(h).zip(gb.chunks(h)) {
                f(x, g, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![0.0f64; h];
    for p in parts {
        total.iter_mut().zip(p).for_each(|(t, p)| *t += p);
    }
    out.iter_mut().zip(total).for_each(|(o, t)| *o = t as f32);
}

/// `dw_j = Σ_rows g_j·x_j·r` (the offset does not matter: ∂y/∂w = x·r).
pub(crate) fn rms_norm_weight_grad(x: &[f32], g: &[f32], eps: f64, h: usize, out: &mut [f32]) {
    sum_rows(x, g, h, out, |x, g, acc| {
        let r = rms_inv(x, eps) as f64;
        for ((a, &x), &g) in acc.iter_mut().zip(x).zip(g) {
            *a += g as f64 * x as f64 * r;
        }
    });
}

/// `(mean, r = (var + eps)^−½)` as the forward kernel computes them.
fn ln_stats(x: &[f32], eps: f64) -> (f32, f32) {
    let h = x.len();
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / h as f64;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

/// `x̂ = (x − μ)·r`, `dx̂ = g·w`: `dx = r·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))`.
pub(crate) fn layer_norm_backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f64,
    h: usize,
    out: &mut [f32],
) {
    if h == 0 {
        return;
    }
    out.par_chunks_mut(h)
        .zip(x.par_chunks(h).zip(g.par_chunks(h)))
        .for_each(|(o, (x, g))| {
            let (mean, r) = ln_stats(x, eps);
            let (mut s1, mut s2) = (0.0f64, 0.0f64);
            for ((&x, &g), &w) in x.iter().zip(g).zip(w) {
                let xh = ((x - mean) * r) as f64;
                let d = g as f64 * w as f64;
                s1 += d;
                s2 += d * xh;
            }
            let (m1, m2) = (s1 / h as f64, s2 / h as f64);
            for (((o, &x), &g), &w) in o.iter_mut().zip(x).zip(g).zip(w) {
                let xh = ((x - mean) * r) as f64;
                let d = g as f64 * w as f64;
                *o = (r as f64 * (d - m1 - xh * m2)) as f32;
            }
        });
}

/// `dw_j = Σ_rows g_j·x̂_j`.
pub(crate) fn layer_norm_weight_grad(x: &[f32], g: &[f32], eps: f64, h: usize, out: &mut [f32]) {
    sum_rows(x, g, h, out, |x, g, acc| {
        let (mean, r) = ln_stats(x, eps);
        for ((a, &x), &g) in acc.iter_mut().zip(x).zip(g) {
            *a += g as f64 * ((x - mean) * r) as f64;
        }
    });
}
