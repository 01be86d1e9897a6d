use crate::{DType, Shape, TensorType};
use serde::{Deserialize, Serialize};

/// Elementwise functions of one tensor. Computed in f32 whatever the storage dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Tanh,
    Sqrt,
    Rsqrt,
    Recip,
    Square,
    Relu,
    Sigmoid,
    /// x·σ(x)
    Silu,
    /// exact GELU, x·Φ(x)
    Gelu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`)
    GeluTanh,
}

/// Elementwise functions of two tensors, with NumPy broadcasting (shapes aligned on the right).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
}

/// How rotary frequencies are adjusted for long context (HF `rope_scaling`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RopeScaling {
    #[default]
    None,
    /// Positions divided by `factor` (HF `linear`).
    Linear { factor: f64 },
    /// Llama 3.1 frequency-band scaling (HF `llama3`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Rotary position embedding parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    pub theta: f64,
    /// Leading part of each head that is rotated (`head_dim` unless partial rotary).
    pub rotary_dim: usize,
    pub scaling: RopeScaling,
    /// Pairs are adjacent `(x[2i], x[2i+1])` (Cohere, GPT-J) instead of the two halves
    /// `(x[i], x[i + d/2])` (Llama's `rotate_half`).
    pub interleaved: bool,
}

impl Rope {
    /// Inverse frequencies `1/θ^(2i/d)` after scaling, one per rotated pair; the same
    /// formulas as transformers' `_compute_default_rope_parameters` /
    /// `_compute_llama3_parameters`, evaluated in f64.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.rotary_dim as f64;
        let base: Vec<f64> = (0..self.rotary_dim / 2)
            .map(|i| 1.0 / self.theta.powf((2 * i) as f64 / d))
            .collect();
        match &self.scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// The op vocabulary. Layout conventions (row-major, no batch dimension because the
/// micro-batch is always one sequence):
/// * activations are `[T, H]`; attention heads are `[T, heads, head_dim]`;
/// * linear weights are stored as HF does, `[out, in]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// A value fed from outside the graph (token ids, positions, labels).
    Input {
        name: String,
        ty: TensorType,
    },
    /// A parameter bound to a checkpoint tensor by name.
    Weight {
        name: String,
        ty: TensorType,
    },
    /// A tensor filled with one value.
    Fill {
        value: f64,
        ty: TensorType,
    },
    /// `x·Wᵀ (+ b)`: operands `x [.., in]`, `w [out, in]`, optional `b [out]`.
    Linear,
    /// Batched matrix product of `a [.., m, k]` and `b [.., k, n]` (after the optional
    /// transposes of the last two axes); batch dimensions must be equal. An optional third
    /// operand `c`, of the output's type, is added to the product before the one rounding to
    /// the output type (`accumulate` pass: a GEMM epilogue instead of a separate add).
    MatMul {
        ta: bool,
        tb: bool,
    },
    /// Rows of `table [V, H]` picked by `ids [..]` (integer) → `[.., H]`.
    Embedding,
    /// `x / sqrt(mean(x²) + eps) · (offset + w)` over the last axis; operands `x`, `w`.
    RmsNorm {
        eps: f64,
        offset: f64,
    },
    /// LayerNorm over the last axis; operands `x`, `w`, optional `b`.
    LayerNorm {
        eps: f64,
    },
    /// Rotary embedding of `x [T, heads, head_dim]` at positions `pos [T]` (integer).
    Rope(Rope),
    /// Causal scaled-dot-product attention with grouped KV heads: `q [T, nh, d]`,
    /// `k [T, nkv, d]`, `v [T, nkv, d]` → `[T, nh, d]`. Query `i` sees key `j` when
    /// `j ≤ i` and, with a window `w`, `i − j < w`. `softcap` applies `c·tanh(s/c)` to
    /// the scaled scores (Gemma-2).
    Attention {
        scale: f64,
        sliding_window: Option<usize>,
        softcap: Option<f64>,
    },
    Unary(UnaryOp),
    Binary(BinaryOp),
    /// `x · factor`.
    Scale {
        factor: f64,
    },
    /// `x + value`.
    AddScalar {
        value: f64,
    },
    /// `c · tanh(x / c)`.
    Softcap {
        cap: f64,
    },
    /// Along the last axis.
    Softmax,
    /// Along the last axis.
    LogSoftmax,
    Reduce {
        op: ReduceOp,
        axis: usize,
        keepdim: bool,
    },
    Reshape {
        shape: Shape,
    },
    Transpose {
        perm: Vec<usize>,
    },
    /// Elements `start..end` along `axis`.
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    /// Any number of operands joined along `axis`.
    Concat {
        axis: usize,
    },
    Cast {
        to: DType,
    },

    // ---- Loss and gradient ops (added by the loss and autodiff passes; `crate::grad`) ----
    /// Fused log-softmax + NLL (spec §7): `logits [T, V]` (float), `labels [T]` (integer,
    /// already shifted; −100 = ignored) → f32 scalar, the mean over rows with a valid label
    /// of `logsumexp(z_t) − z_t[y_t]`. Executing it with every label −100 is an error.
    CrossEntropy,
    /// Gradient of `CrossEntropy` w.r.t. the logits: operands `logits`, `labels`, `g` (f32
    /// scalar, the loss gradient) → `g · (softmax(z_t) − onehot(y_t)) / count` per row, zero
    /// for ignored rows; the logits' type.
    CrossEntropyBackward,
    /// `g · f'(x)` for a unary function: operands `x`, `g` (same type) → that type.
    UnaryBackward(UnaryOp),
    /// Gradient of `Binary(op)` w.r.t. operand `wrt` (0 or 1), before reducing broadcast
    /// axes: operands `a`, `b`, `g` (g of the broadcast shape) → the broadcast shape. `Max`
    /// and `Min` send `g` to `a` where `a ≥ b` (resp. `a ≤ b`) and to `b` elsewhere.
    BinaryBackward {
        op: BinaryOp,
        wrt: usize,
    },
    /// Scatter-add of `g [.., H]` into the rows `ids [..]` of a zero `[vocab, H]` table: the
    /// gradient of `Embedding` w.r.t. its table. Operands `ids`, `g`.
    EmbeddingBackward {
        vocab: usize,
    },
    /// Gradient of `RmsNorm` w.r.t. `x`: operands `x`, `w`, `g` → x's type.
    RmsNormBackward {
        eps: f64,
        offset: f64,
    },
    /// Gradient of `RmsNorm` w.r.t. `w`: operands `x`, `g` → `[H]`, `Σ_rows g·x·rsqrt(mean(x²)+eps)`.
    RmsNormWeightGrad {
        eps: f64,
    },
    /// Gradient of `LayerNorm` w.r.t. `x`: operands `x`, `w`, `g` → x's type.
    LayerNormBackward {
        eps: f64,
    },
    /// Gradient of `LayerNorm` w.r.t. `w`: operands `x`, `g` → `[H]`, `Σ_rows g·x̂`.
    LayerNormWeightGrad {
        eps: f64,
    },
    /// The inverse rotation of `Rope` (the rotation is orthogonal, so this is its
    /// vector-Jacobian product): operands `g [T, heads, head_dim]`, `pos [T]`.
    RopeBackward(Rope),
    /// Gradients of `Attention` (same parameters) packed along the head axis: operands `q`,
    /// `k`, `v`, `g` (the output gradient, q's shape) and optionally `o`, the forward's output
    /// on these q, k, v — it changes no value, but a backend that kept the forward's softmax
    /// statistics with it need not run the forward again → `[T, nh + 2·nkv, d]` holding `dq`
    /// (heads `0..nh`), `dk` (`nh..nh+nkv`) and `dv` (`nh+nkv..`). One kernel computes
    /// all three from one recomputation of the probabilities; the autodiff pass slices them
    /// apart (the IR has single-output nodes).
    AttentionBackward {
        scale: f64,
        sliding_window: Option<usize>,
        softcap: Option<f64>,
    },

    // ---- Unfused loss pieces (the loss pass emits them; the fuse pass rewrites
    //      `Nll(LogSoftmax(z), y)` into `CrossEntropy(z, y)`) ----
    /// PyTorch's `nll_loss` with `reduction="mean"` and `ignore_index=−100`: operands
    /// `logp [T, V]` (float, log-probabilities), `labels [T]` (integer) → f32 scalar,
    /// `−mean_{t: y_t ≠ −100} logp[t, y_t]`. Executing it with every label −100 is an error.
    Nll,
    /// Gradient of `Nll` w.r.t. `logp`: operands `logp` (only its type is used), `labels`,
    /// `g` (f32 scalar) → logp's type, `−g / count` at `[t, y_t]` of valid rows, 0 elsewhere.
    NllBackward,

    // ---- Training-only ops ----
    /// Inverted dropout (spec §6.1.2, `lora_dropout`): operands `x` (float) and `key`
    /// (i32 `[3]`: seed low word, seed high word, active flag) → x's type. Where active,
    /// element `i` is kept (and scaled by `1/(1−p)`, as PyTorch) when
    /// [`crate::dropout::keeps`]`(seed, salt, i, p)`, else zeroed; with active = 0 it is the
    /// identity (evaluation). The mask is a pure function of (seed, salt, i), so the
    /// backward — the same op applied to the output gradient — and any recomputation see
    /// the same mask without storing it (spec §14 item 5). `salt` tells apart the dropout
    /// nodes of one graph.
    Dropout {
        p: f64,
        salt: u64,
    },

    // ---- Added by the fuse_elementwise pass ----
    /// A chain of elementwise ops computed in one pass over the output (one kernel, no
    /// intermediate buffers). Each step applies an elementwise op ([`Op::is_fusable`]) to
    /// graph operands and earlier steps; every step has the output's shape; the last step is
    /// the result. Each step's value is rounded to its own dtype, exactly as the unfused op
    /// would be, so a fused chain computes bit for bit what its steps compute one by one.
    /// One step may instead be a product ([`Op::is_fusable_product`]) of two graph operands
    /// (read whole, not elementwise) whose result has the output's shape: its elementwise
    /// users are then the product's epilogue (a LoRA up-projection `h·Bᵀ` with the cast and
    /// the add into the base output).
    Fused {
        steps: Vec<FusedStep>,
    },
}

