//! Step accounting (spec §9.1), per-sequence loss weighting (spec §7, check 37) and resume
//! continuity (spec §9.5, check 47).
use qplc_ops::DType;
use qplc_runtime::train::eval_schedule::needs_initial_eval;
use qplc_runtime::train::step_accounting::{
    backward_loss_scale, check_resume_continuity, epoch_ended_by, epoch_of_step, eval_loss,
    has_more_steps, step_loss, steps_per_epoch, total_steps, ResumePoint,
};
use qplc_runtime::train::{rms_ratio, Adam, AdamHyper, AdamState, Schedule};

#[test]
fn steps_per_epoch_drops_the_incomplete_global_batch() {
    // Spec §16 check 18's numbers: n = 103, GAS = 4, DP = 2 → 12 steps (7 sequences unused).
    assert_eq!(steps_per_epoch(103, 4, 2), 12);
    assert_eq!(steps_per_epoch(990, 1, 1), 990);
    assert_eq!(steps_per_epoch(7, 8, 1), 0);
    assert_eq!(total_steps(12, 3), 36);
}

#[test]
fn epoch_of_step_is_floor_plus_one() {
    assert_eq!(epoch_of_step(0, 12), 1);
    assert_eq!(epoch_of_step(11, 12), 1);
    assert_eq!(epoch_of_step(12, 12), 2);
    assert_eq!(epoch_of_step(25, 12), 3);
}

#[test]
fn epoch_end_is_every_multiple_of_steps_per_epoch() {
    assert_eq!(epoch_ended_by(12, 12), Some(1));
    assert_eq!(epoch_ended_by(24, 12), Some(2));
    assert_eq!(epoch_ended_by(13, 12), None);
    assert_eq!(epoch_ended_by(0, 12), None);
}

#[test]
fn loop_runs_while_global_step_below_total() {
    assert!(has_more_steps(0, 10));
    assert!(has_more_steps(9, 10));
    assert!(!has_more_steps(10, 10));
}

/// Check 37: GAS = 2, micro-batches with 10 and 1000 valid tokens and mean losses 1.0 and 3.0
/// report 2.0 — each sequence weighs the same; a global token mean would give ≈2.98.
#[test]
fn step_loss_weights_sequences_not_tokens() {
    let (tokens, means) = ([10.0f64, 1000.0], [1.0f32, 3.0]);
    assert_eq!(step_loss(&[means]), 2.0);
    let token_mean = (tokens[0] * 1.0 + tokens[1] * 3.0) / (tokens[0] + tokens[1]);
    assert!((token_mean - 2.98).abs() < 0.001);
    // The gradient side: each micro-batch's backward is scaled by 1/GAS, whatever its tokens.
    assert_eq!(backward_loss_scale(2), 0.5);
}

#[test]
fn step_loss_averages_micro_batches_then_replicas() {
    let replicas = [vec![1.0f32, 3.0], vec![4.0, 6.0]];
    assert_eq!(step_loss(&replicas), 3.5);
    assert_eq!(eval_loss(&[2.0, 3.0, 4.0]), 3.0);
}

/// A run of `steps` with fixed gradients; returns nothing, mutates the state like the loop does.
fn train(
    adam: &mut AdamState,
    sched: &mut Schedule,
    p: &mut [f32],
    steps: std::ops::RangeInclusive<u64>,
    used_lr: &mut Vec<(u64, f64)>,
) {
    for k in steps {
        let g: Vec<f32> = (0..p.len())
            .map(|i| ((k * 7 + i as u64) as f32 * 0.61).cos())
            .collect();
        let lr = sched.current_lr();
        used_lr.push((k, lr));
        adam.step(lr, &mut [&mut p[..]], &[&g[..]]);
        sched.advance();
    }
}

/// Check 47: a run of one epoch (spe = 5) checkpointed at its end, resumed with `epochs` raised to
/// 2, continues with global step 6 whose update uses lr·f(5), runs no initial eval, and ends
/// exactly where an uninterrupted two-epoch run ends.
#[test]
fn resume_after_raising_epochs_continues_schedule_without_initial_eval() {
    let (spe, lr) = (5u64, 1e-2);
    let hyper = AdamHyper::default();
    let init = vec![0.25f32, -0.5, 1.0];

    // Uninterrupted two epochs.
    let mut full_p = init.clone();
    let mut full_adam = Adam::new(hyper, &[(3, DType::F32)]);
    let mut full_sched = Schedule::new(lr, 0.99);
    let mut full_lrs = Vec::new();
    train(
        &mut full_adam,
        &mut full_sched,
        &mut full_p,
        1..=total_steps(spe, 2),
        &mut full_lrs,
    );

    // First run: epochs = 1.
    let mut p = init;
    let mut adam = Adam::new(hyper, &[(3, DType::F32)]);
    let mut sched = Schedule::new(lr, 0.99);
    let mut lrs = Vec::new();
    let total1 = total_steps(spe, 1);
    train(&mut adam, &mut sched, &mut p, 1..=total1, &mut lrs);
    assert!(!has_more_steps(total1, total1));
    assert_eq!(epoch_ended_by(total1, spe), Some(1));
    let ckpt = (
        serde_json::to_string(&adam).unwrap(),
        serde_json::to_string(&sched.state()).unwrap(),
        total1,
        Some(2.5f64), // last_eval_loss stored in the checkpoint
    );

    // Resume with epochs = 2.
    let mut adam: AdamState = serde_json::from_str(&ckpt.0).unwrap();
    let mut sched = Schedule::restore(serde_json::from_str(&ckpt.1).unwrap(), 0.99);
    let at = ResumePoint::new(ckpt.2, spe);
    assert_eq!(
        at,
        ResumePoint {
            global_step: 5,
            epoch: 2,
            next_step: 6
        }
    );
    check_resume_continuity(at.global_step, sched.counter).unwrap();
    assert!(!needs_initial_eval(ckpt.3));
    let total2 = total_steps(spe, 2);
    assert!(has_more_steps(at.global_step, total2));
    assert_eq!(sched.current_lr(), lr * rms_ratio(spe, 0.99));
    train(
        &mut adam,
        &mut sched,
        &mut p,
        at.next_step..=total2,
        &mut lrs,
    );

    assert_eq!(lrs[5], (6, lr * rms_ratio(5, 0.99)));
    assert_eq!(lrs, full_lrs);
    assert_eq!(p, full_p);
    assert_eq!(adam, full_adam);
}

#[test]
fn resume_continuity_rejects_mismatched_schedule_counter() {
    assert!(check_resume_continuity(12, 12).is_ok());
    let err = check_resume_continuity(12, 0).unwrap_err().to_string();
    assert!(err.contains("global step 12"), "{err}");
}
