//! GPU-vs-CPU parity checks (issue 6 acceptance; `qplc cuda-check`, scripts/gpu-tests.sh).
//!
//! Every op of the vocabulary runs on both backends with fresh random inputs (a new seed
//! each run, printed so a failure can be replayed), in f32 and in bf16 storage; the GPU
//! output buffers are poisoned (NaN / `i32::MIN`) before the kernel runs, so an element a
//! kernel forgets to write fails the comparison (METHOD.md). Then the tiny model's forward
//! pass and one LoRA training step (loss and every adapter gradient) run on both.
//!
//! The measure is `‖gpu − cpu‖ / ‖cpu‖` over the whole output (METHOD.md), with tolerances
//! 1e-4 (f32) and 1e-2 (bf16); a NaN or infinity where the CPU has a finite value fails.
use super::{CudaBackend, CudaTensor};
use crate::adapter_init::{init_lora_weights, Pcg32};
use crate::backend::{Backend, KernelError};
use crate::checkpoint::Checkpoint;
use crate::executor::Program;
use crate::model::ModelDir;
use crate::tensor::{Data, HostTensor};
use crate::CpuBackend;
use anyhow::{Context, Result};
use qplc_compiler::config::LoadedConfig;
use qplc_ops::{BinaryOp, DType, Op, ReduceOp, Rope, RopeScaling, Shape, TensorType, UnaryOp};
use qplc_passes::{grad_output_name, AutodiffPass, LoraPass, LossPass, PassContext, PassManager};
use std::collections::HashMap;
use std::path::Path;

/// Relative tolerance for f32 storage.
pub const F32_TOL: f64 = 1e-4;
/// Relative tolerance for bf16 storage.
pub const BF16_TOL: f64 = 1e-2;

/// One comparison.
#[derive(Clone, Debug)]
pub struct CheckRow {
    pub name: String,
    pub dtype: DType,
    /// `‖gpu − cpu‖ / ‖cpu‖` (absolute norm where the reference is all zeros).
    pub rel_err: f64,
    pub max_abs: f64,
    pub tol: f64,
    /// Empty when the comparison passed; otherwise why it failed.
    pub failure: String,
}

impl CheckRow {
    pub fn ok(&self) -> bool {
        self.failure.is_empty()
    }
}

/// Compares two host tensors of the same type.
pub fn compare(name: &str, cpu: &HostTensor, gpu: &HostTensor, tol: f64) -> CheckRow {
    let mut row = CheckRow {
        name: name.to_string(),
        dtype: cpu.ty.dtype,
        rel_err: 0.0,
        max_abs: 0.0,
        tol,
        failure: String::new(),
    };
    if cpu.ty != gpu.ty {
        row.failure = format!("type {} vs {}", gpu.ty, cpu.ty);
        return row;
    }
    match (&cpu.data, &gpu.data) {
        (Data::F32(c), Data::F32(g)) => {
            let (mut num, mut den) = (0.0f64, 0.0f64);
            let mut bad = None;
            for (i, (&c, &g)) in c.iter().zip(g).enumerate() {
                if c.is_finite() && !g.is_finite() && bad.is_none() {
                    bad = Some((i, g, c));
                }
                if c.is_finite() && g.is_finite() {
                    let d = (g as f64 - c as f64).abs();
                    num += d * d;
                    den += (c as f64) * (c as f64);
                    row.max_abs = row.max_abs.max(d);
                }
            }
            row.rel_err = if den > 0.0 {
                (num / den).sqrt()
            } else {
                num.sqrt()
            };
            if let Some((i, g, c)) = bad {
                row.failure = format!("element {i} is {g} on the GPU, {c} on the CPU");
                row.rel_err = f64::INFINITY;
            } else if row.rel_err.is_nan() || row.rel_err > tol {
                row.failure = format!("relative error {:.2e} > {tol:.0e}", row.rel_err);
            }
        }
        (Data::I32(c), Data::I32(g)) => {
            if let Some(i) = c.iter().zip(g).position(|(a, b)| a != b) {
                row.failure = format!("element {i} is {} on the GPU, {} on the CPU", g[i], c[i]);
                row.rel_err = f64::INFINITY;
            }
        }
        _ => row.failure = "storage kinds differ".into(),
    }
    row
}

/// Random operands for op cases.
struct Gen(Pcg32);

impl Gen {
    fn f(&mut self, shape: &[usize], lo: f32, hi: f32) -> HostTensor {
        let n: usize = shape.iter().product();
        HostTensor::f32(
            shape.to_vec(),
            (0..n).map(|_| self.0.uniform(lo, hi)).collect(),
        )
    }

    fn i(&mut self, shape: &[usize], lo: i32, hi: i32) -> HostTensor {
        let n: usize = shape.iter().product();
        let span = (hi - lo) as u32;
        HostTensor::i32(
            shape.to_vec(),
            (0..n)
                .map(|_| lo + (self.0.next_u32() % span) as i32)
                .collect(),
        )
    }
}

/// One op with its operands.
struct Case {
    name: String,
    op: Op,
    inputs: Vec<HostTensor>,
}

fn case(name: impl Into<String>, op: Op, inputs: Vec<HostTensor>) -> Case {
    Case {
        name: name.into(),
        op,
        inputs,
    }
}

/// Cases whose result must be bit-identical on both backends (tolerance 0): dropout masks
/// come from the same counter hash, so a single differing mask bit fails.
fn exact(c: &Case) -> bool {
    match &c.op {
        Op::Dropout { .. } => true,
        // Chains of arithmetic (no transcendental functions, whose libm and CUDA versions
        // differ in the last bits) round the same f32 values at the same steps.
        Op::Fused { steps } => steps.iter().all(|s| {
            matches!(
                s.op,
                Op::Binary(_) | Op::Cast { .. } | Op::Scale { .. } | Op::AddScalar { .. }
            )
        }),
        _ => false,
    }
}

