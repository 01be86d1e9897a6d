//! Checks of the skinny f32 products (skinny.cu; part of `qplc cuda-check`):
//!
//! * every route and layout (small n with either axis of the big operand contiguous, small
//!   m, small k; transposes, batches, a bias, edge tiles, unaligned rows, split k, n and k
//!   from 1 to 64), with f32 and with bf16 big operands, against the CPU backend through
//!   `Backend::execute` at `TC_TOL`;
//! * a split product and a small-k product run twice give the same bits (fixed order);
//! * a small-k product fused with its epilogue gives the bits of the unfused ops;
//! * the LoRA products of a Llama-8B step at T = 4096: f32 big operands on skinny.cu and
//!   cuBLAS, bf16 big operands (the LoRA step's) on the tensor-core and the FMA kernels,
//!   the results compared and the times in the row name.
use super::check::{compare, CheckRow, F32_TOL};
use super::gemm::{Elem, Engine, Product};
use super::skinny::Tuning;
use super::{cuda_err, CudaBackend, DevData};
use crate::adapter_init::Pcg32;
use crate::backend::{Backend, KernelError};
use crate::tensor::HostTensor;
use crate::CpuBackend;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use qplc_ops::{DType, Op};
use std::time::Instant;

fn rand(rng: &mut Pcg32, shape: &[usize]) -> HostTensor {
    let n: usize = shape.iter().product();
    HostTensor::f32(
        shape.to_vec(),
        (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect(),
    )
}

/// Relative tolerance of the skinny products against the CPU: the FMA kernels reach ~1e-6,
/// and the tensor-core kernels must stay as close (three bf16 parts carry 24 bits; the
/// MMAs' truncating sums see at most a tile's worth of steps).
pub const TC_TOL: f64 = 1e-5;

fn failed(name: String, why: String) -> CheckRow {
    CheckRow {
        name,
        dtype: DType::F32,
        rel_err: f64::INFINITY,
        max_abs: f64::INFINITY,
        tol: F32_TOL,
        failure: why,
    }
}

/// Runs `op` on both backends and compares at `TC_TOL`.
fn parity(gpu: &CudaBackend, name: String, op: Op, inputs: &[HostTensor]) -> CheckRow {
    let refs: Vec<&HostTensor> = inputs.iter().collect();
    let want = match CpuBackend::new().eval(&op, &refs) {
        Ok(t) => t,
        Err(e) => return failed(name, format!("CPU: {e}")),
    };
    let got = (|| {
        let bufs = inputs
            .iter()
            .map(|t| gpu.upload(t))
            .collect::<Result<Vec<_>, _>>()?;
        let brefs: Vec<_> = bufs.iter().collect();
        let mut out = gpu.alloc(&want.ty)?;
        gpu.execute(&op, &brefs, &mut out)?;
        gpu.download(&out)
    })();
    match got {
        Ok(g) => compare(&name, &want, &g, TC_TOL),
        Err(e) => failed(name, format!("GPU: {e}")),
    }
}

const MM: Op = Op::MatMul {
    ta: false,
    tb: false,
};
const MM_TA: Op = Op::MatMul {
    ta: true,
    tb: false,
};
const MM_TB: Op = Op::MatMul {
    ta: false,
    tb: true,
};

/// Every route and layout at sizes off the tiles (128 rows, 32 k, 4-float alignment).
fn layout_cases(gpu: &CudaBackend, rng: &mut Pcg32) -> Vec<CheckRow> {
    let cases: Vec<(&str, Op, Vec<Vec<usize>>)> = vec![
        (
            "small n, x·Aᵀ, edge tiles",
            Op::Linear,
            vec![vec![1000, 700], vec![16, 700]],
        ),
        (
            "small n, x·Aᵀ, rows not float4-aligned",
            Op::Linear,
            vec![vec![300, 1001], vec![8, 1001]],
        ),
        (
            "small n, x·Aᵀ, k split",
            Op::Linear,
            vec![vec![256, 5000], vec![16, 5000]],
        ),
        (
            "small n, x·Aᵀ+bias, n=24",
            Op::Linear,
            vec![vec![200, 300], vec![24, 300], vec![24]],
        ),
        (
            "small n, n=40",
            Op::Linear,
            vec![vec![130, 520], vec![40, 520]],
        ),
        (
            "small n, n=64",
            Op::Linear,
            vec![vec![130, 520], vec![64, 520]],
        ),
        (
            "small n, n=1",
            Op::Linear,
            vec![vec![500, 300], vec![1, 300]],
        ),
        ("small n, g·B", MM, vec![vec![500, 2048], vec![2048, 16]]),
        (
            "small n, gᵀ·h (B grad)",
            MM_TA,
            vec![vec![3000, 520], vec![3000, 16]],
        ),
        (
            "small n, gᵀ·h, odd sizes",
            MM_TA,
            vec![vec![777, 333], vec![777, 8]],
        ),
        (
            "small n, ta tb",
            Op::MatMul { ta: true, tb: true },
            vec![vec![900, 260], vec![12, 900]],
        ),
        (
            "small m, hᵀ·x (A grad)",
            MM_TA,
            vec![vec![3000, 16], vec![3000, 700]],
        ),
        ("small m, a·bᵀ", MM_TB, vec![vec![16, 900], vec![1200, 900]]),
        ("small m, m=1", MM, vec![vec![1, 1500], vec![1500, 300]]),
        (
            "small k, h·Bᵀ",
            Op::Linear,
            vec![vec![1000, 16], vec![3000, 16]],
        ),
        ("small k, dh·A", MM, vec![vec![1000, 16], vec![16, 700]]),
        ("small k, ta", MM_TA, vec![vec![16, 1000], vec![16, 500]]),
        (
            "small k, odd n, k=8",
            Op::Linear,
            vec![vec![130, 8], vec![301, 8]],
        ),
        (
            "small k, k=50, bias",
            Op::Linear,
            vec![vec![260, 50], vec![190, 50], vec![190]],
        ),
        ("small k, k=1", MM, vec![vec![70, 1], vec![1, 90]]),
        ("small k, k=17, odd", MM, vec![vec![129, 17], vec![17, 67]]),
        (
            "small k, k=33, tb",
            Op::Linear,
            vec![vec![100, 33], vec![130, 33]],
        ),
        (
            "small k, k=64, ta tb",
            Op::MatMul { ta: true, tb: true },
            vec![vec![64, 200], vec![190, 64]],
        ),
        (
            "small k, k=16, 8B-like rows",
            Op::Linear,
            vec![vec![4096, 16], vec![1024, 16]],
        ),
        (
            "batched small n",
            MM,
            vec![vec![3, 300, 700], vec![3, 700, 16]],
        ),
        (
            "batched small n, ta",
            MM_TA,
            vec![vec![3, 600, 100], vec![3, 600, 16]],
        ),
        (
            "batched small m",
            MM_TA,
            vec![vec![2, 700, 8], vec![2, 700, 300]],
        ),
        (
            "batched small k",
            MM,
            vec![vec![3, 200, 8], vec![3, 8, 150]],
        ),
    ];
    cases
        .into_iter()
        .map(|(what, op, shapes)| {
            let inputs: Vec<HostTensor> = shapes.iter().map(|s| rand(rng, s)).collect();
            let dims: Vec<String> = shapes.iter().map(|s| format!("{s:?}")).collect();
            parity(
                gpu,
                format!("skinny {what} {}", dims.join("·")),
                op,
                &inputs,
            )
        })
        .collect()
}

/// Products whose big operand is bf16 (the simplify pass's folded LoRA casts), against the
/// CPU: the tensor-core kernels for both layouts of the big operand (contiguous along k:
/// `x·Aᵀ`, `g·B`; along the rows: `gᵀ·h`, `hᵀ·x`), every tile width, edge tiles, odd sizes,
/// unaligned rows (the plain-load staging), split k, batches. Shapes the bf16 kernels do not
/// take (small k, a bias, a bf16 small operand) go through the widening fallback and are
/// checked too.
fn bf16_big_cases(gpu: &CudaBackend, rng: &mut Pcg32) -> Vec<CheckRow> {
    // (what, op, shapes, which operand is bf16)
    let cases: Vec<(&str, Op, Vec<Vec<usize>>, usize)> = vec![
        (
            "x·Aᵀ",
            Op::Linear,
            vec![vec![2048, 4096], vec![16, 4096]],
            0,
        ),
        (
            "x·Aᵀ, edge tiles",
            Op::Linear,
            vec![vec![1000, 700], vec![16, 700]],
            0,
        ),
        (
            "x·Aᵀ, rows not 8-aligned",
            Op::Linear,
            vec![vec![300, 1001], vec![8, 1001]],
            0,
        ),
        (
            "x·Aᵀ, k split",
            Op::Linear,
            vec![vec![256, 5000], vec![16, 5000]],
            0,
        ),
        (
            "x·Aᵀ, n=1",
            Op::Linear,
            vec![vec![333, 640], vec![1, 640]],
            0,
        ),
        (
            "x·Aᵀ, n=24, k=20",
            Op::Linear,
            vec![vec![257, 20], vec![24, 20]],
            0,
        ),
        (
            "x·Aᵀ, n=32",
            Op::Linear,
            vec![vec![640, 1024], vec![32, 1024]],
            0,
        ),
        (
            "x·Aᵀ, n=40, odd",
            Op::Linear,
            vec![vec![777, 999], vec![40, 999]],
            0,
        ),
        (
            "x·Aᵀ, n=64",
            Op::Linear,
            vec![vec![520, 2048], vec![64, 2048]],
            0,
        ),
        ("g·B", MM, vec![vec![500, 2048], vec![2048, 16]], 0),
        (
            "g·B, n=64, odd",
            MM,
            vec![vec![301, 1003], vec![1003, 64]],
            0,
        ),
        (
            "gᵀ·h (B grad)",
            MM_TA,
            vec![vec![3000, 520], vec![3000, 16]],
            0,
        ),
        (
            "gᵀ·h, odd sizes",
            MM_TA,
            vec![vec![777, 333], vec![777, 8]],
            0,
        ),
        (
            "gᵀ·h, k split, edge tile",
            MM_TA,
            vec![vec![5000, 200], vec![5000, 16]],
            0,
        ),
        (
            "gᵀ·h, n=32",
            MM_TA,
            vec![vec![1000, 384], vec![1000, 32]],
            0,
        ),
        (
            "gᵀ·h, n=64, rows not 8-aligned",
            MM_TA,
            vec![vec![900, 261], vec![900, 64]],
            0,
        ),
        (
            "hᵀ·x (A grad)",
            MM_TA,
            vec![vec![3000, 16], vec![3000, 700]],
            1,
        ),
        (
            "hᵀ·x, m=32, odd",
            MM_TA,
            vec![vec![1001, 32], vec![1001, 515]],
            1,
        ),
        (
            "hᵀ·x, m=64",
            MM_TA,
            vec![vec![2048, 64], vec![2048, 256]],
            1,
        ),
        (
            "batched g·B",
            MM,
            vec![vec![3, 300, 700], vec![3, 700, 16]],
            0,
        ),
        (
            "batched gᵀ·h",
            MM_TA,
            vec![vec![2, 600, 136], vec![2, 600, 16]],
            0,
        ),
        (
            "small k (widened)",
            Op::Linear,
            vec![vec![1000, 16], vec![3000, 16]],
            0,
        ),
        (
            "bias (widened)",
            Op::Linear,
            vec![vec![200, 300], vec![24, 300], vec![24]],
            0,
        ),
        (
            "bf16 small side (widened)",
            MM,
            vec![vec![500, 2048], vec![2048, 16]],
            1,
        ),
    ];
    cases
        .into_iter()
        .map(|(what, op, shapes, narrow)| {
            let mut inputs: Vec<HostTensor> = shapes.iter().map(|s| rand(rng, s)).collect();
            inputs[narrow] = inputs[narrow].cast(DType::BF16);
            let dims: Vec<String> = shapes.iter().map(|s| format!("{s:?}")).collect();
            let name = format!("skinny bf16 operand {narrow}: {what} {}", dims.join("·"));
            parity(gpu, name, op, &inputs)
        })
        .collect()
}

/// A chain with a small-k product step gives the bits of the product run alone and the rest
/// of the chain run on its result (the generated kernel sums as `skinny_outer` does).
fn fused_product_exact(gpu: &CudaBackend, rng: &mut Pcg32) -> Vec<CheckRow> {
    use qplc_ops::{BinaryOp, FusedArg::Input as I, FusedArg::Step as S, FusedStep};
    let st = |op: Op, args| FusedStep { op, args };
    let mut rows = Vec::new();
    for (rows_, out, r) in [(4096, 14336, 16), (300, 1001, 16), (257, 1000, 64)] {
        let mut name = format!("skinny outer + epilogue [{rows_},{r}]·[{out},{r}]ᵀ = unfused");
        let h = rand(rng, &[rows_, r]);
        let b = rand(rng, &[out, r]);
        let base = rand(rng, &[rows_, out]).cast(DType::BF16);
        let tail = vec![
            st(Op::Cast { to: DType::BF16 }, vec![I(0)]),
            st(Op::Binary(BinaryOp::Add), vec![I(1), S(0)]),
        ];
        let fused = Op::Fused {
            steps: vec![
                st(Op::Linear, vec![I(0), I(1)]),
                st(Op::Cast { to: DType::BF16 }, vec![S(0)]),
                st(Op::Binary(BinaryOp::Add), vec![I(2), S(1)]),
            ],
        };
        let got = (|| {
            let (hg, bg, baseg) = (gpu.upload(&h)?, gpu.upload(&b)?, gpu.upload(&base)?);
            let ty = qplc_ops::TensorType::new([rows_, out], DType::BF16);
            let mut one = gpu.alloc(&ty)?;
            gpu.execute(&fused, &[&hg, &bg, &baseg], &mut one)?;
            let mut prod = gpu.alloc(&qplc_ops::TensorType::new([rows_, out], DType::F32))?;
            gpu.execute(&Op::Linear, &[&hg, &bg], &mut prod)?;
            let mut two = gpu.alloc(&ty)?;
            let tail = Op::Fused { steps: tail };
            gpu.execute(&tail, &[&prod, &baseg], &mut two)?;
            if rows_ == 4096 {
                let one_kernel = time_with(gpu, &mut || {
                    gpu.execute(&fused, &[&hg, &bg, &baseg], &mut one)
                })?;
                let two_kernels = time_with(gpu, &mut || {
                    gpu.execute(&Op::Linear, &[&hg, &bg], &mut prod)?;
                    gpu.execute(&tail, &[&prod, &baseg], &mut two)
                })?;
                name = format!(
                    "{name}: {:.1} µs, unfused {:.1} µs",
                    one_kernel * 1e6,
                    two_kernels * 1e6
                );
            }
            Ok::<_, KernelError>((gpu.download(&one)?, gpu.download(&two)?))
        })();
        rows.push(match got {
            Ok((one, two)) => compare(&name, &two, &one, 0.0),
            Err(e) => failed(name, e.to_string()),
        });
    }
    rows
}

/// Split products (f32 and bf16 big operand) and a small-k product, each run twice:
/// bit-identical results.
fn deterministic(gpu: &CudaBackend, rng: &mut Pcg32) -> Vec<CheckRow> {
    let cases: Vec<(&str, Op, HostTensor, HostTensor)> = vec![
        (
            "split-k f32",
            Op::Linear,
            rand(rng, &[256, 5000]),
            rand(rng, &[16, 5000]),
        ),
        (
            "split-k bf16 (tensor cores)",
            Op::Linear,
            rand(rng, &[256, 5000]).cast(DType::BF16),
            rand(rng, &[16, 5000]),
        ),
        (
            "split-k bf16 k-major (tensor cores)",
            MM_TA,
            rand(rng, &[5000, 256]).cast(DType::BF16),
            rand(rng, &[5000, 16]),
        ),
        (
            "small k (tensor cores)",
            Op::Linear,
            rand(rng, &[1000, 16]),
            rand(rng, &[700, 16]),
        ),
    ];
    cases
        .into_iter()
        .map(|(what, op, x, a)| {
            let name = format!("skinny {what} product, two runs bit-identical");
            let runs = (|| {
                let (xg, ag) = (gpu.upload(&x)?, gpu.upload(&a)?);
                let ty = op
                    .infer(&[x.ty.clone(), a.ty.clone()])
                    .map_err(|e| KernelError::new("skinny", e.message))?;
                let mut runs = Vec::new();
                for _ in 0..2 {
                    let mut out = gpu.alloc(&ty)?;
                    gpu.execute(&op, &[&xg, &ag], &mut out)?;
                    runs.push(gpu.download(&out)?);
                }
                Ok::<_, KernelError>(runs)
            })();
            match runs {
                Ok(r) => compare(&name, &r[0], &r[1], 0.0),
                Err(e) => failed(name, e.to_string()),
            }
        })
        .collect()
}

/// Elements of the fill that keeps the GPU busy (8 GB, about 2 ms) while the host queues
/// the timed runs.
const BUSY: usize = 1 << 31;

/// Mean seconds of 20 runs on the GPU (CUDA events) and of the host's queueing of one.
/// A long fill is queued first so that the GPU never waits for the host between runs:
/// the events then time the kernels, not the launch overhead.
fn time(
    gpu: &CudaBackend,
    engine: Engine,
    p: &Product,
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    c: &mut CudaSlice<f32>,
) -> Result<(f64, f64), KernelError> {
    let reps = 20;
    let event = |what| {
        gpu.stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| cuda_err("skinny check", what, e))
    };
    gpu.gemm_with(engine, "skinny check", p, Elem::F32, a, b, Elem::F32, c)?;
    let mut busy = gpu.scratch::<f32>(BUSY)?;
    gpu.fill_f32(&mut busy, BUSY, 0.0)?;
    let start = event("start event")?;
    let t = Instant::now();
    for _ in 0..reps {
        gpu.gemm_with(engine, "skinny check", p, Elem::F32, a, b, Elem::F32, c)?;
    }
    let host = t.elapsed().as_secs_f64() / reps as f64;
    let end = event("end event")?;
    let ms = start
        .elapsed_ms(&end)
        .map_err(|e| cuda_err("skinny check", "event time", e))?;
    Ok((ms as f64 * 1e-3 / reps as f64, host))
}

