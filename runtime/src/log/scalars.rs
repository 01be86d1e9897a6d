//! Which TensorBoard scalars a run writes, per training mode (spec §10.2, check 49).
//!
//! [`step_scalars`] is the one list: [`tags`] is derived from it, so the tag set a test pins and
//! the tags the training loop writes cannot drift apart.

use qplc_compiler::config::Mode;

pub const TRAIN_LOSS: &str = "train/loss";
pub const TRAIN_LR: &str = "train/lr";
pub const EVAL_LOSS: &str = "eval/loss";

/// avg / min / max of one per-adapter statistic over every adapter of every pipeline stage.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    pub avg: f64,
    pub min: f64,
    pub max: f64,
}

/// Accumulates one per-adapter statistic. Each pipeline stage accumulates its own adapters; the
/// stages' accumulators are then merged (sum/count for the average, global min/max, spec §10.2),
/// which is why the state is `(sum, count, min, max)` rather than a running mean.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StatAccumulator {
    pub sum: f64,
    pub count: u64,
    pub min: f64,
    pub max: f64,
}

impl Default for StatAccumulator {
    fn default() -> Self {
        StatAccumulator {
            sum: 0.0,
            count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl StatAccumulator {
    pub fn push(&mut self, value: f64) {
        self.sum += value;
        self.count += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// Adds another stage's statistics; a stage without adapters (count 0) changes nothing.
    pub fn merge(&mut self, other: &StatAccumulator) {
        self.sum += other.sum;
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// avg/min/max; all 0 when no adapter contributed (spec §10.2).
    pub fn stats(&self) -> Stats {
        if self.count == 0 {
            return Stats::default();
        }
        Stats {
            avg: self.sum / self.count as f64,
            min: self.min,
            max: self.max,
        }
    }
}

impl FromIterator<f64> for StatAccumulator {
    fn from_iter<I: IntoIterator<Item = f64>>(iter: I) -> Self {
        let mut acc = StatAccumulator::default();
        iter.into_iter().for_each(|v| acc.push(v));
        acc
    }
}

/// avg/min/max of a list of per-adapter values (0, 0, 0 for an empty list).
pub fn aggregate(values: &[f64]) -> Stats {
    values.iter().copied().collect::<StatAccumulator>().stats()
}

/// What one optimiser step reports (spec §6.1.5, §6.2.7, §8.5): loss, the post-scheduler
/// learning rate, and the per-adapter statistics aggregated over all stages.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepMetrics {
    pub loss: f64,
    pub lr: f64,
    /// LoRA: ‖BA‖_F; CA: max|expm1 S| (after decay / shrinkage).
    pub norms: Stats,
    /// The decrease of `norms` caused by the decay (written only when `lora_weight_decay > 0`).
    pub weight_decay: Stats,
    /// CA only: ‖QᵀQ − I‖²_F after the Newton step.
    pub orthogonality: Stats,
}

fn push_stats(out: &mut Vec<(&'static str, f32)>, names: [&'static str; 3], s: &Stats) {
    out.extend([
        (names[0], s.avg as f32),
        (names[1], s.min as f32),
        (names[2], s.max as f32),
    ]);
}

/// The scalars written after every training step, in this order (spec §10.2):
/// `train/loss`, `train/lr`; for LoRA and CA `train/norms_{avg,min,max}`; for LoRA and CA with
/// `lora_weight_decay > 0` `train/weight_decay_{avg,min,max}`; for CA
/// `train/orthogonality_{avg,min,max}`. Full fine-tuning writes only loss and lr.
pub fn step_scalars(
    mode: Mode,
    weight_decay_active: bool,
    m: &StepMetrics,
) -> Vec<(&'static str, f32)> {
    let mut out = vec![(TRAIN_LOSS, m.loss as f32), (TRAIN_LR, m.lr as f32)];
    if mode == Mode::FullFineTune {
        return out;
    }
    push_stats(
        &mut out,
        ["train/norms_avg", "train/norms_min", "train/norms_max"],
        &m.norms,
    );
    if weight_decay_active {
        push_stats(
            &mut out,
            [
                "train/weight_decay_avg",
                "train/weight_decay_min",
                "train/weight_decay_max",
            ],
            &m.weight_decay,
        );
    }
    if mode == Mode::ControlAdapter {
        push_stats(
            &mut out,
            [
                "train/orthogonality_avg",
                "train/orthogonality_min",
                "train/orthogonality_max",
            ],
            &m.orthogonality,
        );
    }
    out
}

/// Every tag a run in `mode` writes: the per-step tags of [`step_scalars`] plus `eval/loss`
/// (check 49; FFT: only `train/loss`, `train/lr`, `eval/loss`).
pub fn tags(mode: Mode, weight_decay_active: bool) -> Vec<&'static str> {
    step_scalars(mode, weight_decay_active, &StepMetrics::default())
        .into_iter()
        .map(|(tag, _)| tag)
        .chain([EVAL_LOSS])
        .collect()
}
