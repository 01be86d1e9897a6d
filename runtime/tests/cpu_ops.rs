//! Every CPU kernel against a naive, obviously-correct reference (f64 where it matters) on
//! random inputs, plus small hand-computed cases.
use half::bf16;
use qplc_ops::{BinaryOp, DType, Op, ReduceOp, Rope, RopeScaling, Shape, TensorType, UnaryOp};
use qplc_runtime::cpu::{sgemm, CpuBackend};
use qplc_runtime::{Backend, HostTensor};

type F1 = fn(f64) -> f64;
type F2 = fn(f64, f64) -> f64;

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
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
    fn tensor(&mut self, shape: &[usize]) -> HostTensor {
        let n = shape.iter().product();
        HostTensor::f32(shape.to_vec(), self.vec(n))
    }
}

fn cpu() -> CpuBackend {
    CpuBackend::new()
}

fn eval(op: Op, xs: &[&HostTensor]) -> HostTensor {
    cpu().eval(&op, xs).unwrap_or_else(|e| panic!("{e}"))
}

#[track_caller]
fn assert_close(got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= tol * (1.0 + w.abs()),
            "element {i}: got {g}, want {w} (error {err})"
        );
    }
}

fn naive_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k)
                .map(|l| a[i * k + l] as f64 * b[l * n + j] as f64)
                .sum();
        }
    }
    c
}

fn transpose2(x: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut t = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            t[j * r + i] = x[i * c + j];
        }
    }
    t
}

#[test]
fn linear_matches_naive_product_with_bias() {
    let mut rng = Rng(1);
    for &(t, k, n) in &[(3, 5, 4), (70, 65, 130), (1, 576, 300)] {
        let x = rng.tensor(&[t, k]);
        let w = rng.tensor(&[n, k]);
        let b = rng.tensor(&[n]);
        let got = eval(Op::Linear, &[&x, &w, &b]);
        assert_eq!(got.ty.shape.dims(), &[t, n]);
        let wt = transpose2(w.as_f32(), n, k);
        let mut want = naive_matmul(x.as_f32(), &wt, t, k, n);
        for (i, v) in want.iter_mut().enumerate() {
            *v += b.as_f32()[i % n] as f64;
        }
        assert_close(got.as_f32(), &want, 1e-5);
        let nobias = eval(Op::Linear, &[&x, &w]);
        let want = naive_matmul(x.as_f32(), &wt, t, k, n);
        assert_close(nobias.as_f32(), &want, 1e-5);
    }
}

#[test]
fn linear_keeps_leading_axes_of_the_input() {
    let mut rng = Rng(2);
    let x = rng.tensor(&[2, 3, 8]);
    let w = rng.tensor(&[5, 8]);
    let got = eval(Op::Linear, &[&x, &w]);
    assert_eq!(got.ty.shape.dims(), &[2, 3, 5]);
    let want = naive_matmul(x.as_f32(), &transpose2(w.as_f32(), 5, 8), 6, 8, 5);
    assert_close(got.as_f32(), &want, 1e-5);
}

#[test]
fn matmul_handles_transposes_and_batch_axes() {
    let mut rng = Rng(3);
    let (m, k, n) = (7, 9, 5);
    for ta in [false, true] {
        for tb in [false, true] {
            for batch in [vec![], vec![2, 3]] {
                let mut ashape = batch.clone();
                ashape.extend(if ta { [k, m] } else { [m, k] });
                let mut bshape = batch.clone();
                bshape.extend(if tb { [n, k] } else { [k, n] });
                let a = rng.tensor(&ashape);
                let b = rng.tensor(&bshape);
                let got = eval(Op::MatMul { ta, tb }, &[&a, &b]);
                let nb: usize = batch.iter().product();
                let mut want = Vec::new();
                for i in 0..nb {
                    let ai = &a.as_f32()[i * m * k..(i + 1) * m * k];
                    let bi = &b.as_f32()[i * k * n..(i + 1) * k * n];
                    let ai = if ta {
                        transpose2(ai, k, m)
                    } else {
                        ai.to_vec()
                    };
                    let bi = if tb {
                        transpose2(bi, n, k)
                    } else {
                        bi.to_vec()
                    };
                    want.extend(naive_matmul(&ai, &bi, m, k, n));
                }
                let mut oshape = batch.clone();
                oshape.extend([m, n]);
                assert_eq!(got.ty.shape.dims(), &oshape[..]);
                assert_close(got.as_f32(), &want, 1e-5);
            }
        }
    }
}

