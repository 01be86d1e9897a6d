//! Checkpoint cadence and pruning (spec §9.3, checks 45, 46).
use qplc_runtime::train::checkpoint_policy::{
    checkpoint_step, list_checkpoint_dirs, remove_checkpoint_dir, retry_with_backoff, Backoff,
    CheckpointReason,
};
use qplc_runtime::train::{checkpoints_to_prune, CheckpointTimer};
use std::io;
use std::time::{Duration, Instant};

const HOUR: Duration = Duration::from_secs(3600);

/// Check 46: fires once ≥ interval has elapsed since the previous time-based checkpoint.
#[test]
fn time_based_checkpoint_fires_once_interval_elapsed() {
    let t0 = Instant::now();
    let mut timer = CheckpointTimer::new(1.0, t0);
    assert_eq!(timer.interval(), HOUR);
    assert!(!timer.poll(t0 + HOUR - Duration::from_millis(1)));
    assert!(timer.poll(t0 + HOUR));
    // The timer restarted at t0 + 1 h.
    assert!(!timer.poll(t0 + HOUR + Duration::from_secs(1800)));
    assert!(timer.poll(t0 + 2 * HOUR + Duration::from_secs(5)));
}

#[test]
fn fractional_hours_are_honoured() {
    let t0 = Instant::now();
    let mut timer = CheckpointTimer::new(0.25, t0);
    assert!(!timer.poll(t0 + Duration::from_secs(899)));
    assert!(timer.poll(t0 + Duration::from_secs(900)));
}

/// Spec §9.3: epoch ends force a checkpoint without touching the timer.
#[test]
fn epoch_end_checkpoint_does_not_reset_the_timer() {
    let t0 = Instant::now();
    let mut timer = CheckpointTimer::new(1.0, t0);
    let at = |m: u64| t0 + Duration::from_secs(m * 60);
    assert_eq!(timer.decide(true, at(50)), Some(CheckpointReason::EpochEnd));
    assert_eq!(timer.decide(false, at(55)), None);
    // One hour after *start*, not after the epoch-end checkpoint.
    assert_eq!(
        timer.decide(false, at(60)),
        Some(CheckpointReason::Interval)
    );
    assert_eq!(timer.decide(false, at(61)), None);
}

#[test]
fn checkpoint_dir_names_parse_strictly() {
    assert_eq!(checkpoint_step("global_step120"), Some(120));
    assert_eq!(checkpoint_step("global_step"), None);
    assert_eq!(checkpoint_step("global_step12a"), None);
    assert_eq!(checkpoint_step("global_step-1"), None);
    assert_eq!(checkpoint_step("epoch1"), None);
}

/// Check 45: after 5 checkpoints with max_checkpoints = 3 only the 3 highest steps remain —
/// ordered numerically, not by name (global_step100 > global_step25).
#[test]
fn pruning_keeps_the_highest_steps() {
    let names = [
        "global_step25",
        "global_step100",
        "global_step50",
        "global_step75",
        "global_step5",
        "latest",
        "epoch1",
    ];
    assert_eq!(
        checkpoints_to_prune(names, 3),
        vec!["global_step5".to_string(), "global_step25".to_string()]
    );
    assert!(checkpoints_to_prune(names[..3].iter().copied(), 3).is_empty());
}

/// Check 45: max_checkpoints ≤ 0 keeps everything.
#[test]
fn non_positive_max_checkpoints_keeps_all() {
    let names = [
        "global_step1",
        "global_step2",
        "global_step3",
        "global_step4",
    ];
    assert!(checkpoints_to_prune(names, 0).is_empty());
    assert!(checkpoints_to_prune(names, -1).is_empty());
}

/// Check 45 end to end on a real directory: five saves, pruning after each, three remain.
#[test]
fn pruning_a_run_directory_after_each_save_leaves_three() {
    let dir = tempfile::tempdir().unwrap();
    let fast = Backoff {
        attempts: 3,
        first_delay: Duration::from_millis(1),
    };
    std::fs::write(dir.path().join("latest"), "global_step5").unwrap();
    std::fs::write(
        dir.path().join("global_step999"),
        "a file, not a checkpoint",
    )
    .unwrap();
    for step in 1..=5 {
        let ckpt = dir.path().join(format!("global_step{step}"));
        std::fs::create_dir_all(ckpt.join("layer_00")).unwrap();
        std::fs::write(ckpt.join("layer_00/state.bin"), [0u8; 16]).unwrap();
        let names = list_checkpoint_dirs(dir.path()).unwrap();
        for victim in checkpoints_to_prune(names.iter().map(String::as_str), 3) {
            remove_checkpoint_dir(&dir.path().join(victim), fast).unwrap();
        }
    }
    let mut left = list_checkpoint_dirs(dir.path()).unwrap();
    left.sort();
    assert_eq!(left, ["global_step3", "global_step4", "global_step5"]);
    assert!(dir.path().join("latest").exists());
    assert!(dir.path().join("global_step999").exists());
}

#[test]
fn removing_an_already_deleted_checkpoint_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    remove_checkpoint_dir(&dir.path().join("global_step7"), Backoff::default()).unwrap();
}

#[test]
fn retries_back_off_exponentially_until_success() {
    let mut sleeps = Vec::new();
    let mut calls = 0;
    let backoff = Backoff {
        attempts: 5,
        first_delay: Duration::from_millis(100),
    };
    let out = retry_with_backoff(
        backoff,
        |d| sleeps.push(d),
        || {
            calls += 1;
            if calls < 3 {
                Err(io::Error::other("busy"))
            } else {
                Ok(calls)
            }
        },
    );
    assert_eq!(out.unwrap(), 3);
    assert_eq!(
        sleeps,
        [Duration::from_millis(100), Duration::from_millis(200)]
    );
}

#[test]
fn retries_give_up_with_the_last_error() {
    let mut calls = 0;
    let backoff = Backoff {
        attempts: 4,
        first_delay: Duration::ZERO,
    };
    let err = retry_with_backoff(
        backoff,
        |_| {},
        || -> io::Result<()> {
            calls += 1;
            Err(io::Error::other(format!("attempt {calls}")))
        },
    )
    .unwrap_err();
    assert_eq!(calls, 4);
    assert_eq!(err.to_string(), "attempt 4");
}
