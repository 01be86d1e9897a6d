//! `AttentionBackward`: gradients of causal grouped-query attention, packed as
//! `[T, nh + 2·nkv, d]` (dq heads, then dk, then dv; `Op::AttentionBackward`).
//!
//! Per (query head, block of `QB` queries) the probabilities are recomputed as the forward
//! kernel computes them (`S = scale·Q·Kᵀ`, optional soft-cap `c·tanh(S/c)`, mask, softmax
//! with the max subtracted), then, with `dO` the output gradient:
//! `dP = dO·Vᵀ`, `dS = P∘(dP − rowsum(P∘dP))∘(1 − (S_capped/c)²)·scale`,
//! `dV += Pᵀ·dO`, `dK += dSᵀ·Q`, `dQ = dS·K`. Memory per block is `QB × T`, never `T × T`.
//! One task per query head: it owns that head's dQ and its own partial dK/dV; the partials
//! of a KV head's query-head group are then added in head order. Tasks never share an
//! output and every sum runs in a fixed order, whatever the thread count (nine tasks keep
//! two or more threads busy where one task per KV head — three for SmolLM2 — did not).
use super::matmul::sgemm_serial as sgemm;
use super::{f32s, f32s_mut};
use crate::backend::KernelError;
use crate::HostTensor;
use rayon::prelude::*;

