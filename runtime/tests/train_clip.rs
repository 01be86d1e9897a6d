//! Global-norm clipping at 1.0 (spec §8.2, check 42).
use qplc_ops::DType;
use qplc_runtime::train::clip::{clip_coefficient, global_norm_of, scale_gradient, sum_of_squares};
use qplc_runtime::train::{clip_global_norm, MAX_GRAD_NORM};

/// Check 42: gradients with global norm 5 (spread over two tensors) come out with norm ≈ 1.
#[test]
fn gradients_with_norm_five_are_scaled_to_norm_one() {
    let mut a = vec![3.0f32, 0.0];
    let mut b = vec![0.0f32, 4.0];
    let out = clip_global_norm(&mut [(&mut a[..], DType::F32), (&mut b[..], DType::F32)]);
    assert_eq!(out.norm, 5.0);
    let scale = out.scale.expect("norm 5 > 1 must clip");
    assert!((scale - 1.0 / (5.0 + 1e-6)).abs() < 1e-15);
    let after = global_norm_of(&[&a, &b]);
    assert!((after - 1.0).abs() < 1e-6, "norm after clipping {after}");
    assert!((a[0] - 0.6).abs() < 1e-6 && (b[1] - 0.8).abs() < 1e-6);
}

/// Check 42: norm 0.5 is left bit-for-bit untouched.
#[test]
fn gradients_with_norm_half_are_untouched() {
    let mut a = vec![0.3f32, -0.4];
    let before = a.clone();
    let out = clip_global_norm(&mut [(&mut a[..], DType::F32)]);
    assert!((out.norm - 0.5).abs() < 1e-7);
    assert_eq!(out.scale, None);
    assert_eq!(a, before);
}

#[test]
fn threshold_is_exclusive_at_one() {
    assert_eq!(MAX_GRAD_NORM, 1.0);
    assert_eq!(clip_coefficient(1.0), None);
    assert!(clip_coefficient(1.0 + 1e-9).is_some());
    assert_eq!(clip_coefficient(f64::NAN), None);
}

/// Pipeline stages sum their local squares; the global norm is the root of the total.
#[test]
fn per_stage_sums_of_squares_combine_into_the_global_norm() {
    let stage0 = [1.0f32, 2.0];
    let stage1 = [2.0f32];
    let total = sum_of_squares(&stage0) + sum_of_squares(&stage1);
    assert_eq!(total.sqrt(), 3.0);
    assert_eq!(global_norm_of(&[&stage0, &stage1]), 3.0);
}

#[test]
fn scaled_low_precision_gradients_are_rounded_to_their_dtype() {
    let mut g = vec![1.0f32, 3.0, 0.1];
    scale_gradient(&mut g, 1.0 / 3.0, DType::BF16);
    for x in &g {
        assert_eq!(*x, half::bf16::from_f32(*x).to_f32());
    }
}
