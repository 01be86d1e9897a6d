//! Control Adapter initialisation and regularisers (spec §6.2.2, §6.2.5–§6.2.7, checks 29–31,
//! 33).
//!
//! * Init: `Q [H, r]` with orthonormal columns — the QR factor of a Gaussian matrix, sign-fixed
//!   so that diag(R) > 0 (what `torch.nn.init.orthogonal_` does); `S = 0`.
//! * After every optimiser step (§8.5 step 5), per adapter: the Newton retraction
//!   `Q ← Q − γ·Q(QᵀQ − I)` and, when `w = lora_weight_decay > 0`, the shrinkage
//!   `S ← (1 − ηw)·S` with η = the post-scheduler learning rate lr·f(k).
//!
//! Arithmetic is f64 with one rounding to the adapter dtype at the end, as in
//! [`super::lora_decay`]: the small metrics (orthogonality error, the decay's change of
//! `max|expm1 S|`) are differences of nearly equal numbers.
use crate::adapter_init::Pcg32;
use crate::tensor::round_to;
use anyhow::{bail, Result};
use qplc_ops::DType;

/// A standard normal sample by Box–Muller from two PCG32 draws (u1 ∈ (0, 1], u2 ∈ [0, 1)),
/// in f64; one sample per pair, so the stream is simple to reproduce in the fixture scripts.
pub fn normal(rng: &mut Pcg32) -> f64 {
    let u1 = ((rng.next_u32() >> 8) as f64 + 1.0) / (1u64 << 24) as f64;
    let u2 = (rng.next_u32() >> 8) as f64 / (1u64 << 24) as f64;
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Orthonormal columns of the `rows × cols` matrix `m` (row-major, f64, `rows ≥ cols`):
/// modified Gram–Schmidt, run twice for orthogonality at rounding level. Column `j` of the
/// result is the QR factor's column with diag(R) > 0.
pub fn orthonormal_columns(m: &[f64], rows: usize, cols: usize) -> Result<Vec<f64>> {
    if cols > rows {
        bail!("a Control Adapter's rank ({cols}) cannot exceed the hidden size ({rows})");
    }
    let mut q = m.to_vec();
    for j in 0..cols {
        for _pass in 0..2 {
            for k in 0..j {
                let dot: f64 = (0..rows).map(|i| q[i * cols + k] * q[i * cols + j]).sum();
                for i in 0..rows {
                    q[i * cols + j] -= dot * q[i * cols + k];
                }
            }
        }
        let norm = (0..rows)
            .map(|i| q[i * cols + j] * q[i * cols + j])
            .sum::<f64>()
            .sqrt();
        if norm < 1e-12 {
            bail!("Gram–Schmidt met a dependent column ({j})");
        }
        for i in 0..rows {
            q[i * cols + j] /= norm;
        }
    }
    Ok(q)
}

/// The initial `Q [hidden, rank]` (orthonormal columns, rounded to `dtype`) from a PCG32
/// stream `(seed, stream)`: Gaussian entries in row-major order, then [`orthonormal_columns`].
pub fn init_control_q(
    hidden: usize,
    rank: usize,
    dtype: DType,
    seed: u64,
    stream: u64,
) -> Result<Vec<f32>> {
    let mut rng = Pcg32::new(seed, stream);
    let g: Vec<f64> = (0..hidden * rank).map(|_| normal(&mut rng)).collect();
    let q = orthonormal_columns(&g, hidden, rank)?;
    let q: Vec<f32> = q.iter().map(|&x| x as f32).collect();
    Ok(round_to(&q, dtype))
}

/// `QᵀQ` (r × r, f64) of `Q [h, r]` row-major.
fn gram(q: &[f32], h: usize, r: usize) -> Vec<f64> {
    let mut g = vec![0.0f64; r * r];
    for row in q.chunks_exact(r).take(h) {
        for a in 0..r {
            let qa = row[a] as f64;
            for b in a..r {
                g[a * r + b] += qa * row[b] as f64;
            }
        }
    }
    for a in 0..r {
        for b in 0..a {
            g[a * r + b] = g[b * r + a];
        }
    }
    g
}

/// ‖QᵀQ − I‖²_F.
pub fn orthogonality_error(q: &[f32], h: usize, r: usize) -> f64 {
    let g = gram(q, h, r);
    let mut s = 0.0;
    for a in 0..r {
        for b in 0..r {
            let e = g[a * r + b] - if a == b { 1.0 } else { 0.0 };
            s += e * e;
        }
    }
    s
}

/// One Newton step `Q ← Q − γ·Q(QᵀQ − I)` in place (rounded to `dtype`); returns the
/// orthogonality error after the step, the metric of §6.2.7 (check 30).
pub fn newton_retraction(q: &mut [f32], h: usize, r: usize, gamma: f64, dtype: DType) -> f64 {
    let mut e = gram(q, h, r);
    for a in 0..r {
        e[a * r + a] -= 1.0;
    }
    let mut new = vec![0.0f32; q.len()];
    for (row, out) in q.chunks_exact(r).zip(new.chunks_exact_mut(r)) {
        for b in 0..r {
            let qe: f64 = (0..r).map(|a| row[a] as f64 * e[a * r + b]).sum();
            out[b] = (row[b] as f64 - gamma * qe) as f32;
        }
    }
    q.copy_from_slice(&round_to(&new, dtype));
    orthogonality_error(q, h, r)
}

/// `max_i |expm1(S_i)|`, the `norms` metric (≈ ‖QΛQᵀ‖₂ for orthonormal Q).
pub fn control_norm(s: &[f32]) -> f64 {
    s.iter()
        .map(|&x| (x as f64).exp_m1().abs())
        .fold(0.0, f64::max)
}

/// What one adapter reports after its regularisation (spec §6.2.7).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ControlMetrics {
    /// max|expm1 S| after the shrinkage.
    pub norm: f64,
    /// ‖QᵀQ − I‖²_F after the Newton step.
    pub orthogonality: f64,
    /// `norm` before − after the shrinkage; `None` when `w = 0`.
    pub weight_decay: Option<f64>,
}

