//! Elementwise ops: unary functions, binary ops with NumPy broadcasting, and the scalar
//! maps (`Scale`, `AddScalar`, `Softcap`), all computed in f32 (exact GELU in f64 through
//! `libm::erf`, then rounded once).
use crate::backend::KernelError;
use crate::tensor::Data;
use crate::HostTensor;
use qplc_ops::{BinaryOp, Shape, UnaryOp};
use rayon::prelude::*;

/// Elements per rayon task for cheap maps.
const CHUNK: usize = 1 << 14;

/// `out[i] = f(x[i])`, in parallel chunks.
pub(crate) fn map(x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x)));
}

/// Exact GELU, `x·Φ(x) = ½x(1 + erf(x/√2))`, as `torch.nn.functional.gelu` (approximate =
/// "none"); erf from libm is accurate to about one ulp of f64.
pub fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))) as f32
}

/// GELU with the tanh approximation, `gelu(x, approximate="tanh")`, in f32 like torch.
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub(crate) fn unary(op: UnaryOp, x: &[f32], out: &mut [f32]) {
    match op {
        UnaryOp::Neg => map(x, out, |x| -x),
        UnaryOp::Exp => map(x, out, f32::exp),
        UnaryOp::Log => map(x, out, f32::ln),
        UnaryOp::Tanh => map(x, out, f32::tanh),
        UnaryOp::Sqrt => map(x, out, f32::sqrt),
        UnaryOp::Rsqrt => map(x, out, |x| 1.0 / x.sqrt()),
        UnaryOp::Recip => map(x, out, |x| 1.0 / x),
        UnaryOp::Square => map(x, out, |x| x * x),
        UnaryOp::Relu => map(x, out, |x| x.max(0.0)),
        UnaryOp::Sigmoid => map(x, out, sigmoid),
        UnaryOp::Silu => map(x, out, |x| x * sigmoid(x)),
        UnaryOp::Gelu => map(x, out, gelu),
        UnaryOp::GeluTanh => map(x, out, gelu_tanh),
    }
}

fn float_fn(op: BinaryOp) -> fn(f32, f32) -> f32 {
    match op {
        BinaryOp::Add => |a, b| a + b,
        BinaryOp::Sub => |a, b| a - b,
        BinaryOp::Mul => |a, b| a * b,
        BinaryOp::Div => |a, b| a / b,
        BinaryOp::Max => f32::max,
        BinaryOp::Min => f32::min,
    }
}

/// Integer arithmetic wraps like two's-complement hardware; division truncates toward
/// zero (a zero divisor is refused before we get here).
fn int_fn(op: BinaryOp) -> fn(i32, i32) -> i32 {
    match op {
        BinaryOp::Add => i32::wrapping_add,
        BinaryOp::Sub => i32::wrapping_sub,
        BinaryOp::Mul => i32::wrapping_mul,
        BinaryOp::Div => i32::wrapping_div,
        BinaryOp::Max => |a, b| a.max(b),
        BinaryOp::Min => |a, b| a.min(b),
    }
}

pub(crate) fn binary(
    op: BinaryOp,
    a: &HostTensor,
    b: &HostTensor,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let (ash, bsh, osh) = (&a.ty.shape, &b.ty.shape, out.ty.shape.clone());
    match (&a.data, &b.data, &mut out.data) {
        (Data::F32(x), Data::F32(y), Data::F32(o)) => {
            broadcast_apply(x, ash, y, bsh, o, &osh, float_fn(op));
            Ok(())
        }
        (Data::I32(x), Data::I32(y), Data::I32(o)) => {
            if op == BinaryOp::Div && y.contains(&0) {
                return Err(KernelError::new("div", "integer division by zero"));
            }
            broadcast_apply(x, ash, y, bsh, o, &osh, int_fn(op));
            Ok(())
        }
        _ => Err(KernelError::new(
            "binary",
            "operands and output must all be float or all be integer",
        )),
    }
}

/// Strides of `s` seen from an output of rank `rank`, right-aligned, with 0 on broadcast
/// (size-1 or missing) axes.
fn broadcast_strides(s: &Shape, rank: usize) -> Vec<usize> {
    let own = s.strides();
    let pad = rank - s.rank();
    (0..rank)
        .map(|i| {
            if i < pad || s.dims()[i - pad] == 1 {
                0
            } else {
                own[i - pad]
            }
        })
        .collect()
}

/// `out = f(a, b)` with NumPy broadcasting; `out`'s shape is the broadcast shape.
pub(crate) fn broadcast_apply<T: Copy + Send + Sync>(
    a: &[T],
    ash: &Shape,
    b: &[T],
    bsh: &Shape,
    out: &mut [T],
    osh: &Shape,
    f: impl Fn(T, T) -> T + Sync,
) {
    if out.is_empty() {
        return;
    }
    if ash == osh && bsh == osh {
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| {
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    *o = f(a, b);
                }
            });
        return;
    }
    let rank = osh.rank();
    let sa = broadcast_strides(ash, rank);
    let sb = broadcast_strides(bsh, rank);
    let dims = osh.dims();
    let l = osh.last();
    let (ia, ib) = if rank == 0 {
        (0, 0)
    } else {
        (sa[rank - 1], sb[rank - 1])
    };
    let rows_min = (CHUNK / l.max(1)).max(1);
    out.par_chunks_mut(l)
        .enumerate()
        .with_min_len(rows_min)
        .for_each(|(r, o)| {
            // Offsets of this output row in a and b: decompose r over the leading axes.
            let (mut oa, mut ob, mut rem) = (0, 0, r);
            for ax in (0..rank.saturating_sub(1)).rev() {
                let i = rem % dims[ax];
                rem /= dims[ax];
                oa += i * sa[ax];
                ob += i * sb[ax];
            }
            for (j, o) in o.iter_mut().enumerate() {
                *o = f(a[oa + j * ia], b[ob + j * ib]);
            }
        });
}
