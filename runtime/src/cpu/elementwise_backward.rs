//! Gradients of elementwise ops that have no short expression in other ops: `g·f'(x)` for
//! the activations (`UnaryBackward`) and the broadcast-shaped partial derivatives of binary
//! ops (`BinaryBackward`, used for max/min). Computed in f32 like the forward maps (exact
//! GELU's derivative in f64).
use super::elementwise::broadcast_apply;
use super::{f32s, f32s_mut};
use crate::backend::KernelError;
use crate::HostTensor;
use qplc_ops::{BinaryOp, UnaryOp};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// f'(x) for each unary function.
pub(crate) fn derivative(op: UnaryOp) -> fn(f32) -> f32 {
    match op {
        UnaryOp::Neg => |_| -1.0,
        UnaryOp::Exp => f32::exp,
        UnaryOp::Log => |x| 1.0 / x,
        UnaryOp::Tanh => |x| {
            let t = x.tanh();
            1.0 - t * t
        },
        UnaryOp::Sqrt => |x| 0.5 / x.sqrt(),
        UnaryOp::Rsqrt => |x| -0.5 / (x * x.sqrt()),
        UnaryOp::Recip => |x| -1.0 / (x * x),
        UnaryOp::Square => |x| 2.0 * x,
        // The subgradient 0 at 0, as torch.
        UnaryOp::Relu => |x| if x > 0.0 { 1.0 } else { 0.0 },
        UnaryOp::Sigmoid => |x| {
            let s = sigmoid(x);
            s * (1.0 - s)
        },
        // d(x·σ(x)) = σ(x)·(1 + x·(1 − σ(x)))
        UnaryOp::Silu => |x| {
            let s = sigmoid(x);
            s * (1.0 + x * (1.0 - s))
        },
        // d(x·Φ(x)) = Φ(x) + x·φ(x)
        UnaryOp::Gelu => |x| {
            let x = x as f64;
            let cdf = 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            (cdf + x * pdf) as f32
        },
        // ½(1 + t) + ½x(1 − t²)·k(1 + 3·0.044715x²), t = tanh(k(x + 0.044715x³))
        UnaryOp::GeluTanh => |x| {
            const K: f32 = 0.797_884_6;
            let (k, t) = (K, (K * (x + 0.044715 * x * x * x)).tanh());
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x)
        },
    }
}

/// `unary_backward` over one operand's storage: `target` 0 overwrites x, 1 overwrites g.
pub(crate) fn unary_backward_in_place(op: UnaryOp, target: usize, v: &mut [f32], other: &[f32]) {
    let f = derivative(op);
    v.par_chunks_mut(CHUNK)
        .zip(other.par_chunks(CHUNK))
        .for_each(|(v, o)| {
            if target == 0 {
                v.iter_mut().zip(o).for_each(|(x, &g)| *x = g * f(*x));
            } else {
                v.iter_mut().zip(o).for_each(|(g, &x)| *g *= f(x));
            }
        });
}

pub(crate) fn unary_backward(
    op: UnaryOp,
    x: &HostTensor,
    g: &HostTensor,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let name = "unary_backward";
    let (x, g) = (f32s(name, x)?, f32s(name, g)?);
    let f = derivative(op);
    f32s_mut(name, out)?
        .par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(o, (x, g))| {
            for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                *o = g * f(x);
            }
        });
    Ok(())
}

/// ∂ op(a, b) / ∂ operand `wrt`, as a function of (a, b).
pub(crate) fn partial(op: BinaryOp, wrt: usize) -> fn(f32, f32) -> f32 {
    match (op, wrt) {
        (BinaryOp::Add, _) | (BinaryOp::Sub, 0) => |_, _| 1.0,
        (BinaryOp::Sub, _) => |_, _| -1.0,
        (BinaryOp::Mul, 0) => |_, b| b,
        (BinaryOp::Mul, _) => |a, _| a,
        (BinaryOp::Div, 0) => |_, b| 1.0 / b,
        (BinaryOp::Div, _) => |a, b| -a / (b * b),
        // Ties go to `a`, as `f32::max` returns either and torch's `maximum` splits; any
        // choice is a valid subgradient, and the documented one is `a ≥ b`.
        (BinaryOp::Max, 0) => |a, b| if a >= b { 1.0 } else { 0.0 },
        (BinaryOp::Max, _) => |a, b| if a >= b { 0.0 } else { 1.0 },
        (BinaryOp::Min, 0) => |a, b| if a <= b { 1.0 } else { 0.0 },
        (BinaryOp::Min, _) => |a, b| if a <= b { 0.0 } else { 1.0 },
    }
}

pub(crate) fn binary_backward(
    op: BinaryOp,
    wrt: usize,
    a: &HostTensor,
    b: &HostTensor,
    g: &HostTensor,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let name = "binary_backward";
    let osh = out.ty.shape.clone();
    let (av, bv, gv) = (f32s(name, a)?, f32s(name, b)?, f32s(name, g)?);
    let o = f32s_mut(name, out)?;
    broadcast_apply(av, &a.ty.shape, bv, &b.ty.shape, o, &osh, partial(op, wrt));
    o.par_chunks_mut(CHUNK)
        .zip(gv.par_chunks(CHUNK))
        .for_each(|(o, g)| o.iter_mut().zip(g).for_each(|(o, &g)| *o *= g));
    Ok(())
}
