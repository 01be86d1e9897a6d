//! Runs a whole `Graph` on any `Backend` (DESIGN.md "Runtime"): binds inputs and weights
//! by name, executes the nodes needed for the requested outputs in `Graph::topo_order`,
//! frees every intermediate right after its last use, and reports the peak of live
//! activation bytes (weights are borrowed from the caller and not counted).
//!
//! `Program` holds the per-graph analysis (order, operands, last uses) so that scoring
//! many sequences through one graph analyses it once.
use crate::backend::{Backend, KernelError};
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
        Ok(Program {
            graph,
            order,
            operands,
            free_after,
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
        let g = self.graph;
        let mut values: Vec<Option<Slot<'w, B::Buffer>>> =
            (0..g.g.node_bound()).map(|_| None).collect();
        let mut stats = RunStats::default();
        let mut live = 0usize;
        for (p, &id) in self.order.iter().enumerate() {
            let node = g.node(id);
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
                    let start = Instant::now();
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
                    let e = stats.op_time.entry(op.name()).or_default();
                    e.0 += 1;
                    e.1 += start.elapsed();
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
                if let Some(Slot::Owned(_)) = values[dead.index()].take() {
                    live -= g.node(*dead).ty.bytes();
                    stats.buffers_freed += 1;
                }
            }
        }
        stats.final_activation_bytes = live;
        let mut outputs = HashMap::new();
        for (i, (name, id)) in self.outputs.iter().enumerate() {
            let node = g.node(*id);
            let err = |source| ExecError::Kernel {
                node: id.index(),
                op: node.op.name(),
                module: node.module.clone(),
                source,
            };
            // The same node may be requested under two names: move it out only the last time.
            let later = self.outputs[i + 1..].iter().any(|(_, o)| o == id);
            let host = match values[id.index()].take() {
                Some(Slot::Owned(buf)) if !later => backend.download_owned(buf).map_err(err)?,
                Some(slot) => {
                    let host = backend.download(slot.get()).map_err(err)?;
                    values[id.index()] = Some(slot);
                    host
                }
                None => unreachable!("outputs are never freed"),
            };
            outputs.insert(name.clone(), host);
        }
        Ok(RunResult { outputs, stats })
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
