//! Adam as spec §8.1 defines it (optimi): checks 39, 40, 41 of spec §16, state dtype handling
//! and bit-exact checkpoint/restore.
use qplc_ops::DType;
use qplc_runtime::train::adam::{add_update, debiased_beta, round_one, StepScalars};
use qplc_runtime::train::{Adam, AdamHyper, AdamState, Schedule};

/// A fixed, non-trivial gradient sequence: both optimisers under comparison see identical inputs.
fn gradient(step: u64, i: usize) -> f32 {
    let x = (step as f32 * 0.37 + i as f32 * 1.3).sin();
    x * (1.0 + i as f32 * 0.25) + 0.05
}

#[test]
fn debiased_beta_is_zero_at_step_one_and_tends_to_beta() {
    assert_eq!(debiased_beta(0.9, 1), 0.0);
    assert_eq!(debiased_beta(0.99, 1), 0.0);
    // β̂(2) = (β² − β)/(β² − 1) = β/(1 + β).
    assert!((debiased_beta(0.9, 2) - 0.9 / 1.9).abs() < 1e-15);
    assert!((debiased_beta(0.99, 100_000) - 0.99).abs() < 1e-12);
}

/// Check 40: textbook bias-corrected Adam (ε after the square root, no weight decay), written
/// independently in f64, agrees with ours on a float32 problem to 1e-6.
#[test]
fn adam_matches_textbook_bias_corrected_adam_on_f32_toy_problem() {
    let (b1, b2, eps, lr) = (0.9f64, 0.99f64, 1e-6f64, 1e-3f64);
    let n = 12;
    let init: Vec<f32> = (0..n).map(|i| 0.5 - 0.08 * i as f32).collect();

    let mut ours = init.clone();
    let mut adam = Adam::new(
        AdamHyper {
            beta1: b1,
            beta2: b2,
            eps,
        },
        &[(n, DType::F32)],
    );

    let mut tb: Vec<f64> = init.iter().map(|&x| f64::from(x)).collect();
    let mut m = vec![0.0f64; n];
    let mut v = vec![0.0f64; n];

    for k in 1..=50u64 {
        let g: Vec<f32> = (0..n).map(|i| gradient(k, i)).collect();
        adam.step(lr, &mut [&mut ours[..]], &[&g[..]]);
        for i in 0..n {
            let gi = f64::from(g[i]);
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            let m_hat = m[i] / (1.0 - b1.powi(k as i32));
            let v_hat = v[i] / (1.0 - b2.powi(k as i32));
            tb[i] -= lr * m_hat / (v_hat.sqrt() + eps);
        }
        for i in 0..n {
            let d = (f64::from(ours[i]) - tb[i]).abs();
            assert!(
                d < 1e-6,
                "step {k} element {i}: ours {} textbook {} (Δ {d:e})",
                ours[i],
                tb[i]
            );
            // Our moments are the bias-corrected ones.
            let m_hat = m[i] / (1.0 - b1.powi(k as i32));
            assert!((f64::from(adam.params[0].exp_avg[i]) - m_hat).abs() < 1e-6);
        }
    }
    assert_eq!(adam.step, 50);
}

/// Check 39: the schedule gives step 1 lr 0, so the first update is exactly zero; the moments and
/// the step count still advance (and step 2 then moves the parameters).
#[test]
fn first_step_with_schedule_lr_zero_leaves_params_but_advances_moments() {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let init: Vec<f32> = (0..6)
            .map(|i| round_one(0.3 * i as f32 - 0.7, dtype))
            .collect();
        let mut p = init.clone();
        let mut adam = Adam::new(AdamHyper::default(), &[(6, dtype)]);
        let mut sched = Schedule::new(1e-2, 0.99);
        let g: Vec<f32> = (0..6).map(|i| round_one(gradient(1, i), dtype)).collect();

        let lr1 = sched.current_lr();
        assert_eq!(lr1, 0.0);
        adam.step(lr1, &mut [&mut p[..]], &[&g[..]]);
        sched.advance();

        assert_eq!(p, init, "{dtype}: step 1 must not move the parameters");
        assert_eq!(adam.step, 1);
        // β̂(1) = 0: the moments are exactly g and g² (rounded to the dtype).
        let st = &adam.params[0];
        for ((&m, &v), &gi) in st.exp_avg.iter().zip(&st.exp_avg_sq).zip(&g) {
            assert_eq!(m, gi);
            assert_eq!(v, round_one(gi * gi, dtype));
        }
        if let Some(c) = &adam.params[0].kahan_comp {
            assert!(c.iter().all(|&x| x == 0.0));
        }
        // The logged lr of step 1 is lr·f(1) = lr·0.070888.
        assert!((sched.current_lr() - 1e-2 * 0.070888).abs() < 1e-8);

        adam.step(sched.current_lr(), &mut [&mut p[..]], &[&g[..]]);
        assert_ne!(p, init, "{dtype}: step 2 moves the parameters");
    }
}

