//! The CPU reference backend (DESIGN.md "Runtime"): every op of `qplc_ops::Op` on host
//! tensors, multi-threaded with rayon, f32 accumulation, and rounding of bf16/f16 results
//! so that it reproduces what low-precision storage does to the numbers.
//!
//! One file per op family; this file checks operands against `Op::infer` and dispatches.
mod attention;
mod attention_backward;
mod cross_entropy;
mod dropout;
mod elementwise;
mod elementwise_backward;
mod embedding;
mod embedding_backward;
mod fused;
mod in_place;
mod layout;
mod matmul;
mod nll;
mod norm;
mod norm_backward;
mod pool;
mod reduce;
mod rope;
mod rope_backward;
mod softmax;

pub use matmul::sgemm;

use crate::backend::{Backend, InPlace, KernelError};
use crate::tensor::{Data, HostTensor};
use half::{bf16, f16};
use qplc_ops::{DType, Op, TensorType};
use rayon::prelude::*;
use std::sync::Arc;

/// Host tensors as buffers; kernels run on rayon's global pool or on a private pool of a
/// chosen size. Clones share their threads and their recycled buffers.
#[derive(Clone, Default)]
pub struct CpuBackend {
    pool: Option<Arc<rayon::ThreadPool>>,
    buffers: Arc<pool::Pool>,
}

impl CpuBackend {
    /// Uses rayon's global thread pool (all cores unless `RAYON_NUM_THREADS` says otherwise).
    pub fn new() -> Self {
        CpuBackend::default()
    }

    /// Uses a private pool of `threads` threads.
    pub fn with_threads(threads: usize) -> Result<Self, KernelError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| KernelError::new("cpu", format!("cannot start {threads} threads: {e}")))?;
        Ok(CpuBackend {
            pool: Some(Arc::new(pool)),
            buffers: Arc::default(),
        })
    }

    pub fn threads(&self) -> usize {
        match &self.pool {
            Some(p) => p.current_num_threads(),
            None => rayon::current_num_threads(),
        }
    }

    /// Infers the output type, allocates it and executes `op`: the one-call form for tests
    /// and for code that evaluates single ops.
    pub fn eval(&self, op: &Op, operands: &[&HostTensor]) -> Result<HostTensor, KernelError> {
        let tys: Vec<TensorType> = operands.iter().map(|t| t.ty.clone()).collect();
        let ty = op
            .infer(&tys)
            .map_err(|e| KernelError::new(op.name(), e.to_string()))?;
        let mut out = HostTensor::zeros(&ty);
        self.execute(op, operands, &mut out)?;
        Ok(out)
    }
}

impl Backend for CpuBackend {
    type Buffer = HostTensor;

    fn name(&self) -> String {
        format!("cpu({} threads)", self.threads())
    }

    fn alloc(&self, ty: &TensorType) -> Result<HostTensor, KernelError> {
        if ty.dtype == DType::NF4 {
            return Err(KernelError::new(
                "alloc",
                "nf4 tensors have no host representation in the CPU backend",
            ));
        }
        Ok(HostTensor {
            ty: ty.clone(),
            data: self.buffers.take(ty.dtype.is_float(), ty.shape.numel()),
        })
    }

    fn execute_in_place(
        &self,
        op: &Op,
        target: usize,
        mut buf: HostTensor,
        others: &[&HostTensor],
        out_ty: &TensorType,
    ) -> Result<InPlace<HostTensor>, KernelError> {
        let mut run = || in_place::execute(op, target, &mut buf, others, out_ty);
        let done = match &self.pool {
            Some(p) => p.install(run),
            None => run(),
        }?;
        Ok(if done {
            InPlace::Done(buf)
        } else {
            InPlace::Declined(buf)
        })
    }

    fn release(&self, buf: HostTensor) {
        self.buffers.give(buf.data);
    }

    fn upload(&self, t: &HostTensor) -> Result<HostTensor, KernelError> {
        check_storage("upload", "tensor", t)?;
        Ok(t.clone())
    }

    fn download(&self, buf: &HostTensor) -> Result<HostTensor, KernelError> {
        Ok(buf.clone())
    }

    fn download_owned(&self, buf: HostTensor) -> Result<HostTensor, KernelError> {
        Ok(buf)
    }

    fn buffer_type<'a>(&self, buf: &'a HostTensor) -> &'a TensorType {
        &buf.ty
    }

    fn execute(
        &self,
        op: &Op,
        operands: &[&HostTensor],
        out: &mut HostTensor,
    ) -> Result<(), KernelError> {
        match &self.pool {
            Some(p) => p.install(|| execute_op(op, operands, out)),
            None => execute_op(op, operands, out),
        }
    }
}

