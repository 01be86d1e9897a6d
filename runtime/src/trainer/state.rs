//! Checkpoints for resuming (spec §9.3): the trainable tensors (exact f32 bits), the
//! optimiser and schedule state, the global step, the loader counter and the last eval loss.
//! Written to a temporary directory and renamed into place, and `latest` is replaced
//! atomically, so a kill at any moment leaves the previous checkpoint usable.
use crate::train::adam::AdamState;
use crate::train::schedule::ScheduleState;
use crate::HostTensor;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Serialize, Deserialize)]
pub struct TrainState {
    pub global_step: u64,
    pub optimizer: AdamState,
    pub schedule: ScheduleState,
    /// The loader's `num_batches_pulled` (spec §4.8).
    pub loader_pulled: usize,
    pub last_eval_loss: Option<f64>,
    /// Names of the trainable tensors in optimiser order.
    pub tensor_names: Vec<String>,
}

const TENSORS: &str = "trainable.safetensors";
const STATE: &str = "state.json";
pub const LATEST: &str = "latest";

pub fn tag(step: u64) -> String {
    format!("global_step{step}")
}

pub fn save(
    run_dir: &Path,
    state: &TrainState,
    tensors: &BTreeMap<String, HostTensor>,
) -> Result<PathBuf> {
    let final_dir = run_dir.join(tag(state.global_step));
    let tmp = run_dir.join(format!(
        ".{}.tmp-{}",
        tag(state.global_step),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create `{}`", tmp.display()))?;
    write_tensors(&tmp.join(TENSORS), tensors)?;
    let json = serde_json::to_vec(state)?;
    write_synced(&tmp.join(STATE), &json)?;
    if final_dir.exists() {
        // A checkpoint of the same step (an epoch end right after a timed one): replace it.
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot move the checkpoint to `{}`", final_dir.display()))?;
    let latest_tmp = run_dir.join(format!(".{LATEST}.tmp-{}", std::process::id()));
    write_synced(&latest_tmp, tag(state.global_step).as_bytes())?;
    std::fs::rename(&latest_tmp, run_dir.join(LATEST))?;
    Ok(final_dir)
}

/// The checkpoint `latest` names, if the run has one.
pub fn load_latest(run_dir: &Path) -> Result<Option<(TrainState, BTreeMap<String, HostTensor>)>> {
    let latest = run_dir.join(LATEST);
    if !latest.is_file() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&latest)?.trim().to_string();
    let dir = run_dir.join(&name);
    if !dir.is_dir() {
        bail!(
            "`{}` names `{name}`, which does not exist in `{}`",
            latest.display(),
            run_dir.display()
        );
    }
    let state: TrainState = serde_json::from_slice(
        &std::fs::read(dir.join(STATE)).with_context(|| format!("reading `{}`", dir.display()))?,
    )
    .with_context(|| {
        format!(
            "`{}` is not a qplc checkpoint state",
            dir.join(STATE).display()
        )
    })?;
    let tensors = read_tensors(&dir.join(TENSORS))?;
    Ok(Some((state, tensors)))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)
        .with_context(|| format!("cannot create `{}`", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn write_tensors(path: &Path, tensors: &BTreeMap<String, HostTensor>) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            let b: Vec<u8> = t.as_f32().iter().flat_map(|x| x.to_le_bytes()).collect();
            (n.clone(), t.shape().dims().to_vec(), b)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| Ok((n.as_str(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::tensor::serialize(views, None)?;
    write_synced(path, &data)
}

fn read_tensors(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let v: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, HostTensor::f32(view.shape().to_vec(), v));
    }
    Ok(out)
}
