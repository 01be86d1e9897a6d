//! `qplc run`: the training loop of spec §8.5 / §9 on the CPU backend, single process
//! (DP = 1; with `pipeline_stages > 1` the whole graph still runs in this one process — the
//! partition is reported but pipelining needs the CUDA backend). Every piece it calls is
//! tested on its own (train/, log/, data/, peft, passes); this module only sequences them.
mod run_dir;
pub mod state;

use crate::adapter_init::init_lora_weights;
use crate::ca_files::{control_adapter_config, write_control_adapter};
use crate::checkpoint::Checkpoint;
use crate::data::cache::SplitView;
use crate::data::pipeline::prepare;
use crate::data::sampler::{DistributedSampler, Loader};
use crate::executor::Program;
use crate::hf_weights::{write_full_model, SHARD_LIMIT};
use crate::log::console::{self, TRAINING_COMPLETE};
use crate::log::progress::Progress;
use crate::log::scalars::{aggregate, step_scalars, StepMetrics};
use crate::log::tfevents::EventWriter;
use crate::model::ModelDir;
use crate::peft::{write_adapter, AdapterConfig};
use crate::tokenizer::Tokenizer;
use crate::train::adam::{AdamHyper, AdamState};
use crate::train::checkpoint_policy::{
    checkpoints_to_prune, list_checkpoint_dirs, remove_checkpoint_dir, Backoff, CheckpointTimer,
};
use crate::train::clip::clip_global_norm;
use crate::train::control_reg::{
    check_control_settings, init_control_weights, regularise_control, ControlMetrics,
};
use crate::train::eval_schedule::is_eval_step;
use crate::train::lora_decay::{check_decay_dtype, decay_lora_pair, lora_product_norm, LoraShape};
use crate::train::schedule::Schedule;
use crate::train::step_accounting::epoch_ended_by;
use crate::HostTensor;
use anyhow::{bail, Context, Result};
use qplc_compiler::config::{LoadedConfig, Mode};
use qplc_compiler::Graph;
use qplc_ops::{dropout, DType, Op};
use qplc_passes::{
    control_weight_name, grad_output_name, parse_control_weight_name, AccumulatePass, AutodiffPass,
    ControlPass, ControlRole, FullFtPass, FuseElementwisePass, FusePass, LoraPass, LossPass,
    PassContext, PassManager, RecomputePass, SimplifyPass, CONTROL_CLASSES, DROPOUT_KEY,
};
use state::TrainState;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Instant;

/// Seed of the adapter initialisation (the reference sets none; a fixed one makes runs
/// reproducible).
pub const INIT_SEED: u64 = 42;

pub struct RunOptions {
    pub resume: bool,
    /// Where the forward/backward programs run (`qplc run --backend`).
    pub backend: crate::step_runner::BackendChoice,
}

pub struct RunSummary {
    pub run_dir: PathBuf,
    pub global_step: u64,
    /// Train loss of every step this process ran, with its step number.
    pub losses: Vec<(u64, f64)>,
    pub last_eval_loss: Option<f64>,
}

struct Trainable {
    names: Vec<String>,
    dtypes: Vec<DType>,
}

