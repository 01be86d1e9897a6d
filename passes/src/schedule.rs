//! Per-stage execution order and activation memory plan. Each stage runs its ops in the
//! graph's deterministic topological order; every value the stage holds gets a byte range
//! in one arena, shared between values whose lifetimes do not overlap (see `memory`).
use crate::memory::{align_up, assign_offsets, LiveRange, MemoryOptions};
use qplc_compiler::dump::node_flops;
use qplc_compiler::{BufferAssignment, Graph, GraphError, NodeId, Partition, StagePlan};
use qplc_ops::Op;
use std::collections::{BTreeSet, HashMap};

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(
        "node %{0} has no stage; the partition is stale (run the partition pass after the \
         last rewrite)"
    )]
    NoStage(usize),
}

/// One [`StagePlan`] per stage of the partition.
pub fn schedule(
    graph: &Graph,
    partition: &Partition,
    opts: &MemoryOptions,
) -> Result<Vec<StagePlan>, ScheduleError> {
    let topo = graph.topo_order()?;
    let stage_of = |id: NodeId| {
        partition
            .stage_of(id)
            .ok_or(ScheduleError::NoStage(id.index()))
    };
    for &id in &topo {
        stage_of(id)?;
    }
    let outputs: BTreeSet<NodeId> = graph.outputs.iter().map(|(_, id)| *id).collect();
    (0..partition.num_stages())
        .map(|s| {
            let order: Vec<NodeId> = topo
                .iter()
                .copied()
                .filter(|&id| {
                    stage_of(id).ok() == Some(s)
                        && !matches!(graph.node(id).op, Op::Input { .. } | Op::Weight { .. })
                })
                .collect();
            Ok(stage_plan(graph, partition, s, order, &outputs, opts))
        })
        .collect()
}

/// The outputs a step program asks for: a training graph (one with a `loss` output) runs
/// for the loss and the gradients (runtime/src/trainer, `qplc bench`), so the forward's
/// `logits` and `hidden` die at their last reader instead of living to the end of the
/// step — at Llama-3 vocabularies the bf16 logits alone are a gibibyte.
fn step_outputs(graph: &Graph) -> BTreeSet<NodeId> {
    let training = graph.output("loss").is_some();
    graph
        .outputs
        .iter()
        .filter(|(name, _)| !(training && (name == "logits" || name == "hidden")))
        .map(|(_, id)| *id)
        .collect()
}

/// The live ranges of one stage's values as the executor (runtime/src/executor.rs) holds
/// them: only the values the step's outputs (`step_outputs`) need run, in `Graph::topo_order`; an input
/// lives from its own step (it is uploaded there), a value arriving from another stage from
/// step 0; a value lives until its last reader on the stage, or to the end when it is an
/// output or is sent. Weights are the caller's and not counted. Sizes are the values' own,
/// unaligned, as `RunStats::peak_activation_bytes` counts them.
pub fn executor_live_ranges(
    graph: &Graph,
    partition: &Partition,
    stage: usize,
) -> Result<Vec<LiveRange>, ScheduleError> {
    use petgraph::visit::NodeIndexable;
    let results = step_outputs(graph);
    let mut needed = vec![false; graph.g.node_bound()];
    let mut stack: Vec<NodeId> = results.iter().copied().collect();
    while let Some(id) = stack.pop() {
        if !std::mem::replace(&mut needed[id.index()], true) {
            stack.extend(graph.operands(id));
        }
    }
    let on_stage = |id: NodeId| partition.stage_of(id) == Some(stage);
    let order: Vec<NodeId> = graph
        .topo_order()?
        .into_iter()
        .filter(|&id| {
            needed[id.index()] && on_stage(id) && !matches!(graph.node(id).op, Op::Weight { .. })
        })
        .collect();
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let outputs = results;
    let end = order.len();
    let last = |id: NodeId, first: usize| {
        let leaves = outputs.contains(&id)
            || graph
                .users(id)
                .iter()
                .any(|&u| needed[u.index()] && !on_stage(u));
        if leaves {
            return end;
        }
        graph
            .users(id)
            .iter()
            .filter_map(|u| pos.get(u).copied())
            .max()
            .unwrap_or(first)
    };
    let mut arriving = BTreeSet::new();
    for &id in &order {
        for o in graph.operands(id) {
            if !pos.contains_key(&o) && !matches!(graph.node(o).op, Op::Weight { .. }) {
                arriving.insert(o);
            }
        }
    }
    let size = |id: NodeId| graph.node(id).ty.bytes() as u64;
    Ok(arriving
        .iter()
        .map(|&id| LiveRange {
            first: 0,
            last: last(id, 0),
            size: size(id),
        })
        .chain(order.iter().enumerate().map(|(i, &id)| LiveRange {
            first: i,
            last: last(id, i),
            size: size(id),
        }))
        .collect())
}

