//! Every gradient rule (`Op::vjp`, instantiated by the autodiff pass and run by the CPU
//! backend) against central finite differences.
//!
//! For one op with random operands, the graph computes `loss = Σ op(x)·R` (R a fixed random
//! frozen weight) and the autodiff pass adds `grad:x<i>` for every float operand. The finite
//! differences evaluate the op alone on perturbed operands and form `Σ op(x)·R` in f64 in the
//! test, so the only rounding noise comes from the outputs the perturbation touches.
//! Tolerance: max |analytic − numeric| ≤ 1e-3 · max |numeric| per operand.
use qplc_compiler::{BlockKind, Graph, Scope};
use qplc_ops::{BinaryOp, DType, Op, ReduceOp, Rope, RopeScaling, Shape, TensorType, UnaryOp};
use qplc_passes::append_backward;
use qplc_runtime::executor::Program;
use qplc_runtime::{CpuBackend, Data, HostTensor};
use std::collections::HashMap;

/// splitmix64: deterministic, dependency-free test data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn tensor(&mut self, shape: &[usize]) -> HostTensor {
        self.tensor_in(shape, -1.0, 1.0)
    }
    fn tensor_in(&mut self, shape: &[usize], lo: f32, hi: f32) -> HostTensor {
        let n = shape.iter().product();
        HostTensor::f32(shape.to_vec(), (0..n).map(|_| self.range(lo, hi)).collect())
    }
}

fn scope() -> Scope {
    Scope::new("test", BlockKind::Decoder, Some(0))
}

/// `loss = Σ op(x)·R` with every float operand a trainable weight `x<i>` and every integer
/// operand an input `x<i>`; then the backward graph.
fn graph_for(op: &Op, operands: &[HostTensor], r: &HostTensor) -> Graph {
    let mut g = Graph::new();
    let s = scope();
    let mut ids = Vec::new();
    for (i, t) in operands.iter().enumerate() {
        let name = format!("x{i}");
        let id = if t.ty.dtype.is_float() {
            let id = g
                .add(
                    Op::Weight {
                        name,
                        ty: t.ty.clone(),
                    },
                    &[],
                    &s,
                )
                .unwrap();
            g.node_mut(id).trainable = true;
            id
        } else {
            g.add(
                Op::Input {
                    name,
                    ty: t.ty.clone(),
                },
                &[],
                &s,
            )
            .unwrap()
        };
        ids.push(id);
    }
    let y = g.add(op.clone(), &ids, &s).unwrap();
    let rw = g
        .add(
            Op::Weight {
                name: "r".into(),
                ty: r.ty.clone(),
            },
            &[],
            &s,
        )
        .unwrap();
    let prod = g.add(Op::Binary(BinaryOp::Mul), &[y, rw], &s).unwrap();
    let n = r.ty.shape.numel();
    let flat = g
        .add(
            Op::Reshape {
                shape: Shape::new([n]),
            },
            &[prod],
            &s,
        )
        .unwrap();
    let loss = g
        .add(
            Op::Reduce {
                op: ReduceOp::Sum,
                axis: 0,
                keepdim: false,
            },
            &[flat],
            &s,
        )
        .unwrap();
    g.set_output("loss", loss);
    append_backward(&mut g).unwrap();
    g.verify().unwrap();
    g
}

/// `Σ op(x)·R` in f64 from the op's f32 output.
fn projected(op: &Op, operands: &[HostTensor], r: &[f32]) -> f64 {
    let refs: Vec<&HostTensor> = operands.iter().collect();
    let y = CpuBackend::new()
        .eval(op, &refs)
        .unwrap_or_else(|e| panic!("{e}"));
    y.as_f32()
        .iter()
        .zip(r)
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum()
}

