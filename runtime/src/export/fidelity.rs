//! Fidelity of a Control Adapter → LoRA export (beyond the reference, which only notes that
//! the export drops the attention part of the delta, §6.2.8): the mean over predicted tokens
//! of `KL(p_CA ‖ p_LoRA)`, the next-token distributions of the model with the Control Adapter
//! (every token in class +1, or −1 for `--inverse`) and of the model with the exported LoRA,
//! on a held-out text. For scale it also reports `KL(p_CA ‖ p_base)`, how far the adapter
//! moves the model at all.
//!
//! The text is `[BOS] + tokens(text)` (the training prefix, §3.6), cut to `max_tokens`;
//! positions `0…T−2` are averaged (each predicts a token of the text; the last position's
//! effective class is 0 by the class shift, §6.2.3).
use crate::ca_files::ControlAdapter;
use crate::checkpoint::Checkpoint;
use crate::executor::Program;
use crate::model::{LoadedModel, ModelDir};
use crate::tokenizer::Tokenizer;
use crate::{CpuBackend, HostTensor};
use anyhow::{bail, Context, Result};
use qplc_ops::{DType, Op};
use qplc_passes::{control_weight_name, ControlPass, ControlRole, CONTROL_CLASSES};
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Fidelity {
    /// Tokens fed (including the BOS prefix).
    pub tokens: usize,
    /// Mean KL(p_CA ‖ p_LoRA) per predicted token, nats.
    pub kl_lora: f64,
    /// Mean KL(p_CA ‖ p_base) per predicted token, nats.
    pub kl_base: f64,
}

/// Token ids of the held-out text: `[BOS] + encode(text)`, at most `max_tokens`.
pub fn fidelity_ids(tok: &Tokenizer, text: &str, max_tokens: usize) -> Result<Vec<i32>> {
    let mut ids: Vec<i32> = tok.bos_id.into_iter().map(|x| x as i32).collect();
    ids.extend(tok.encode(text)?.into_iter().map(|x| x as i32));
    ids.truncate(max_tokens);
    if ids.len() < 2 {
        bail!(
            "the fidelity text gives {} token(s); at least 2 are needed",
            ids.len()
        );
    }
    Ok(ids)
}

/// Logits `[T, V]` of the base model with the Control Adapter, every token in `class`.
pub fn control_logits(
    model: &ModelDir,
    ca: &ControlAdapter,
    ids: &[i32],
    class: i32,
) -> Result<HostTensor> {
    let t = ids.len();
    let mut graph = model.build(t, DType::F32)?.graph;
    let pass = ControlPass {
        layers: Some(ca.layers.keys().copied().collect()),
        rank: ca.rank(),
        dtype: DType::F32,
        dropout: 0.0,
    };
    pass.apply(&mut graph)?;
    graph.verify()?;
    let ckpt = Checkpoint::open(&model.dir)?;
    let mut weights: HashMap<String, HostTensor> = HashMap::new();
    for (&l, layer) in &ca.layers {
        weights.insert(
            control_weight_name(l, ControlRole::Q),
            layer.q.cast(DType::F32),
        );
        weights.insert(
            control_weight_name(l, ControlRole::S),
            layer.s.cast(DType::F32),
        );
    }
    for (name, id) in graph.weights() {
        if weights.contains_key(&name) {
            continue;
        }
        let Op::Weight { ty, .. } = &graph.node(id).op else {
            unreachable!()
        };
        weights.insert(name.clone(), ckpt.load(&name, ty)?);
    }
    let inputs: HashMap<&str, HostTensor> = [
        ("input_ids", HostTensor::i32([t], ids.to_vec())),
        (
            "position_ids",
            HostTensor::i32([t], (0..t as i32).collect()),
        ),
        (CONTROL_CLASSES, HostTensor::i32([t], vec![class; t])),
    ]
    .into();
    let r = Program::new(&graph, &["logits"])?
        .run(&CpuBackend::new(), &|n| weights.get(n), &|n| inputs.get(n))
        .map_err(|e| anyhow::anyhow!(e))?;
    Ok(r.get("logits").context("logits output")?.clone())
}

/// log-softmax of one row, f64.
fn log_softmax(z: &[f32]) -> Vec<f64> {
    let m = z.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let lse = m + z.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    z.iter().map(|&x| x as f64 - lse).collect()
}

/// Mean over rows `0…rows−1` of KL(softmax(p) ‖ softmax(q)).
pub fn mean_kl(p: &HostTensor, q: &HostTensor, rows: usize) -> f64 {
    let v = p.shape().dims()[1];
    let (p, q) = (p.as_f32(), q.as_f32());
    let mut sum = 0.0;
    for t in 0..rows {
        let lp = log_softmax(&p[t * v..(t + 1) * v]);
        let lq = log_softmax(&q[t * v..(t + 1) * v]);
        sum += lp
            .iter()
            .zip(&lq)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>();
    }
    sum / rows as f64
}

/// Measures the export in `lora_dir` against the adapter `ca` on `text`.
pub fn measure(
    model_dir: &Path,
    ca: &ControlAdapter,
    lora_dir: &Path,
    inverse: bool,
    text: &str,
    max_tokens: usize,
) -> Result<Fidelity> {
    let tok = Tokenizer::open(model_dir)?;
    let ids = fidelity_ids(&tok, text, max_tokens)?;
    let t = ids.len();
    let base_dir = ModelDir::open(model_dir, None)?;
    let ca_logits = control_logits(&base_dir, ca, &ids, if inverse { -1 } else { 1 })?;
    let base_logits = LoadedModel::load(&base_dir, t, DType::F32)?.logits(&ids)?;
    let lora_model = ModelDir::open(model_dir, None)?.with_adapter(lora_dir)?;
    let lora_logits = LoadedModel::load(&lora_model, t, DType::F32)?.logits(&ids)?;
    Ok(Fidelity {
        tokens: t,
        kl_lora: mean_kl(&ca_logits, &lora_logits, t - 1),
        kl_base: mean_kl(&ca_logits, &base_logits, t - 1),
    })
}