fn rope(rotary_dim: usize, interleaved: bool, scaling: RopeScaling) -> Rope {
    Rope {
        theta: 10_000.0,
        rotary_dim,
        scaling,
        interleaved,
    }
}

const UNARIES: [UnaryOp; 13] = [
    UnaryOp::Neg,
    UnaryOp::Exp,
    UnaryOp::Log,
    UnaryOp::Tanh,
    UnaryOp::Sqrt,
    UnaryOp::Rsqrt,
    UnaryOp::Recip,
    UnaryOp::Square,
    UnaryOp::Relu,
    UnaryOp::Sigmoid,
    UnaryOp::Silu,
    UnaryOp::Gelu,
    UnaryOp::GeluTanh,
];

const BINARIES: [BinaryOp; 6] = [
    BinaryOp::Add,
    BinaryOp::Sub,
    BinaryOp::Mul,
    BinaryOp::Div,
    BinaryOp::Max,
    BinaryOp::Min,
];

fn unary_input(g: &mut Gen, u: UnaryOp, shape: &[usize]) -> HostTensor {
    match u {
        // Positive, away from 0, where these are defined and well conditioned.
        UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Recip => g.f(shape, 0.2, 3.0),
        _ => g.f(shape, -3.0, 3.0),
    }
}

/// Every op of the vocabulary, with odd sizes (so that indexing mistakes show) and the
/// variants that take different code paths (bias, transposes, windows, soft-caps,
/// broadcasting on either side, every axis of a reduction).
fn cases(g: &mut Gen) -> Vec<Case> {
    let mut v = Vec::new();
    let f32s = |s: Vec<usize>| TensorType::new(s, DType::F32);
    v.push(case(
        "fill",
        Op::Fill {
            value: 1.5,
            ty: f32s(vec![5, 3]),
        },
        vec![],
    ));
    v.push(case(
        "linear",
        Op::Linear,
        vec![g.f(&[7, 12], -1.0, 1.0), g.f(&[9, 12], -1.0, 1.0)],
    ));
    v.push(case(
        "linear+bias",
        Op::Linear,
        vec![
            g.f(&[7, 12], -1.0, 1.0),
            g.f(&[9, 12], -1.0, 1.0),
            g.f(&[9], -1.0, 1.0),
        ],
    ));
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = if ta { [3, 4, 5] } else { [3, 5, 4] };
        let b = if tb { [3, 6, 4] } else { [3, 4, 6] };
        v.push(case(
            format!("matmul ta={ta} tb={tb}"),
            Op::MatMul { ta, tb },
            vec![g.f(&a, -1.0, 1.0), g.f(&b, -1.0, 1.0)],
        ));
    }
    v.push(case(
        "matmul 2d",
        Op::MatMul {
            ta: false,
            tb: false,
        },
        vec![g.f(&[5, 4], -1.0, 1.0), g.f(&[4, 6], -1.0, 1.0)],
    ));
    // The accumulate pass's products (`MatMul(a, b, c)`, cuBLASLt's epilogue): batched, every
    // transpose, and a 2-D one of a shape the 8B step has ([T, 4096]·[4096, 1024]ᵀ scaled down).
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = if ta { [3, 4, 5] } else { [3, 5, 4] };
        let b = if tb { [3, 6, 4] } else { [3, 4, 6] };
        v.push(case(
            format!("matmul+acc ta={ta} tb={tb}"),
            Op::MatMul { ta, tb },
            vec![
                g.f(&a, -1.0, 1.0),
                g.f(&b, -1.0, 1.0),
                g.f(&[3, 5, 6], -2.0, 2.0),
            ],
        ));
    }
    v.push(case(
        "matmul+acc 2d",
        Op::MatMul {
            ta: false,
            tb: true,
        },
        vec![
            g.f(&[67, 96], -1.0, 1.0),
            g.f(&[40, 96], -1.0, 1.0),
            g.f(&[67, 40], -4.0, 4.0),
        ],
    ));
    v.push(case(
        "embedding",
        Op::Embedding,
        vec![g.i(&[7], 0, 11), g.f(&[11, 6], -1.0, 1.0)],
    ));
    for offset in [0.0, 1.0] {
        v.push(case(
            format!("rms_norm offset={offset}"),
            Op::RmsNorm { eps: 1e-6, offset },
            vec![g.f(&[7, 12], -2.0, 2.0), g.f(&[12], 0.5, 1.5)],
        ));
    }
    v.push(case(
        "layer_norm",
        Op::LayerNorm { eps: 1e-5 },
        vec![g.f(&[7, 12], -2.0, 2.0), g.f(&[12], 0.5, 1.5)],
    ));
    v.push(case(
        "layer_norm+bias",
        Op::LayerNorm { eps: 1e-5 },
        vec![
            g.f(&[7, 12], -2.0, 2.0),
            g.f(&[12], 0.5, 1.5),
            g.f(&[12], -0.5, 0.5),
        ],
    ));
    let ropes = [
        ("rope", rope(8, false, RopeScaling::None)),
        ("rope interleaved", rope(8, true, RopeScaling::None)),
        ("rope partial", rope(4, false, RopeScaling::None)),
        (
            "rope llama3",
            rope(
                8,
                false,
                RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 16.0,
                },
            ),
        ),
    ];
    for (name, r) in &ropes {
        v.push(case(
            *name,
            Op::Rope(r.clone()),
            vec![g.f(&[7, 3, 8], -1.0, 1.0), g.i(&[7], 0, 50)],
        ));
        v.push(case(
            format!("{name} backward"),
            Op::RopeBackward(r.clone()),
            vec![g.f(&[7, 3, 8], -1.0, 1.0), g.i(&[7], 0, 50)],
        ));
    }
    let scale = 1.0 / 8f64.sqrt();
    for (name, window, softcap) in [
        ("attention", None, None),
        ("attention window=3", Some(3), None),
        ("attention softcap=5", None, Some(5.0)),
    ] {
        let (q, k, vv) = (
            g.f(&[9, 4, 8], -1.0, 1.0),
            g.f(&[9, 2, 8], -1.0, 1.0),
            g.f(&[9, 2, 8], -1.0, 1.0),
        );
        v.push(case(
            name,
            Op::Attention {
                scale,
                sliding_window: window,
                softcap,
            },
            vec![q.clone(), k.clone(), vv.clone()],
        ));
        v.push(case(
            format!("{name} backward"),
            Op::AttentionBackward {
                scale,
                sliding_window: window,
                softcap,
            },
            vec![q, k, vv, g.f(&[9, 4, 8], -1.0, 1.0)],
        ));
    }
    for u in UNARIES {
        v.push(case(
            Op::Unary(u).name(),
            Op::Unary(u),
            vec![unary_input(g, u, &[7, 12])],
        ));
        v.push(case(
            format!("{} backward", Op::Unary(u).name()),
            Op::UnaryBackward(u),
            vec![unary_input(g, u, &[7, 12]), g.f(&[7, 12], -1.0, 1.0)],
        ));
    }
    for b in BINARIES {
        let name = Op::Binary(b).name();
        let lo = if b == BinaryOp::Div { 0.5 } else { -2.0 };
        v.push(case(
            format!("{name} [7,12]·[12]"),
            Op::Binary(b),
            vec![g.f(&[7, 12], -2.0, 2.0), g.f(&[12], lo, 2.0)],
        ));
        v.push(case(
            format!("{name} [7,1]·[7,12]"),
            Op::Binary(b),
            vec![g.f(&[7, 1], -2.0, 2.0), g.f(&[7, 12], lo, 2.0)],
        ));
        for wrt in [0, 1] {
            v.push(case(
                format!("{name} backward wrt={wrt}"),
                Op::BinaryBackward { op: b, wrt },
                vec![
                    g.f(&[7, 12], -2.0, 2.0),
                    g.f(&[12], lo, 2.0),
                    g.f(&[7, 12], -1.0, 1.0),
                ],
            ));
        }
    }
    for b in [BinaryOp::Add, BinaryOp::Mul, BinaryOp::Max, BinaryOp::Div] {
        v.push(case(
            format!("{} i32", Op::Binary(b).name()),
            Op::Binary(b),
            vec![g.i(&[7, 5], -50, 50), g.i(&[5], 1, 9)],
        ));
    }
    v.push(case(
        "scale",
        Op::Scale { factor: 0.37 },
        vec![g.f(&[7, 12], -2.0, 2.0)],
    ));
    v.push(case(
        "add_scalar",
        Op::AddScalar { value: -1.25 },
        vec![g.f(&[7, 12], -2.0, 2.0)],
    ));
    v.push(case(
        "softcap",
        Op::Softcap { cap: 3.0 },
        vec![g.f(&[7, 12], -9.0, 9.0)],
    ));
    v.push(case("softmax", Op::Softmax, vec![g.f(&[7, 13], -4.0, 4.0)]));
    v.push(case(
        "log_softmax",
        Op::LogSoftmax,
        vec![g.f(&[7, 13], -4.0, 4.0)],
    ));
    for r in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
        for axis in 0..3 {
            for keepdim in [false, true] {
                v.push(case(
                    format!(
                        "{} axis={axis} keepdim={keepdim}",
                        Op::Reduce {
                            op: r,
                            axis,
                            keepdim
                        }
                        .name()
                    ),
                    Op::Reduce {
                        op: r,
                        axis,
                        keepdim,
                    },
                    vec![g.f(&[4, 5, 6], -2.0, 2.0)],
                ));
            }
        }
    }
    v.push(case(
        "reshape",
        Op::Reshape {
            shape: Shape::from([20, 6]),
        },
        vec![g.f(&[4, 5, 6], -2.0, 2.0)],
    ));
    for perm in [vec![1, 0, 2], vec![2, 0, 1], vec![0, 2, 1]] {
        v.push(case(
            format!("transpose {perm:?}"),
            Op::Transpose { perm: perm.clone() },
            vec![g.f(&[4, 5, 6], -2.0, 2.0)],
        ));
    }
    v.push(case(
        "transpose i32",
        Op::Transpose { perm: vec![1, 0] },
        vec![g.i(&[4, 5], -9, 9)],
    ));
    for axis in 0..3 {
        v.push(case(
            format!("slice axis={axis}"),
            Op::Slice {
                axis,
                start: 1,
                end: 3,
            },
            vec![g.f(&[4, 5, 6], -2.0, 2.0)],
        ));
    }
    v.push(case(
        "concat axis=1",
        Op::Concat { axis: 1 },
        vec![
            g.f(&[4, 2, 3], -2.0, 2.0),
            g.f(&[4, 5, 3], -2.0, 2.0),
            g.f(&[4, 1, 3], -2.0, 2.0),
        ],
    ));
    v.push(case(
        "concat axis=0",
        Op::Concat { axis: 0 },
        vec![g.f(&[2, 3], -2.0, 2.0), g.f(&[3, 3], -2.0, 2.0)],
    ));
    v.push(case(
        "cast f32→bf16",
        Op::Cast { to: DType::BF16 },
        vec![g.f(&[7, 12], -2.0, 2.0)],
    ));
    v.push(case(
        "cast f32→i32",
        Op::Cast { to: DType::I32 },
        vec![g.f(&[7, 12], -50.0, 50.0)],
    ));
    v.push(case(
        "cast i32→f32",
        Op::Cast { to: DType::F32 },
        vec![g.i(&[7, 12], -50, 50)],
    ));
    let mut labels = g.i(&[7], 0, 13);
    if let Data::I32(l) = &mut labels.data {
        l[2] = -100;
        l[5] = -100;
    }
    v.push(case(
        "cross_entropy",
        Op::CrossEntropy,
        vec![g.f(&[7, 13], -4.0, 4.0), labels.clone()],
    ));
    v.push(case(
        "cross_entropy backward",
        Op::CrossEntropyBackward,
        vec![
            g.f(&[7, 13], -4.0, 4.0),
            labels,
            HostTensor::f32(Shape::scalar(), vec![0.75]),
        ],
    ));
    v.push(case(
        "embedding backward",
        Op::EmbeddingBackward { vocab: 11 },
        vec![g.i(&[9], 0, 5), g.f(&[9, 6], -1.0, 1.0)],
    ));
    v.push(case(
        "rms_norm backward",
        Op::RmsNormBackward {
            eps: 1e-6,
            offset: 1.0,
        },
        vec![
            g.f(&[7, 12], -2.0, 2.0),
            g.f(&[12], 0.5, 1.5),
            g.f(&[7, 12], -1.0, 1.0),
        ],
    ));
    v.push(case(
        "rms_norm weight grad",
        Op::RmsNormWeightGrad { eps: 1e-6 },
        vec![g.f(&[7, 12], -2.0, 2.0), g.f(&[7, 12], -1.0, 1.0)],
    ));
    v.push(case(
        "layer_norm backward",
        Op::LayerNormBackward { eps: 1e-5 },
        vec![
            g.f(&[7, 12], -2.0, 2.0),
            g.f(&[12], 0.5, 1.5),
            g.f(&[7, 12], -1.0, 1.0),
        ],
    ));
    v.push(case(
        "layer_norm weight grad",
        Op::LayerNormWeightGrad { eps: 1e-5 },
        vec![g.f(&[7, 12], -2.0, 2.0), g.f(&[7, 12], -1.0, 1.0)],
    ));
    let key = |active: bool| {
        let w = qplc_ops::dropout::key_words(0x8000_0000_dead_beef, active);
        HostTensor::i32([3], w.to_vec())
    };
    for (p, active) in [(0.3, true), (0.9, true), (0.3, false)] {
        v.push(case(
            format!("dropout p={p} active={active}"),
            Op::Dropout { p, salt: 12345 },
            vec![g.f(&[37, 129], -2.0, 2.0), key(active)],
        ));
    }
    let mut labels = g.i(&[7], 0, 13);
    if let Data::I32(l) = &mut labels.data {
        l[1] = -100;
    }
    v.push(case(
        "nll",
        Op::Nll,
        vec![g.f(&[7, 13], -6.0, 0.0), labels.clone()],
    ));
    v.push(case(
        "nll backward",
        Op::NllBackward,
        vec![
            g.f(&[7, 13], -6.0, 0.0),
            labels,
            HostTensor::f32(Shape::scalar(), vec![1.25]),
        ],
    ));
    // A row wider than a block's stride many times over, odd width.
    let mut labels = g.i(&[5], 0, 70_001);
    if let Data::I32(l) = &mut labels.data {
        l[3] = -100;
    }
    v.push(case(
        "cross_entropy V=70001",
        Op::CrossEntropy,
        vec![g.f(&[5, 70_001], -8.0, 8.0), labels.clone()],
    ));
    v.push(case(
        "cross_entropy backward V=70001",
        Op::CrossEntropyBackward,
        vec![
            g.f(&[5, 70_001], -8.0, 8.0),
            labels,
            HostTensor::f32(Shape::scalar(), vec![1.0]),
        ],
    ));
    // Products with sizes off the tensor cores' tiles.
    v.push(case(
        "linear [67,200]·[131,200]ᵀ+bias",
        Op::Linear,
        vec![
            g.f(&[67, 200], -1.0, 1.0),
            g.f(&[131, 200], -1.0, 1.0),
            g.f(&[131], -1.0, 1.0),
        ],
    ));
    v.push(case(
        "matmul batched [5,33,70]·[5,70,41]",
        Op::MatMul {
            ta: false,
            tb: false,
        },
        vec![g.f(&[5, 33, 70], -1.0, 1.0), g.f(&[5, 70, 41], -1.0, 1.0)],
    ));
    // Mixed storage kinds (run once, as given): bf16 activations with f32 parameters, which
    // `Op::infer` allows, run on widened operands.
    v.push(case(
        "mixed linear x bf16 · w f32",
        Op::Linear,
        vec![
            g.f(&[7, 12], -1.0, 1.0).cast(DType::BF16),
            g.f(&[9, 12], -1.0, 1.0),
        ],
    ));
    v.push(case(
        "mixed rms_norm x bf16, w f32",
        Op::RmsNorm {
            eps: 1e-6,
            offset: 0.0,
        },
        vec![
            g.f(&[7, 12], -2.0, 2.0).cast(DType::BF16),
            g.f(&[12], 0.5, 1.5),
        ],
    ));
    v.push(case(
        "mixed cross_entropy backward z bf16, g bf16",
        Op::CrossEntropyBackward,
        vec![
            g.f(&[7, 13], -4.0, 4.0).cast(DType::BF16),
            g.i(&[7], 0, 13),
            HostTensor::f32(Shape::scalar(), vec![0.5]).cast(DType::BF16),
        ],
    ));
    v.push(case(
        "embedding backward bf16 repeated ids",
        Op::EmbeddingBackward { vocab: 6 },
        vec![g.i(&[40], 0, 3), g.f(&[40, 6], -1.0, 1.0).cast(DType::BF16)],
    ));
    for (from, to) in [
        (DType::BF16, DType::F32),
        (DType::F32, DType::F16),
        (DType::BF16, DType::F16),
        (DType::F16, DType::BF16),
        (DType::BF16, DType::I32),
        (DType::I32, DType::BF16),
    ] {
        let x = if from == DType::I32 {
            g.i(&[7, 12], -300, 300)
        } else {
            g.f(&[7, 12], -300.0, 300.0).cast(from)
        };
        v.push(case(
            format!("cast {}→{}", from.name(), to.name()),
            Op::Cast { to },
            vec![x],
        ));
    }
    v.extend(fused_cases(g));
    v
}