/// Checks every float operand's gradient (every `stride`-th element) with step `eps`;
/// returns the worst relative error.
fn check_with(name: &str, op: Op, operands: Vec<HostTensor>, eps: f32, stride: usize) -> f64 {
    let mut rng = Rng(0xC0FFEE ^ name.len() as u64);
    let tys: Vec<TensorType> = operands.iter().map(|t| t.ty.clone()).collect();
    let out_ty = op.infer(&tys).unwrap();
    let r = rng.tensor(out_ty.shape.dims());
    let g = graph_for(&op, &operands, &r);

    let mut weights: HashMap<String, HostTensor> = HashMap::new();
    let mut inputs: HashMap<String, HostTensor> = HashMap::new();
    for (i, t) in operands.iter().enumerate() {
        if t.ty.dtype.is_float() {
            weights.insert(format!("x{i}"), t.clone());
        } else {
            inputs.insert(format!("x{i}"), t.clone());
        }
    }
    weights.insert("r".into(), r.clone());
    let program = Program::new(&g, &[]).unwrap();
    let result = program
        .run(&CpuBackend::new(), &|n| weights.get(n), &|n| inputs.get(n))
        .unwrap_or_else(|e| panic!("{name}: {e}"));

    let mut worst = 0.0f64;
    for (i, t) in operands.iter().enumerate() {
        if !t.ty.dtype.is_float() {
            continue;
        }
        let analytic = result
            .get(&format!("grad:x{i}"))
            .unwrap_or_else(|| panic!("{name}: no gradient for operand {i}"));
        assert_eq!(analytic.ty, t.ty, "{name}: gradient type of operand {i}");
        let mut max_num = 0.0f64;
        let mut max_err = 0.0f64;
        let mut worst_at = 0;
        for j in (0..t.ty.shape.numel()).step_by(stride) {
            let mut ops = operands.clone();
            let Data::F32(v) = &mut ops[i].data else {
                unreachable!()
            };
            let x0 = v[j];
            v[j] = x0 + eps;
            let up = projected(&op, &ops, r.as_f32());
            let Data::F32(v) = &mut ops[i].data else {
                unreachable!()
            };
            v[j] = x0 - eps;
            let down = projected(&op, &ops, r.as_f32());
            let num = (up - down) / (2.0 * eps as f64);
            let err = (analytic.as_f32()[j] as f64 - num).abs();
            max_num = max_num.max(num.abs());
            if err > max_err {
                max_err = err;
                worst_at = j;
            }
        }
        let rel = max_err / max_num.max(1e-6);
        eprintln!(
            "{name}: operand {i}: max |Δ| {max_err:.3e}, max |grad| {max_num:.3e}, rel {rel:.2e}"
        );
        assert!(
            rel <= 1e-3,
            "{name}: operand {i} element {worst_at}: analytic {} vs numeric differs by {max_err:e} \
             (max |grad| {max_num:e})",
            analytic.as_f32()[worst_at]
        );
        worst = worst.max(rel);
    }
    worst
}

fn check(name: &str, op: Op, operands: Vec<HostTensor>) -> f64 {
    check_with(name, op, operands, 1e-2, 1)
}

#[test]
fn linear_with_bias_gradients_match_finite_differences() {
    let mut r = Rng(1);
    check(
        "linear",
        Op::Linear,
        vec![r.tensor(&[3, 4]), r.tensor(&[5, 4]), r.tensor(&[5])],
    );
    check(
        "linear rank 3",
        Op::Linear,
        vec![r.tensor(&[2, 3, 4]), r.tensor(&[5, 4])],
    );
}

#[test]
fn matmul_gradients_match_finite_differences_for_every_transpose() {
    let mut r = Rng(2);
    for ta in [false, true] {
        for tb in [false, true] {
            let a = if ta { [2, 4, 3] } else { [2, 3, 4] };
            let b = if tb { [2, 5, 4] } else { [2, 4, 5] };
            check(
                &format!("matmul ta={ta} tb={tb}"),
                Op::MatMul { ta, tb },
                vec![r.tensor(&a), r.tensor(&b)],
            );
        }
    }
}

