//! `qplc export control-to-lora` (spec §6.2.8, §11.3, check 51): per adapted layer `i`,
//! `B = Q·diag(λ)` (`[H, r]`) with `λ = expm1(S)` (or `expm1(−S)` with `--inverse`), and for
//! each target weight `W [H, in]` of that layer `A = Qᵀ·W` (`[r, in]`), so that
//! `B·A = Q diag(λ) Qᵀ W` exactly, rank r, scaling 1 (α = r). Computed in f64, stored in Q's
//! dtype, keys `base_model.model.model.layers.<i>.<module>.lora_{A,B}.weight`.
//!
//! Exactness (§6.2.8, §14.13): the adapter transforms the whole layer delta; putting it on
//! `down_proj` keeps only the MLP part for sequential-block models, which is why
//! [`super::fidelity`] measures what the export loses.
use crate::ca_files::{write_tensors, ControlAdapter};
use crate::checkpoint::Checkpoint;
use crate::peft::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::HostTensor;
use anyhow::{bail, Context, Result};
use qplc_ops::{DType, TensorType};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Which linear layers receive the exported LoRA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportTargets {
    /// `mlp.down_proj` (Llama, Qwen, Mistral, …).
    DownProj,
    /// `mlp.down_proj` and `self_attn.o_proj` (parallel-block Cohere: exact).
    DownProjOProj,
    /// Every Mixtral expert's `block_sparse_moe.experts.<e>.w2`.
    Experts,
}

impl ExportTargets {
    pub fn parse(s: &str) -> Result<ExportTargets> {
        let mut parts: Vec<&str> = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        parts.sort();
        Ok(match parts.as_slice() {
            ["down_proj"] => ExportTargets::DownProj,
            ["down_proj", "o_proj"] => ExportTargets::DownProjOProj,
            ["experts"] | ["w2"] => ExportTargets::Experts,
            _ => bail!("--targets `{s}`: expected `down_proj`, `down_proj,o_proj` or `experts`"),
        })
    }

    /// The PEFT `target_modules` of the exported adapter.
    pub fn target_modules(self) -> Vec<&'static str> {
        match self {
            ExportTargets::DownProj => vec!["down_proj"],
            ExportTargets::DownProjOProj => vec!["down_proj", "o_proj"],
            ExportTargets::Experts => vec!["w2"],
        }
    }

    /// Module paths (without `.weight`) of layer `layer` that exist in `ckpt`.
    fn modules(self, ckpt: &Checkpoint, layer: usize) -> Result<Vec<String>> {
        let p = format!("model.layers.{layer}");
        let mut out = Vec::new();
        match self {
            ExportTargets::DownProj => out.push(format!("{p}.mlp.down_proj")),
            ExportTargets::DownProjOProj => {
                out.push(format!("{p}.mlp.down_proj"));
                out.push(format!("{p}.self_attn.o_proj"));
            }
            ExportTargets::Experts => {
                let prefix = format!("{p}.block_sparse_moe.experts.");
                let mut experts: Vec<usize> = ckpt
                    .names()
                    .filter_map(|n| {
                        n.strip_prefix(&prefix)?
                            .strip_suffix(".w2.weight")?
                            .parse()
                            .ok()
                    })
                    .collect();
                experts.sort();
                out.extend(experts.iter().map(|e| format!("{prefix}{e}.w2")));
            }
        }
        for m in &out {
            if !ckpt.contains(&format!("{m}.weight")) {
                bail!(
                    "the base model has no `{m}.weight` to carry the adapter of layer {layer} (check --targets)"
                );
            }
        }
        if out.is_empty() {
            bail!("layer {layer} of the base model has no Mixtral experts (`{p}.block_sparse_moe.experts.<e>.w2.weight`)");
        }
        Ok(out)
    }
}

/// The exported adapter: tensors by PEFT key and the `adapter_config.json` value.
pub struct LoraExport {
    pub tensors: BTreeMap<String, HostTensor>,
    pub config: Value,
}

