//! Calls in model files: the op table (names, parameters, what each becomes in the graph)
//! and the few scalar functions. The op semantics are those of `qplc_ops::Op`.
use super::{suggest, Builder, Value, R};
use crate::dsl::{Expr, ExprKind, KwArg, Span};
use crate::graph::{NodeId, Scope};
use qplc_ops::{BinaryOp, DType, Op, ReduceOp, Rope, RopeScaling, Shape, UnaryOp};

/// How a parameter is passed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum P {
    /// A tensor value.
    T,
    /// A module path relative to the current module (`self_attn.q_proj`), not evaluated.
    M,
    /// Any value (a number, string, list, dict or null).
    V,
}

struct Sig {
    name: &'static str,
    params: &'static [(&'static str, P)],
    /// Positional parameters that must be given (the rest may be omitted).
    required: usize,
    /// The last parameter repeats (`concat(a, b, c, axis=0)`).
    variadic: bool,
    kwargs: &'static [&'static str],
}

const fn sig(
    name: &'static str,
    params: &'static [(&'static str, P)],
    kwargs: &'static [&'static str],
) -> Sig {
    Sig {
        name,
        params,
        required: params.len(),
        variadic: false,
        kwargs,
    }
}

const X: (&str, P) = ("x", P::T);
const MODULE: (&str, P) = ("module", P::M);

const UNARY: &[(&str, UnaryOp)] = &[
    ("neg", UnaryOp::Neg),
    ("exp", UnaryOp::Exp),
    ("log", UnaryOp::Log),
    ("tanh", UnaryOp::Tanh),
    ("rsqrt", UnaryOp::Rsqrt),
    ("recip", UnaryOp::Recip),
    ("square", UnaryOp::Square),
    ("relu", UnaryOp::Relu),
    ("sigmoid", UnaryOp::Sigmoid),
    ("silu", UnaryOp::Silu),
    ("gelu", UnaryOp::Gelu),
    ("gelu_tanh", UnaryOp::GeluTanh),
];

const SIGS: &[Sig] = &[
    sig("embedding", &[("ids", P::T), MODULE], &[]),
    sig("linear", &[X, MODULE], &[]),
    sig("rms_norm", &[X, MODULE], &["eps", "offset"]),
    sig("layer_norm", &[X, MODULE], &["eps"]),
    sig("weight", &[("name", P::M)], &[]),
    sig(
        "rope",
        &[X, ("positions", P::T)],
        &["theta", "dim", "scaling", "interleaved"],
    ),
    sig(
        "attention",
        &[("q", P::T), ("k", P::T), ("v", P::T)],
        &["scale", "window", "softcap"],
    ),
    sig("act", &[X, ("name", P::V)], &[]),
    sig("softcap", &[X, ("cap", P::V)], &[]),
    sig("softmax", &[X], &[]),
    sig("log_softmax", &[X], &[]),
    sig("sum", &[X, ("axis", P::V)], &["keepdim"]),
    sig("mean", &[X, ("axis", P::V)], &["keepdim"]),
    sig("reduce_max", &[X, ("axis", P::V)], &["keepdim"]),
    sig("reshape", &[X, ("shape", P::V)], &[]),
    sig("transpose", &[X, ("perm", P::V)], &[]),
    sig(
        "slice",
        &[X, ("axis", P::V), ("start", P::V), ("end", P::V)],
        &[],
    ),
    Sig {
        name: "concat",
        params: &[("xs", P::T)],
        required: 1,
        variadic: true,
        kwargs: &["axis"],
    },
    sig("cast", &[X, ("dtype", P::V)], &[]),
    sig("matmul", &[("a", P::T), ("b", P::T)], &["ta", "tb"]),
    // Tensor ops when given tensors, scalar functions otherwise.
    sig("sqrt", &[("x", P::V)], &[]),
    sig("max", &[("a", P::V), ("b", P::V)], &[]),
    sig("min", &[("a", P::V), ("b", P::V)], &[]),
    // Scalar functions.
    sig("int", &[("x", P::V)], &[]),
    sig("float", &[("x", P::V)], &[]),
];

/// HF `ACT2FN` names and the op each one is.
const ACTIVATIONS: &[(&str, UnaryOp)] = &[
    ("silu", UnaryOp::Silu),
    ("swish", UnaryOp::Silu),
    ("gelu", UnaryOp::Gelu),
    ("gelu_pytorch_tanh", UnaryOp::GeluTanh),
    ("gelu_new", UnaryOp::GeluTanh),
    ("gelu_fast", UnaryOp::GeluTanh),
    ("relu", UnaryOp::Relu),
    ("sigmoid", UnaryOp::Sigmoid),
    ("tanh", UnaryOp::Tanh),
];

