//! Partitioning the pipeline layer list across stages, exactly as spec §5.6 (DeepSpeed's
//! `PipelineModule._partition_layers` with `partition_uniform` / `partition_balanced`).
use qplc_compiler::{Graph, LayerList, Partition};
use regex::{Regex, RegexBuilder};
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error(
        "partition_method = \"{0}\" is not supported; accepted: \"uniform\", \"parameters\" \
         or \"type:<regex>\" (e.g. \"type:decoderlayer\"; matched case-insensitively against \
         PrepareInputsPipe, EmbeddingPipe, DecoderLayerPipe, NormPipe, LmHeadPipe, LossPipe)"
    )]
    UnknownMethod(String),
    #[error("partition_method = \"{method}\": the regex `{pattern}` is invalid: {source}")]
    BadRegex {
        method: String,
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("pipeline_stages must be at least 1")]
    NoStages,
    #[error(
        "node %{id} (`{module}`, block {block}) is not on the pipeline layer list (a decoder \
         node needs a layer index below {layers}); the pass that made it must set block/layer"
    )]
    Unplaced {
        id: usize,
        module: String,
        block: String,
        layers: usize,
    },
}

/// A parsed `partition_method`.
#[derive(Clone, Debug)]
pub enum PartitionMethod {
    /// Equal layer counts.
    Uniform,
    /// Balance trainable parameters.
    Parameters,
    /// Balance the count of layers whose class name matches (case-insensitive search).
    Type { pattern: String, regex: Regex },
}

impl PartitionMethod {
    /// Parses as the reference does: the whole string is lower-cased first (so a regex
    /// escape like `\S` becomes `\s`, as in DeepSpeed), and for `type:` only the text
    /// between the first and second `:` is the pattern (`method.split(':')[1]`).
    pub fn parse(method: &str) -> Result<Self, PartitionError> {
        let lower = method.to_lowercase();
        match lower.as_str() {
            "uniform" => Ok(PartitionMethod::Uniform),
            "parameters" => Ok(PartitionMethod::Parameters),
            m if m.starts_with("type:") => {
                let pattern = m.split(':').nth(1).unwrap_or("").to_string();
                let regex = RegexBuilder::new(&pattern)
                    .case_insensitive(true)
                    .build()
                    .map_err(|source| PartitionError::BadRegex {
                        method: method.to_string(),
                        pattern: pattern.clone(),
                        source,
                    })?;
                Ok(PartitionMethod::Type { pattern, regex })
            }
            _ => Err(PartitionError::UnknownMethod(method.to_string())),
        }
    }
}

impl fmt::Display for PartitionMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionMethod::Uniform => f.write_str("uniform"),
            PartitionMethod::Parameters => f.write_str("parameters"),
            PartitionMethod::Type { pattern, .. } => write!(f, "type:{pattern}"),
        }
    }
}

/// DeepSpeed's `partition_uniform`: with `q = ⌊n/parts⌋` and `rem = n − q·parts` the first
/// `rem` parts get `q + 1` items; with `n ≤ parts`, part `p` starts at `min(p, n)` (the
/// trailing parts are empty). Returns `parts + 1` boundaries.
pub fn partition_uniform(n: usize, parts: usize) -> Vec<usize> {
    if n <= parts {
        return (0..=parts).map(|p| p.min(n)).collect();
    }
    let q = n / parts;
    let rem = n - q * parts;
    (0..=parts).map(|p| p * q + p.min(rem)).collect()
}