/// Check 41: 1000 updates of +1e-4 to a bf16 parameter at 1.0 reach ≈1.1 with the Kahan buffer;
/// without it every sum rounds back to 1.0 (bf16's spacing just above 1 is 2⁻⁷ ≈ 0.0078).
#[test]
fn kahan_compensation_accumulates_updates_below_bf16_resolution() {
    let mut with = 1.0f32;
    let mut comp = 0.0f32;
    let mut without = 1.0f32;
    for _ in 0..1000 {
        add_update(&mut with, Some(&mut comp), 1e-4, DType::BF16);
        add_update(&mut without, None, 1e-4, DType::BF16);
    }
    assert_eq!(without, 1.0);
    // bf16 values around 1.1 are 1.09375 and 1.1015625: the compensated parameter lands on the
    // one nearest 1.1. The buffer itself is bf16, so the sum p + c is 1.1 only to ~0.3 %.
    // PyTorch (`c.add_(1e-4); t = p.clone(); p.add_(c); c.add_(t.sub_(p))` on bf16 tensors) ends
    // with exactly these two values.
    assert_eq!(with, 1.1015625);
    assert_eq!(comp, 155.0 / 131_072.0); // 155·2⁻¹⁷ = 0.00118255615234375
    assert!(
        ((with + comp) - 1.1).abs() < 3e-3,
        "p + c = {}",
        with + comp
    );
    assert_eq!(with, round_one(with, DType::BF16));
}

#[test]
fn kahan_buffer_exists_only_for_low_precision_params() {
    let adam = Adam::new(
        AdamHyper::default(),
        &[(3, DType::F32), (3, DType::BF16), (3, DType::F16)],
    );
    assert!(adam.params[0].kahan_comp.is_none());
    assert!(adam.params[1].kahan_comp.is_some());
    assert!(adam.params[2].kahan_comp.is_some());
}

/// bf16 state is held in bf16 (spec §8.1: m, v and the buffer have the parameter dtype).
#[test]
fn low_precision_state_stays_rounded_to_its_dtype() {
    let n = 32;
    let mut p: Vec<f32> = (0..n)
        .map(|i| round_one(i as f32 * 0.1, DType::BF16))
        .collect();
    let mut adam = Adam::new(AdamHyper::default(), &[(n, DType::BF16)]);
    for k in 1..=10 {
        let g: Vec<f32> = (0..n)
            .map(|i| round_one(gradient(k, i), DType::BF16))
            .collect();
        adam.step(1e-2, &mut [&mut p[..]], &[&g[..]]);
    }
    let st = &adam.params[0];
    let c = st.kahan_comp.as_ref().unwrap();
    for v in [&p, &st.exp_avg, &st.exp_avg_sq, c] {
        assert!(v.iter().all(|&x| x == round_one(x, DType::BF16)));
    }
}

#[test]
fn step_scalars_narrow_host_values_to_f32() {
    let s = StepScalars::new(&AdamHyper::default(), 3, 2e-4);
    assert_eq!(s.neg_lr, -2e-4f32);
    assert_eq!(s.eps, 1e-6f32);
    assert_eq!(s.beta2, debiased_beta(0.99, 3) as f32);
    assert_eq!(s.m_weight, (1.0 - debiased_beta(0.9, 3)) as f32);
}

/// One training trajectory: f32 and bf16 tensors, clipping and the schedule, as the loop runs them.
fn run_steps(
    adam: &mut AdamState,
    sched: &mut Schedule,
    p32: &mut [f32],
    p16: &mut [f32],
    steps: std::ops::RangeInclusive<u64>,
) {
    for k in steps {
        let mut g32: Vec<f32> = (0..p32.len()).map(|i| gradient(k, i) * 3.0).collect();
        let mut g16: Vec<f32> = (0..p16.len())
            .map(|i| round_one(gradient(k, i + 7), DType::BF16))
            .collect();
        qplc_runtime::train::clip_global_norm(&mut [
            (&mut g32[..], DType::F32),
            (&mut g16[..], DType::BF16),
        ]);
        adam.step(sched.current_lr(), &mut [p32, p16], &[&g32[..], &g16[..]]);
        sched.advance();
    }
}

