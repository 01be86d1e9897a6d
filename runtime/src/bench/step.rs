//! One benchmark step on either backend: the forward+backward program with outputs kept as
//! backend buffers (`Program::run_buffers`), then Adam over every trainable tensor: on the host
//! for the CPU backend, one device kernel for CUDA (cuda/adam.rs). Nothing is copied between
//! host and device inside a step but the token ids and the kernels' own checks.
use super::counting::Counting;
use crate::backend::Backend;
use crate::executor::Program;
use crate::HostTensor;
use anyhow::{Context, Result};
use qplc_passes::grad_output_name;
use std::collections::HashMap;
use std::time::Instant;

/// A model's weights in one backend's memory: trainable ones in optimiser order, the rest
/// by name.
pub struct Weights<Buf> {
    pub names: Vec<String>,
    pub trainable: Vec<Buf>,
    pub frozen: HashMap<String, Buf>,
    index: HashMap<String, usize>,
}

impl<Buf> Weights<Buf> {
    pub fn new(names: Vec<String>, trainable: Vec<Buf>, frozen: HashMap<String, Buf>) -> Self {
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        Weights {
            names,
            trainable,
            frozen,
            index,
        }
    }

    pub fn get(&self, name: &str) -> Option<&Buf> {
        match self.index.get(name) {
            Some(&i) => Some(&self.trainable[i]),
            None => self.frozen.get(name),
        }
    }
}

/// The loss and the gradients of every trainable weight (in `w.names` order), as buffers.
pub fn forward_backward<B: Backend>(
    be: &Counting<B>,
    prog: &Program,
    w: &Weights<B::Buffer>,
    inputs: &HashMap<String, HostTensor>,
) -> Result<(B::Buffer, Vec<B::Buffer>)> {
    let (mut outs, _) = prog.run_buffers(be, &|n| w.get(n), &|n| inputs.get(n))?;
    let loss = outs
        .remove("loss")
        .context("the graph has no `loss` output")?;
    let grads = w
        .names
        .iter()
        .map(|n| {
            outs.remove(&grad_output_name(n))
                .with_context(|| format!("the graph has no gradient output for `{n}`"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((loss, grads))
}

/// Runs `warmup` untimed steps, then `steps` timed ones; `sync` waits for the device at both
/// ends of the timed span. Returns the mean seconds per timed step.
pub fn time_steps(
    warmup: usize,
    steps: usize,
    sync: &dyn Fn() -> Result<()>,
    step: &mut dyn FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        step()?;
    }
    sync()?;
    let t = Instant::now();
    for _ in 0..steps {
        step()?;
    }
    sync()?;
    Ok(t.elapsed().as_secs_f64() / steps.max(1) as f64)
}

/// Memory and loss of a finished benchmark, as a backend reports them.
pub struct Measured {
    pub step_s: f64,
    pub loss: f64,
    /// Peak bytes of live buffers (weights, optimiser state, executor buffers).
    pub peak_bytes: usize,
    /// Device-wide used memory (total − free), highest value seen after a step; CUDA only.
    pub device_used_bytes: Option<usize>,
    pub device: String,
    pub setup_s: f64,
}
