//! Which backend runs the training loop's forward/backward programs (`qplc run --backend`).
//!
//! The optimiser, clipping and LoRA decay stay on the host (runtime/src/train), so the GPU
//! path keeps the frozen weights on the device, uploaded once, and re-uploads only the
//! trainable tensors before each program run (small for LoRA; a device-resident optimiser
//! is the next step, notes/CUDA.md). The CPU path borrows the host weights exactly as before.
use crate::executor::{ExecError, Program, RunResult};
use crate::{CpuBackend, HostTensor};
use anyhow::Result;
use std::collections::HashMap;

/// The backend a run asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    #[default]
    Cpu,
    /// GPU by ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl BackendChoice {
    /// `cpu`, `cuda` (GPU 0) or `cuda:N`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(BackendChoice::Cpu),
            "cuda" => Ok(BackendChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(BackendChoice::Cuda)
                .ok_or_else(|| format!("unknown backend `{s}` (expected cpu, cuda or cuda:N)")),
        }
    }
}

pub enum StepRunner {
    Cpu(CpuBackend),
    #[cfg(feature = "cuda")]
    Cuda {
        gpu: Box<crate::cuda::CudaBackend>,
        frozen: HashMap<String, crate::cuda::CudaTensor>,
        trainable: Vec<String>,
    },
}

impl StepRunner {
    /// `weights` are all the run's weights; `trainable` the names that change every step.
    pub fn new(
        choice: BackendChoice,
        weights: &HashMap<String, HostTensor>,
        trainable: &[String],
    ) -> Result<Self> {
        match choice {
            BackendChoice::Cpu => Ok(StepRunner::Cpu(CpuBackend::new())),
            #[cfg(feature = "cuda")]
            BackendChoice::Cuda(ordinal) => {
                use crate::backend::Backend;
                use anyhow::Context;
                let gpu = Box::new(crate::cuda::CudaBackend::new(ordinal)?);
                let mut frozen = HashMap::new();
                for (n, t) in weights {
                    if !trainable.contains(n) {
                        let b = gpu
                            .upload(t)
                            .with_context(|| format!("uploading `{n}` to the GPU"))?;
                        frozen.insert(n.clone(), b);
                    }
                }
                Ok(StepRunner::Cuda {
                    gpu,
                    frozen,
                    trainable: trainable.to_vec(),
                })
            }
            #[cfg(not(feature = "cuda"))]
            BackendChoice::Cuda(_) => {
                let _ = (weights, trainable);
                anyhow::bail!(
                    "--backend cuda: this qplc was built without the `cuda` feature (cargo build --release --features cuda)"
                )
            }
        }
    }

    /// Runs `prog` with the current host `weights` and the micro-batch `inputs`.
    pub fn run(
        &self,
        prog: &Program,
        weights: &HashMap<String, HostTensor>,
        inputs: &HashMap<&str, HostTensor>,
    ) -> Result<RunResult, ExecError> {
        match self {
            StepRunner::Cpu(cpu) => prog.run(cpu, &|n| weights.get(n), &|n| inputs.get(n)),
            #[cfg(feature = "cuda")]
            StepRunner::Cuda {
                gpu,
                frozen,
                trainable,
            } => {
                use crate::backend::Backend;
                let mut current = HashMap::new();
                for n in trainable {
                    if let Some(t) = weights.get(n) {
                        let b = gpu.upload(t).map_err(|source| ExecError::Kernel {
                            node: 0,
                            op: "upload",
                            module: n.clone(),
                            source,
                        })?;
                        current.insert(n.as_str(), b);
                    }
                }
                prog.run(
                    gpu.as_ref(),
                    &|n| current.get(n).or_else(|| frozen.get(n)),
                    &|n| inputs.get(n),
                )
            }
        }
    }
}
