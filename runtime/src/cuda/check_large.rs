//! GPU checks at training sizes (part of `qplc cuda-check`): the fused cross-entropy on
//! Llama-3 logits (T = 4096, V = 128 256, bf16: 5.3·10⁸ elements, past 2³¹ bytes) and a bf16
//! MLP product on the tensor cores ([4096, 4096]·[14336, 4096]ᵀ), each compared with the
//! CPU backend and timed; the timings go into the row names of the table.
use super::check::{compare, CheckRow, BF16_TOL, F32_TOL};
use super::{CudaBackend, CudaTensor};
use crate::adapter_init::Pcg32;
use crate::backend::{Backend, KernelError};
use crate::tensor::Data;
use crate::{CpuBackend, HostTensor};
use qplc_ops::{DType, Op, Shape};
use std::time::Instant;

fn row_failed(name: String, why: String) -> CheckRow {
    CheckRow {
        name,
        dtype: DType::BF16,
        rel_err: f64::INFINITY,
        max_abs: f64::INFINITY,
        tol: BF16_TOL,
        failure: why,
    }
}

/// `n` values uniform in `[lo, hi)`, rounded to bf16, as a host tensor of `shape`.
fn bf16_tensor(rng: &mut Pcg32, shape: &[usize], lo: f32, hi: f32) -> HostTensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| half::bf16::from_f32(rng.uniform(lo, hi)).to_f32())
        .collect();
    HostTensor {
        ty: qplc_ops::TensorType::new(shape.to_vec(), DType::BF16),
        data: Data::F32(v),
    }
}

/// Runs `op` on the GPU once, synchronised, returning the output and the seconds it took.
fn timed(
    gpu: &CudaBackend,
    op: &Op,
    operands: &[&CudaTensor],
    out_ty: &qplc_ops::TensorType,
) -> Result<(CudaTensor, f64), KernelError> {
    let mut out = gpu.alloc(out_ty)?;
    gpu.synchronize()?;
    let t = Instant::now();
    gpu.execute(op, operands, &mut out)?;
    gpu.synchronize()?;
    Ok((out, t.elapsed().as_secs_f64()))
}

/// Cross-entropy forward and backward on bf16 logits [4096, 128256].
fn cross_entropy_llama3(gpu: &CudaBackend, seed: u64) -> Result<Vec<CheckRow>, KernelError> {
    let (t, v) = (4096usize, 128_256usize);
    let mut rng = Pcg32::new(seed, 21);
    let z = bf16_tensor(&mut rng, &[t, v], -12.0, 12.0);
    let y: Vec<i32> = (0..t)
        .map(|i| {
            if i % 17 == 0 {
                -100
            } else {
                (rng.next_u32() % v as u32) as i32
            }
        })
        .collect();
    let y = HostTensor::i32([t], y);
    let g = HostTensor::f32(Shape::scalar(), vec![1.0]);
    let cpu = CpuBackend::new();
    let want_loss = cpu.eval(&Op::CrossEntropy, &[&z, &y])?;
    let want_grad = cpu.eval(&Op::CrossEntropyBackward, &[&z, &y, &g])?;
    let (zg, yg, gg) = (gpu.upload(&z)?, gpu.upload(&y)?, gpu.upload(&g)?);
    drop(z);
    // bf16 storage is 2 bytes an element on the device.
    let mut storage = row_failed(
        format!(
            "bf16 logits on the device: {:.3} GB for {} elements",
            zg.device_bytes() as f64 / 1e9,
            t * v
        ),
        String::new(),
    );
    storage.rel_err = 0.0;
    storage.max_abs = 0.0;
    if zg.device_bytes() != 2 * t * v {
        storage.failure = format!("{} bytes, expected {}", zg.device_bytes(), 2 * t * v);
    }
    let (loss, fwd_s) = timed(gpu, &Op::CrossEntropy, &[&zg, &yg], &want_loss.ty)?;
    let (grad, bwd_s) = timed(
        gpu,
        &Op::CrossEntropyBackward,
        &[&zg, &yg, &gg],
        &want_grad.ty,
    )?;
    let mut a = compare(
        &format!("cross_entropy T=4096 V=128256 ({:.1} ms)", fwd_s * 1e3),
        &want_loss,
        &gpu.download(&loss)?,
        F32_TOL,
    );
    a.dtype = DType::BF16;
    let b = compare(
        &format!("cross_entropy bwd T=4096 V=128256 ({:.1} ms)", bwd_s * 1e3),
        &want_grad,
        &gpu.download(&grad)?,
        BF16_TOL,
    );
    Ok(vec![storage, a, b])
}

