//! PEFT-format LoRA adapters on disk (DESIGN "Files the user gets", spec §9.6, §11.1,
//! checks 50 and 52): `adapter_model.safetensors` + `adapter_config.json`.
//!
//! Writing: keys `base_model.model.<HF module>.lora_A.weight` / `.lora_B.weight` (no
//! `.default` segment) in the adapter dtype, and the config as PEFT 0.21 serialises a
//! `LoraConfig`. The reference wrote `adapter_model.bin` (a pickle); qplc writes safetensors,
//! which PEFT prefers when both could exist.
//!
//! Reading accepts what PEFT and the reference's tools produce: the `base_model.model.`
//! prefix or the one-`model` form `base_model.` (spec §11.1), keys with or without the
//! adapter-name segment (`.default`), scaling `lora_alpha / r` (or `/√r` with `use_rslora`),
//! per-module ranks from the tensor shapes and `alpha_pattern`. A lone A without B (or the
//! reverse) is an error naming the key.
use crate::HostTensor;
use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use qplc_compiler::Graph;
use qplc_ops::{DType, Op, TensorType};
use qplc_passes::targets::{pattern_matches, short_name, LoraSelection, ModuleMatch};
use qplc_passes::{lora_weight_name, parse_lora_weight_name, LoraPass, LoraRole};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// The parts of a PEFT `LoraConfig` qplc reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: ModuleMatch,
    pub layers_to_transform: Option<BTreeSet<usize>>,
    pub exclude_modules: Option<ModuleMatch>,
    pub use_rslora: bool,
    /// PEFT `rank_pattern` (pattern → rank); ranks are also read from tensor shapes.
    pub rank_pattern: BTreeMap<String, usize>,
    /// PEFT `alpha_pattern` (pattern → alpha).
    pub alpha_pattern: BTreeMap<String, f64>,
    pub base_model_name_or_path: Option<String>,
}

impl AdapterConfig {
    /// The config of an adapter trained with `pass` on the model at `base_model`. An
    /// "all-linear" target is written as the sorted short names of the adapted modules,
    /// because PEFT refuses `layers_to_transform` together with a string `target_modules`.
    /// The adapted modules are read from the graph's adapter weights, not from its `Linear`
    /// nodes: after the passes the adapters' own products are linears too, and a base
    /// product may have become an accumulating `MatMul` (`accumulate` pass).
    pub fn from_pass(pass: &LoraPass, graph: &Graph, base_model: &str) -> Result<AdapterConfig> {
        let target_modules = match &pass.selection.modules {
            ModuleMatch::AllLinear => {
                let mut names: Vec<String> = graph
                    .weights()
                    .iter()
                    .filter_map(|(name, _)| parse_lora_weight_name(name))
                    .map(|(module, _)| short_name(module).to_string())
                    .collect();
                names.sort();
                names.dedup();
                if names.is_empty() {
                    bail!(
                        "the trained graph has no LoRA weights to describe in adapter_config.json"
                    );
                }
                ModuleMatch::Names(names)
            }
            other => other.clone(),
        };
        Ok(AdapterConfig {
            r: pass.rank,
            lora_alpha: pass.alpha,
            lora_dropout: pass.dropout,
            target_modules,
            layers_to_transform: pass.selection.layers.clone(),
            exclude_modules: pass.selection.exclude.clone(),
            use_rslora: pass.rslora,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            base_model_name_or_path: Some(base_model.to_string()),
        })
    }