/// A host tensor's storage must agree with its dtype (floats as f32, integers as i32) and
/// its length with its shape; kernels index on that assumption.
fn check_storage(op: &'static str, what: &str, t: &HostTensor) -> Result<(), KernelError> {
    let (ok_kind, len) = match &t.data {
        Data::F32(v) => (t.ty.dtype.is_float(), v.len()),
        Data::I32(v) => (t.ty.dtype.is_int(), v.len()),
    };
    if !ok_kind {
        return Err(KernelError::new(
            op,
            format!("{what} of type {} holds the wrong kind of storage", t.ty),
        ));
    }
    if len != t.ty.shape.numel() {
        return Err(KernelError::new(
            op,
            format!("{what} of type {} holds {len} elements", t.ty),
        ));
    }
    Ok(())
}

/// Executes `op` on host tensors after checking that the operands are what the op accepts
/// and that `out` has the inferred type.
pub fn execute_op(
    op: &Op,
    operands: &[&HostTensor],
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let name = op.name();
    let tys: Vec<TensorType> = operands.iter().map(|t| t.ty.clone()).collect();
    let ty = op
        .infer(&tys)
        .map_err(|e| KernelError::new(name, e.to_string()))?;
    if ty != out.ty {
        return Err(KernelError::new(
            name,
            format!("output buffer is {} but the op produces {ty}", out.ty),
        ));
    }
    for (i, t) in operands.iter().enumerate() {
        check_storage(name, &format!("operand {i}"), t)?;
    }
    check_storage(name, "output", out)?;

    let dtype = out.ty.dtype;
    let mut moves_data_only = false;
    match op {
        Op::Input { name: n, .. } | Op::Weight { name: n, .. } => {
            return Err(KernelError::new(
                name,
                format!("`{n}` is bound by the executor, not computed"),
            ))
        }
        Op::Fill { value, .. } => match &mut out.data {
            Data::F32(v) => v.par_iter_mut().for_each(|x| *x = *value as f32),
            Data::I32(v) => v.par_iter_mut().for_each(|x| *x = *value as i32),
        },
        Op::Linear => {
            let x = operands[0];
            let w = operands[1];
            let bias = operands.get(2).map(|b| f32s(name, b)).transpose()?;
            let (rows, k) = (x.ty.shape.rows(), x.ty.shape.last());
            let n = w.ty.shape.dims()[0];
            matmul::linear(
                rows,
                k,
                n,
                f32s(name, x)?,
                f32s(name, w)?,
                bias,
                f32s_mut(name, out)?,
            );
        }
        Op::MatMul { ta, tb } => {
            matmul::batched(*ta, *tb, operands[0], operands[1], out)?;
            // The accumulated operand joins the f32 product before the executor's one
            // rounding to the output type, as a GEMM epilogue with beta = 1 does.
            if let Some(c) = operands.get(2) {
                let c = f32s(name, c)?;
                f32s_mut(name, out)?
                    .par_iter_mut()
                    .zip(c.par_iter())
                    .for_each(|(o, c)| *o += c);
            }
        }
        Op::Embedding => embedding::embedding(operands[0], operands[1], out)?,
        Op::RmsNorm { eps, offset } => {
            let x = operands[0];
            norm::rms_norm(
                f32s(name, x)?,
                f32s(name, operands[1])?,
                *eps,
                *offset,
                x.ty.shape.last(),
                f32s_mut(name, out)?,
            );
        }
        Op::LayerNorm { eps } => {
            let x = operands[0];
            norm::layer_norm(
                f32s(name, x)?,
                f32s(name, operands[1])?,
                operands.get(2).map(|b| f32s(name, b)).transpose()?,
                *eps,
                x.ty.shape.last(),
                f32s_mut(name, out)?,
            );
        }
        Op::Rope(rope) => rope::rope(rope, operands[0], operands[1], out)?,
        Op::Attention {
            scale,
            sliding_window,
            softcap,
        } => attention::attention(
            operands[0],
            operands[1],
            operands[2],
            *scale,
            *sliding_window,
            *softcap,
            out,
        )?,
        Op::Unary(u) => elementwise::unary(*u, f32s(name, operands[0])?, f32s_mut(name, out)?),
        Op::Binary(b) => elementwise::binary(*b, operands[0], operands[1], out)?,
        Op::Scale { factor } => {
            let f = *factor as f32;
            elementwise::map(f32s(name, operands[0])?, f32s_mut(name, out)?, |x| x * f);
        }
        Op::AddScalar { value } => {
            let c = *value as f32;
            elementwise::map(f32s(name, operands[0])?, f32s_mut(name, out)?, |x| x + c);
        }
        Op::Softcap { cap } => {
            let c = *cap as f32;
            elementwise::map(f32s(name, operands[0])?, f32s_mut(name, out)?, |x| {
                c * (x / c).tanh()
            });
        }
        Op::Softmax => softmax::softmax(
            f32s(name, operands[0])?,
            operands[0].ty.shape.last(),
            f32s_mut(name, out)?,
        ),
        Op::LogSoftmax => softmax::log_softmax(
            f32s(name, operands[0])?,
            operands[0].ty.shape.last(),
            f32s_mut(name, out)?,
        ),
        Op::Reduce { op: r, axis, .. } => reduce::reduce(*r, *axis, operands[0], out)?,
        Op::Reshape { .. } => {
            moves_data_only = true;
            layout::reshape(operands[0], out)?;
        }
        Op::Transpose { perm } => {
            moves_data_only = true;
            layout::transpose(operands[0], perm, out)?;
        }
        Op::Slice { axis, start, end } => {
            moves_data_only = true;
            layout::slice(operands[0], *axis, *start, *end, out)?;
        }
        Op::Concat { axis } => {
            moves_data_only = true;
            layout::concat(operands, *axis, out)?;
        }
        Op::Cast { .. } => layout::cast(operands[0], out)?,
        Op::CrossEntropy => cross_entropy::cross_entropy(operands[0], operands[1], out)?,
        Op::CrossEntropyBackward => {
            cross_entropy::cross_entropy_backward(operands[0], operands[1], operands[2], out)?
        }
        Op::UnaryBackward(u) => {
            elementwise_backward::unary_backward(*u, operands[0], operands[1], out)?
        }
        Op::BinaryBackward { op: b, wrt } => elementwise_backward::binary_backward(
            *b,
            *wrt,
            operands[0],
            operands[1],
            operands[2],
            out,
        )?,
        Op::EmbeddingBackward { .. } => {
            embedding_backward::embedding_backward(operands[0], operands[1], out)?
        }
        Op::RmsNormBackward { eps, offset } => {
            let x = operands[0];
            norm_backward::rms_norm_backward(
                f32s(name, x)?,
                f32s(name, operands[1])?,
                f32s(name, operands[2])?,
                *eps,
                *offset,
                x.ty.shape.last(),
                f32s_mut(name, out)?,
            );
        }
        Op::RmsNormWeightGrad { eps } => {
            let x = operands[0];
            norm_backward::rms_norm_weight_grad(
                f32s(name, x)?,
                f32s(name, operands[1])?,
                *eps,
                x.ty.shape.last(),
                f32s_mut(name, out)?,
            );
        }
        Op::LayerNormBackward { eps } => {
            let x = operands[0];
            norm_backward::layer_norm_backward(
                f32s(name, x)?,
                f32s(name, operands[1])?,
                f32s(name, operands[2])?,
                *eps,
                x.ty.shape.last(),
                f32s_mut(name, out)?,
            );
        }
        Op::LayerNormWeightGrad { eps } => {
            let x = operands[0];
            norm_backward::layer_norm_weight_grad(
                f32s(name, x)?,
                f32s(name, operands[1])?,
                *eps,
                x.ty.shape.last(),
                f32s_mut(name, out)?,
            );
        }
        Op::RopeBackward(rope) => {
            rope_backward::rope_backward(rope, operands[0], operands[1], out)?
        }
        Op::AttentionBackward {
            scale,
            sliding_window,
            softcap,
        } => attention_backward::attention_backward(
            operands[0],
            operands[1],
            operands[2],
            operands[3],
            *scale,
            *sliding_window,
            *softcap,
            out,
        )?,
        Op::Nll => nll::nll(operands[0], operands[1], out)?,
        Op::NllBackward => nll::nll_backward(operands[0], operands[1], operands[2], out)?,
        Op::Dropout { p, salt } => dropout::dropout(*p, *salt, operands[0], operands[1], out)?,
        Op::Fused { steps } => fused::fused(op, steps, operands, out)?,
    }
    // Data movement of already-rounded values cannot change them; everything else
    // computed in f32 is rounded to the storage dtype here, once, for every op.
    if !moves_data_only {
        if let Data::F32(v) = &mut out.data {
            round_in_place(v, dtype);
        }
    }
    Ok(())
}