pub fn run(cfg: &LoadedConfig, opts: &RunOptions) -> Result<RunSummary> {
    let c = &cfg.config;
    let mode = cfg.mode();
    let output_dir = cfg.output_dir()?;
    let run_dir = if opts.resume {
        run_dir::latest(&output_dir)?
    } else {
        run_dir::create(&output_dir, &cfg.path)?
    };

    // Graph: forward → adapters / trainable marks → loss → backward.
    let model = ModelDir::open(&cfg.model_dir()?, cfg.model_definition().as_deref())?;
    let seq_len = cfg.sequence_len();
    let built = model.build(seq_len, DType::F32)?;
    let mut passes = PassManager::new();
    let mut lora = None;
    let mut control = None;
    match mode {
        Mode::Lora => {
            let p = LoraPass::from_config(cfg)?;
            passes.add(p.clone());
            lora = Some(p);
        }
        Mode::ControlAdapter => {
            let p = ControlPass::from_config(cfg)?;
            passes.add(p.clone());
            control = Some(p);
        }
        Mode::FullFineTune => {
            passes.add(FullFtPass::from_config(cfg)?);
        }
    }
    passes
        .add(LossPass)
        .add(AutodiffPass)
        .add(FusePass::standard())
        .add(SimplifyPass)
        .add(RecomputePass::from_config(cfg)?)
        .add(AccumulatePass)
        .add(FuseElementwisePass::from_config(cfg));
    let mut cx = PassContext::new(seq_len, c.pipeline_stages as usize, &cfg.partition_method());
    cx.num_layers = Some(built.info.num_layers);
    let graph = passes.run(built.graph, &mut cx)?.graph;
    let trainable = trainable_weights(&graph);
    if trainable.names.is_empty() {
        bail!("nothing is trainable: check target_modules / layers_to_transform");
    }
    if control.is_some() {
        // spec §3.8: the reference checks these at the first regularisation; the values
        // are known now, so a bad config fails before any work.
        for d in &trainable.dtypes {
            check_control_settings(c.control_adapter_gamma, c.lora_weight_decay, *d)?;
        }
    } else if c.lora_weight_decay > 0.0 {
        for d in &trainable.dtypes {
            check_decay_dtype(c.lora_weight_decay, *d)?;
        }
    }

    // Weights: base from the checkpoint, adapters freshly initialised.
    let ckpt = Checkpoint::open(&model.dir)?;
    let mut weights: HashMap<String, HostTensor> = init_lora_weights(&graph, INIT_SEED);
    weights.extend(init_control_weights(&graph, INIT_SEED)?);
    for (name, id) in graph.weights() {
        if weights.contains_key(&name) {
            continue;
        }
        let Op::Weight { ty, .. } = &graph.node(id).op else {
            unreachable!()
        };
        weights.insert(name.clone(), ckpt.load(&name, ty)?);
    }

    // Data (spec §4): cached under the run directory, so a resume reuses it.
    let tok = Tokenizer::open(&model.dir)?;
    let prepared = prepare(cfg, &tok, &run_dir.join("data"), &|_| {})?;
    let data = prepared.dataset;
    let (train, eval) = (data.train(), data.eval());
    for (split, view) in [("train", &train), ("eval", &eval)] {
        console::info(&console::data_size_message(
            split,
            view.len() as u64,
            (view.len() * seq_len) as u64,
        ));
    }
    let gas = c.gradient_accumulation_steps as usize;
    let eval_gas = c
        .eval_gradient_accumulation_steps
        .unwrap_or(c.gradient_accumulation_steps) as usize;
    let sampler = DistributedSampler::new(train.len(), gas, 1, 0)?;
    let eval_sampler = DistributedSampler::new(eval.len(), eval_gas, 1, 0)?;
    let spe = sampler.steps_per_epoch() as u64;
    let total = spe * c.epochs as u64;
    let mut loader = Loader::new(sampler);

    let hyper = AdamHyper {
        beta1: c.beta1,
        beta2: c.beta2,
        eps: c.eps,
    };
    let shapes: Vec<(usize, DType)> = trainable
        .names
        .iter()
        .zip(&trainable.dtypes)
        .map(|(n, d)| (weights[n].shape().numel(), *d))
        .collect();
    let mut adam = AdamState::new(hyper, &shapes);
    let mut schedule = Schedule::new(c.lr.expect("validated"), c.beta2);
    let mut global_step = 0u64;
    let mut last_eval: Option<f64> = None;

    if opts.resume {
        if let Some((st, tensors)) = state::load_latest(&run_dir)? {
            if st.tensor_names != trainable.names {
                bail!(
                    "the checkpoint in `{}` trains different tensors than this config (changed target_modules or layers?)",
                    run_dir.display()
                );
            }
            for (name, t) in tensors {
                let w = weights
                    .get_mut(&name)
                    .context("checkpoint tensor not in graph")?;
                w.as_f32_mut().copy_from_slice(t.as_f32());
            }
            // Optimiser hyper-parameters come from the checkpoint, as in the reference
            // (spec §8.4); the schedule re-reads beta2 from the config.
            adam = st.optimizer;
            schedule = Schedule::restore(st.schedule, c.beta2);
            global_step = st.global_step;
            loader.restore(st.loader_pulled);
            last_eval = st.last_eval_loss;
            let epoch = global_step / spe + 1;
            console::info(&console::resume_message(epoch, global_step));
        }
    }

    let runner = crate::step_runner::StepRunner::new(opts.backend, &weights, &trainable.names)?;
    let mut outputs: Vec<String> = vec!["loss".into()];
    outputs.extend(trainable.names.iter().map(|n| grad_output_name(n)));
    let out_refs: Vec<&str> = outputs.iter().map(String::as_str).collect();
    let train_prog = Program::new(&graph, &out_refs)?;
    let eval_prog = Program::new(&graph, &["loss"])?;

    let mut events = EventWriter::create(&run_dir)?;
    let wd_active = c.lora_weight_decay > 0.0;
    let mut progress = Progress::new(global_step, total, gas as u64);
    let eval_loss = |weights: &HashMap<String, HostTensor>| -> Result<f64> {
        let mut eval_loader = Loader::new(eval_sampler.clone());
        let mut step_losses = Vec::new();
        for _ in 0..eval_sampler.steps_per_epoch() {
            let batch = eval_loader.next_batch();
            let mut sum = 0.0;
            for mb in &batch.micro_batches {
                let mut inputs = micro_batch_inputs(&eval, mb[0]);
                inputs.insert(DROPOUT_KEY, dropout_key(0, 0, false));
                let r = runner.run(&eval_prog, weights, &inputs)?;
                sum += r.get("loss").expect("loss output").as_f32()[0] as f64;
            }
            step_losses.push(sum / batch.micro_batches.len() as f64);
        }
        Ok(step_losses.iter().sum::<f64>() / step_losses.len() as f64)
    };

    if last_eval.is_none() {
        progress.begin_eval();
        let l = eval_loss(&weights)?;
        progress.end_eval();
        progress.info(&console::initial_eval_message(l));
        events.add_scalar("eval/loss", l as f32, global_step as i64)?;
        last_eval = Some(l);
    }

    let mut timer = CheckpointTimer::new(c.checkpoint_interval_hours, Instant::now());
    let mut losses = Vec::new();
    while global_step < total {
        let k = global_step + 1;
        // Forward/backward of GAS micro-batches; each micro-batch's gradient is scaled by
        // 1/GAS, so every sequence weighs the same (spec §7).
        let batch = loader.next_batch();
        let mut grads: Vec<Vec<f32>> = shapes.iter().map(|(n, _)| vec![0.0; *n]).collect();
        let mut loss_sum = 0.0;
        for (m, mb) in batch.micro_batches.iter().enumerate() {
            let mut inputs = micro_batch_inputs(&train, mb[0]);
            inputs.insert(DROPOUT_KEY, dropout_key(k, m, true));
            let r = runner.run(&train_prog, &weights, &inputs)?;
            loss_sum += r.get("loss").expect("loss output").as_f32()[0] as f64;
            for (g, name) in grads.iter_mut().zip(&trainable.names) {
                let gi = r.get(&grad_output_name(name)).expect("grad output");
                for (a, b) in g.iter_mut().zip(gi.as_f32()) {
                    *a += b / gas as f32;
                }
            }
        }
        let loss = loss_sum / batch.micro_batches.len() as f64;

        {
            let mut refs: Vec<(&mut [f32], DType)> = grads
                .iter_mut()
                .zip(&trainable.dtypes)
                .map(|(g, d)| (g.as_mut_slice(), *d))
                .collect();
            clip_global_norm(&mut refs);
        }
        let lr_opt = schedule.optimizer_lr(k);
        {
            let mut params: Vec<&mut [f32]> = Vec::new();
            // Distinct names, so the mutable borrows are disjoint.
            let mut by_name: HashMap<&str, &mut HostTensor> =
                weights.iter_mut().map(|(n, t)| (n.as_str(), t)).collect();
            for n in &trainable.names {
                params.push(by_name.remove(n.as_str()).expect("trainable").as_f32_mut());
            }
            let grefs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
            adam.step(lr_opt, &mut params, &grefs);
        }
        schedule.advance();
        let eta = schedule.logged_lr(k);

        let mut metrics = StepMetrics {
            loss,
            lr: eta,
            ..Default::default()
        };
        if lora.is_some() {
            let (norms, decays) = regularise_lora(&graph, &mut weights, eta, c.lora_weight_decay);
            metrics.norms = aggregate(&norms);
            metrics.weight_decay = aggregate(&decays);
        }
        if control.is_some() {
            let m = regularise_controls(
                &mut weights,
                c.control_adapter_gamma,
                eta,
                c.lora_weight_decay,
            );
            metrics.norms = aggregate(&m.iter().map(|m| m.norm).collect::<Vec<_>>());
            metrics.orthogonality =
                aggregate(&m.iter().map(|m| m.orthogonality).collect::<Vec<_>>());
            metrics.weight_decay =
                aggregate(&m.iter().filter_map(|m| m.weight_decay).collect::<Vec<_>>());
        }
        global_step = k;
        losses.push((k, loss));
        events.add_scalars(&step_scalars(mode, wd_active, &metrics), k as i64)?;
        progress.step(k, loss, eta);
        if control.is_some() {
            progress.info(&control_metrics_message(&metrics, wd_active));
        }

        if is_eval_step(k, spe, c.evals_per_epoch) {
            progress.begin_eval();
            let l = eval_loss(&weights)?;
            progress.end_eval();
            progress.info(&console::eval_message(l, last_eval.unwrap_or(l)));
            events.add_scalar("eval/loss", l as f32, k as i64)?;
            last_eval = Some(l);
        }
        events.flush()?;

        let ended = epoch_ended_by(k, spe);
        let epoch_end = ended.is_some();
        if timer.decide(epoch_end, Instant::now()).is_some() {
            let st = TrainState {
                global_step: k,
                optimizer: adam.clone(),
                schedule: schedule.state(),
                loader_pulled: loader.state(),
                last_eval_loss: last_eval,
                tensor_names: trainable.names.clone(),
            };
            let tensors: BTreeMap<String, HostTensor> = trainable
                .names
                .iter()
                .map(|n| (n.clone(), weights[n].clone()))
                .collect();
            state::save(&run_dir, &st, &tensors)?;
            let names = list_checkpoint_dirs(&run_dir)?;
            for old in checkpoints_to_prune(names.iter().map(String::as_str), c.max_checkpoints) {
                progress.info(&console::prune_message(&old));
                remove_checkpoint_dir(&run_dir.join(&old), Backoff::default())?;
            }
        }
        if let Some(epoch) = ended {
            let dir = run_dir.join(format!("epoch{epoch}"));
            save_model(
                cfg,
                &model,
                &graph,
                &weights,
                lora.as_ref(),
                control.as_ref(),
                &dir,
            )?;
        }
    }
    progress.info(TRAINING_COMPLETE);
    progress.finish();
    events.flush()?;
    Ok(RunSummary {
        run_dir,
        global_step,
        losses,
        last_eval_loss: last_eval,
    })
}

