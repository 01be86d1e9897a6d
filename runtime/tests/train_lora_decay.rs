//! Composite LoRA decay (spec §6.1.4–6.1.5, checks 32, 33) and the metric aggregation of §10.2.
use qplc_ops::DType;
use qplc_runtime::train::lora_decay::{check_decay_dtype, lora_product_norm, LoraShape};
use qplc_runtime::train::{decay_lora_pair, rms_ratio, MetricSummary, Schedule};

const SHAPE: LoraShape = LoraShape {
    rank: 2,
    in_features: 3,
    out_features: 4,
};

fn pair() -> (Vec<f32>, Vec<f32>) {
    // A: 2×3, B: 4×2 (row-major), arbitrary but fixed.
    let a = vec![0.5, -1.0, 0.25, 1.5, 0.75, -0.5];
    let b = vec![0.2, -0.1, 0.4, 0.3, -0.6, 0.05, 0.1, 0.9];
    (a, b)
}

/// Dense row-major (m×k)·(k×n), f64; the test's own, independent of the implementation.
fn mm(x: &[f64], y: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|t| x[i * k + t] * y[t * n + j]).sum();
        }
    }
    out
}

fn transpose(x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = x[i * cols + j];
        }
    }
    out
}

fn frob(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// Check 32: A' = A − ηλBᵀ(BA), B' = B − ηλ(BA)Aᵀ from the pre-update A, B (W formed explicitly
/// here); norms = ‖B'A'‖_F, weight_decay = ‖BA‖_F − ‖B'A'‖_F.
#[test]
fn decay_applies_exact_formulas_from_pre_update_factors() {
    let (r, n_in, n_out) = (2, 3, 4);
    let (eta, lambda) = (0.05, 0.4);
    let (mut a, mut b) = pair();
    let (a0, b0) = (to64(&a), to64(&b));
    let w = mm(&b0, &a0, n_out, r, n_in);
    let ga = mm(&transpose(&b0, n_out, r), &w, r, n_out, n_in);
    let gb = mm(&w, &transpose(&a0, r, n_in), n_out, n_in, r);
    let a_want: Vec<f64> = a0
        .iter()
        .zip(&ga)
        .map(|(x, g)| x - eta * lambda * g)
        .collect();
    let b_want: Vec<f64> = b0
        .iter()
        .zip(&gb)
        .map(|(x, g)| x - eta * lambda * g)
        .collect();

    let m = decay_lora_pair(&mut a, &mut b, SHAPE, eta, lambda);

    for (got, want) in a.iter().zip(&a_want).chain(b.iter().zip(&b_want)) {
        assert!((f64::from(*got) - want).abs() < 1e-7, "{got} vs {want}");
    }
    let after = frob(&mm(&to64(&b), &to64(&a), n_out, r, n_in));
    assert!((m.norm - after).abs() < 1e-12);
    let wd = m.weight_decay.expect("λ > 0 reports weight_decay");
    assert!((wd - (frob(&w) - after)).abs() < 1e-12);
    assert!(wd > 0.0, "the decay shrinks ‖BA‖");
}

/// Check 32: with λ = 0 nothing changes and no weight_decay metric is reported.
#[test]
fn zero_lambda_changes_nothing_and_reports_only_the_norm() {
    let (mut a, mut b) = pair();
    let (a0, b0) = (a.clone(), b.clone());
    let m = decay_lora_pair(&mut a, &mut b, SHAPE, 0.1, 0.0);
    assert_eq!((a, b), (a0.clone(), b0.clone()));
    assert_eq!(m.weight_decay, None);
    let w = mm(&to64(&b0), &to64(&a0), 4, 2, 3);
    assert!((m.norm - frob(&w)).abs() < 1e-12);
}

/// PEFT init has B = 0: the product and both gradients vanish, so the decay is a no-op.
#[test]
fn decay_of_freshly_initialised_pair_is_a_no_op() {
    let (mut a, _) = pair();
    let mut b = vec![0.0f32; 8];
    let a0 = a.clone();
    let m = decay_lora_pair(&mut a, &mut b, SHAPE, 1.0, 1.0);
    assert_eq!(a, a0);
    assert!(b.iter().all(|&x| x == 0.0));
    assert_eq!(m.norm, 0.0);
    assert_eq!(m.weight_decay, Some(0.0));
}

/// Check 33: the regulariser's η at global step k is the post-step rate lr·f(k), i.e. the
/// schedule's value after it advanced — not the lr·f(k−1) the optimiser used.
#[test]
fn decay_at_step_k_uses_post_step_learning_rate() {
    let (lr, lambda) = (0.1, 0.5);
    let mut sched = Schedule::new(lr, 0.99);
    let k = 3;
    for _ in 0..k {
        sched.advance(); // after the optimiser step k
    }
    let eta = sched.current_lr();
    assert_eq!(eta, sched.logged_lr(k));
    assert_ne!(eta, sched.optimizer_lr(k));

    assert_eq!(eta, lr * rms_ratio(k, 0.99));

    let decayed = |eta: f64| {
        let (mut a, mut b) = pair();
        decay_lora_pair(&mut a, &mut b, SHAPE, eta, lambda);
        (a, b)
    };
    assert_eq!(decayed(eta), decayed(lr * rms_ratio(k, 0.99)));
    assert_ne!(decayed(eta), decayed(sched.optimizer_lr(k)));
}

#[test]
fn product_norm_equals_frobenius_norm_of_ba() {
    let (a, b) = pair();
    let w = mm(&to64(&b), &to64(&a), 4, 2, 3);
    assert!((lora_product_norm(&a, &b, SHAPE) - frob(&w)).abs() < 1e-12);
}

#[test]
fn positive_decay_requires_f32_adapters() {
    assert!(check_decay_dtype(0.1, DType::F32).is_ok());
    assert!(check_decay_dtype(0.0, DType::BF16).is_ok());
    let err = check_decay_dtype(0.1, DType::BF16).unwrap_err().to_string();
    assert!(err.contains("float32"), "{err}");
}

/// Spec §10.2: avg = sum/count over all stages, global min/max, 0 when nothing was reported.
#[test]
fn metric_summaries_merge_across_stages_and_report_zero_when_empty() {
    let empty = MetricSummary::default();
    assert_eq!((empty.avg(), empty.min(), empty.max()), (0.0, 0.0, 0.0));
    let mut stage0: MetricSummary = [1.0, 3.0].into_iter().collect();
    let stage1: MetricSummary = [8.0].into_iter().collect();
    stage0.merge(&stage1);
    stage0.merge(&MetricSummary::default()); // a stage without adapters
    assert_eq!(stage0.avg(), 4.0);
    assert_eq!(stage0.min(), 1.0);
    assert_eq!(stage0.max(), 8.0);
    assert_eq!(stage0.count, 3);
}