/// The Llama-8B MLP up-projection in bf16: timed over repeated runs (TFLOP/s in the row
/// name), the first rows compared with the CPU.
fn linear_mlp(gpu: &CudaBackend, seed: u64) -> Result<CheckRow, KernelError> {
    let (m, k, n) = (4096usize, 4096usize, 14336usize);
    let mut rng = Pcg32::new(seed, 23);
    let x = bf16_tensor(&mut rng, &[m, k], -1.0, 1.0);
    let w = bf16_tensor(&mut rng, &[n, k], -0.05, 0.05);
    let (xg, wg) = (gpu.upload(&x)?, gpu.upload(&w)?);
    let ty = qplc_ops::TensorType::new([m, n], DType::BF16);
    let mut out = gpu.alloc(&ty)?;
    gpu.execute(&Op::Linear, &[&xg, &wg], &mut out)?;
    gpu.synchronize()?;
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        gpu.execute(&Op::Linear, &[&xg, &wg], &mut out)?;
    }
    gpu.synchronize()?;
    let s = t.elapsed().as_secs_f64() / reps as f64;
    let tflops = 2.0 * (m * k * n) as f64 / s / 1e12;
    // The CPU reference on the first rows only (the whole product is 0.5 PFLOP of work).
    let rows = 16;
    let x_head = HostTensor {
        ty: qplc_ops::TensorType::new([rows, k], DType::BF16),
        data: Data::F32(x.as_f32()[..rows * k].to_vec()),
    };
    let want = CpuBackend::new().eval(&Op::Linear, &[&x_head, &w])?;
    let got = gpu.download(&out)?;
    let got_head = HostTensor {
        ty: want.ty.clone(),
        data: Data::F32(got.as_f32()[..rows * n].to_vec()),
    };
    let mut r = compare(
        &format!(
            "linear bf16 [4096,4096]·[14336,4096]ᵀ {:.2} ms {tflops:.0} TFLOP/s",
            s * 1e3
        ),
        &want,
        &got_head,
        BF16_TOL,
    );
    r.dtype = DType::BF16;
    Ok(r)
}

/// RMS norm forward, backward and weight gradient at the 8B hidden size ([4096, 4096] bf16):
/// each timed and compared with the CPU.
fn rms_norm_8b(gpu: &CudaBackend, seed: u64) -> Result<Vec<CheckRow>, KernelError> {
    let (t, h) = (4096usize, 4096usize);
    let mut rng = Pcg32::new(seed, 25);
    let x = bf16_tensor(&mut rng, &[t, h], -2.0, 2.0);
    let w = bf16_tensor(&mut rng, &[h], 0.5, 1.5);
    let g = bf16_tensor(&mut rng, &[t, h], -1.0, 1.0);
    let (xg, wg, gg) = (gpu.upload(&x)?, gpu.upload(&w)?, gpu.upload(&g)?);
    let cases: [(&str, Op, Vec<&HostTensor>, Vec<&CudaTensor>); 3] = [
        (
            "rms_norm",
            Op::RmsNorm {
                eps: 1e-5,
                offset: 0.0,
            },
            vec![&x, &w],
            vec![&xg, &wg],
        ),
        (
            "rms_norm backward",
            Op::RmsNormBackward {
                eps: 1e-5,
                offset: 0.0,
            },
            vec![&x, &w, &g],
            vec![&xg, &wg, &gg],
        ),
        (
            "rms_norm weight grad",
            Op::RmsNormWeightGrad { eps: 1e-5 },
            vec![&x, &g],
            vec![&xg, &gg],
        ),
    ];
    let cpu = CpuBackend::new();
    let mut rows = Vec::new();
    for (name, op, host, dev) in cases {
        let want = cpu.eval(&op, &host)?;
        // The first run loads the kernel; the second is timed.
        timed(gpu, &op, &dev, &want.ty)?;
        let (out, s) = timed(gpu, &op, &dev, &want.ty)?;
        let mut r = compare(
            &format!("{name} [4096,4096] ({:.2} ms)", s * 1e3),
            &want,
            &gpu.download(&out)?,
            BF16_TOL,
        );
        r.dtype = DType::BF16;
        rows.push(r);
    }
    Ok(rows)
}

/// The training-size checks; each failure (including running out of memory) is a row.
pub fn large_checks(gpu: &CudaBackend, seed: u64) -> Vec<CheckRow> {
    let mut rows = Vec::new();
    match cross_entropy_llama3(gpu, seed) {
        Ok(r) => rows.extend(r),
        Err(e) => rows.push(row_failed(
            "cross_entropy T=4096 V=128256".into(),
            e.to_string(),
        )),
    }
    match linear_mlp(gpu, seed) {
        Ok(r) => rows.push(r),
        Err(e) => rows.push(row_failed(
            "linear bf16 4096x4096x14336".into(),
            e.to_string(),
        )),
    }
    match rms_norm_8b(gpu, seed) {
        Ok(r) => rows.extend(r),
        Err(e) => rows.push(row_failed("rms_norm [4096,4096]".into(), e.to_string())),
    }
    // The big buffers are cached now; give them back so later checks start lean.
    gpu.trim_cache();
    rows
}
