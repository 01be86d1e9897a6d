//! `Embedding`: rows of `table [V, H]` picked by integer ids. An id outside `0..V` is an
//! error naming the id and where it was, not a panic (tokenizers and models disagree on
//! vocabulary sizes often enough).
use super::{f32s, f32s_mut};
use crate::backend::KernelError;
use crate::tensor::Data;
use crate::HostTensor;
use rayon::prelude::*;

pub(crate) fn embedding(
    ids: &HostTensor,
    table: &HostTensor,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let name = "embedding";
    let ids = match &ids.data {
        Data::I32(v) => v,
        Data::F32(_) => return Err(KernelError::new(name, "ids must be integers")),
    };
    let (v, h) = (table.ty.shape.dims()[0], table.ty.shape.dims()[1]);
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
    let tv = f32s(name, table)?;
    let ov = f32s_mut(name, out)?;
    if h == 0 {
        return Ok(());
    }
    ov.par_chunks_mut(h)
        .zip(ids.par_iter())
        .for_each(|(o, &id)| o.copy_from_slice(&tv[id as usize * h..(id as usize + 1) * h]));
    Ok(())
}
