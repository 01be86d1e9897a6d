//! Control Adapter files (spec §6.2.8, §9.6, check 50): `adapter_model.safetensors` with
//! `base_model.model.model.layers.<i>.control_Q` (`[H, r]`) and `…control_S` (`[r]`) in the
//! adapter dtype, plus a PEFT-style `adapter_config.json` with `r = lora_alpha = lora_rank`,
//! `lora_dropout`, `target_modules = []` and `layers_to_transform`.
//!
//! Reading accepts the `base_model.model.` prefix, the one-`model` form `base_model.` and
//! bare `model.layers…` keys, like the LoRA reader (`crate::peft`).
use crate::peft::{tensor_from_view, AdapterConfig, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::HostTensor;
use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use qplc_ops::DType;
use qplc_passes::targets::ModuleMatch;
use qplc_passes::{control_weight_name, parse_control_weight_name, ControlRole};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// One layer's adapter.
#[derive(Clone, Debug)]
pub struct ControlLayer {
    /// `[H, r]`.
    pub q: HostTensor,
    /// `[r]`.
    pub s: HostTensor,
}

/// A Control Adapter read from a folder.
#[derive(Clone, Debug)]
pub struct ControlAdapter {
    pub dir: PathBuf,
    /// The raw `adapter_config.json` (the export copies it).
    pub config: Value,
    pub layers: BTreeMap<usize, ControlLayer>,
}

impl ControlAdapter {
    pub fn rank(&self) -> usize {
        self.layers
            .values()
            .next()
            .map(|l| l.s.shape().numel())
            .unwrap_or(0)
    }
    pub fn dtype(&self) -> DType {
        self.layers
            .values()
            .next()
            .map(|l| l.q.ty.dtype)
            .unwrap_or(DType::F32)
    }
}

/// The adapter file key of a graph weight name (`base_model.model.` + name).
pub fn control_key(weight_name: &str) -> String {
    format!("base_model.model.{weight_name}")
}

/// The `adapter_config.json` of a Control Adapter run (§6.2.8).
pub fn control_adapter_config(
    rank: usize,
    dropout: f64,
    layers: Option<BTreeSet<usize>>,
    base_model: &str,
) -> AdapterConfig {
    AdapterConfig {
        r: rank,
        lora_alpha: rank as f64,
        lora_dropout: dropout,
        target_modules: ModuleMatch::Names(vec![]),
        layers_to_transform: layers,
        exclude_modules: None,
        use_rslora: false,
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
        base_model_name_or_path: Some(base_model.to_string()),
    }
}

/// Little-endian bytes of `t` in `dtype` (a float type).
fn tensor_bytes(name: &str, t: &HostTensor, dtype: DType) -> Result<(Dtype, Vec<u8>)> {
    let v = t.as_f32();
    Ok(match dtype {
        DType::F32 => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        DType::BF16 => (
            Dtype::BF16,
            v.iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            Dtype::F16,
            v.iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect(),
        ),
        other => bail!("tensor `{name}` has dtype {other}; adapter tensors must be float"),
    })
}

/// Writes named tensors (each in its own dtype) to a safetensors file with PEFT's metadata.
pub fn write_tensors(path: &Path, tensors: &BTreeMap<String, HostTensor>) -> Result<()> {
    use safetensors::tensor::TensorView;
    let bytes = tensors
        .iter()
        .map(|(k, t)| {
            Ok((
                k.as_str(),
                t.shape().dims().to_vec(),
                tensor_bytes(k, t, t.ty.dtype)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let views = bytes
        .iter()
        .map(|(k, shape, (dt, b))| Ok((*k, TensorView::new(*dt, shape.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::tensor::serialize_to_file(views, Some(meta), path)
        .with_context(|| format!("cannot write `{}`", path.display()))
}

/// Writes the adapter of `layers` (values from `weights`, graph names) into `dir`.
pub fn write_control_adapter(
    dir: &Path,
    weights: &HashMap<String, HostTensor>,
    layers: &[usize],
    config: &AdapterConfig,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    if layers.is_empty() {
        bail!("no Control Adapter layers to save");
    }
    let mut out = BTreeMap::new();
    for &l in layers {
        for role in [ControlRole::Q, ControlRole::S] {
            let name = control_weight_name(l, role);
            let t = weights
                .get(&name)
                .with_context(|| format!("no value for the adapter weight `{name}`"))?;
            out.insert(control_key(&name), t.clone());
        }
    }
    write_tensors(&dir.join(ADAPTER_WEIGHTS), &out)?;
    let cfg_path = dir.join(ADAPTER_CONFIG);
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(&config.to_json())? + "\n",
    )
    .with_context(|| format!("cannot write `{}`", cfg_path.display()))
}

/// Reads `adapter_config.json` and `adapter_model.safetensors` of a Control Adapter.
pub fn read_control_adapter(dir: &Path) -> Result<ControlAdapter> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).with_context(|| {
        format!(
            "cannot read `{}` (a Control Adapter folder holds adapter_config.json and adapter_model.safetensors)",
            cfg_path.display()
        )
    })?;
    let config: Value = serde_json::from_str(&text)
        .with_context(|| format!("`{}` is not valid JSON", cfg_path.display()))?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let bytes =
        std::fs::read(&path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("`{}` is not a valid safetensors file", path.display()))?;
    let mut qs: BTreeMap<usize, HostTensor> = BTreeMap::new();
    let mut ss: BTreeMap<usize, HostTensor> = BTreeMap::new();
    for key in st.names() {
        let bare = key
            .strip_prefix("base_model.model.")
            .or_else(|| key.strip_prefix("base_model."))
            .unwrap_or(key);
        let Some((layer, role)) = parse_control_weight_name(bare) else {
            bail!(
                "`{}`: tensor `{key}` is not a Control Adapter tensor (`…model.layers.<i>.control_Q` / `control_S`)",
                path.display()
            );
        };
        let t = tensor_from_view(&st.tensor(key)?)
            .with_context(|| format!("`{}`: `{key}`", path.display()))?;
        let slot = match role {
            ControlRole::Q => &mut qs,
            ControlRole::S => &mut ss,
        };
        slot.insert(layer, t);
    }
    let mut layers = BTreeMap::new();
    for (l, q) in qs {
        let s = ss.remove(&l).with_context(|| {
            format!(
                "`{}`: layer {l} has control_Q but no control_S",
                path.display()
            )
        })?;
        let (qd, sd) = (q.shape().dims(), s.shape().dims());
        if qd.len() != 2 || sd.len() != 1 || qd[1] != sd[0] {
            bail!(
                "`{}`: layer {l}: control_Q {} and control_S {} do not fit ([H, r] and [r])",
                path.display(),
                q.shape(),
                s.shape()
            );
        }
        layers.insert(l, ControlLayer { q, s });
    }
    if let Some(l) = ss.keys().next() {
        bail!(
            "`{}`: layer {l} has control_S but no control_Q",
            path.display()
        );
    }
    if layers.is_empty() {
        bail!("`{}` holds no Control Adapter tensors", path.display());
    }
    let ranks: BTreeSet<usize> = layers.values().map(|l| l.s.shape().numel()).collect();
    if ranks.len() != 1 {
        bail!(
            "`{}`: layers have different ranks {ranks:?}",
            path.display()
        );
    }
    Ok(ControlAdapter {
        dir: dir.to_path_buf(),
        config,
        layers,
    })
}
