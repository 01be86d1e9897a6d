//! The train/eval split of spec §4.7.
use super::rng::{permutation, SEED};
use anyhow::{bail, Result};

/// Sequence indices of each split, in the (seeded) permuted order the loaders keep: loaders
/// never reshuffle, so every epoch visits the training sequences in this order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub eval: Vec<usize>,
}

/// `n_eval = ceil(eval_fraction · n)`; eval is the first `n_eval` indices of a seeded (42)
/// permutation, train the rest (check 17). Either split being empty is an error (§3.8).
pub fn split_indices(n: usize, eval_fraction: f64) -> Result<Split> {
    // The same f64 product as Python's `math.ceil(eval_fraction * n)`.
    let n_eval = (eval_fraction * n as f64).ceil() as usize;
    let n_eval = n_eval.min(n);
    if n_eval == 0 || n_eval == n {
        bail!(
            "{n} sequences with eval_fraction = {eval_fraction} give an empty {} split \
             (add data or change eval_fraction)",
            if n_eval == 0 { "eval" } else { "train" }
        );
    }
    let mut p = permutation(n, SEED);
    let train = p.split_off(n_eval);
    Ok(Split { train, eval: p })
}