    /// Parses `adapter_config.json`, refusing PEFT features qplc does not implement.
    pub fn from_json(v: &Value, path: &Path) -> Result<AdapterConfig> {
        let at = || format!("`{}`", path.display());
        let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("");
        if peft_type != "LORA" {
            bail!(
                "{}: peft_type is {:?}; qplc loads LoRA adapters (peft_type \"LORA\")",
                at(),
                v.get("peft_type")
            );
        }
        let truthy = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        let present = |k: &str| match v.get(k) {
            None | Some(Value::Null) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(_) => true,
        };
        for k in ["use_dora", "fan_in_fan_out", "lora_bias"] {
            if truthy(k) {
                bail!("{}: `{k}: true` is not supported by qplc", at());
            }
        }
        for k in [
            "modules_to_save",
            "layer_replication",
            "target_parameters",
            "trainable_token_indices",
        ] {
            if present(k) {
                bail!("{}: `{k}` is set; qplc does not support it", at());
            }
        }
        match v.get("bias").and_then(Value::as_str) {
            None | Some("none") => {}
            Some(b) => bail!(
                "{}: bias \"{b}\" is not supported (only \"none\": no trained biases)",
                at()
            ),
        }
        let r = v
            .get("r")
            .and_then(Value::as_u64)
            .with_context(|| format!("{}: `r` (the rank) is missing", at()))?
            as usize;
        let lora_alpha = v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0); // PEFT's default
        let modules = |k: &str| -> Result<Option<ModuleMatch>> {
            Ok(match v.get(k) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s == "all-linear" => Some(ModuleMatch::AllLinear),
                Some(Value::String(s)) => Some(ModuleMatch::Regex(s.clone())),
                Some(Value::Array(a)) => Some(ModuleMatch::Names(
                    a.iter()
                        .map(|x| {
                            x.as_str()
                                .map(str::to_string)
                                .with_context(|| format!("{}: `{k}` entries must be strings", at()))
                        })
                        .collect::<Result<_>>()?,
                )),
                Some(other) => bail!("{}: `{k}` must be a list or a string, got {other}", at()),
            })
        };
        let target_modules = modules("target_modules")?
            .with_context(|| format!("{}: `target_modules` is missing", at()))?;
        let layers_to_transform = match v.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some([n.as_u64().context("layer index")? as usize].into()),
            Some(Value::Array(a)) if a.is_empty() => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| x.as_u64().map(|i| i as usize))
                    .collect::<Option<BTreeSet<usize>>>()
                    .with_context(|| {
                        format!("{}: `layers_to_transform` must hold layer indices", at())
                    })?,
            ),
            Some(other) => bail!("{}: `layers_to_transform` {other} is not supported", at()),
        };
        let map = |k: &str| -> Result<BTreeMap<String, f64>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(BTreeMap::new()),
                Some(Value::Object(o)) => o
                    .iter()
                    .map(|(p, x)| {
                        x.as_f64()
                            .map(|f| (p.clone(), f))
                            .with_context(|| format!("{}: `{k}.{p}` must be a number", at()))
                    })
                    .collect(),
                Some(other) => bail!("{}: `{k}` must be an object, got {other}", at()),
            }
        };
        Ok(AdapterConfig {
            r,
            lora_alpha,
            lora_dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
            target_modules,
            layers_to_transform,
            exclude_modules: modules("exclude_modules")?,
            use_rslora: truthy("use_rslora"),
            rank_pattern: map("rank_pattern")?
                .into_iter()
                .map(|(k, x)| (k, x as usize))
                .collect(),
            alpha_pattern: map("alpha_pattern")?,
            base_model_name_or_path: v
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// `adapter_config.json` as PEFT 0.21 writes it (every key of its `LoraConfig`, so an
    /// older or newer PEFT finds the ones it knows).
    pub fn to_json(&self) -> Value {
        let modules = |m: &ModuleMatch| match m {
            ModuleMatch::AllLinear => json!("all-linear"),
            ModuleMatch::Names(l) => json!(l),
            ModuleMatch::Regex(r) => json!(r),
        };
        let alpha = if self.lora_alpha.fract() == 0.0 {
            json!(self.lora_alpha as i64)
        } else {
            json!(self.lora_alpha)
        };
        json!({
            "alora_invocation_tokens": null,
            "alpha_pattern": self.alpha_pattern,
            "arrow_config": null,
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "corda_config": null,
            "ensure_weight_tying": false,
            "eva_config": null,
            "exclude_modules": self.exclude_modules.as_ref().map(modules),
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "kasa_config": null,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": self.layers_to_transform.as_ref().map(|s| s.iter().copied().collect::<Vec<_>>()),
            "loftq_config": {},
            "lora_alpha": alpha,
            "lora_bias": false,
            "lora_dropout": self.lora_dropout,
            "lora_ga_config": null,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": null,
            "monteclora_config": null,
            "peft_type": "LORA",
            "peft_version": "0.21.2",
            "qalora_group_size": 16,
            "r": self.r,
            "rank_pattern": self.rank_pattern,
            "revision": null,
            "target_modules": modules(&self.target_modules),
            "target_parameters": null,
            "task_type": "CAUSAL_LM",
            "trainable_token_indices": null,
            "use_bdlora": null,
            "use_dora": false,
            "use_qalora": false,
            "use_rslora": self.use_rslora,
            "velora_config": null
        })
    }

    /// The alpha of `module`: PEFT's `alpha_pattern` rule (a key matches when the module
    /// path is `(.*\.)?key` in full), else `lora_alpha`.
    pub fn alpha_for(&self, module: &str) -> Result<f64> {
        for (pat, a) in &self.alpha_pattern {
            if pattern_matches(pat, module).context("in alpha_pattern")? {
                return Ok(*a);
            }
        }
        Ok(self.lora_alpha)
    }
}

/// One module's pair, keyed in [`Adapter::pairs`] by the module path as written in the
/// file (after the `base_model.` prefix and any adapter-name segment).
#[derive(Clone, Debug)]
pub struct LoraPair {
    pub a: HostTensor,
    pub b: HostTensor,
}

/// A PEFT LoRA adapter read from a folder.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    /// Key stem → pair. The stem is the key without `base_model.` and without the
    /// `.lora_A[.<adapter>].weight` tail: `model.model.layers.0…` for PEFT's own
    /// `base_model.model.model.layers.0…`, `model.layers.0…` for the one-`model` form.
    pub pairs: BTreeMap<String, LoraPair>,
}

