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

/// Binds `$f` to the element function of a unary op and evaluates `$body` with it, one
/// match arm per op, so each kernel is compiled with its function inlined.
macro_rules! with_unary_fn {
    ($op:expr, $f:ident => $body:expr) => {
        match $op {
            UnaryOp::Neg => {
                let $f = |x: f32| -x;
                $body
            }
            UnaryOp::Exp => {
                let $f = f32::exp;
                $body
            }
            UnaryOp::Log => {
                let $f = f32::ln;
                $body
            }
            UnaryOp::Tanh => {
                let $f = f32::tanh;
                $body
            }
            UnaryOp::Sqrt => {
                let $f = f32::sqrt;
                $body
            }
            UnaryOp::Rsqrt => {
                let $f = |x: f32| 1.0 / x.sqrt();
                $body
            }
            UnaryOp::Recip => {
                let $f = |x: f32| 1.0 / x;
                $body
            }
            UnaryOp::Square => {
                let $f = |x: f32| x * x;
                $body
            }
            UnaryOp::Relu => {
                let $f = |x: f32| x.max(0.0);
                $body
            }
            UnaryOp::Sigmoid => {
                let $f = sigmoid;
                $body
            }
            UnaryOp::Silu => {
                let $f = |x: f32| x * sigmoid(x);
                $body
            }
            UnaryOp::Gelu => {
                let $f = gelu;
                $body
            }
            UnaryOp::GeluTanh => {
                let $f = gelu_tanh;
                $body
            }
        }
    };
}

pub(crate) fn unary(op: UnaryOp, x: &[f32], out: &mut [f32]) {
    with_unary_fn!(op, f => map(x, out, f))
}

/// `unary` on one chunk, sequentially (a fused kernel's step; same element function).
pub(crate) fn unary_seq(op: UnaryOp, x: &[f32], out: &mut [f32]) {
    with_unary_fn!(op, f => out.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x)))
}

/// `x[i] = f(x[i])`, in parallel chunks: the in-place form of `map`.
pub(crate) fn map_in_place(x: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
    x.par_chunks_mut(CHUNK)
        .for_each(|c| c.iter_mut().for_each(|x| *x = f(*x)));
}

/// `unary` over the operand's own storage (same element function, same results).
pub(crate) fn unary_in_place(op: UnaryOp, x: &mut [f32]) {
    with_unary_fn!(op, f => map_in_place(x, f))
}

/// Binds `$f` to a binary op's f32 function and evaluates `$body` with it: one arm per
/// op, so the kernel inlines the arithmetic instead of calling through a pointer per
/// element.
macro_rules! with_binary_fn {
    ($op:expr, $f:ident => $body:expr) => {
        match $op {
            BinaryOp::Add => {
                let $f = |a: f32, b: f32| a + b;
                $body
            }
            BinaryOp::Sub => {
                let $f = |a: f32, b: f32| a - b;
                $body
            }
            BinaryOp::Mul => {
                let $f = |a: f32, b: f32| a * b;
                $body
            }
            BinaryOp::Div => {
                let $f = |a: f32, b: f32| a / b;
                $body
            }
            BinaryOp::Max => {
                let $f = f32::max;
                $body
            }
            BinaryOp::Min => {
                let $f = f32::min;
                $body
            }
        }
    };
}

/// `binary` on one chunk of equal-length operands, sequentially (a fused kernel's step).
pub(crate) fn binary_seq(op: BinaryOp, a: &[f32], b: &[f32], out: &mut [f32]) {
    with_binary_fn!(op, f => out
        .iter_mut()
        .zip(a.iter().zip(b))
        .for_each(|(o, (&a, &b))| *o = f(a, b)))
}

/// `a = f(a, b)` (`target` 0) or `b = f(a, b)` (`target` 1) for equal shapes: `binary`
/// without a separate output.
pub(crate) fn binary_in_place(op: BinaryOp, target: usize, v: &mut [f32], other: &[f32]) {
    with_binary_fn!(op, f => v
    .par_chunks_mut(CHUNK)
    .zip(other.par_chunks(CHUNK))
    .for_each(|(v, o)| {
        if target == 0 {
            v.iter_mut().zip(o).for_each(|(a, &b)| *a = f(*a, b));
        } else {
            v.iter_mut().zip(o).for_each(|(b, &a)| *b = f(a, *b));
        }
    }))
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
            with_binary_fn!(op, f => broadcast_apply(x, ash, y, bsh, o, &osh, f));
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
pub(crate) fn broadcast_strides(s: &Shape, rank: usize) -> Vec<usize> {
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