#[test]
fn sgemm_splits_columns_when_rows_are_few() {
    let mut rng = Rng(4);
    let (m, k, n) = (2, 300, 1000);
    let a = rng.vec(m * k);
    let b = rng.vec(k * n);
    let mut c = vec![0.0; m * n];
    sgemm(m, k, n, &a, (k, 1), &b, (n, 1), &mut c, (n, 1));
    assert_close(&c, &naive_matmul(&a, &b, m, k, n), 1e-5);
}

#[test]
fn embedding_picks_rows_and_rejects_out_of_range_ids() {
    let table = HostTensor::f32([3, 2], vec![0., 1., 10., 11., 20., 21.]);
    let ids = HostTensor::i32([4], vec![2, 0, 1, 2]);
    let got = eval(Op::Embedding, &[&ids, &table]);
    assert_eq!(got.as_f32(), &[20., 21., 0., 1., 10., 11., 20., 21.]);
    for bad in [3, -1] {
        let ids = HostTensor::i32([2], vec![0, bad]);
        let err = cpu().eval(&Op::Embedding, &[&ids, &table]).unwrap_err();
        assert!(
            err.message
                .contains(&format!("token id {bad} at position 1")),
            "{err}"
        );
    }
}

#[test]
fn rms_norm_matches_hf_formula_with_and_without_offset() {
    let mut rng = Rng(5);
    let (t, h) = (9, 64);
    let x = rng.tensor(&[t, h]);
    let w = rng.tensor(&[h]);
    for offset in [0.0, 1.0] {
        let got = eval(Op::RmsNorm { eps: 1e-5, offset }, &[&x, &w]);
        let mut want = Vec::new();
        for r in x.as_f32().chunks(h) {
            let ms = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / h as f64;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            want.extend(
                r.iter()
                    .zip(w.as_f32())
                    .map(|(&v, &w)| v as f64 * inv * (offset + w as f64)),
            );
        }
        assert_close(got.as_f32(), &want, 2e-6);
    }
}

#[test]
fn layer_norm_matches_naive_with_and_without_bias() {
    let mut rng = Rng(6);
    let (t, h) = (5, 33);
    let x = rng.tensor(&[t, h]);
    let w = rng.tensor(&[h]);
    let b = rng.tensor(&[h]);
    for with_bias in [false, true] {
        let got = if with_bias {
            eval(Op::LayerNorm { eps: 1e-5 }, &[&x, &w, &b])
        } else {
            eval(Op::LayerNorm { eps: 1e-5 }, &[&x, &w])
        };
        let mut want = Vec::new();
        for r in x.as_f32().chunks(h) {
            let mean = r.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
            let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / h as f64;
            for (i, &ri) in r.iter().enumerate() {
                let y = (ri as f64 - mean) / (var + 1e-5).sqrt() * w.as_f32()[i] as f64;
                want.push(if with_bias {
                    y + b.as_f32()[i] as f64
                } else {
                    y
                });
            }
        }
        assert_close(got.as_f32(), &want, 2e-6);
    }
}

fn rope(rotary_dim: usize, interleaved: bool) -> Rope {
    Rope {
        theta: 10000.0,
        rotary_dim,
        scaling: RopeScaling::None,
        interleaved,
    }
}

