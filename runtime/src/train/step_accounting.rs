//! Step and epoch arithmetic (spec §9.1), loss weighting across gradient accumulation and data
//! parallel replicas (spec §7, check 37), and where a resumed run continues (spec §9.5, check 47).

/// `⌊n_train / (GAS·DP)⌋`: every optimiser step consumes GAS sequences on each of DP replicas;
/// the remainder of an epoch is never used (spec §4.8).
pub fn steps_per_epoch(n_train: u64, gas: u64, dp: u64) -> u64 {
    assert!(gas >= 1 && dp >= 1, "GAS and DP must be at least 1");
    n_train / (gas * dp)
}

pub fn total_steps(steps_per_epoch: u64, epochs: u64) -> u64 {
    steps_per_epoch * epochs
}

/// The 1-based epoch the loop is in when `global_step` steps are complete:
/// `⌊global_step / steps_per_epoch⌋ + 1`.
pub fn epoch_of_step(global_step: u64, steps_per_epoch: u64) -> u64 {
    assert!(steps_per_epoch > 0, "an epoch needs at least one step");
    global_step / steps_per_epoch + 1
}

/// `Some(N)` when global step `step` (1-based) ends epoch N (1-based): the forced checkpoint and
/// the `epochN/` output follow it (spec §9.6, check 44).
pub fn epoch_ended_by(step: u64, steps_per_epoch: u64) -> Option<u64> {
    // checked_rem: a zero `steps_per_epoch` ends no epoch.
    (step > 0 && step.checked_rem(steps_per_epoch) == Some(0)).then(|| step / steps_per_epoch)
}

/// The loop runs while `global_step < total_steps`.
pub fn has_more_steps(global_step: u64, total_steps: u64) -> bool {
    global_step < total_steps
}

/// Factor on each micro-batch's loss before its backward: 1/GAS, so the accumulated gradient is
/// the mean of per-sequence gradients whatever each sequence's token count (spec §8.2). DP
/// averaging then divides the all-reduced sum by DP.
pub fn backward_loss_scale(gas: u64) -> f32 {
    assert!(gas >= 1, "GAS must be at least 1");
    1.0 / gas as f32
}

/// The reported train loss of a step (spec §7): per replica the plain mean of its micro-batch
/// losses (each already a per-sequence token mean), then the plain mean over replicas. Every
/// sequence weighs the same — not a global token mean.
pub fn step_loss<R: AsRef<[f32]>>(per_replica_microbatch_losses: &[R]) -> f64 {
    assert!(
        !per_replica_microbatch_losses.is_empty(),
        "a step has at least one replica"
    );
    let replica_means: Vec<f64> = per_replica_microbatch_losses
        .iter()
        .map(|r| mean(r.as_ref().iter().map(|&x| f64::from(x))))
        .collect();
    mean(replica_means.into_iter())
}

/// The eval loss (spec §7): plain mean over eval steps of each step's loss (itself a
/// [`step_loss`] over its micro-batches and replicas).
pub fn eval_loss(step_losses: &[f64]) -> f64 {
    mean(step_losses.iter().copied())
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    assert!(n > 0, "mean of no losses");
    sum / n as f64
}

/// Where a run restored from a checkpoint taken after `checkpoint_step` completed steps continues
/// (spec §9.5). The schedule counter is restored with it, so the next optimiser step
/// `next_step` runs with lr·f(next_step − 1) = lr·f(checkpoint_step): raising `epochs` and
/// resuming extends the schedule rather than restarting it (check 47).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResumePoint {
    /// Completed steps (the restored `global_step`).
    pub global_step: u64,
    /// 1-based epoch of the next step, for `Resuming at epoch: E, step: S`.
    pub epoch: u64,
    /// The next optimiser step (1-based).
    pub next_step: u64,
}

impl ResumePoint {
    pub fn new(checkpoint_step: u64, steps_per_epoch: u64) -> Self {
        ResumePoint {
            global_step: checkpoint_step,
            epoch: epoch_of_step(checkpoint_step, steps_per_epoch),
            next_step: checkpoint_step + 1,
        }
    }
}

/// Check that a restored scheduler continues the run: its counter must equal the restored global
/// step (one scheduler step per optimiser step), or the learning rate would jump.
pub fn check_resume_continuity(global_step: u64, schedule_counter: u64) -> anyhow::Result<()> {
    if global_step != schedule_counter {
        anyhow::bail!(
            "checkpoint is inconsistent: global step {global_step} but the learning-rate \
             schedule has taken {schedule_counter} steps"
        );
    }
    Ok(())
}