/// GPU seconds per call of `f`, from events around 20 calls queued behind a fill (as `time`).
fn time_with(
    gpu: &CudaBackend,
    f: &mut dyn FnMut() -> Result<(), KernelError>,
) -> Result<f64, KernelError> {
    let reps = 20;
    let event = |what| {
        gpu.stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| cuda_err("skinny check", what, e))
    };
    f()?;
    let mut busy = gpu.scratch::<f32>(BUSY)?;
    gpu.fill_f32(&mut busy, BUSY, 0.0)?;
    let start = event("start event")?;
    for _ in 0..reps {
        f()?;
    }
    let end = event("end event")?;
    let ms = start
        .elapsed_ms(&end)
        .map_err(|e| cuda_err("skinny check", "event time", e))?;
    Ok(ms as f64 * 1e-3 / reps as f64)
}

/// One Llama-8B LoRA product on both engines: compared, and timed in the row name (with
/// other split targets for the split products, to show the choice).
fn lora_8b(
    gpu: &CudaBackend,
    what: &str,
    p: &Product,
    big: &HostTensor,
    small: &HostTensor,
) -> Result<CheckRow, KernelError> {
    let (a_len, b_len) = (p.m * p.k, p.k * p.n);
    let take = |t: &HostTensor, n: usize, shape: &[usize]| {
        HostTensor::f32(shape.to_vec(), t.as_f32()[..n].to_vec())
    };
    // The bigger of a and b comes from `big`; shapes only matter for the element counts.
    let (ha, hb) = if a_len >= b_len {
        (take(big, a_len, &[a_len]), take(small, b_len, &[b_len]))
    } else {
        (take(small, a_len, &[a_len]), take(big, b_len, &[b_len]))
    };
    let (ag, bg) = (gpu.upload(&ha)?, gpu.upload(&hb)?);
    let ty = qplc_ops::TensorType::new([p.m, p.n], DType::F32);
    let (mut want, mut got) = (gpu.alloc(&ty)?, gpu.alloc(&ty)?);
    let (a, b) = (ag.f32("skinny check")?, bg.f32("skinny check")?);
    let (cublas, cublas_host) = time(gpu, Engine::Cublas, p, a, b, want.f32_mut("skinny check")?)?;
    // Other knobs of the small-n kernels, to show the defaults' choice.
    let mut alt = String::new();
    if super::skinny::route(p) == Some(super::skinny::Route::Outer) {
        let fma = Tuning {
            fma: true,
            ..Tuning::default()
        };
        let mut scratch = gpu.alloc(&ty)?;
        let (s, _) = time(
            gpu,
            Engine::Skinny(fma),
            p,
            a,
            b,
            scratch.f32_mut("skinny check")?,
        )?;
        alt.push_str(&format!(", FMA {:.1}", s * 1e6));
    }
    if p.k > 1024 {
        let variants = [
            (
                "2 stages",
                Tuning {
                    stages: Some(2),
                    ..Tuning::default()
                },
            ),
            (
                "4 stages",
                Tuning {
                    stages: Some(4),
                    ..Tuning::default()
                },
            ),
            (
                "1320 blocks",
                Tuning {
                    blocks: Some(1320),
                    ..Tuning::default()
                },
            ),
        ];
        for (what, tuning) in variants {
            let mut scratch = gpu.alloc(&ty)?;
            let (s, _) = time(
                gpu,
                Engine::Skinny(tuning),
                p,
                a,
                b,
                scratch.f32_mut("skinny check")?,
            )?;
            alt.push_str(&format!(", {what} {:.1}", s * 1e6));
        }
    }
    let (ours, host) = time(
        gpu,
        Engine::Skinny(Tuning::default()),
        p,
        a,
        b,
        got.f32_mut("skinny check")?,
    )?;
    let name = format!(
        "skinny 8B {what}: {:.1} µs, cuBLAS {:.1} µs ({:.1}×{alt}; host {:.0}/{:.0} µs)",
        ours * 1e6,
        cublas * 1e6,
        cublas / ours,
        host * 1e6,
        cublas_host * 1e6
    );
    Ok(compare(
        &name,
        &gpu.download(&want)?,
        &gpu.download(&got)?,
        F32_TOL,
    ))
}