const MM_PLAIN: Op = Op::MatMul {
    ta: false,
    tb: false,
};

/// `Op::Fused` chains as the `fuse_elementwise` pass makes them (generated kernels,
/// cuda/fused.rs), with mixed storage kinds, broadcast operands, and sizes that leave a tail
/// after the four-element vector loop.
fn fused_cases(g: &mut Gen) -> Vec<Case> {
    use qplc_ops::{FusedArg::Input as I, FusedArg::Step as S, FusedStep};
    let st = |op: Op, args: Vec<qplc_ops::FusedArg>| FusedStep { op, args };
    let bf = |t: HostTensor| t.cast(DType::BF16);
    let add = Op::Binary(BinaryOp::Add);
    let to_bf16 = Op::Cast { to: DType::BF16 };
    let mut v = Vec::with_capacity(6);
    // A LoRA output: base + bf16(scale · lora).
    v.push(case(
        "fused lora output [67,131] (bf16 + f32)",
        Op::Fused {
            steps: vec![
                st(Op::Scale { factor: 2.0 }, vec![I(0)]),
                st(to_bf16.clone(), vec![S(0)]),
                st(add.clone(), vec![I(1), S(1)]),
            ],
        },
        vec![g.f(&[67, 131], -1.0, 1.0), bf(g.f(&[67, 131], -2.0, 2.0))],
    ));
    // SwiGLU over two LoRA outputs.
    v.push(case(
        "fused swiglu [33,70]",
        Op::Fused {
            steps: vec![
                st(to_bf16.clone(), vec![I(0)]),
                st(add.clone(), vec![I(1), S(0)]),
                st(Op::Unary(UnaryOp::Silu), vec![S(1)]),
                st(to_bf16.clone(), vec![I(2)]),
                st(add.clone(), vec![I(3), S(3)]),
                st(Op::Binary(BinaryOp::Mul), vec![S(2), S(4)]),
            ],
        },
        vec![
            g.f(&[33, 70], -0.5, 0.5),
            bf(g.f(&[33, 70], -3.0, 3.0)),
            g.f(&[33, 70], -0.5, 0.5),
            bf(g.f(&[33, 70], -3.0, 3.0)),
        ],
    ));
    // A gradient summed over adapters: bf16(a) + bf16(b) + c.
    v.push(case(
        "fused gradient sum [5,1001]",
        Op::Fused {
            steps: vec![
                st(to_bf16.clone(), vec![I(0)]),
                st(to_bf16.clone(), vec![I(1)]),
                st(add.clone(), vec![S(0), S(1)]),
                st(add.clone(), vec![S(2), I(2)]),
            ],
        },
        vec![
            g.f(&[5, 1001], -1.0, 1.0),
            g.f(&[5, 1001], -1.0, 1.0),
            bf(g.f(&[5, 1001], -1.0, 1.0)),
        ],
    ));
    // Broadcast operands on different axes, f32 (also run in bf16 storage).
    v.push(case(
        "fused broadcast [5,7,13]·[13]+[7,1]",
        Op::Fused {
            steps: vec![
                st(Op::Binary(BinaryOp::Mul), vec![I(0), I(1)]),
                st(Op::Binary(BinaryOp::Sub), vec![S(0), I(2)]),
                st(Op::AddScalar { value: 0.25 }, vec![S(1)]),
                st(Op::Binary(BinaryOp::Div), vec![S(2), I(1)]),
            ],
        },
        vec![
            g.f(&[5, 7, 13], -2.0, 2.0),
            g.f(&[13], 0.5, 1.5),
            g.f(&[7, 1], -1.0, 1.0),
        ],
    ));
    // A product step (the `fuse_elementwise` pass's LoRA up-projection `base + bf16(h·Bᵀ)`):
    // row lengths that take the vector epilogue (1000) and the scalar one (1001), a product
    // step that is not the first, and products that take the fallback (batched; bf16).
    for out in [1000, 1001] {
        v.push(case(
            format!("fused product h·Bᵀ → base + bf16 [300,{out}]"),
            Op::Fused {
                steps: vec![
                    st(Op::Linear, vec![I(0), I(1)]),
                    st(to_bf16.clone(), vec![S(0)]),
                    st(add.clone(), vec![I(2), S(1)]),
                ],
            },
            vec![
                g.f(&[300, 16], -1.0, 1.0),
                g.f(&[out, 16], -1.0, 1.0),
                bf(g.f(&[300, out], -2.0, 2.0)),
            ],
        ));
    }
    v.push(case(
        "fused product dh·A, two adds [130,520]",
        Op::Fused {
            steps: vec![
                st(Op::Scale { factor: 0.5 }, vec![I(3)]),
                st(MM_PLAIN, vec![I(0), I(1)]),
                st(to_bf16.clone(), vec![S(1)]),
                st(add.clone(), vec![I(2), S(2)]),
                st(add.clone(), vec![S(3), S(0)]),
            ],
        },
        vec![
            g.f(&[130, 8], -1.0, 1.0),
            g.f(&[8, 520], -1.0, 1.0),
            bf(g.f(&[130, 520], -2.0, 2.0)),
            bf(g.f(&[130, 520], -2.0, 2.0)),
        ],
    ));
    v.push(case(
        "fused product, batched (fallback) [2,50,30]",
        Op::Fused {
            steps: vec![
                st(MM_PLAIN, vec![I(0), I(1)]),
                st(add.clone(), vec![S(0), I(2)]),
            ],
        },
        vec![
            g.f(&[2, 50, 8], -1.0, 1.0),
            g.f(&[2, 8, 30], -1.0, 1.0),
            g.f(&[30], -1.0, 1.0),
        ],
    ));
    v.push(case(
        "fused product, bf16 operand (fallback) [70,90]",
        Op::Fused {
            steps: vec![
                st(Op::Linear, vec![I(0), I(1)]),
                st(to_bf16.clone(), vec![S(0)]),
            ],
        },
        vec![bf(g.f(&[70, 16], -1.0, 1.0)), g.f(&[90, 16], -1.0, 1.0)],
    ));
    // Backward ops, a soft-cap, and f16 rounding at every step; 3 elements: tail only.
    for shape in [vec![3], vec![9, 41]] {
        v.push(case(
            format!("fused backward f16 {shape:?}"),
            Op::Fused {
                steps: vec![
                    st(Op::Cast { to: DType::F16 }, vec![I(0)]),
                    st(Op::UnaryBackward(UnaryOp::Silu), vec![S(0), I(1)]),
                    st(
                        Op::BinaryBackward {
                            op: BinaryOp::Div,
                            wrt: 1,
                        },
                        vec![S(1), I(2), I(1)],
                    ),
                    st(Op::Softcap { cap: 5.0 }, vec![S(2)]),
                ],
            },
            vec![
                g.f(&shape, -2.0, 2.0),
                g.f(&shape, -1.0, 1.0).cast(DType::F16),
                g.f(&shape, 0.5, 2.0).cast(DType::F16),
            ],
        ));
    }
    v
}