#[test]
fn embedding_table_gradient_scatter_adds_repeated_ids() {
    let mut r = Rng(3);
    check(
        "embedding",
        Op::Embedding,
        vec![
            HostTensor::i32([6], vec![2, 0, 2, 5, 6, 2]),
            r.tensor(&[7, 4]),
        ],
    );
}

#[test]
fn norm_gradients_match_finite_differences() {
    let mut r = Rng(4);
    for offset in [0.0, 1.0] {
        check(
            &format!("rms_norm offset {offset}"),
            Op::RmsNorm { eps: 1e-5, offset },
            vec![r.tensor(&[3, 8]), r.tensor_in(&[8], 0.5, 1.5)],
        );
    }
    check(
        "layer_norm with bias",
        Op::LayerNorm { eps: 1e-5 },
        vec![
            r.tensor(&[3, 8]),
            r.tensor_in(&[8], 0.5, 1.5),
            r.tensor(&[8]),
        ],
    );
}

#[test]
fn rope_gradient_is_the_inverse_rotation() {
    let mut r = Rng(5);
    let pos = HostTensor::i32([5], vec![0, 3, 7, 20, 41]);
    for (interleaved, rotary_dim) in [(false, 8), (true, 8), (false, 6)] {
        let rope = Rope {
            theta: 10000.0,
            rotary_dim,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 32.0,
            },
            interleaved,
        };
        check(
            &format!("rope interleaved={interleaved} rotary_dim={rotary_dim}"),
            Op::Rope(rope),
            vec![r.tensor(&[5, 2, 8]), pos.clone()],
        );
    }
}

#[test]
fn attention_gradients_match_finite_differences_with_gqa_window_and_softcap() {
    let mut r = Rng(6);
    let cases = [
        ("attention gqa", None, None),
        ("attention sliding window 3", Some(3), None),
        ("attention softcap 2", None, Some(2.0)),
        ("attention window 4 + softcap 1.5", Some(4), Some(1.5)),
    ];
    for (name, window, cap) in cases {
        let op = Op::Attention {
            scale: 0.5,
            sliding_window: window,
            softcap: cap,
        };
        check(
            name,
            op,
            vec![
                r.tensor(&[7, 4, 4]),
                r.tensor(&[7, 2, 4]),
                r.tensor(&[7, 2, 4]),
            ],
        );
    }
}

#[test]
fn attention_gradients_are_right_across_query_blocks() {
    // T = 70 > the kernel's 64-query block, with a window so later blocks start at lo > 0.
    let mut r = Rng(7);
    for window in [None, Some(9)] {
        let op = Op::Attention {
            scale: 0.35,
            sliding_window: window,
            softcap: None,
        };
        check_with(
            &format!("attention T=70 window {window:?}"),
            op,
            vec![
                r.tensor(&[70, 2, 4]),
                r.tensor(&[70, 1, 4]),
                r.tensor(&[70, 1, 4]),
            ],
            1e-2,
            7,
        );
    }
}

#[test]
fn unary_gradients_match_finite_differences() {
    use UnaryOp::*;
    let mut r = Rng(8);
    for u in [
        Neg, Exp, Log, Tanh, Sqrt, Rsqrt, Recip, Square, Relu, Sigmoid, Silu, Gelu, GeluTanh,
    ] {
        let x = match u {
            Log | Sqrt | Rsqrt | Recip => r.tensor_in(&[3, 5], 1.0, 2.0),
            // Away from relu's kink at 0.
            Relu => {
                let mut x = r.tensor_in(&[3, 5], 0.1, 1.0);
                x.as_f32_mut().iter_mut().step_by(2).for_each(|v| *v = -*v);
                x
            }
            _ => r.tensor_in(&[3, 5], -2.0, 2.0),
        };
        check(&format!("{u:?}"), Op::Unary(u), vec![x]);
    }
    check("scale", Op::Scale { factor: -1.7 }, vec![r.tensor(&[2, 3])]);
    check(
        "add_scalar",
        Op::AddScalar { value: 0.3 },
        vec![r.tensor(&[2, 3])],
    );
    check(
        "softcap",
        Op::Softcap { cap: 1.5 },
        vec![r.tensor_in(&[2, 3], -3.0, 3.0)],
    );
}

