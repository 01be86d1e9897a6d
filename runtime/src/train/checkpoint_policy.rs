//! When to write a resume checkpoint and which old ones to delete (spec §9.3, checks 45–46).
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

/// Why a checkpoint is taken after a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointReason {
    /// Forced at every epoch end.
    EpochEnd,
    /// `checkpoint_interval_hours` elapsed since the last time-based checkpoint.
    Interval,
}

/// The time-based cadence. The clock starts when training starts (or resumes); only time-based
/// checkpoints reset it — an epoch-end checkpoint does not (spec §9.3). Times are passed in, so
/// the policy is testable and rank 0 can decide and broadcast.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointTimer {
    interval: Duration,
    last: Instant,
}

impl CheckpointTimer {
    /// `interval_hours` from the config; a non-positive or NaN value means "every step".
    pub fn new(interval_hours: f64, start: Instant) -> Self {
        let secs = interval_hours * 3600.0;
        let interval = if secs > 0.0 {
            Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
        } else {
            Duration::ZERO
        };
        CheckpointTimer {
            interval,
            last: start,
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// True (and the timer restarts at `now`) when at least the interval has passed since the
    /// last time-based checkpoint.
    pub fn poll(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.last) >= self.interval {
            self.last = now;
            true
        } else {
            false
        }
    }

    /// The decision after a step (spec §8.5 item 8): epoch end forces a checkpoint without
    /// consulting or resetting the timer; otherwise the timer decides.
    pub fn decide(&mut self, epoch_end: bool, now: Instant) -> Option<CheckpointReason> {
        if epoch_end {
            Some(CheckpointReason::EpochEnd)
        } else if self.poll(now) {
            Some(CheckpointReason::Interval)
        } else {
            None
        }
    }
}

/// The step of a checkpoint directory name `global_step<digits>`.
pub fn checkpoint_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("global_step")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Which checkpoint directories to delete: among names of the form `global_step<N>`, all but the
/// `max_checkpoints` with the largest N, oldest first (the order they are pruned and logged as
/// `Pruning oldest checkpoint: 'global_stepN'`). `max_checkpoints ≤ 0` keeps everything; other
/// names are ignored.
pub fn checkpoints_to_prune<'a>(
    names: impl IntoIterator<Item = &'a str>,
    max_checkpoints: i64,
) -> Vec<String> {
    if max_checkpoints <= 0 {
        return Vec::new();
    }
    let mut found: Vec<(u64, &str)> = names
        .into_iter()
        .filter_map(|n| checkpoint_step(n).map(|s| (s, n)))
        .collect();
    found.sort_unstable();
    let excess = found.len().saturating_sub(max_checkpoints as usize);
    found[..excess].iter().map(|(_, n)| n.to_string()).collect()
}

/// Names of the `global_step<N>` directories in `run_dir`.
pub fn list_checkpoint_dirs(run_dir: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(run_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if entry.file_type()?.is_dir() && checkpoint_step(name).is_some() {
            out.push(name.to_string());
        }
    }
    Ok(out)
}

/// Retry schedule for deletions (spec §9.3: "retrying with exponential back-off"; network file
/// systems may briefly hold files open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub attempts: u32,
    pub first_delay: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            attempts: 5,
            first_delay: Duration::from_millis(100),
        }
    }
}

/// Runs `op` until it succeeds or `backoff.attempts` tries failed, sleeping (through `sleep`)
/// `first_delay`, 2·`first_delay`, … between tries. Returns the last error.
pub fn retry_with_backoff<T>(
    backoff: Backoff,
    mut sleep: impl FnMut(Duration),
    mut op: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let mut delay = backoff.first_delay;
    let mut tries = 0;
    loop {
        tries += 1;
        match op() {
            Ok(v) => return Ok(v),
            Err(e) if tries >= backoff.attempts.max(1) => return Err(e),
            Err(_) => {
                sleep(delay);
                delay = delay.saturating_mul(2);
            }
        }
    }
}

/// Deletes a checkpoint directory with retries; a directory that is already gone counts as
/// deleted.
pub fn remove_checkpoint_dir(path: &Path, backoff: Backoff) -> io::Result<()> {
    retry_with_backoff(
        backoff,
        std::thread::sleep,
        || match std::fs::remove_dir_all(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        },
    )
}
