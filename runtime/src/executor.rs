//! Runs a whole `Graph` on any `Backend` (DESIGN.md "Runtime"): binds inputs and weights
//! by name, executes the nodes needed for the requested outputs in `Graph::topo_order`,
//! frees every intermediate right after its last use, and reports the peak of live
//! activation bytes (weights are borrowed from the caller and not counted).
//!
//! `Program` holds the per-graph analysis (order, operands, last uses) so that scoring
//! many sequences through one graph analyses it once.
use crate::backend::{Backend, InPlace, KernelError};
use crate::HostTensor;
use petgraph::visit::NodeIndexable;
use qplc_compiler::{Graph, GraphError, NodeId};
use qplc_ops::{Op, TensorType};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("the graph has no output named `{name}` (it has: {available})")]
    UnknownOutput { name: String, available: String },
    #[error("input `{name}` ({expected}) was not provided")]
    MissingInput { name: String, expected: TensorType },
    #[error("weight `{name}` ({expected}) was not found among the loaded weights")]
    MissingWeight { name: String, expected: TensorType },
    #[error("{kind} `{name}`: the graph expects {expected} but was given {got}")]
    TypeMismatch {
        kind: &'static str,
        name: String,
        expected: TensorType,
        got: TensorType,
    },
    #[error("node {node} ({op}) in module `{module}`: {source}")]
    Kernel {
        node: usize,
        op: &'static str,
        module: String,
        #[source]
        source: KernelError,
    },
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct RunStats {
    /// Largest sum of live activation bytes (inputs, intermediates, outputs; weights
    /// excluded), counted at each tensor's logical dtype size as a device plan would.
    pub peak_activation_bytes: usize,
    /// Activation bytes still live at the end: the outputs.
    pub final_activation_bytes: usize,
    pub nodes_executed: usize,
    /// Intermediates released before the end of the run.
    pub buffers_freed: usize,
    /// Wall time and call count per op name, for profiling.
    pub op_time: BTreeMap<&'static str, (usize, Duration)>,
    /// With `QPLC_PROFILE=1`: wall time and call count per op and output shape (finer than
    /// `op_time`: it tells the head's product from a layer's).
    pub op_shape_time: BTreeMap<String, (usize, Duration)>,
}

impl RunStats {
    /// The `QPLC_PROFILE=1` report: ops by total time, then op × output shape.
    pub fn profile_report(&self) -> String {
        use std::fmt::Write;
        let total: Duration = self.op_time.values().map(|(_, d)| *d).sum();
        let pct = |d: Duration| 100.0 * d.as_secs_f64() / total.as_secs_f64().max(1e-12);
        let mut s = format!(
            "qplc profile: {} nodes, {:.1} ms in kernels\n",
            self.nodes_executed,
            total.as_secs_f64() * 1e3
        );
        let mut by_op: Vec<_> = self.op_time.iter().collect();
        by_op.sort_by_key(|(_, (_, d))| std::cmp::Reverse(*d));
        for (op, (n, d)) in by_op {
            let _ = writeln!(
                s,
                "  {op:<28} {n:>6} calls {:>10.2} ms {:>5.1}%",
                d.as_secs_f64() * 1e3,
                pct(*d)
            );
        }
        let mut by_shape: Vec<_> = self.op_shape_time.iter().collect();
        by_shape.sort_by_key(|(_, (_, d))| std::cmp::Reverse(*d));
        let _ = writeln!(s, "  top op × output type:");
        for (key, (n, d)) in by_shape.into_iter().take(25) {
            let _ = writeln!(
                s,
                "    {key:<60} {n:>6} calls {:>10.2} ms {:>5.1}%",
                d.as_secs_f64() * 1e3,
                pct(*d)
            );
        }
        s
    }
}

/// `QPLC_PROFILE=1` (any value but `0` or empty): every `Program::run` prints its per-op
/// time report to stderr when it ends.
pub(crate) fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("QPLC_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0"))
}

#[derive(Debug)]
pub struct RunResult {
    pub outputs: HashMap<String, HostTensor>,
    pub stats: RunStats,
}

impl RunResult {
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.outputs.get(name)
    }
}

/// The part of a graph needed for some outputs, in execution order, with liveness.
#[derive(Clone, Debug)]
pub struct Program<'g> {
    graph: &'g Graph,
    order: Vec<NodeId>,
    operands: Vec<Vec<NodeId>>,
    /// `free_after[p]`: values dead once step `p` has run.
    free_after: Vec<Vec<NodeId>>,
    /// `in_place[p]`: an operand position of step `p` whose value dies there, is read by
    /// no other operand slot of that step and has the output's type, so the backend may
    /// write the result over it.
    in_place: Vec<Option<usize>>,
    outputs: Vec<(String, NodeId)>,
}