/// The same case with its float operands (and a Fill's type) in `dtype`, values rounded.
fn in_dtype(c: &Case, dtype: DType) -> Option<Case> {
    // Casts name their own target; the loss gradient and labels stay as they are.
    if matches!(c.op, Op::Cast { .. })
        || c.inputs
            .iter()
            .any(|t| t.ty.dtype.is_float() && t.ty.dtype != DType::F32)
    {
        return None;
    }
    let op = match &c.op {
        Op::Fill { value, ty } => Op::Fill {
            value: *value,
            ty: TensorType::new(ty.shape.clone(), dtype),
        },
        op => op.clone(),
    };
    let keep_f32 = matches!(c.op, Op::CrossEntropyBackward | Op::NllBackward);
    let inputs: Vec<HostTensor> = c
        .inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if t.ty.dtype.is_float() && !(keep_f32 && i == 2) {
                t.cast(dtype)
            } else {
                t.clone()
            }
        })
        .collect();
    if !c.inputs.iter().any(|t| t.ty.dtype.is_float()) && !matches!(c.op, Op::Fill { .. }) {
        return None;
    }
    Some(Case {
        name: c.name.clone(),
        op,
        inputs,
    })
}

fn run_case(gpu: &CudaBackend, c: &Case, tol: f64) -> CheckRow {
    let cpu = CpuBackend::new();
    let refs: Vec<&HostTensor> = c.inputs.iter().collect();
    let want = match cpu.eval(&c.op, &refs) {
        Ok(t) => t,
        Err(e) => return failed(&c.name, tol, format!("CPU: {e}")),
    };
    let got = (|| -> Result<HostTensor, KernelError> {
        let bufs: Vec<CudaTensor> = c
            .inputs
            .iter()
            .map(|t| gpu.upload(t))
            .collect::<Result<_, _>>()?;
        let brefs: Vec<&CudaTensor> = bufs.iter().collect();
        let mut out = gpu.alloc(&want.ty)?;
        gpu.execute(&c.op, &brefs, &mut out)?;
        gpu.download(&out)
    })();
    match got {
        Ok(g) => compare(&c.name, &want, &g, tol),
        Err(e) => failed(&c.name, tol, format!("GPU: {e}")),
    }
}