/// Splits a LoRA key into (stem, role): `base_model.model.X.lora_A[.default].weight` →
/// (`model.X`, A). Returns `None` for keys that are not LoRA matrices.
fn split_key(key: &str) -> Option<(String, LoraRole)> {
    let rest = key.strip_prefix("base_model.").unwrap_or(key);
    let parts: Vec<&str> = rest.split('.').collect();
    let n = parts.len();
    if n < 3 || parts[n - 1] != "weight" {
        return None;
    }
    // `…lora_A.weight` or `…lora_A.<adapter name>.weight`.
    for back in [2, 3] {
        if n <= back {
            continue;
        }
        let role = match parts[n - back] {
            "lora_A" => LoraRole::A,
            "lora_B" => LoraRole::B,
            _ => continue,
        };
        return Some((parts[..n - back].join("."), role));
    }
    None
}

pub fn read_adapter(dir: &Path) -> Result<Adapter> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).with_context(|| {
        format!(
            "cannot read `{}` (a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors)",
            cfg_path.display()
        )
    })?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("`{}` is not valid JSON", cfg_path.display()))?;
    let config = AdapterConfig::from_json(&v, &cfg_path)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    if !path.is_file() {
        let bin = dir.join("adapter_model.bin");
        if bin.is_file() {
            bail!(
                "`{}` is a PyTorch pickle; qplc reads safetensors only (pickles can run code). Convert it with:\n  \
python -c \"import torch, safetensors.torch as s; s.save_file({{k: v.contiguous() for k, v in torch.load('{0}', weights_only=True).items()}}, '{1}')\"",
                bin.display(),
                path.display()
            );
        }
        bail!("`{}` does not exist", path.display());
    }
    let bytes =
        std::fs::read(&path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("`{}` is not a valid safetensors file", path.display()))?;
    let mut halves: BTreeMap<String, (Option<HostTensor>, Option<HostTensor>)> = BTreeMap::new();
    let mut key_of: HashMap<(String, LoraRole), String> = HashMap::new();
    let mut names: Vec<&str> = st.names();
    names.sort();
    for key in names {
        let Some((stem, role)) = split_key(key) else {
            bail!(
                "`{}`: tensor `{key}` is not a LoRA matrix (`…lora_A.weight` / `…lora_B.weight`); qplc loads plain LoRA adapters only",
                path.display()
            );
        };
        let view = st.tensor(key)?;
        let t =
            tensor_from_view(&view).with_context(|| format!("`{}`: `{key}`", path.display()))?;
        if t.shape().rank() != 2 {
            bail!(
                "`{}`: `{key}` must be a matrix, has shape {}",
                path.display(),
                t.shape()
            );
        }
        if let Some(prev) = key_of.insert((stem.clone(), role), key.to_string()) {
            bail!(
                "`{}`: `{key}` and `{prev}` are the same LoRA matrix",
                path.display()
            );
        }
        let slot = halves.entry(stem).or_default();
        match role {
            LoraRole::A => slot.0 = Some(t),
            LoraRole::B => slot.1 = Some(t),
        }
    }
    let mut pairs = BTreeMap::new();
    for (stem, (a, b)) in halves {
        match (a, b) {
            (Some(a), Some(b)) => {
                let (ad, bd) = (a.shape().dims(), b.shape().dims());
                if ad[0] != bd[1] {
                    bail!(
                        "`{}`: `{}` is {} but `{}` is {}: the ranks differ",
                        path.display(),
                        key_of[&(stem.clone(), LoraRole::A)],
                        a.shape(),
                        key_of[&(stem.clone(), LoraRole::B)],
                        b.shape()
                    );
                }
                pairs.insert(stem, LoraPair { a, b });
            }
            (Some(_), None) => bail!(
                "`{}`: `{}` has no matching lora_B",
                path.display(),
                key_of[&(stem, LoraRole::A)]
            ),
            (None, Some(_)) => bail!(
                "`{}`: `{}` has no matching lora_A",
                path.display(),
                key_of[&(stem, LoraRole::B)]
            ),
            (None, None) => unreachable!("an entry exists once a half was read"),
        }
    }
    if pairs.is_empty() {
        bail!("`{}` holds no LoRA matrices", path.display());
    }
    Ok(Adapter {
        dir: dir.to_path_buf(),
        config,
        pairs,
    })
}