impl<'g> Program<'g> {
    /// Plans the nodes `outputs` depend on (all of the graph's outputs when empty).
    pub fn new(graph: &'g Graph, outputs: &[&str]) -> Result<Self, ExecError> {
        let outputs: Vec<(String, NodeId)> = if outputs.is_empty() {
            graph.outputs.clone()
        } else {
            outputs
                .iter()
                .map(|&name| {
                    graph
                        .output(name)
                        .map(|id| (name.to_string(), id))
                        .ok_or_else(|| ExecError::UnknownOutput {
                            name: name.to_string(),
                            available: graph
                                .outputs
                                .iter()
                                .map(|(n, _)| format!("`{n}`"))
                                .collect::<Vec<_>>()
                                .join(", "),
                        })
                })
                .collect::<Result<_, _>>()?
        };
        // Only ancestors of the requested outputs run (scoring needs no loss, `hidden`
        // needs no head).
        let mut needed = vec![false; graph.g.node_bound()];
        let mut stack: Vec<NodeId> = outputs.iter().map(|(_, id)| *id).collect();
        while let Some(id) = stack.pop() {
            if graph.g.node_weight(id).is_none() {
                return Err(GraphError::MissingOperand(id).into());
            }
            if !std::mem::replace(&mut needed[id.index()], true) {
                stack.extend(graph.operands(id));
            }
        }
        let order: Vec<NodeId> = graph
            .topo_order()?
            .into_iter()
            .filter(|id| needed[id.index()])
            .collect();
        let operands: Vec<Vec<NodeId>> = order.iter().map(|&id| graph.operands(id)).collect();
        let mut last_use = vec![None; graph.g.node_bound()];
        for (p, ops) in operands.iter().enumerate() {
            for o in ops {
                last_use[o.index()] = Some(p);
            }
        }
        for (_, id) in &outputs {
            last_use[id.index()] = None;
        }
        let mut free_after = vec![Vec::new(); order.len()];
        for &id in &order {
            if let Some(p) = last_use[id.index()] {
                free_after[p].push(id);
            }
        }
        let in_place = order
            .iter()
            .enumerate()
            .map(|(p, &id)| {
                let ty = &graph.node(id).ty;
                let ops = &operands[p];
                ops.iter().position(|o| {
                    last_use[o.index()] == Some(p)
                        && ops.iter().filter(|x| *x == o).count() == 1
                        && same_bytes(&graph.node(*o).ty, ty)
                        && !matches!(graph.node(*o).op, Op::Weight { .. })
                })
            })
            .collect();
        Ok(Program {
            graph,
            order,
            operands,
            free_after,
            in_place,
            outputs,
        })
    }

    /// Nodes that will run, in order.
    pub fn order(&self) -> &[NodeId] {
        &self.order
    }

    /// Executes the program. `weights` maps HF tensor names to buffers already in the
    /// backend's memory (for the CPU backend, the loader's `HostTensor`s, borrowed, never
    /// copied); `inputs` maps input names to host tensors, uploaded here.
    pub fn run<'w, 'i, B: Backend>(
        &self,
        backend: &B,
        weights: &dyn Fn(&str) -> Option<&'w B::Buffer>,
        inputs: &dyn Fn(&str) -> Option<&'i HostTensor>,
    ) -> Result<RunResult, ExecError> {
        let (values, stats) = self.execute(backend, weights, inputs)?;
        let outputs = self.take_outputs(values, |slot, last| match slot {
            Slot::Owned(buf) if last => Ok((backend.download_owned(buf)?, None)),
            slot => Ok((backend.download(slot.get())?, Some(slot))),
        })?;
        if profiling() {
            eprint!("{}", stats.profile_report());
        }
        Ok(RunResult { outputs, stats })
    }

