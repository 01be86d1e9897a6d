//! `Op::Dropout` on the CPU: the mask of `qplc_ops::dropout` (a pure function of seed, salt
//! and element index), kept values scaled by `1/(1−p)` in f32 as PyTorch's inverted dropout.
//! The same kernel runs the backward (the op applied to the gradient), so both see one mask.
use super::{f32s, f32s_mut};
use crate::backend::KernelError;
use crate::tensor::Data;
use crate::HostTensor;
use qplc_ops::dropout::{from_key_words, keeps_in, stream};
use rayon::prelude::*;

/// Elements per parallel task; the mask depends on the global index only, so the split
/// cannot change the result.
const CHUNK: usize = 1 << 14;

pub(crate) fn dropout(
    p: f64,
    salt: u64,
    x: &HostTensor,
    key: &HostTensor,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let name = "dropout";
    let words: [i32; 3] = match &key.data {
        Data::I32(v) if v.len() == 3 => [v[0], v[1], v[2]],
        _ => return Err(KernelError::new(name, "the key must be i32 [3]")),
    };
    let (seed, active) = from_key_words(words);
    let xs = f32s(name, x)?;
    let o = f32s_mut(name, out)?;
    if !active || p == 0.0 {
        o.copy_from_slice(xs);
        return Ok(());
    }
    let s = stream(seed, salt);
    let scale = (1.0 / (1.0 - p)) as f32;
    o.par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (o, xs))| {
            let base = (c * CHUNK) as u64;
            for (i, (o, &v)) in o.iter_mut().zip(xs).enumerate() {
                *o = if keeps_in(s, base + i as u64, p) {
                    v * scale
                } else {
                    0.0
                };
            }
        });
    Ok(())
}