/// Rounds to the precision of `dtype` in place (identity for f32), with the same
/// round-to-nearest-even as `crate::tensor::round_to`.
pub fn round_in_place(v: &mut [f32], dtype: DType) {
    match dtype {
        DType::BF16 => v
            .par_chunks_mut(1 << 14)
            .for_each(|c| c.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32())),
        DType::F16 => v
            .par_chunks_mut(1 << 14)
            .for_each(|c| c.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32())),
        _ => {}
    }
}

/// Float storage of an operand; `Op::infer` checks only some operands' dtypes (a Linear's
/// weight may be anything), so every kernel asks through here.
pub(crate) fn f32s<'a>(op: &'static str, t: &'a HostTensor) -> Result<&'a [f32], KernelError> {
    match &t.data {
        Data::F32(v) => Ok(v),
        Data::I32(_) => Err(KernelError::new(
            op,
            format!("expects a float tensor, got {}", t.ty),
        )),
    }
}

pub(crate) fn f32s_mut<'a>(
    op: &'static str,
    t: &'a mut HostTensor,
) -> Result<&'a mut [f32], KernelError> {
    match &mut t.data {
        Data::F32(v) => Ok(v),
        Data::I32(_) => Err(KernelError::new(
            op,
            format!("expects a float output, got {}", t.ty),
        )),
    }
}
