//! The data pipeline of spec §4: documents (txt / json / jsonl / parquet) → tokens → packed
//! fixed-length sequences → train/eval split → a memory-mapped cache → distributed batches.
//!
//! Each stage is a plain function over plain data, so tests drive any stage alone:
//! [`read`] (files → texts), [`tokenize`] (texts → [`Documents`]), [`pack`] (documents →
//! [`Packed`] sequences, the exact §4.6 algorithm), [`split`] (§4.7), [`cache`] (the on-disk
//! format and its key), [`sampler`] (§4.8). [`pipeline`] strings them together for a config.
pub mod cache;
pub mod pack;
pub mod pipeline;
pub mod read;
pub mod rng;
pub mod sampler;
pub mod spill;
pub mod split;
pub mod stats;
pub mod tokenize;

pub use cache::{CacheKey, Dataset, SplitView};
pub use pack::{pack, pack_into, PackSettings, PackStats, Packed, PackedSequence};
pub use pipeline::{prepare, Prepared, Progress};
pub use sampler::{DistributedSampler, Loader, LocalBatch};
pub use split::{split_indices, Split};
pub use stats::{DataStats, DatasetStats};
pub use tokenize::{Documents, TokenSettings};