fn failed(name: &str, tol: f64, why: String) -> CheckRow {
    CheckRow {
        name: name.to_string(),
        dtype: DType::F32,
        rel_err: f64::INFINITY,
        max_abs: f64::INFINITY,
        tol,
        failure: why,
    }
}

/// Every op case in f32 and in bf16 storage. `gpu` should poison its buffers.
pub fn op_checks(gpu: &CudaBackend, seed: u64) -> Vec<CheckRow> {
    let mut g = Gen(Pcg32::new(seed, 7));
    let mut rows = Vec::new();
    for c in cases(&mut g) {
        let tol = |t: f64| if exact(&c) { 0.0 } else { t };
        let mut r = run_case(gpu, &c, tol(F32_TOL));
        if let Some(t) = c.inputs.iter().find(|t| t.ty.dtype.is_float()) {
            r.dtype = t.ty.dtype;
        }
        rows.push(r);
        if let Some(b) = in_dtype(&c, DType::BF16) {
            let mut r = run_case(gpu, &b, tol(BF16_TOL));
            r.dtype = DType::BF16;
            rows.push(r);
        }
    }
    rows.extend(super::check_large::large_checks(gpu, seed));
    rows.extend(skinny_cases(gpu, seed));
    rows
}

/// The skinny f32 products (skinny.cu): every layout against the CPU, and the 8B LoRA
/// products against cuBLAS, timed (check_skinny.rs).
fn skinny_cases(gpu: &CudaBackend, seed: u64) -> Vec<CheckRow> {
    super::check_skinny::skinny_checks(gpu, seed)
}

