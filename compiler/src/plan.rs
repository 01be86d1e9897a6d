//! The plan: everything `qplc compile` decided, serialised as `plan.json`, so that `qplc run`
//! executes without deciding anything (DESIGN "The flow", step 3). The types here are data
//! only; the passes crate computes them (partition, schedule, memory plan, report).
use crate::graph::{BlockKind, Graph, NodeId};
use qplc_ops::DType;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Bumped whenever a field changes meaning, so an old `plan.json` is refused, not misread.
pub const PLAN_FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read plan `{path}`: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write plan `{path}`: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("plan `{path}` is not valid plan JSON: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot serialise the plan: {0}")]
    Serialise(#[source] serde_json::Error),
    #[error(
        "plan `{path}` has format version {found}, this qplc reads version {expected}; \
         run `qplc compile` again"
    )]
    Version {
        path: String,
        found: u32,
        expected: u32,
    },
}

/// One entry of the reference's pipeline layer list (spec §5.3): `PrepareInputs`,
/// `Embedding`, `DecoderLayer`×L, `Norm`, `LmHead`, `Loss` — always `L + 5` entries, the
/// `Loss` entry included even before the loss pass has added nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerEntry {
    /// Position in the list; also the DeepSpeed checkpoint file index (`layer_NN-…`).
    pub index: usize,
    pub block: BlockKind,
    /// Decoder layer number for `DecoderLayer` entries.
    pub layer: Option<usize>,
}

impl LayerEntry {
    /// The reference's class name (`DecoderLayerPipe`, …), which `type:<regex>` matches.
    pub fn class(&self) -> &'static str {
        self.block.pipe_class()
    }

    /// Short human name: `Embedding`, `DecoderLayer 3`, `Loss`.
    pub fn label(&self) -> String {
        let class = self.class().trim_end_matches("Pipe");
        match self.layer {
            Some(i) => format!("{class} {i}"),
            None => class.to_string(),
        }
    }
}

/// The `L + 5` pipeline layers of spec §5.3 for a model with `L` decoder layers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerList {
    pub num_decoder_layers: usize,
    pub entries: Vec<LayerEntry>,
}

impl LayerList {
    pub fn new(num_decoder_layers: usize) -> Self {
        let l = num_decoder_layers;
        let mut kinds: Vec<(BlockKind, Option<usize>)> =
            vec![(BlockKind::Inputs, None), (BlockKind::Embedding, None)];
        kinds.extend((0..l).map(|i| (BlockKind::Decoder, Some(i))));
        kinds.extend([
            (BlockKind::Norm, None),
            (BlockKind::Head, None),
            (BlockKind::Loss, None),
        ]);
        let entries = kinds
            .into_iter()
            .enumerate()
            .map(|(index, (block, layer))| LayerEntry {
                index,
                block,
                layer,
            })
            .collect();
        LayerList {
            num_decoder_layers: l,
            entries,
        }
    }

    /// The layer list of a graph: `L` is one more than the highest decoder layer index
    /// any node carries (0 when the graph has no decoder nodes).
    pub fn of_graph(graph: &Graph) -> Self {
        let l = graph
            .g
            .node_weights()
            .filter(|n| n.block == BlockKind::Decoder)
            .filter_map(|n| n.layer)
            .max()
            .map_or(0, |m| m + 1);
        LayerList::new(l)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Index of the entry a node belongs to.
    pub fn entry_of(&self, node: &crate::graph::Node) -> Option<usize> {
        self.index_of(node.block, node.layer)
    }

    /// Entries that read a node's value, ascending; a node nobody reads belongs to its own
    /// entry only. A tied embedding (read by `Embedding` and `LmHead`) is in both: each
    /// pipeline layer that reads a weight holds it, as the reference's tied layer does
    /// (spec §5.4).
    pub fn entries_reading(&self, graph: &Graph, id: NodeId) -> Vec<usize> {
        let mut e: Vec<usize> = graph
            .users(id)
            .iter()
            .filter_map(|&u| self.entry_of(graph.node(u)))
            .collect();
        if e.is_empty() {
            e.extend(self.entry_of(graph.node(id)));
        }
        e.sort_unstable();
        e.dedup();
        e
    }

    /// Parameters held by each entry (weights counted in every entry that reads them);
    /// with `trainable_only`, only weights marked trainable.
    pub fn params_per_entry(&self, graph: &Graph, trainable_only: bool) -> Vec<u64> {
        let mut out = vec![0u64; self.len()];
        for (_, id) in graph.weights() {
            let n = graph.node(id);
            if trainable_only && !n.trainable {
                continue;
            }
            for e in self.entries_reading(graph, id) {
                out[e] += n.ty.shape.numel() as u64;
            }
        }
        out
    }

    /// Index in the list of a node's `(block, layer)`: decoder `i` is `i + 2`, as the
    /// reference's checkpoint files number it (spec §5.3, check 21). `None` for a decoder
    /// node without a layer index or with one beyond `L`.
    pub fn index_of(&self, block: BlockKind, layer: Option<usize>) -> Option<usize> {
        let l = self.num_decoder_layers;
        Some(match block {
            BlockKind::Inputs => 0,
            BlockKind::Embedding => 1,
            BlockKind::Decoder => {
                let i = layer?;
                if i >= l {
                    return None;
                }
                i + 2
            }
            BlockKind::Norm => l + 2,
            BlockKind::Head => l + 3,
            BlockKind::Loss => l + 4,
        })
    }
}

/// Stage boundaries over the layer list (spec §5.6) and the stage of every graph node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Partition {
    /// The `partition_method` as configured (`uniform`, `parameters`, `type:<regex>`).
    pub method: String,
    pub layers: LayerList,
    /// Weight of each layer-list entry that the balanced partition used (1 per entry for
    /// `uniform`).
    pub layer_weights: Vec<u64>,
    /// `stages + 1` ascending indices into the layer list; stage `s` holds entries
    /// `boundaries[s]..boundaries[s+1]`.
    pub boundaries: Vec<usize>,
    /// The stage that executes each node (weights: the stage of their own block; a weight
    /// read on several stages is also listed in each stage's `weights`).
    pub node_stage: BTreeMap<NodeId, usize>,
    /// Remarks for the report (e.g. "no trainable parameters yet, counted all").
    #[serde(default)]
    pub notes: Vec<String>,
}

