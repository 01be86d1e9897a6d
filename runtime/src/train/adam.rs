//! Adam as `optimi.Adam` computes it (spec §8.1): debiased betas, ε added after the square root,
//! no weight decay, and Kahan-compensated updates for bf16/f16 parameters.
//!
//! The per-element maths is [`adam_update`]; everything a device kernel needs per step is in
//! [`StepScalars`] (computed on the host once per step, in f64 as Python computes them, then
//! narrowed to f32 as PyTorch narrows a Python scalar for a float tensor op). For bf16/f16
//! parameters the state (m, v, Kahan buffer) has the parameter's dtype and is rounded at the same
//! points where optimi's PyTorch ops round (one rounding per in-place op), so a kernel that follows
//! [`adam_update`] reproduces the reference up to f32 ulps in the intermediate.
use half::{bf16, f16};
use qplc_ops::DType;
use serde::{Deserialize, Serialize};

/// Adam's hyper-parameters. They are part of the checkpointed state (spec §8.4: the reference
/// restores them on resume, so config changes to `beta1`/`beta2`/`eps` do not apply to a resumed
/// run; the loop decides whether to override).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamHyper {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamHyper {
    /// The config defaults of spec §3.3.
    fn default() -> Self {
        AdamHyper {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-6,
        }
    }
}

/// `β̂(k) = (β^k − β)/(β^k − 1)` (spec §8.1), so `β̂(1) = 0` and the moments are the
/// bias-corrected averages directly. `k` is 1-based.
pub fn debiased_beta(beta: f64, step: u64) -> f64 {
    // powf (C `pow`) rather than powi: Python's `beta**step` with a float base calls `pow`.
    let bk = beta.powf(step as f64);
    (bk - beta) / (bk - 1.0)
}

/// The scalars of one optimiser step, as f32 (the precision in which PyTorch applies a Python
/// scalar to a float tensor). A device kernel takes exactly these.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepScalars {
    /// `1 − β̂1`: the weight of `lerp(m, g, ·)`.
    pub m_weight: f32,
    /// `β̂2`.
    pub beta2: f32,
    /// `1 − β̂2`.
    pub one_minus_beta2: f32,
    /// `−lr`.
    pub neg_lr: f32,
    pub eps: f32,
}

impl StepScalars {
    /// Scalars of 1-based optimiser step `step` with learning rate `lr` (the scheduler's value
    /// *before* it advances, i.e. lr·f(step−1), spec §8.3).
    pub fn new(hyper: &AdamHyper, step: u64, lr: f64) -> Self {
        assert!(step >= 1, "optimiser steps are 1-based");
        let b1 = debiased_beta(hyper.beta1, step);
        let b2 = debiased_beta(hyper.beta2, step);
        StepScalars {
            m_weight: (1.0 - b1) as f32,
            beta2: b2 as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            neg_lr: (-lr) as f32,
            eps: hyper.eps as f32,
        }
    }
}

/// Rounds one value to the precision of `dtype` (identity for f32); the element-wise form of
/// [`crate::tensor::round_to`].
#[inline]
pub fn round_one(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_f32(x).to_f32(),
        DType::F16 => f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// `torch.lerp(start, end, w)` as ATen's scalar kernel evaluates it: the two-sided form keeps
/// the result exact at `w = 1` (step 1, where `m` must become `g` exactly).
#[inline]
fn lerp(start: f32, end: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        start + w * (end - start)
    } else {
        end - (end - start) * (1.0 - w)
    }
}

/// Adds update `u` to parameter `p` of `dtype` (spec §8.1):
/// * f32, or no compensation buffer: `p ← round(p + u)`;
/// * with a Kahan buffer `c` (bf16/f16): `c ← round(c + u)`; `p_old = p`; `p ← round(p + c)`;
///   `c ← round(c + round(p_old − p))` — `c` keeps what rounding `p` lost, so many updates
///   smaller than half an ulp of `p` still move it (spec §16 check 41).
#[inline]
pub fn add_update(p: &mut f32, comp: Option<&mut f32>, u: f32, dtype: DType) {
    match comp {
        Some(c) => {
            *c = round_one(*c + u, dtype);
            let old = *p;
            *p = round_one(old + *c, dtype);
            *c = round_one(*c + round_one(old - *p, dtype), dtype);
        }
        None => *p = round_one(*p + u, dtype),
    }
}

