//! `Backend::execute` for CUDA: checks the operands against `Op::infer` (as the CPU backend
//! does), launches the op's kernels or cuBLAS call, and rounds bf16/f16 results once.
//!
//! Values that decide whether an op is valid at all (token ids, positions, labels, integer
//! divisors) are small integer tensors; they are copied to the host and checked there, so
//! bad data gives the CPU backend's error message rather than a device fault.
use super::launch::{launch, Strided};
use super::{cuda_err, CudaBackend, CudaTensor, DevData};
use crate::backend::KernelError;
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, PushKernelArg};
use qplc_ops::{BinaryOp, DType, Op, ReduceOp, Rope, TensorType, UnaryOp};

/// `qplc_ops::UnaryOp` → the op code of `unary_fn` in kernels.cu.
fn unary_code(u: UnaryOp) -> i32 {
    match u {
        UnaryOp::Neg => 0,
        UnaryOp::Exp => 1,
        UnaryOp::Log => 2,
        UnaryOp::Tanh => 3,
        UnaryOp::Sqrt => 4,
        UnaryOp::Rsqrt => 5,
        UnaryOp::Recip => 6,
        UnaryOp::Square => 7,
        UnaryOp::Relu => 8,
        UnaryOp::Sigmoid => 9,
        UnaryOp::Silu => 10,
        UnaryOp::Gelu => 11,
        UnaryOp::GeluTanh => 12,
    }
}

fn binary_code(b: BinaryOp) -> i32 {
    match b {
        BinaryOp::Add => 0,
        BinaryOp::Sub => 1,
        BinaryOp::Mul => 2,
        BinaryOp::Div => 3,
        BinaryOp::Max => 4,
        BinaryOp::Min => 5,
    }
}

/// PyTorch's `ignore_index`.
const IGNORE: i32 = -100;