fn trainable_weights(graph: &Graph) -> Trainable {
    let mut list: Vec<(String, DType)> = graph
        .weights()
        .into_iter()
        .filter(|(_, id)| graph.node(*id).trainable)
        .map(|(n, id)| (n, graph.node(id).ty.dtype))
        .collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    list.dedup_by(|a, b| a.0 == b.0);
    Trainable {
        names: list.iter().map(|(n, _)| n.clone()).collect(),
        dtypes: list.iter().map(|(_, d)| *d).collect(),
    }
}

/// The graph inputs of one packed sequence: ids, positions, labels and the (unshifted)
/// per-token control classes, which only Control Adapter graphs read.
fn micro_batch_inputs(split: &SplitView, index: usize) -> HashMap<&'static str, HostTensor> {
    let s = split.sequence(index);
    let t = s.input_ids.len();
    HashMap::from([
        (
            "input_ids",
            HostTensor::i32([t], s.input_ids.iter().map(|&x| x as i32).collect()),
        ),
        (
            "position_ids",
            HostTensor::i32([t], (0..t as i32).collect()),
        ),
        ("labels", HostTensor::i32([t], s.labels.to_vec())),
        (
            CONTROL_CLASSES,
            HostTensor::i32([t], s.classes.iter().map(|&c| c as i32).collect()),
        ),
    ])
}

