//! Causal grouped-query attention. Work is split into (query head, block of `QB` queries)
//! tasks; each computes its score block `Q_blk·K[lo..hi]ᵀ` with sgemm, masks and
//! softmaxes it row by row in f32 (max subtracted), and multiplies by `V[lo..hi]` with
//! sgemm, writing straight into the output rows of its head. Memory per task is `QB × T`
//! scores, never `T × T`.
use super::{f32s, f32s_mut};
use crate::backend::KernelError;
use crate::HostTensor;
use rayon::prelude::*;

/// Queries per task: large enough that the two products run at sgemm speed, small enough
/// that the wasted upper triangle of each diagonal block (QB²/2 scores) stays negligible.
const QB: usize = 64;

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: each task writes only the output rows of its own (head, query block), which are
// disjoint between tasks; the output slice outlives the parallel loop.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `q [T, nh, d]`, `k`/`v [T, nkv, d]` → `out [T, nh, d]`. Query head `h` reads KV head
/// `h / (nh / nkv)` (HF `repeat_kv`). Query `i` sees key `j` iff `j ≤ i` and, with a window
/// `w`, `i − j < w`. Scores are `scale · q·k`, then `c·tanh(s/c)` with a softcap.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    scale: f64,
    window: Option<usize>,
    softcap: Option<f64>,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let name = "attention";
    let qd = q.ty.shape.dims();
    let (t, nh, d) = (qd[0], qd[1], qd[2]);
    let nkv = k.ty.shape.dims()[1];
    let (qv, kv, vv) = (f32s(name, q)?, f32s(name, k)?, f32s(name, v)?);
    let ov = f32s_mut(name, out)?;
    if t == 0 || nh == 0 || d == 0 {
        return Ok(());
    }
    let group = nh / nkv;
    let scale = scale as f32;
    let cap = softcap.map(|c| c as f32);
    let blocks = t.div_ceil(QB);
    let optr = SendPtr(ov.as_mut_ptr());
    let olen = ov.len();
    (0..nh * blocks).into_par_iter().for_each(|task| {
        let (h, blk) = (task / blocks, task % blocks);
        let kh = h / group;
        let t0 = blk * QB;
        let t1 = (t0 + QB).min(t);
        let rows = t1 - t0;
        // Keys any query of the block may see.
        let first_key = |i: usize| window.map_or(0, |w| (i + 1).saturating_sub(w));
        let lo = first_key(t0);
        let n = t1 - lo;
        let mut s = vec![0.0f32; rows * n];
        // S = Q[t0..t1, h, :] · K[lo..t1, kh, :]ᵀ
        super::matmul::sgemm_serial(
            rows,
            d,
            n,
            &qv[(t0 * nh + h) * d..],
            (nh * d, 1),
            &kv[(lo * nkv + kh) * d..],
            (1, nkv * d),
            &mut s,
            (n, 1),
        );
        for (r, srow) in s.chunks_mut(n).enumerate() {
            let i = t0 + r;
            let (a, b) = (first_key(i) - lo, i - lo + 1);
            let row = &mut srow[a..b];
            row.iter_mut().for_each(|x| *x *= scale);
            if let Some(c) = cap {
                row.iter_mut().for_each(|x| *x = c * (*x / c).tanh());
            }
            let max = super::softmax::row_max(row);
            let inv = 1.0 / super::softmax::exp_shifted_sum(&mut srow[a..b], max);
            srow[a..b].iter_mut().for_each(|x| *x *= inv);
            srow[..a].fill(0.0);
            srow[b..].fill(0.0);
        }
        // O[t0..t1, h, :] = P · V[lo..t1, kh, :], written in place: rows t0..t1 of head h
        // belong to this task alone.
        let start = (t0 * nh + h) * d;
        debug_assert!(start + (rows - 1) * nh * d + d <= olen);
        // SAFETY: the last element written is ((t1−1)·nh + h)·d + d − 1 < T·nh·d = olen,
        // and no other task writes (head h, rows t0..t1).
        unsafe {
            super::matmul::sgemm_into_raw(
                rows,
                n,
                d,
                &s,
                (n, 1),
                &vv[(lo * nkv + kh) * d..],
                (nkv * d, 1),
                optr.get().add(start),
                (nh * d, 1),
            )
        };
    });
    Ok(())
}
