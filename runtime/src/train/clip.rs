//! Global-norm gradient clipping (spec §3.4 fixed engine setting, §8.2): when the L2 norm over
//! all trainable gradients exceeds 1.0, every gradient is scaled by `1/(‖g‖ + 1e-6)`
//! (DeepSpeed's `max_norm/(total_norm + 1e-6)` with max_norm = 1).
use super::adam::round_one;
use qplc_ops::DType;

/// The fixed clipping threshold.
pub const MAX_GRAD_NORM: f64 = 1.0;
/// Added to the norm in the clip coefficient (DeepSpeed's constant).
pub const CLIP_EPS: f64 = 1e-6;

/// Σ g² of one tensor, accumulated in f64. Pipeline stages each sum their local tensors (tied
/// parameters counted once) and the totals are added before [`norm_from_sum_of_squares`].
pub fn sum_of_squares(g: &[f32]) -> f64 {
    g.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

pub fn norm_from_sum_of_squares(total: f64) -> f64 {
    total.sqrt()
}

/// The L2 norm over several tensors taken together.
pub fn global_norm_of(grads: &[&[f32]]) -> f64 {
    norm_from_sum_of_squares(grads.iter().map(|g| sum_of_squares(g)).sum())
}

/// `Some(1/(‖g‖ + 1e-6))` when `‖g‖ > 1`, else `None` (gradients untouched). A NaN norm
/// compares false and leaves the gradients as they are.
pub fn clip_coefficient(norm: f64) -> Option<f64> {
    (norm > MAX_GRAD_NORM).then(|| MAX_GRAD_NORM / (norm + CLIP_EPS))
}

/// Multiplies a gradient by `scale` in its own dtype (gradients have the parameter dtype,
/// spec §3.4), rounding bf16/f16 results.
pub fn scale_gradient(g: &mut [f32], scale: f32, dtype: DType) {
    for x in g {
        *x = round_one(*x * scale, dtype);
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipOutcome {
    /// The global norm before clipping.
    pub norm: f64,
    /// The scale applied, if the norm exceeded the threshold.
    pub scale: Option<f64>,
}

/// Clips host gradients (each with its dtype) to global norm 1.0 in place; single-process form
/// of the above pieces.
pub fn clip_global_norm(grads: &mut [(&mut [f32], DType)]) -> ClipOutcome {
    let norm = norm_from_sum_of_squares(grads.iter().map(|(g, _)| sum_of_squares(g)).sum());
    let scale = clip_coefficient(norm);
    if let Some(s) = scale {
        for (g, dtype) in grads.iter_mut() {
            scale_gradient(g, s as f32, *dtype);
        }
    }
    ClipOutcome { norm, scale }
}