/// The `dropout_key` input (spec §6.1.2): fresh masks for every micro-batch of every step,
/// derived from the run seed, the step and the micro-batch index only, so a resumed run
/// draws the masks of an uninterrupted one; `active = false` (evaluation) makes dropout the
/// identity. Graphs without dropout ignore it.
fn dropout_key(step: u64, micro_batch: usize, active: bool) -> HostTensor {
    let seed = dropout::micro_batch_seed(INIT_SEED, step, micro_batch as u64);
    HostTensor::i32([3], dropout::key_words(seed, active).to_vec())
}

/// Composite LoRA decay (spec §6.1.4) and the per-pair norms, after the optimiser step.
fn regularise_lora(
    graph: &Graph,
    weights: &mut HashMap<String, HostTensor>,
    eta: f64,
    lambda: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut norms = Vec::new();
    let mut decays = Vec::new();
    let mut a_names: Vec<String> = graph
        .weights()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.ends_with(".lora_A.weight"))
        .collect();
    a_names.sort();
    a_names.dedup();
    for a_name in a_names {
        let b_name = a_name.replace(".lora_A.weight", ".lora_B.weight");
        let (Some(mut a), Some(mut b)) = (weights.remove(&a_name), weights.remove(&b_name)) else {
            continue;
        };
        let (r, inf) = (a.shape().dims()[0], a.shape().dims()[1]);
        let out = b.shape().dims()[0];
        let shape = LoraShape {
            rank: r,
            in_features: inf,
            out_features: out,
        };
        if lambda > 0.0 {
            let m = decay_lora_pair(a.as_f32_mut(), b.as_f32_mut(), shape, eta, lambda);
            norms.push(m.norm);
            if let Some(d) = m.weight_decay {
                decays.push(d);
            }
        } else {
            norms.push(lora_product_norm(a.as_f32(), b.as_f32(), shape));
        }
        weights.insert(a_name, a);
        weights.insert(b_name, b);
    }
    (norms, decays)
}

