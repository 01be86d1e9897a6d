//! Data movement: `Reshape`, `Transpose` (any permutation), `Slice`, `Concat`, and `Cast`.
//! Generic over the element type, so integer tensors (ids, positions) move the same way.
use crate::backend::KernelError;
use crate::tensor::Data;
use crate::HostTensor;
use rayon::prelude::*;

/// Elements per rayon task for plain copies.
const CHUNK: usize = 1 << 14;

fn mismatch(op: &'static str) -> KernelError {
    KernelError::new(op, "operand and output storage kinds differ")
}

/// Runs `f` on the operand's and output's storage when both are float or both integer.
macro_rules! same_kind {
    ($op:expr, $x:expr, $out:expr, |$a:ident, $o:ident| $body:expr) => {
        match (&$x.data, &mut $out.data) {
            (Data::F32($a), Data::F32($o)) => Ok($body),
            (Data::I32($a), Data::I32($o)) => Ok($body),
            _ => Err(mismatch($op)),
        }
    };
}

fn copy<T: Copy + Send + Sync>(x: &[T], out: &mut [T]) {
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| o.copy_from_slice(x));
}

pub(crate) fn reshape(x: &HostTensor, out: &mut HostTensor) -> Result<(), KernelError> {
    same_kind!("reshape", x, out, |a, o| copy(a, o))
}

pub(crate) fn transpose(
    x: &HostTensor,
    perm: &[usize],
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let in_strides = x.ty.shape.strides();
    let dims = out.ty.shape.dims().to_vec();
    // Stride in the input of each output axis.
    let st: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let identity = perm.iter().enumerate().all(|(i, &p)| i == p);
    same_kind!("transpose", x, out, |a, o| if identity {
        copy(a, o)
    } else {
        permute(a, &dims, &st, o)
    })
}

fn permute<T: Copy + Send + Sync>(x: &[T], dims: &[usize], st: &[usize], out: &mut [T]) {
    let rank = dims.len();
    if out.is_empty() || rank == 0 {
        out.copy_from_slice(x);
        return;
    }
    let l = dims[rank - 1];
    let inner = st[rank - 1];
    out.par_chunks_mut(l)
        .enumerate()
        .with_min_len((CHUNK / l.max(1)).max(1))
        .for_each(|(r, o)| {
            let (mut off, mut rem) = (0, r);
            for ax in (0..rank - 1).rev() {
                off += (rem % dims[ax]) * st[ax];
                rem /= dims[ax];
            }
            for (j, o) in o.iter_mut().enumerate() {
                *o = x[off + j * inner];
            }
        });
}

/// `[outer, len, inner]` around `axis`.
fn around(dims: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        dims[..axis].iter().product(),
        dims[axis],
        dims[axis + 1..].iter().product(),
    )
}

pub(crate) fn slice(
    x: &HostTensor,
    axis: usize,
    start: usize,
    end: usize,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let (_, len, inner) = around(x.ty.shape.dims(), axis);
    let block = (end - start) * inner;
    same_kind!("slice", x, out, |a, o| if block > 0 {
        o.par_chunks_mut(block).enumerate().for_each(|(i, o)| {
            let s = (i * len + start) * inner;
            o.copy_from_slice(&a[s..s + block]);
        })
    })
}

pub(crate) fn concat(
    xs: &[&HostTensor],
    axis: usize,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let (_, total, inner) = around(out.ty.shape.dims(), axis);
    let row = total * inner;
    if row == 0 {
        return Ok(());
    }
    let mut offset = 0;
    for x in xs {
        let block = x.ty.shape.dims()[axis] * inner;
        if block > 0 {
            same_kind!("concat", x, out, |a, o| o
                .par_chunks_mut(row)
                .zip(a.par_chunks(block))
                .for_each(|(o, a)| o[offset..offset + block].copy_from_slice(a)))?;
        }
        offset += block;
    }
    Ok(())
}

/// Float → float copies the values (the backend rounds them to the target dtype after every
/// op); float → integer truncates toward zero, saturating, as `tensor.to(torch.int32)`;
/// integer → float converts exactly up to 2²⁴, then rounds.
pub(crate) fn cast(x: &HostTensor, out: &mut HostTensor) -> Result<(), KernelError> {
    match (&x.data, &mut out.data) {
        (Data::F32(a), Data::F32(o)) => copy(a, o),
        (Data::I32(a), Data::I32(o)) => copy(a, o),
        (Data::F32(a), Data::I32(o)) => o
            .par_iter_mut()
            .zip(a.par_iter())
            .for_each(|(o, &a)| *o = a as i32),
        (Data::I32(a), Data::F32(o)) => o
            .par_iter_mut()
            .zip(a.par_iter())
            .for_each(|(o, &a)| *o = a as f32),
    }
    Ok(())
}
