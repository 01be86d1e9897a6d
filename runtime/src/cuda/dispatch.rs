//! `Backend::execute` for CUDA: checks the operands against `Op::infer` (as the CPU backend
//! does), launches the op's kernels (the build of the operands' storage kind) or cuBLAS
//! call, and rounds f16 results (held as f32) once.
//!
//! Ops whose float operands come in different storage kinds (a bf16 activation with an f32
//! weight, which `Op::infer` allows for some ops) run on f32 copies of the bf16 operands and
//! round the result to the output's dtype once — the CPU backend's semantics, which reads
//! every operand as f32 (`widened`).
//!
//! Values that decide whether an op is valid at all (token ids, positions, labels, integer
//! divisors, the dropout key) are small integer tensors; they are copied to the host and
//! checked there, so bad data gives the CPU backend's error message rather than a device
//! fault.
use super::gemm::{Elem, Product};
use super::launch::{launch, rows as row_blocks, Strided};
use super::{cuda_err, CudaBackend, CudaTensor, DevData, Float};
use crate::backend::KernelError;
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use qplc_ops::{BinaryOp, DType, Op, ReduceOp, Rope, TensorType, UnaryOp};

/// Threads per block of the row-per-block log-sum-exp (`LSE_THREADS` in kernels.cu).
const LSE_THREADS: u32 = 512;
/// Threads per block of the row-per-block norms (`NORM_THREADS` in kernels.cu).
const NORM_THREADS: u32 = 256;