#[test]
fn rope_rotates_halves_by_position_times_frequency() {
    // head_dim 4, θ = 10⁴: inv_freq = [1, 1/100]; at position 1 the angles are 1 and 0.01.
    let x = HostTensor::f32([2, 1, 4], vec![1., 2., 3., 4., 1., 2., 3., 4.]);
    let pos = HostTensor::i32([2], vec![0, 1]);
    let got = eval(Op::Rope(rope(4, false)), &[&x, &pos]);
    let (c1, s1, c2, s2) = (1f64.cos(), 1f64.sin(), 0.01f64.cos(), 0.01f64.sin());
    let want = [
        1.,
        2.,
        3.,
        4.,
        1. * c1 - 3. * s1,
        2. * c2 - 4. * s2,
        3. * c1 + 1. * s1,
        4. * c2 + 2. * s2,
    ];
    assert_close(got.as_f32(), &want, 1e-6);
}

#[test]
fn rope_interleaved_rotates_adjacent_pairs() {
    let x = HostTensor::f32([1, 1, 4], vec![1., 2., 3., 4.]);
    let pos = HostTensor::i32([1], vec![1]);
    let got = eval(Op::Rope(rope(4, true)), &[&x, &pos]);
    let (c1, s1, c2, s2) = (1f64.cos(), 1f64.sin(), 0.01f64.cos(), 0.01f64.sin());
    let want = [
        1. * c1 - 2. * s1,
        2. * c1 + 1. * s1,
        3. * c2 - 4. * s2,
        4. * c2 + 3. * s2,
    ];
    assert_close(got.as_f32(), &want, 1e-6);
}

#[test]
fn rope_partial_rotary_leaves_the_tail_untouched() {
    let x = HostTensor::f32([1, 2, 6], (0..12).map(|v| v as f32 + 1.0).collect());
    let pos = HostTensor::i32([1], vec![3]);
    let got = eval(Op::Rope(rope(2, false)), &[&x, &pos]);
    let (c, s) = (3f64.cos(), 3f64.sin());
    for h in 0..2 {
        let b = h * 6;
        let (a0, a1) = (x.as_f32()[b] as f64, x.as_f32()[b + 1] as f64);
        assert_close(
            &got.as_f32()[b..b + 2],
            &[a0 * c - a1 * s, a1 * c + a0 * s],
            1e-6,
        );
        assert_eq!(&got.as_f32()[b + 2..b + 6], &x.as_f32()[b + 2..b + 6]);
    }
}

#[test]
fn rope_angles_use_f32_product_like_transformers() {
    // HF: freqs = inv_freq(f32) · position(f32) in f32, then cos/sin in f32. At a large
    // position the f32 product differs from the f64 angle; we must follow HF.
    let x = HostTensor::f32([1, 1, 2], vec![1.0, 0.0]);
    let p = 4093;
    let pos = HostTensor::i32([1], vec![p]);
    let got = eval(Op::Rope(rope(2, false)), &[&x, &pos]);
    let angle = 1.0f32 * p as f32;
    assert_eq!(got.as_f32(), &[angle.cos(), angle.sin()]);
}

#[test]
fn rope_rejects_negative_positions() {
    let x = HostTensor::f32([1, 1, 2], vec![1.0, 0.0]);
    let pos = HostTensor::i32([1], vec![-2]);
    assert!(cpu().eval(&Op::Rope(rope(2, false)), &[&x, &pos]).is_err());
}