#[test]
fn binary_gradients_sum_over_broadcast_axes() {
    let mut r = Rng(9);
    let shapes: [(&[usize], &[usize]); 4] = [
        (&[3, 4], &[3, 4]),
        (&[3, 4], &[4]),
        (&[3, 1], &[1, 4]),
        (&[2, 3, 4], &[3, 1]),
    ];
    for op in [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
    ] {
        for (sa, sb) in shapes {
            let a = r.tensor(sa);
            // Divisors away from 0; max/min operands well apart so no tie is within eps.
            let b = match op {
                BinaryOp::Div => r.tensor_in(sb, 1.0, 2.0),
                BinaryOp::Max | BinaryOp::Min => {
                    let mut b = r.tensor(sb);
                    b.as_f32_mut()
                        .iter_mut()
                        .for_each(|v| *v = (*v * 8.0).round() / 8.0 + 0.0625);
                    b
                }
                _ => r.tensor(sb),
            };
            let a = if matches!(op, BinaryOp::Max | BinaryOp::Min) {
                let mut a = a;
                a.as_f32_mut()
                    .iter_mut()
                    .for_each(|v| *v = (*v * 8.0).round() / 8.0);
                a
            } else {
                a
            };
            check(&format!("{op:?} {sa:?} {sb:?}"), Op::Binary(op), vec![a, b]);
        }
    }
}

#[test]
fn softmax_and_log_softmax_gradients_match_finite_differences() {
    let mut r = Rng(10);
    check(
        "softmax",
        Op::Softmax,
        vec![r.tensor_in(&[3, 6], -2.0, 2.0)],
    );
    check(
        "log_softmax",
        Op::LogSoftmax,
        vec![r.tensor_in(&[3, 6], -2.0, 2.0)],
    );
}

#[test]
fn reduce_gradients_match_finite_differences() {
    let mut r = Rng(11);
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
        for axis in [0, 1] {
            for keepdim in [false, true] {
                check(
                    &format!("reduce {op:?} axis {axis} keepdim {keepdim}"),
                    Op::Reduce { op, axis, keepdim },
                    vec![r.tensor(&[3, 4, 2])],
                );
            }
        }
    }
}

#[test]
fn layout_gradients_match_finite_differences() {
    let mut r = Rng(12);
    check(
        "reshape",
        Op::Reshape {
            shape: Shape::new([4, 6]),
        },
        vec![r.tensor(&[2, 3, 4])],
    );
    check(
        "transpose",
        Op::Transpose {
            perm: vec![2, 0, 1],
        },
        vec![r.tensor(&[2, 3, 4])],
    );
    check(
        "slice middle",
        Op::Slice {
            axis: 1,
            start: 1,
            end: 3,
        },
        vec![r.tensor(&[2, 4, 3])],
    );
    check(
        "slice prefix",
        Op::Slice {
            axis: 0,
            start: 0,
            end: 1,
        },
        vec![r.tensor(&[2, 4])],
    );
    check(
        "concat",
        Op::Concat { axis: 1 },
        vec![
            r.tensor(&[2, 1, 3]),
            r.tensor(&[2, 3, 3]),
            r.tensor(&[2, 2, 3]),
        ],
    );
    check(
        "cast f32",
        Op::Cast { to: DType::F32 },
        vec![r.tensor(&[2, 3])],
    );
}

#[test]
fn cross_entropy_gradient_is_softmax_minus_onehot_over_count() {
    let mut r = Rng(13);
    check(
        "cross_entropy",
        Op::CrossEntropy,
        vec![
            r.tensor_in(&[6, 10], -3.0, 3.0),
            HostTensor::i32([6], vec![3, -100, 9, 0, -100, 3]),
        ],
    );
}