/// One Llama-8B LoRA product with its big operand bf16 (as the LoRA step runs it): the
/// tensor-core kernel against the FMA kernel, compared at `TC_TOL`, both timed in the row
/// name. `big_is_a`: the big operand is `a` (small n) rather than `b` (small m).
fn lora_8b_bf16(
    gpu: &CudaBackend,
    what: &str,
    p: &Product,
    big: &HostTensor,
    small: &HostTensor,
    big_is_a: bool,
) -> Result<CheckRow, KernelError> {
    let (big_len, small_len) = if big_is_a {
        (p.m * p.k, p.k * p.n)
    } else {
        (p.k * p.n, p.m * p.k)
    };
    let hb = HostTensor::f32(vec![big_len], big.as_f32()[..big_len].to_vec()).cast(DType::BF16);
    let hs = HostTensor::f32(vec![small_len], small.as_f32()[..small_len].to_vec());
    let (bg, sg) = (gpu.upload(&hb)?, gpu.upload(&hs)?);
    let DevData::BF16(wide) = bg.data() else {
        return Err(KernelError::new(
            "skinny check",
            "bf16 upload not held as bf16",
        ));
    };
    let narrow = sg.f32("skinny check")?;
    let ty = qplc_ops::TensorType::new([p.m, p.n], DType::F32);
    let (mut want, mut got) = (gpu.alloc(&ty)?, gpu.alloc(&ty)?);
    let run = |tuning: Tuning, c: &mut CudaSlice<f32>| -> Result<(), KernelError> {
        let ran = if big_is_a {
            gpu.gemm_bf16_big("skinny check", p, wide, narrow, true, c, tuning)?
        } else {
            gpu.gemm_bf16_big("skinny check", p, narrow, wide, false, c, tuning)?
        };
        if ran {
            Ok(())
        } else {
            Err(KernelError::new(
                "skinny check",
                "no bf16 kernel for this product",
            ))
        }
    };
    let fma = Tuning {
        fma: true,
        ..Tuning::default()
    };
    let want_c = want.f32_mut("skinny check")?;
    let t_fma = time_with(gpu, &mut || run(fma, &mut *want_c))?;
    // Other depths of the tensor-core pipeline, to show the default's choice.
    let mut alt = String::new();
    for stages in [3, 4] {
        let mut scratch = gpu.alloc(&ty)?;
        let c = scratch.f32_mut("skinny check")?;
        let tuning = Tuning {
            stages: Some(stages),
            ..Tuning::default()
        };
        let t = time_with(gpu, &mut || run(tuning, &mut *c))?;
        alt.push_str(&format!(", {stages} stages {:.1}", t * 1e6));
    }
    let got_c = got.f32_mut("skinny check")?;
    let t_tc = time_with(gpu, &mut || run(Tuning::default(), &mut *got_c))?;
    let name = format!(
        "skinny 8B bf16 {what}: tensor cores {:.1} µs, FMA {:.1} µs ({:.2}×{alt})",
        t_tc * 1e6,
        t_fma * 1e6,
        t_fma / t_tc
    );
    Ok(compare(
        &name,
        &gpu.download(&want)?,
        &gpu.download(&got)?,
        TC_TOL,
    ))
}