/// Spec §9.5: checkpointing the optimiser and schedule state mid-run and restoring it (through
/// JSON) continues bit-for-bit like the uninterrupted run.
#[test]
fn restored_optimizer_state_continues_bit_exactly() {
    let hyper = AdamHyper::default();
    let shapes = [(10, DType::F32), (9, DType::BF16)];
    let init32: Vec<f32> = (0..10).map(|i| 0.1 * i as f32 - 0.4).collect();
    let init16: Vec<f32> = (0..9)
        .map(|i| round_one(0.2 * i as f32 - 0.9, DType::BF16))
        .collect();

    let (mut a32, mut a16) = (init32.clone(), init16.clone());
    let mut adam = Adam::new(hyper, &shapes);
    let mut sched = Schedule::new(3e-2, 0.99);
    run_steps(&mut adam, &mut sched, &mut a32, &mut a16, 1..=30);

    let (mut b32, mut b16) = (init32, init16);
    let mut adam_b = Adam::new(hyper, &shapes);
    let mut sched_b = Schedule::new(3e-2, 0.99);
    run_steps(&mut adam_b, &mut sched_b, &mut b32, &mut b16, 1..=13);
    let saved_opt = serde_json::to_string(&adam_b).unwrap();
    let saved_sched = serde_json::to_string(&sched_b.state()).unwrap();
    drop((adam_b, sched_b));

    let mut adam_r: AdamState = serde_json::from_str(&saved_opt).unwrap();
    let mut sched_r = Schedule::restore(serde_json::from_str(&saved_sched).unwrap(), 0.99);
    assert_eq!(adam_r.step, 13);
    assert_eq!(sched_r.counter, 13);
    run_steps(&mut adam_r, &mut sched_r, &mut b32, &mut b16, 14..=30);

    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a32), bits(&b32));
    assert_eq!(bits(&a16), bits(&b16));
    assert_eq!(adam, adam_r);
    assert_eq!(sched, sched_r);
}

#[test]
fn optimizer_state_serialises_floats_as_exact_bit_patterns() {
    let mut st = Adam::new(AdamHyper::default(), &[(4, DType::BF16)]);
    // Values whose decimal forms are long, plus a NaN that JSON numbers cannot carry.
    st.params[0].exp_avg = vec![0.1, f32::MIN_POSITIVE, 1.0 / 3.0, f32::NAN];
    st.params[0].kahan_comp = Some(vec![-0.0, 1e-30, 7.0e-45, f32::MAX]);
    let back: AdamState = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&back.params[0].exp_avg), bits(&st.params[0].exp_avg));
    assert_eq!(
        bits(back.params[0].kahan_comp.as_ref().unwrap()),
        bits(st.params[0].kahan_comp.as_ref().unwrap())
    );
    assert_eq!(back.params[0].dtype, DType::BF16);
}

/// A backend that runs the element-wise kernel itself (`begin_step` + `adam_update` per tensor)
/// gets exactly what the host `step` computes.
#[test]
fn begin_step_plus_elementwise_kernel_equals_host_step() {
    use qplc_runtime::train::adam::adam_update;
    let shapes = [(5, DType::F32), (5, DType::F16)];
    let mut host = Adam::new(AdamHyper::default(), &shapes);
    let mut dev = host.clone();
    let init: Vec<f32> = (0..5)
        .map(|i| round_one(0.4 * i as f32 - 1.0, DType::F16))
        .collect();
    let (mut h32, mut h16, mut d32, mut d16) = (init.clone(), init.clone(), init.clone(), init);
    for k in 1..=6 {
        let g: Vec<f32> = (0..5)
            .map(|i| round_one(gradient(k, i), DType::F16))
            .collect();
        host.step(5e-3, &mut [&mut h32[..], &mut h16[..]], &[&g[..], &g[..]]);
        let s = dev.begin_step(5e-3);
        for (p, st) in [&mut d32, &mut d16].into_iter().zip(&mut dev.params) {
            let c = st.kahan_comp.as_deref_mut();
            adam_update(p, &g, &mut st.exp_avg, &mut st.exp_avg_sq, c, st.dtype, &s);
        }
    }
    assert_eq!((h32, h16), (d32, d16));
    assert_eq!(host, dev);
}
