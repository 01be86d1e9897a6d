//! Full fine-tune weights as Hugging Face writes them (spec §9.6 "FFT"): the bf16 state dict
//! under HF names, one `model.safetensors` when it fits in the shard limit, otherwise
//! `model-0000k-of-0000n.safetensors` shards of at most the limit plus
//! `model.safetensors.index.json` (`metadata.total_size`, `weight_map`). Shards are filled
//! as `transformers`' `max_shard_size` does: tensors in order, a new shard when the next
//! tensor would overflow the current one; a tensor larger than the limit gets a shard of
//! its own. The caller writes into a temporary folder and renames it (atomic epochs).
use crate::HostTensor;
use anyhow::{Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// HF's default `max_shard_size="5GB"` (decimal gigabytes, as `transformers` counts).
pub const SHARD_LIMIT: u64 = 5_000_000_000;

/// The single-file name and the index name.
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenWeights {
    /// File names in order.
    pub files: Vec<String>,
    /// Bytes of tensor data (the index's `metadata.total_size`).
    pub total_size: u64,
}

/// Groups `(name, bytes)` into shards of at most `limit` bytes, in order.
pub fn plan_shards(sizes: &[(String, u64)], limit: u64) -> Vec<Vec<String>> {
    let mut shards: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut used = 0u64;
    for (name, bytes) in sizes {
        if !current.is_empty() && used + bytes > limit {
            shards.push(std::mem::take(&mut current));
            used = 0;
        }
        current.push(name.clone());
        used += bytes;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// Writes `weights` (rounded to bf16) into `dir` in name order, sharded at `limit` bytes.
/// Each shard's bf16 bytes are built only while that shard is written, so peak memory is
/// one shard beyond the weights themselves.
pub fn write_bf16_weights(
    dir: &Path,
    weights: &HashMap<String, HostTensor>,
    limit: u64,
) -> Result<WrittenWeights> {
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let sizes: Vec<(String, u64)> = names
        .iter()
        .map(|n| ((*n).clone(), 2 * weights[*n].shape().numel() as u64))
        .collect();
    let total_size: u64 = sizes.iter().map(|(_, b)| b).sum();
    let shards = plan_shards(&sizes, limit.max(1));
    let n = shards.len();
    let file_name = |k: usize| {
        if n <= 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        }
    };
    let mut weight_map = BTreeMap::new();
    let mut files = Vec::new();
    for (k, shard) in shards.iter().enumerate() {
        let name = file_name(k);
        let bytes: Vec<(&str, Vec<usize>, Vec<u8>)> = shard
            .iter()
            .map(|t| {
                let w = &weights[t];
                let b: Vec<u8> = w
                    .as_f32()
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect();
                (t.as_str(), w.shape().dims().to_vec(), b)
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(t, s, b)| Ok((*t, TensorView::new(Dtype::BF16, s.clone(), b)?)))
            .collect::<Result<Vec<_>>>()?;
        // transformers refuses files without `format` metadata in some paths; it writes "pt".
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let path = dir.join(&name);
        safetensors::tensor::serialize_to_file(views, Some(metadata), &path)
            .with_context(|| format!("cannot write `{}`", path.display()))?;
        for t in shard {
            weight_map.insert(t.clone(), name.clone());
        }
        files.push(name);
    }
    if n > 1 {
        let index = serde_json::json!({
            "metadata": { "total_size": total_size },
            "weight_map": weight_map,
        });
        let path = dir.join(INDEX_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&index)? + "\n")
            .with_context(|| format!("cannot write `{}`", path.display()))?;
        files.push(INDEX_FILE.to_string());
    }
    Ok(WrittenWeights { files, total_size })
}

/// A loadable HF model folder in `dir`: the weights (see [`write_bf16_weights`]) plus the
/// base model's `*.json` files (config, tokenizer, generation config), `tokenizer.model` and
/// `chat_template.jinja`. The base model's own weights index is *not* copied: it would name
/// the base model's shards (spec §14.3 — the reference's copy overwrites the fresh index).
pub fn write_full_model(
    dir: &Path,
    base_model_dir: &Path,
    weights: &HashMap<String, HostTensor>,
    limit: u64,
) -> Result<WrittenWeights> {
    let written = write_bf16_weights(dir, weights, limit)?;
    let entries = std::fs::read_dir(base_model_dir)
        .with_context(|| format!("cannot list `{}`", base_model_dir.display()))?;
    for entry in entries {
        let p = entry?.path();
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let copy = (name.ends_with(".json") && !name.starts_with("model.safetensors"))
            || name == "tokenizer.model"
            || name == "chat_template.jinja";
        if copy && p.is_file() {
            std::fs::copy(&p, dir.join(&name))
                .with_context(|| format!("cannot copy `{}`", p.display()))?;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(v: &[u64]) -> Vec<(String, u64)> {
        v.iter()
            .enumerate()
            .map(|(i, b)| (format!("t{i}"), *b))
            .collect()
    }

    #[test]
    fn shards_fill_in_order_and_never_exceed_the_limit_unless_one_tensor_does() {
        let s = plan_shards(&sizes(&[40, 40, 30, 90, 200, 10]), 100);
        assert_eq!(
            s,
            vec![
                vec!["t0", "t1"],
                vec!["t2"],
                vec!["t3"],
                vec!["t4"],
                vec!["t5"]
            ]
        );
        assert_eq!(
            plan_shards(&sizes(&[10, 20, 30]), 100),
            vec![vec!["t0", "t1", "t2"]]
        );
        assert!(plan_shards(&[], 100).is_empty());
    }
}
