//! The distributed batch sampler and the resumable loader of spec §4.8.
use anyhow::{bail, Result};

/// Which sequences each rank reads (micro-batch size `b = 1`, as in the reference).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistributedSampler {
    /// Sequences in the split.
    pub n: usize,
    /// Micro-batches per step (`GAS`, or the eval GAS).
    pub gas: usize,
    /// Data-parallel replicas.
    pub dp: usize,
    pub rank: usize,
}

/// One rank's share of one global batch: `gas` micro-batches of one sequence each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalBatch {
    /// 0-based index of the global batch within the pass.
    pub index: usize,
    /// Sequence positions in the split, one `Vec` per micro-batch.
    pub micro_batches: Vec<Vec<usize>>,
}

impl DistributedSampler {
    pub fn new(n: usize, gas: usize, dp: usize, rank: usize) -> Result<Self> {
        if gas == 0 || dp == 0 || rank >= dp {
            bail!("bad sampler setting: gas = {gas}, dp = {dp}, rank = {rank}");
        }
        let g = gas * dp;
        if n < g {
            // The reference's message, word for word (§3.8).
            bail!("Dataset size ({n}) is smaller than one global batch ({g})");
        }
        Ok(DistributedSampler { n, gas, dp, rank })
    }

    /// `G = b·m·DP`.
    pub fn global_batch(&self) -> usize {
        self.gas * self.dp
    }

    /// Global batches per pass: the remainder `n mod G` is never used, always the same tail
    /// because the order is fixed (§4.7).
    pub fn steps_per_epoch(&self) -> usize {
        self.n / self.global_batch()
    }

    pub fn unused(&self) -> usize {
        self.n - self.steps_per_epoch() * self.global_batch()
    }

    /// This rank's contiguous slice `[g·G + ρ·m, g·G + (ρ+1)·m)` of global batch `g`, split
    /// into `m` micro-batches.
    pub fn local_batch(&self, g: usize) -> LocalBatch {
        let start = g * self.global_batch() + self.rank * self.gas;
        LocalBatch {
            index: g,
            micro_batches: (start..start + self.gas).map(|i| vec![i]).collect(),
        }
    }
}

/// An endless iterator over local batches that prefetches one ahead and whose whole resumable
/// state is `num_batches_pulled`, the local batches fetched in the current pass (§4.8).
#[derive(Clone, Debug)]
pub struct Loader {
    pub sampler: DistributedSampler,
    pulled: usize,
    prefetched: Option<LocalBatch>,
    /// Completed passes over the data (advances when a pass wraps).
    pub passes: usize,
}

impl Loader {
    pub fn new(sampler: DistributedSampler) -> Self {
        Loader {
            sampler,
            pulled: 0,
            prefetched: None,
            passes: 0,
        }
    }

    /// The next local batch; the following one is fetched at once (the prefetch), so right
    /// after step `k` of a pass the counter reads `k + 1`, or `1` right after a wrap.
    pub fn next_batch(&mut self) -> LocalBatch {
        let current = match self.prefetched.take() {
            Some(b) => b,
            None => self.pull(),
        };
        self.prefetched = Some(self.pull());
        current
    }

    fn pull(&mut self) -> LocalBatch {
        if self.pulled == self.sampler.steps_per_epoch() {
            self.pulled = 0;
            self.passes += 1;
        }
        let b = self.sampler.local_batch(self.pulled);
        self.pulled += 1;
        b
    }

    /// The state to checkpoint: `num_batches_pulled`.
    pub fn state(&self) -> usize {
        self.pulled
    }

    /// Restores a checkpointed state: the counter becomes `saved − 1` and that many batches
    /// are skipped, so iteration resumes at the first unconsumed batch (check 19). A rank
    /// that never read data saved 0 and skips nothing.
    pub fn restore(&mut self, saved: usize) {
        self.pulled = saved.saturating_sub(1).min(self.sampler.steps_per_epoch());
        self.prefetched = None;
    }
}
