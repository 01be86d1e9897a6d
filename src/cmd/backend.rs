//! `--backend cpu|cuda`: which backend runs a loaded model's forward passes.
use anyhow::{bail, Result};
use qplc_runtime::model::LoadedModel;
use qplc_runtime::HostTensor;

/// A loaded model bound to a backend.
pub enum Forward<'m> {
    Cpu(&'m LoadedModel),
    #[cfg(feature = "cuda")]
    Cuda(Box<qplc_runtime::cuda::model::CudaModel<'m>>),
}

impl Forward<'_> {
    pub fn logits(&self, ids: &[i32]) -> Result<HostTensor> {
        match self {
            Forward::Cpu(m) => m.logits(ids),
            #[cfg(feature = "cuda")]
            Forward::Cuda(m) => m.logits(ids),
        }
    }
}

pub fn forward<'m>(backend: &str, model: &'m LoadedModel) -> Result<Forward<'m>> {
    match backend {
        "cpu" => Ok(Forward::Cpu(model)),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Forward::Cuda(Box::new(
            qplc_runtime::cuda::model::CudaModel::new(model, 0)?,
        ))),
        #[cfg(not(feature = "cuda"))]
        "cuda" => bail!(
            "--backend cuda: this qplc was built without the `cuda` feature (cargo build --release --features cuda)"
        ),
        other => bail!("--backend {other}: expected `cpu` or `cuda`"),
    }
}