/// Full-matrix attention in f64.
#[allow(clippy::too_many_arguments)]
fn naive_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    nh: usize,
    nkv: usize,
    d: usize,
    scale: f64,
    window: Option<usize>,
    cap: Option<f64>,
) -> Vec<f64> {
    let mut out = vec![0.0; t * nh * d];
    for h in 0..nh {
        let kh = h / (nh / nkv);
        for i in 0..t {
            let mut s = vec![f64::NEG_INFINITY; t];
            for (j, sj) in s.iter_mut().enumerate() {
                let visible = j <= i && window.is_none_or(|w| i - j < w);
                if visible {
                    let dot: f64 = (0..d)
                        .map(|e| q[(i * nh + h) * d + e] as f64 * k[(j * nkv + kh) * d + e] as f64)
                        .sum();
                    let y = dot * scale;
                    *sj = cap.map_or(y, |c| c * (y / c).tanh());
                }
            }
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = s.iter().map(|&x| (x - m).exp()).collect();
            let z: f64 = p.iter().sum();
            for e in 0..d {
                out[(i * nh + h) * d + e] = (0..t)
                    .map(|j| p[j] / z * v[(j * nkv + kh) * d + e] as f64)
                    .sum();
            }
        }
    }
    out
}

#[test]
fn attention_matches_naive_with_gqa_window_and_softcap() {
    let mut rng = Rng(7);
    let (t, nh, nkv, d) = (150, 4, 2, 16);
    let q = rng.tensor(&[t, nh, d]);
    let k = rng.tensor(&[t, nkv, d]);
    let v = rng.tensor(&[t, nkv, d]);
    let scale = 1.0 / (d as f64).sqrt();
    for (window, cap) in [
        (None, None),
        (Some(20), None),
        (None, Some(0.5)),
        (Some(70), Some(1.0)),
    ] {
        let got = eval(
            Op::Attention {
                scale,
                sliding_window: window,
                softcap: cap,
            },
            &[&q, &k, &v],
        );
        let want = naive_attention(
            q.as_f32(),
            k.as_f32(),
            v.as_f32(),
            t,
            nh,
            nkv,
            d,
            scale,
            window,
            cap,
        );
        assert_close(got.as_f32(), &want, 2e-6);
    }
}

#[test]
fn attention_window_limits_how_far_back_a_query_sees() {
    // Equal scores (q = 0): each query averages the values it can see.
    let q = HostTensor::f32([3, 1, 1], vec![0.; 3]);
    let k = HostTensor::f32([3, 1, 1], vec![0.; 3]);
    let v = HostTensor::f32([3, 1, 1], vec![1., 2., 3.]);
    let op = |w| Op::Attention {
        scale: 1.0,
        sliding_window: w,
        softcap: None,
    };
    assert_eq!(eval(op(None), &[&q, &k, &v]).as_f32(), &[1.0, 1.5, 2.0]);
    assert_eq!(eval(op(Some(2)), &[&q, &k, &v]).as_f32(), &[1.0, 1.5, 2.5]);
    assert_eq!(eval(op(Some(1)), &[&q, &k, &v]).as_f32(), &[1.0, 2.0, 3.0]);
}

#[test]
fn attention_maps_query_heads_to_kv_heads_in_groups() {
    // 4 query heads, 2 KV heads: heads 0,1 read KV head 0 (values 1), heads 2,3 KV head 1 (values 2).
    let q = HostTensor::f32([2, 4, 1], vec![0.; 8]);
    let k = HostTensor::f32([2, 2, 1], vec![0.; 4]);
    let v = HostTensor::f32([2, 2, 1], vec![1., 2., 1., 2.]);
    let got = eval(
        Op::Attention {
            scale: 1.0,
            sliding_window: None,
            softcap: None,
        },
        &[&q, &k, &v],
    );
    assert_eq!(got.as_f32(), &[1., 1., 2., 2., 1., 1., 2., 2.]);
}

