//! `EmbeddingBackward`: the gradient of an embedding table is the scatter-add of the
//! output gradient rows into the rows their ids picked (a token seen twice gets both).
//! Parallel over table rows, each summing its positions in sequence order: the result does
//! not depend on the thread count.
use super::{f32s, f32s_mut};
use crate::backend::KernelError;
use crate::tensor::Data;
use crate::HostTensor;
use rayon::prelude::*;

pub(crate) fn embedding_backward(
    ids: &HostTensor,
    g: &HostTensor,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let name = "embedding_backward";
    let ids = match &ids.data {
        Data::I32(v) => v,
        Data::F32(_) => return Err(KernelError::new(name, "ids must be integers")),
    };
    let (v, h) = (out.ty.shape.dims()[0], out.ty.shape.dims()[1]);
    if let Some((i, &id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id < 0 || id as usize >= v)
    {
        return Err(KernelError::new(
            name,
            format!("token id {id} at position {i} is outside the vocabulary 0..{v}"),
        ));
    }
    let gv = f32s(name, g)?;
    let ov = f32s_mut(name, out)?;
    if h == 0 {
        return Ok(());
    }
    // Positions grouped by id (a stable sort keeps them in sequence order).
    let mut by_id: Vec<(i32, usize)> = ids.iter().enumerate().map(|(p, &id)| (id, p)).collect();
    by_id.sort_by_key(|&(id, _)| id);
    let mut start = vec![0usize; v + 1];
    for &(id, _) in &by_id {
        start[id as usize + 1] += 1;
    }
    for r in 0..v {
        start[r + 1] += start[r];
    }
    ov.par_chunks_mut(h)
        .enumerate()
        .with_min_len(64)
        .for_each(|(r, row)| {
            row.fill(0.0);
            for &(_, p) in &by_id[start[r]..start[r + 1]] {
                row.iter_mut()
                    .zip(&gv[p * h..(p + 1) * h])
                    .for_each(|(d, s)| *d += s);
            }
        });
    Ok(())
}
