//! The `loss` pass: appends the causal-LM loss of spec §7 to a forward graph.
//!
//! * input `labels` i32 `[T]` (−100 = ignored), fed by the data pipeline;
//! * shifted labels `[labels[1:], −100]` — position `t` predicts token `t+1`, so the last
//!   position never contributes (check 34);
//! * `Nll(LogSoftmax(z))` in f32 from the logits cast to f32 → the mean over valid
//!   positions, graph output `loss`. This is the textbook, unfused form: the `fuse` pass
//!   rewrites it with an egg rule into the fused, vocabulary-chunked `CrossEntropy` that
//!   never materialises the `[T, V]` log-probabilities (DESIGN "Passes"), so the two forms
//!   can be compared. The kernels refuse a sequence whose labels are all −100 at run time.
//!
//! Gemma-2 soft-capping and Cohere's logit scale are part of the model file's head block,
//! so the `logits` output already carries them (check 36).
use crate::pass::{Pass, PassContext};
use anyhow::{bail, Context};
use qplc_compiler::{BlockKind, Graph, NodeId, Scope};
use qplc_ops::{DType, Op, TensorType};

/// The label that marks a position as ignored (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// Name of the labels input.
pub const LABELS: &str = "labels";

pub struct LossPass;

impl Pass for LossPass {
    fn name(&self) -> &str {
        "loss"
    }
    fn run(&self, mut graph: Graph, _cx: &mut PassContext) -> anyhow::Result<Graph> {
        append_loss(&mut graph)?;
        Ok(graph)
    }
}

/// Adds the `labels` input (or reuses one already there), the shift and the fused
/// cross-entropy over the `logits` output; sets and returns the `loss` output.
pub fn append_loss(graph: &mut Graph) -> anyhow::Result<NodeId> {
    let logits = graph
        .output("logits")
        .context("the loss pass needs a `logits` output [T, V]")?;
    let lt = graph.node(logits).ty.clone();
    if lt.shape.rank() != 2 || !lt.dtype.is_float() {
        bail!("the loss pass needs float logits [T, V], got {lt}");
    }
    let t = lt.shape.dims()[0];
    let labels_ty = TensorType::new([t], DType::I32);
    let labels = match graph.inputs().into_iter().find(|(n, _)| n == LABELS) {
        Some((_, id)) => {
            let ty = &graph.node(id).ty;
            if *ty != labels_ty {
                bail!(
                    "the graph already has a `{LABELS}` input of type {ty}, expected {labels_ty}"
                );
            }
            id
        }
        None => graph.add(
            Op::Input {
                name: LABELS.to_string(),
                ty: labels_ty,
            },
            &[],
            &Scope::new(LABELS, BlockKind::Inputs, None),
        )?,
    };
    let scope = Scope::new("loss", BlockKind::Loss, None);
    let pad = graph.add(
        Op::Fill {
            value: IGNORE_INDEX as f64,
            ty: TensorType::new([1], DType::I32),
        },
        &[],
        &scope,
    )?;
    // spec §7: shifted labels [labels[1:], −100].
    let shifted = if t > 1 {
        let tail = graph.add(
            Op::Slice {
                axis: 0,
                start: 1,
                end: t,
            },
            &[labels],
            &scope,
        )?;
        graph.add(Op::Concat { axis: 0 }, &[tail, pad], &scope)?
    } else {
        pad
    };
    // spec §7: computed in float32 from (possibly bf16) logits.
    let z = if lt.dtype == DType::F32 {
        logits
    } else {
        graph.add(Op::Cast { to: DType::F32 }, &[logits], &scope)?
    };
    let logp = graph.add(Op::LogSoftmax, &[z], &scope)?;
    let loss = graph.add(Op::Nll, &[logp, shifted], &scope)?;
    graph.set_output("loss", loss);
    Ok(loss)
}
