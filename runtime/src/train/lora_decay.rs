//! Composite LoRA weight decay (spec §6.1.4) and its per-pair metrics (spec §6.1.5).
//!
//! The decay shrinks the learned update `W = B·A` rather than A and B separately: one gradient
//! step on ½‖BA‖²_F, `A ← A − ηλ·Bᵀ(BA)`, `B ← B − ηλ·(BA)Aᵀ`, both from the pre-update A, B.
//! It runs after the optimiser and scheduler steps with η = lr·f(k) (spec §8.5, check 33).
//!
//! We never form `W` (out × in): `Bᵀ(BA) = (BᵀB)A` and `(BA)Aᵀ = B(AAᵀ)` need only the r × r Gram
//! matrices, and `‖BA‖²_F = Σᵢⱼ (BᵀB)ᵢⱼ(AAᵀ)ᵢⱼ`. Everything is computed in f64 and the new A, B
//! rounded once to f32, so the small `weight_decay` metric (a difference of two nearly equal
//! norms) does not drown in f32 cancellation.
use anyhow::{bail, Result};
use qplc_ops::DType;

/// Dimensions of one adapter pair: `A ∈ ℝ^{rank×in}`, `B ∈ ℝ^{out×rank}`, both row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraShape {
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
}

/// Metrics of one adapter pair (spec §6.1.5, §10.2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraPairMetrics {
    /// `norms`: ‖BA‖_F after the (optional) decay.
    pub norm: f64,
    /// `weight_decay`: ‖BA‖_F before − after; `None` when λ = 0 (not reported then).
    pub weight_decay: Option<f64>,
}

/// The decay requires float32 adapters when λ > 0 (spec §3.2: bf16 would cancel the tiny
/// update; the reference errors at the first step).
pub fn check_decay_dtype(lambda: f64, dtype: DType) -> Result<()> {
    if lambda > 0.0 && dtype != DType::F32 {
        bail!(
            "lora_weight_decay > 0 requires float32 adapter weights, found {dtype} \
             (set lora_weight_dtype = \"float32\")"
        );
    }
    Ok(())
}

/// Applies the composite decay with step `eta` (= lr·f(k)) and coefficient `lambda` to one pair
/// in place and returns its metrics. With λ = 0 nothing changes.
pub fn decay_lora_pair(
    a: &mut [f32],
    b: &mut [f32],
    shape: LoraShape,
    eta: f64,
    lambda: f64,
) -> LoraPairMetrics {
    let LoraShape {
        rank: r,
        in_features: n_in,
        out_features: n_out,
    } = shape;
    assert_eq!(a.len(), r * n_in, "LoRA A must be rank × in_features");
    assert_eq!(b.len(), n_out * r, "LoRA B must be out_features × rank");
    let a64: Vec<f64> = a.iter().map(|&x| f64::from(x)).collect();
    let b64: Vec<f64> = b.iter().map(|&x| f64::from(x)).collect();
    let (btb, aat) = grams(&a64, &b64, shape);
    let before = frobenius_from_grams(&btb, &aat);
    if lambda == 0.0 {
        return LoraPairMetrics {
            norm: before,
            weight_decay: None,
        };
    }
    let step = eta * lambda;
    // G_A = (BᵀB)·A  (r×r · r×in), G_B = B·(AAᵀ)  (out×r · r×r).
    let g_a = matmul(&btb, &a64, r, r, n_in);
    let g_b = matmul(&b64, &aat, n_out, r, r);
    for (x, (&x0, &g)) in a.iter_mut().zip(a64.iter().zip(&g_a)) {
        *x = (x0 - step * g) as f32;
    }
    for (x, (&x0, &g)) in b.iter_mut().zip(b64.iter().zip(&g_b)) {
        *x = (x0 - step * g) as f32;
    }
    let after = lora_product_norm(a, b, shape);
    LoraPairMetrics {
        norm: after,
        weight_decay: Some(before - after),
    }
}

/// ‖BA‖_F (the `norms` metric) without forming BA.
pub fn lora_product_norm(a: &[f32], b: &[f32], shape: LoraShape) -> f64 {
    let a64: Vec<f64> = a.iter().map(|&x| f64::from(x)).collect();
    let b64: Vec<f64> = b.iter().map(|&x| f64::from(x)).collect();
    let (btb, aat) = grams(&a64, &b64, shape);
    frobenius_from_grams(&btb, &aat)
}

/// (BᵀB, AAᵀ), both r × r.
fn grams(a: &[f64], b: &[f64], shape: LoraShape) -> (Vec<f64>, Vec<f64>) {
    let LoraShape {
        rank: r,
        in_features: n_in,
        out_features: n_out,
    } = shape;
    let mut btb = vec![0.0; r * r];
    let mut aat = vec![0.0; r * r];
    // SAFETY: the slices have exactly the sizes the (rows, cols, strides) below address.
    unsafe {
        // Bᵀ (r×out, strides (1, r)) · B (out×r, strides (r, 1)).
        matrixmultiply::dgemm(
            r,
            n_out,
            r,
            1.0,
            b.as_ptr(),
            1,
            r as isize,
            b.as_ptr(),
            r as isize,
            1,
            0.0,
            btb.as_mut_ptr(),
            r as isize,
            1,
        );
        // A (r×in, strides (in, 1)) · Aᵀ (in×r, strides (1, in)).
        matrixmultiply::dgemm(
            r,
            n_in,
            r,
            1.0,
            a.as_ptr(),
            n_in as isize,
            1,
            a.as_ptr(),
            1,
            n_in as isize,
            0.0,
            aat.as_mut_ptr(),
            r as isize,
            1,
        );
    }
    (btb, aat)
}

/// `‖BA‖_F = sqrt(tr(AᵀBᵀBA)) = sqrt(Σ (BᵀB) ∘ (AAᵀ))` (both Gram matrices are symmetric).
fn frobenius_from_grams(btb: &[f64], aat: &[f64]) -> f64 {
    let sq: f64 = btb.iter().zip(aat).map(|(x, y)| x * y).sum();
    // Round-off can make a zero product's sum a tiny negative number.
    sq.max(0.0).sqrt()
}

/// Row-major (m×k)·(k×n).
fn matmul(x: &[f64], y: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    // SAFETY: x is m×k, y is k×n, out is m×n, all contiguous row-major.
    unsafe {
        matrixmultiply::dgemm(
            m,
            k,
            n,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            y.as_ptr(),
            n as isize,
            1,
            0.0,
            out.as_mut_ptr(),
            n as isize,
            1,
        );
    }
    out
}
