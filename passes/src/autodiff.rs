//! The `autodiff` pass (DESIGN "Passes"): appends the backward graph of the scalar `loss`
//! output, using each op's gradient rule (`Op::vjp`, rules as data in `qplc_ops::grad`).
//!
//! * Only trainable weights (`Node::trainable`) get gradients, published as outputs
//!   `grad:<weight name>`. Frozen weights never get a weight gradient, but gradients of
//!   activations still flow through the ops that use them (`dx` of a frozen linear).
//! * Only values on a path from a trainable weight to the loss are differentiated: a value
//!   that depends on no trainable weight (the embedding output under LoRA) needs no gradient.
//! * Reverse topological order; a value used several times receives the sum of its users'
//!   contributions, added in a fixed order (deterministic graphs).
//! * Backward nodes carry the module, block and layer of the forward node they
//!   differentiate, so partitioning puts a layer's backward on the stage of its forward.
//! * Identical sub-trees instantiated for one forward node are shared (the attention rule
//!   slices dq, dk and dv out of one packed `AttentionBackward`).
use crate::pass::{Pass, PassContext};
use anyhow::{bail, Context};
use petgraph::visit::NodeIndexable;
use qplc_compiler::{Graph, NodeId, Scope};
use qplc_ops::{is_differentiable, BinaryOp, GradExpr, Op, TensorType};
use std::collections::HashMap;

/// Prefix of the gradient outputs: `grad:model.layers.0.self_attn.q_proj.weight`.
pub const GRAD_PREFIX: &str = "grad:";

pub struct AutodiffPass;

impl Pass for AutodiffPass {
    fn name(&self) -> &str {
        "autodiff"
    }
    fn run(&self, mut graph: Graph, cx: &mut PassContext) -> anyhow::Result<Graph> {
        let notes = append_backward(&mut graph)?;
        cx.notes.extend(notes);
        Ok(graph)
    }
}

/// The output name of a weight's gradient.
pub fn grad_output_name(weight: &str) -> String {
    format!("{GRAD_PREFIX}{weight}")
}

/// Appends the backward graph of output `loss` and the `grad:<name>` outputs; returns
/// remarks for the report (trainable weights the loss does not depend on).
pub fn append_backward(graph: &mut Graph) -> anyhow::Result<Vec<String>> {
    let loss = graph
        .output("loss")
        .context("the autodiff pass needs a scalar `loss` output (run the loss pass first)")?;
    let lt = &graph.node(loss).ty;
    if lt.shape.numel() != 1 || !lt.dtype.is_float() {
        bail!("the `loss` output must be a float scalar, got {lt}");
    }
    let order = graph.topo_order()?;
    let bound = graph.g.node_bound();

    // Values the loss depends on.
    let mut reaches_loss = vec![false; bound];
    reaches_loss[loss.index()] = true;
    for &id in order.iter().rev() {
        if reaches_loss[id.index()] {
            for o in graph.operands(id) {
                reaches_loss[o.index()] = true;
            }
        }
    }
    // Values that depend on a trainable weight through differentiable ops.
    let mut depends = vec![false; bound];
    for &id in &order {
        let n = graph.node(id);
        depends[id.index()] = match &n.op {
            Op::Weight { .. } => n.trainable,
            op => {
                is_differentiable(op, &n.ty)
                    && graph.operands(id).iter().any(|o| depends[o.index()])
            }
        };
    }
    let needs = |id: NodeId| depends[id.index()] && reaches_loss[id.index()];

    let mut contributions: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
    let mut weight_grads: HashMap<NodeId, NodeId> = HashMap::new();
    if needs(loss) {
        let n = graph.node(loss);
        let seed = graph.add(
            Op::Fill {
                value: 1.0,
                ty: n.ty.clone(),
            },
            &[],
            &scope_of(graph, loss),
        )?;
        contributions.insert(loss, vec![seed]);
    }
    for &id in order.iter().rev() {
        if !needs(id) {
            continue;
        }
        let Some(parts) = contributions.remove(&id) else {
            continue;
        };
        let scope = scope_of(graph, id);
        let g = accumulate(graph, &parts, &scope)?;
        let node = graph.node(id).clone();
        if let Op::Weight { .. } = node.op {
            weight_grads.insert(id, g);
            continue;
        }
        let operands = graph.operands(id);
        let tys: Vec<TensorType> = operands.iter().map(|o| graph.node(*o).ty.clone()).collect();
        let mut memo = HashMap::new();
        for (i, &o) in operands.iter().enumerate() {
            if !needs(o) {
                continue;
            }
            let rule = node.op.vjp(i, &tys, &node.ty).with_context(|| {
                format!("differentiating `{}` in `{}`", node.op.name(), node.module)
            })?;
            let Some(rule) = rule else { continue };
            let d = instantiate(graph, &rule, &operands, id, g, &scope, &mut memo)?;
            contributions.entry(o).or_default().push(d);
        }
    }

    let mut notes = Vec::new();
    let mut weights = graph.weights();
    weights.sort();
    for (name, id) in weights {
        if !graph.node(id).trainable {
            continue;
        }
        let g = match weight_grads.get(&id) {
            Some(&g) => g,
            None => {
                notes.push(format!(
                    "trainable weight `{name}` does not affect the loss; its gradient is zero"
                ));
                let ty = graph.node(id).ty.clone();
                graph.add(Op::Fill { value: 0.0, ty }, &[], &scope_of(graph, id))?
            }
        };
        graph.set_output(&grad_output_name(&name), g);
    }
    Ok(notes)
}

fn scope_of(graph: &Graph, id: NodeId) -> Scope {
    let n = graph.node(id);
    Scope::new(n.module.clone(), n.block, n.layer)
}

/// Sum of the contributions to one value, in the order they were made.
fn accumulate(graph: &mut Graph, parts: &[NodeId], scope: &Scope) -> anyhow::Result<NodeId> {
    let mut acc = parts[0];
    for &p in &parts[1..] {
        acc = graph.add(Op::Binary(BinaryOp::Add), &[acc, p], scope)?;
    }
    Ok(acc)
}

/// Adds the nodes of one gradient rule; identical sub-trees (same op, same argument nodes)
/// of the same forward node become one node.
fn instantiate(
    graph: &mut Graph,
    expr: &GradExpr,
    operands: &[NodeId],
    output: NodeId,
    grad_output: NodeId,
    scope: &Scope,
    memo: &mut HashMap<String, NodeId>,
) -> anyhow::Result<NodeId> {
    Ok(match expr {
        GradExpr::Operand(i) => *operands
            .get(*i)
            .with_context(|| format!("gradient rule refers to missing operand {i}"))?,
        GradExpr::Output => output,
        GradExpr::GradOutput => grad_output,
        GradExpr::Apply(op, args) => {
            let mut ids = Vec::with_capacity(args.len());
            for a in args {
                ids.push(instantiate(
                    graph,
                    a,
                    operands,
                    output,
                    grad_output,
                    scope,
                    memo,
                )?);
            }
            // `Op` holds f64 parameters and has no `Hash`; its Debug form is a faithful key.
            let key = format!("{op:?}|{ids:?}");
            if let Some(&id) = memo.get(&key) {
                return Ok(id);
            }
            let id = graph.add(op.clone(), &ids, scope)?;
            memo.insert(key, id);
            id
        }
    })
}
