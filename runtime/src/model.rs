//! A model folder opened for execution: config.json bound to its model definition, the
//! forward graph built for a sequence length, its weights loaded, and a forward function.
//! `qplc score`, `qplc generate`, `qplc inspect` and `qplc compile` all start here.
use crate::checkpoint::Checkpoint;
use crate::executor::{ExecError, Program};
use crate::peft::{read_adapter, Adapter};
use crate::{CpuBackend, HostTensor};
use anyhow::{bail, Context, Result};
use qplc_compiler::{build_forward, load_model_def, BuildOptions, BuiltModel, ModelDef};
use qplc_ops::{DType, Op};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// An HF model folder's config.json and the model definition that reads it.
pub struct ModelDir {
    pub dir: PathBuf,
    pub hf_config: serde_json::Value,
    pub def: ModelDef,
    /// A PEFT LoRA adapter applied on load (`--adapter DIR`).
    pub adapter: Option<Adapter>,
}

impl ModelDir {
    /// Reads `dir/config.json` and picks the model definition by its `model_type`
    /// (or `definition` when given: the TOML key `model_definition`).
    pub fn open(dir: &Path, definition: Option<&Path>) -> Result<ModelDir> {
        if !dir.is_dir() {
            bail!("model folder `{}` does not exist", dir.display());
        }
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read `{}` (an HF model folder needs config.json)",
                path.display()
            )
        })?;
        let hf_config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("`{}` is not valid JSON", path.display()))?;
        let model_type = hf_config.get("model_type").and_then(|v| v.as_str());
        let def = load_model_def(model_type, definition)
            .with_context(|| format!("choosing the model definition for `{}`", dir.display()))?;
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            hf_config,
            def,
            adapter: None,
        })
    }

    /// Applies the PEFT LoRA adapter in `dir` whenever this model is loaded (read now, so
    /// a bad adapter is reported before any work).
    pub fn with_adapter(mut self, dir: &Path) -> Result<ModelDir> {
        self.adapter = Some(read_adapter(dir)?);
        Ok(self)
    }

    /// The forward graph at a fixed sequence length and compute dtype.
    pub fn build(&self, seq_len: usize, dtype: DType) -> Result<BuiltModel> {
        build_forward(&self.def, &self.hf_config, &BuildOptions { seq_len, dtype })
            .with_context(|| format!("building the graph for `{}`", self.dir.display()))
    }

    /// The `max_position_embeddings` of config.json, if present.
    pub fn max_positions(&self) -> Option<usize> {
        self.hf_config
            .get("max_position_embeddings")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
    }
}

/// A built forward graph with its weights in host memory, runnable on the CPU backend.
pub struct LoadedModel {
    pub built: BuiltModel,
    pub weights: HashMap<String, HostTensor>,
    backend: CpuBackend,
}

impl LoadedModel {
    /// Builds the graph for `seq_len` and loads every weight it binds; with an adapter, the
    /// `lora` pass adds its branches and A/B come from the adapter file.
    pub fn load(model: &ModelDir, seq_len: usize, dtype: DType) -> Result<LoadedModel> {
        let mut built = model.build(seq_len, dtype)?;
        let ckpt = Checkpoint::open(&model.dir)?;
        let weights = match &model.adapter {
            None => ckpt.load_graph_weights(&built.graph)?,
            Some(adapter) => {
                // The branch computes in the compute dtype, as PEFT does at inference (it
                // moves adapter weights to the base layer's dtype); the adapter's values are
                // kept exactly (bf16/f16 → f32 is exact).
                let (pass, mut weights) = adapter.lora_pass(&built.graph, Some(dtype))?;
                pass.apply(&mut built.graph)
                    .with_context(|| format!("applying the adapter `{}`", adapter.dir.display()))?;
                built.graph.verify()?;
                for (name, id) in built.graph.weights() {
                    if weights.contains_key(&name) {
                        continue;
                    }
                    let Op::Weight { ty, .. } = &built.graph.node(id).op else {
                        unreachable!("Graph::weights returns weight nodes")
                    };
                    weights.insert(name.clone(), ckpt.load(&name, ty)?);
                }
                weights
            }
        };
        Ok(LoadedModel {
            built,
            weights,
            backend: CpuBackend::new(),
        })
    }

    pub fn seq_len(&self) -> usize {
        self.built.info.seq_len
    }

    /// Runs the graph on exactly `seq_len` token ids at positions 0…T−1 and returns the
    /// requested outputs.
    pub fn run(&self, ids: &[i32], outputs: &[&str]) -> Result<HashMap<String, HostTensor>> {
        let t = self.seq_len();
        if ids.len() != t {
            bail!(
                "the graph was built for {t} tokens but {} were given",
                ids.len()
            );
        }
        let inputs: HashMap<&str, HostTensor> = [
            ("input_ids", HostTensor::i32([t], ids.to_vec())),
            (
                "position_ids",
                HostTensor::i32([t], (0..t as i32).collect()),
            ),
        ]
        .into();
        let program = Program::new(&self.built.graph, outputs)?;
        let result = program
            .run(&self.backend, &|n| self.weights.get(n), &|n| inputs.get(n))
            .map_err(|e: ExecError| anyhow::anyhow!(e))?;
        Ok(result.outputs)
    }

    /// Logits `[T, V]` (as f32) for `seq_len` token ids.
    pub fn logits(&self, ids: &[i32]) -> Result<HostTensor> {
        let mut out = self.run(ids, &["logits"])?;
        Ok(out.remove("logits").expect("requested output"))
    }
}