/// The memory floor to read the products' times against: a device-to-device copy of the
/// biggest operand (f32 [4096, 14336], 235 MB read and 235 MB written), timed like them.
fn copy_bandwidth(gpu: &CudaBackend) -> Result<CheckRow, KernelError> {
    let n = 4096 * 14336;
    let src = gpu.scratch::<f32>(n)?;
    let mut dst = gpu.scratch::<f32>(n)?;
    let reps = 10;
    let mut busy = gpu.scratch::<f32>(BUSY)?;
    gpu.fill_f32(&mut busy, BUSY, 0.0)?;
    let event = || {
        gpu.stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| cuda_err("skinny check", "event", e))
    };
    let start = event()?;
    for _ in 0..reps {
        gpu.stream
            .memcpy_dtod(&*src, &mut *dst)
            .map_err(|e| cuda_err("skinny check", "device copy", e))?;
    }
    let end = event()?;
    let s = start
        .elapsed_ms(&end)
        .map_err(|e| cuda_err("skinny check", "event time", e))? as f64
        * 1e-3
        / reps as f64;
    let mut row = failed(
        format!(
            "skinny floor: device copy f32 [4096,14336] {:.1} µs, {:.2} TB/s read+write",
            s * 1e6,
            2.0 * (n * 4) as f64 / s / 1e12
        ),
        String::new(),
    );
    (row.rel_err, row.max_abs) = (0.0, 0.0);
    Ok(row)
}

