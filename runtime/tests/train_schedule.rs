//! The RMS-ratio schedule and its step indexing (spec §8.3, checks 38, 39, 47).
use qplc_runtime::train::{rms_ratio, Schedule, ScheduleState};

/// Check 38 (and the rest of the spec's table) for β2 = 0.99, ±1e-6.
#[test]
fn rms_ratio_matches_spec_table_for_beta2_099() {
    let table = [
        (0, 0.0),
        (1, 0.070888),
        (2, 0.100250),
        (5, 0.158495),
        (10, 0.224075),
        (50, 0.496086),
        (100, 0.681245),
        (200, 0.873899),
        (300, 0.952105),
        (500, 0.993451),
        (1000, 0.999957),
    ];
    for (s, want) in table {
        let got = rms_ratio(s, 0.99);
        assert!((got - want).abs() <= 1e-6, "f({s}) = {got}, spec {want}");
    }
    assert_eq!(rms_ratio(0, 0.99), 0.0);
}

#[test]
fn rms_ratio_is_the_closed_form_and_increases_to_one() {
    for s in [3u64, 17, 250] {
        let b = 0.999f64.powi(s as i32);
        assert!((rms_ratio(s, 0.999) - ((1.0 - b) / (1.0 + b)).sqrt()).abs() < 1e-12);
    }
    let mut prev = -1.0;
    for s in 0..3000 {
        let f = rms_ratio(s, 0.99);
        assert!(f > prev && f <= 1.0);
        prev = f;
    }
}

/// Check 39 indexing: optimiser step k uses lr·f(k−1); the value read after the scheduler step
/// (logged, and η of the regulariser, check 33) is lr·f(k).
#[test]
fn optimizer_step_k_uses_f_of_k_minus_one_and_logs_f_of_k() {
    let lr = 2e-5;
    let mut s = Schedule::new(lr, 0.99);
    for k in 1..=200u64 {
        let used = s.current_lr();
        assert_eq!(used, s.optimizer_lr(k));
        assert_eq!(used, lr * rms_ratio(k - 1, 0.99));
        s.advance();
        let logged = s.current_lr();
        assert_eq!(logged, s.logged_lr(k));
        assert_eq!(logged, lr * rms_ratio(k, 0.99));
    }
    let s = Schedule::new(lr, 0.99);
    assert_eq!(s.optimizer_lr(1), 0.0);
    assert!((s.logged_lr(1) - lr * 0.070888).abs() < lr * 1e-6);
}

/// Spec §8.4: the checkpoint carries base lr and counter; β2 comes from the config on resume.
#[test]
fn restored_schedule_keeps_base_lr_and_counter_but_rereads_beta2() {
    let mut s = Schedule::new(1e-4, 0.99);
    for _ in 0..25 {
        s.advance();
    }
    let saved: ScheduleState =
        serde_json::from_str(&serde_json::to_string(&s.state()).unwrap()).unwrap();
    assert_eq!(
        saved,
        ScheduleState {
            base_lr: 1e-4,
            counter: 25
        }
    );
    let same = Schedule::restore(saved, 0.99);
    assert_eq!(same.current_lr(), s.current_lr());
    let changed = Schedule::restore(saved, 0.999);
    assert_eq!(changed.current_lr(), 1e-4 * rms_ratio(25, 0.999));
}
