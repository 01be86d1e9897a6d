//! Console log lines in the reference's format (spec §10.1), with `qplc` where the reference
//! printed `qlora-pipe-lite`. Scripts that grep the reference's logs (check 48) keep working
//! after swapping the program name.
//!
//! The functions here only format; [`super::progress::Progress`] decides where lines go.

use chrono::{DateTime, Local, TimeZone};
use std::fmt::Display;

/// The program name in the third bracket of every line.
pub const PROGRAM: &str = "qplc";

/// `[YYYY-MM-DD HH:MM:SS.mmm] [INFO] [qplc] <message>` at `time`.
pub fn line_at<Tz: TimeZone>(time: &DateTime<Tz>, message: &str) -> String
where
    Tz::Offset: Display,
{
    format!(
        "[{}] [INFO] [{PROGRAM}] {message}",
        time.format("%Y-%m-%d %H:%M:%S%.3f")
    )
}

/// [`line_at`] the current local time (the reference logs local time, spec §10.1).
pub fn line(message: &str) -> String {
    line_at(&Local::now(), message)
}

/// Writes one line to stderr, where the progress bar also draws, so stdout stays free for
/// command output (cargo's convention).
pub fn info(message: &str) {
    eprintln!("{}", line(message));
}

/// Python's `f"{x:.3e}"`: three decimals and an exponent of at least two digits with its sign
/// (`1.950e-05`). Rust prints `1.950e-5`; the digits are the same (both round the exact binary
/// value half-to-even), only the exponent is rewritten.
pub fn sci3(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    let s = format!("{x:.3e}");
    let (mantissa, exp) = s.split_once('e').expect("{:e} always prints an exponent");
    let exp: i32 = exp.parse().expect("{:e} prints an integer exponent");
    let sign = if exp < 0 { '-' } else { '+' };
    format!("{mantissa}e{sign}{:02}", exp.unsigned_abs())
}

/// Durations of the step line (spec §10.1): `{d}d{h}h{m}m` from one day, `{h}h{m}m` from one
/// hour, `{m}m{s}s` from one minute, else `{s}s`; whole units, truncated.
pub fn duration(seconds: f64) -> String {
    let total = if seconds.is_finite() && seconds > 0.0 {
        seconds as u64
    } else {
        0
    };
    let (d, h, m, s) = (
        total / 86_400,
        total % 86_400 / 3_600,
        total % 3_600 / 60,
        total % 60,
    );
    if d > 0 {
        format!("{d}d{h}h{m}m")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// What the step line reports (spec §10.1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    pub step: u64,
    pub total_steps: u64,
    pub loss: f64,
    /// The post-scheduler learning rate.
    pub lr: f64,
    /// Sequences per second since the previous step line (`GAS·DP` / seconds).
    pub throughput: f64,
    /// Training seconds since the start of this process's training (evaluation excluded).
    pub elapsed: f64,
    /// elapsed / steps done × steps left.
    pub eta: f64,
}

/// `step: k / total, loss: X.XXXX, lr: 1.950e-05, throughput: T.TTT sequences/s, elapsed: …, eta: …`
pub fn step_message(r: &StepReport) -> String {
    format!(
        "step: {} / {}, loss: {:.4}, lr: {}, throughput: {:.3} sequences/s, elapsed: {}, eta: {}",
        r.step,
        r.total_steps,
        r.loss,
        sci3(r.lr),
        r.throughput,
        duration(r.elapsed),
        duration(r.eta)
    )
}

/// `initial evaluation loss: X.XXXX`
pub fn initial_eval_message(loss: f64) -> String {
    format!("initial evaluation loss: {loss:.4}")
}

/// `new evaluation loss: X.XXXX (last: Y.YYYY, Δ: Z.ZZ%)` with `Δ = (X/Y − 1)·100`.
pub fn eval_message(loss: f64, last: f64) -> String {
    let delta = (loss / last - 1.0) * 100.0;
    format!("new evaluation loss: {loss:.4} (last: {last:.4}, Δ: {delta:.2}%)")
}

/// `train data size: N sequences (M tokens)`; `split` is `train` or `eval` (spec §4.7).
pub fn data_size_message(split: &str, sequences: u64, tokens: u64) -> String {
    format!("{split} data size: {sequences} sequences ({tokens} tokens)")
}

/// `before GAS splitting, batch size: B, total tokens: K` (spec §4.8, each local batch).
pub fn batch_message(batch_size: u64, tokens: u64) -> String {
    format!("before GAS splitting, batch size: {batch_size}, total tokens: {tokens}")
}

/// `Resuming training from checkpoint. Resuming at epoch: E, step: S` (spec §9.5).
pub fn resume_message(epoch: u64, step: u64) -> String {
    format!("Resuming training from checkpoint. Resuming at epoch: {epoch}, step: {step}")
}

/// `Pruning oldest checkpoint: 'global_stepN'` (spec §9.3).
pub fn prune_message(checkpoint_dir_name: &str) -> String {
    format!("Pruning oldest checkpoint: '{checkpoint_dir_name}'")
}

/// The last line of a finished run (spec §10.1).
pub const TRAINING_COMPLETE: &str = "TRAINING COMPLETE!";