/// `qplc_ops::UnaryOp` → the op code of `unary_fn` in kernels.cu.
pub(crate) fn unary_code(u: UnaryOp) -> i32 {
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

pub(crate) fn binary_code(b: BinaryOp) -> i32 {
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

/// Whether operand `i` of `op` is a float read by every kernel as f32 whatever the rest's
/// storage (the loss gradient scalar), and so takes no part in choosing the kernel build.
fn scalar_slot(op: &Op, i: usize) -> bool {
    matches!(op, Op::CrossEntropyBackward | Op::NllBackward) && i == 2
}

/// Whether the output is an f32 scalar written as f32 by every build (the losses).
fn scalar_out(op: &Op) -> bool {
    matches!(op, Op::CrossEntropy | Op::Nll)
}

/// The float storage kinds the op's kernels would have to read and write together.
fn storages(op: &Op, operands: &[&CudaTensor], out: &CudaTensor) -> Vec<Float> {
    let mut v: Vec<Float> = operands
        .iter()
        .enumerate()
        .filter(|(i, _)| !scalar_slot(op, *i))
        .filter_map(|(_, t)| t.data().float())
        .collect();
    if !scalar_out(op) {
        v.extend(out.data().float());
    }
    v
}

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
    // Elementwise ops and fused chains: generated kernels, which read each operand in its
    // own storage (no widening) and round each step as the op alone would.
    if let Some(steps) = super::fused::steps_of(op, operands) {
        return super::fused::execute(be, op, &steps, operands, out);
    }
    let kinds = storages(op, operands, out);
    let f = kinds.first().copied().unwrap_or(Float::F32);
    if !matches!(op, Op::Cast { .. }) && kinds.iter().any(|&k| k != f) {
        if bf16_big_product(be, name, op, operands, out)? {
            return Ok(());
        }
        return widened(be, op, operands, out);
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
        Op::Fused { .. } => {
            return Err(KernelError::new(
                name,
                "a fused chain takes float operands only",
            ))
        }
        Op::Fill { value, .. } => match out.data_mut() {
            DevData::I32(s) => be.fill_i32(s, n, *value as i32)?,
            d => be.fill(d, n, *value as f32)?,
        },
        Op::Linear | Op::MatMul { .. } => {
            let p = product_shape(op, operands).expect("a product op");
            let (a, b) = (operands[0].data(), operands[1].data());
            match (op, operands.get(2)) {
                (Op::MatMul { .. }, Some(c)) => {
                    accumulate(be, name, &p, a, b, c, out)?;
                }
                (_, bias) => product(be, name, &p, a, b, bias.map(|b| b.data()), out.data_mut())?,
            }
        }
        Op::Embedding => {
            let (ids, table) = (operands[0], operands[1]);
            let (v, h) = (table.ty.shape.dims()[0], table.ty.shape.dims()[1]);
            check_ids(be, name, ids, v)?;
            let (t, hh) = (ids.ty.shape.numel() as i64, h as i64);
            let ids = ints(name, ids)?;
            launch!(be, "embedding" @ f, n; ids, table.data(), out.data_mut(), &t, &hh)?;
        }
        Op::RmsNorm { eps, offset } => {
            let (rows, h) = rows_h(operands[0]);
            let (eps, offset) = (*eps as f32, *offset as f32);
            launch!(be, "rms_norm" @ f, row_blocks(rows as usize, norm_threads(h));
                operands[0].data(), operands[1].data(), out.data_mut(), &rows, &h, &eps, &offset)?;
        }
        Op::LayerNorm { eps } => {
            let (rows, h) = rows_h(operands[0]);
            let w = operands[1].data();
            let (b, has_b) = match operands.get(2) {
                Some(b) => (b.data(), 1i32),
                None => (w, 0i32),
            };
            launch!(be, "layer_norm" @ f, row_blocks(rows as usize, NORM_THREADS);
                operands[0].data(), w, b, &has_b, out.data_mut(), &rows, &h, eps)?;
        }
        Op::Rope(rope) => rotate(be, name, f, rope, operands[0], operands[1], out, 1.0)?,
        Op::RopeBackward(rope) => rotate(be, name, f, rope, operands[0], operands[1], out, -1.0)?,
        Op::Attention {
            scale,
            sliding_window,
            softcap,
        } => {
            let a = AttnArgs::new(operands, *scale, *sliding_window, *softcap);
            if let Some((fl, dims)) = flash_for(be, &a, operands, out) {
                if let (DevData::BF16(q), DevData::BF16(k), DevData::BF16(v)) =
                    (operands[0].data(), operands[1].data(), operands[2].data())
                {
                    let lse = be.scratch::<f32>(dims.nh * dims.t)?;
                    let (DevData::BF16(o), lse) = out.data_and_lse(lse) else {
                        unreachable!("flash_for checked the output storage")
                    };
                    fl.forward(&be.stream, q, k, v, o, Some(lse), &dims)?;
                    return Ok(());
                }
            }
            let (q, k, v) = (operands[0].data(), operands[1].data(), operands[2].data());
            launch!(be, "attention" @ f, (a.t * a.nh * a.d) as usize;
                q, k, v, out.data_mut(), &a.t, &a.nh, &a.nkv, &a.d, &a.scale, &a.window, &a.cap)?;
        }
        Op::AttentionBackward {
            scale,
            sliding_window,
            softcap,
        } => {
            let a = AttnArgs::new(operands, *scale, *sliding_window, *softcap);
            if let Some((fl, dims)) = flash_for(be, &a, operands, out) {
                if let (DevData::BF16(q), DevData::BF16(k), DevData::BF16(v), DevData::BF16(g)) = (
                    operands[0].data(),
                    operands[1].data(),
                    operands[2].data(),
                    operands[3].data(),
                ) {
                    // The forward's output and statistics when it saved them (operand 4).
                    let saved = operands
                        .get(4)
                        .and_then(|o| match (o.data(), o.attn_lse()) {
                            (DevData::BF16(o), Some(lse)) => Some((o, lse)),
                            _ => None,
                        });
                    let DevData::BF16(dqkv) = out.data_mut() else {
                        unreachable!("flash_for checked the output storage")
                    };
                    fl.backward(&be.stream, q, k, v, g, saved, dqkv, &dims)?;
                    return Ok(());
                }
            }
            let (q, k, v, g) = (
                operands[0].data(),
                operands[1].data(),
                operands[2].data(),
                operands[3].data(),
            );
            let rows = (a.t * a.nh) as usize;
            let mut stats = be.scratch::<f32>(rows * 3)?;
            let stats: &mut CudaSlice<f32> = &mut stats;
            launch!(be, "attention_stats" @ f, rows;
                q, k, v, g, &mut *stats, &a.t, &a.nh, &a.nkv, &a.d, &a.scale, &a.window, &a.cap)?;
            let stats: &CudaSlice<f32> = stats;
            let o = out.data_mut();
            launch!(be, "attention_dq" @ f, rows * a.d as usize;
                q, k, v, g, stats, &mut *o, &a.t, &a.nh, &a.nkv, &a.d, &a.scale, &a.window, &a.cap)?;
            launch!(be, "attention_dkv" @ f, (a.t * a.nkv * a.d) as usize;
                q, k, v, g, stats, o, &a.t, &a.nh, &a.nkv, &a.d, &a.scale, &a.window, &a.cap)?;
        }
        Op::Unary(u) => {
            let code = unary_code(*u);
            launch!(be, "unary" @ f, n; operands[0].data(), out.data_mut(), &nn, &code)?;
        }
        Op::UnaryBackward(u) => {
            let code = unary_code(*u);
            launch!(be, "unary_backward" @ f, n;
                operands[0].data(), operands[1].data(), out.data_mut(), &nn, &code)?;
        }
        Op::Scale { factor } => scalar_map(be, f, operands[0], out, 0, *factor as f32)?,
        Op::AddScalar { value } => scalar_map(be, f, operands[0], out, 1, *value as f32)?,
        Op::Softcap { cap } => scalar_map(be, f, operands[0], out, 2, *cap as f32)?,
        Op::Binary(b) => {
            let (x, y) = (operands[0], operands[1]);
            let s = Strided::broadcast(name, &x.ty.shape, &y.ty.shape, &out.ty.shape)?;
            let code = binary_code(*b);
            match (x.data(), y.data(), out.data_mut()) {
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
                (DevData::I32(_), _, _) | (_, DevData::I32(_), _) | (_, _, DevData::I32(_)) => {
                    return Err(KernelError::new(
                        "binary",
                        "operands and output must all be float or all be integer",
                    ))
                }
                (a, bb, o) => launch!(be, "binary" @ f, n; a, bb, o, &nn, &s, &code)?,
            }
        }
        Op::BinaryBackward { op: b, wrt } => {
            let (x, y) = (operands[0], operands[1]);
            let s = Strided::broadcast(name, &x.ty.shape, &y.ty.shape, &out.ty.shape)?;
            let (code, wrt) = (binary_code(*b), *wrt as i32);
            launch!(be, "binary_backward" @ f, n;
                x.data(), y.data(), operands[2].data(), out.data_mut(), &nn, &s, &code, &wrt)?;
        }
        Op::Softmax | Op::LogSoftmax => {
            let (rows, h) = rows_h(operands[0]);
            let log = matches!(op, Op::LogSoftmax) as i32;
            launch!(be, "softmax_rows" @ f, rows as usize;
                operands[0].data(), out.data_mut(), &rows, &h, &log)?;
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
            launch!(be, "reduce" @ f, n;
                operands[0].data(), out.data_mut(), &o_, &l_, &i_, &code)?;
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
            let w = words(name, operands[0], out)?;
            launch!(be, "gather" @ w, n; operands[0].data(), out.data_mut(), &nn, &s)?;
        }
        Op::Slice { axis, start, end } => {
            moves_data_only = true;
            let dims = operands[0].ty.shape.dims();
            let outer: usize = dims[..*axis].iter().product();
            let inner: usize = dims[axis + 1..].iter().product();
            let w = words(name, operands[0], out)?;
            // Byte counts per row of x: its pitch, the slice's offset and width.
            let es = word_bytes(w);
            let (pitch, off, width) = (
                dims[*axis] * inner * es,
                start * inner * es,
                (end - start) * inner * es,
            );
            let (wb, (r_, w_, p_, o_, wb_)) = row_copy(outer, pitch, off, width, es);
            launch!(be, "slice" @ w, outer * (width / wb);
                operands[0].data(), out.data_mut(), &r_, &w_, &p_, &o_, &wb_)?;
        }
        Op::Concat { axis } => {
            moves_data_only = true;
            let dims = out.ty.shape.dims().to_vec();
            let outer: usize = dims[..*axis].iter().product();
            let inner: usize = dims[axis + 1..].iter().product();
            let mut offset = 0usize;
            for x in operands {
                let w = words(name, x, out)?;
                // Byte counts per row of the output: its pitch, x's offset and width.
                let es = word_bytes(w);
                let (pitch, off, width) = (
                    dims[*axis] * inner * es,
                    offset * inner * es,
                    x.ty.shape.dims()[*axis] * inner * es,
                );
                let (wb, (r_, w_, p_, o_, wb_)) = row_copy(outer, pitch, off, width, es);
                launch!(be, "place" @ w, outer * (width / wb);
                    x.data(), out.data_mut(), &r_, &w_, &p_, &o_, &wb_)?;
                offset += x.ty.shape.dims()[*axis];
            }
        }
        Op::Cast { .. } => cast(be, name, operands[0], out)?,
        Op::CrossEntropy | Op::CrossEntropyBackward => {
            let (z, y) = (operands[0], operands[1]);
            let (rows, v) = (z.ty.shape.dims()[0], z.ty.shape.dims()[1]);
            let count = check_labels(be, name, y, v)? as i64;
            let mut lse = be.scratch::<f64>(rows)?;
            let lse: &mut CudaSlice<f64> = &mut lse;
            let mut term = be.scratch::<f64>(rows)?;
            let term: &mut CudaSlice<f64> = &mut term;
            let (r_, v_) = (rows as i64, v as i64);
            let ys = ints(name, y)?;
            launch!(be, "row_lse" @ f, row_blocks(rows, LSE_THREADS);
                z.data(), ys, &mut *lse, &mut *term, &r_, &v_)?;
            let (lse, term): (&CudaSlice<f64>, &CudaSlice<f64>) = (lse, term);
            if matches!(op, Op::CrossEntropy) {
                // One block: it stages the terms, its thread 0 adds them in row order.
                let one = LaunchConfig {
                    grid_dim: (1, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                launch!(be, "cross_entropy" @ f, one; term, out.data_mut(), &r_, &count)?;
            } else {
                let g = f32_scalar(be, name, operands[2])?;
                launch!(be, "cross_entropy_backward" @ f, row_blocks(rows, 256);
                    z.data(), ys, lse, g.slice(), out.data_mut(), &r_, &v_, &count)?;
            }
        }
        Op::Nll => {
            let (lp, y) = (operands[0], operands[1]);
            let (rows, v) = (lp.ty.shape.dims()[0], lp.ty.shape.dims()[1]);
            let count = check_labels(be, name, y, v)? as i64;
            let (r_, v_) = (rows as i64, v as i64);
            launch!(be, "nll" @ f, 1usize;
                lp.data(), ints(name, y)?, out.data_mut(), &r_, &v_, &count)?;
        }
        Op::NllBackward => {
            let (lp, y) = (operands[0], operands[1]);
            let (rows, v) = (lp.ty.shape.dims()[0], lp.ty.shape.dims()[1]);
            let count = check_labels(be, name, y, v)? as i64;
            let (r_, v_) = (rows as i64, v as i64);
            let g = f32_scalar(be, name, operands[2])?;
            launch!(be, "nll_backward" @ f, n;
                ints(name, y)?, g.slice(), out.data_mut(), &r_, &v_, &count)?;
        }
        Op::Dropout { p, salt } => {
            let key = host_ints(be, name, operands[1])?;
            let words: [i32; 3] = key
                .try_into()
                .map_err(|_| KernelError::new(name, "the key must be i32 [3]"))?;
            let (seed, active) = qplc_ops::dropout::from_key_words(words);
            if !active || *p == 0.0 {
                copy(be, name, operands[0], out)?;
            } else {
                let stream = qplc_ops::dropout::stream(seed, *salt);
                let scale = (1.0 / (1.0 - p)) as f32;
                launch!(be, "dropout" @ f, n;
                    operands[0].data(), out.data_mut(), &nn, &stream, p, &scale)?;
            }
        }
        Op::EmbeddingBackward { vocab } => {
            let (ids, g) = (operands[0], operands[1]);
            check_ids(be, name, ids, *vocab)?;
            let h = out.ty.shape.dims()[1];
            let hh = h as i64;
            // Positions grouped by id on the host (the ids' host copy): a block per distinct
            // id sums its positions in sequence order in f32 and rounds once, as the CPU.
            let (order, starts) = group_by_id(&host_ints(be, name, ids)?);
            let groups = (starts.len() - 1) as i64;
            let order = upload_ints(be, name, &order)?;
            let starts = upload_ints(be, name, &starts)?;
            let ids = ints(name, ids)?;
            be.fill(out.data_mut(), n, 0.0)?;
            launch!(be, "embedding_backward" @ f, row_blocks(groups as usize, 256);
                ids, &*order, &*starts, &groups, g.data(), out.data_mut(), &hh)?;
        }
        Op::RmsNormBackward { eps, offset } => {
            let (rows, h) = rows_h(operands[0]);
            let (eps, offset) = (*eps as f32, *offset as f32);
            launch!(be, "rms_norm_backward" @ f, row_blocks(rows as usize, norm_threads(h));
                operands[0].data(), operands[1].data(), operands[2].data(),
                out.data_mut(), &rows, &h, &eps, &offset)?;
        }
        Op::RmsNormWeightGrad { eps } => norm_weight_grad(be, f, operands, out, *eps, false)?,
        Op::LayerNormBackward { eps } => {
            let (rows, h) = rows_h(operands[0]);
            launch!(be, "layer_norm_backward" @ f, row_blocks(rows as usize, NORM_THREADS);
                operands[0].data(), operands[1].data(), operands[2].data(),
                out.data_mut(), &rows, &h, eps)?;
        }
        Op::LayerNormWeightGrad { eps } => norm_weight_grad(be, f, operands, out, *eps, true)?,
    }
    // As the CPU backend: a bf16/f16 value computed in f32 and held as f32 is rounded to its
    // dtype once (bf16 storage was rounded by the kernel's store).
    let mode = match out.ty.dtype {
        DType::BF16 => 1i32,
        DType::F16 => 2,
        _ => 0,
    };
    if let (false, true, DevData::F32(o)) = (moves_data_only, mode != 0, out.data_mut()) {
        launch!(be, "round_storage", n; o, &nn, &mode)?;
    }
    Ok(())
}

/// RMS / layer norm weight gradient: per-row statistics once (block per row), then
/// column sums split over row chunks (`NORM_WG_ROWS` in kernels.cu) and added in chunk order.
fn norm_weight_grad(
    be: &CudaBackend,
    f: Float,
    operands: &[&CudaTensor],
    out: &mut CudaTensor,
    eps: f64,
    layer: bool,
) -> Result<(), KernelError> {
    const CHUNK_ROWS: i64 = 64; // NORM_WG_ROWS
    const COLS: u32 = 256;
    let (rows, h) = rows_h(operands[0]);
    let (x, g) = (operands[0].data(), operands[1].data());
    let mut stats = be.scratch::<f32>(2 * rows as usize)?;
    let stats: &mut CudaSlice<f32> = &mut stats;
    let layer_ = layer as i32;
    launch!(be, "norm_row_stats" @ f, row_blocks(rows as usize, NORM_THREADS);
        x, &mut *stats, &rows, &h, &eps, &layer_)?;
    let stats: &CudaSlice<f32> = stats;
    let chunks = (rows + CHUNK_ROWS - 1) / CHUNK_ROWS;
    let mut part = be.scratch::<f64>((chunks.max(1) * h) as usize)?;
    let part: &mut CudaSlice<f64> = &mut part;
    let cfg = LaunchConfig {
        grid_dim: ((h as u32).div_ceil(COLS), chunks.max(1) as u32, 1),
        block_dim: (COLS, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(be, "norm_weight_grad_partial" @ f, cfg;
        x, g, stats, &mut *part, &rows, &h, &layer_)?;
    let part: &CudaSlice<f64> = part;
    launch!(be, "norm_weight_grad_sum" @ f, h as usize; part, out.data_mut(), &chunks, &h)
}

/// Runs `op` on f32 copies of its bf16 operands (see the module doc) and rounds into `out`.
fn widened(
    be: &CudaBackend,
    op: &Op,
    operands: &[&CudaTensor],
    out: &mut CudaTensor,
) -> Result<(), KernelError> {
    let wide: Vec<Option<CudaTensor>> = operands
        .iter()
        .map(|t| match t.data() {
            DevData::BF16(_) => widen(be, t).map(Some),
            _ => Ok(None),
        })
        .collect::<Result<_, _>>()?;
    let refs: Vec<&CudaTensor> = operands
        .iter()
        .zip(&wide)
        .map(|(t, w)| w.as_ref().unwrap_or(t))
        .collect();
    match out.data().float() {
        Some(Float::BF16) => {
            let mut tmp = be.alloc_in(&out.ty, Float::F32)?;
            execute(be, op, &refs, &mut tmp)?;
            let n = out.ty.shape.numel();
            let nn = n as i64;
            launch!(be, "narrow_bf16", n; tmp.data(), out.data_mut(), &nn)
        }
        _ => execute(be, op, &refs, out),
    }
}

/// An f32-storage copy of a bf16 tensor (exact).
fn widen(be: &CudaBackend, t: &CudaTensor) -> Result<CudaTensor, KernelError> {
    let mut w = be.alloc_in(&t.ty, Float::F32)?;
    let nn = t.ty.shape.numel() as i64;
    launch!(be, "widen_bf16", t.ty.shape.numel(); t.data(), w.data_mut(), &nn)?;
    Ok(w)
}

/// A float scalar operand (the loss gradient) in f32 storage: itself, or a widened copy.
fn f32_scalar<'a>(
    be: &CudaBackend,
    name: &'static str,
    t: &'a CudaTensor,
) -> Result<ScalarRef<'a>, KernelError> {
    match t.data() {
        DevData::F32(_) => Ok(ScalarRef::Borrowed(t)),
        DevData::BF16(_) => Ok(ScalarRef::Widened(widen(be, t)?)),
        DevData::I32(_) => Err(KernelError::new(
            name,
            format!("the loss gradient must be a float scalar, got {}", t.ty),
        )),
    }
}

/// The loss-gradient scalar as an f32-storage tensor.
enum ScalarRef<'a> {
    Borrowed(&'a CudaTensor),
    Widened(CudaTensor),
}

impl ScalarRef<'_> {
    fn slice(&self) -> &DevData {
        match self {
            ScalarRef::Borrowed(t) => t.data(),
            ScalarRef::Widened(t) => t.data(),
        }
    }
}

/// An integer operand's buffer.
fn ints<'a>(name: &'static str, t: &'a CudaTensor) -> Result<&'a CudaSlice<i32>, KernelError> {
    match t.data() {
        DevData::I32(s) => Ok(s),
        _ => Err(KernelError::new(
            name,
            format!("expects an integer tensor, got {}", t.ty),
        )),
    }
}

/// The kernel build whose words a data-movement op copies: 32-bit words (f32 and i32
/// storage) in the f32 build, 16-bit words in the bf16 build.
fn words(name: &'static str, x: &CudaTensor, out: &CudaTensor) -> Result<Float, KernelError> {
    let w = |d: &DevData| d.float().unwrap_or(Float::F32);
    let same = std::mem::discriminant(x.data()) == std::mem::discriminant(out.data());
    if !same {
        return Err(KernelError::new(
            name,
            format!(
                "input {} and output {} are held in different storage",
                x.ty, out.ty
            ),
        ));
    }
    Ok(w(x.data()))
}

/// `Cast`: between storage kinds, float ↔ integer, or a same-kind copy (rounded afterwards
/// by `execute` where the target is f16 held as f32).
fn cast(
    be: &CudaBackend,
    name: &'static str,
    x: &CudaTensor,
    out: &mut CudaTensor,
) -> Result<(), KernelError> {
    let n = out.ty.shape.numel();
    let nn = n as i64;
    match (x.data(), out.data_mut()) {
        (DevData::F32(_), DevData::F32(_))
        | (DevData::BF16(_), DevData::BF16(_))
        | (DevData::I32(_), DevData::I32(_)) => copy(be, name, x, out),
        (a @ DevData::BF16(_), o @ DevData::F32(_)) => launch!(be, "widen_bf16", n; a, o, &nn),
        (a @ DevData::F32(_), o @ DevData::BF16(_)) => launch!(be, "narrow_bf16", n; a, o, &nn),
        (DevData::I32(a), o) => {
            let f = o.float().unwrap_or(Float::F32);
            launch!(be, "cast_from_i32" @ f, n; a, o, &nn)
        }
        (a, DevData::I32(o)) => {
            let f = a.float().unwrap_or(Float::F32);
            launch!(be, "cast_to_i32" @ f, n; a, o, &nn)
        }
    }
}

/// The product a `Linear` (`x · wᵀ`) or `MatMul` computes, in `gemm`'s terms.
pub(crate) fn product_shape(op: &Op, operands: &[&CudaTensor]) -> Option<Product> {
    match op {
        Op::Linear => {
            let (x, w) = (operands[0], operands[1]);
            let (rows, k) = (x.ty.shape.rows(), x.ty.shape.last());
            Some(Product {
                ta: false,
                tb: true,
                m: rows,
                k,
                n: w.ty.shape.dims()[0],
                lda: k,
                ldb: k,
                batch: 1,
                stride_a: 0,
                stride_b: 0,
            })
        }
        Op::MatMul { ta, tb } => {
            let ad = operands[0].ty.shape.dims();
            let bd = operands[1].ty.shape.dims();
            let r = ad.len();
            let (ar, ac) = (ad[r - 2], ad[r - 1]);
            let (br, bc) = (bd[r - 2], bd[r - 1]);
            let (m, k) = if *ta { (ac, ar) } else { (ar, ac) };
            Some(Product {
                ta: *ta,
                tb: *tb,
                m,
                k,
                n: if *tb { br } else { bc },
                lda: ac,
                ldb: bc,
                batch: ad[..r - 2].iter().product(),
                stride_a: ar * ac,
                stride_b: br * bc,
            })
        }
        _ => None,
    }
}

/// An f32 product of a bf16 and an f32 operand (the simplify pass folds a LoRA step's
/// `Cast(x → f32)` into the adapter products) run by the skinny kernels that read the bf16
/// big operand directly (tensor cores, the f32 side split in three bf16 parts): f32-accurate,
/// without the f32 copy.
/// False where they do not apply (then the caller widens).
fn bf16_big_product(
    be: &CudaBackend,
    name: &'static str,
    op: &Op,
    operands: &[&CudaTensor],
    out: &mut CudaTensor,
) -> Result<bool, KernelError> {
    let Some(p) = product_shape(op, operands) else {
        return Ok(false);
    };
    if operands.len() != 2 || p.k == 0 || p.batch * p.m * p.n == 0 {
        return Ok(false);
    }
    let DevData::F32(o) = out.data_mut() else {
        return Ok(false);
    };
    let tuning = super::skinny::Tuning::default();
    match (operands[0].data(), operands[1].data()) {
        (DevData::BF16(a), DevData::F32(b)) => be.gemm_bf16_big(name, &p, a, b, true, o, tuning),
        (DevData::F32(a), DevData::BF16(b)) => be.gemm_bf16_big(name, &p, a, b, false, o, tuning),
        _ => Ok(false),
    }
}

/// A Linear / MatMul product with an optional bias, in the operands' storage kind: f32 as
/// true f32 with the bias added in place; bf16 on the tensor cores, written as bf16, or with
/// a bias as f32 then `acc + b` rounded once (the CPU's single rounding).
fn product(
    be: &CudaBackend,
    name: &'static str,
    p: &Product,
    a: &DevData,
    b: &DevData,
    bias: Option<&DevData>,
    out: &mut DevData,
) -> Result<(), KernelError> {
    let count = p.batch * p.m * p.n;
    if count == 0 {
        return Ok(());
    }
    let (rows, cols) = ((p.batch * p.m) as i64, p.n as i64);
    match (a, b, out) {
        (DevData::F32(a), DevData::F32(b), DevData::F32(o)) => {
            if p.k == 0 {
                be.fill_f32(o, count, 0.0)?;
            } else {
                be.gemm(name, p, Elem::F32, a, b, Elem::F32, o)?;
            }
            if let Some(bias) = bias {
                launch!(be, "bias_inplace_f32", count; o, bias, &rows, &cols)?;
            }
            Ok(())
        }
        (DevData::BF16(a), DevData::BF16(b), DevData::BF16(o)) => match bias {
            None => {
                if p.k == 0 {
                    let (nn, zero) = (count as i64, 0.0f32);
                    return launch!(be, "fill" @ Float::BF16, count; o, &nn, &zero);
                }
                be.gemm(name, p, Elem::BF16, a, b, Elem::BF16, o)
            }
            Some(bias) => {
                let mut acc = be.scratch::<f32>(count)?;
                let acc: &mut CudaSlice<f32> = &mut acc;
                if p.k == 0 {
                    be.fill_f32(acc, count, 0.0)?;
                } else {
                    be.gemm(name, p, Elem::BF16, a, b, Elem::F32, acc)?;
                }
                let acc: &CudaSlice<f32> = acc;
                launch!(be, "bias_rows" @ Float::BF16, count; acc, bias, o, &rows, &cols)
            }
        },
        _ => Err(KernelError::new(
            name,
            "operands and output must be float tensors of one storage kind",
        )),
    }
}

/// `op(a)·op(b) + c` (a `MatMul` with an accumulated operand, all of one storage kind):
/// cuBLASLt adds `c` in the epilogue, before the one rounding; with `k = 0` it is `c`.
fn accumulate(
    be: &CudaBackend,
    name: &'static str,
    p: &Product,
    a: &DevData,
    b: &DevData,
    c: &CudaTensor,
    out: &mut CudaTensor,
) -> Result<(), KernelError> {
    if p.batch * p.m * p.n == 0 {
        return Ok(());
    }
    if p.k == 0 {
        return copy(be, name, c, out);
    }
    match (a, b, c.data(), out.data_mut()) {
        (DevData::F32(a), DevData::F32(b), DevData::F32(c), DevData::F32(o)) => {
            be.gemm_accumulate(name, p, Elem::F32, a, b, c, o)
        }
        (DevData::BF16(a), DevData::BF16(b), DevData::BF16(c), DevData::BF16(o)) => {
            be.gemm_accumulate(name, p, Elem::BF16, a, b, c, o)
        }
        _ => Err(KernelError::new(
            name,
            "an accumulating product takes operands and output of one float storage kind",
        )),
    }
}

/// `(rows, last)` of a tensor, as the kernels' `long long` arguments.
fn rows_h(x: &CudaTensor) -> (i64, i64) {
    let h = x.ty.shape.last();
    let rows = x.ty.shape.numel().checked_div(h).unwrap_or(0);
    (rows as i64, h as i64)
}

fn scalar_map(
    be: &CudaBackend,
    f: Float,
    x: &CudaTensor,
    out: &mut CudaTensor,
    kind: i32,
    c: f32,
) -> Result<(), KernelError> {
    let n = out.ty.shape.numel();
    let nn = n as i64;
    launch!(be, "scalar_map" @ f, n; x.data(), out.data_mut(), &nn, &kind, &c)
}

/// Device-to-device copy of all elements (reshape, same-kind cast, inactive dropout).
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
    let r = match (x.data(), out.data_mut()) {
        (DevData::F32(a), DevData::F32(o)) => be.stream.memcpy_dtod(&a.slice(..n), o),
        (DevData::BF16(a), DevData::BF16(o)) => be.stream.memcpy_dtod(&a.slice(..n), o),
        (DevData::I32(a), DevData::I32(o)) => be.stream.memcpy_dtod(&a.slice(..n), o),
        _ => {
            return Err(KernelError::new(
                name,
                "input and output must be held in the same storage kind",
            ))
        }
    };
    r.map_err(|e| cuda_err(name, "device copy", e))
}

/// An integer tensor copied to the host (small: ids, positions, labels).
fn host_ints(
    be: &CudaBackend,
    name: &'static str,
    t: &CudaTensor,
) -> Result<Vec<i32>, KernelError> {
    if let Some(v) = t.host_ints() {
        return Ok(v.to_vec());
    }
    let n = t.ty.shape.numel();
    if n == 0 {
        return Ok(Vec::new());
    }
    be.stream
        .clone_dtoh(&ints(name, t)?.slice(..n))
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

#[allow(clippy::too_many_arguments)]
fn rotate(
    be: &CudaBackend,
    name: &'static str,
    f: Float,
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
    let t = dims[0] as i64;
    let (heads, hd) = (dims[1] as i32, dims[2] as i32);
    // The same f32 inverse frequencies as the CPU kernel (from f64 `Rope::inv_freq`), passed
    // by value: no upload from pageable memory, no scratch, nothing to cache.
    let freqs = rope.inv_freq();
    if freqs.len() > ROPE_MAX_HALF {
        return Err(KernelError::new(
            name,
            format!(
                "rotary dimension {} is above the GPU kernel's limit of {}",
                rope.rotary_dim,
                2 * ROPE_MAX_HALF
            ),
        ));
    }
    let mut inv_freq = InvFreq([0.0; ROPE_MAX_HALF]);
    for (d, &f) in inv_freq.0.iter_mut().zip(&freqs) {
        *d = f as f32;
    }
    let half = (rope.rotary_dim / 2) as i32;
    let inter = rope.interleaved as i32;
    launch!(be, "rope" @ f, row_blocks(t as usize, ROPE_THREADS);
        x.data(), ints(name, pos)?, &inv_freq, out.data_mut(), &t, &heads, &hd, &half, &inter, &sign)
}

/// Threads per row of the RMS norms: h/16 where the row fits the kernels' vector path (16
/// elements a thread, in 4-element loads: h a multiple of 512 up to 16384), else
/// `NORM_THREADS` with the scalar loops.
fn norm_threads(h: i64) -> u32 {
    if h % 512 == 0 && (512..=16384).contains(&h) {
        (h / 16) as u32
    } else {
        NORM_THREADS
    }
}

/// Threads per block of the rope kernel (one block per position).
const ROPE_THREADS: u32 = 256;
/// Largest number of rotated pairs (`ROPE_MAX_HALF` in kernels.cu).
const ROPE_MAX_HALF: usize = 256;

/// `struct InvFreq` of kernels.cu: the inverse frequencies as a kernel argument.
#[repr(C)]
#[derive(Clone, Copy)]
struct InvFreq([f32; ROPE_MAX_HALF]);

// SAFETY: a `#[repr(C)]` array of f32, laid out as the C struct.
unsafe impl DeviceRepr for InvFreq {}

/// Bytes of a data-movement kernel build's word (see `words`).
fn word_bytes(w: Float) -> usize {
    match w {
        Float::F32 => 4,
        Float::BF16 => 2,
    }
}

/// The copy word (bytes) of `outer` rows of `width` bytes at byte `off` of rows `pitch` apart
/// (`copy_word`), and the `slice` / `place` kernels' arguments in those words: rows, width,
/// pitch, offset, word bytes.
fn row_copy(
    outer: usize,
    pitch: usize,
    off: usize,
    width: usize,
    es: usize,
) -> (usize, (i64, i64, i64, i64, i32)) {
    let wb = copy_word(es, &[pitch, off, width]);
    let args = (
        outer as i64,
        (width / wb) as i64,
        (pitch / wb) as i64,
        (off / wb) as i64,
        wb as i32,
    );
    (wb, args)
}

/// The widest word (16, 8 or 4 bytes, else the storage word of `es` bytes) that divides every
/// byte count of a strided row copy (pitches, offsets, widths); buffers start 256-byte
/// aligned (`cuMemAlloc`), so word-aligned counts make word-aligned addresses.
fn copy_word(es: usize, counts: &[usize]) -> usize {
    [16, 8, 4]
        .into_iter()
        .find(|&wb| wb >= es && counts.iter().all(|c| c % wb == 0))
        .unwrap_or(es)
}

/// Positions sorted by id, stably (each id's positions stay in sequence order), and the
/// start of each distinct id's run in that order, with the total appended.
fn group_by_id(ids: &[i32]) -> (Vec<i32>, Vec<i32>) {
    let mut order: Vec<i32> = (0..ids.len() as i32).collect();
    order.sort_by_key(|&p| ids[p as usize]);
    let mut starts = Vec::new();
    for (k, &p) in order.iter().enumerate() {
        if k == 0 || ids[p as usize] != ids[order[k - 1] as usize] {
            starts.push(k as i32);
        }
    }
    starts.push(order.len() as i32);
    (order, starts)
}

/// A small host integer array in a scratch device buffer.
fn upload_ints(
    be: &CudaBackend,
    name: &'static str,
    v: &[i32],
) -> Result<super::alloc::Scratch<i32>, KernelError> {
    let mut s = be.scratch::<i32>(v.len().max(1))?;
    if !v.is_empty() {
        be.stream
            .memcpy_htod(v, &mut *s)
            .map_err(|e| cuda_err(name, "upload integers", e))?;
    }
    Ok(s)
}

/// Shapes and parameters of an attention op as kernel arguments.
/// The flash kernels and their dims where they apply: bf16 storage throughout, a GPU that has
/// them, head dims of 64 and up, and dims they support (`flash::supports`); otherwise the
/// exact kernels run.
fn flash_for<'b>(
    be: &'b CudaBackend,
    a: &AttnArgs,
    operands: &[&CudaTensor],
    out: &CudaTensor,
) -> Option<(&'b super::flash::Flash, super::flash::AttnDims)> {
    let fl = be.flash.as_ref()?;
    // Below d = 64 the tiles are mostly padding and the exact kernels cost little; they also
    // keep f32 probabilities, where flash rounds P to bf16 for the tensor cores (on the tiny
    // model, flash at d = 16 moved the bf16 LoRA-step check from 5e-3 to 1.6e-2 of the CPU's).
    if a.d < 64 {
        return None;
    }
    let all_bf16 = operands
        .iter()
        .chain(std::iter::once(&out))
        .all(|t| matches!(t.data(), DevData::BF16(_)));
    if !all_bf16 {
        return None;
    }
    let dims = super::flash::AttnDims {
        t: a.t as usize,
        nh: a.nh as usize,
        nkv: a.nkv as usize,
        d: a.d as usize,
        scale: a.scale,
        window: (a.window >= 0).then_some(a.window as usize),
        softcap: (a.cap != 0.0).then_some(a.cap),
    };
    super::flash::supports(&dims).then_some((fl, dims))
}

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

#[cfg(test)]
mod tests {
    use super::{copy_word, group_by_id};

    #[test]
    fn copy_word_is_the_widest_dividing_every_count() {
        // bf16 [4096, 48, 128] sliced to heads 32..40: pitch 12288, offset 8192, width 2048 bytes.
        assert_eq!(copy_word(2, &[12288, 8192, 2048]), 16);
        assert_eq!(copy_word(2, &[12, 8, 4]), 4);
        assert_eq!(copy_word(2, &[24, 6, 8]), 2);
        assert_eq!(copy_word(4, &[40, 8, 24]), 8);
        assert_eq!(copy_word(4, &[12, 4, 8]), 4);
    }

    #[test]
    fn group_by_id_keeps_each_ids_positions_in_sequence_order() {
        let (order, starts) = group_by_id(&[5, 2, 5, 0, 2, 5]);
        assert_eq!(order, vec![3, 1, 4, 0, 2, 5]);
        assert_eq!(starts, vec![0, 1, 3, 6]);
        let (order, starts) = group_by_id(&[]);
        assert!(order.is_empty());
        assert_eq!(starts, vec![0]);
    }
}
