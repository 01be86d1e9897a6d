//! In-place forms of the elementwise ops (`Backend::execute_in_place`): when an operand
//! dies at the op that reads it, the result overwrites it instead of a fresh buffer. The
//! backward graph is mostly such chains (gradient sums, LoRA scalings, activation
//! derivatives), and writing over a buffer that is already in cache halves their memory
//! traffic. Each form applies the same element function as the out-of-place kernel, so
//! results are identical bit for bit.
use super::{check_storage, elementwise, elementwise_backward, f32s, round_in_place};
use crate::backend::KernelError;
use crate::tensor::Data;
use crate::HostTensor;
use qplc_ops::{Op, TensorType};

/// Runs `op` over `buf` (operand `target`) when it has an in-place form for these
/// operands; `Ok(false)` leaves `buf` untouched.
pub(crate) fn execute(
    op: &Op,
    target: usize,
    buf: &mut HostTensor,
    others: &[&HostTensor],
    out_ty: &TensorType,
) -> Result<bool, KernelError> {
    let name = op.name();
    // A reshape of a dying value is a relabelling: no copy.
    if let Op::Reshape { .. } = op {
        let ok = target == 0
            && others.is_empty()
            && buf.ty.dtype == out_ty.dtype
            && buf.ty.shape.numel() == out_ty.shape.numel();
        if ok {
            buf.ty = out_ty.clone();
        }
        return Ok(ok);
    }
    // Only float results the size of the target, from operands of the target's own shape
    // (no broadcasting): then element i of the result depends on element i only.
    let same_shape = others.iter().all(|o| o.ty.shape == buf.ty.shape);
    let supported = matches!(
        op,
        Op::Unary(_)
            | Op::Scale { .. }
            | Op::AddScalar { .. }
            | Op::Softcap { .. }
            | Op::Binary(_)
            | Op::UnaryBackward(_)
    );
    if !supported
        || !same_shape
        || !out_ty.dtype.is_float()
        || buf.ty.shape != out_ty.shape
        || !matches!(buf.data, Data::F32(_))
        || target > others.len()
    {
        return Ok(false);
    }
    let mut tys: Vec<TensorType> = others.iter().map(|t| t.ty.clone()).collect();
    tys.insert(target, buf.ty.clone());
    let ty = op
        .infer(&tys)
        .map_err(|e| KernelError::new(name, e.to_string()))?;
    if ty != *out_ty {
        return Err(KernelError::new(
            name,
            format!("the output is {out_ty} but the op produces {ty}"),
        ));
    }
    check_storage(name, "operand", buf)?;
    for (i, t) in others.iter().enumerate() {
        check_storage(name, &format!("operand {i}"), t)?;
        if !matches!(t.data, Data::F32(_)) {
            return Ok(false);
        }
    }
    let Data::F32(v) = &mut buf.data else {
        return Ok(false);
    };
    match op {
        Op::Unary(u) => elementwise::unary_in_place(*u, v),
        Op::Scale { factor } => {
            let f = *factor as f32;
            elementwise::map_in_place(v, |x| x * f);
        }
        Op::AddScalar { value } => {
            let c = *value as f32;
            elementwise::map_in_place(v, |x| x + c);
        }
        Op::Softcap { cap } => {
            let c = *cap as f32;
            elementwise::map_in_place(v, |x| c * (x / c).tanh());
        }
        Op::Binary(b) => elementwise::binary_in_place(*b, target, v, f32s(name, others[0])?),
        Op::UnaryBackward(u) => {
            elementwise_backward::unary_backward_in_place(*u, target, v, f32s(name, others[0])?)
        }
        _ => unreachable!("filtered above"),
    }
    round_in_place(v, out_ty.dtype);
    buf.ty = out_ty.clone();
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::execute;
    use crate::cpu::CpuBackend;
    use crate::HostTensor;
    use qplc_ops::{BinaryOp, Op, UnaryOp};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2000) as f32 / 500.0 - 2.0
            })
            .collect()
    }

    /// Every in-place form gives the out-of-place kernel's result bit for bit, for either
    /// operand written over.
    #[test]
    fn in_place_results_equal_the_out_of_place_kernels_bitwise() {
        let n = 40_000;
        let a = HostTensor::f32([200, 200], values(n, 1));
        let b = HostTensor::f32([200, 200], values(n, 7).iter().map(|x| x + 2.5).collect());
        let mut ops = vec![
            Op::Scale { factor: 0.37 },
            Op::AddScalar { value: -1.25 },
            Op::Softcap { cap: 1.5 },
        ];
        for u in [
            UnaryOp::Exp,
            UnaryOp::Silu,
            UnaryOp::Gelu,
            UnaryOp::Neg,
            UnaryOp::Tanh,
        ] {
            ops.push(Op::Unary(u));
            ops.push(Op::UnaryBackward(u));
        }
        for bop in [
            BinaryOp::Add,
            BinaryOp::Sub,
            BinaryOp::Mul,
            BinaryOp::Div,
            BinaryOp::Max,
        ] {
            ops.push(Op::Binary(bop));
        }
        let cpu = CpuBackend::new();
        for op in ops {
            let arity = match op {
                Op::Binary(_) | Op::UnaryBackward(_) => 2,
                _ => 1,
            };
            let operands: Vec<&HostTensor> = [&a, &b][..arity].to_vec();
            let want = cpu.eval(&op, &operands).unwrap();
            for target in 0..arity {
                let mut buf = operands[target].clone();
                let others: Vec<&HostTensor> = operands
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != target)
                    .map(|(_, t)| *t)
                    .collect();
                assert!(execute(&op, target, &mut buf, &others, &want.ty).unwrap());
                let same = buf
                    .as_f32()
                    .iter()
                    .zip(want.as_f32())
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{op:?} over operand {target}");
            }
        }
    }

    #[test]
    fn broadcasting_and_matrix_ops_are_declined() {
        let a = HostTensor::f32([4, 3], values(12, 1));
        let row = HostTensor::f32([3], values(3, 2));
        let mut buf = a.clone();
        let ty = a.ty.clone();
        assert!(!execute(&Op::Binary(BinaryOp::Add), 0, &mut buf, &[&row], &ty).unwrap());
        assert_eq!(buf, a);
    }
}
