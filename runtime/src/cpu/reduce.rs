//! `Reduce` (sum, mean, max) along one axis; sums accumulate in f64.
use super::{f32s, f32s_mut};
use crate::backend::KernelError;
use crate::HostTensor;
use qplc_ops::ReduceOp;
use rayon::prelude::*;

/// Views the input as `[outer, len, inner]` around `axis`; output element
/// `(o, i)` reduces `x[o, ·, i]`. `keepdim` only changes the output's shape, not its data.
pub(crate) fn reduce(
    op: ReduceOp,
    axis: usize,
    x: &HostTensor,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let name = "reduce";
    let dims = x.ty.shape.dims();
    let len = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let xv = f32s(name, x)?;
    let ov = f32s_mut(name, out)?;
    if ov.is_empty() {
        return Ok(());
    }
    if len == 0 && op == ReduceOp::Max {
        return Err(KernelError::new(
            "reduce_max",
            format!("axis {axis} of {} is empty", x.ty.shape),
        ));
    }
    ov.par_iter_mut()
        .enumerate()
        .with_min_len(256)
        .for_each(|(idx, o)| {
            let (oi, ii) = (idx / inner, idx % inner);
            let base = oi * len * inner + ii;
            let it = (0..len).map(|a| xv[base + a * inner]);
            *o = match op {
                ReduceOp::Sum => it.map(|v| v as f64).sum::<f64>() as f32,
                ReduceOp::Mean => (it.map(|v| v as f64).sum::<f64>() / len as f64) as f32,
                ReduceOp::Max => it.fold(f32::NEG_INFINITY, f32::max),
            };
        });
    Ok(())
}