fn erf64(x: f64) -> f64 {
    // Abramowitz–Stegun is too coarse; integrate the series, converging for |x| < 4.
    let mut sum = 0.0;
    let mut term = x;
    let mut n = 0.0;
    while term.abs() > 1e-17 {
        sum += term / (2.0 * n + 1.0);
        n += 1.0;
        term *= -x * x / n;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

#[test]
fn unary_ops_match_f64_formulas() {
    let mut rng = Rng(8);
    let x: Vec<f32> = rng.vec(1000).iter().map(|v| v * 4.0).collect();
    let xt = HostTensor::f32([10, 100], x.clone());
    let pos = HostTensor::f32([1000], x.iter().map(|v| v.abs() + 0.1).collect());
    let cases: Vec<(UnaryOp, F1, bool)> = vec![
        (UnaryOp::Neg, |x| -x, false),
        (UnaryOp::Exp, f64::exp, false),
        (UnaryOp::Log, f64::ln, true),
        (UnaryOp::Tanh, f64::tanh, false),
        (UnaryOp::Sqrt, f64::sqrt, true),
        (UnaryOp::Rsqrt, |x| 1.0 / x.sqrt(), true),
        (UnaryOp::Recip, |x| 1.0 / x, true),
        (UnaryOp::Square, |x| x * x, false),
        (UnaryOp::Relu, |x| x.max(0.0), false),
        (UnaryOp::Sigmoid, |x| 1.0 / (1.0 + (-x).exp()), false),
        (UnaryOp::Silu, |x| x / (1.0 + (-x).exp()), false),
        (
            UnaryOp::Gelu,
            |x| 0.5 * x * (1.0 + erf64(x / 2f64.sqrt())),
            false,
        ),
        (
            UnaryOp::GeluTanh,
            |x| {
                0.5 * x
                    * (1.0
                        + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
            },
            false,
        ),
    ];
    for (op, f, positive) in cases {
        let input = if positive { &pos } else { &xt };
        let got = eval(Op::Unary(op), &[input]);
        let want: Vec<f64> = input.as_f32().iter().map(|&v| f(v as f64)).collect();
        assert_close(got.as_f32(), &want, 2e-6);
    }
}

#[test]
fn gelu_matches_reference_values() {
    let x = HostTensor::f32([4], vec![1.0, -1.0, 0.5, 3.0]);
    let got = eval(Op::Unary(UnaryOp::Gelu), &[&x]);
    // torch.nn.functional.gelu(torch.tensor([1., -1., .5, 3.], dtype=torch.float64))
    let want = [
        0.8413447460685429,
        -0.15865525393145707,
        0.3457312306409606,
        2.9959502020513434,
    ];
    assert_close(got.as_f32(), &want, 1e-7);
}

#[test]
fn scalar_maps_scale_shift_and_softcap() {
    let x = HostTensor::f32([3], vec![-2.0, 0.5, 40.0]);
    assert_eq!(
        eval(Op::Scale { factor: 2.0 }, &[&x]).as_f32(),
        &[-4.0, 1.0, 80.0]
    );
    assert_eq!(
        eval(Op::AddScalar { value: 1.0 }, &[&x]).as_f32(),
        &[-1.0, 1.5, 41.0]
    );
    let got = eval(Op::Softcap { cap: 30.0 }, &[&x]);
    let want: Vec<f64> = [-2.0f64, 0.5, 40.0]
        .iter()
        .map(|v| 30.0 * (v / 30.0).tanh())
        .collect();
    assert_close(got.as_f32(), &want, 1e-6);
}

fn naive_broadcast(a: &HostTensor, b: &HostTensor, f: F2) -> (Vec<usize>, Vec<f64>) {
    let out = qplc_ops::broadcast(a.shape(), b.shape()).unwrap();
    let r = out.rank();
    let idx = |s: &Shape, oi: &[usize]| -> usize {
        let pad = r - s.rank();
        let st = s.strides();
        (0..s.rank())
            .map(|d| {
                if s.dims()[d] == 1 {
                    0
                } else {
                    oi[d + pad] * st[d]
                }
            })
            .sum()
    };
    let mut vals = Vec::new();
    for lin in 0..out.numel() {
        let mut oi = vec![0; r];
        let mut rem = lin;
        for d in (0..r).rev() {
            oi[d] = rem % out.dims()[d];
            rem /= out.dims()[d];
        }
        vals.push(f(
            a.as_f32()[idx(a.shape(), &oi)] as f64,
            b.as_f32()[idx(b.shape(), &oi)] as f64,
        ));
    }
    (out.0, vals)
}

#[test]
fn binary_ops_broadcast_like_numpy() {
    let mut rng = Rng(9);
    let shapes: &[(&[usize], &[usize])] = &[
        (&[4, 5], &[4, 5]),
        (&[4, 5], &[5]),
        (&[4, 1], &[1, 5]),
        (&[2, 1, 5], &[3, 1]),
        (&[3], &[]),
        (&[], &[2, 3]),
        (&[6, 4, 3], &[6, 1, 3]),
    ];
    let ops: [(BinaryOp, F2); 6] = [
        (BinaryOp::Add, |a, b| a + b),
        (BinaryOp::Sub, |a, b| a - b),
        (BinaryOp::Mul, |a, b| a * b),
        (BinaryOp::Div, |a, b| a / b),
        (BinaryOp::Max, f64::max),
        (BinaryOp::Min, f64::min),
    ];
    for (sa, sb) in shapes {
        let a = rng.tensor(sa);
        let b = rng.tensor(sb);
        for (op, f) in ops {
            let got = eval(Op::Binary(op), &[&a, &b]);
            let (shape, want) = naive_broadcast(&a, &b, f);
            assert_eq!(got.ty.shape.dims(), &shape[..]);
            assert_close(got.as_f32(), &want, 1e-6);
        }
    }
}

#[test]
fn integer_binary_ops_broadcast_and_refuse_division_by_zero() {
    let a = HostTensor::i32([2, 2], vec![1, 2, 3, 4]);
    let b = HostTensor::i32([2], vec![10, 20]);
    assert_eq!(
        eval(Op::Binary(BinaryOp::Add), &[&a, &b]).as_i32(),
        &[11, 22, 13, 24]
    );
    let z = HostTensor::i32([1], vec![0]);
    assert!(cpu().eval(&Op::Binary(BinaryOp::Div), &[&a, &z]).is_err());
}

#[test]
fn softmax_rows_sum_to_one_and_survive_large_logits() {
    let mut rng = Rng(10);
    let x = HostTensor::f32([4, 50], rng.vec(200).iter().map(|v| v * 1000.0).collect());
    let p = eval(Op::Softmax, &[&x]);
    for row in p.as_f32().chunks(50) {
        let s: f64 = row.iter().map(|&v| v as f64).sum();
        assert!((s - 1.0).abs() < 1e-5, "row sums to {s}");
        assert!(row.iter().all(|v| v.is_finite() && *v >= 0.0));
    }
}

#[test]
fn log_softmax_equals_log_of_softmax() {
    let mut rng = Rng(11);
    let x = rng.tensor(&[3, 7, 40]);
    let ls = eval(Op::LogSoftmax, &[&x]);
    let p = eval(Op::Softmax, &[&x]);
    let want: Vec<f64> = p.as_f32().iter().map(|&v| (v as f64).ln()).collect();
    assert_close(ls.as_f32(), &want, 1e-5);
}

#[test]
fn reduce_sums_means_and_maxes_along_any_axis() {
    let x = HostTensor::f32([2, 3], vec![1., 2., 3., 4., 5., 6.]);
    let r = |op, axis, keepdim| eval(Op::Reduce { op, axis, keepdim }, &[&x]);
    assert_eq!(r(ReduceOp::Sum, 0, false).as_f32(), &[5., 7., 9.]);
    assert_eq!(r(ReduceOp::Sum, 1, false).as_f32(), &[6., 15.]);
    assert_eq!(r(ReduceOp::Mean, 1, true).as_f32(), &[2., 5.]);
    assert_eq!(r(ReduceOp::Mean, 1, true).ty.shape.dims(), &[2, 1]);
    assert_eq!(r(ReduceOp::Max, 0, true).as_f32(), &[4., 5., 6.]);
}

#[test]
fn transpose_applies_any_permutation() {
    let x = HostTensor::f32([2, 3, 4], (0..24).map(|v| v as f32).collect());
    let perms = [
        [0, 1, 2],
        [1, 0, 2],
        [2, 1, 0],
        [1, 2, 0],
        [2, 0, 1],
        [0, 2, 1],
    ];
    for perm in perms {
        let got = eval(
            Op::Transpose {
                perm: perm.to_vec(),
            },
            &[&x],
        );
        let od: Vec<usize> = perm.iter().map(|&p| x.shape().dims()[p]).collect();
        assert_eq!(got.ty.shape.dims(), &od[..]);
        let st = x.shape().strides();
        let mut want = Vec::new();
        for i in 0..od[0] {
            for j in 0..od[1] {
                for k in 0..od[2] {
                    let idx = [i, j, k];
                    let mut src = 0;
                    for a in 0..3 {
                        src += idx[a] * st[perm[a]];
                    }
                    want.push(x.as_f32()[src]);
                }
            }
        }
        assert_eq!(got.as_f32(), &want[..], "perm {perm:?}");
    }
}

#[test]
fn slice_concat_and_reshape_move_the_right_elements() {
    let x = HostTensor::f32([2, 3, 2], (0..12).map(|v| v as f32).collect());
    let s = eval(
        Op::Slice {
            axis: 1,
            start: 1,
            end: 3,
        },
        &[&x],
    );
    assert_eq!(s.as_f32(), &[2., 3., 4., 5., 8., 9., 10., 11.]);
    let a = eval(
        Op::Slice {
            axis: 1,
            start: 0,
            end: 1,
        },
        &[&x],
    );
    let c = eval(Op::Concat { axis: 1 }, &[&a, &s]);
    assert_eq!(c, x);
    let r = eval(
        Op::Reshape {
            shape: Shape::new([6, 2]),
        },
        &[&x],
    );
    assert_eq!(r.as_f32(), x.as_f32());
    assert_eq!(r.ty.shape.dims(), &[6, 2]);
    // Integer tensors move the same way.
    let ids = HostTensor::i32([2, 2], vec![1, 2, 3, 4]);
    let t = eval(Op::Transpose { perm: vec![1, 0] }, &[&ids]);
    assert_eq!(t.as_i32(), &[1, 3, 2, 4]);
}

#[test]
fn cast_rounds_to_bf16_and_truncates_to_int() {
    let x = HostTensor::f32([3], vec![1.0 + 1.0 / 512.0, -2.7, 3.3]);
    let b = eval(Op::Cast { to: DType::BF16 }, &[&x]);
    assert_eq!(b.ty.dtype, DType::BF16);
    let want: Vec<f32> = x
        .as_f32()
        .iter()
        .map(|&v| bf16::from_f32(v).to_f32())
        .collect();
    assert_eq!(b.as_f32(), &want[..]);
    let i = eval(Op::Cast { to: DType::I32 }, &[&x]);
    assert_eq!(i.as_i32(), &[1, -2, 3]);
}

#[test]
fn bf16_results_are_rounded_after_f32_compute() {
    let mut rng = Rng(12);
    let x = rng.tensor(&[8, 32]).cast(DType::BF16);
    let w = rng.tensor(&[16, 32]).cast(DType::BF16);
    let got = eval(Op::Linear, &[&x, &w]);
    assert_eq!(got.ty.dtype, DType::BF16);
    // Same as computing in f32 and rounding once.
    let xf = HostTensor::f32([8, 32], x.as_f32().to_vec());
    let wf = HostTensor::f32([16, 32], w.as_f32().to_vec());
    let f = eval(Op::Linear, &[&xf, &wf]);
    let want: Vec<f32> = f
        .as_f32()
        .iter()
        .map(|&v| bf16::from_f32(v).to_f32())
        .collect();
    assert_eq!(got.as_f32(), &want[..]);
    let s = eval(Op::Unary(UnaryOp::Silu), &[&x]);
    assert!(s.as_f32().iter().all(|&v| bf16::from_f32(v).to_f32() == v));
}

#[test]
fn bad_operands_are_errors_not_panics() {
    let x = HostTensor::f32([2, 4], vec![0.0; 8]);
    let w_int = HostTensor::i32([3, 4], vec![0; 12]);
    let err = cpu().eval(&Op::Linear, &[&x, &w_int]).unwrap_err();
    assert!(err.to_string().contains("float"), "{err}");
    let wrong_w = HostTensor::f32([3, 5], vec![0.0; 15]);
    assert!(cpu().eval(&Op::Linear, &[&x, &wrong_w]).is_err());
    // An output buffer of the wrong type is refused before any work.
    let w = HostTensor::f32([3, 4], vec![0.0; 12]);
    let mut out = HostTensor::zeros(&TensorType::new([2, 4], DType::F32));
    assert!(cpu().execute(&Op::Linear, &[&x, &w], &mut out).is_err());
    // Storage that disagrees with the declared shape.
    let mut bad = x.clone();
    bad.data = qplc_runtime::Data::F32(vec![0.0; 3]);
    assert!(cpu().eval(&Op::Unary(UnaryOp::Exp), &[&bad]).is_err());
}

#[test]
fn fill_writes_its_value_everywhere() {
    let f = eval(
        Op::Fill {
            value: 2.5,
            ty: TensorType::new([2, 2], DType::F32),
        },
        &[],
    );
    assert_eq!(f.as_f32(), &[2.5; 4]);
}

/// Throughput of the kernels that dominate a 135M-parameter model (SmolLM-135M shapes:
/// H 576, MLP 1536, 9 query / 3 KV heads of 64). Run with
/// `cargo test --release -p qplc-runtime --test cpu_ops -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark; prints GFLOP/s"]
fn kernel_throughput_report() {
    let mut rng = Rng(13);
    let (m, k, n) = (512, 576, 1536);
    let a = rng.vec(m * k);
    let b = rng.vec(k * n);
    let mut c = vec![0.0; m * n];
    let reps = 20;
    sgemm(m, k, n, &a, (k, 1), &b, (n, 1), &mut c, (n, 1));
    let t = std::time::Instant::now();
    for _ in 0..reps {
        sgemm(m, k, n, &a, (k, 1), &b, (n, 1), &mut c, (n, 1));
    }
    let s = t.elapsed().as_secs_f64();
    let gf = 2.0 * (m * k * n * reps) as f64 / s / 1e9;
    println!(
        "sgemm {m}x{k} · {k}x{n}: {gf:.1} GFLOP/s ({} threads)",
        rayon::current_num_threads()
    );

    let x = rng.tensor(&[m, k]);
    let w = rng.tensor(&[n, k]);
    let t = std::time::Instant::now();
    for _ in 0..reps {
        eval(Op::Linear, &[&x, &w]);
    }
    let gf = 2.0 * (m * k * n * reps) as f64 / t.elapsed().as_secs_f64() / 1e9;
    println!("linear [{m},{k}] · [{n},{k}]ᵀ: {gf:.1} GFLOP/s");

    for t_len in [512, 2048] {
        let (nh, nkv, d) = (9, 3, 64);
        let q = rng.tensor(&[t_len, nh, d]);
        let kk = rng.tensor(&[t_len, nkv, d]);
        let v = rng.tensor(&[t_len, nkv, d]);
        let op = Op::Attention {
            scale: 0.125,
            sliding_window: None,
            softcap: None,
        };
        let reps = 5;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            eval(op.clone(), &[&q, &kk, &v]);
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        let flops = op.flops(&[q.ty.clone(), kk.ty.clone(), v.ty.clone()], &q.ty) as f64;
        println!(
            "attention T={t_len}: {:.2} ms, {:.1} GFLOP/s (causal flops)",
            s * 1e3,
            flops / s / 1e9
        );
    }
}
