//! Evaluation schedule with Python rounding (spec §9.2, check 43).
use qplc_runtime::train::eval_schedule::{
    eval_offsets, evals_in_epoch, needs_initial_eval, round_half_even,
};
use qplc_runtime::train::{eval_steps, is_eval_step};

#[test]
fn round_half_even_matches_python_round() {
    // Python: [round(x) for x in (0.5, 1.5, 2.5, 3.5, -0.5, -1.5, 2.4999, 2.5001)]
    let cases = [
        (0.5, 0.0),
        (1.5, 2.0),
        (2.5, 2.0),
        (3.5, 4.0),
        (-0.5, -0.0),
        (-1.5, -2.0),
        (2.4999, 2.0),
        (2.5001, 3.0),
    ];
    for (x, want) in cases {
        assert_eq!(round_half_even(x), want, "round({x})");
    }
}

/// Check 43: spe = 25, evals_per_epoch = 10 (i·2.5 rounds half-to-even: 2.5→2, 7.5→8, 12.5→12).
#[test]
fn twenty_five_steps_ten_evals() {
    assert_eq!(
        eval_steps(25, 10, 1),
        vec![2, 5, 8, 10, 12, 15, 18, 20, 22, 25]
    );
}

/// Check 43: spe = 5, evals_per_epoch = 2 → 2.5→2 and 5.
#[test]
fn five_steps_two_evals() {
    assert_eq!(eval_steps(5, 2, 1), vec![2, 5]);
}

/// Check 43: more evals than steps clamps to one per step; the schedule repeats per epoch.
#[test]
fn two_epochs_of_three_steps_evaluate_every_step() {
    assert_eq!(evals_in_epoch(3, 10), 3);
    assert_eq!(eval_steps(3, 10, 2), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(eval_steps(7, 10, 1), (1..=7).collect::<Vec<_>>());
}

#[test]
fn last_eval_of_every_epoch_is_its_final_step() {
    for spe in 1..60 {
        for epe in [1, 2, 3, 7, 10, 100] {
            let offs = eval_offsets(spe, epe);
            assert_eq!(*offs.last().unwrap(), spe, "spe {spe} evals {epe}");
            assert!(offs.windows(2).all(|w| w[0] < w[1]));
        }
    }
}

#[test]
fn non_positive_evals_per_epoch_still_evaluates_at_epoch_end() {
    assert_eq!(eval_offsets(8, 0), vec![8]);
    assert_eq!(eval_offsets(8, -3), vec![8]);
}

#[test]
fn is_eval_step_agrees_with_the_listed_steps_in_later_epochs() {
    let listed = eval_steps(25, 10, 3);
    for step in 0..=75 {
        assert_eq!(
            is_eval_step(step, 25, 10),
            listed.contains(&step),
            "step {step}"
        );
    }
}

/// Check 43: the initial evaluation runs on a fresh run only (and on a resume whose checkpoint
/// stored no eval loss).
#[test]
fn initial_eval_only_without_restored_eval_loss() {
    assert!(needs_initial_eval(None));
    assert!(!needs_initial_eval(Some(2.31)));
}