/// The Control Adapter statistics of a step for the console (the same values as the
/// `train/norms_*`, `train/orthogonality_*`, `train/weight_decay_*` scalars, spec §6.2.7).
fn control_metrics_message(m: &StepMetrics, wd_active: bool) -> String {
    let f = |name: &str, s: &crate::log::scalars::Stats| {
        format!("{name}: {:.3e} [{:.3e}, {:.3e}]", s.avg, s.min, s.max)
    };
    let mut parts = vec![f("norms", &m.norms), f("orthogonality", &m.orthogonality)];
    if wd_active {
        parts.push(f("weight_decay", &m.weight_decay));
    }
    format!("control adapters (avg [min, max]): {}", parts.join(", "))
}

/// Newton retraction and S shrinkage of every Control Adapter (spec §6.2.5–§6.2.7), after
/// the optimiser step with η = lr·f(k).
fn regularise_controls(
    weights: &mut HashMap<String, HostTensor>,
    gamma: f64,
    eta: f64,
    decay: f64,
) -> Vec<ControlMetrics> {
    let mut layers: Vec<usize> = weights
        .keys()
        .filter_map(|n| parse_control_weight_name(n))
        .filter(|(_, r)| *r == ControlRole::Q)
        .map(|(l, _)| l)
        .collect();
    layers.sort();
    let mut out = Vec::new();
    for l in layers {
        let (qn, sn) = (
            control_weight_name(l, ControlRole::Q),
            control_weight_name(l, ControlRole::S),
        );
        let (Some(mut q), Some(mut s)) = (weights.remove(&qn), weights.remove(&sn)) else {
            continue;
        };
        let (h, r) = (q.shape().dims()[0], q.shape().dims()[1]);
        let dtype = q.ty.dtype;
        out.push(regularise_control(
            q.as_f32_mut(),
            s.as_f32_mut(),
            h,
            r,
            dtype,
            gamma,
            eta,
            decay,
        ));
        weights.insert(qn, q);
        weights.insert(sn, s);
    }
    out
}

/// `epochN/` (spec §9.6): a PEFT adapter, or the full weights as HF safetensors plus the
/// model folder's config and tokenizer files.
fn save_model(
    cfg: &LoadedConfig,
    model: &ModelDir,
    graph: &Graph,
    weights: &HashMap<String, HostTensor>,
    lora: Option<&LoraPass>,
    control: Option<&ControlPass>,
    dir: &std::path::Path,
) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    match (lora, control) {
        (Some(pass), _) => {
            let base = cfg.model_dir()?.display().to_string();
            let acfg = AdapterConfig::from_pass(pass, graph, &base)?;
            write_adapter(&tmp, graph, weights, &acfg)?;
        }
        (None, Some(pass)) => {
            let base = cfg.model_dir()?.display().to_string();
            let mut layers: Vec<usize> = graph
                .weights()
                .iter()
                .filter_map(|(n, _)| parse_control_weight_name(n))
                .map(|(l, _)| l)
                .collect();
            layers.sort();
            layers.dedup();
            let acfg = control_adapter_config(pass.rank, pass.dropout, pass.layers.clone(), &base);
            write_control_adapter(&tmp, weights, &layers, &acfg)?;
        }
        // Shards of ≤ 5 GB with an index when the state dict is larger (spec §9.6).
        (None, None) => {
            write_full_model(&tmp, &model.dir, weights, SHARD_LIMIT)?;
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::rename(&tmp, dir)?;
    Ok(())
}