fn stage_plan(
    graph: &Graph,
    partition: &Partition,
    stage: usize,
    order: Vec<NodeId>,
    outputs: &BTreeSet<NodeId>,
    opts: &MemoryOptions,
) -> StagePlan {
    let on_stage = |id: NodeId| partition.stage_of(id) == Some(stage);
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut inputs = BTreeSet::new();
    let mut weights = BTreeSet::new();
    let mut receives = BTreeSet::new();
    for &id in &order {
        for o in graph.operands(id) {
            match graph.node(o).op {
                Op::Input { .. } => {
                    inputs.insert(o);
                }
                Op::Weight { .. } => {
                    weights.insert(o);
                }
                _ if !on_stage(o) => {
                    receives.insert(o);
                }
                _ => {}
            }
        }
    }
    // A weight nobody reads still belongs to its own stage (it is loaded and counted).
    for (_, w) in graph.weights() {
        if on_stage(w) && graph.users(w).is_empty() {
            weights.insert(w);
        }
    }
    let sends: Vec<NodeId> = order
        .iter()
        .copied()
        .filter(|&id| outputs.contains(&id) || graph.users(id).iter().any(|&u| !on_stage(u)))
        .collect();
    let sent: BTreeSet<NodeId> = sends.iter().copied().collect();

    // Liveness: a value lives from the step that writes it (0 for values arriving from
    // outside the stage) to its last reader on this stage; values leaving the stage live
    // to the end (`order.len()`), until they have been sent.
    let end = order.len();
    let last_read = |id: NodeId| {
        graph
            .users(id)
            .iter()
            .filter_map(|u| pos.get(u).copied())
            .max()
    };
    let mut held: Vec<(NodeId, usize, usize)> = Vec::new();
    for &id in inputs.iter().chain(receives.iter()) {
        let last = if outputs.contains(&id) {
            end
        } else {
            last_read(id).unwrap_or(0)
        };
        held.push((id, 0, last));
    }
    for (i, &id) in order.iter().enumerate() {
        let last = if sent.contains(&id) {
            end
        } else {
            last_read(id).unwrap_or(i)
        };
        held.push((id, i, last));
    }
    let ranges: Vec<LiveRange> = held
        .iter()
        .map(|&(id, first, last)| LiveRange {
            first,
            last,
            size: align_up(graph.node(id).ty.bytes() as u64, opts.alignment),
        })
        .collect();
    let (offsets, arena_bytes) = assign_offsets(&ranges, opts.alignment);
    let buffers = held
        .iter()
        .zip(&ranges)
        .zip(&offsets)
        .map(|((&(node, first, last), r), &offset)| BufferAssignment {
            node,
            offset,
            size: r.size,
            first_step: first,
            last_step: last,
        })
        .collect();

    let weight_nodes: Vec<NodeId> = weights.into_iter().collect();
    let sum = |f: &dyn Fn(NodeId) -> u64| weight_nodes.iter().map(|&w| f(w)).sum::<u64>();
    let weight_bytes = sum(&|w| graph.node(w).ty.bytes() as u64);
    let params = sum(&|w| graph.node(w).ty.shape.numel() as u64);
    let trainable_params = sum(&|w| {
        let n = graph.node(w);
        if n.trainable {
            n.ty.shape.numel() as u64
        } else {
            0
        }
    });
    let flops = order.iter().map(|&id| node_flops(graph, id)).sum();
    let range = partition.layer_range(stage);
    StagePlan {
        stage,
        layers: (range.start, range.end),
        inputs: inputs.into_iter().collect(),
        weights: weight_nodes,
        receives: receives.into_iter().collect(),
        sends,
        order,
        buffers,
        arena_bytes,
        weight_bytes,
        params,
        trainable_params,
        flops,
    }
}

/// The schedule as text, one block per stage and one line per step with the buffer it
/// writes (`@offset+size`) and its lifetime — for `qplc inspect` and golden tests.
pub fn schedule_text(graph: &Graph, stages: &[StagePlan]) -> String {
    use qplc_compiler::dump::value_name;
    use std::fmt::Write;
    let names = |ids: &[NodeId]| {
        if ids.is_empty() {
            return "(none)".to_string();
        }
        ids.iter()
            .map(|&i| value_name(i))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = String::new();
    for s in stages {
        let _ = writeln!(
            out,
            "stage {}: layers {}..{}, arena {} B, weights {} B, {} FLOPs",
            s.stage, s.layers.0, s.layers.1, s.arena_bytes, s.weight_bytes, s.flops
        );
        let _ = writeln!(out, "  inputs: {}", names(&s.inputs));
        let _ = writeln!(out, "  weights: {}", names(&s.weights));
        let _ = writeln!(out, "  receives: {}", names(&s.receives));
        let buf: HashMap<NodeId, &BufferAssignment> =
            s.buffers.iter().map(|b| (b.node, b)).collect();
        for &id in s.inputs.iter().chain(&s.receives).chain(&s.order) {
            let b = buf[&id];
            let what = if s.order.contains(&id) {
                graph.node(id).op.name()
            } else {
                "(arrives)"
            };
            let _ = writeln!(
                out,
                "  {} {what} @{}+{} live {}..={}",
                value_name(id),
                b.offset,
                b.size,
                b.first_step,
                b.last_step
            );
        }
        let _ = writeln!(out, "  sends: {}", names(&s.sends));
    }
    out
}
