//! The RMS-ratio learning-rate schedule and its step indexing (spec §8.3, §8.4).
use serde::{Deserialize, Serialize};

/// `f(s) = sqrt((1 − β2^s)/(1 + β2^s))`: √2 over the coefficient of variation of Adam's
/// bias-corrected second moment for stationary Gaussian gradients (RAdam's rectification as a
/// schedule). f(0) = 0, f → 1; no warm-up constant, no decay, so raising `epochs` and resuming
/// simply continues it.
pub fn rms_ratio(s: u64, beta2: f64) -> f64 {
    // powf (C `pow`), as Python's `beta2 ** s` with a float base.
    let b = beta2.powf(s as f64);
    ((1.0 - b) / (1.0 + b)).sqrt()
}

/// What a checkpoint stores of the scheduler (spec §8.4): its base learning rate and counter.
/// β2 is not stored: the reference's lambda re-reads config `beta2` after a resume.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleState {
    pub base_lr: f64,
    /// Number of scheduler steps taken = number of completed optimiser steps.
    pub counter: u64,
}

/// A "lambda" schedule evaluated at an internal counter that is 0 at construction and advanced
/// after every optimiser step. Hence optimiser step `k` (1-based) runs with
/// [`optimizer_lr(k)`](Schedule::optimizer_lr) = lr·f(k−1) — step 1 with lr 0 — and the rate
/// logged and used by the adapter regulariser at step `k` is
/// [`logged_lr(k)`](Schedule::logged_lr) = lr·f(k).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub base_lr: f64,
    pub beta2: f64,
    pub counter: u64,
}

impl Schedule {
    pub fn new(base_lr: f64, beta2: f64) -> Self {
        Schedule {
            base_lr,
            beta2,
            counter: 0,
        }
    }

    /// Resumes from checkpointed state with the *config's* β2 (spec §8.4).
    pub fn restore(state: ScheduleState, config_beta2: f64) -> Self {
        Schedule {
            base_lr: state.base_lr,
            beta2: config_beta2,
            counter: state.counter,
        }
    }

    pub fn state(&self) -> ScheduleState {
        ScheduleState {
            base_lr: self.base_lr,
            counter: self.counter,
        }
    }

    /// The rate the optimiser reads now: before step k this is lr·f(k−1); right after
    /// [`advance`](Self::advance) it is lr·f(k), the value logged as `train/lr` and used as η by
    /// the regulariser (spec §8.5 step 3).
    pub fn current_lr(&self) -> f64 {
        self.base_lr * rms_ratio(self.counter, self.beta2)
    }

    /// The scheduler step, taken right after each optimiser step.
    pub fn advance(&mut self) {
        self.counter += 1;
    }

    /// Learning rate of 1-based optimiser step `k`: lr·f(k−1).
    pub fn optimizer_lr(&self, k: u64) -> f64 {
        assert!(k >= 1, "optimiser steps are 1-based");
        self.base_lr * rms_ratio(k - 1, self.beta2)
    }

    /// Learning rate logged (and used by the regulariser) at global step `k`: lr·f(k).
    pub fn logged_lr(&self, k: u64) -> f64 {
        self.base_lr * rms_ratio(k, self.beta2)
    }
}
