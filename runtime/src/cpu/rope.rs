//! Rotary position embedding. cos/sin are built the way transformers builds them
//! (`LlamaRotaryEmbedding.forward`): `freqs = inv_freq · position` as an f32 product, then
//! `cos`/`sin` in f32, so our angles agree with HF bit for bit up to the last ulp of cos/sin.
use super::{f32s, f32s_mut};
use crate::backend::KernelError;
use crate::tensor::Data;
use crate::HostTensor;
use qplc_ops::Rope;
use rayon::prelude::*;

/// `x [T, heads, head_dim]` rotated at positions `pos [T]`. Only the first `rotary_dim`
/// features of each head turn; the rest pass through (partial rotary, e.g. Phi).
pub(crate) fn rope(
    rope: &Rope,
    x: &HostTensor,
    pos: &HostTensor,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    rotate("rope", rope, x, pos, out, false)
}

/// Turns every pair by `θ = inv_freq·pos`, or by `−θ` when `inverse` (the rotation is
/// orthogonal, so that is also its vector-Jacobian product). Negating `sin` is exact, so
/// the inverse uses the very same angles as the forward.
pub(crate) fn rotate(
    name: &'static str,
    rope: &Rope,
    x: &HostTensor,
    pos: &HostTensor,
    out: &mut HostTensor,
    inverse: bool,
) -> Result<(), KernelError> {
    let dims = x.ty.shape.dims();
    let (heads, hd) = (dims[1], dims[2]);
    let positions = match &pos.data {
        Data::I32(p) => p,
        Data::F32(_) => return Err(KernelError::new(name, "positions must be integers")),
    };
    if let Some((i, p)) = positions.iter().enumerate().find(|(_, &p)| p < 0) {
        return Err(KernelError::new(
            name,
            format!("position {p} at index {i} is negative"),
        ));
    }
    let inv_freq: Vec<f32> = rope.inv_freq().iter().map(|&f| f as f32).collect();
    let half = rope.rotary_dim / 2;
    let xv = f32s(name, x)?;
    let ov = f32s_mut(name, out)?;
    let row = heads * hd;
    if row == 0 {
        return Ok(());
    }
    ov.par_chunks_mut(row)
        .zip(xv.par_chunks(row))
        .zip(positions.par_iter())
        .for_each(|((o, x), &p)| {
            let p = p as f32;
            let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
                .iter()
                .map(|&f| {
                    let a = f * p;
                    (a.cos(), if inverse { -a.sin() } else { a.sin() })
                })
                .unzip();
            for (o, x) in o.chunks_mut(hd).zip(x.chunks(hd)) {
                if rope.interleaved {
                    // Pairs (x[2i], x[2i+1]) turn by angle i (GPT-J / Cohere layout).
                    for i in 0..half {
                        let (a, b) = (x[2 * i], x[2 * i + 1]);
                        o[2 * i] = a * cos[i] - b * sin[i];
                        o[2 * i + 1] = b * cos[i] + a * sin[i];
                    }
                } else {
                    // HF: x·cos + rotate_half(x)·sin with rotate_half(x) = [−x₂, x₁] and
                    // cos/sin repeated over both halves.
                    for i in 0..half {
                        let (a, b) = (x[i], x[i + half]);
                        o[i] = a * cos[i] - b * sin[i];
                        o[i + half] = b * cos[i] + a * sin[i];
                    }
                }
                o[2 * half..].copy_from_slice(&x[2 * half..]);
            }
        });
    Ok(())
}