    /// Like [`Program::run`], but the outputs stay in the backend's memory: a device-resident
    /// training step (`qplc bench`) hands the gradients straight to a device optimiser
    /// instead of copying them to the host and back. An output that is not a fresh value of
    /// this run (a weight returned as is, or one node requested under two names) is copied
    /// through the host, since buffers cannot be shared; compiled training graphs have none.
    pub fn run_buffers<'w, 'i, B: Backend>(
        &self,
        backend: &B,
        weights: &dyn Fn(&str) -> Option<&'w B::Buffer>,
        inputs: &dyn Fn(&str) -> Option<&'i HostTensor>,
    ) -> Result<(HashMap<String, B::Buffer>, RunStats), ExecError> {
        let (values, stats) = self.execute(backend, weights, inputs)?;
        let outputs = self.take_outputs(values, |slot, last| match slot {
            Slot::Owned(buf) if last => Ok((buf, None)),
            slot => {
                let copy = backend
                    .download(slot.get())
                    .and_then(|h| backend.upload(&h))?;
                Ok((copy, Some(slot)))
            }
        })?;
        if profiling() {
            eprint!("{}", stats.profile_report());
        }
        Ok((outputs, stats))
    }

    /// Hands each output's slot to `take` (with whether this is the last name the node is
    /// requested under, so a buffer is moved out only then); `take` returns the value and,
    /// when it did not consume the slot, the slot to put back.
    #[allow(clippy::type_complexity)]
    fn take_outputs<'w, Buf, T>(
        &self,
        mut values: Vec<Option<Slot<'w, Buf>>>,
        mut take: impl FnMut(Slot<'w, Buf>, bool) -> Result<(T, Option<Slot<'w, Buf>>), KernelError>,
    ) -> Result<HashMap<String, T>, ExecError> {
        let mut outputs = HashMap::new();
        for (i, (name, id)) in self.outputs.iter().enumerate() {
            let node = self.graph.node(*id);
            let last = !self.outputs[i + 1..].iter().any(|(_, o)| o == id);
            let slot = values[id.index()].take().expect("outputs are never freed");
            let (value, back) = take(slot, last).map_err(|source| ExecError::Kernel {
                node: id.index(),
                op: node.op.name(),
                module: node.module.clone(),
                source,
            })?;
            values[id.index()] = back;
            outputs.insert(name.clone(), value);
        }
        Ok(outputs)
    }

    /// Runs every node in order and leaves the values of the outputs (and of nothing else)
    /// in the returned slots; `run` and `run_buffers` differ only in what they do with them.
    #[allow(clippy::type_complexity)]
    fn execute<'w, 'i, B: Backend>(
        &self,
        backend: &B,
        weights: &dyn Fn(&str) -> Option<&'w B::Buffer>,
        inputs: &dyn Fn(&str) -> Option<&'i HostTensor>,
    ) -> Result<(Vec<Option<Slot<'w, B::Buffer>>>, RunStats), ExecError> {
        let g = self.graph;
        let mut values: Vec<Option<Slot<'w, B::Buffer>>> =
            (0..g.g.node_bound()).map(|_| None).collect();
        let mut stats = RunStats::default();
        let mut live = 0usize;
        let profile = profiling();
        for (p, &id) in self.order.iter().enumerate() {
            let node = g.node(id);
            let mut consumed: Option<NodeId> = None;
            let kernel_err = |source: KernelError| ExecError::Kernel {
                node: id.index(),
                op: node.op.name(),
                module: node.module.clone(),
                source,
            };
            let slot = match &node.op {
                Op::Weight { name, ty } => {
                    let buf = weights(name).ok_or_else(|| ExecError::MissingWeight {
                        name: name.clone(),
                        expected: ty.clone(),
                    })?;
                    check_type("weight", name, ty, backend.buffer_type(buf))?;
                    Slot::Borrowed(buf)
                }
                Op::Input { name, ty } => {
                    let t = inputs(name).ok_or_else(|| ExecError::MissingInput {
                        name: name.clone(),
                        expected: ty.clone(),
                    })?;
                    check_type("input", name, ty, &t.ty)?;
                    Slot::Owned(backend.upload(t).map_err(kernel_err)?)
                }
                op => {
                    if profile {
                        // Charge queued work to the op that queued it, not to this one.
                        backend.synchronize().map_err(kernel_err)?;
                    }
                    let start = Instant::now();
                    let mut done = None;
                    if let Some(t) = self.in_place[p] {
                        let target = self.operands[p][t];
                        // Borrowed values (weights) are never written over.
                        if matches!(values[target.index()], Some(Slot::Owned(_))) {
                            let Some(Slot::Owned(buf)) = values[target.index()].take() else {
                                unreachable!("checked just above")
                            };
                            let others: Vec<&B::Buffer> = self.operands[p]
                                .iter()
                                .enumerate()
                                .filter(|(i, _)| *i != t)
                                .map(|(_, o)| {
                                    values[o.index()]
                                        .as_ref()
                                        .expect("operands run before their users")
                                        .get()
                                })
                                .collect();
                            match backend
                                .execute_in_place(op, t, buf, &others, &node.ty)
                                .map_err(kernel_err)?
                            {
                                InPlace::Done(out) => {
                                    consumed = Some(target);
                                    done = Some(out);
                                }
                                InPlace::Declined(buf) => {
                                    values[target.index()] = Some(Slot::Owned(buf))
                                }
                            }
                        }
                    }
                    let out = match done {
                        Some(out) => out,
                        None => {
                            let mut out = backend.alloc(&node.ty).map_err(kernel_err)?;
                            let args: Vec<&B::Buffer> = self.operands[p]
                                .iter()
                                .map(|o| {
                                    values[o.index()]
                                        .as_ref()
                                        .expect("operands run before their users")
                                        .get()
                                })
                                .collect();
                            backend.execute(op, &args, &mut out).map_err(kernel_err)?;
                            out
                        }
                    };
                    if profile {
                        backend.synchronize().map_err(kernel_err)?;
                    }
                    let took = start.elapsed();
                    let e = stats.op_time.entry(op.name()).or_default();
                    e.0 += 1;
                    e.1 += took;
                    if profile {
                        let key = format!("{} {} -> {}", op.name(), op_detail(op), node.ty);
                        let e = stats.op_shape_time.entry(key).or_default();
                        e.0 += 1;
                        e.1 += took;
                    }
                    stats.nodes_executed += 1;
                    Slot::Owned(out)
                }
            };
            if let Slot::Owned(_) = slot {
                live += node.ty.bytes();
                stats.peak_activation_bytes = stats.peak_activation_bytes.max(live);
            }
            values[id.index()] = Some(slot);
            for dead in &self.free_after[p] {
                // A value the op wrote over is gone already; it is accounted as freed
                // here, as if the op had had its own output buffer.
                if consumed == Some(*dead) {
                    consumed = None;
                    live -= g.node(*dead).ty.bytes();
                    stats.buffers_freed += 1;
                    continue;
                }
                if let Some(Slot::Owned(buf)) = values[dead.index()].take() {
                    live -= g.node(*dead).ty.bytes();
                    stats.buffers_freed += 1;
                    backend.release(buf);
                }
            }
        }
        stats.final_activation_bytes = live;
        Ok((values, stats))
    }
}