/// Uploads every weight of `weights` to the GPU.
fn upload_all(
    gpu: &CudaBackend,
    weights: &HashMap<String, HostTensor>,
) -> Result<HashMap<String, CudaTensor>> {
    weights
        .iter()
        .map(|(n, t)| Ok((n.clone(), gpu.upload(t).with_context(|| n.clone())?)))
        .collect()
}

/// Forward pass of the model in `dir` on both backends (`seq_len` random tokens): the
/// logits compared.
pub fn forward_check(
    gpu: &CudaBackend,
    dir: &Path,
    seq_len: usize,
    dtype: DType,
    seed: u64,
) -> Result<CheckRow> {
    let model = ModelDir::open(dir, None)?;
    let built = model.build(seq_len, dtype)?;
    let weights = Checkpoint::open(dir)?.load_graph_weights(&built.graph)?;
    let vocab = built.info.vocab_size;
    let mut g = Gen(Pcg32::new(seed, 11));
    let inputs = HashMap::from([
        ("input_ids", g.i(&[seq_len], 0, vocab as i32)),
        (
            "position_ids",
            HostTensor::i32([seq_len], (0..seq_len as i32).collect()),
        ),
    ]);
    let prog = Program::new(&built.graph, &["logits"])?;
    let cpu = CpuBackend::new();
    let want = prog.run(&cpu, &|n| weights.get(n), &|n| inputs.get(n))?;
    let gw = upload_all(gpu, &weights)?;
    let got = prog.run(gpu, &|n| gw.get(n), &|n| inputs.get(n))?;
    // As in `lora_step_check`: in bf16 the CPU's own logits are only defined to within their
    // distance from the same forward in f32 (rounding flips after every op, which the two
    // backends take differently once any f32 sum is ordered differently); the tolerance is
    // 1e-2 or twice that distance, whichever is larger, and the row says which.
    let (tol, label) = if dtype == DType::F32 {
        (F32_TOL, format!("forward logits T={seq_len}"))
    } else {
        let b32 = model.build(seq_len, DType::F32)?;
        let w32 = Checkpoint::open(dir)?.load_graph_weights(&b32.graph)?;
        let exact = Program::new(&b32.graph, &["logits"])?
            .run(&cpu, &|n| w32.get(n), &|n| inputs.get(n))?;
        let own = compare(
            "",
            &exact.outputs["logits"],
            &want.outputs["logits"].cast(DType::F32),
            0.0,
        )
        .rel_err;
        (
            BF16_TOL.max(2.0 * own),
            format!("forward logits T={seq_len} (cpu bf16 vs f32 {own:.1e})"),
        )
    };
    let mut row = compare(&label, &want.outputs["logits"], &got.outputs["logits"], tol);
    row.dtype = dtype;
    Ok(row)
}