/// One Adam step on one tensor, element-wise, in optimi's op order:
/// `m ← lerp(m, g, 1−β̂1)`; `v ← round(round(β̂2·v) + (1−β̂2)·g·g)`;
/// `d ← round(round(√v) + ε)`; `u = (−lr·m)/d`; then [`add_update`].
/// Every `round` is to `dtype` (a no-op for f32). At step 1 with lr = 0 the update is exactly
/// zero while m and v still advance (spec §8.3, check 39).
pub fn adam_update(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    mut comp: Option<&mut [f32]>,
    dtype: DType,
    s: &StepScalars,
) {
    let n = p.len();
    assert!(
        g.len() == n && m.len() == n && v.len() == n,
        "Adam: parameter, gradient and moments must have the same length"
    );
    if let Some(c) = &comp {
        assert_eq!(c.len(), n, "Adam: Kahan buffer length must match");
    }
    for i in 0..n {
        let gi = g[i];
        let mi = round_one(lerp(m[i], gi, s.m_weight), dtype);
        let vi = round_one(
            round_one(v[i] * s.beta2, dtype) + s.one_minus_beta2 * gi * gi,
            dtype,
        );
        m[i] = mi;
        v[i] = vi;
        let d = round_one(round_one(vi.sqrt(), dtype) + s.eps, dtype);
        let u = s.neg_lr * mi / d;
        add_update(&mut p[i], comp.as_deref_mut().map(|c| &mut c[i]), u, dtype);
    }
}

/// Optimiser state of one parameter tensor. Serialised with the f32 values as their bit patterns,
/// so a checkpoint restores them bit-exactly in any serde format (spec §9.5: a resumed run must
/// continue exactly as an uninterrupted one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamState {
    pub dtype: DType,
    /// First moment (bias-corrected), in the parameter's dtype.
    #[serde(with = "f32_bits")]
    pub exp_avg: Vec<f32>,
    /// Second moment (bias-corrected), in the parameter's dtype.
    #[serde(with = "f32_bits")]
    pub exp_avg_sq: Vec<f32>,
    /// Kahan compensation; present exactly for bf16/f16 parameters (optimi's automatic
    /// `kahan_sum`).
    #[serde(with = "opt_f32_bits")]
    pub kahan_comp: Option<Vec<f32>>,
}

impl ParamState {
    pub fn new(numel: usize, dtype: DType) -> Self {
        assert!(dtype.is_float(), "only float parameters are optimised");
        let low_precision = matches!(dtype, DType::BF16 | DType::F16);
        ParamState {
            dtype,
            exp_avg: vec![0.0; numel],
            exp_avg_sq: vec![0.0; numel],
            kahan_comp: low_precision.then(|| vec![0.0; numel]),
        }
    }

    pub fn numel(&self) -> usize {
        self.exp_avg.len()
    }
}

/// Adam over a fixed list of parameter tensors (one param group, one step counter as in the
/// reference). This struct *is* the checkpointable optimiser state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamState {
    pub hyper: AdamHyper,
    /// Completed optimiser steps; the next step is `step + 1`.
    pub step: u64,
    pub params: Vec<ParamState>,
}

/// The optimiser is its state; the alias reads better at call sites.
pub type Adam = AdamState;

impl AdamState {
    /// State for tensors of the given element counts and dtypes, in the order `step` will see them.
    pub fn new(hyper: AdamHyper, tensors: &[(usize, DType)]) -> Self {
        AdamState {
            hyper,
            step: 0,
            params: tensors
                .iter()
                .map(|&(n, dtype)| ParamState::new(n, dtype))
                .collect(),
        }
    }

    /// Advances the step counter and returns the scalars of the new step, for a backend that
    /// runs [`adam_update`] itself (e.g. on device) over every tensor.
    pub fn begin_step(&mut self, lr: f64) -> StepScalars {
        self.step += 1;
        StepScalars::new(&self.hyper, self.step, lr)
    }

    /// One optimiser step with learning rate `lr` over all tensors (host arrays). `params[i]` and
    /// `grads[i]` correspond to `self.params[i]`.
    pub fn step(&mut self, lr: f64, params: &mut [&mut [f32]], grads: &[&[f32]]) -> StepScalars {
        assert_eq!(params.len(), self.params.len(), "Adam: tensor count");
        assert_eq!(grads.len(), self.params.len(), "Adam: gradient count");
        let s = self.begin_step(lr);
        for ((p, g), st) in params.iter_mut().zip(grads).zip(&mut self.params) {
            assert_eq!(p.len(), st.numel(), "Adam: tensor size changed");
            adam_update(
                p,
                g,
                &mut st.exp_avg,
                &mut st.exp_avg_sq,
                st.kahan_comp.as_deref_mut(),
                st.dtype,
                &s,
            );
        }
        s
    }
}

/// `Vec<f32>` as `Vec<u32>` bit patterns: exact through JSON (whose float parsing may be off by
/// an ulp) and NaN-safe.
mod f32_bits {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        v.iter()
            .map(|x| x.to_bits())
            .collect::<Vec<u32>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        Ok(Vec::<u32>::deserialize(d)?
            .into_iter()
            .map(f32::from_bits)
            .collect())
    }
}

mod opt_f32_bits {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<f32>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_ref()
            .map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>())
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<f32>>, D::Error> {
        Ok(
            Option::<Vec<u32>>::deserialize(d)?
                .map(|v| v.into_iter().map(f32::from_bits).collect()),
        )
    }
}
