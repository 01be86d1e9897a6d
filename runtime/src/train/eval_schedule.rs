//! When to evaluate (spec §9.2).
//!
//! `e = max(1, min(evals_per_epoch, steps_per_epoch))`; in epoch `p` (0-based) evaluate after
//! global step `p·spe + max(1, round(i·spe/e))` for `i = 1..=e`, with Python's
//! round-half-to-even. The last eval of an epoch is therefore at its final step. An initial
//! evaluation runs before the first step unless a restored checkpoint carries an eval loss.

/// Python's `round(x)` for a float: ties go to the even integer (`round(2.5) == 2`).
pub fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// Number of evaluations per epoch, `e`.
pub fn evals_in_epoch(steps_per_epoch: u64, evals_per_epoch: i64) -> u64 {
    let e = evals_per_epoch.clamp(1, i64::MAX) as u64;
    e.min(steps_per_epoch).max(1)
}

/// The 1-based steps within an epoch after which to evaluate, ascending and distinct.
pub fn eval_offsets(steps_per_epoch: u64, evals_per_epoch: i64) -> Vec<u64> {
    if steps_per_epoch == 0 {
        return Vec::new();
    }
    let e = evals_in_epoch(steps_per_epoch, evals_per_epoch);
    let mut out: Vec<u64> = (1..=e)
        .map(|i| {
            // Python: i * steps_per_epoch / e is an exact int product, then a true (float) division.
            let x = (i * steps_per_epoch) as f64 / e as f64;
            (round_half_even(x) as u64).max(1)
        })
        .collect();
    out.dedup();
    out
}

/// All global steps (1-based) after which to evaluate in `epochs` epochs.
pub fn eval_steps(steps_per_epoch: u64, evals_per_epoch: i64, epochs: u64) -> Vec<u64> {
    let offsets = eval_offsets(steps_per_epoch, evals_per_epoch);
    (0..epochs)
        .flat_map(|p| offsets.iter().map(move |&o| p * steps_per_epoch + o))
        .collect()
}

/// Whether to evaluate after global step `step` (1-based). The schedule repeats every epoch, so
/// this holds for any number of epochs, including epochs added on resume.
pub fn is_eval_step(step: u64, steps_per_epoch: u64, evals_per_epoch: i64) -> bool {
    if step == 0 || steps_per_epoch == 0 {
        return false;
    }
    let within = (step - 1) % steps_per_epoch + 1;
    eval_offsets(steps_per_epoch, evals_per_epoch).contains(&within)
}

/// Whether to run the initial evaluation: on a fresh run (nothing restored) and on a resume
/// whose checkpoint stored no previous eval loss (spec §9.2, §9.5, check 47).
pub fn needs_initial_eval(restored_eval_loss: Option<f64>) -> bool {
    restored_eval_loss.is_none()
}
