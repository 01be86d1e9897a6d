//! HF checkpoints on disk: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`; memory-mapped, converted to the compute dtype on load.
//! Only the tensors asked for are read, so a pipeline stage touches only its own (spec §5.2).
use crate::HostTensor;
use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use qplc_compiler::Graph;
use qplc_ops::{Op, Shape, TensorType};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Checkpoints of multimodal wrappers (Mistral-3) prefix the text model's names; spec §5.2.
const STRIPPED_PREFIX: &str = "language_model.";

/// The head and the table it is tied to (spec §5.4; upstream issue #30: tied checkpoints
/// such as Llama-3.2-3B have no `lm_head.weight`).
const HEAD: &str = "lm_head.weight";
const EMBEDDING: &str = "model.embed_tokens.weight";

/// Where one stored tensor lives and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The name as stored in the file (before the `language_model.` prefix is stripped).
    pub stored_name: String,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub file: PathBuf,
}

struct Entry {
    file: usize,
    stored_name: String,
    shape: Vec<usize>,
    dtype: Dtype,
    /// Byte range of the tensor's data inside the file's memory map.
    bytes: Range<usize>,
}

pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name (prefix stripped) → where it is. Headers are parsed once, at `open`.
    index: BTreeMap<String, Entry>,
    tied: bool,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors.index.json` (and every shard it names) or, without an
    /// index, `dir/model.safetensors`. Head/embedding tying is taken from `dir/config.json`'s
    /// `tie_word_embeddings` when that file exists; see [`Checkpoint::set_tied_embeddings`].
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        if !dir.is_dir() {
            bail!("model folder `{}` does not exist", dir.display());
        }
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let file_names: Vec<PathBuf> = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("cannot read `{}`", index_path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("`{}` is not valid JSON", index_path.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| {
                    format!("`{}` has no `weight_map` object", index_path.display())
                })?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.is_file() {
            vec![single]
        } else {
            bail!(
                "`{}` has neither model.safetensors nor model.safetensors.index.json \
                 (qplc reads HF safetensors checkpoints)",
                dir.display()
            );
        };
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for (i, path) in file_names.into_iter().enumerate() {
            let f = File::open(&path).with_context(|| {
                format!(
                    "cannot open shard `{}` (named by model.safetensors.index.json)",
                    path.display()
                )
            })?;
            // Safety: the file is opened read-only and qplc never writes to model folders
            // while it runs; a concurrent external writer is outside what we support.
            let mmap = unsafe { Mmap::map(&f) }
                .with_context(|| format!("cannot memory-map `{}`", path.display()))?;
            let st = SafeTensors::deserialize(&mmap)
                .with_context(|| format!("`{}` is not a valid safetensors file", path.display()))?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let key = name.strip_prefix(STRIPPED_PREFIX).unwrap_or(&name);
                let start = view.data().as_ptr() as usize - base;
                index.insert(
                    key.to_string(),
                    Entry {
                        file: i,
                        shape: view.shape().to_vec(),
                        dtype: view.dtype(),
                        bytes: start..start + view.data().len(),
                        stored_name: name,
                    },
                );
            }
            files.push((path, mmap));
        }
        let tied = read_tie_word_embeddings(&dir.join("config.json"))?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            index,
            tied,
        })
    }

    /// Declares whether the LM head is tied to the token embedding (architectures that force
    /// tying, like Gemma-2 and Cohere, say so without `tie_word_embeddings`). When tied and the
    /// checkpoint has no `lm_head.weight`, loading it reads `model.embed_tokens.weight`.
    pub fn set_tied_embeddings(&mut self, tied: bool) {
        self.tied = tied;
    }

    pub fn tied_embeddings(&self) -> bool {
        self.tied
    }

    /// Tensor names, with the `language_model.` prefix stripped, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Shape, stored dtype and file of `name`, without reading its data.
    pub fn info(&self, name: &str) -> Option<TensorInfo> {
        let e = self.index.get(name)?;
        Some(TensorInfo {
            stored_name: e.stored_name.clone(),
            shape: e.shape.clone(),
            dtype: e.dtype,
            file: self.files[e.file].0.clone(),
        })
    }

    /// The name actually read for `name`: itself, or the embedding for a tied head the
    /// checkpoint does not store.
    fn resolve<'a>(&self, name: &'a str) -> &'a str {
        if name == HEAD && self.tied && !self.contains(HEAD) && self.contains(EMBEDDING) {
            EMBEDDING
        } else {
            name
        }
    }

    /// Loads `name` as `want` (shape must match; stored f32/bf16/f16 converted to the
    /// wanted float dtype, rounding where it is narrower).
    pub fn load(&self, name: &str, want: &TensorType) -> Result<HostTensor> {
        let resolved = self.resolve(name);
        let Some(e) = self.index.get(resolved) else {
            bail!("{}", self.missing_message(name, want));
        };
        let path = &self.files[e.file].0;
        let read_as = if resolved == name {
            String::new()
        } else {
            format!(" (read as `{resolved}`: the head is tied to the embedding)")
        };
        if e.shape != want.shape.dims() {
            bail!(
                "tensor `{name}`{read_as} in `{}` has shape {}, but the model expects {}",
                path.display(),
                Shape::from(e.shape.clone()),
                want.shape
            );
        }
        if !want.dtype.is_float() {
            bail!(
                "tensor `{name}`: loading into {} is not supported (weights are floats)",
                want.dtype
            );
        }
        let data = &self.files[e.file].1[e.bytes.clone()];
        let values: Vec<f32> = match e.dtype {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => bail!(
                "tensor `{name}` in `{}` is stored as {other:?}; qplc reads F32, BF16 and F16 \
                 (quantised checkpoints must be dequantised first)",
                path.display()
            ),
        };
        Ok(HostTensor::f32(want.shape.clone(), values).cast(want.dtype))
    }

    fn missing_message(&self, name: &str, want: &TensorType) -> String {
        let files: Vec<String> = self
            .files
            .iter()
            .map(|(p, _)| p.file_name().unwrap_or_default().to_string_lossy().into())
            .collect();
        let mut msg = format!(
            "tensor `{name}` (expected {want}) is not in the checkpoint `{}` (searched {})",
            self.dir.display(),
            files.join(", ")
        );
        if name == HEAD && self.contains(EMBEDDING) {
            msg.push_str(&format!(
                "; the checkpoint has `{EMBEDDING}`: if the model ties its head to the \
                 embedding, set `tie_word_embeddings: true` in config.json"
            ));
        }
        msg
    }

    /// Every `Op::Weight` of `graph`, keyed by its name (a graph for one pipeline stage
    /// holds only that stage's weights, so only those are read).
    pub fn load_graph_weights(&self, graph: &Graph) -> Result<HashMap<String, HostTensor>> {
        let mut out = HashMap::new();
        for (name, id) in graph.weights() {
            if out.contains_key(&name) {
                continue;
            }
            let Op::Weight { ty, .. } = &graph.node(id).op else {
                unreachable!("Graph::weights returns weight nodes")
            };
            out.insert(name.clone(), self.load(&name, ty)?);
        }
        Ok(out)
    }
}

/// `tie_word_embeddings` of config.json; false when the file or the key is absent (the
/// model definition then decides, and the builder aliases the head itself when it ties).
fn read_tie_word_embeddings(path: &Path) -> Result<bool> {
    if !path.is_file() {
        return Ok(false);
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read `{}`", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("`{}` is not valid JSON", path.display()))?;
    Ok(v.get("tie_word_embeddings")
        .and_then(|t| t.as_bool())
        .unwrap_or(false))
}
