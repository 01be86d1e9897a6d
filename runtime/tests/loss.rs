//! Loss semantics of spec §7 and acceptance checks 34, 35 and 37: the loss pass's shifted
//! labels and the fused `CrossEntropy` kernel (the fuse pass's rewrite of the loss pass's
//! `Nll(LogSoftmax)`, as the pipeline runs it) against direct f64 computations.
use qplc_compiler::{BlockKind, Graph, Scope};
use qplc_ops::{DType, Op, TensorType};
use qplc_passes::{append_loss, cross_entropy_rules, fuse};
use qplc_runtime::executor::Program;
use qplc_runtime::{CpuBackend, HostTensor};
use std::collections::HashMap;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn f(&mut self, scale: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
    }
    fn logits(&mut self, t: usize, v: usize, scale: f32) -> HostTensor {
        HostTensor::f32([t, v], (0..t * v).map(|_| self.f(scale)).collect())
    }
}

/// `logits` as a weight and graph output (`dtype` storage), plus the loss pass.
fn loss_graph(t: usize, v: usize, dtype: DType) -> Graph {
    let mut g = Graph::new();
    let s = Scope::new("lm_head", BlockKind::Head, None);
    let z = g
        .add(
            Op::Weight {
                name: "z".into(),
                ty: TensorType::new([t, v], dtype),
            },
            &[],
            &s,
        )
        .unwrap();
    g.set_output("logits", z);
    append_loss(&mut g).unwrap();
    fuse(&mut g, &cross_entropy_rules()).unwrap();
    g.verify().unwrap();
    assert_eq!(g.node(g.output("loss").unwrap()).op, Op::CrossEntropy);
    g
}

fn run_loss(logits: &HostTensor, labels: &[i32]) -> Result<f32, String> {
    let (t, v) = (logits.ty.shape.dims()[0], logits.ty.shape.dims()[1]);
    let g = loss_graph(t, v, logits.ty.dtype);
    let weights: HashMap<String, HostTensor> = [("z".to_string(), logits.clone())].into();
    let inputs: HashMap<String, HostTensor> =
        [("labels".to_string(), HostTensor::i32([t], labels.to_vec()))].into();
    let out = Program::new(&g, &["loss"])
        .unwrap()
        .run(&CpuBackend::new(), &|n| weights.get(n), &|n| inputs.get(n))
        .map_err(|e| format!("{e:#}"))?;
    Ok(out.get("loss").unwrap().as_f32()[0])
}

/// −log softmax(z_t)[y] in f64.
fn nll(row: &[f32], y: usize) -> f64 {
    let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    lse - row[y] as f64
}

/// spec §7 written out: mean over t with labels[t+1] ≠ −100 of −log softmax(z_t)[labels[t+1]].
fn reference(logits: &HostTensor, labels: &[i32]) -> f64 {
    let v = logits.ty.shape.dims()[1];
    let z = logits.as_f32();
    let (mut total, mut count) = (0.0, 0);
    for t in 0..labels.len() - 1 {
        let y = labels[t + 1];
        if y != -100 {
            total += nll(&z[t * v..(t + 1) * v], y as usize);
            count += 1;
        }
    }
    total / count as f64
}

#[test]
fn loss_is_mean_nll_over_shifted_labels_ignoring_minus_100() {
    let mut r = Rng(1);
    let z = r.logits(8, 11, 3.0);
    let labels = [4, 7, -100, 2, 10, -100, 0, 5];
    let got = run_loss(&z, &labels).unwrap() as f64;
    let want = reference(&z, &labels);
    assert!((got - want).abs() <= 1e-6 * want.abs(), "{got} vs {want}");
}

#[test]
fn last_position_never_contributes_and_first_label_is_never_a_target() {
    let mut r = Rng(2);
    let mut z = r.logits(5, 9, 2.0);
    let labels = [3, 1, 4, 1, 5];
    let base = run_loss(&z, &labels).unwrap();
    // The first label is only ever the target of position −1, which does not exist.
    let relabelled = run_loss(&z, &[8, 1, 4, 1, 5]).unwrap();
    assert_eq!(base, relabelled);
    // The last row of logits predicts past the end: changing it changes nothing.
    z.as_f32_mut()[4 * 9..].iter_mut().for_each(|x| *x += 5.0);
    assert_eq!(run_loss(&z, &labels).unwrap(), base);
}

