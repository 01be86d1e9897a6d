//! The unfused NLL of the loss pass (PyTorch `nll_loss`, mean over labels ≠ −100) and its
//! gradient. Training runs the fused `CrossEntropy` instead (the fuse pass rewrites
//! `Nll(LogSoftmax(z), y)`); these kernels exist so the unfused graph runs and the rewrite
//! can be checked against it.
use super::cross_entropy::{checked_labels, IGNORE};
use super::{f32s, f32s_mut};
use crate::backend::KernelError;
use crate::HostTensor;
use rayon::prelude::*;

/// `−mean_{t: y_t ≠ −100} logp[t, y_t]` → f32 scalar, summed in f64.
pub(crate) fn nll(
    logp: &HostTensor,
    labels: &HostTensor,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let name = "nll";
    let v = logp.ty.shape.dims()[1];
    let (y, count) = checked_labels(name, labels, v)?;
    let lp = f32s(name, logp)?;
    let total: f64 = y
        .iter()
        .enumerate()
        .filter(|(_, &l)| l != IGNORE)
        .map(|(t, &l)| -(lp[t * v + l as usize] as f64))
        .sum();
    f32s_mut(name, out)?[0] = (total / count as f64) as f32;
    Ok(())
}

/// `−g / count` at `[t, y_t]` of every valid row, zeros elsewhere.
pub(crate) fn nll_backward(
    logp: &HostTensor,
    labels: &HostTensor,
    g: &HostTensor,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let name = "nll_backward";
    let v = logp.ty.shape.dims()[1];
    let (y, count) = checked_labels(name, labels, v)?;
    let d = -(f32s(name, g)?[0] as f64 / count as f64) as f32;
    let o = f32s_mut(name, out)?;
    if v == 0 {
        return Ok(());
    }
    o.par_chunks_mut(v).zip(y.par_iter()).for_each(|(row, &l)| {
        row.fill(0.0);
        if l != IGNORE {
            row[l as usize] = d;
        }
    });
    Ok(())
}