/// One LoRA training step (rank 8, every linear layer, f32 adapters) of the model in `dir`
/// on both backends: the loss and the gradient of every adapter tensor. `lora_B` is drawn
/// at random (not zero as at initialisation) so that every gradient is non-trivial.
pub fn lora_step_check(
    gpu: &CudaBackend,
    dir: &Path,
    seq_len: usize,
    dtype: DType,
    seed: u64,
) -> Result<Vec<CheckRow>> {
    let dir =
        std::fs::canonicalize(dir).with_context(|| format!("model folder `{}`", dir.display()))?;
    // The config's sequence_len must be a multiple of 64 (spec §3); only the LoRA settings
    // are read from it, the graph is built for `seq_len`.
    let text = format!(
        "model_dir = {:?}\noutput_dir = \"/tmp/qplc-cuda-check\"\nlora_rank = 8\n\
         lora_dropout = 0.0\nlora_weight_dtype = \"float32\"\nlr = 2e-3\nepochs = 1\n\
         sequence_len = 64\n\n[[datasets]]\ndataset_path = \"unused.txt\"\n",
        dir.display().to_string()
    );
    let cfg = LoadedConfig::from_str(&dir.join("cuda-check.toml"), &text)?;
    let model = ModelDir::open(&dir, None)?;
    let training_graph = |dtype: DType| -> Result<(qplc_compiler::Graph, usize)> {
        let built = model.build(seq_len, dtype)?;
        let vocab = built.info.vocab_size;
        let mut passes = PassManager::new();
        passes
            .add(LoraPass::from_config(&cfg)?)
            .add(LossPass)
            .add(AutodiffPass);
        let mut cx = PassContext::new(seq_len, 1, &cfg.partition_method());
        cx.num_layers = Some(built.info.num_layers);
        Ok((passes.run(built.graph, &mut cx)?.graph, vocab))
    };
    let (graph, vocab) = training_graph(dtype)?;

    let mut g = Gen(Pcg32::new(seed, 13));
    let ckpt = Checkpoint::open(&dir)?;
    let mut weights = init_lora_weights(&graph, seed);
    for (name, t) in weights.iter_mut() {
        if name.ends_with(".lora_B.weight") {
            let r = g.f(t.shape().dims(), -0.05, 0.05).cast(t.ty.dtype);
            *t = r;
        }
    }
    for (name, id) in graph.weights() {
        if weights.contains_key(&name) {
            continue;
        }
        let Op::Weight { ty, .. } = &graph.node(id).op else {
            unreachable!()
        };
        weights.insert(name.clone(), ckpt.load(&name, ty)?);
    }
    let mut trainable: Vec<String> = graph
        .weights()
        .into_iter()
        .filter(|(_, id)| graph.node(*id).trainable)
        .map(|(n, _)| n)
        .collect();
    trainable.sort();
    trainable.dedup();
    let mut labels = g.i(&[seq_len], 0, vocab as i32);
    if let Data::I32(l) = &mut labels.data {
        l[0] = -100;
        l[seq_len - 1] = -100;
    }
    let inputs = HashMap::from([
        ("input_ids", g.i(&[seq_len], 0, vocab as i32)),
        (
            "position_ids",
            HostTensor::i32([seq_len], (0..seq_len as i32).collect()),
        ),
        ("labels", labels),
    ]);
    let mut outputs: Vec<String> = vec!["loss".into()];
    outputs.extend(trainable.iter().map(|n| grad_output_name(n)));
    let out_refs: Vec<&str> = outputs.iter().map(String::as_str).collect();
    let prog = Program::new(&graph, &out_refs)?;
    let cpu = CpuBackend::new();
    let want = prog.run(&cpu, &|n| weights.get(n), &|n| inputs.get(n))?;
    // In bf16 the CPU's own result is only defined up to bf16 rounding: the same step in
    // f32 (same weight values) measures that, per gradient tensor, for the worst-tensor row.
    let noise: HashMap<String, f64> = if dtype == DType::F32 {
        HashMap::new()
    } else {
        let (g32, _) = training_graph(DType::F32)?;
        let w32: HashMap<String, HostTensor> = weights
            .iter()
            .map(|(n, t)| (n.clone(), t.cast(DType::F32)))
            .collect();
        let exact =
            Program::new(&g32, &out_refs)?.run(&cpu, &|n| w32.get(n), &|n| inputs.get(n))?;
        outputs
            .iter()
            .skip(1)
            .map(|n| {
                let r = compare(n, &exact.outputs[n], &want.outputs[n].cast(DType::F32), 0.0);
                (n.clone(), r.rel_err)
            })
            .collect()
    };
    let gw = upload_all(gpu, &weights)?;
    let got = prog.run(gpu, &|n| gw.get(n), &|n| inputs.get(n))?;
    // A second identical step: the caching allocator must serve it without one device
    // allocation, and reused (re-poisoned) buffers must give the same loss bit for bit.
    let mallocs = gpu.device_allocations();
    gpu.reset_peak();
    let again = prog.run(gpu, &|n| gw.get(n), &|n| inputs.get(n))?;
    let grew = gpu.device_allocations() - mallocs;
    let mut reuse = compare(
        &format!(
            "2nd step: {grew} cudaMalloc, peak {:.2} MiB",
            gpu.peak_bytes_in_use() as f64 / (1 << 20) as f64
        ),
        &got.outputs["loss"],
        &again.outputs["loss"],
        0.0,
    );
    reuse.dtype = dtype;
    if grew > 0 {
        reuse.failure = format!("{grew} device allocations in a step after the first");
    }
    let tol = if dtype == DType::F32 {
        F32_TOL
    } else {
        BF16_TOL
    };
    let mut rows = vec![reuse];
    let mut loss = compare(
        "lora step loss",
        &want.outputs["loss"],
        &got.outputs["loss"],
        tol,
    );
    loss.dtype = dtype;
    rows.push(loss);
    // All adapter gradients as one vector (the step's update direction), plus the worst
    // single tensor.
    let (mut cat_w, mut cat_g) = (Vec::new(), Vec::new());
    let mut worst: Option<CheckRow> = None;
    for name in outputs.iter().skip(1) {
        let (w, gg) = (&want.outputs[name], &got.outputs[name]);
        // A tensor whose bf16 value the CPU itself gets only to within `noise` of the f32
        // result cannot be asked to agree more closely than that.
        let own = noise.get(name).copied().unwrap_or(0.0);
        let r = compare(
            &format!("{name} (cpu bf16 vs f32 {own:.1e})"),
            w,
            gg,
            tol.max(2.0 * own),
        );
        if worst
            .as_ref()
            .is_none_or(|b| r.rel_err > b.rel_err || !r.ok())
        {
            worst = Some(r);
        }
        cat_w.extend_from_slice(w.as_f32());
        cat_g.extend_from_slice(gg.as_f32());
    }
    let n = cat_w.len();
    let mut all = compare(
        &format!("lora step grads ({} tensors)", outputs.len() - 1),
        &HostTensor::f32([n], cat_w),
        &HostTensor::f32([n], cat_g),
        tol,
    );
    all.dtype = dtype;
    rows.push(all);
    if let Some(mut w) = worst {
        w.name = format!("worst grad: {}", w.name);
        w.dtype = dtype;
        rows.push(w);
    }
    Ok(rows)
}