#[test]
fn sequence_without_valid_labels_is_an_error() {
    let mut r = Rng(3);
    let z = r.logits(4, 6, 1.0);
    let e = run_loss(&z, &[-100; 4]).unwrap_err();
    assert!(e.contains("All labels are masked"), "{e}");
    // Only labels[0] valid: after the shift nothing is left to predict.
    let e = run_loss(&z, &[2, -100, -100, -100]).unwrap_err();
    assert!(e.contains("All labels are masked"), "{e}");
}

#[test]
fn out_of_range_label_is_an_error_not_a_panic() {
    let mut r = Rng(4);
    let z = r.logits(3, 6, 1.0);
    let e = run_loss(&z, &[0, 6, 1]).unwrap_err();
    assert!(e.contains("label 6 at position 0"), "{e}");
}

#[test]
fn bf16_logits_are_cast_to_f32_before_the_loss() {
    let mut r = Rng(5);
    let z = r.logits(6, 10, 3.0).cast(DType::BF16);
    let labels = [1, 2, 3, 4, 5, 6];
    let got = run_loss(&z, &labels).unwrap() as f64;
    let want = reference(&z, &labels);
    assert!((got - want).abs() <= 1e-6 * want.abs(), "{got} vs {want}");
}

#[test]
fn vocabulary_over_65536_is_chunked_exactly_like_the_direct_formula() {
    // check 35: V = 256 000; the row maxima sit in different chunks, so combining the
    // chunks' log-sum-exps is exercised.
    let (t, v) = (4, 256_000);
    let mut r = Rng(6);
    let mut z = r.logits(t, v, 4.0);
    for (row, at) in [(0, 70_000), (1, 200_000), (2, 3), (3, 255_999)] {
        z.as_f32_mut()[row * v + at] = 30.0;
    }
    let labels = HostTensor::i32([t], vec![70_000, 12, 131_072, -100]);
    let cpu = CpuBackend::new();
    let loss = cpu.eval(&Op::CrossEntropy, &[&z, &labels]).unwrap();
    let zs = z.as_f32();
    let y = labels.as_i32();
    let valid: Vec<usize> = (0..t).filter(|&i| y[i] != -100).collect();
    let want: f64 = valid
        .iter()
        .map(|&i| nll(&zs[i * v..(i + 1) * v], y[i] as usize))
        .sum::<f64>()
        / valid.len() as f64;
    let got = loss.as_f32()[0] as f64;
    assert!(
        (got - want).abs() <= 1e-4 * want.abs(),
        "loss {got} vs {want}"
    );

    let g = HostTensor::f32(Vec::<usize>::new(), vec![1.0]);
    let grad = cpu
        .eval(&Op::CrossEntropyBackward, &[&z, &labels, &g])
        .unwrap();
    let grad = grad.as_f32();
    let mut max_err = 0.0f64;
    let mut max_g = 0.0f64;
    for i in 0..t {
        let row = &zs[i * v..(i + 1) * v];
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        for (j, &x) in row.iter().enumerate() {
            let want = if y[i] == -100 {
                0.0
            } else {
                ((x as f64 - lse).exp() - if j == y[i] as usize { 1.0 } else { 0.0 })
                    / valid.len() as f64
            };
            max_g = max_g.max(want.abs());
            max_err = max_err.max((grad[i * v + j] as f64 - want).abs());
        }
    }
    eprintln!("V = {v}: loss {got} vs {want}; gradient max |Δ| {max_err:e} / max |g| {max_g:e}");
    assert!(
        max_err <= 1e-4 * max_g,
        "gradient error {max_err} (max {max_g})"
    );
    // Ignored rows get exactly zero gradient.
    assert!(grad[3 * v..].iter().all(|&x| x == 0.0));
}

#[test]
fn loss_is_a_per_sequence_token_mean_so_micro_batches_weigh_equally() {
    // check 37: a sequence with 1 valid token and one with 11 each report their own mean
    // (not a sum a later global token count would divide), so the training loop's plain
    // average of micro-batch losses weighs sequences equally.
    let v = 7;
    let mut few = vec![-100; 12];
    few[5] = 3;
    let many: Vec<i32> = (0..12).map(|i| (i * 3 % v) as i32).collect();
    let mut r = Rng(7);
    let z = r.logits(12, v, 2.0);
    let a = run_loss(&z, &few).unwrap() as f64;
    let b = run_loss(&z, &many).unwrap() as f64;
    assert!((a - reference(&z, &few)).abs() < 1e-6 * a);
    assert!((b - reference(&z, &many)).abs() < 1e-6 * b);
}
