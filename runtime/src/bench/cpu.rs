//! `qplc bench --backend cpu`: host weights, the CPU reference backend, host Adam
//! (`train::adam`, the maths the device kernel reproduces).
use super::counting::Counting;
use super::graph::BenchGraph;
use super::random::{host_tensor, tensor_seed, Init};
use super::step::{forward_backward, time_steps, Measured, Weights};
use super::BenchOptions;
use crate::backend::Backend;
use crate::executor::Program;
use crate::train::adam::{AdamHyper, AdamState};
use crate::{CpuBackend, HostTensor};
use anyhow::Result;
use qplc_ops::Op;
use std::collections::HashMap;
use std::time::Instant;

fn host_bytes(t: &HostTensor) -> usize {
    t.ty.shape.numel() * 4
}

pub fn run(
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
    let cpu = CpuBackend::new();
    let be = Counting::new(&cpu, host_bytes);
    let mut frozen = HashMap::new();
    for (name, id) in g.graph.weights() {
        let Op::Weight { ty, .. } = &g.graph.node(id).op else {
            continue;
        };
        if !frozen.contains_key(&name) && !g.trainable.iter().any(|(n, _)| *n == name) {
            let t = host_tensor(ty, Init::for_weight(&name, ty), tensor_seed(seed, &name));
            be.hold(host_bytes(&t));
            frozen.insert(name, t);
        }
    }
    let trainable: Vec<HostTensor> = g
        .trainable
        .iter()
        .map(|(n, ty)| host_tensor(ty, Init::for_weight(n, ty), tensor_seed(seed, n)))
        .collect();
    let names = g.trainable.iter().map(|(n, _)| n.clone()).collect();
    let shapes: Vec<_> = g
        .trainable
        .iter()
        .map(|(_, ty)| (ty.shape.numel(), ty.dtype))
        .collect();
    let mut adam = AdamState::new(AdamHyper::default(), &shapes);
    for (t, st) in trainable.iter().zip(&adam.params) {
        be.hold(
            host_bytes(t)
                + 4 * (st.exp_avg.len() * 2 + st.kahan_comp.as_ref().map_or(0, |c| c.len())),
        );
    }
    let mut w = Weights::new(names, trainable, frozen);
    let setup_s = t0.elapsed().as_secs_f64();
    let mut last_loss = f64::NAN;
    let step_s = time_steps(warmup, steps, &|| Ok(()), &mut || {
        let (loss, grads) = forward_backward(&be, prog, &w, inputs)?;
        let mut params: Vec<&mut [f32]> = w.trainable.iter_mut().map(|t| t.as_f32_mut()).collect();
        let g: Vec<&[f32]> = grads.iter().map(|t| t.as_f32()).collect();
        adam.step(lr, &mut params, &g);
        last_loss = loss.as_f32()[0] as f64;
        be.release(loss);
        for g in grads {
            be.release(g);
        }
        Ok(())
    })?;
    Ok(Measured {
        step_s,
        loss: last_loss,
        peak_bytes: be.peak_bytes(),
        device_used_bytes: None,
        device: "cpu".into(),
        setup_s,
    })
}