pub(crate) fn tensor_from_view(view: &safetensors::tensor::TensorView<'_>) -> Result<HostTensor> {
    let data = view.data();
    let (values, dtype): (Vec<f32>, DType) = match view.dtype() {
        Dtype::F32 => (
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F32,
        ),
        Dtype::BF16 => (
            data.chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16,
        ),
        Dtype::F16 => (
            data.chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::F16,
        ),
        other => bail!("stored as {other:?}; LoRA matrices must be F32, BF16 or F16"),
    };
    let mut t = HostTensor::f32(view.shape().to_vec(), values);
    t.ty.dtype = dtype;
    Ok(t)
}

impl Adapter {
    /// The graph module each stem names: PEFT's `model.<HF module>` or the one-`model` form
    /// `<HF module>` (spec §11.1), whichever exists in `graph`.
    fn module_of<'a>(stem: &'a str, modules: &BTreeSet<&str>) -> Option<&'a str> {
        if let Some(m) = stem.strip_prefix("model.") {
            if modules.contains(m) {
                return Some(m);
            }
        }
        modules.contains(stem).then_some(stem)
    }

    /// The `lora` pass that recreates this adapter on `graph` (targets from the config,
    /// checked against the file), and its weights keyed by graph weight name, in
    /// `dtype` (the dtype the branch computes in: the file's dtype unless asked otherwise).
    pub fn lora_pass(
        &self,
        graph: &Graph,
        dtype: Option<DType>,
    ) -> Result<(LoraPass, HashMap<String, HostTensor>)> {
        let c = &self.config;
        let mut selection =
            LoraSelection::new(c.target_modules.clone(), c.layers_to_transform.clone());
        selection.exclude = c.exclude_modules.clone();
        let targeted: BTreeSet<String> = selection
            .resolve(graph)
            .with_context(|| format!("applying the adapter `{}`", self.dir.display()))?
            .into_iter()
            .map(|id| graph.node(id).module.clone())
            .collect();
        // Linear module → its weight's [out, in], to check the adapter's shapes up front.
        let mut shape_of: HashMap<&str, Vec<usize>> = HashMap::new();
        for id in graph.g.node_indices() {
            if matches!(graph.node(id).op, Op::Linear) {
                let w = graph.operands(id)[1];
                shape_of.insert(
                    graph.node(id).module.as_str(),
                    graph.node(w).ty.shape.dims().to_vec(),
                );
            }
        }
        let linear: BTreeSet<&str> = shape_of.keys().copied().collect();
        let dtype = dtype.unwrap_or_else(|| {
            self.pairs
                .values()
                .next()
                .map(|p| p.a.ty.dtype)
                .unwrap_or(DType::F32)
        });
        let mut rank_of = BTreeMap::new();
        let mut alpha_of = BTreeMap::new();
        let mut weights = HashMap::new();
        let mut found = BTreeSet::new();
        for (stem, pair) in &self.pairs {
            let Some(module) = Self::module_of(stem, &linear) else {
                bail!(
                    "adapter `{}`: `{stem}` is not a linear module of this model (keys are `base_model.model.<module>.lora_A.weight`)",
                    self.dir.display()
                );
            };
            if !targeted.contains(module) {
                bail!(
                    "adapter `{}` has weights for `{module}`, which its adapter_config.json (target_modules, layers_to_transform) does not select",
                    self.dir.display()
                );
            }
            let rank = pair.a.shape().dims()[0];
            let (out_f, in_f) = (shape_of[module][0], shape_of[module][1]);
            if pair.a.shape().dims() != [rank, in_f] || pair.b.shape().dims() != [out_f, rank] {
                bail!(
                    "adapter `{}`: `{module}` is a [{out_f}, {in_f}] linear, so lora_A must be [r, {in_f}] and lora_B [{out_f}, r]; the file has {} and {}",
                    self.dir.display(),
                    pair.a.shape(),
                    pair.b.shape()
                );
            }
            rank_of.insert(module.to_string(), rank);
            alpha_of.insert(module.to_string(), c.alpha_for(module)?);
            for (role, t) in [(LoraRole::A, &pair.a), (LoraRole::B, &pair.b)] {
                weights.insert(lora_weight_name(module, role), t.cast(dtype));
            }
            found.insert(module.to_string());
        }
        if let Some(missing) = targeted.difference(&found).next() {
            bail!(
                "adapter `{}`: adapter_config.json selects `{missing}` but adapter_model.safetensors has no lora_A/lora_B for it",
                self.dir.display()
            );
        }
        let pass = LoraPass {
            selection,
            rank: c.r,
            alpha: c.lora_alpha,
            rslora: c.use_rslora,
            rank_of,
            alpha_of,
            dtype,
            // A loaded adapter runs for inference (score, generate, merge), where dropout
            // is the identity: no dropout op (spec §6.1.2).
            dropout: 0.0,
        };
        Ok((pass, weights))
    }
}