/// `expm1(±S)` in f64.
pub fn eigen_offsets(s: &[f32], inverse: bool) -> Vec<f64> {
    let sign = if inverse { -1.0 } else { 1.0 };
    s.iter().map(|&x| (sign * x as f64).exp_m1()).collect()
}

/// `(B [h, r], A [r, in])` for one target weight `w [h, in]`, in f64.
pub fn lora_factors(
    q: &[f32],
    lambda: &[f64],
    w: &[f32],
    h: usize,
    inf: usize,
) -> (Vec<f64>, Vec<f64>) {
    let r = lambda.len();
    let mut b = vec![0.0; h * r];
    for i in 0..h {
        for j in 0..r {
            b[i * r + j] = q[i * r + j] as f64 * lambda[j];
        }
    }
    let mut a = vec![0.0; r * inf];
    for i in 0..h {
        let wrow = &w[i * inf..(i + 1) * inf];
        for j in 0..r {
            let qij = q[i * r + j] as f64;
            let arow = &mut a[j * inf..(j + 1) * inf];
            for (x, &wv) in arow.iter_mut().zip(wrow) {
                *x += qij * wv as f64;
            }
        }
    }
    (b, a)
}

fn tensor(dims: Vec<usize>, v: &[f64], dtype: DType) -> HostTensor {
    let t = HostTensor::f32(dims, v.iter().map(|&x| x as f32).collect());
    t.cast(dtype)
}

/// Converts `ca` with the base weights in `ckpt`.
pub fn control_to_lora(
    ca: &ControlAdapter,
    ckpt: &Checkpoint,
    inverse: bool,
    targets: ExportTargets,
) -> Result<LoraExport> {
    let mut tensors = BTreeMap::new();
    let r = ca.rank();
    for (&layer, l) in &ca.layers {
        let h = l.q.shape().dims()[0];
        let lambda = eigen_offsets(l.s.as_f32(), inverse);
        for module in targets.modules(ckpt, layer)? {
            let name = format!("{module}.weight");
            let info = ckpt.info(&name).expect("checked in modules()");
            if info.shape.len() != 2 || info.shape[0] != h {
                bail!(
                    "`{name}` has shape {:?}; the adapter of layer {layer} needs [{h}, in] (hidden size {h})",
                    info.shape
                );
            }
            let inf = info.shape[1];
            let w = ckpt.load(&name, &TensorType::new(info.shape.clone(), DType::F32))?;
            let (b, a) = lora_factors(l.q.as_f32(), &lambda, w.as_f32(), h, inf);
            let key = format!("base_model.model.{module}");
            tensors.insert(
                format!("{key}.lora_A.weight"),
                tensor(vec![r, inf], &a, l.q.ty.dtype),
            );
            tensors.insert(
                format!("{key}.lora_B.weight"),
                tensor(vec![h, r], &b, l.q.ty.dtype),
            );
        }
    }
    let mut config = ca.config.clone();
    let obj = config
        .as_object_mut()
        .context("adapter_config.json of the Control Adapter is not a JSON object")?;
    obj.insert("target_modules".into(), json!(targets.target_modules()));
    obj.insert("r".into(), json!(r));
    obj.insert("lora_alpha".into(), json!(r));
    obj.insert("peft_type".into(), json!("LORA"));
    obj.insert("use_rslora".into(), json!(false));
    // The LoRA carries only the adapted layers; PEFT's layers_to_transform says so.
    obj.insert(
        "layers_to_transform".into(),
        json!(ca.layers.keys().copied().collect::<Vec<_>>()),
    );
    Ok(LoraExport { tensors, config })
}

/// Writes `adapter_model.safetensors` and `adapter_config.json` into `out`.
pub fn write_lora_export(out: &Path, e: &LoraExport) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create `{}`", out.display()))?;
    write_tensors(&out.join(ADAPTER_WEIGHTS), &e.tensors)?;
    let p = out.join(ADAPTER_CONFIG);
    std::fs::write(&p, serde_json::to_string_pretty(&e.config)? + "\n")
        .with_context(|| format!("cannot write `{}`", p.display()))
}
