//! The train/eval split (§4.7, check 17), the distributed sampler (§4.8, check 18) and the
//! loader's resume counter (check 19).
use qplc_runtime::data::sampler::{DistributedSampler, Loader};
use qplc_runtime::data::split::split_indices;

#[test]
fn split_takes_the_ceiling_of_the_eval_fraction() {
    let s = split_indices(1000, 0.01).unwrap();
    assert_eq!((s.eval.len(), s.train.len()), (10, 990));
    let again = split_indices(1000, 0.01).unwrap();
    assert_eq!(s, again, "the split is deterministic");
    let mut all: Vec<usize> = s.train.iter().chain(&s.eval).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..1000).collect::<Vec<_>>());
    // The order is permuted, not the identity.
    assert_ne!(s.train, (10..1000).collect::<Vec<_>>());
    assert_eq!(split_indices(101, 0.01).unwrap().eval.len(), 2);
}

#[test]
fn split_rejects_an_empty_side() {
    let e = split_indices(1, 0.5).unwrap_err().to_string();
    assert!(e.contains("empty train split"), "{e}");
    assert!(split_indices(0, 0.5).is_err());
}

#[test]
fn sampler_truncates_the_remainder_and_slices_by_rank() {
    let s0 = DistributedSampler::new(103, 4, 2, 0).unwrap();
    let s1 = DistributedSampler::new(103, 4, 2, 1).unwrap();
    assert_eq!(s0.global_batch(), 8);
    assert_eq!(s0.steps_per_epoch(), 12);
    assert_eq!(s0.unused(), 7);
    let b = s1.local_batch(0);
    assert_eq!(b.micro_batches, vec![vec![4], vec![5], vec![6], vec![7]]);
    assert_eq!(
        s0.local_batch(1).micro_batches,
        vec![vec![8], vec![9], vec![10], vec![11]]
    );
    // Over an epoch the ranks together use exactly the first 96 positions, once each.
    let mut used: Vec<usize> = (0..12)
        .flat_map(|g| [s0.local_batch(g), s1.local_batch(g)])
        .flat_map(|b| b.micro_batches.into_iter().flatten())
        .collect();
    used.sort_unstable();
    assert_eq!(used, (0..96).collect::<Vec<_>>());
}

#[test]
fn sampler_rejects_a_split_smaller_than_one_global_batch() {
    let e = DistributedSampler::new(7, 4, 2, 0).unwrap_err().to_string();
    assert_eq!(e, "Dataset size (7) is smaller than one global batch (8)");
    assert!(DistributedSampler::new(8, 4, 2, 0).is_ok());
}

fn loader() -> Loader {
    Loader::new(DistributedSampler::new(103, 4, 2, 1).unwrap())
}

#[test]
fn loader_state_is_steps_done_plus_one_because_of_the_prefetch() {
    let mut l = loader();
    assert_eq!(l.state(), 0, "a rank that never read data has 0");
    for k in 1..=5 {
        assert_eq!(l.next_batch().index, k - 1);
        assert_eq!(l.state(), k + 1);
    }
}

#[test]
fn restored_loader_resumes_at_the_first_unconsumed_batch() {
    let mut l = loader();
    let k = 5;
    for _ in 0..k {
        l.next_batch();
    }
    let saved = l.state();
    assert_eq!(saved, k + 1);
    let expected = l.next_batch();
    let mut restored = loader();
    restored.restore(saved);
    let got = restored.next_batch();
    assert_eq!(got, expected);
    assert_eq!(got.index, k);
    assert_eq!(got.micro_batches[0], vec![k * 8 + 4]);
}

#[test]
fn a_checkpoint_at_an_epoch_boundary_restarts_at_batch_zero() {
    let mut l = loader();
    for _ in 0..12 {
        l.next_batch();
    }
    // The prefetch already wrapped into the next pass.
    assert_eq!(l.state(), 1);
    assert_eq!(l.passes, 1);
    let mut restored = loader();
    restored.restore(l.state());
    assert_eq!(restored.next_batch().index, 0);
    // Iteration is endless and every pass visits the same order.
    assert_eq!(l.next_batch().index, 0);
    assert_eq!(l.next_batch().index, 1);
}

#[test]
fn restoring_zero_skips_nothing() {
    let mut l = loader();
    l.restore(0);
    assert_eq!(l.next_batch().index, 0);
}