/// The PEFT key of a graph LoRA weight (`base_model.model.<module>.lora_A.weight`).
pub fn peft_key(weight_name: &str) -> String {
    format!("base_model.model.{weight_name}")
}

/// Writes `adapter_model.safetensors` (every LoRA weight of `graph`, taken from `weights`,
/// in its graph dtype) and `adapter_config.json` into `dir` (created if needed).
pub fn write_adapter(
    dir: &Path,
    graph: &Graph,
    weights: &HashMap<String, HostTensor>,
    config: &AdapterConfig,
) -> Result<()> {
    use safetensors::tensor::TensorView;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    let mut entries: BTreeMap<String, (TensorType, Vec<u8>)> = BTreeMap::new();
    for (name, id) in graph.weights() {
        if parse_lora_weight_name(&name).is_none() || entries.contains_key(&peft_key(&name)) {
            continue;
        }
        let Op::Weight { ty, .. } = &graph.node(id).op else {
            unreachable!("Graph::weights returns weight nodes")
        };
        let t = weights
            .get(&name)
            .with_context(|| format!("no value for the adapter weight `{name}`"))?;
        if t.shape() != &ty.shape {
            bail!(
                "adapter weight `{name}` is {} but the graph expects {}",
                t.shape(),
                ty.shape
            );
        }
        let v = t.as_f32();
        let bytes: Vec<u8> = match ty.dtype {
            DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DType::BF16 => v
                .iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
            DType::F16 => v
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect(),
            other => bail!("adapter weight `{name}` has dtype {other}; expected a float"),
        };
        entries.insert(peft_key(&name), (ty.clone(), bytes));
    }
    if entries.is_empty() {
        bail!("the graph has no LoRA weights to save");
    }
    let mut views = Vec::new();
    for (key, (ty, bytes)) in &entries {
        let dt = match ty.dtype {
            DType::F32 => Dtype::F32,
            DType::BF16 => Dtype::BF16,
            _ => Dtype::F16,
        };
        views.push((
            key.as_str(),
            TensorView::new(dt, ty.shape.dims().to_vec(), bytes)?,
        ));
    }
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let path = dir.join(ADAPTER_WEIGHTS);
    safetensors::tensor::serialize_to_file(views, Some(meta), &path)
        .with_context(|| format!("cannot write `{}`", path.display()))?;
    let cfg_path = dir.join(ADAPTER_CONFIG);
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(&config.to_json())? + "\n",
    )
    .with_context(|| format!("cannot write `{}`", cfg_path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_stem_and_role_with_or_without_adapter_name() {
        let k = "base_model.model.model.layers.3.mlp.up_proj.lora_B.weight";
        assert_eq!(
            split_key(k),
            Some(("model.model.layers.3.mlp.up_proj".into(), LoraRole::B))
        );
        let k = "base_model.model.layers.3.mlp.up_proj.lora_A.default.weight";
        assert_eq!(
            split_key(k),
            Some(("model.layers.3.mlp.up_proj".into(), LoraRole::A))
        );
        assert_eq!(split_key("base_model.model.lm_head.bias"), None);
        assert_eq!(
            split_key("base_model.model.model.embed_tokens.lora_embedding_A.default"),
            None
        );
    }

    #[test]
    fn stems_resolve_to_the_module_that_exists_in_the_model() {
        let modules: BTreeSet<&str> = ["model.layers.0.self_attn.q_proj"].into();
        // PEFT's form: `base_model.model.` + module.
        assert_eq!(
            Adapter::module_of("model.model.layers.0.self_attn.q_proj", &modules),
            Some("model.layers.0.self_attn.q_proj")
        );
        // The one-`model` form: `base_model.` + module (spec §11.1).
        assert_eq!(
            Adapter::module_of("model.layers.0.self_attn.q_proj", &modules),
            Some("model.layers.0.self_attn.q_proj")
        );
        assert_eq!(
            Adapter::module_of("layers.0.self_attn.q_proj", &modules),
            None
        );
    }

    #[test]
    fn scaling_uses_alpha_pattern_then_lora_alpha() {
        let v = json!({
            "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
            "alpha_pattern": {"layers.1.self_attn.q_proj": 4}
        });
        let c = AdapterConfig::from_json(&v, Path::new("a.json")).unwrap();
        assert_eq!(c.alpha_for("model.layers.1.self_attn.q_proj").unwrap(), 4.0);
        assert_eq!(
            c.alpha_for("model.layers.11.self_attn.q_proj").unwrap(),
            16.0
        );
    }

    #[test]
    fn unsupported_peft_features_are_refused_by_name() {
        for (k, val) in [
            ("use_dora", json!(true)),
            ("modules_to_save", json!(["lm_head"])),
            ("bias", json!("all")),
        ] {
            let mut v = json!({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]});
            v[k] = val;
            let e = AdapterConfig::from_json(&v, Path::new("a.json"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(k) || e.contains("bias"), "{e}");
        }
    }
}
