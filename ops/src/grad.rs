//! Gradient rules: each op's vector-Jacobian product, as data (DESIGN "Passes": ops know
//! nothing about graphs). A rule is a small expression tree over three placeholders — an
//! operand of the forward node, its output, and the gradient arriving at its output — built
//! from ordinary `Op`s. The autodiff pass instantiates the tree as graph nodes.
//!
//! Conventions the rules keep:
//! * the gradient of a value has the value's type (shape and dtype): a bf16 activation gets a
//!   bf16 gradient, the f32 loss an f32 one, and `Cast` sends gradients back to the source dtype;
//! * integer operands (ids, positions, labels) carry no gradient (`Ok(None)`);
//! * broadcasting in `Binary` is undone by summing over the broadcast axes (`sum_to`);
//! * heavy rules get dedicated ops with their own kernels (`AttentionBackward`,
//!   `RmsNormBackward`, `CrossEntropyBackward`, …); cheap ones are trees of existing ops so
//!   that a fusion pass can see through them.
use crate::{BinaryOp, Op, OpError, ReduceOp, Shape, TensorType, UnaryOp};

/// One vector-Jacobian product, as a tree over placeholders.
#[derive(Clone, Debug, PartialEq)]
pub enum GradExpr {
    /// Operand `i` of the forward node.
    Operand(usize),
    /// The forward node's own output.
    Output,
    /// The gradient of the loss w.r.t. the forward node's output.
    GradOutput,
    /// `op` applied to the values of the sub-trees, in operand order.
    Apply(Op, Vec<GradExpr>),
}

impl GradExpr {
    pub fn apply(op: Op, args: Vec<GradExpr>) -> GradExpr {
        GradExpr::Apply(op, args)
    }

    /// The type this tree evaluates to, by running `Op::infer` bottom-up: rules are checked
    /// with the same inference the graph uses.
    pub fn infer(
        &self,
        operands: &[TensorType],
        output: &TensorType,
    ) -> Result<TensorType, OpError> {
        match self {
            GradExpr::Operand(i) => operands.get(*i).cloned().ok_or_else(|| OpError {
                op: "gradient",
                operands: operands.to_vec(),
                message: format!("the rule refers to operand {i}, which does not exist"),
            }),
            GradExpr::Output | GradExpr::GradOutput => Ok(output.clone()),
            GradExpr::Apply(op, args) => {
                let tys = args
                    .iter()
                    .map(|a| a.infer(operands, output))
                    .collect::<Result<Vec<_>, _>>()?;
                op.infer(&tys)
            }
        }
    }
}

use GradExpr::{GradOutput as G, Operand as X, Output as Y};

fn ap(op: Op, args: Vec<GradExpr>) -> GradExpr {
    GradExpr::Apply(op, args)
}
fn bin(op: BinaryOp, a: GradExpr, b: GradExpr) -> GradExpr {
    ap(Op::Binary(op), vec![a, b])
}
fn un(op: UnaryOp, a: GradExpr) -> GradExpr {
    ap(Op::Unary(op), vec![a])
}
fn zeros(ty: &TensorType) -> GradExpr {
    ap(
        Op::Fill {
            value: 0.0,
            ty: ty.clone(),
        },
        vec![],
    )
}

/// Sums `g` (of shape `from`, the broadcast shape) down to `to`: over the leading axes `to`
/// lacks and the axes where `to` has size 1 (NumPy broadcasting's adjoint).
pub fn sum_to(g: GradExpr, from: &Shape, to: &TensorType) -> GradExpr {
    if *from == to.shape {
        return g;
    }
    let n = from.rank();
    let pad = n - to.shape.rank().min(n);
    let mut e = g;
    for ax in 0..n {
        let target = if ax < pad {
            1
        } else {
            to.shape.dims()[ax - pad]
        };
        if target == 1 && from.dims()[ax] != 1 {
            e = ap(
                Op::Reduce {
                    op: ReduceOp::Sum,
                    axis: ax,
                    keepdim: true,
                },
                vec![e],
            );
        }
    }
    ap(
        Op::Reshape {
            shape: to.shape.clone(),
        },
        vec![e],
    )
}

/// `g` of shape `small` broadcast back to `full`: `0 + g` with broadcasting.
fn broadcast_to(g: GradExpr, full: &TensorType) -> GradExpr {
    bin(BinaryOp::Add, zeros(full), g)
}

/// Reshape to `[rows, last]` when the tensor has another rank (matrix-product rules work on
/// matrices).
fn as_matrix(e: GradExpr, s: &Shape) -> GradExpr {
    if s.rank() == 2 {
        e
    } else {
        ap(
            Op::Reshape {
                shape: Shape::new([s.rows(), s.last()]),
            },
            vec![e],
        )
    }
}

