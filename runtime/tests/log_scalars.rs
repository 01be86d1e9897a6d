//! TensorBoard tags per training mode (spec §10.2, check 49) and the aggregation of per-adapter
//! statistics over pipeline stages.
use qplc_compiler::config::Mode;
use qplc_runtime::log::{aggregate, step_scalars, tags, StatAccumulator, Stats, StepMetrics};

#[test]
fn full_fine_tune_writes_only_loss_lr_and_eval_loss() {
    let want = ["train/loss", "train/lr", "eval/loss"];
    assert_eq!(tags(Mode::FullFineTune, false), want);
    // lora_weight_decay does not apply to full fine-tuning.
    assert_eq!(tags(Mode::FullFineTune, true), want);
}

#[test]
fn lora_writes_norms_and_weight_decay_only_when_decay_is_on() {
    assert_eq!(
        tags(Mode::Lora, false),
        [
            "train/loss",
            "train/lr",
            "train/norms_avg",
            "train/norms_min",
            "train/norms_max",
            "eval/loss"
        ]
    );
    assert_eq!(
        tags(Mode::Lora, true),
        [
            "train/loss",
            "train/lr",
            "train/norms_avg",
            "train/norms_min",
            "train/norms_max",
            "train/weight_decay_avg",
            "train/weight_decay_min",
            "train/weight_decay_max",
            "eval/loss"
        ]
    );
}

#[test]
fn control_adapters_add_orthogonality() {
    assert_eq!(
        tags(Mode::ControlAdapter, false),
        [
            "train/loss",
            "train/lr",
            "train/norms_avg",
            "train/norms_min",
            "train/norms_max",
            "train/orthogonality_avg",
            "train/orthogonality_min",
            "train/orthogonality_max",
            "eval/loss"
        ]
    );
    assert_eq!(
        tags(Mode::ControlAdapter, true),
        [
            "train/loss",
            "train/lr",
            "train/norms_avg",
            "train/norms_min",
            "train/norms_max",
            "train/weight_decay_avg",
            "train/weight_decay_min",
            "train/weight_decay_max",
            "train/orthogonality_avg",
            "train/orthogonality_min",
            "train/orthogonality_max",
            "eval/loss"
        ]
    );
}

#[test]
fn step_scalars_carry_the_metric_values() {
    let m = StepMetrics {
        loss: 2.5,
        lr: 1.95e-5,
        norms: Stats {
            avg: 2.0,
            min: 1.0,
            max: 3.0,
        },
        weight_decay: Stats {
            avg: 0.5,
            min: 0.25,
            max: 0.75,
        },
        orthogonality: Stats {
            avg: 1e-6,
            min: 0.0,
            max: 2e-6,
        },
    };
    let got = step_scalars(Mode::ControlAdapter, true, &m);
    let want: Vec<(&str, f32)> = vec![
        ("train/loss", 2.5),
        ("train/lr", 1.95e-5),
        ("train/norms_avg", 2.0),
        ("train/norms_min", 1.0),
        ("train/norms_max", 3.0),
        ("train/weight_decay_avg", 0.5),
        ("train/weight_decay_min", 0.25),
        ("train/weight_decay_max", 0.75),
        ("train/orthogonality_avg", 1e-6),
        ("train/orthogonality_min", 0.0),
        ("train/orthogonality_max", 2e-6),
    ];
    assert_eq!(got, want);
    assert_eq!(
        step_scalars(Mode::FullFineTune, true, &m),
        [("train/loss", 2.5), ("train/lr", 1.95e-5)]
    );
}

#[test]
fn aggregate_of_no_adapters_is_zero() {
    let zero = Stats {
        avg: 0.0,
        min: 0.0,
        max: 0.0,
    };
    assert_eq!(aggregate(&[]), zero);
    assert_eq!(StatAccumulator::default().stats(), zero);
}

#[test]
fn aggregate_gives_average_min_and_max() {
    assert_eq!(
        aggregate(&[3.0, 1.0, 2.0, 6.0]),
        Stats {
            avg: 3.0,
            min: 1.0,
            max: 6.0
        }
    );
}

#[test]
fn stages_merge_by_sum_and_count_and_stages_without_adapters_add_nothing() {
    // Stage 0 has 1 adapter, stage 1 none, stage 2 three: the average is over the 4 adapters,
    // not the mean of the stage means ((10 + 2) / 2 = 6).
    let stages: Vec<StatAccumulator> = vec![
        [10.0].into_iter().collect(),
        StatAccumulator::default(),
        [1.0, 2.0, 3.0].into_iter().collect(),
    ];
    let mut total = StatAccumulator::default();
    for s in &stages {
        total.merge(s);
    }
    assert_eq!(
        total.stats(),
        Stats {
            avg: 4.0,
            min: 1.0,
            max: 10.0
        }
    );
}

#[test]
fn event_file_of_each_mode_holds_exactly_its_tags() {
    use qplc_runtime::log::{read_scalars, EventWriter};
    use std::collections::BTreeSet;
    for mode in [Mode::Lora, Mode::ControlAdapter, Mode::FullFineTune] {
        for decay in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let mut w = EventWriter::create(tmp.path()).unwrap();
            w.add_scalar(qplc_runtime::log::scalars::EVAL_LOSS, 3.0, 0)
                .unwrap();
            for step in 1..=2 {
                w.add_scalars(&step_scalars(mode, decay, &StepMetrics::default()), step)
                    .unwrap();
            }
            w.flush().unwrap();
            let written: BTreeSet<String> = read_scalars(w.path())
                .unwrap()
                .into_iter()
                .map(|(tag, _, _)| tag)
                .collect();
            let want: BTreeSet<String> = tags(mode, decay).into_iter().map(String::from).collect();
            assert_eq!(written, want, "{mode:?}, decay {decay}");
        }
    }
}