pub(crate) fn execute(
    be: &CudaBackend,
    op: &Op,
    operands: &[&CudaTensor],
    out: &mut CudaTensor,
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
    let n = out.ty.shape.numel();
    let nn = n as i64;
    let mut moves_data_only = false;
    match op {
        Op::Input { name: v, .. } | Op::Weight { name: v, .. } => {
            return Err(KernelError::new(
                name,
                format!("`{v}` is bound by the executor, not computed"),
            ))
        }
        // Added to the op vocabulary after this backend's first step; the fuse pass removes
        // Nll/NllBackward from compiled plans, and dropout needs its counter-hash kernel here.
        Op::Nll | Op::NllBackward | Op::Dropout { .. } => {
            return Err(KernelError::new(
                name,
                "not implemented on the CUDA backend yet (issue 6); use --backend cpu",
            ))
        }
        Op::Fill { value, .. } => match &mut out.data {
            DevData::F32(s) => be.fill_f32(s, n, *value as f32)?,
            DevData::I32(s) => be.fill_i32(s, n, *value as i32)?,
        },
        Op::Linear => {
            let x = operands[0];
            let w = operands[1];
            let (rows, k) = (x.ty.shape.rows(), x.ty.shape.last());
            let nout = w.ty.shape.dims()[0];
            // out[rows, n] = x · wᵀ: matmul with `b = w` transposed.
            gemm(
                be,
                name,
                (false, true),
                (rows, k, nout),
                (k, k),
                1,
                (0, 0),
                x.f32(name)?,
                w.f32(name)?,
                out.f32_mut(name)?,
            )?;
            if let Some(b) = operands.get(2) {
                let (r, c) = (rows as i64, nout as i64);
                let o = out.f32_mut(name)?;
                launch!(be, "bias_rows_f32", n; o, b.f32(name)?, &r, &c)?;
            }
        }
        Op::MatMul { ta, tb } => {
            let (a, b) = (operands[0], operands[1]);
            let ad = a.ty.shape.dims();
            let bd = b.ty.shape.dims();
            let r = ad.len();
            let (ar, ac) = (ad[r - 2], ad[r - 1]);
            let (br, bc) = (bd[r - 2], bd[r - 1]);
            let (m, k) = if *ta { (ac, ar) } else { (ar, ac) };
            let nn_ = if *tb { br } else { bc };
            let batch: usize = ad[..r - 2].iter().product();
            gemm(
                be,
                name,
                (*ta, *tb),
                (m, k, nn_),
                (ac, bc),
                batch,
                (ar * ac, br * bc),
                a.f32(name)?,
                b.f32(name)?,
                out.f32_mut(name)?,
            )?;
        }
        Op::Embedding => {
            let (ids, table) = (operands[0], operands[1]);
            let (v, h) = (table.ty.shape.dims()[0], table.ty.shape.dims()[1]);
            check_ids(be, name, ids, v)?;
            let (t, hh) = (ids.ty.shape.numel() as i64, h as i64);
            let o = out.f32_mut(name)?;
            launch!(be, "embedding_f32", n; ids.i32(name)?, table.f32(name)?, o, &t, &hh)?;
        }
        Op::RmsNorm { eps, offset } => {
            let (rows, h) = rows_h(operands[0]);
            let (eps, offset) = (*eps as f32, *offset as f32);
            let o = out.f32_mut(name)?;
            launch!(be, "rms_norm_f32", rows as usize;
                operands[0].f32(name)?, operands[1].f32(name)?, o, &rows, &h, &eps, &offset)?;
        }
        Op::LayerNorm { eps } => {
            let (rows, h) = rows_h(operands[0]);
            let w = operands[1].f32(name)?;
            let (b, has_b) = match operands.get(2) {
                Some(b) => (b.f32(name)?, 1i32),
                None => (w, 0i32),
            };
            let o = out.f32_mut(name)?;
            launch!(be, "layer_norm_f32", rows as usize;
                operands[0].f32(name)?, w, b, &has_b, o, &rows, &h, eps)?;
        }
        Op::Rope(rope) => rotate(be, name, rope, operands[0], operands[1], out, 1.0)?,
        Op::RopeBackward(rope) => rotate(be, name, rope, operands[0], operands[1], out, -1.0)?,
        Op::Attention {
            scale,
            sliding_window,
            softcap,
        } => {
            let a = AttnArgs::new(operands, *scale, *sliding_window, *softcap);
            let o = out.f32_mut(name)?;
            let (q, k, v) = (
                operands[0].f32(name)?,
                operands[1].f32(name)?,
                operands[2].f32(name)?,
            );
            launch!(be, "attention_f32", (a.t * a.nh * a.d) as usize;
                q, k, v, o, &a.t, &a.nh, &a.nkv, &a.d, &a.scale, &a.window, &a.cap)?;
        }
        Op::AttentionBackward {
            scale,
            sliding_window,
            softcap,
        } => {
            let a = AttnArgs::new(operands, *scale, *sliding_window, *softcap);
            let (q, k, v, g) = (
                operands[0].f32(name)?,
                operands[1].f32(name)?,
                operands[2].f32(name)?,
                operands[3].f32(name)?,
            );
            let rows = (a.t * a.nh) as usize;
            let mut stats = be.raw::<f32>(rows * 3)?;
            launch!(be, "attention_stats_f32", rows;
                q, k, v, g, &mut stats, &a.t, &a.nh, &a.nkv, &a.d, &a.scale, &a.window, &a.cap)?;
            let o = out.f32_mut(name)?;
            launch!(be, "attention_dq_f32", rows * a.d as usize;
                q, k, v, g, &stats, &mut *o, &a.t, &a.nh, &a.nkv, &a.d, &a.scale, &a.window, &a.cap)?;
            launch!(be, "attention_dkv_f32", (a.t * a.nkv * a.d) as usize;
                q, k, v, g, &stats, o, &a.t, &a.nh, &a.nkv, &a.d, &a.scale, &a.window, &a.cap)?;
        }
        Op::Unary(u) => {
            let code = unary_code(*u);
            let o = out.f32_mut(name)?;
            launch!(be, "unary_f32", n; operands[0].f32(name)?, o, &nn, &code)?;
        }
        Op::UnaryBackward(u) => {
            let code = unary_code(*u);
            let o = out.f32_mut(name)?;
            launch!(be, "unary_backward_f32", n;
                operands[0].f32(name)?, operands[1].f32(name)?, o, &nn, &code)?;
        }
        Op::Scale { factor } => scalar_map(be, name, operands[0], out, 0, *factor as f32)?,
        Op::AddScalar { value } => scalar_map(be, name, operands[0], out, 1, *value as f32)?,
        Op::Softcap { cap } => scalar_map(be, name, operands[0], out, 2, *cap as f32)?,
        Op::Binary(b) => {
            let (x, y) = (operands[0], operands[1]);
            let s = Strided::broadcast(name, &x.ty.shape, &y.ty.shape, &out.ty.shape)?;
            let code = binary_code(*b);
            match (&x.data, &y.data, &mut out.data) {
                (DevData::F32(a), DevData::F32(bb), DevData::F32(o)) => {
                    launch!(be, "binary_f32", n; a, bb, o, &nn, &s, &code)?
                }
                (DevData::I32(a), DevData::I32(bb), DevData::I32(o)) => {
                    if *b == BinaryOp::Div {
                        let host = be.stream.clone_dtoh(&bb.slice(..y.ty.shape.numel()));
                        let host = host.map_err(|e| cuda_err(name, "download divisor", e))?;
                        if host.contains(&0) {
                            return Err(KernelError::new("div", "integer division by zero"));
                        }
                    }
                    launch!(be, "binary_i32", n; a, bb, o, &nn, &s, &code)?
                }
                _ => {
                    return Err(KernelError::new(
                        "binary",
                        "operands and output must all be float or all be integer",
                    ))
                }
            }
        }
        Op::BinaryBackward { op: b, wrt } => {
            let (x, y) = (operands[0], operands[1]);
            let s = Strided::broadcast(name, &x.ty.shape, &y.ty.shape, &out.ty.shape)?;
            let (code, wrt) = (binary_code(*b), *wrt as i32);
            let o = out.f32_mut(name)?;
            launch!(be, "binary_backward_f32", n;
                x.f32(name)?, y.f32(name)?, operands[2].f32(name)?, o, &nn, &s, &code, &wrt)?;
        }
        Op::Softmax | Op::LogSoftmax => {
            let (rows, h) = rows_h(operands[0]);
            let log = matches!(op, Op::LogSoftmax) as i32;
            let o = out.f32_mut(name)?;
            launch!(be, "softmax_rows_f32", rows as usize;
                operands[0].f32(name)?, o, &rows, &h, &log)?;
        }
        Op::Reduce { op: r, axis, .. } => {
            let dims = operands[0].ty.shape.dims();
            let len = dims[*axis];
            if len == 0 && *r == ReduceOp::Max && n > 0 {
                return Err(KernelError::new(
                    "reduce_max",
                    format!("axis {axis} of {} is empty", operands[0].ty.shape),
                ));
            }
            let outer: usize = dims[..*axis].iter().product();
            let inner: usize = dims[axis + 1..].iter().product();
            let code = match r {
                ReduceOp::Sum => 0i32,
                ReduceOp::Mean => 1,
                ReduceOp::Max => 2,
            };
            let (o_, l_, i_) = (outer as i64, len as i64, inner as i64);
            let o = out.f32_mut(name)?;
            launch!(be, "reduce_f32", n; operands[0].f32(name)?, o, &o_, &l_, &i_, &code)?;
        }
        Op::Reshape { .. } => {
            moves_data_only = true;
            copy(be, name, operands[0], out)?;
        }
        Op::Transpose { perm } => {
            moves_data_only = true;
            let in_strides = operands[0].ty.shape.strides();
            let st: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
            let s = Strided::new(name, out.ty.shape.dims(), &st, &st)?;
            with_words(name, operands[0], out, |x, o| match (x, o) {
                (Words::F(x), Words::FM(o)) => launch!(be, "gather_u32", n; x, o, &nn, &s),
                (Words::I(x), Words::IM(o)) => launch!(be, "gather_u32", n; x, o, &nn, &s),
                _ => unreachable!(),
            })?;
        }
        Op::Slice { axis, start, end } => {
            moves_data_only = true;
            let dims = operands[0].ty.shape.dims();
            let outer: usize = dims[..*axis].iter().product();
            let inner: usize = dims[axis + 1..].iter().product();
            let (o_, l_, i_, s_, b_) = (
                outer as i64,
                dims[*axis] as i64,
                inner as i64,
                *start as i64,
                ((end - start) * inner) as i64,
            );
            with_words(name, operands[0], out, |x, o| match (x, o) {
                (Words::F(x), Words::FM(o)) => {
                    launch!(be, "slice_u32", n; x, o, &o_, &l_, &i_, &s_, &b_)
                }
                (Words::I(x), Words::IM(o)) => {
                    launch!(be, "slice_u32", n; x, o, &o_, &l_, &i_, &s_, &b_)
                }
                _ => unreachable!(),
            })?;
        }
        Op::Concat { axis } => {
            moves_data_only = true;
            let dims = out.ty.shape.dims().to_vec();
            let outer: usize = dims[..*axis].iter().product();
            let inner: usize = dims[axis + 1..].iter().product();
            let row = (dims[*axis] * inner) as i64;
            let mut offset = 0i64;
            for x in operands {
                let block = (x.ty.shape.dims()[*axis] * inner) as i64;
                let o_ = outer as i64;
                let cnt = x.ty.shape.numel();
                with_words(name, x, out, |x, o| match (x, o) {
                    (Words::F(x), Words::FM(o)) => {
                        launch!(be, "place_u32", cnt; x, o, &o_, &block, &row, &offset)
                    }
                    (Words::I(x), Words::IM(o)) => {
                        launch!(be, "place_u32", cnt; x, o, &o_, &block, &row, &offset)
                    }
                    _ => unreachable!(),
                })?;
                offset += block;
            }
        }
        Op::Cast { .. } => match (&operands[0].data, &mut out.data) {
            (DevData::F32(_), DevData::F32(_)) | (DevData::I32(_), DevData::I32(_)) => {
                copy(be, name, operands[0], out)?
            }
            (DevData::F32(x), DevData::I32(o)) => launch!(be, "cast_f32_i32", n; x, o, &nn)?,
            (DevData::I32(x), DevData::F32(o)) => launch!(be, "cast_i32_f32", n; x, o, &nn)?,
        },
        Op::CrossEntropy | Op::CrossEntropyBackward => {
            let (z, y) = (operands[0], operands[1]);
            let (rows, v) = (z.ty.shape.dims()[0], z.ty.shape.dims()[1]);
            let count = check_labels(be, name, y, v)? as i64;
            let mut lse = be.raw::<f64>(rows)?;
            let (r_, v_) = (rows as i64, v as i64);
            let (zs, ys) = (z.f32(name)?, y.i32(name)?);
            launch!(be, "row_lse_f32", rows; zs, &mut lse, &r_, &v_)?;
            let o = out.f32_mut(name)?;
            if matches!(op, Op::CrossEntropy) {
                launch!(be, "cross_entropy_f32", 1; zs, ys, &lse, o, &r_, &v_, &count)?;
            } else {
                let g = operands[2].f32(name)?;
                launch!(be, "cross_entropy_backward_f32", n;
                    zs, ys, &lse, g, o, &r_, &v_, &count)?;
            }
        }
        Op::EmbeddingBackward { vocab } => {
            let (ids, g) = (operands[0], operands[1]);
            check_ids(be, name, ids, *vocab)?;
            let h = out.ty.shape.dims()[1];
            let (t, hh) = (ids.ty.shape.numel() as i64, h as i64);
            let o = out.f32_mut(name)?;
            be.fill_f32(o, n, 0.0)?;
            launch!(be, "embedding_backward_f32", h; ids.i32(name)?, g.f32(name)?, o, &t, &hh)?;
        }
        Op::RmsNormBackward { eps, offset } => {
            let (rows, h) = rows_h(operands[0]);
            let (eps, offset) = (*eps as f32, *offset as f32);
            let o = out.f32_mut(name)?;
            launch!(be, "rms_norm_backward_f32", rows as usize;
                operands[0].f32(name)?, operands[1].f32(name)?, operands[2].f32(name)?,
                o, &rows, &h, &eps, &offset)?;
        }
        Op::RmsNormWeightGrad { eps } => {
            let (rows, h) = rows_h(operands[0]);
            let eps = *eps as f32;
            let o = out.f32_mut(name)?;
            launch!(be, "rms_norm_weight_grad_f32", h as usize;
                operands[0].f32(name)?, operands[1].f32(name)?, o, &rows, &h, &eps)?;
        }
        Op::LayerNormBackward { eps } => {
            let (rows, h) = rows_h(operands[0]);
            let o = out.f32_mut(name)?;
            launch!(be, "layer_norm_backward_f32", rows as usize;
                operands[0].f32(name)?, operands[1].f32(name)?, operands[2].f32(name)?,
                o, &rows, &h, eps)?;
        }
        Op::LayerNormWeightGrad { eps } => {
            let (rows, h) = rows_h(operands[0]);
            let o = out.f32_mut(name)?;
            launch!(be, "layer_norm_weight_grad_f32", h as usize;
                operands[0].f32(name)?, operands[1].f32(name)?, o, &rows, &h, eps)?;
        }
    }
    // As the CPU backend: values computed in f32 are rounded to the storage dtype once.
    let mode = match out.ty.dtype {
        DType::BF16 => 1i32,
        DType::F16 => 2,
        _ => 0,
    };
    if !moves_data_only && mode != 0 {
        let o = out.f32_mut(name)?;
        launch!(be, "round_storage", n; o, &nn, &mode)?;
    }
    Ok(())
}