impl Partition {
    pub fn num_stages(&self) -> usize {
        self.boundaries.len().saturating_sub(1)
    }

    /// The stage holding layer-list entry `index`.
    pub fn stage_of_layer(&self, index: usize) -> Option<usize> {
        (0..self.num_stages())
            .find(|&s| self.boundaries[s] <= index && index < self.boundaries[s + 1])
    }

    pub fn stage_of(&self, node: NodeId) -> Option<usize> {
        self.node_stage.get(&node).copied()
    }

    /// Layer-list entries `[start, end)` of a stage.
    pub fn layer_range(&self, stage: usize) -> std::ops::Range<usize> {
        self.boundaries[stage]..self.boundaries[stage + 1]
    }
}

/// One activation's place in a stage's arena.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferAssignment {
    pub node: NodeId,
    /// Byte offset in the stage's activation arena (a multiple of the plan's alignment).
    pub offset: u64,
    /// Bytes reserved (the tensor's size rounded up to the alignment).
    pub size: u64,
    /// First step (index into `StagePlan::order`) at which the buffer holds data; values
    /// that arrive from outside the stage (inputs, received activations) start at 0.
    pub first_step: usize,
    /// Last step that reads it (inclusive); `order.len()` for values still needed after
    /// the stage finishes (graph outputs, activations sent to a later stage).
    pub last_step: usize,
}

/// Execution order and memory plan of one pipeline stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StagePlan {
    pub stage: usize,
    /// Layer-list entries `[start, end)` the stage holds.
    pub layers: (usize, usize),
    /// Graph inputs (`Op::Input`) the stage reads.
    pub inputs: Vec<NodeId>,
    /// Weights the stage reads (a tied weight read on two stages is on both).
    pub weights: Vec<NodeId>,
    /// Activations computed on an earlier stage that this stage reads.
    pub receives: Vec<NodeId>,
    /// Values computed here that a later stage reads or that are graph outputs.
    pub sends: Vec<NodeId>,
    /// The ops to execute, in order (a topological order of the stage's non-leaf nodes;
    /// `Fill` nodes are computed, so they appear here too).
    pub order: Vec<NodeId>,
    /// Buffers of every activation the stage holds: inputs, received values and the
    /// results of `order`.
    pub buffers: Vec<BufferAssignment>,
    /// Size of the activation arena: the predicted peak activation bytes.
    pub arena_bytes: u64,
    /// Bytes of the weights in `weights`, each in its own dtype.
    pub weight_bytes: u64,
    /// Parameters (elements) of the weights in `weights`.
    pub params: u64,
    pub trainable_params: u64,
    /// FLOPs of one execution of `order`.
    pub flops: u64,
}

