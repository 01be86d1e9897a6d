//! The numeric machinery of a training step (spec §7–§9), as small pure functions and state
//! structs that the training loop calls. Nothing here knows about graphs or devices: tensors are
//! `&mut [f32]` slices tagged with their logical [`DType`](qplc_ops::DType) (bf16/f16 values are
//! held as already-rounded f32, as in [`crate::tensor`]), so a CUDA backend can implement the
//! same element-wise maths and be tested against these functions.
//!
//! Order of use within one optimiser step `k` (spec §8.5):
//! [`clip`] the gradients → [`adam`] step with [`schedule::Schedule::current_lr`] (= lr·f(k−1)) →
//! [`schedule::Schedule::advance`] → η = lr·f(k) → [`lora_decay`] with η → log → eval if
//! [`eval_schedule`] says so → checkpoint per [`checkpoint_policy`].
pub mod adam;
pub mod checkpoint_policy;
pub mod clip;
pub mod control_reg;
pub mod eval_schedule;
pub mod lora_decay;
pub mod schedule;
pub mod stats;
pub mod step_accounting;

pub use adam::{Adam, AdamHyper, AdamState, ParamState, StepScalars};
pub use checkpoint_policy::{checkpoints_to_prune, CheckpointTimer};
pub use clip::{clip_global_norm, ClipOutcome, MAX_GRAD_NORM};
pub use eval_schedule::{eval_steps, is_eval_step};
pub use lora_decay::{decay_lora_pair, LoraPairMetrics};
pub use schedule::{rms_ratio, Schedule, ScheduleState};
pub use stats::MetricSummary;