/// Whether a value's buffer can hold a result of type `out` (same dtype and element count;
/// a `Reshape` then only relabels it, and backends decline what they cannot do in place).
fn same_bytes(value: &TensorType, out: &TensorType) -> bool {
    value.dtype == out.dtype && value.shape.numel() == out.shape.numel()
}

/// The parameters that distinguish kernels of one op name in a profile (a transposed
/// operand takes another path than a plain product).
fn op_detail(op: &Op) -> String {
    match op {
        Op::MatMul { ta, tb } => format!("ta={ta} tb={tb}"),
        Op::Unary(u) | Op::UnaryBackward(u) => format!("{u:?}"),
        Op::Binary(b) => format!("{b:?}"),
        Op::BinaryBackward { op, wrt } => format!("{op:?} wrt {wrt}"),
        Op::Fused { steps } => steps
            .iter()
            .map(|s| s.op.name())
            .collect::<Vec<_>>()
            .join("·"),
        _ => String::new(),
    }
}

/// One-shot form of `Program::new` + `Program::run`.
pub fn run_graph<'w, 'i, B: Backend>(
    backend: &B,
    graph: &Graph,
    weights: &dyn Fn(&str) -> Option<&'w B::Buffer>,
    inputs: &dyn Fn(&str) -> Option<&'i HostTensor>,
    outputs: &[&str],
) -> Result<RunResult, ExecError> {
    Program::new(graph, outputs)?.run(backend, weights, inputs)
}

/// A value during a run: weights are borrowed from the caller, everything else is owned.
enum Slot<'w, Buf> {
    Borrowed(&'w Buf),
    Owned(Buf),
}

impl<Buf> Slot<'_, Buf> {
    fn get(&self) -> &Buf {
        match self {
            Slot::Borrowed(b) => b,
            Slot::Owned(b) => b,
        }
    }
}

fn check_type(
    kind: &'static str,
    name: &str,
    expected: &TensorType,
    got: &TensorType,
) -> Result<(), ExecError> {
    if expected != got {
        return Err(ExecError::TypeMismatch {
            kind,
            name: name.to_string(),
            expected: expected.clone(),
            got: got.clone(),
        });
    }
    Ok(())
}