/// DeepSpeed's `partition_balanced`: contiguous non-empty parts minimising
/// (heaviest − lightest), by dynamic programming over prefix sums; among equal costs the
/// latest split point wins (the reference compares with `>=`). `n ≤ parts` falls back to
/// [`partition_uniform`]. O(n²·parts), trivial for `L + 5` layers.
pub fn partition_balanced(weights: &[u64], parts: usize) -> Vec<usize> {
    let n = weights.len();
    if n <= parts {
        return partition_uniform(n, parts);
    }
    let mut prefix = vec![0u128; n + 1];
    for (i, &w) in weights.iter().enumerate() {
        prefix[i + 1] = prefix[i] + w as u128;
    }
    // best[i][j] = (cost, max, min) of splitting the first i items into j parts.
    #[derive(Clone, Copy)]
    struct Cell {
        cost: u128,
        max: u128,
        min: u128,
    }
    let mut best: Vec<Vec<Option<Cell>>> = vec![vec![None; parts + 1]; n + 1];
    let mut split = vec![vec![0usize; parts + 1]; n + 1];
    for i in 1..=n {
        for j in 1..=parts.min(i) {
            for k in 0..i {
                let part = prefix[i] - prefix[k];
                // The reference's dp_max[0,0] = 0 and dp_min[0,0] = ∞: the empty prefix
                // does not constrain the minimum.
                let (max, min) = if j == 1 {
                    if k != 0 {
                        continue;
                    }
                    (part, part)
                } else {
                    let Some(prev) = best[k][j - 1] else { continue };
                    (prev.max.max(part), prev.min.min(part))
                };
                let cost = max - min;
                if best[i][j].is_none_or(|c| c.cost >= cost) {
                    best[i][j] = Some(Cell { cost, max, min });
                    split[i][j] = k;
                }
            }
        }
    }
    let mut bounds = vec![n];
    for j in (1..=parts).rev() {
        let last = *bounds.last().expect("non-empty");
        bounds.push(split[last][j]);
    }
    bounds.reverse();
    bounds
}

/// The weight of each layer-list entry under a method, and remarks for the report.
pub fn layer_weights(
    method: &PartitionMethod,
    list: &LayerList,
    graph: &Graph,
) -> (Vec<u64>, Vec<String>) {
    match method {
        PartitionMethod::Uniform => (vec![1; list.len()], Vec::new()),
        PartitionMethod::Parameters => {
            let trainable = list.params_per_entry(graph, true);
            if trainable.iter().any(|&w| w > 0) {
                (trainable, Vec::new())
            } else {
                // Before an adapter pass marks anything trainable, every weight counts —
                // as the reference does in CA mode, where adapters do not exist yet at
                // partition time (spec §5.6).
                (
                    list.params_per_entry(graph, false),
                    vec![
                        "partition_method = \"parameters\": no parameter is trainable yet, \
                         so all parameters were balanced"
                            .to_string(),
                    ],
                )
            }
        }
        PartitionMethod::Type { regex, .. } => (
            list.entries
                .iter()
                .map(|e| u64::from(regex.is_match(e.class())))
                .collect(),
            Vec::new(),
        ),
    }
}

