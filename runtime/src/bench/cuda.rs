//! `qplc bench --backend cuda`: weights drawn on the device, gradients kept as device
//! buffers, one Adam kernel per step (cuda/adam.rs). The host only queues work.
use super::counting::Counting;
use super::graph::BenchGraph;
use super::random::{tensor_seed, Init};
use super::step::{forward_backward, time_steps, Measured, Weights};
use super::BenchOptions;
use crate::backend::Backend;
use crate::cuda::adam::{device_memory, storage_bytes, DeviceAdam, TrainKernels};
use crate::cuda::{CudaBackend, CudaTensor};
use crate::executor::Program;
use crate::train::adam::AdamHyper;
use crate::HostTensor;
use anyhow::{Context, Result};
use qplc_ops::{Op, TensorType};
use std::cell::Cell;
use std::collections::HashMap;
use std::time::Instant;

fn device_tensor(
    gpu: &CudaBackend,
    k: &TrainKernels,
    name: &str,
    ty: &TensorType,
    seed: u64,
) -> Result<CudaTensor> {
    let mut t = gpu.alloc(ty)?;
    k.init(
        gpu,
        &mut t,
        Init::for_weight(name, ty),
        tensor_seed(seed, name),
    )
    .with_context(|| format!("initialising `{name}` on the GPU"))?;
    Ok(t)
}

pub fn run(
    ordinal: usize,
    g: &BenchGraph,
    prog: &Program,
    inputs: &HashMap<String, HostTensor>,
    opts: &BenchOptions,
) -> Result<Measured> {
    let BenchOptions {
        seed,
        lr,
        warmup,
        steps,
        ..
    } = *opts;
    let t0 = Instant::now();
    let gpu = CudaBackend::new(ordinal)?;
    let be = Counting::new(&gpu, storage_bytes);
    let kernels = TrainKernels::new(&gpu)?;
    let mut frozen = HashMap::new();
    for (name, id) in g.graph.weights() {
        let Op::Weight { ty, .. } = &g.graph.node(id).op else {
            continue;
        };
        if !frozen.contains_key(&name) && !g.trainable.iter().any(|(n, _)| *n == name) {
            let t = device_tensor(&gpu, &kernels, &name, ty, seed)?;
            be.hold(storage_bytes(&t));
            frozen.insert(name, t);
        }
    }
    let mut trainable = Vec::with_capacity(g.trainable.len());
    for (name, ty) in &g.trainable {
        let t = device_tensor(&gpu, &kernels, name, ty, seed)?;
        be.hold(storage_bytes(&t));
        trainable.push(t);
    }
    let types: Vec<TensorType> = g.trainable.iter().map(|(_, ty)| ty.clone()).collect();
    let mut adam = DeviceAdam::new(&gpu, AdamHyper::default(), &types)?;
    be.hold(adam.state_bytes());
    let names = g.trainable.iter().map(|(n, _)| n.clone()).collect();
    let mut w = Weights::new(names, trainable, frozen);
    gpu.synchronize()?;
    let setup_s = t0.elapsed().as_secs_f64();

    let used = || -> Result<usize> {
        let (free, total) = device_memory(&gpu)?;
        Ok(total - free)
    };
    let device_used = Cell::new(used()?);
    let mut last_loss: Option<CudaTensor> = None;
    let step_s = time_steps(warmup, steps, &|| Ok(gpu.synchronize()?), &mut || {
        let (loss, grads) = forward_backward(&be, prog, &w, inputs)?;
        // The executor has synchronised for its host-side checks by now, so the
        // device-wide figure includes this step's activations still held by the pool.
        device_used.set(device_used.get().max(used()?));
        let mut params: Vec<&mut CudaTensor> = w.trainable.iter_mut().collect();
        let grad_refs: Vec<&CudaTensor> = grads.iter().collect();
        // With QPLC_PROFILE the optimiser's time follows the graph's per-op report.
        let profile = crate::executor::profiling();
        let t = std::time::Instant::now();
        adam.step(&gpu, lr, &mut params, &grad_refs)?;
        if profile {
            gpu.synchronize()?;
            eprintln!("adam step: {:.2} ms", t.elapsed().as_secs_f64() * 1e3);
        }
        if let Some(l) = last_loss.replace(loss) {
            be.release(l);
        }
        for g in grads {
            be.release(g);
        }
        Ok(())
    })?;
    let loss = match last_loss {
        Some(l) => gpu.download(&l)?.as_f32()[0] as f64,
        None => f64::NAN,
    };
    Ok(Measured {
        step_s,
        loss,
        peak_bytes: be.peak_bytes(),
        device_used_bytes: Some(device_used.get()),
        device: gpu.device_name(),
        setup_s,
    })
}
