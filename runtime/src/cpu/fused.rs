//! `Op::Fused` on the CPU: the chain is evaluated chunk by chunk of the output, one step at
//! a time over the whole chunk (each step's inner loop is the standalone op's element
//! function, inlined), with each step rounded to its dtype as the standalone op's result
//! would be. Results are therefore bit for bit those of the unfused ops, while the
//! intermediates stay in cache instead of making full-size passes over memory. A product
//! step runs first, whole, as its standalone op (the CPU gains nothing from fusing it).
use super::elementwise::{binary_seq, broadcast_strides, unary_seq};
use super::elementwise_backward::{derivative, partial};
use super::{f32s, f32s_mut};
use crate::backend::KernelError;
use crate::HostTensor;
use half::{bf16, f16};
use qplc_ops::{DType, FusedArg, FusedStep, Op, TensorType};
use rayon::prelude::*;

const CHUNK: usize = 4096;

/// How operand `k` is read at output element `i`.
enum Source<'a> {
    /// Same shape as the output: element `i`.
    Same(&'a [f32]),
    /// Broadcast: element `Σ_axis coord(i, axis) · stride[axis]`.
    Broadcast(&'a [f32], Vec<usize>),
    /// Read whole by the product step only.
    Unused,
}

pub(crate) fn fused(
    op: &Op,
    steps: &[FusedStep],
    operands: &[&HostTensor],
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let name = "fused";
    let types: Vec<TensorType> = operands.iter().map(|t| t.ty.clone()).collect();
    let step_types = op
        .fused_types(steps, &types)
        .map_err(|e| KernelError::new(name, e.to_string()))?;
    let shape = out.ty.shape.clone();
    let dims = shape.dims().to_vec();
    // A product step runs first, whole, as the standalone op (so its bits are the op's);
    // the chunks then read its result like a same-shape operand.
    let product = steps
        .iter()
        .enumerate()
        .find(|(_, st)| st.op.is_fusable_product())
        .map(|(i, st)| {
            let args: Vec<&HostTensor> = st
                .args
                .iter()
                .map(|a| match *a {
                    FusedArg::Input(k) => operands[k],
                    FusedArg::Step(_) => unreachable!("fused_types: product args are inputs"),
                })
                .collect();
            let mut r = HostTensor::zeros(&step_types[i]);
            super::execute_op(&st.op, &args, &mut r)?;
            Ok::<_, KernelError>((i, r))
        })
        .transpose()?;
    let read_elementwise: Vec<bool> = (0..operands.len())
        .map(|k| {
            steps
                .iter()
                .any(|st| !st.op.is_fusable_product() && st.args.contains(&FusedArg::Input(k)))
        })
        .collect();
    let sources = operands
        .iter()
        .zip(&read_elementwise)
        .map(|(t, &read)| {
            let v = f32s(name, t)?;
            Ok(if !read {
                Source::Unused
            } else if t.ty.shape == shape {
                Source::Same(v)
            } else {
                Source::Broadcast(v, broadcast_strides(&t.ty.shape, dims.len()))
            })
        })
        .collect::<Result<Vec<_>, KernelError>>()?;
    let product = match &product {
        Some((i, r)) => Some((*i, f32s(name, r)?)),
        None => None,
    };
    let dtypes: Vec<DType> = step_types.iter().map(|t| t.dtype).collect();
    let o = f32s_mut(name, out)?;
    o.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let start = c * CHUNK;
        let len = o.len();
        // Broadcast operands gathered for this chunk; same-shape ones are borrowed.
        let gathered: Vec<Option<Vec<f32>>> = sources
            .iter()
            .map(|s| match s {
                Source::Same(_) | Source::Unused => None,
                Source::Broadcast(v, strides) => Some(
                    (start..start + len)
                        .map(|i| {
                            let (mut rem, mut off) = (i, 0);
                            for ax in (0..dims.len()).rev() {
                                off += (rem % dims[ax]) * strides[ax];
                                rem /= dims[ax];
                            }
                            v[off]
                        })
                        .collect(),
                ),
            })
            .collect();
        let mut vals: Vec<Vec<f32>> = Vec::with_capacity(steps.len());
        for (i, (st, &dtype)) in steps.iter().zip(&dtypes).enumerate() {
            if let Some((_, p)) = product.filter(|(at, _)| *at == i) {
                vals.push(p[start..start + len].to_vec());
                continue;
            }
            let arg = |k: usize| -> &[f32] {
                match st.args[k] {
                    FusedArg::Step(j) => &vals[j],
                    FusedArg::Input(i) => match (&sources[i], &gathered[i]) {
                        (Source::Same(v), _) => &v[start..start + len],
                        (_, Some(g)) => g,
                        (Source::Broadcast(..), None) => unreachable!("gathered above"),
                        (Source::Unused, _) => unreachable!("read by the product only"),
                    },
                }
            };
            let mut r = vec![0f32; len];
            eval_step(&st.op, &arg, &mut r);
            round(&mut r, dtype);
            vals.push(r);
        }
        o.copy_from_slice(vals.last().expect("fused_types checks there is a step"));
    });
    Ok(())
}

/// One step over a chunk, with the standalone op's element function.
fn eval_step<'a>(op: &Op, arg: &dyn Fn(usize) -> &'a [f32], r: &mut [f32]) {
    match op {
        Op::Unary(u) => unary_seq(*u, arg(0), r),
        Op::Binary(b) => binary_seq(*b, arg(0), arg(1), r),
        Op::Scale { factor } => {
            let f = *factor as f32;
            r.iter_mut().zip(arg(0)).for_each(|(r, &x)| *r = x * f);
        }
        Op::AddScalar { value } => {
            let c = *value as f32;
            r.iter_mut().zip(arg(0)).for_each(|(r, &x)| *r = x + c);
        }
        Op::Softcap { cap } => {
            let c = *cap as f32;
            r.iter_mut()
                .zip(arg(0))
                .for_each(|(r, &x)| *r = c * (x / c).tanh());
        }
        // Float to float: the value, rounded to the target dtype by the caller.
        Op::Cast { .. } => r.copy_from_slice(arg(0)),
        Op::UnaryBackward(u) => {
            let f = derivative(*u);
            r.iter_mut()
                .zip(arg(0).iter().zip(arg(1)))
                .for_each(|(r, (&x, &g))| *r = g * f(x));
        }
        Op::BinaryBackward { op, wrt } => {
            let f = partial(*op, *wrt);
            r.iter_mut()
                .zip(arg(0).iter().zip(arg(1)).zip(arg(2)))
                .for_each(|(r, ((&a, &b), &g))| *r = f(a, b) * g);
        }
        other => unreachable!("fused_types admits only fusable ops, got {}", other.name()),
    }
}

fn round(v: &mut [f32], dtype: DType) {
    match dtype {
        DType::BF16 => v.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32()),
        DType::F16 => v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
        _ => {}
    }
}
