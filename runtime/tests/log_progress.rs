//! Step timing (throughput, elapsed, ETA without evaluation time; spec §9.2, §10.1) and the
//! plain-line output used when stderr is not a terminal.
use qplc_runtime::log::{Progress, StepClock};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

#[test]
fn throughput_is_sequences_per_step_over_seconds_since_previous_step_line() {
    let t0 = Instant::now();
    // GAS 8 × DP 2 = 16 sequences per step.
    let mut clock = StepClock::start(t0, 0, 100, 16);
    let r1 = clock.step(t0 + secs(4.0), 1, 2.0, 1e-5);
    assert_eq!(r1.throughput, 4.0);
    let r2 = clock.step(t0 + secs(6.0), 2, 1.9, 1e-5);
    assert_eq!(r2.throughput, 8.0);
    assert_eq!(r2.elapsed, 6.0);
    // ETA = elapsed / steps done × steps left = 6 / 2 × 98.
    assert_eq!(r2.eta, 294.0);
    assert_eq!(
        (r2.step, r2.total_steps, r2.loss, r2.lr),
        (2, 100, 1.9, 1e-5)
    );
}

#[test]
fn evaluation_time_is_excluded_from_elapsed_throughput_and_eta() {
    let t0 = Instant::now();
    let mut clock = StepClock::start(t0, 0, 10, 4);
    clock.step(t0 + secs(2.0), 1, 2.0, 1e-5);
    clock.pause(t0 + secs(2.5));
    assert_eq!(clock.elapsed(t0 + secs(100.0)), 2.5, "frozen while paused");
    clock.resume(t0 + secs(102.5));
    let r = clock.step(t0 + secs(104.0), 2, 2.0, 1e-5);
    assert_eq!(r.elapsed, 4.0);
    assert_eq!(r.throughput, 2.0);
    assert_eq!(r.eta, 16.0);
}

#[test]
fn eta_after_resume_counts_only_steps_done_in_this_process() {
    let t0 = Instant::now();
    let mut clock = StepClock::start(t0, 25, 50, 1);
    let r = clock.step(t0 + secs(10.0), 26, 2.0, 1e-5);
    assert_eq!(r.eta, 240.0); // 10 s per step × 24 steps left
    let last = clock.step(t0 + secs(20.0), 50, 2.0, 1e-5);
    assert_eq!(last.eta, 0.0);
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn plain_output_prints_console_lines_and_no_bar() {
    let sink = Sink::default();
    let mut p = Progress::plain(Box::new(sink.clone()), 0, 3, 8);
    assert!(!p.has_bar());
    p.info("train data size: 24 sequences (98304 tokens)");
    p.begin_eval();
    p.end_eval();
    let r = p.step(1, 2.5, 1.95e-5);
    assert_eq!(r.step, 1);
    p.finish();
    let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let re =
        regex::Regex::new(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\] \[INFO\] \[qplc\] (.*)$")
            .unwrap();
    let msg = |l: &str| re.captures(l).unwrap()[1].to_string();
    assert_eq!(
        msg(lines[0]),
        "train data size: 24 sequences (98304 tokens)"
    );
    assert!(
        msg(lines[1]).starts_with("step: 1 / 3, loss: 2.5000, lr: 1.950e-05, throughput: "),
        "{}",
        lines[1]
    );
}
