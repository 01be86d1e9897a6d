mod common;
use common::*;
use qplc_compiler::{Graph, StagePlan};
use qplc_passes::{partition, schedule, MemoryOptions};

fn plan(g: &Graph, method: &str, stages: usize, alignment: u64) -> Vec<StagePlan> {
    let p = partition(g, method, stages, None).unwrap();
    schedule(g, &p, &MemoryOptions { alignment }).unwrap()
}

/// No two buffers that are live at the same step share a byte.
fn assert_no_live_overlap(s: &StagePlan) {
    for (i, a) in s.buffers.iter().enumerate() {
        assert!(a.offset + a.size <= s.arena_bytes);
        for b in &s.buffers[i + 1..] {
            let live_together = a.first_step <= b.last_step && b.first_step <= a.last_step;
            let disjoint = a.offset + a.size <= b.offset || b.offset + b.size <= a.offset;
            assert!(
                !live_together || disjoint || a.size == 0 || b.size == 0,
                "stage {}: {a:?} and {b:?}",
                s.stage
            );
        }
    }
}

#[test]
fn chain_reuses_buffers_two_at_a_time() {
    let g = chain(10);
    let s = &plan(&g, "uniform", 1, 256)[0];
    assert_eq!(s.order.len(), 10);
    let one = (T * H * 4) as u64; // 512 bytes, already aligned
    assert_eq!(s.buffers.len(), 11);
    // Each op needs its input and its output: two buffers ping-pong.
    assert_eq!(s.arena_bytes, 2 * one);
    let distinct: std::collections::BTreeSet<u64> = s.buffers.iter().map(|b| b.offset).collect();
    assert_eq!(distinct.len(), 2);
    assert_no_live_overlap(s);
}

#[test]
fn peak_is_at_most_the_sum_of_sizes_and_buffers_never_collide_on_random_dags() {
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    for case in 0..60 {
        let layers = 1 + rng.below(6);
        let nodes = 5 + rng.below(60);
        let g = random_dag(&mut rng, nodes, layers);
        let stages = 1 + rng.below(3);
        let alignment = [1u64, 64, 256][case % 3];
        for s in plan(&g, "uniform", stages, alignment) {
            let sum: u64 = s.buffers.iter().map(|b| b.size).sum();
            assert!(s.arena_bytes <= sum, "case {case}");
            assert_no_live_overlap(&s);
            for b in &s.buffers {
                assert_eq!(b.offset % alignment, 0);
                assert!(b.first_step <= b.last_step);
            }
        }
    }
}

#[test]
fn every_op_is_scheduled_once_after_its_operands() {
    let mut rng = XorShift(99);
    let g = random_dag(&mut rng, 80, 4);
    let stages = plan(&g, "uniform", 3, 256);
    let mut seen = std::collections::HashSet::new();
    for s in &stages {
        for &id in &s.order {
            for o in g.operands(id) {
                let here = s.order.iter().position(|&x| x == o);
                let ok = match here {
                    Some(p) => p < s.order.iter().position(|&x| x == id).unwrap(),
                    None => seen.contains(&o) || s.inputs.contains(&o),
                };
                assert!(ok, "%{} before %{}", o.index(), id.index());
                if here.is_none() && !s.inputs.contains(&o) {
                    assert!(s.receives.contains(&o));
                }
            }
        }
        seen.extend(s.order.iter().copied());
    }
    let ops =
        g.g.node_indices()
            .filter(|&i| !g.node(i).op.is_leaf())
            .count();
    assert_eq!(seen.len(), ops);
}

#[test]
fn tied_weight_counts_on_both_stages_and_flops_add_up() {
    let g = toy_model(4);
    let stages = plan(&g, "uniform", 2, 256);
    let table_bytes = (V * H * 2) as u64;
    let table = g.weights()[0].1;
    assert!(stages[0].weights.contains(&table));
    assert!(stages[1].weights.contains(&table));
    let total_weight_bytes: u64 = g
        .weights()
        .iter()
        .map(|(_, w)| g.node(*w).ty.bytes() as u64)
        .sum();
    let per_stage: u64 = stages.iter().map(|s| s.weight_bytes).sum();
    assert_eq!(per_stage, total_weight_bytes + table_bytes);
    assert_eq!(stages.iter().map(|s| s.flops).sum::<u64>(), g.flops());
    // The residual stream crosses from stage 0 to stage 1.
    assert_eq!(stages[1].receives.len(), 1);
    assert_eq!(stages[0].sends, stages[1].receives);
}

#[test]
fn values_leaving_a_stage_stay_live_to_its_end() {
    let g = toy_model(2);
    let stages = plan(&g, "uniform", 2, 256);
    for s in &stages {
        for b in &s.buffers {
            if s.sends.contains(&b.node) {
                assert_eq!(b.last_step, s.order.len());
            }
        }
    }
    // `hidden` and `logits` are outputs of the last stage.
    assert_eq!(stages[1].sends.len(), 2);
}
