//! HF checkpoints on disk: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`; memory-mapped, converted to the compute dtype on load.
use crate::HostTensor;
use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use qplc_compiler::Graph;
use qplc_ops::{Op, TensorType};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Checkpoints of multimodal wrappers (Mistral-3) prefix the text model's names; spec §5.2.
const STRIPPED_PREFIX: &str = "language_model.";

pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name (prefix stripped) → (file index, name as stored).
    index: BTreeMap<String, (usize, String)>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint> {
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
                "`{}` has neither model.safetensors nor model.safetensors.index.json",
                dir.display()
            );
        };
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for (i, path) in file_names.into_iter().enumerate() {
            let f = File::open(&path)
                .with_context(|| format!("cannot open shard `{}`", path.display()))?;
            // Safety: the file is opened read-only and qplc never writes to model folders
            // while it runs; a concurrent external writer is outside what we support.
            let mmap = unsafe { Mmap::map(&f) }
                .with_context(|| format!("cannot memory-map `{}`", path.display()))?;
            let st = SafeTensors::deserialize(&mmap)
                .with_context(|| format!("`{}` is not a valid safetensors file", path.display()))?;
            for name in st.names() {
                let key = name.strip_prefix(STRIPPED_PREFIX).unwrap_or(name);
                index.insert(key.to_string(), (i, name.to_string()));
            }
            files.push((path, mmap));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Loads `name` as `want` (shape must match; stored f32/bf16/f16 converted to the
    /// wanted float dtype, rounding where it is narrower).
    pub fn load(&self, name: &str, want: &TensorType) -> Result<HostTensor> {
        let Some((fi, stored)) = self.index.get(name) else {
            let files: Vec<String> = self
                .files
                .iter()
                .map(|(p, _)| p.file_name().unwrap_or_default().to_string_lossy().into())
                .collect();
            bail!(
                "tensor `{name}` (expected {want}) is not in the checkpoint `{}` (searched {})",
                self.dir.display(),
                files.join(", ")
            );
        };
        let (path, mmap) = &self.files[*fi];
        let st = SafeTensors::deserialize(mmap)?;
        let view = st.tensor(stored)?;
        if view.shape() != want.shape.dims() {
            bail!(
                "tensor `{name}` in `{}` has shape {:?}, but the model expects {}",
                path.display(),
                view.shape(),
                want.shape
            );
        }
        if !want.dtype.is_float() {
            bail!(
                "tensor `{name}`: loading into {} is not supported",
                want.dtype
            );
        }
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
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
                "tensor `{name}` in `{}` is stored as {other:?}; qplc reads F32, BF16 and F16",
                path.display()
            ),
        };
        Ok(HostTensor::f32(want.shape.clone(), values).cast(want.dtype))
    }

    /// Every `Op::Weight` of `graph`, keyed by its name.
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