/// Splits the `L + 5` layer list into `stages` contiguous parts and maps every node to the
/// stage of its layer. `num_layers` is the model's decoder layer count (from `ModelInfo`);
/// `None` infers it from the graph.
pub fn partition(
    graph: &Graph,
    method: &str,
    stages: usize,
    num_layers: Option<usize>,
) -> Result<Partition, PartitionError> {
    if stages == 0 {
        return Err(PartitionError::NoStages);
    }
    let parsed = PartitionMethod::parse(method)?;
    let list = num_layers.map_or_else(|| LayerList::of_graph(graph), LayerList::new);
    let (weights, notes) = layer_weights(&parsed, &list, graph);
    let boundaries = match parsed {
        PartitionMethod::Uniform => partition_uniform(list.len(), stages),
        _ => partition_balanced(&weights, stages),
    };
    let mut p = Partition {
        method: method.to_string(),
        layers: list,
        layer_weights: weights,
        boundaries,
        node_stage: BTreeMap::new(),
        notes,
    };
    for id in graph.g.node_indices() {
        let n = graph.node(id);
        let stage = p
            .layers
            .entry_of(n)
            .and_then(|e| p.stage_of_layer(e))
            .ok_or_else(|| PartitionError::Unplaced {
                id: id.index(),
                module: n.module.clone(),
                block: n.block.pipe_class().to_string(),
                layers: p.layers.num_decoder_layers,
            })?;
        p.node_stage.insert(id, stage);
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_37_layers_on_4_stages_gives_the_reference_boundaries() {
        // spec §16 check 22
        assert_eq!(partition_uniform(37, 4), [0, 10, 19, 28, 37]);
        assert_eq!(partition_uniform(37, 3), [0, 13, 25, 37]);
    }

    #[test]
    fn uniform_with_fewer_layers_than_stages_leaves_trailing_stages_empty() {
        assert_eq!(partition_uniform(2, 4), [0, 1, 2, 2, 2]);
        assert_eq!(partition_balanced(&[5, 5], 4), [0, 1, 2, 2, 2]);
    }

    #[test]
    fn type_decoderlayer_balances_decoder_layers_within_one() {
        // spec §16 check 22, for several model depths and stage counts.
        for l in [1usize, 2, 7, 16, 22, 32, 33, 40, 80] {
            let list = LayerList::new(l);
            let m = PartitionMethod::parse("type:decoderlayer").unwrap();
            let (w, _) = layer_weights(&m, &list, &Graph::new());
            assert_eq!(w.iter().sum::<u64>(), l as u64);
            for pp in 1..=8usize {
                if pp > l {
                    continue;
                }
                let b = partition_balanced(&w, pp);
                assert_eq!(b.len(), pp + 1);
                assert_eq!((b[0], b[pp]), (0, l + 5));
                let counts: Vec<u64> = (0..pp).map(|s| w[b[s]..b[s + 1]].iter().sum()).collect();
                let (max, min) = (counts.iter().max().unwrap(), counts.iter().min().unwrap());
                assert!(max - min <= 1, "L={l} PP={pp}: {counts:?} from {b:?}");
            }
        }
    }

    #[test]
    fn balanced_partition_minimises_spread_and_prefers_latest_split_on_ties() {
        // 1,1,1,1 into 2: only [0,2,4] has spread 0.
        assert_eq!(partition_balanced(&[1, 1, 1, 1], 2), [0, 2, 4]);
        // 0,1,1 into 2: splits at 1 and 2 give spreads 2 and 0 → split at 2.
        assert_eq!(partition_balanced(&[0, 1, 1], 2), [0, 2, 3]);
        // 1,0,0,1 into 2: splits at 1, 2, 3 all have spread 0; the latest (3) wins.
        assert_eq!(partition_balanced(&[1, 0, 0, 1], 2), [0, 3, 4]);
        // A heavy layer alone.
        assert_eq!(partition_balanced(&[1, 10, 1, 1, 1], 3), [0, 1, 2, 5]);
    }

    #[test]
    fn balanced_partition_matches_exhaustive_search() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let n = 2 + (next() % 7) as usize;
            let parts = 1 + (next() % n as u64) as usize;
            let w: Vec<u64> = (0..n).map(|_| next() % 5).collect();
            let got = partition_balanced(&w, parts);
            let spread = |b: &[usize]| {
                let s: Vec<u64> = b.windows(2).map(|x| w[x[0]..x[1]].iter().sum()).collect();
                s.iter().max().unwrap() - s.iter().min().unwrap()
            };
            // Enumerate all boundary sets with non-empty parts.
            let mut best = u64::MAX;
            let mut stack = vec![vec![0usize]];
            while let Some(b) = stack.pop() {
                if b.len() == parts {
                    let mut full = b.clone();
                    full.push(n);
                    if full[parts - 1] < n {
                        best = best.min(spread(&full));
                    }
                    continue;
                }
                for k in b.last().unwrap() + 1..n {
                    let mut nb = b.clone();
                    nb.push(k);
                    stack.push(nb);
                }
            }
            assert_eq!(spread(&got), best, "{w:?} into {parts}: {got:?}");
        }
    }

    #[test]
    fn method_is_lowercased_and_text_after_a_second_colon_is_lost() {
        let m = PartitionMethod::parse("TYPE:DecoderLayer:ignored").unwrap();
        let PartitionMethod::Type { pattern, regex } = &m else {
            panic!("{m:?}")
        };
        assert_eq!(pattern, "decoderlayer");
        assert!(regex.is_match("DecoderLayerPipe"));
        assert!(!regex.is_match("EmbeddingPipe"));
        assert!(matches!(
            PartitionMethod::parse("Uniform").unwrap(),
            PartitionMethod::Uniform
        ));
    }

    #[test]
    fn unknown_method_lists_the_accepted_forms() {
        let e = PartitionMethod::parse("profile").unwrap_err().to_string();
        assert!(
            e.contains("\"uniform\", \"parameters\" or \"type:<regex>\""),
            "{e}"
        );
        let e = PartitionMethod::parse("type:(").unwrap_err().to_string();
        assert!(e.contains("invalid"), "{e}");
    }
}