/// `(rows, last)` of a tensor, as the kernels' `long long` arguments.
fn rows_h(x: &CudaTensor) -> (i64, i64) {
    let h = x.ty.shape.last();
    let rows = x.ty.shape.numel().checked_div(h).unwrap_or(0);
    (rows as i64, h as i64)
}

/// Row-major batched `c[m, n] = op(a)[m, k] · op(b)[k, n]` through cuBLAS (column-major):
/// computes `cᵀ = op(b)ᵀ · op(a)ᵀ`, reading each row-major operand as its column-major
/// transpose. `ld = (a's row length, b's row length)`, strides per batch `(a, b)`.
#[allow(clippy::too_many_arguments)]
fn gemm(
    be: &CudaBackend,
    name: &'static str,
    (ta, tb): (bool, bool),
    (m, k, n): (usize, usize, usize),
    (lda, ldb): (usize, usize),
    batch: usize,
    (sa, sb): (usize, usize),
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    c: &mut CudaSlice<f32>,
) -> Result<(), KernelError> {
    if m == 0 || n == 0 || batch == 0 {
        return Ok(());
    }
    if k == 0 {
        return be.fill_f32(c, batch * m * n, 0.0);
    }
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let int = |v: usize| -> Result<i32, KernelError> {
        i32::try_from(v).map_err(|_| KernelError::new(name, format!("dimension {v} exceeds i32")))
    };
    let cfg = GemmConfig {
        transa: op(tb),
        transb: op(ta),
        m: int(n)?,
        n: int(m)?,
        k: int(k)?,
        alpha: 1.0f32,
        lda: int(ldb)?,
        ldb: int(lda)?,
        beta: 0.0f32,
        ldc: int(n)?,
    };
    // SAFETY: the extents follow from the operands' shapes, which `Op::infer` has checked.
    let r = unsafe {
        if batch == 1 {
            be.blas.gemm(cfg, b, a, c)
        } else {
            be.blas.gemm_strided_batched(
                StridedBatchedConfig {
                    gemm: cfg,
                    batch_size: int(batch)?,
                    stride_a: sb as i64,
                    stride_b: sa as i64,
                    stride_c: (m * n) as i64,
                },
                b,
                a,
                c,
            )
        }
    };
    r.map_err(|e| cuda_err(name, "cuBLAS sgemm", e))
}