/// The checks of §3.8 that the reference makes at the first regularisation: γ ∈ (0, 0.5],
/// and float32 S when the shrinkage is active.
pub fn check_control_settings(gamma: f64, decay: f64, s_dtype: DType) -> Result<()> {
    if !(gamma > 0.0 && gamma <= 0.5) {
        bail!("control_adapter_gamma must be in (0, 0.5], got {gamma}");
    }
    if decay < 0.0 {
        bail!("lora_weight_decay must be ≥ 0, got {decay}");
    }
    if decay > 0.0 && s_dtype != DType::F32 {
        bail!(
            "lora_weight_decay > 0 requires float32 Control Adapter weights, found {s_dtype} \
             (set lora_weight_dtype = \"float32\")"
        );
    }
    Ok(())
}

/// Regularises one adapter after the optimiser step `k` with η = lr·f(k) (check 33): the
/// Newton step on Q, then `S ← (1 − ηw)·S` if `w > 0` (check 31).
#[allow(clippy::too_many_arguments)]
pub fn regularise_control(
    q: &mut [f32],
    s: &mut [f32],
    hidden: usize,
    rank: usize,
    dtype: DType,
    gamma: f64,
    eta: f64,
    decay: f64,
) -> ControlMetrics {
    let orthogonality = newton_retraction(q, hidden, rank, gamma, dtype);
    let before = control_norm(s);
    let weight_decay = if decay > 0.0 {
        let f = 1.0 - eta * decay;
        let new: Vec<f32> = s.iter().map(|&x| (f * x as f64) as f32).collect();
        s.copy_from_slice(&round_to(&new, dtype));
        Some(before - control_norm(s))
    } else {
        None
    };
    ControlMetrics {
        norm: control_norm(s),
        orthogonality,
        weight_decay,
    }
}

/// Initial values of every Control Adapter weight of `graph` (§6.2.2): Q orthonormal, each
/// from its own PCG32 stream (`seed`, FNV-1a of the weight name, as the LoRA init), S = 0.
pub fn init_control_weights(
    graph: &qplc_compiler::Graph,
    seed: u64,
) -> Result<std::collections::HashMap<String, crate::HostTensor>> {
    use qplc_ops::Op;
    use qplc_passes::{parse_control_weight_name, ControlRole};
    let mut out = std::collections::HashMap::new();
    for (name, id) in graph.weights() {
        let Some((_, role)) = parse_control_weight_name(&name) else {
            continue;
        };
        let Op::Weight { ty, .. } = &graph.node(id).op else {
            continue;
        };
        let d = ty.shape.dims();
        let t = match role {
            ControlRole::Q => {
                let v = init_control_q(
                    d[0],
                    d[1],
                    ty.dtype,
                    seed,
                    crate::adapter_init::name_hash(&name),
                )?;
                let mut t = crate::HostTensor::f32(ty.shape.clone(), v);
                t.ty.dtype = ty.dtype;
                t
            }
            ControlRole::S => crate::HostTensor::zeros(ty),
        };
        out.insert(name, t);
    }
    Ok(out)
}