/// An evaluated argument.
enum Arg {
    Val(Value, Span),
    Module(String, Span),
}

impl Builder<'_> {
    pub(super) fn call(
        &mut self,
        name: &str,
        name_span: Span,
        args: &[Expr],
        kwargs: &[KwArg],
        span: Span,
    ) -> R<Value> {
        let sig = self.signature(name, name_span)?;
        let shown = signature_text(name, sig);
        let max = if sig.variadic {
            usize::MAX
        } else {
            sig.params.len()
        };
        if args.len() < sig.required || args.len() > max {
            let want = if sig.variadic {
                format!("at least {}", sig.required)
            } else if sig.required == sig.params.len() {
                sig.required.to_string()
            } else {
                format!("{} to {}", sig.required, sig.params.len())
            };
            return Err(self
                .err(
                    span,
                    format!(
                        "`{name}` takes {want} positional argument(s), got {}",
                        args.len()
                    ),
                )
                .note(format!("expected `{shown}`")));
        }
        for kw in kwargs {
            if !sig.kwargs.contains(&kw.name.as_str()) {
                let mut d = self.err(
                    kw.span,
                    format!("`{name}` has no argument named `{}`", kw.name),
                );
                if let Some(s) = suggest(&kw.name, sig.kwargs.iter().copied()) {
                    d = d.note(format!("did you mean `{s}`?"));
                }
                return Err(d.note(format!("expected `{shown}`")));
            }
        }
        let mut vals = Vec::with_capacity(args.len());
        for (i, a) in args.iter().enumerate() {
            let (pname, kind) = sig.params[i.min(sig.params.len() - 1)];
            vals.push(match kind {
                P::M => Arg::Module(self.module_arg(a)?, a.span),
                P::T => {
                    let v = self.eval(a)?;
                    if !matches!(v, Value::Tensor(_)) {
                        return Err(self.err(
                            a.span,
                            format!(
                                "argument `{pname}` of `{name}` must be a tensor, got {}",
                                v.show()
                            ),
                        ));
                    }
                    Arg::Val(v, a.span)
                }
                P::V => Arg::Val(self.eval(a)?, a.span),
            });
        }
        let mut kw = Kw {
            vals: Vec::with_capacity(kwargs.len()),
            call: span,
            op: name,
        };
        for k in kwargs {
            let v = self.eval(&k.value)?;
            kw.vals.push((k.name.clone(), v, k.value.span));
        }
        self.apply(name, vals, kw, span)
    }

    fn signature(&self, name: &str, span: Span) -> R<&'static Sig> {
        if let Some(s) = SIGS.iter().find(|s| s.name == name) {
            return Ok(s);
        }
        if UNARY.iter().any(|(n, _)| *n == name) {
            // All unary ops share one signature.
            static UNARY_SIG: Sig = sig("unary", &[X], &[]);
            return Ok(&UNARY_SIG);
        }
        let names = all_names();
        let mut d = self.err(span, format!("unknown op or function `{name}`"));
        if let Some(s) = suggest(name, names.iter().copied()) {
            d = d.note(format!("did you mean `{s}`?"));
        }
        Err(d.note(format!("expected one of: {}", names.join(", "))))
    }

    /// A module argument: a dotted name relative to the current module.
    fn module_arg(&self, e: &Expr) -> R<String> {
        fn segments(e: &Expr, out: &mut Vec<String>) -> bool {
            match &e.kind {
                ExprKind::Var(n) => {
                    out.push(n.clone());
                    true
                }
                ExprKind::Field(b, f) => {
                    let ok = segments(b, out);
                    out.push(f.clone());
                    ok
                }
                _ => false,
            }
        }
        let mut segs = Vec::new();
        if !segments(e, &mut segs) {
            return Err(self
                .err(e.span, "expected a module name")
                .note("e.g. `self_attn.q_proj` (relative to the current module)"));
        }
        let rel = segs.join(".");
        Ok(if self.scope.module.is_empty() {
            rel
        } else {
            format!("{}.{rel}", self.scope.module)
        })
    }

    /// A node whose `module` is the given HF module (linears, norms, embeddings).
    fn module_node(&mut self, op: Op, operands: &[NodeId], module: &str, span: Span) -> R<Value> {
        let scope = Scope::new(module, self.scope.block, self.scope.layer);
        Ok(Value::Tensor(self.add_node(op, operands, &scope, span)?))
    }

    fn tensor_node(&mut self, op: Op, operands: &[NodeId], span: Span) -> R<Value> {
        Ok(Value::Tensor(self.op_node(op, operands, span)?))
    }

    fn apply(&mut self, name: &str, args: Vec<Arg>, kw: Kw, span: Span) -> R<Value> {
        let t = |i: usize| match &args[i] {
            Arg::Val(Value::Tensor(id), _) => Some(*id),
            _ => None,
        };
        let module = |i: usize| match &args[i] {
            Arg::Module(m, s) => (m.clone(), *s),
            Arg::Val(_, s) => (String::new(), *s),
        };
        let val = |i: usize| match &args[i] {
            Arg::Val(v, s) => (v.clone(), *s),
            Arg::Module(_, s) => (Value::Null, *s),
        };
        if let Some((_, u)) = UNARY.iter().find(|(n, _)| *n == name) {
            return self.tensor_node(Op::Unary(*u), &[t(0).expect("checked")], span);
        }
        match name {
            "embedding" => {
                let (m, ms) = module(1);
                let w = self.weight(&format!("{m}.weight"), ms)?;
                self.module_node(Op::Embedding, &[t(0).expect("checked"), w], &m, span)
            }
            "linear" => {
                let (m, ms) = module(1);
                let mut operands = vec![t(0).expect("checked")];
                operands.push(self.weight(&format!("{m}.weight"), ms)?);
                let bias = format!("{m}.bias");
                if self.has_weight(&bias) {
                    operands.push(self.weight(&bias, ms)?);
                }
                self.module_node(Op::Linear, &operands, &m, span)
            }
            "rms_norm" | "layer_norm" => {
                let (m, ms) = module(1);
                let eps = self.kw_f64(&kw, "eps", None)?;
                let mut operands = vec![t(0).expect("checked")];
                operands.push(self.weight(&format!("{m}.weight"), ms)?);
                let op = if name == "rms_norm" {
                    let offset = self.kw_f64(&kw, "offset", Some(0.0))?;
                    Op::RmsNorm { eps, offset }
                } else {
                    let bias = format!("{m}.bias");
                    if self.has_weight(&bias) {
                        operands.push(self.weight(&bias, ms)?);
                    }
                    Op::LayerNorm { eps }
                };
                self.module_node(op, &operands, &m, span)
            }
            "weight" => {
                let (m, ms) = module(0);
                Ok(Value::Tensor(self.weight(&m, ms)?))
            }
            "rope" => {
                let x = t(0).expect("checked");
                let head_dim = self.graph.node(x).ty.shape.last() as i64;
                let theta = self.kw_f64(&kw, "theta", None)?;
                let rotary_dim = self.kw_usize(&kw, "dim", Some(head_dim))?;
                let scaling = match kw.get("scaling") {
                    Some((v, s)) => self.rope_scaling(v, s)?,
                    None => RopeScaling::None,
                };
                let interleaved = self.kw_bool(&kw, "interleaved", false)?;
                let rope = Rope {
                    theta,
                    rotary_dim,
                    scaling,
                    interleaved,
                };
                self.tensor_node(Op::Rope(rope), &[x, t(1).expect("checked")], span)
            }
            "attention" => {
                let scale = self.kw_f64(&kw, "scale", None)?;
                let sliding_window = self.kw_opt_usize(&kw, "window")?;
                let softcap = match kw.get("softcap") {
                    None | Some((Value::Null, _)) => None,
                    Some(_) => Some(self.kw_f64(&kw, "softcap", None)?),
                };
                let op = Op::Attention {
                    scale,
                    sliding_window,
                    softcap,
                };
                let qkv = [t(0), t(1), t(2)].map(|x| x.expect("checked"));
                self.tensor_node(op, &qkv, span)
            }
            "act" => {
                let (v, s) = val(1);
                let found = match &v {
                    Value::Str(n) => ACTIVATIONS.iter().find(|(a, _)| a == n),
                    _ => None,
                };
                let Some((_, u)) = found else {
                    let names: Vec<&str> = ACTIVATIONS.iter().map(|(n, _)| *n).collect();
                    return Err(self
                        .err(s, format!("unsupported activation {}", v.show()))
                        .note(format!("expected one of: {}", names.join(", "))));
                };
                self.tensor_node(Op::Unary(*u), &[t(0).expect("checked")], span)
            }
            "softcap" => {
                let (v, s) = val(1);
                let cap = self.num(&v, s, "cap")?;
                self.tensor_node(Op::Softcap { cap }, &[t(0).expect("checked")], span)
            }
            "softmax" => self.tensor_node(Op::Softmax, &[t(0).expect("checked")], span),
            "log_softmax" => self.tensor_node(Op::LogSoftmax, &[t(0).expect("checked")], span),
            "sum" | "mean" | "reduce_max" => {
                let op = match name {
                    "sum" => ReduceOp::Sum,
                    "mean" => ReduceOp::Mean,
                    _ => ReduceOp::Max,
                };
                let (v, s) = val(1);
                let axis = self.index(&v, s, "axis")?;
                let keepdim = self.kw_bool(&kw, "keepdim", false)?;
                self.tensor_node(
                    Op::Reduce { op, axis, keepdim },
                    &[t(0).expect("checked")],
                    span,
                )
            }
            "reshape" | "transpose" => {
                let (v, s) = val(1);
                let dims = self.index_list(&v, s)?;
                let op = if name == "reshape" {
                    Op::Reshape { shape: Shape(dims) }
                } else {
                    Op::Transpose { perm: dims }
                };
                self.tensor_node(op, &[t(0).expect("checked")], span)
            }
            "slice" => {
                let [axis, start, end] = [1, 2, 3].map(val);
                let axis = self.index(&axis.0, axis.1, "axis")?;
                let start = self.index(&start.0, start.1, "start")?;
                let end = self.index(&end.0, end.1, "end")?;
                self.tensor_node(
                    Op::Slice { axis, start, end },
                    &[t(0).expect("checked")],
                    span,
                )
            }
            "concat" => {
                let axis = self.kw_usize(&kw, "axis", None)?;
                let xs: Vec<NodeId> = (0..args.len()).map(|i| t(i).expect("checked")).collect();
                self.tensor_node(Op::Concat { axis }, &xs, span)
            }
            "cast" => {
                let (v, s) = val(1);
                let to = match &v {
                    Value::Str(d) => DType::parse(d),
                    _ => None,
                }
                .ok_or_else(|| {
                    self.err(s, format!("unknown dtype {}", v.show()))
                        .note("expected one of: \"f32\", \"bf16\", \"f16\"")
                })?;
                self.tensor_node(Op::Cast { to }, &[t(0).expect("checked")], span)
            }
            "matmul" => {
                let ta = self.kw_bool(&kw, "ta", false)?;
                let tb = self.kw_bool(&kw, "tb", false)?;
                let ab = [t(0).expect("checked"), t(1).expect("checked")];
                self.tensor_node(Op::MatMul { ta, tb }, &ab, span)
            }
            "sqrt" | "max" | "min" => {
                let vs: Vec<(Value, Span)> = (0..args.len()).map(val).collect();
                if let Some(Value::Tensor(a)) = vs.first().map(|v| &v.0) {
                    let op = match name {
                        "sqrt" => Op::Unary(UnaryOp::Sqrt),
                        "max" => Op::Binary(BinaryOp::Max),
                        _ => Op::Binary(BinaryOp::Min),
                    };
                    let mut operands = vec![*a];
                    if let Some((b, bs)) = vs.get(1) {
                        match b {
                            Value::Tensor(b) => operands.push(*b),
                            other => {
                                return Err(self.err(
                                    *bs,
                                    format!(
                                        "`{name}` of a tensor needs a tensor, got {}",
                                        other.show()
                                    ),
                                ))
                            }
                        }
                    }
                    return self.tensor_node(op, &operands, span);
                }
                let nums: Vec<f64> = vs
                    .iter()
                    .map(|(v, s)| self.num(v, *s, "x"))
                    .collect::<R<_>>()?;
                Ok(match name {
                    "sqrt" => Value::Float(nums[0].sqrt()),
                    _ => {
                        let pick_first = if name == "max" {
                            nums[0] >= nums[1]
                        } else {
                            nums[0] <= nums[1]
                        };
                        vs[if pick_first { 0 } else { 1 }].0.clone()
                    }
                })
            }
            "int" => {
                let (v, s) = val(0);
                let x = self.num(&v, s, "x")?;
                Ok(Value::Int(x.trunc() as i64))
            }
            "float" => {
                let (v, s) = val(0);
                Ok(Value::Float(self.num(&v, s, "x")?))
            }
            other => unreachable!("op `{other}` is in the table but not implemented"),
        }
    }

    /// HF's `rope_scaling` / v5 `rope_parameters` dict (keys `rope_type` or legacy `type`).
    fn rope_scaling(&self, v: &Value, span: Span) -> R<RopeScaling> {
        let d = match v {
            Value::Null => return Ok(RopeScaling::None),
            Value::Dict(d) => d,
            other => {
                return Err(self.err(
                    span,
                    format!("rope scaling must be a dict or null, got {}", other.show()),
                ))
            }
        };
        let ty = d
            .get("rope_type")
            .or_else(|| d.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let field = |k: &str| {
            d.get(k).and_then(|x| x.as_f64()).ok_or_else(|| {
                self.err(
                    span,
                    format!("rope type `{ty}` needs a numeric `{k}` in the rope dict"),
                )
            })
        };
        Ok(match ty {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: field("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: field("factor")?,
                low_freq_factor: field("low_freq_factor")?,
                high_freq_factor: field("high_freq_factor")?,
                original_max_position_embeddings: field("original_max_position_embeddings")?,
            },
            other => {
                return Err(self
                    .err(span, format!("rope type `{other}` is not supported"))
                    .note("expected one of: default, linear, llama3 (others need a new RopeScaling variant in ops)"))
            }
        })
    }

    fn num(&self, v: &Value, span: Span, what: &str) -> R<f64> {
        v.as_f64()
            .ok_or_else(|| self.err(span, format!("`{what}` must be a number, got {}", v.show())))
    }

    fn index(&self, v: &Value, span: Span, what: &str) -> R<usize> {
        match v.as_i64() {
            Some(i) if i >= 0 => Ok(i as usize),
            _ => Err(self.err(
                span,
                format!("`{what}` must be a non-negative integer, got {}", v.show()),
            )),
        }
    }

    fn index_list(&self, v: &Value, span: Span) -> R<Vec<usize>> {
        match v {
            Value::List(items) => items
                .iter()
                .map(|x| self.index(x, span, "each entry"))
                .collect(),
            other => Err(self.err(
                span,
                format!(
                    "expected a list such as `[seq_len, hidden_size]`, got {}",
                    other.show()
                ),
            )),
        }
    }

    fn kw_f64(&self, kw: &Kw, name: &str, default: Option<f64>) -> R<f64> {
        match (kw.get(name), default) {
            (Some((v, s)), _) => self.num(v, s, name),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(kw.missing(self, name)),
        }
    }

    fn kw_usize(&self, kw: &Kw, name: &str, default: Option<i64>) -> R<usize> {
        match (kw.get(name), default) {
            (Some((v, s)), _) => self.index(v, s, name),
            (None, Some(d)) => Ok(d as usize),
            (None, None) => Err(kw.missing(self, name)),
        }
    }

    fn kw_opt_usize(&self, kw: &Kw, name: &str) -> R<Option<usize>> {
        match kw.get(name) {
            None | Some((Value::Null, _)) => Ok(None),
            Some((v, s)) => Ok(Some(self.index(v, s, name)?)),
        }
    }

    fn kw_bool(&self, kw: &Kw, name: &str, default: bool) -> R<bool> {
        match kw.get(name) {
            None => Ok(default),
            Some((Value::Bool(b), _)) => Ok(*b),
            Some((v, s)) => Err(self.err(
                s,
                format!("`{name}` must be true or false, got {}", v.show()),
            )),
        }
    }
}

/// Evaluated keyword arguments of one call.
struct Kw<'n> {
    vals: Vec<(String, Value, Span)>,
    call: Span,
    op: &'n str,
}

impl Kw<'_> {
    fn get(&self, name: &str) -> Option<(&Value, Span)> {
        self.vals
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, v, s)| (v, *s))
    }

    fn missing(&self, b: &Builder<'_>, name: &str) -> crate::dsl::Diagnostic {
        b.err(
            self.call,
            format!("`{}` needs the argument `{name}=…`", self.op),
        )
    }
}

fn signature_text(name: &str, s: &Sig) -> String {
    let mut parts: Vec<String> = s
        .params
        .iter()
        .enumerate()
        .map(|(i, (n, _))| {
            if s.variadic && i + 1 == s.params.len() {
                format!("{n}...")
            } else if i >= s.required {
                format!("[{n}]")
            } else {
                n.to_string()
            }
        })
        .collect();
    parts.extend(s.kwargs.iter().map(|k| format!("{k}=…")));
    format!("{name}({})", parts.join(", "))
}

fn all_names() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = SIGS.iter().map(|s| s.name).collect();
    v.extend(UNARY.iter().map(|(n, _)| *n));
    v.sort_unstable();
    v
}
