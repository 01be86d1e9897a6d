//! What the pipeline did to the data, for `qplc data` and the training log.
use super::pack::PackStats;
use serde::{Deserialize, Serialize};

/// One `[[datasets]]` entry's counts, before and after `max_tokens` pruning (§3.7).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetStats {
    pub path: String,
    pub files: u64,
    /// Records read from the files.
    pub records: u64,
    /// Documents that tokenised to nothing (§4.2 step 4).
    pub empty: u64,
    /// Documents kept after `max_tokens`, and their tokens.
    pub documents: u64,
    pub tokens: u64,
    /// Documents (and tokens) cut by `max_tokens`.
    pub pruned_documents: u64,
    pub pruned_tokens: u64,
}

/// Counts for the whole dataset as built.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataStats {
    pub datasets: Vec<DatasetStats>,
    pub pack: PackStats,
    pub sequences: u64,
    pub train_sequences: u64,
    pub eval_sequences: u64,
    /// Positions (of all sequences) with label −100.
    pub masked_positions: u64,
    /// Positions per control class −1, 0, +1.
    pub class_counts: [u64; 3],
}