impl Op {
    /// The vector-Jacobian product of this op w.r.t. operand `wrt`: a tree whose value is
    /// `∂L/∂operand[wrt]` given `GradOutput = ∂L/∂output`. `Ok(None)` when that operand
    /// carries no gradient (an integer operand); an error for ops that have no rule (the
    /// gradient ops themselves: no second-order derivatives) or a `wrt` out of range.
    pub fn vjp(
        &self,
        wrt: usize,
        operands: &[TensorType],
        output: &TensorType,
    ) -> Result<Option<GradExpr>, OpError> {
        let err = |message: String| OpError {
            op: self.name(),
            operands: operands.to_vec(),
            message,
        };
        let Some(this) = operands.get(wrt) else {
            return Err(err(format!(
                "has no operand {wrt} to differentiate with respect to"
            )));
        };
        if !this.dtype.is_float() || !output.dtype.is_float() {
            return Ok(None);
        }
        let rule = match self {
            Op::Input { .. } | Op::Weight { .. } | Op::Fill { .. } => unreachable!("no operands"),
            Op::Linear => {
                // y = x·Wᵀ + b with x [.., in], W [out, in]: dx = g·W, dW = gᵀ·x, db = Σ_rows g.
                let xs = &operands[0].shape;
                let g2 = as_matrix(G, &output.shape);
                match wrt {
                    0 => {
                        let dx = ap(
                            Op::MatMul {
                                ta: false,
                                tb: false,
                            },
                            vec![g2, X(1)],
                        );
                        if xs.rank() == 2 {
                            dx
                        } else {
                            ap(Op::Reshape { shape: xs.clone() }, vec![dx])
                        }
                    }
                    1 => ap(
                        Op::MatMul {
                            ta: true,
                            tb: false,
                        },
                        vec![g2, as_matrix(X(0), xs)],
                    ),
                    _ => ap(
                        Op::Reduce {
                            op: ReduceOp::Sum,
                            axis: 0,
                            keepdim: false,
                        },
                        vec![g2],
                    ),
                }
            }
            Op::MatMul { ta, tb } => {
                // C = op(A)·op(B): d op(A) = G·op(B)ᵀ and d op(B) = op(A)ᵀ·G, with the
                // transposes folded into the flags (dA = op(B)·Gᵀ when A is transposed, …).
                let (ta, tb) = (*ta, *tb);
                if wrt == 2 {
                    G
                } else if wrt == 0 {
                    if ta {
                        ap(Op::MatMul { ta: tb, tb: true }, vec![X(1), G])
                    } else {
                        ap(Op::MatMul { ta: false, tb: !tb }, vec![G, X(1)])
                    }
                } else if tb {
                    ap(Op::MatMul { ta: true, tb: ta }, vec![G, X(0)])
                } else {
                    ap(Op::MatMul { ta: !ta, tb: false }, vec![X(0), G])
                }
            }
            Op::Embedding => ap(
                Op::EmbeddingBackward {
                    vocab: operands[1].shape.dims()[0],
                },
                vec![X(0), G],
            ),
            Op::RmsNorm { eps, offset } => match wrt {
                0 => ap(
                    Op::RmsNormBackward {
                        eps: *eps,
                        offset: *offset,
                    },
                    vec![X(0), X(1), G],
                ),
                _ => ap(Op::RmsNormWeightGrad { eps: *eps }, vec![X(0), G]),
            },
            Op::LayerNorm { eps } => match wrt {
                0 => ap(Op::LayerNormBackward { eps: *eps }, vec![X(0), X(1), G]),
                1 => ap(Op::LayerNormWeightGrad { eps: *eps }, vec![X(0), G]),
                _ => sum_to(G, &output.shape, &operands[2]),
            },
            // The rotation is orthogonal: its adjoint is the rotation by the opposite angle.
            Op::Rope(rope) => ap(Op::RopeBackward(rope.clone()), vec![G, X(1)]),
            Op::Attention {
                scale,
                sliding_window,
                softcap,
            } => {
                // One packed backward per attention node (the pass shares identical trees),
                // sliced into dq / dk / dv.
                let (nh, nkv) = (operands[0].shape.dims()[1], operands[1].shape.dims()[1]);
                let packed = ap(
                    Op::AttentionBackward {
                        scale: *scale,
                        sliding_window: *sliding_window,
                        softcap: *softcap,
                    },
                    vec![X(0), X(1), X(2), G, Y],
                );
                let (start, end) = match wrt {
                    0 => (0, nh),
                    1 => (nh, nh + nkv),
                    _ => (nh + nkv, nh + 2 * nkv),
                };
                ap(
                    Op::Slice {
                        axis: 1,
                        start,
                        end,
                    },
                    vec![packed],
                )
            }
            Op::Unary(u) => match u {
                UnaryOp::Neg => un(UnaryOp::Neg, G),
                UnaryOp::Exp => bin(BinaryOp::Mul, G, Y),
                UnaryOp::Log => bin(BinaryOp::Div, G, X(0)),
                // d tanh = 1 − y²
                UnaryOp::Tanh => bin(
                    BinaryOp::Mul,
                    G,
                    ap(
                        Op::AddScalar { value: 1.0 },
                        vec![un(UnaryOp::Neg, un(UnaryOp::Square, Y))],
                    ),
                ),
                // d √x = 1 / (2y)
                UnaryOp::Sqrt => bin(BinaryOp::Div, G, ap(Op::Scale { factor: 2.0 }, vec![Y])),
                // d x^(−½) = −½·y³
                UnaryOp::Rsqrt => bin(
                    BinaryOp::Mul,
                    G,
                    ap(
                        Op::Scale { factor: -0.5 },
                        vec![bin(BinaryOp::Mul, Y, un(UnaryOp::Square, Y))],
                    ),
                ),
                // d 1/x = −y²
                UnaryOp::Recip => un(UnaryOp::Neg, bin(BinaryOp::Mul, G, un(UnaryOp::Square, Y))),
                UnaryOp::Square => bin(BinaryOp::Mul, G, ap(Op::Scale { factor: 2.0 }, vec![X(0)])),
                // Derivatives with no short expression in existing ops get one fused kernel.
                UnaryOp::Relu
                | UnaryOp::Sigmoid
                | UnaryOp::Silu
                | UnaryOp::Gelu
                | UnaryOp::GeluTanh => ap(Op::UnaryBackward(*u), vec![X(0), G]),
            },
            Op::Binary(b) => {
                let from = &output.shape;
                let to = &operands[wrt];
                let full = match (b, wrt) {
                    (BinaryOp::Add, _) => G,
                    (BinaryOp::Sub, 0) => G,
                    (BinaryOp::Sub, _) => un(UnaryOp::Neg, G),
                    (BinaryOp::Mul, 0) => bin(BinaryOp::Mul, G, X(1)),
                    (BinaryOp::Mul, _) => bin(BinaryOp::Mul, G, X(0)),
                    (BinaryOp::Div, 0) => bin(BinaryOp::Div, G, X(1)),
                    // d(a/b)/db = −y/b
                    (BinaryOp::Div, _) => un(
                        UnaryOp::Neg,
                        bin(BinaryOp::Div, bin(BinaryOp::Mul, G, Y), X(1)),
                    ),
                    (BinaryOp::Max | BinaryOp::Min, _) => {
                        ap(Op::BinaryBackward { op: *b, wrt }, vec![X(0), X(1), G])
                    }
                };
                sum_to(full, from, to)
            }
            Op::Scale { factor } => ap(Op::Scale { factor: *factor }, vec![G]),
            Op::AddScalar { .. } => G,
            // c·tanh(x/c): derivative 1 − (y/c)²
            Op::Softcap { cap } => bin(
                BinaryOp::Mul,
                G,
                ap(
                    Op::AddScalar { value: 1.0 },
                    vec![un(
                        UnaryOp::Neg,
                        un(
                            UnaryOp::Square,
                            ap(Op::Scale { factor: 1.0 / cap }, vec![Y]),
                        ),
                    )],
                ),
            ),
            // y·(g − Σ g·y)
            Op::Softmax => {
                let last = output.shape.rank().saturating_sub(1);
                let dot = ap(
                    Op::Reduce {
                        op: ReduceOp::Sum,
                        axis: last,
                        keepdim: true,
                    },
                    vec![bin(BinaryOp::Mul, G, Y)],
                );
                bin(BinaryOp::Mul, Y, bin(BinaryOp::Sub, G, dot))
            }
            // g − softmax·Σ g
            Op::LogSoftmax => {
                let last = output.shape.rank().saturating_sub(1);
                let total = ap(
                    Op::Reduce {
                        op: ReduceOp::Sum,
                        axis: last,
                        keepdim: true,
                    },
                    vec![G],
                );
                bin(
                    BinaryOp::Sub,
                    G,
                    bin(BinaryOp::Mul, un(UnaryOp::Exp, Y), total),
                )
            }
            Op::Reduce { op, axis, keepdim } => {
                let x = &operands[0];
                let mut kept = x.shape.0.clone();
                kept[*axis] = 1;
                let kept = Shape::new(kept);
                let g = if *keepdim {
                    G
                } else {
                    ap(
                        Op::Reshape {
                            shape: kept.clone(),
                        },
                        vec![G],
                    )
                };
                match op {
                    ReduceOp::Sum => broadcast_to(g, x),
                    ReduceOp::Mean => ap(
                        Op::Scale {
                            factor: 1.0 / x.shape.dims()[*axis].max(1) as f64,
                        },
                        vec![broadcast_to(g, x)],
                    ),
                    // Every element equal to the maximum receives the gradient (ties share
                    // it in full, as `torch.amax`'s subgradient choice does not matter for
                    // almost every input).
                    ReduceOp::Max => {
                        let y = if *keepdim {
                            Y
                        } else {
                            ap(Op::Reshape { shape: kept }, vec![Y])
                        };
                        ap(
                            Op::BinaryBackward {
                                op: BinaryOp::Max,
                                wrt: 0,
                            },
                            vec![X(0), y, broadcast_to(g, x)],
                        )
                    }
                }
            }
            Op::Reshape { .. } => ap(
                Op::Reshape {
                    shape: operands[0].shape.clone(),
                },
                vec![G],
            ),
            Op::Transpose { perm } => {
                let mut inv = vec![0; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inv[p] = i;
                }
                ap(Op::Transpose { perm: inv }, vec![G])
            }
            // Zeros around the gradient: concat(0[..start], g, 0[end..]).
            Op::Slice { axis, start, end } => {
                let x = &operands[0];
                let len = x.shape.dims()[*axis];
                let mut parts = Vec::new();
                let piece = |n: usize| {
                    let mut d = x.shape.0.clone();
                    d[*axis] = n;
                    zeros(&TensorType::new(d, output.dtype))
                };
                if *start > 0 {
                    parts.push(piece(*start));
                }
                parts.push(G);
                if *end < len {
                    parts.push(piece(len - end));
                }
                if parts.len() == 1 {
                    G
                } else {
                    ap(Op::Concat { axis: *axis }, parts)
                }
            }
            Op::Concat { axis } => {
                let start: usize = operands[..wrt].iter().map(|t| t.shape.dims()[*axis]).sum();
                let end = start + operands[wrt].shape.dims()[*axis];
                if start == 0 && end == output.shape.dims()[*axis] {
                    G
                } else {
                    ap(
                        Op::Slice {
                            axis: *axis,
                            start,
                            end,
                        },
                        vec![G],
                    )
                }
            }
            Op::Cast { .. } => {
                if this.dtype == output.dtype {
                    G
                } else {
                    ap(Op::Cast { to: this.dtype }, vec![G])
                }
            }
            Op::CrossEntropy => ap(Op::CrossEntropyBackward, vec![X(0), X(1), G]),
            Op::Nll => ap(Op::NllBackward, vec![X(0), X(1), G]),
            // Dropout is linear in x with a mask that depends only on (key, salt, index):
            // its adjoint is the same masked scaling applied to the gradient.
            Op::Dropout { p, salt } => ap(Op::Dropout { p: *p, salt: *salt }, vec![G, X(1)]),
            Op::CrossEntropyBackward
            | Op::NllBackward
            | Op::UnaryBackward(_)
            | Op::BinaryBackward { .. }
            | Op::EmbeddingBackward { .. }
            | Op::RmsNormBackward { .. }
            | Op::RmsNormWeightGrad { .. }
            | Op::LayerNormBackward { .. }
            | Op::LayerNormWeightGrad { .. }
            | Op::RopeBackward(_)
            | Op::AttentionBackward { .. } => {
                return Err(err(
                    "is a gradient op and has no gradient rule (second-order derivatives \
                     are not supported)"
                        .to_string(),
                ))
            }
            Op::Fused { .. } => {
                return Err(err(
                    "is made by the fuse_elementwise pass after autodiff and has no gradient rule"
                        .to_string(),
                ))
            }
        };
        // Every rule must produce exactly the operand's type; a mismatch is a bug in the
        // rule, reported as an error rather than a broken graph.
        let got = rule.infer(operands, output)?;
        if got != *this {
            return Err(err(format!(
                "gradient rule for operand {wrt} produces {got}, expected {this}"
            )));
        }
        Ok(Some(rule))
    }
}

/// Whether `op` passes gradients at all (false for ops whose output is integer or that are
/// gradient ops themselves).
pub fn is_differentiable(op: &Op, output: &TensorType) -> bool {
    output.dtype.is_float()
        && !matches!(
            op,
            Op::CrossEntropyBackward
                | Op::NllBackward
                | Op::UnaryBackward(_)
                | Op::BinaryBackward { .. }
                | Op::EmbeddingBackward { .. }
                | Op::RmsNormBackward { .. }
                | Op::RmsNormWeightGrad { .. }
                | Op::LayerNormBackward { .. }
                | Op::LayerNormWeightGrad { .. }
                | Op::RopeBackward(_)
                | Op::AttentionBackward { .. }
                | Op::Fused { .. }
        )
}