/// Per-stage figures of the compile report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    pub stage: usize,
    /// Layer-list entries `[start, end)`.
    pub layers: (usize, usize),
    /// `Embedding … DecoderLayer 9`.
    pub layer_names: String,
    pub params: u64,
    pub trainable_params: u64,
    pub weight_bytes: u64,
    pub activation_bytes: u64,
    pub flops: u64,
    /// Peak of live activation bytes when values are allocated as written and freed after
    /// their last reader, in the executor's order (what `RunStats::peak_activation_bytes`
    /// measures; `activation_bytes` is the aligned arena, at least this).
    #[serde(default)]
    pub peak_live_bytes: u64,
    /// Gradient buffers of the trainable weights (parameter dtype, spec §3.4).
    #[serde(default)]
    pub grad_bytes: u64,
    /// Adam state: m and v, plus the Kahan buffer of bf16/f16 parameters (parameter dtype).
    #[serde(default)]
    pub optimizer_bytes: u64,
    /// What the device holds at its peak: weights + grads + optimizer state + live
    /// activations.
    #[serde(default)]
    pub device_bytes: u64,
    /// Kept layer inputs planned in pinned host memory (`activation_offload`).
    #[serde(default)]
    pub offloaded_bytes: u64,
}

/// What `qplc compile` prints and stores: sizes, FLOPs and predicted memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompileReport {
    pub seq_len: usize,
    /// Parameters of all weights (each tensor once).
    pub total_params: u64,
    pub trainable_params: u64,
    /// FLOPs of one execution of the graph at `seq_len` (one forward until autodiff runs).
    pub flops: u64,
    pub partition_method: String,
    pub stages: Vec<StageReport>,
    /// Sum over stages (a tied weight on two stages is counted twice: both hold a copy).
    pub total_weight_bytes: u64,
    pub total_activation_bytes: u64,
    /// Sum of the stages' `device_bytes`.
    #[serde(default)]
    pub total_device_bytes: u64,
    pub notes: Vec<String>,
}

/// The configuration the plan came from. The config type belongs to another module and
/// changes faster than the plan format, so the plan keeps its TOML text and a resolved
/// summary as plain JSON.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PlanConfig {
    /// The config file as written (empty when compiled without one, e.g. in tests).
    pub toml: String,
    /// The resolved settings (defaults applied), as JSON.
    pub resolved: serde_json::Value,
}

/// The model the plan trains.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanModel {
    pub arch: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub seq_len: usize,
    pub dtype: DType,
}

impl From<&crate::build::ModelInfo> for PlanModel {
    fn from(m: &crate::build::ModelInfo) -> Self {
        PlanModel {
            arch: m.arch.clone(),
            num_layers: m.num_layers,
            hidden_size: m.hidden_size,
            vocab_size: m.vocab_size,
            seq_len: m.seq_len,
            dtype: m.dtype,
        }
    }
}

/// Everything `qplc run` needs besides the weights and the data.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub format_version: u32,
    pub config: PlanConfig,
    pub model: PlanModel,
    /// The final graph, after every pass.
    pub graph: Graph,
    pub partition: Partition,
    /// One per pipeline stage, in stage order.
    pub stages: Vec<StagePlan>,
    pub report: CompileReport,
}

impl Plan {
    pub fn to_json(&self) -> Result<String, PlanError> {
        serde_json::to_string_pretty(self).map_err(PlanError::Serialise)
    }

    /// Parses a plan, refusing one written by an incompatible qplc. `origin` names the
    /// source in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Plan, PlanError> {
        #[derive(Deserialize)]
        struct Version {
            format_version: u32,
        }
        let parse = |source| PlanError::Parse {
            path: origin.to_string(),
            source,
        };
        let v: Version = serde_json::from_str(text).map_err(parse)?;
        if v.format_version != PLAN_FORMAT_VERSION {
            return Err(PlanError::Version {
                path: origin.to_string(),
                found: v.format_version,
                expected: PLAN_FORMAT_VERSION,
            });
        }
        serde_json::from_str(text).map_err(parse)
    }

    /// Writes `plan.json` (or any path) atomically: a temporary file renamed into place, so
    /// a crash never leaves half a plan.
    pub fn write(&self, path: &Path) -> Result<(), PlanError> {
        let text = self.to_json()?;
        let err = |source| PlanError::Write {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    pub fn read(path: &Path) -> Result<Plan, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Plan::from_json(&text, &path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_list_has_l_plus_5_entries_and_decoder_i_is_index_i_plus_2() {
        // spec §16 check 21
        let list = LayerList::new(32);
        assert_eq!(list.len(), 37);
        for i in 0..32 {
            assert_eq!(list.index_of(BlockKind::Decoder, Some(i)), Some(i + 2));
            assert_eq!(list.entries[i + 2].label(), format!("DecoderLayer {i}"));
        }
        assert_eq!(list.index_of(BlockKind::Inputs, None), Some(0));
        assert_eq!(list.index_of(BlockKind::Loss, None), Some(36));
        assert_eq!(list.entries[36].class(), "LossPipe");
        assert_eq!(list.index_of(BlockKind::Decoder, Some(32)), None);
    }
}
