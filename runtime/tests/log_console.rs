//! Console line formats of spec §10.1 (check 48), with `qplc` as the program name.
use chrono::{FixedOffset, TimeZone};
use qplc_runtime::log::console::{
    batch_message, data_size_message, duration, eval_message, initial_eval_message, line, line_at,
    prune_message, resume_message, sci3, step_message, StepReport,
};

/// Check 48's regex with the program name replaced.
const CHECK_48: &str = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\] \[INFO\] \[qplc\] step: \d+ / \d+, loss: \d+\.\d{4}, lr: \d\.\d{3}e[-+]\d\d, throughput: \d+\.\d{3} sequences/s, elapsed: \S+, eta: \S+$";

fn report() -> StepReport {
    StepReport {
        step: 12,
        total_steps: 250,
        loss: 2.345678,
        lr: 1.95e-5,
        throughput: 42.3,
        elapsed: 754.2,
        eta: 14_910.0,
    }
}

#[test]
fn line_has_millisecond_timestamp_level_and_program() {
    let tz = FixedOffset::east_opt(3600).unwrap();
    let t = tz.with_ymd_and_hms(2026, 3, 4, 5, 6, 7).unwrap() + chrono::Duration::milliseconds(89);
    assert_eq!(
        line_at(&t, "TRAINING COMPLETE!"),
        "[2026-03-04 05:06:07.089] [INFO] [qplc] TRAINING COMPLETE!"
    );
}

#[test]
fn step_message_prints_every_field_in_the_reference_format() {
    assert_eq!(
        step_message(&report()),
        "step: 12 / 250, loss: 2.3457, lr: 1.950e-05, throughput: 42.300 sequences/s, \
         elapsed: 12m34s, eta: 4h8m"
    );
}

#[test]
fn step_line_matches_check_48_regex() {
    let re = regex::Regex::new(CHECK_48).unwrap();
    let l = line(&step_message(&report()));
    assert!(re.is_match(&l), "{l}");
    // Extremes still match: lr 0, first step, sub-second durations, a day-long ETA.
    let r = StepReport {
        step: 1,
        total_steps: 100_000,
        loss: 11.0,
        lr: 0.0,
        throughput: 0.0,
        elapsed: 0.2,
        eta: 200_000.0,
    };
    let l = line(&step_message(&r));
    assert!(re.is_match(&l), "{l}");
    assert!(l.ends_with("elapsed: 0s, eta: 2d7h33m"), "{l}");
}

#[test]
fn learning_rate_prints_like_python_3_digit_scientific() {
    // Expected strings are Python's f"{x:.3e}".
    let cases = [
        (1.95e-5, "1.950e-05"),
        (2e-4, "2.000e-04"),
        (0.0, "0.000e+00"),
        (1.0, "1.000e+00"),
        (123456.0, "1.235e+05"),
        (-2.5e-3, "-2.500e-03"),
        (1e100, "1.000e+100"),
        (1e-300, "1.000e-300"),
        (9.9995e-5, "9.999e-05"),
        (9.9996e-5, "1.000e-04"),
        // An exact tie rounds half to even, as in Python.
        (1.0625, "1.062e+00"),
        (f64::NAN, "nan"),
        (f64::INFINITY, "inf"),
        (f64::NEG_INFINITY, "-inf"),
    ];
    for (x, want) in cases {
        assert_eq!(sci3(x), want, "{x}");
    }
}

#[test]
fn durations_use_the_two_largest_units() {
    let cases = [
        (0.0, "0s"),
        (0.99, "0s"),
        (59.9, "59s"),
        (60.0, "1m0s"),
        (3599.0, "59m59s"),
        (3600.0, "1h0m"),
        (3661.0, "1h1m"),
        (86_399.0, "23h59m"),
        (86_400.0, "1d0h0m"),
        (90_061.0, "1d1h1m"),
        (10.0 * 86_400.0 + 7_200.0 + 180.0 + 5.0, "10d2h3m"),
        (-5.0, "0s"),
    ];
    for (s, want) in cases {
        assert_eq!(duration(s), want, "{s}");
    }
}

#[test]
fn evaluation_lines_report_loss_and_relative_change() {
    assert_eq!(
        initial_eval_message(2.34567),
        "initial evaluation loss: 2.3457"
    );
    assert_eq!(
        eval_message(2.0, 2.5),
        "new evaluation loss: 2.0000 (last: 2.5000, Δ: -20.00%)"
    );
    assert_eq!(
        eval_message(2.5, 2.0),
        "new evaluation loss: 2.5000 (last: 2.0000, Δ: 25.00%)"
    );
}

#[test]
fn data_and_bookkeeping_lines() {
    assert_eq!(
        data_size_message("train", 1200, 1200 * 4096),
        "train data size: 1200 sequences (4915200 tokens)"
    );
    assert_eq!(
        data_size_message("eval", 12, 49152),
        "eval data size: 12 sequences (49152 tokens)"
    );
    assert_eq!(
        batch_message(8, 32768),
        "before GAS splitting, batch size: 8, total tokens: 32768"
    );
    assert_eq!(
        resume_message(2, 26),
        "Resuming training from checkpoint. Resuming at epoch: 2, step: 26"
    );
    assert_eq!(
        prune_message("global_step5"),
        "Pruning oldest checkpoint: 'global_step5'"
    );
}