/// The adapter products of one Llama-8B LoRA step (T = 4096, rank 16).
fn lora_8b_products(gpu: &CudaBackend, rng: &mut Pcg32) -> Vec<CheckRow> {
    let (t, h, f, kv, r) = (4096usize, 4096usize, 14336usize, 1024usize, 16usize);
    let big = rand(rng, &[t * f]);
    let small = rand(rng, &[f * r]);
    let shapes: Vec<(&str, Product)> = vec![
        (
            "x·Aᵀ [4096,4096]·[16,4096]ᵀ",
            Product::dense(false, true, t, h, r),
        ),
        (
            "x·Aᵀ [4096,14336]·[16,14336]ᵀ",
            Product::dense(false, true, t, f, r),
        ),
        (
            "g·B [4096,4096]·[4096,16]",
            Product::dense(false, false, t, h, r),
        ),
        (
            "g·B [4096,14336]·[14336,16]",
            Product::dense(false, false, t, f, r),
        ),
        (
            "A grad hᵀ·x → [16,4096]",
            Product::dense(true, false, r, t, h),
        ),
        (
            "A grad hᵀ·x → [16,14336]",
            Product::dense(true, false, r, t, f),
        ),
        (
            "B grad gᵀ·h → [1024,16]",
            Product::dense(true, false, kv, t, r),
        ),
        (
            "B grad gᵀ·h → [4096,16]",
            Product::dense(true, false, h, t, r),
        ),
        (
            "B grad gᵀ·h → [14336,16]",
            Product::dense(true, false, f, t, r),
        ),
        ("h·Bᵀ → [4096,4096]", Product::dense(false, true, t, r, h)),
        ("h·Bᵀ → [4096,14336]", Product::dense(false, true, t, r, f)),
        ("dh·A → [4096,4096]", Product::dense(false, false, t, r, h)),
    ];
    let mut rows: Vec<CheckRow> = shapes
        .into_iter()
        .map(|(what, p)| {
            lora_8b(gpu, what, &p, &big, &small)
                .unwrap_or_else(|e| failed(format!("skinny 8B {what}"), e.to_string()))
        })
        .collect();
    // The LoRA step's own operands: x and the output gradients are bf16.
    let bf16: Vec<(&str, Product, bool)> = vec![
        (
            "x·Aᵀ [4096,4096]·[16,4096]ᵀ",
            Product::dense(false, true, t, h, r),
            true,
        ),
        (
            "x·Aᵀ [4096,14336]·[16,14336]ᵀ",
            Product::dense(false, true, t, f, r),
            true,
        ),
        (
            "g·B [4096,4096]·[4096,16]",
            Product::dense(false, false, t, h, r),
            true,
        ),
        (
            "g·B [4096,14336]·[14336,16]",
            Product::dense(false, false, t, f, r),
            true,
        ),
        (
            "A grad hᵀ·x → [16,4096]",
            Product::dense(true, false, r, t, h),
            false,
        ),
        (
            "A grad hᵀ·x → [16,14336]",
            Product::dense(true, false, r, t, f),
            false,
        ),
        (
            "B grad gᵀ·h → [1024,16]",
            Product::dense(true, false, kv, t, r),
            true,
        ),
        (
            "B grad gᵀ·h → [4096,16]",
            Product::dense(true, false, h, t, r),
            true,
        ),
        (
            "B grad gᵀ·h → [14336,16]",
            Product::dense(true, false, f, t, r),
            true,
        ),
    ];
    for (what, p, big_is_a) in bf16 {
        rows.push(
            lora_8b_bf16(gpu, what, &p, &big, &small, big_is_a)
                .unwrap_or_else(|e| failed(format!("skinny 8B bf16 {what}"), e.to_string())),
        );
    }
    gpu.trim_cache();
    rows
}

/// All skinny-product checks (see the module comment).
pub fn skinny_checks(gpu: &CudaBackend, seed: u64) -> Vec<CheckRow> {
    let mut rng = Pcg32::new(seed, 31);
    let mut rows = layout_cases(gpu, &mut rng);
    rows.extend(bf16_big_cases(gpu, &mut rng));
    rows.extend(fused_product_exact(gpu, &mut rng));
    rows.extend(deterministic(gpu, &mut rng));
    rows.push(
        copy_bandwidth(gpu)
            .unwrap_or_else(|e| failed("skinny floor: device copy".into(), e.to_string())),
    );
    rows.extend(lora_8b_products(gpu, &mut rng));
    rows
}
