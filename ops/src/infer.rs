//! Shape and dtype inference: every op checks its operands and returns the output type,
//! or an error naming the op and the shapes involved. Never panics.
use crate::{DType, FusedArg, FusedStep, Op, Shape, TensorType};
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpError {
    pub op: &'static str,
    pub operands: Vec<TensorType>,
    pub message: String,
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(", self.op)?;
        for (i, t) in self.operands.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{t}")?;
        }
        write!(f, "): {}", self.message)
    }
}

impl std::error::Error for OpError {}

/// NumPy broadcasting of two shapes aligned on the right.
pub fn broadcast(a: &Shape, b: &Shape) -> Option<Shape> {
    let n = a.rank().max(b.rank());
    let mut out = vec![0; n];
    for (i, o) in out.iter_mut().enumerate() {
        let da = dim_from_right(a, n - 1 - i);
        let db = dim_from_right(b, n - 1 - i);
        *o = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(Shape(out))
}

fn dim_from_right(s: &Shape, k: usize) -> usize {
    if k < s.rank() {
        s.0[s.rank() - 1 - k]
    } else {
        1
    }
}

impl Op {
    /// Output type for the given operand types.
    pub fn infer(&self, operands: &[TensorType]) -> Result<TensorType, OpError> {
        let err = |message: String| OpError {
            op: self.name(),
            operands: operands.to_vec(),
            message,
        };
        let arity = |lo: usize, hi: usize| -> Result<(), OpError> {
            if operands.len() < lo || operands.len() > hi {
                let want = if lo == hi {
                    format!("{lo}")
                } else {
                    format!("{lo} to {hi}")
                };
                Err(err(format!(
                    "expects {want} operand(s), got {}",
                    operands.len()
                )))
            } else {
                Ok(())
            }
        };
        let float = |i: usize| -> Result<(), OpError> {
            if operands[i].dtype.is_float() {
                Ok(())
            } else {
                Err(err(format!(
                    "operand {i} must be a float tensor, got {}",
                    operands[i].dtype
                )))
            }
        };
        match self {
            Op::Input { ty, .. } | Op::Weight { ty, .. } | Op::Fill { ty, .. } => {
                arity(0, 0)?;
                Ok(ty.clone())
            }
            Op::Linear => {
                arity(2, 3)?;
                let (x, w) = (&operands[0], &operands[1]);
                float(0)?;
                if w.shape.rank() != 2 {
                    return Err(err(format!("weight must be [out, in], got {}", w.shape)));
                }
                if x.shape.rank() == 0 || x.shape.last() != w.shape.0[1] {
                    return Err(err(format!(
                        "input's last dimension {} does not match the weight's in-features {}",
                        x.shape.last(),
                        w.shape.0[1]
                    )));
                }
                if let Some(b) = operands.get(2) {
                    if b.shape.0 != [w.shape.0[0]] {
                        return Err(err(format!(
                            "bias must be [{}], got {}",
                            w.shape.0[0], b.shape
                        )));
                    }
                }
                let mut out = x.shape.0.clone();
                *out.last_mut().unwrap() = w.shape.0[0];
                Ok(TensorType::new(out, product_dtype(x.dtype, w.dtype)))
            }
            Op::MatMul { ta, tb } => {
                arity(2, 3)?;
                let (a, b) = (&operands[0].shape, &operands[1].shape);
                if a.rank() < 2 || a.rank() != b.rank() {
                    return Err(err(
                        "operands must have the same rank, at least 2".to_string()
                    ));
                }
                let r = a.rank();
                if a.0[..r - 2] != b.0[..r - 2] {
                    return Err(err("batch dimensions differ".to_string()));
                }
                let (m, ka) = if *ta {
                    (a.0[r - 1], a.0[r - 2])
                } else {
                    (a.0[r - 2], a.0[r - 1])
                };
                let (kb, n) = if *tb {
                    (b.0[r - 1], b.0[r - 2])
                } else {
                    (b.0[r - 2], b.0[r - 1])
                };
                if ka != kb {
                    return Err(err(format!("inner dimensions differ ({ka} vs {kb})")));
                }
                let mut out = a.0[..r - 2].to_vec();
                out.extend([m, n]);
                let dt = product_dtype(operands[0].dtype, operands[1].dtype);
                let ty = TensorType::new(out, dt);
                if let Some(c) = operands.get(2) {
                    if *c != ty {
                        return Err(err(format!(
                            "the accumulated operand must have the product's type {ty}, got {c}"
                        )));
                    }
                }
                Ok(ty)
            }
            Op::Embedding => {
                arity(2, 2)?;
                let (ids, table) = (&operands[0], &operands[1]);
                if !ids.dtype.is_int() {
                    return Err(err(format!("ids must be integer, got {}", ids.dtype)));
                }
                if table.shape.rank() != 2 {
                    return Err(err(format!("table must be [V, H], got {}", table.shape)));
                }
                let mut out = ids.shape.0.clone();
                out.push(table.shape.0[1]);
                Ok(TensorType::new(out, table.dtype))
            }
            Op::RmsNorm { .. } | Op::LayerNorm { .. } => {
                if matches!(self, Op::RmsNorm { .. }) {
                    arity(2, 2)?;
                } else {
                    arity(2, 3)?;
                }
                float(0)?;
                let h = operands[0].shape.last();
                for (i, p) in operands.iter().enumerate().skip(1) {
                    if p.shape.0 != [h] {
                        return Err(err(format!(
                            "operand {i} must be [{h}] (the last dimension of x), got {}",
                            p.shape
                        )));
                    }
                }
                Ok(operands[0].clone())
            }
            Op::Rope(rope) => {
                arity(2, 2)?;
                float(0)?;
                let (x, pos) = (&operands[0].shape, &operands[1]);
                if x.rank() != 3 {
                    return Err(err(format!("x must be [T, heads, head_dim], got {x}")));
                }
                if !pos.dtype.is_int() || pos.shape.0 != [x.0[0]] {
                    return Err(err(format!(
                        "positions must be an integer [{}], got {pos}",
                        x.0[0]
                    )));
                }
                if rope.rotary_dim > x.0[2] || rope.rotary_dim % 2 != 0 || rope.rotary_dim == 0 {
                    return Err(err(format!(
                        "rotary_dim {} must be even, positive and at most head_dim {}",
                        rope.rotary_dim, x.0[2]
                    )));
                }
                Ok(operands[0].clone())
            }
            Op::Attention { sliding_window, .. } => {
                arity(3, 3)?;
                let (q, k, v) = (&operands[0].shape, &operands[1].shape, &operands[2].shape);
                if q.rank() != 3 || k.rank() != 3 || v.rank() != 3 {
                    return Err(err("q, k, v must be [T, heads, head_dim]".to_string()));
                }
                if k != v {
                    return Err(err("k and v shapes differ".to_string()));
                }
                if q.0[0] != k.0[0] || q.0[2] != k.0[2] {
                    return Err(err(
                        "q and k must agree in sequence length and head_dim".to_string()
                    ));
                }
                if k.0[1] == 0 || q.0[1] % k.0[1] != 0 {
                    return Err(err(format!(
                        "query heads {} must be a multiple of key/value heads {}",
                        q.0[1], k.0[1]
                    )));
                }
                if *sliding_window == Some(0) {
                    return Err(err("sliding_window must be positive".to_string()));
                }
                Ok(operands[0].clone())
            }
            Op::Unary(_)
            | Op::Scale { .. }
            | Op::AddScalar { .. }
            | Op::Softcap { .. }
            | Op::Softmax
            | Op::LogSoftmax => {
                arity(1, 1)?;
                float(0)?;
                Ok(operands[0].clone())
            }
            Op::Binary(_) => {
                arity(2, 2)?;
                let (a, b) = (&operands[0], &operands[1]);
                if a.dtype != b.dtype {
                    return Err(err(format!("dtypes differ ({} vs {})", a.dtype, b.dtype)));
                }
                let shape = broadcast(&a.shape, &b.shape)
                    .ok_or_else(|| err("shapes do not broadcast".to_string()))?;
                Ok(TensorType::new(shape, a.dtype))
            }
            Op::Reduce { axis, keepdim, .. } => {
                arity(1, 1)?;
                float(0)?;
                let s = &operands[0].shape;
                if *axis >= s.rank() {
                    return Err(err(format!("axis {axis} out of range")));
                }
                let mut out = s.0.clone();
                if *keepdim {
                    out[*axis] = 1;
                } else {
                    out.remove(*axis);
                }
                Ok(TensorType::new(out, operands[0].dtype))
            }
            Op::Reshape { shape } => {
                arity(1, 1)?;
                if shape.numel() != operands[0].shape.numel() {
                    return Err(err(format!(
                        "cannot reshape to {shape}: element counts differ"
                    )));
                }
                Ok(TensorType::new(shape.clone(), operands[0].dtype))
            }
            Op::Transpose { perm } => {
                arity(1, 1)?;
                let s = &operands[0].shape;
                let mut seen = vec![false; s.rank()];
                if perm.len() != s.rank() {
                    return Err(err(format!("permutation {perm:?} has the wrong length")));
                }
                for &p in perm {
                    if p >= s.rank() || seen[p] {
                        return Err(err(format!("{perm:?} is not a permutation")));
                    }
                    seen[p] = true;
                }
                let out: Vec<usize> = perm.iter().map(|&p| s.0[p]).collect();
                Ok(TensorType::new(out, operands[0].dtype))
            }
            Op::Slice { axis, start, end } => {
                arity(1, 1)?;
                let s = &operands[0].shape;
                if *axis >= s.rank() || start >= end || *end > s.0[*axis] {
                    return Err(err(format!(
                        "slice {start}..{end} on axis {axis} is out of range"
                    )));
                }
                let mut out = s.0.clone();
                out[*axis] = end - start;
                Ok(TensorType::new(out, operands[0].dtype))
            }
            Op::Concat { axis } => {
                if operands.is_empty() {
                    return Err(err("needs at least one operand".to_string()));
                }
                let first = &operands[0];
                if *axis >= first.shape.rank() {
                    return Err(err(format!("axis {axis} out of range")));
                }
                let mut total = 0;
                for o in operands {
                    if o.dtype != first.dtype || o.shape.rank() != first.shape.rank() {
                        return Err(err("operands differ in dtype or rank".to_string()));
                    }
                    for d in 0..first.shape.rank() {
                        if d != *axis && o.shape.0[d] != first.shape.0[d] {
                            return Err(err(format!(
                                "operands differ on axis {d}, which is not the concat axis"
                            )));
                        }
                    }
                    total += o.shape.0[*axis];
                }
                let mut out = first.shape.0.clone();
                out[*axis] = total;
                Ok(TensorType::new(out, first.dtype))
            }
            Op::Cast { to } => {
                arity(1, 1)?;
                if *to == DType::NF4 {
                    return Err(err("nf4 is produced by the quantise pass, not cast".into()));
                }
                Ok(TensorType::new(operands[0].shape.clone(), *to))
            }
            Op::CrossEntropy | Op::CrossEntropyBackward => {
                if matches!(self, Op::CrossEntropy) {
                    arity(2, 2)?;
                } else {
                    arity(3, 3)?;
                }
                float(0)?;
                let (z, y) = (&operands[0], &operands[1]);
                if z.shape.rank() != 2 {
                    return Err(err(format!("logits must be [T, V], got {}", z.shape)));
                }
                if !y.dtype.is_int() || y.shape.0 != [z.shape.0[0]] {
                    return Err(err(format!(
                        "labels must be an integer [{}], got {y}",
                        z.shape.0[0]
                    )));
                }
                if matches!(self, Op::CrossEntropy) {
                    return Ok(TensorType::new(Shape::scalar(), DType::F32));
                }
                let g = &operands[2];
                if g.shape.numel() != 1 || !g.dtype.is_float() {
                    return Err(err(format!(
                        "the loss gradient must be a float scalar, got {g}"
                    )));
                }
                Ok(z.clone())
            }
            Op::UnaryBackward(_) => {
                arity(2, 2)?;
                float(0)?;
                if operands[0] != operands[1] {
                    return Err(err("x and its gradient must have the same type".to_string()));
                }
                Ok(operands[0].clone())
            }
            Op::BinaryBackward { wrt, .. } => {
                arity(3, 3)?;
                float(0)?;
                let (a, b, g) = (&operands[0], &operands[1], &operands[2]);
                if *wrt > 1 {
                    return Err(err(format!("wrt must be 0 or 1, got {wrt}")));
                }
                if a.dtype != b.dtype || g.dtype != a.dtype {
                    return Err(err("operands must share one dtype".to_string()));
                }
                let shape = broadcast(&a.shape, &b.shape)
                    .ok_or_else(|| err("shapes do not broadcast".to_string()))?;
                if g.shape != shape {
                    return Err(err(format!(
                        "gradient must have the broadcast shape {shape}"
                    )));
                }
                Ok(g.clone())
            }
            Op::EmbeddingBackward { vocab } => {
                arity(2, 2)?;
                let (ids, g) = (&operands[0], &operands[1]);
                if !ids.dtype.is_int() {
                    return Err(err(format!("ids must be integer, got {}", ids.dtype)));
                }
                float(1)?;
                let mut want = ids.shape.0.clone();
                want.push(g.shape.last());
                if g.shape.rank() != ids.shape.rank() + 1 || g.shape.0 != want {
                    return Err(err(format!("gradient must be [ids.., H], got {}", g.shape)));
                }
                Ok(TensorType::new([*vocab, g.shape.last()], g.dtype))
            }
            Op::RmsNormBackward { .. } | Op::LayerNormBackward { .. } => {
                arity(3, 3)?;
                float(0)?;
                let (x, w, g) = (&operands[0], &operands[1], &operands[2]);
                if w.shape.0 != [x.shape.last()] {
                    return Err(err(format!(
                        "w must be [{}], got {}",
                        x.shape.last(),
                        w.shape
                    )));
                }
                if g != x {
                    return Err(err("x and its gradient must have the same type".to_string()));
                }
                Ok(x.clone())
            }
            Op::RmsNormWeightGrad { .. } | Op::LayerNormWeightGrad { .. } => {
                arity(2, 2)?;
                float(0)?;
                let (x, g) = (&operands[0], &operands[1]);
                if g != x {
                    return Err(err(
                        "x and the output gradient must have the same type".into()
                    ));
                }
                Ok(TensorType::new([x.shape.last()], x.dtype))
            }
            Op::RopeBackward(rope) => Op::Rope(rope.clone())
                .infer(operands)
                .map_err(|e| err(e.message)),
            Op::AttentionBackward {
                scale,
                sliding_window,
                softcap,
            } => {
                arity(4, 5)?;
                let fwd = Op::Attention {
                    scale: *scale,
                    sliding_window: *sliding_window,
                    softcap: *softcap,
                };
                let out = fwd.infer(&operands[..3]).map_err(|e| err(e.message))?;
                if operands[3] != out {
                    return Err(err(format!(
                        "the output gradient must be {out}, got {}",
                        operands[3]
                    )));
                }
                if operands.len() == 5 && operands[4] != out {
                    return Err(err(format!(
                        "the forward's output must be {out}, got {}",
                        operands[4]
                    )));
                }
                let (q, k) = (&operands[0].shape.0, &operands[1].shape.0);
                Ok(TensorType::new([q[0], q[1] + 2 * k[1], q[2]], out.dtype))
            }
            Op::Nll | Op::NllBackward => {
                if matches!(self, Op::Nll) {
                    arity(2, 2)?;
                } else {
                    arity(3, 3)?;
                }
                float(0)?;
                let (lp, y) = (&operands[0], &operands[1]);
                if lp.shape.rank() != 2 {
                    return Err(err(format!(
                        "log-probabilities must be [T, V], got {}",
                        lp.shape
                    )));
                }
                if !y.dtype.is_int() || y.shape.0 != [lp.shape.0[0]] {
                    return Err(err(format!(
                        "labels must be an integer [{}], got {y}",
                        lp.shape.0[0]
                    )));
                }
                if matches!(self, Op::Nll) {
                    return Ok(TensorType::new(Shape::scalar(), DType::F32));
                }
                let g = &operands[2];
                if g.shape.numel() != 1 || !g.dtype.is_float() {
                    return Err(err(format!(
                        "the loss gradient must be a float scalar, got {g}"
                    )));
                }
                Ok(lp.clone())
            }
            Op::Fused { steps } => self.infer_fused(steps, operands),
            Op::Dropout { p, .. } => {
                arity(2, 2)?;
                float(0)?;
                if !(0.0..1.0).contains(p) {
                    return Err(err(format!("p must be in [0, 1), got {p}")));
                }
                let key = &operands[1];
                if key.dtype != DType::I32 || key.shape.0 != [3] {
                    return Err(err(format!(
                        "the key must be i32 [3] (seed low, seed high, active), got {key}"
                    )));
                }
                Ok(operands[0].clone())
            }
        }
    }

    /// Floating-point operations of one execution (multiply-add = 2), for the report.
    pub fn flops(&self, operands: &[TensorType], out: &TensorType) -> u64 {
        let n = out.shape.numel() as u64;
        match self {
            Op::Input { .. } | Op::Weight { .. } | Op::Fill { .. } => 0,
            Op::Linear => {
                let k = operands[0].shape.last() as u64;
                2 * n * k + if operands.len() > 2 { n } else { 0 }
            }
            Op::MatMul { ta, .. } => {
                let a = &operands[0].shape;
                let r = a.rank();
                let k = if *ta { a.0[r - 2] } else { a.0[r - 1] } as u64;
                2 * n * k + if operands.len() > 2 { n } else { 0 }
            }
            Op::Attention { sliding_window, .. } => {
                let (t, nh, d) = (
                    operands[0].shape.0[0] as u64,
                    operands[0].shape.0[1] as u64,
                    operands[0].shape.0[2] as u64,
                );
                // Causal: each query sees on average about half the keys (or the window).
                let pairs: u64 = (0..t)
                    .map(|i| match sliding_window {
                        Some(w) => (i + 1).min(*w as u64),
                        None => i + 1,
                    })
                    .sum();
                4 * pairs * nh * d
            }
            Op::RmsNorm { .. } | Op::LayerNorm { .. } => 4 * n,
            Op::Softmax | Op::LogSoftmax => 4 * n,
            Op::Rope(_) => 3 * n,
            Op::Unary(_) | Op::Binary(_) | Op::Scale { .. } | Op::AddScalar { .. } => n,
            Op::Softcap { .. } => 3 * n,
            Op::Reduce { .. } => operands[0].shape.numel() as u64,
            Op::Embedding
            | Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::Slice { .. }
            | Op::Concat { .. }
            | Op::Cast { .. } => 0,
            // max, exp-sum and the picked logit per element; the backward rewrites it.
            Op::CrossEntropy | Op::CrossEntropyBackward => 4 * operands[0].shape.numel() as u64,
            Op::UnaryBackward(_) => 2 * n,
            Op::BinaryBackward { .. } => 2 * n,
            Op::EmbeddingBackward { .. } => operands[1].shape.numel() as u64,
            Op::RmsNormBackward { .. } | Op::LayerNormBackward { .. } => 8 * n,
            Op::RmsNormWeightGrad { .. } | Op::LayerNormWeightGrad { .. } => {
                4 * operands[0].shape.numel() as u64
            }
            Op::RopeBackward(_) => 3 * n,
            // Recomputes Q·Kᵀ, then dP = dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q.
            Op::AttentionBackward {
                scale,
                sliding_window,
                softcap,
            } => {
                let fwd = Op::Attention {
                    scale: *scale,
                    sliding_window: *sliding_window,
                    softcap: *softcap,
                };
                let f = fwd.flops(&operands[..3], &operands[0]);
                f / 2 * 5
            }
            Op::Nll => operands[0].shape.rows() as u64,
            Op::NllBackward => n,
            // One hash and one multiply per element.
            Op::Dropout { .. } => 2 * n,
            Op::Fused { steps } => match self.fused_types(steps, operands) {
                Ok(types) => steps
                    .iter()
                    .zip(&types)
                    .map(|(st, ty)| {
                        let args = fused_arg_types(&st.args, operands, &types);
                        st.op.flops(&args, ty)
                    })
                    .sum(),
                Err(_) => 0,
            },
        }
    }
}

/// The types of a fused step's operands, given the types of the steps so far.
fn fused_arg_types(
    args: &[FusedArg],
    operands: &[TensorType],
    steps: &[TensorType],
) -> Vec<TensorType> {
    args.iter()
        .map(|a| match *a {
            FusedArg::Input(k) => operands[k].clone(),
            FusedArg::Step(j) => steps[j].clone(),
        })
        .collect()
}

impl Op {
    /// The type of every step of a fused chain (checked: fusable ops, float operands,
    /// arguments that exist, every step of the output's shape).
    pub fn fused_types(
        &self,
        steps: &[FusedStep],
        operands: &[TensorType],
    ) -> Result<Vec<TensorType>, OpError> {
        let err = |message: String| OpError {
            op: self.name(),
            operands: operands.to_vec(),
            message,
        };
        if steps.is_empty() {
            return Err(err("has no steps".into()));
        }
        if let Some(t) = operands.iter().find(|t| !t.dtype.is_float()) {
            return Err(err(format!("operands must be floats, got {t}")));
        }
        let products = steps.iter().filter(|s| s.op.is_fusable_product()).count();
        if products > 1 {
            return Err(err(format!("has {products} product steps; at most one")));
        }
        let mut types: Vec<TensorType> = Vec::with_capacity(steps.len());
        for (i, st) in steps.iter().enumerate() {
            if st.op.is_fusable_product() {
                let whole =
                    st.args.len() == 2 && st.args.iter().all(|a| matches!(a, FusedArg::Input(_)));
                if !whole {
                    return Err(err(format!(
                        "step {i}: a product step takes two graph operands"
                    )));
                }
            } else if !st.op.is_fusable() {
                return Err(err(format!(
                    "step {i}: `{}` is not an elementwise op",
                    st.op.name()
                )));
            }
            for a in &st.args {
                let ok = match *a {
                    FusedArg::Input(k) => k < operands.len(),
                    FusedArg::Step(j) => j < i,
                };
                if !ok {
                    return Err(err(format!("step {i}: argument {a:?} does not exist")));
                }
            }
            let args = fused_arg_types(&st.args, operands, &types);
            let ty = st
                .op
                .infer(&args)
                .map_err(|e| err(format!("step {i}: {e}")))?;
            types.push(ty);
        }
        let shape = &types[types.len() - 1].shape;
        if let Some((i, t)) = types.iter().enumerate().find(|(_, t)| t.shape != *shape) {
            return Err(err(format!(
                "step {i} has shape {}, not the result's {shape}",
                t.shape
            )));
        }
        Ok(types)
    }

    fn infer_fused(
        &self,
        steps: &[FusedStep],
        operands: &[TensorType],
    ) -> Result<TensorType, OpError> {
        let mut types = self.fused_types(steps, operands)?;
        Ok(types.pop().expect("fused_types checks there is a step"))
    }
}

/// The result dtype of a product: the first operand's, except that an f32 operand with a
/// narrower float one gives f32 — the narrower values widen exactly, so `x · A` with bf16 `x`
/// and f32 `A` is the f32 product of `Cast(x → f32)` (what the simplify pass folds it into).
fn product_dtype(a: DType, b: DType) -> DType {
    if a.is_float() && b.is_float() && (a == DType::F32 || b == DType::F32) {
        DType::F32
    } else {
        a
    }
}
