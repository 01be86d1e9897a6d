//! A loaded model's weights on the GPU: `qplc score --backend cuda` runs the same forward
//! graph as the CPU path (`crate::model::LoadedModel`), with the weights uploaded once.
use super::{CudaBackend, CudaTensor};
use crate::executor::Program;
use crate::model::LoadedModel;
use crate::HostTensor;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;

pub struct CudaModel<'m> {
    model: &'m LoadedModel,
    gpu: CudaBackend,
    weights: HashMap<String, CudaTensor>,
    program: Program<'m>,
}

impl<'m> CudaModel<'m> {
    /// Uploads every weight of `model` to GPU `ordinal`.
    pub fn new(model: &'m LoadedModel, ordinal: usize) -> Result<Self> {
        let gpu = CudaBackend::new(ordinal)?;
        let weights = model
            .weights
            .iter()
            .map(|(n, t)| {
                let b = crate::backend::Backend::upload(&gpu, t)
                    .with_context(|| format!("uploading `{n}` to the GPU"))?;
                Ok((n.clone(), b))
            })
            .collect::<Result<_>>()?;
        let program = Program::new(&model.built.graph, &["logits"])?;
        Ok(CudaModel {
            model,
            gpu,
            weights,
            program,
        })
    }

    /// Logits `[T, V]` for exactly `seq_len` token ids at positions 0…T−1.
    pub fn logits(&self, ids: &[i32]) -> Result<HostTensor> {
        let t = self.model.seq_len();
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
        let mut r = self
            .program
            .run(&self.gpu, &|n| self.weights.get(n), &|n| inputs.get(n))?;
        Ok(r.outputs.remove("logits").expect("requested output"))
    }
}