/// One step of [`Op::Fused`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FusedStep {
    pub op: Op,
    pub args: Vec<FusedArg>,
}

/// Where a fused step's operand comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FusedArg {
    /// Operand `k` of the fused node.
    Input(usize),
    /// The value of an earlier step.
    Step(usize),
}

impl Op {
    /// Short lower-case name, used in dumps and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Weight { .. } => "weight",
            Op::Fill { .. } => "fill",
            Op::Linear => "linear",
            Op::MatMul { .. } => "matmul",
            Op::Embedding => "embedding",
            Op::RmsNorm { .. } => "rms_norm",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Rope(_) => "rope",
            Op::Attention { .. } => "attention",
            Op::Unary(u) => match u {
                UnaryOp::Neg => "neg",
                UnaryOp::Exp => "exp",
                UnaryOp::Log => "log",
                UnaryOp::Tanh => "tanh",
                UnaryOp::Sqrt => "sqrt",
                UnaryOp::Rsqrt => "rsqrt",
                UnaryOp::Recip => "recip",
                UnaryOp::Square => "square",
                UnaryOp::Relu => "relu",
                UnaryOp::Sigmoid => "sigmoid",
                UnaryOp::Silu => "silu",
                UnaryOp::Gelu => "gelu",
                UnaryOp::GeluTanh => "gelu_tanh",
            },
            Op::Binary(b) => match b {
                BinaryOp::Add => "add",
                BinaryOp::Sub => "sub",
                BinaryOp::Mul => "mul",
                BinaryOp::Div => "div",
                BinaryOp::Max => "max",
                BinaryOp::Min => "min",
            },
            Op::Scale { .. } => "scale",
            Op::AddScalar { .. } => "add_scalar",
            Op::Softcap { .. } => "softcap",
            Op::Softmax => "softmax",
            Op::LogSoftmax => "log_softmax",
            Op::Reduce { op, .. } => match op {
                ReduceOp::Sum => "sum",
                ReduceOp::Mean => "mean",
                ReduceOp::Max => "reduce_max",
            },
            Op::Reshape { .. } => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Cast { .. } => "cast",
            Op::CrossEntropy => "cross_entropy",
            Op::CrossEntropyBackward => "cross_entropy_backward",
            Op::UnaryBackward(_) => "unary_backward",
            Op::BinaryBackward { .. } => "binary_backward",
            Op::EmbeddingBackward { .. } => "embedding_backward",
            Op::RmsNormBackward { .. } => "rms_norm_backward",
            Op::RmsNormWeightGrad { .. } => "rms_norm_weight_grad",
            Op::LayerNormBackward { .. } => "layer_norm_backward",
            Op::LayerNormWeightGrad { .. } => "layer_norm_weight_grad",
            Op::RopeBackward(_) => "rope_backward",
            Op::AttentionBackward { .. } => "attention_backward",
            Op::Nll => "nll",
            Op::NllBackward => "nll_backward",
            Op::Dropout { .. } => "dropout",
            Op::Fused { .. } => "fused",
        }
    }

    /// Elementwise ops that [`Op::Fused`] can hold: output element `i` depends only on
    /// element `i` of each (broadcast) operand, and every dtype involved is a float.
    pub fn is_fusable(&self) -> bool {
        match self {
            Op::Unary(_)
            | Op::Binary(_)
            | Op::Scale { .. }
            | Op::AddScalar { .. }
            | Op::Softcap { .. }
            | Op::UnaryBackward(_)
            | Op::BinaryBackward { .. } => true,
            Op::Cast { to } => to.is_float(),
            _ => false,
        }
    }

    /// Products an [`Op::Fused`] chain may hold as one of its steps: `Linear` without a bias
    /// and `MatMul`.
    pub fn is_fusable_product(&self) -> bool {
        matches!(self, Op::Linear | Op::MatMul { .. })
    }

    /// True for ops with no operands whose value comes from outside (inputs, weights).
    pub fn is_leaf(&self) -> bool {
        matches!(self, Op::Input { .. } | Op::Weight { .. } | Op::Fill { .. })
    }
}
