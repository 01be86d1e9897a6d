//! The whole pipeline for one config: read → tokenise → shuffle/prune → combine → pack →
//! split → cache (spec §4.1–§4.7). A second call with the same inputs and settings opens the
//! cache instead of tokenising again (check 20).
use super::cache::{self, Array, CacheKey, Dataset, KeyBuilder};
use super::pack::{pack_into, PackSettings, IGNORE};
use super::read::{expand, read_batches};
use super::rng::{permutation, SEED};
use super::spill::{DocStore, Spill};
use super::split::split_indices;
use super::stats::{DataStats, DatasetStats};
use super::tokenize::{document_class, tokenize_texts, TokenSettings};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use qplc_compiler::config::LoadedConfig;
use std::path::{Path, PathBuf};

/// Progress while building, for a progress bar.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// Input bytes about to be tokenised, in total.
    Start { bytes: u64 },
    /// Bytes of input tokenised so far.
    Tokenized { bytes: u64 },
    /// Tokenising finished; packing and writing the cache.
    Packing,
}

/// The result of [`prepare`].
pub struct Prepared {
    pub dataset: Dataset,
    pub key: CacheKey,
    /// True when an existing cache was opened and nothing was tokenised.
    pub from_cache: bool,
}

/// Where `qplc data` keeps caches when not told otherwise: `<output_dir>/data_cache`.
pub fn default_cache_dir(cfg: &LoadedConfig) -> Result<PathBuf> {
    Ok(cfg.output_dir()?.join("data_cache"))
}

/// Input bytes read, parsed and tokenised together: enough documents to keep every core
/// busy, little enough that the batch's texts and ids are a small part of the peak memory.
const BATCH_BYTES: usize = 4 << 20;

/// Builds the dataset a config describes, or opens its cache in `cache_dir`.
pub fn prepare(
    cfg: &LoadedConfig,
    tok: &Tokenizer,
    cache_dir: &Path,
    progress: &dyn Fn(Progress),
) -> Result<Prepared> {
    let c = &cfg.config;
    let settings = TokenSettings::resolve(cfg, tok)?;
    let files: Vec<Vec<PathBuf>> = c
        .datasets
        .iter()
        .map(|d| expand(&cfg.resolve(&d.dataset_path)))
        .collect::<Result<_>>()?;
    let key = cache_key(cfg, tok, &settings, &files)?;
    let path = key.path_in(cache_dir);
    if path.is_file() {
        match Dataset::open(&path, Some(&key)) {
            Ok(dataset) => {
                return Ok(Prepared {
                    dataset,
                    key,
                    from_cache: true,
                })
            }
            Err(e) => tracing::warn!("rebuilding the data cache: {e:#}"),
        }
    }

    let total_bytes = files
        .iter()
        .flatten()
        .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    progress(Progress::Start { bytes: total_bytes });
    let mut done_bytes = 0u64;
    // Tokens wait on disk, not in memory, until packing reads them in the shuffled order.
    let mut store = DocStore::new(cache_dir)?;
    // Per dataset: its first document in `store` and its packing order.
    let mut datasets: Vec<(usize, Vec<usize>)> = Vec::with_capacity(c.datasets.len());
    let mut stats = DataStats::default();
    for (d, files) in c.datasets.iter().zip(&files) {
        let first = store.len();
        let mut ds = DatasetStats {
            path: d.dataset_path.clone(),
            files: files.len() as u64,
            ..Default::default()
        };
        for file in files {
            let file_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
            let mut text_bytes = 0u64;
            read_batches(file, BATCH_BYTES, |texts| {
                ds.records += texts.len() as u64;
                let ids = tokenize_texts(tok, &settings, &texts)
                    .with_context(|| format!("tokenising `{}`", file.display()))?;
                for ids in ids {
                    // Empty documents are dropped (§4.2 step 4) before class 0 numbers the
                    // kept ones (§4.3).
                    if !ids.is_empty() {
                        store.push(&ids, document_class(d.control_class, store.len() - first))?;
                    }
                }
                // Text bytes approximate file bytes (JSON or parquet framing aside).
                text_bytes += texts.iter().map(|t| t.len() as u64).sum::<u64>();
                progress(Progress::Tokenized {
                    bytes: done_bytes + text_bytes.min(file_bytes),
                });
                Ok(())
            })?;
            done_bytes += file_bytes;
            progress(Progress::Tokenized { bytes: done_bytes });
        }
        let n = store.len() - first;
        ds.empty = ds.records - n as u64;
        if n == 0 {
            bail!(
                "dataset `{}` has no documents ({} records in {} files, {} of them empty)",
                d.dataset_path,
                ds.records,
                files.len(),
                ds.empty
            );
        }
        let len = |i: usize| store.doc_len(first + i);
        // §4.4: shuffle (seed 42), then keep documents while the running total of tokens
        // stays within `max_tokens`, stopping at the first that would exceed it.
        let mut order = permutation(n, SEED);
        if let Some(max) = d.max_tokens {
            let kept = prune_to_max_tokens(len, &order, max);
            for &i in &order[kept..] {
                ds.pruned_documents += 1;
                ds.pruned_tokens += len(i);
            }
            order.truncate(kept);
        }
        ds.documents = order.len() as u64;
        ds.tokens = order.iter().map(|&i| len(i)).sum();
        stats.datasets.push(ds);
        datasets.push((first, order));
    }
    progress(Progress::Packing);

    let orders: Vec<Vec<usize>> = datasets.iter().map(|(_, o)| o.clone()).collect();
    let combined = combine(&orders, c.mix_datasets);
    drop(orders);
    let t = cfg.sequence_len();
    let pack_settings = PackSettings {
        seq_len: t,
        prefix: settings.sequence_prefix.clone(),
        bos_id: settings.bos_id,
        drop_tails: c.drop_tails,
        max_sequences: c.max_sequences.map(|m| m.max(0) as usize),
        mask: settings.mask.clone(),
    };
    // Packed sequences go to disk as records of ids (4·T bytes), labels (4·T), classes (T),
    // in packing order; the cache then takes them in split order.
    let record = 9 * t as u64;
    let mut sequences = Spill::new(cache_dir, "sequences")?;
    let docs = combined.iter().map(|&(d, i)| {
        let index = datasets[d].0 + i;
        Ok((store.read(index)?, store.class(index)))
    });
    let pack_stats = pack_into(docs, &pack_settings, |seq| {
        stats.masked_positions += seq.labels.iter().filter(|&&l| l == IGNORE).count() as u64;
        for &class in seq.classes {
            stats.class_counts[(class + 1) as usize] += 1;
        }
        let mut bytes = Vec::with_capacity(record as usize);
        bytes.extend(seq.input_ids.iter().flat_map(|x| x.to_le_bytes()));
        bytes.extend(seq.labels.iter().flat_map(|x| x.to_le_bytes()));
        bytes.extend(seq.classes.iter().map(|&x| x as u8));
        sequences.append(&bytes)
    })?;
    drop(store);
    let n_sequences = (sequences.len() / record) as usize;
    if n_sequences == 0 && c.max_sequences.is_some_and(|m| m <= 0) {
        bail!(cfg.error(
            "max_sequences",
            "leaves no sequences; it must be at least 1"
        ));
    }
    if n_sequences == 0 {
        bail!(
            "the datasets hold {} tokens, not enough for one sequence of {} tokens \
             (lower sequence_len or add data)",
            pack_stats.document_tokens,
            cfg.sequence_len()
        );
    }
    let split = split_indices(n_sequences, c.eval_fraction)?;
    stats.pack = pack_stats;
    stats.sequences = n_sequences as u64;
    stats.train_sequences = split.train.len() as u64;
    stats.eval_sequences = split.eval.len() as u64;
    cache::write_with(&path, &key, t, &split, &stats, |array, i, out| {
        let (start, len) = match array {
            Array::Ids => (0, 4 * t),
            Array::Labels => (4 * t, 4 * t),
            Array::Classes => (8 * t, t),
        };
        out.resize(len, 0);
        sequences.read_at(i as u64 * record + start as u64, out)
    })?;
    drop(sequences);
    let dataset = Dataset::open(&path, Some(&key))?;
    Ok(Prepared {
        dataset,
        key,
        from_cache: false,
    })
}