fn scalar_map(
    be: &CudaBackend,
    name: &'static str,
    x: &CudaTensor,
    out: &mut CudaTensor,
    kind: i32,
    c: f32,
) -> Result<(), KernelError> {
    let n = out.ty.shape.numel();
    let nn = n as i64;
    let o = out.f32_mut(name)?;
    launch!(be, "scalar_map_f32", n; x.f32(name)?, o, &nn, &kind, &c)
}

/// Device-to-device copy of all elements (reshape, same-kind cast).
fn copy(
    be: &CudaBackend,
    name: &'static str,
    x: &CudaTensor,
    out: &mut CudaTensor,
) -> Result<(), KernelError> {
    let n = out.ty.shape.numel();
    if n == 0 {
        return Ok(());
    }
    let r = match (&x.data, &mut out.data) {
        (DevData::F32(a), DevData::F32(o)) => be.stream.memcpy_dtod(&a.slice(..n), o),
        (DevData::I32(a), DevData::I32(o)) => be.stream.memcpy_dtod(&a.slice(..n), o),
        _ => {
            return Err(KernelError::new(
                name,
                "input and output must both be float or both integer",
            ))
        }
    };
    r.map_err(|e| cuda_err(name, "device copy", e))
}

/// The two storage kinds of a data-movement op, borrowed for the kernel arguments.
enum Words<'a> {
    F(&'a CudaSlice<f32>),
    I(&'a CudaSlice<i32>),
    FM(&'a mut CudaSlice<f32>),
    IM(&'a mut CudaSlice<i32>),
}

fn with_words(
    name: &'static str,
    x: &CudaTensor,
    out: &mut CudaTensor,
    f: impl FnOnce(Words, Words) -> Result<(), KernelError>,
) -> Result<(), KernelError> {
    match (&x.data, &mut out.data) {
        (DevData::F32(a), DevData::F32(o)) => f(Words::F(a), Words::FM(o)),
        (DevData::I32(a), DevData::I32(o)) => f(Words::I(a), Words::IM(o)),
        _ => Err(KernelError::new(
            name,
            "input and output must both be float or both integer",
        )),
    }
}

/// An integer tensor copied to the host (small: ids, positions, labels).
fn host_ints(
    be: &CudaBackend,
    name: &'static str,
    t: &CudaTensor,
) -> Result<Vec<i32>, KernelError> {
    let n = t.ty.shape.numel();
    if n == 0 {
        return Ok(Vec::new());
    }
    be.stream
        .clone_dtoh(&t.i32(name)?.slice(..n))
        .map_err(|e| cuda_err(name, "download integers", e))
}

fn check_ids(
    be: &CudaBackend,
    name: &'static str,
    ids: &CudaTensor,
    v: usize,
) -> Result<(), KernelError> {
    let host = host_ints(be, name, ids)?;
    if let Some((i, &id)) = host
        .iter()
        .enumerate()
        .find(|(_, &id)| id < 0 || id as usize >= v)
    {
        return Err(KernelError::new(
            name,
            format!("token id {id} at position {i} is outside the vocabulary 0..{v}"),
        ));
    }
    Ok(())
}

/// Labels −100 or within the vocabulary, at least one valid (spec §7, check 34): the
/// number of valid ones.
fn check_labels(
    be: &CudaBackend,
    name: &'static str,
    labels: &CudaTensor,
    vocab: usize,
) -> Result<usize, KernelError> {
    let y = host_ints(be, name, labels)?;
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
        return Err(KernelError::new(
            name,
            "All labels are masked (every shifted label is −100): the sequence has nothing to predict",
        ));
    }
    Ok(count)
}

fn rotate(
    be: &CudaBackend,
    name: &'static str,
    rope: &Rope,
    x: &CudaTensor,
    pos: &CudaTensor,
    out: &mut CudaTensor,
    sign: f32,
) -> Result<(), KernelError> {
    let positions = host_ints(be, name, pos)?;
    if let Some((i, p)) = positions.iter().enumerate().find(|(_, &p)| p < 0) {
        return Err(KernelError::new(
            name,
            format!("position {p} at index {i} is negative"),
        ));
    }
    let dims = x.ty.shape.dims();
    let (t, heads, hd) = (dims[0] as i64, dims[1] as i64, dims[2] as i64);
    // The same f32 inverse frequencies as the CPU kernel (from f64 `Rope::inv_freq`).
    let inv_freq: Vec<f32> = rope.inv_freq().iter().map(|&f| f as f32).collect();
    let mut freq = be.raw::<f32>(inv_freq.len())?;
    if !inv_freq.is_empty() {
        be.stream
            .memcpy_htod(inv_freq.as_slice(), &mut freq)
            .map_err(|e| cuda_err(name, "upload inv_freq", e))?;
    }
    let half = (rope.rotary_dim / 2) as i64;
    let inter = rope.interleaved as i32;
    let n = out.ty.shape.numel();
    let o = out.f32_mut(name)?;
    launch!(be, "rope_f32", n;
        x.f32(name)?, pos.i32(name)?, &freq, o, &t, &heads, &hd, &half, &inter, &sign)
}

/// Shapes and parameters of an attention op as kernel arguments.
struct AttnArgs {
    t: i64,
    nh: i64,
    nkv: i64,
    d: i64,
    scale: f32,
    /// −1: no window.
    window: i64,
    /// 0: no soft-cap.
    cap: f32,
}

impl AttnArgs {
    fn new(
        operands: &[&CudaTensor],
        scale: f64,
        window: Option<usize>,
        softcap: Option<f64>,
    ) -> Self {
        let qd = operands[0].ty.shape.dims();
        AttnArgs {
            t: qd[0] as i64,
            nh: qd[1] as i64,
            nkv: operands[1].ty.shape.dims()[1] as i64,
            d: qd[2] as i64,
            scale: scale as f32,
            window: window.map_or(-1, |w| w as i64),
            cap: softcap.map_or(0.0, |c| c as f32),
        }
    }
}
