//! `RopeBackward`: rotary embedding's vector-Jacobian product. Each pair turns by angle
//! `θ = inv_freq·pos`; the rotation is orthogonal, so the gradient turns back by `−θ`. The
//! angles are built exactly as the forward kernel builds them (f32 product, f32 cos/sin).
use super::{f32s, f32s_mut};
use crate::backend::KernelError;
use crate::tensor::Data;
use crate::HostTensor;
use qplc_ops::Rope;
use rayon::prelude::*;

pub(crate) fn rope_backward(
    rope: &Rope,
    g: &HostTensor,
    pos: &HostTensor,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let name = "rope_backward";
    let dims = g.ty.shape.dims();
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
    let gv = f32s(name, g)?;
    let ov = f32s_mut(name, out)?;
    let row = heads * hd;
    if row == 0 {
        return Ok(());
    }
    ov.par_chunks_mut(row)
        .zip(gv.par_chunks(row))
        .zip(positions.par_iter())
        .for_each(|((o, g), &p)| {
            let p = p as f32;
            let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
                .iter()
                .map(|&f| {
                    let a = f * p;
                    (a.cos(), a.sin())
                })
                .unzip();
            // Forward (a, b) → (a·c − b·s, b·c + a·s); its transpose maps the gradient
            // (ga, gb) → (ga·c + gb·s, gb·c − ga·s).
            let pair = |i: usize| {
                if rope.interleaved {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + half)
                }
            };
            for (o, g) in o.chunks_mut(hd).zip(g.chunks(hd)) {
                for i in 0..half {
                    let (a, b) = pair(i);
                    let (ga, gb) = (g[a], g[b]);
                    o[a] = ga * cos[i] + gb * sin[i];
                    o[b] = gb * cos[i] - ga * sin[i];
                }
                o[2 * half..].copy_from_slice(&g[2 * half..]);
            }
        });
    Ok(())
}