/// A fixed-width table of rows, one per line.
pub fn table(rows: &[CheckRow]) -> String {
    let mut s = format!(
        "{:<46} {:<5} {:>10} {:>10} {:>7}  {}\n",
        "check", "dtype", "rel err", "max |d|", "tol", "result"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<46} {:<5} {:>10.2e} {:>10.2e} {:>7.0e}  {}\n",
            r.name,
            r.dtype.name(),
            r.rel_err,
            r.max_abs,
            r.tol,
            if r.ok() {
                "ok".to_string()
            } else {
                format!("FAIL: {}", r.failure)
            }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every case is well-formed and runs on the CPU (the GPU side needs a device), so a
    /// malformed case fails here rather than as a "failed check" on the GPU machine.
    #[test]
    fn every_case_runs_on_the_cpu() {
        let mut g = Gen(Pcg32::new(11, 7));
        let cpu = CpuBackend::new();
        for c in cases(&mut g) {
            let refs: Vec<&HostTensor> = c.inputs.iter().collect();
            cpu.eval(&c.op, &refs)
                .unwrap_or_else(|e| panic!("{}: {e}", c.name));
            if let Some(b) = in_dtype(&c, DType::BF16) {
                let refs: Vec<&HostTensor> = b.inputs.iter().collect();
                cpu.eval(&b.op, &refs)
                    .unwrap_or_else(|e| panic!("{} (bf16): {e}", b.name));
            }
        }
    }
}