const QB: usize = 64;

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    g: &HostTensor,
    scale: f64,
    window: Option<usize>,
    softcap: Option<f64>,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let name = "attention_backward";
    let qd = q.ty.shape.dims();
    let (t, nh, d) = (qd[0], qd[1], qd[2]);
    let nkv = k.ty.shape.dims()[1];
    let (qv, kv, vv, gv) = (
        f32s(name, q)?,
        f32s(name, k)?,
        f32s(name, v)?,
        f32s(name, g)?,
    );
    let ov = f32s_mut(name, out)?;
    ov.fill(0.0);
    if t == 0 || nh == 0 || d == 0 {
        return Ok(());
    }
    let group = nh / nkv;
    let scale = scale as f32;
    let cap = softcap.map(|c| c as f32);
    let blocks = t.div_ceil(QB);
    let first_key = |i: usize| window.map_or(0, |w| (i + 1).saturating_sub(w));

    // (dq [T·d], partial dk [T·d], partial dv [T·d]) per query head.
    type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);
    let per_head: Vec<Grads> = (0..nh)
        .into_par_iter()
        .map(|h| {
            let kh = h / group;
            let mut dq = vec![0.0f32; t * d];
            let mut dk = vec![0.0f32; t * d];
            let mut dv = vec![0.0f32; t * d];
            {
                for blk in 0..blocks {
                    let t0 = blk * QB;
                    let t1 = (t0 + QB).min(t);
                    let rows = t1 - t0;
                    let lo = first_key(t0);
                    let n = t1 - lo;
                    let q_at = (t0 * nh + h) * d;
                    let kv_at = (lo * nkv + kh) * d;
                    // P (and the soft-cap derivative) for this block.
                    let mut p = vec![0.0f32; rows * n];
                    sgemm(
                        rows,
                        d,
                        n,
                        &qv[q_at..],
                        (nh * d, 1),
                        &kv[kv_at..],
                        (1, nkv * d),
                        &mut p,
                        (n, 1),
                    );
                    let mut capd = vec![1.0f32; if cap.is_some() { rows * n } else { 0 }];
                    for r in 0..rows {
                        let i = t0 + r;
                        let (a, b) = (first_key(i) - lo, i - lo + 1);
                        let row = &mut p[r * n..(r + 1) * n];
                        row[a..b].iter_mut().for_each(|x| *x *= scale);
                        if let Some(c) = cap {
                            for (j, x) in row[a..b].iter_mut().enumerate() {
                                let th = (*x / c).tanh();
                                *x = c * th;
                                capd[r * n + a + j] = 1.0 - th * th;
                            }
                        }
                        let max = super::softmax::row_max(&row[a..b]);
                        let inv = 1.0 / super::softmax::exp_shifted_sum(&mut row[a..b], max);
                        row[a..b].iter_mut().for_each(|x| *x *= inv);
                        row[..a].fill(0.0);
                        row[b..].fill(0.0);
                    }
                    // dP = dO·Vᵀ
                    let mut ds = vec![0.0f32; rows * n];
                    sgemm(
                        rows,
                        d,
                        n,
                        &gv[q_at..],
                        (nh * d, 1),
                        &vv[kv_at..],
                        (1, nkv * d),
                        &mut ds,
                        (n, 1),
                    );
                    // dS = P∘(dP − Σ P∘dP)∘cap'·scale (zero where P is masked out).
                    for r in 0..rows {
                        let pr = &p[r * n..(r + 1) * n];
                        let dr = &mut ds[r * n..(r + 1) * n];
                        let dot: f64 = pr
                            .iter()
                            .zip(dr.iter())
                            .map(|(&p, &d)| p as f64 * d as f64)
                            .sum();
                        let dot = dot as f32;
                        for (j, (d, &p)) in dr.iter_mut().zip(pr).enumerate() {
                            let c = if cap.is_some() { capd[r * n + j] } else { 1.0 };
                            *d = p * (*d - dot) * c * scale;
                        }
                    }
                    let mut tmp = vec![0.0f32; n.max(rows) * d];
                    // dV[lo..t1] += Pᵀ·dO_blk
                    sgemm(
                        n,
                        rows,
                        d,
                        &p,
                        (1, n),
                        &gv[q_at..],
                        (nh * d, 1),
                        &mut tmp,
                        (d, 1),
                    );
                    dv[lo * d..t1 * d]
                        .iter_mut()
                        .zip(&tmp)
                        .for_each(|(a, b)| *a += b);
                    // dK[lo..t1] += dSᵀ·Q_blk
                    sgemm(
                        n,
                        rows,
                        d,
                        &ds,
                        (1, n),
                        &qv[q_at..],
                        (nh * d, 1),
                        &mut tmp,
                        (d, 1),
                    );
                    dk[lo * d..t1 * d]
                        .iter_mut()
                        .zip(&tmp)
                        .for_each(|(a, b)| *a += b);
                    // dQ_blk = dS·K[lo..t1]
                    sgemm(
                        rows,
                        n,
                        d,
                        &ds,
                        (n, 1),
                        &kv[kv_at..],
                        (nkv * d, 1),
                        &mut tmp,
                        (d, 1),
                    );
                    let at = t0 * d;
                    dq[at..at + rows * d].copy_from_slice(&tmp[..rows * d]);
                }
            }
            (dq, dk, dv)
        })
        .collect();

    let heads = nh + 2 * nkv;
    // dK/dV of a KV head: its group's partials summed in head order.
    let mut dk = vec![0.0f32; nkv * t * d];
    let mut dv = vec![0.0f32; nkv * t * d];
    for (h, (_, pk, pv)) in per_head.iter().enumerate() {
        let kh = h / group;
        let (k_acc, v_acc) = (
            &mut dk[kh * t * d..(kh + 1) * t * d],
            &mut dv[kh * t * d..(kh + 1) * t * d],
        );
        k_acc.iter_mut().zip(pk).for_each(|(a, b)| *a += b);
        v_acc.iter_mut().zip(pv).for_each(|(a, b)| *a += b);
    }
    ov.par_chunks_mut(heads * d)
        .enumerate()
        .for_each(|(i, row)| {
            for (h, (dq, _, _)) in per_head.iter().enumerate() {
                row[h * d..(h + 1) * d].copy_from_slice(&dq[i * d..(i + 1) * d]);
            }
            for kh in 0..nkv {
                let src = kh * t * d + i * d;
                row[(nh + kh) * d..(nh + kh + 1) * d].copy_from_slice(&dk[src..src + d]);
                row[(nh + nkv + kh) * d..(nh + nkv + kh + 1) * d]
                    .copy_from_slice(&dv[src..src + d]);
            }
        });
    Ok(())
}
