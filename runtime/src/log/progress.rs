//! Training progress: the step clock (throughput, elapsed, ETA with evaluation time excluded,
//! spec §9.2 and §10.1) and where log lines go.
//!
//! Every message is printed as a console line (spec §10.1) whether or not stderr is a terminal,
//! so a piped log is the same as the reference's. On a terminal an `indicatif` bar with the ETA
//! is drawn below the lines as well; piped output gets no bar, since the bar's redraws would
//! only litter a log file.

use super::console::{self, StepReport};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Measures training time with evaluation excluded (spec §9.2: "Eval time is excluded from
/// elapsed / ETA / throughput"). Times are passed in, so tests need no sleeping.
#[derive(Clone, Debug)]
pub struct StepClock {
    started: Instant,
    paused_at: Option<Instant>,
    paused: Duration,
    /// The global step training (re)started from: steps done in this process = step − this.
    first_step: u64,
    total_steps: u64,
    /// `GAS·DP`: sequences consumed by one optimiser step (spec §10.1 throughput).
    sequences_per_step: f64,
    /// Training seconds at the previous step line.
    last_log: f64,
}

impl StepClock {
    pub fn start(now: Instant, first_step: u64, total_steps: u64, sequences_per_step: u64) -> Self {
        StepClock {
            started: now,
            paused_at: None,
            paused: Duration::ZERO,
            first_step,
            total_steps,
            sequences_per_step: sequences_per_step as f64,
            last_log: 0.0,
        }
    }

    /// Stops the clock (an evaluation begins). Pausing a paused clock changes nothing.
    pub fn pause(&mut self, now: Instant) {
        self.paused_at.get_or_insert(now);
    }

    /// Restarts the clock (the evaluation ended).
    pub fn resume(&mut self, now: Instant) {
        if let Some(at) = self.paused_at.take() {
            self.paused += now.saturating_duration_since(at);
        }
    }

    /// Training seconds since the start, pauses excluded.
    pub fn elapsed(&self, now: Instant) -> f64 {
        let end = self.paused_at.unwrap_or(now);
        end.saturating_duration_since(self.started)
            .saturating_sub(self.paused)
            .as_secs_f64()
    }

    /// The report for global step `step` just finished; starts the next throughput interval.
    pub fn step(&mut self, now: Instant, step: u64, loss: f64, lr: f64) -> StepReport {
        let elapsed = self.elapsed(now);
        let interval = elapsed - self.last_log;
        self.last_log = elapsed;
        let done = step.saturating_sub(self.first_step);
        let left = self.total_steps.saturating_sub(step);
        StepReport {
            step,
            total_steps: self.total_steps,
            loss,
            lr,
            throughput: if interval > 0.0 {
                self.sequences_per_step / interval
            } else {
                0.0
            },
            elapsed,
            eta: if done > 0 {
                elapsed / done as f64 * left as f64
            } else {
                0.0
            },
        }
    }
}

/// Where the training loop's lines go, plus the bar on a terminal.
pub struct Progress {
    out: Output,
    clock: StepClock,
}

enum Output {
    /// stderr is a terminal: lines are printed above the bar by indicatif. The string is the
    /// bar's elapsed/ETA message, restored after an evaluation.
    Bar(ProgressBar, String),
    /// Lines only, to any writer (stderr when piped; a buffer in tests).
    Plain(Box<dyn Write + Send>),
}

impl Progress {
    /// Starts the clock for a run at global step `first_step` (0, or the resume step) of
    /// `total_steps`, each step consuming `sequences_per_step` = GAS·DP sequences. Draws a bar
    /// only when stderr is a terminal.
    pub fn new(first_step: u64, total_steps: u64, sequences_per_step: u64) -> Self {
        let clock = StepClock::start(Instant::now(), first_step, total_steps, sequences_per_step);
        let out = if std::io::stderr().is_terminal() {
            Output::Bar(bar(first_step, total_steps), String::new())
        } else {
            Output::Plain(Box::new(std::io::stderr()))
        };
        Progress { out, clock }
    }

    /// Lines only, written to `sink`.
    pub fn plain(
        sink: Box<dyn Write + Send>,
        first_step: u64,
        total_steps: u64,
        sequences_per_step: u64,
    ) -> Self {
        let clock = StepClock::start(Instant::now(), first_step, total_steps, sequences_per_step);
        Progress {
            out: Output::Plain(sink),
            clock,
        }
    }

    /// Whether a bar is drawn.
    pub fn has_bar(&self) -> bool {
        matches!(self.out, Output::Bar(..))
    }

    /// Prints `[time] [INFO] [qplc] message`.
    pub fn info(&mut self, message: &str) {
        let line = console::line(message);
        match &mut self.out {
            Output::Bar(bar, _) => bar.println(line),
            Output::Plain(sink) => {
                // A log line that cannot be written (closed pipe) must not stop training.
                let _ = writeln!(sink, "{line}");
                let _ = sink.flush();
            }
        }
    }

    /// An evaluation starts: its time is kept out of elapsed, throughput and ETA.
    pub fn begin_eval(&mut self) {
        self.clock.pause(Instant::now());
        if let Output::Bar(bar, _) = &self.out {
            bar.set_message("evaluating");
        }
    }

    /// The evaluation ended.
    pub fn end_eval(&mut self) {
        self.clock.resume(Instant::now());
        if let Output::Bar(bar, message) = &self.out {
            bar.set_message(message.clone());
        }
    }

    /// Logs the step line of global step `step` (spec §10.1) and moves the bar; returns what
    /// was reported.
    pub fn step(&mut self, step: u64, loss: f64, lr: f64) -> StepReport {
        let report = self.clock.step(Instant::now(), step, loss, lr);
        self.info(&console::step_message(&report));
        if let Output::Bar(bar, message) = &mut self.out {
            *message = format!(
                "elapsed {}, eta {}",
                console::duration(report.elapsed),
                console::duration(report.eta)
            );
            bar.set_position(step);
            bar.set_message(message.clone());
        }
        report
    }

    /// Removes the bar (the lines stay).
    pub fn finish(&mut self) {
        if let Output::Bar(bar, _) = &self.out {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

fn bar(position: u64, total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    // Our ETA, not indicatif's `{eta}`: indicatif's rate estimate would count evaluation pauses.
    let style = ProgressStyle::with_template("{bar:40.cyan/blue} {pos}/{len} steps {msg}")
        .expect("the template is valid")
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_position(position);
    bar
}
