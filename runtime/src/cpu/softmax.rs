//! Softmax and log-softmax over the last axis, one row per task, in f32 with the row
//! maximum subtracted (as torch does) so large logits cannot overflow `exp`.
use rayon::prelude::*;

fn rows<'a>(
    x: &'a [f32],
    h: usize,
    out: &'a mut [f32],
) -> impl ParallelIterator<Item = (&'a mut [f32], &'a [f32])> {
    let min = (4096 / h.max(1)).max(1);
    out.par_chunks_mut(h.max(1))
        .zip(x.par_chunks(h.max(1)))
        .with_min_len(min)
}

/// Maximum of a row (−∞ when empty), in eight lanes so that it vectorises.
pub(crate) fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    chunks.remainder().iter().copied().fold(m, f32::max)
}

/// `eˣ` in f32 within about 1 ulp (relative error < 2·10⁻⁷ on the whole range), written
/// without branches or library calls so loops over it vectorise: softmax over a 50k
/// vocabulary and attention probabilities spend most of their time here. Cephes' `expf`:
/// `eˣ = 2ⁿ·eʳ` with `n = round(x·log₂e)`, `r = x − n·ln2` (ln2 split in two for
/// exactness) and a degree-6 polynomial for `eʳ` on |r| ≤ ln2/2.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.75);
    // n ≤ 127 keeps 2ⁿ a normal float; near the top r then reaches 0.72, where the
    // polynomial is still within an ulp.
    let n = ((xc * LOG2E + ROUND) - ROUND).min(127.0);
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let e = y * f32::from_bits(((n as i32 + 127) as u32) << 23);
    // Outside the clamp: overflow to ∞, underflow to 0 (the true value is below 1.7·10⁻³⁸,
    // flushed), NaN stays NaN. Selects, not calls, so the loop still vectorises.
    let e = if x > 88.722_84 { f32::INFINITY } else { e };
    let e = if x < -87.0 { 0.0 } else { e };
    if x.is_nan() {
        x
    } else {
        e
    }
}

/// `x[i] = exp(x[i] − max)`, returning Σ; the sum uses eight lanes so it vectorises too.
pub(crate) fn exp_shifted_sum(x: &mut [f32], max: f32) -> f32 {
    x.iter_mut().for_each(|v| *v = fast_exp(*v - max));
    let mut acc = [0.0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

pub(crate) fn softmax(x: &[f32], h: usize, out: &mut [f32]) {
    rows(x, h, out).for_each(|(o, x)| {
        let m = row_max(x);
        o.copy_from_slice(x);
        let inv = 1.0 / exp_shifted_sum(o, m);
        o.iter_mut().for_each(|o| *o *= inv);
    });
}

/// `x − max − log Σ exp(x − max)`: exact where `log(softmax)` would underflow to −∞.
pub(crate) fn log_softmax(x: &[f32], h: usize, out: &mut [f32]) {
    rows(x, h, out).for_each(|(o, x)| {
        let m = row_max(x);
        o.copy_from_slice(x);
        let lse = (exp_shifted_sum(o, m) as f64).ln() as f32;
        for (o, &x) in o.iter_mut().zip(x) {
            *o = x - m - lse;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::fast_exp;

    #[test]
    fn fast_exp_is_within_two_ulp_of_exp_everywhere() {
        let mut x = -110.0f32;
        while x < 89.0 {
            let want = (x as f64).exp();
            let got = fast_exp(x) as f64;
            if x >= -87.0 && want < f32::MAX as f64 {
                assert!(
                    ((got - want) / want).abs() < 2.5e-7,
                    "exp({x}) = {got}, want {want}"
                );
            } else {
                assert!(
                    (got - want).abs() <= 1.7e-38 || got.is_infinite(),
                    "exp({x}) = {got}"
                );
            }
            x += 0.0137;
        }
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(f32::INFINITY), f32::INFINITY);
        assert!(fast_exp(f32::NAN).is_nan());
        assert_eq!(fast_exp(0.0), 1.0);
    }
}