/// The packing order as (dataset, document) pairs, spec §4.5: datasets concatenated in config
/// order (each already shuffled and pruned), the whole shuffled again (seed 42) with
/// `mix_datasets`.
pub fn combine(orders: &[Vec<usize>], mix_datasets: bool) -> Vec<(usize, usize)> {
    let combined: Vec<(usize, usize)> = orders
        .iter()
        .enumerate()
        .flat_map(|(d, order)| order.iter().map(move |&i| (d, i)))
        .collect();
    if !mix_datasets {
        return combined;
    }
    permutation(combined.len(), SEED)
        .into_iter()
        .map(|i| combined[i])
        .collect()
}

/// How many documents of `order` `max_tokens` keeps (§3.7, check 14); `len(i)` is the
/// token count of document `i`.
pub fn prune_to_max_tokens(len: impl Fn(usize) -> u64, order: &[usize], max_tokens: u64) -> usize {
    let mut total = 0u64;
    for (kept, &i) in order.iter().enumerate() {
        total += len(i);
        if total > max_tokens {
            return kept;
        }
    }
    order.len()
}

/// The hash of everything that determines the built dataset: the tokenizer, the resolved
/// token settings, the packing and split settings, and each dataset's options and file
/// contents (in order). Paths themselves are not hashed: moving data keeps its cache.
pub fn cache_key(
    cfg: &LoadedConfig,
    tok: &Tokenizer,
    settings: &TokenSettings,
    files: &[Vec<PathBuf>],
) -> Result<CacheKey> {
    let c = &cfg.config;
    let mut k = KeyBuilder::new();
    k.field("tokenizer", tok.fingerprint()?.as_bytes())
        .field("token_settings", &serde_json::to_vec(settings)?)
        .field("sequence_len", &(cfg.sequence_len() as u64).to_le_bytes())
        .field(
            "max_sequences",
            &c.max_sequences.unwrap_or(-1).to_le_bytes(),
        )
        .field("drop_tails", &[c.drop_tails as u8])
        .field("mix_datasets", &[c.mix_datasets as u8])
        .field("eval_fraction", &c.eval_fraction.to_bits().to_le_bytes());
    for (d, files) in c.datasets.iter().zip(files) {
        k.field("control_class", &d.control_class.to_le_bytes())
            .field(
                "max_tokens",
                &d.max_tokens.map_or(-1i128, i128::from).to_le_bytes(),
            )
            .field("files", &(files.len() as u64).to_le_bytes());
        for f in files {
            let ext = f.extension().and_then(|e| e.to_str()).unwrap_or("");
            k.field("format", ext.to_ascii_lowercase().as_bytes());
            k.file(f)?;
        }
    }
    Ok(k.finish())
}
