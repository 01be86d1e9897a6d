//! Fused cross-entropy (spec §7): log-softmax + NLL per row without materialising
//! probabilities. Each row's log-sum-exp is built from 65 536-wide vocabulary chunks whose
//! (max, Σexp) pairs are merged — the reference kernel's chunking, numerically the direct
//! formula (check 35) — with sums in f64. The backward writes `g·(softmax − onehot)/count`
//! into its own `[T, V]` output (the only buffer of the logits' size; the backend recycles
//! it) and zeros for rows whose label is −100.
use super::softmax::{fast_exp, row_max};
use super::{f32s, f32s_mut};
use crate::backend::KernelError;
use crate::tensor::Data;
use crate::HostTensor;
use rayon::prelude::*;

/// Vocabulary columns per chunk (spec §7).
pub(crate) const VOCAB_CHUNK: usize = 65_536;

/// PyTorch's `ignore_index`.
pub(crate) const IGNORE: i32 = -100;

/// `log Σ exp(row)`, chunk by chunk: each chunk contributes `(m_c, s_c = Σ exp(x − m_c))`
/// and the running pair is rescaled to the larger maximum.
pub(crate) fn row_logsumexp(row: &[f32]) -> f64 {
    let (mut m, mut s) = (f64::NEG_INFINITY, 0.0f64);
    for chunk in row.chunks(VOCAB_CHUNK) {
        let cm = row_max(chunk);
        let cs: f64 = chunk.iter().map(|&x| fast_exp(x - cm) as f64).sum();
        let cm = cm as f64;
        if cm > m {
            s = s * (m - cm).exp() + cs;
            m = cm;
        } else {
            s += cs * (cm - m).exp();
        }
    }
    m + s.ln()
}

/// Labels as integers, each −100 or a column of the logits; the number of valid ones.
pub(crate) fn checked_labels<'a>(
    name: &'static str,
    labels: &'a HostTensor,
    vocab: usize,
) -> Result<(&'a [i32], usize), KernelError> {
    let y = match &labels.data {
        Data::I32(v) => v.as_slice(),
        Data::F32(_) => return Err(KernelError::new(name, "labels must be integers")),
    };
    let mut count = 0;
    for (t, &l) in y.iter().enumerate() {
        if l == IGNORE {
            continue;
        }
        if l < 0 || l as usize >= vocab {
            return Err(KernelError::new(
                name,
                format!(
                    "label {l} at position {t} is outside the vocabulary 0..{vocab} (and not −100)"
                ),
            ));
        }
        count += 1;
    }
    if count == 0 {
        // spec §7 / check 34: a micro-batch with no valid labels is an error.
        return Err(KernelError::new(
            name,
            "All labels are masked (every shifted label is −100): the sequence has nothing to predict",
        ));
    }
    Ok((y, count))
}

/// `mean_{t: y_t ≠ −100} (logsumexp(z_t) − z_t[y_t])` → f32 scalar.
pub(crate) fn cross_entropy(
    logits: &HostTensor,
    labels: &HostTensor,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let name = "cross_entropy";
    let v = logits.ty.shape.dims()[1];
    let (y, count) = checked_labels(name, labels, v)?;
    let z = f32s(name, logits)?;
    let total: f64 = z
        .par_chunks(v.max(1))
        .zip(y.par_iter())
        .map(|(row, &l)| {
            if l == IGNORE {
                0.0
            } else {
                row_logsumexp(row) - row[l as usize] as f64
            }
        })
        .collect::<Vec<f64>>()
        .iter()
        .sum();
    f32s_mut(name, out)?[0] = (total / count as f64) as f32;
    Ok(())
}

/// `g · (softmax(z_t) − onehot(y_t)) / count` per valid row, zero rows elsewhere.
pub(crate) fn cross_entropy_backward(
    logits: &HostTensor,
    labels: &HostTensor,
    g: &HostTensor,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let name = "cross_entropy_backward";
    let v = logits.ty.shape.dims()[1];
    let (y, count) = checked_labels(name, labels, v)?;
    let z = f32s(name, logits)?;
    let scale = f32s(name, g)?[0] as f64 / count as f64;
    let o = f32s_mut(name, out)?;
    if v == 0 {
        return Ok(());
    }
    o.par_chunks_mut(v)
        .zip(z.par_chunks(v))
        .zip(y.par_iter())
        .for_each(|((o, row), &l)| {
            if l == IGNORE {
                o.fill(0.0);
                return;
            }
            // One exponential per logit: each chunk stores exp(x − m_c) while its sum is
            // taken, then is rescaled by exp(m_c − lse)·scale once lse is known (the
            // logsumexp is `row_logsumexp`'s, term for term).
            let (mut m, mut total) = (f64::NEG_INFINITY, 0.0f64);
            let mut maxima = Vec::with_capacity(v.div_ceil(VOCAB_CHUNK));
            for (oc, xc) in o.chunks_mut(VOCAB_CHUNK).zip(row.chunks(VOCAB_CHUNK)) {
                let cm = row_max(xc);
                oc.iter_mut()
                    .zip(xc)
                    .for_each(|(o, &x)| *o = fast_exp(x - cm));
                let cs: f64 = oc.iter().map(|&e| e as f64).sum();
                maxima.push(cm);
                let cm = cm as f64;
                if cm > m {
                    total = total * (m - cm).exp() + cs;
                    m = cm;
                } else {
                    total += cs * (cm - m).exp();
                }
            }
            let lse = m + total.ln();
            for (oc, &cm) in o.chunks_mut(VOCAB_CHUNK).zip(&maxima) {
                let f = ((cm as f64 - lse).exp() * scale) as f32;
                oc.iter_mut().for_each(|o| *o *= f);
            }
            o[l as usize] -= scale as f32;
        });
    Ok(())
}
