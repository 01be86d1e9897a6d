//! Expression evaluation. Scalars (config arithmetic, Python semantics for `//`, `%`, `**`)
//! are computed here; an operator with a tensor operand adds a graph node instead.
use super::{suggest, Builder, Value, R};
use crate::dsl::{BinOp, Expr, ExprKind, Span, UnOp};
use qplc_ops::{BinaryOp, Op, UnaryOp};

impl Builder<'_> {
    pub(super) fn eval(&mut self, e: &Expr) -> R<Value> {
        Ok(match &e.kind {
            ExprKind::Null => Value::Null,
            ExprKind::Bool(b) => Value::Bool(*b),
            ExprKind::Int(i) => Value::Int(*i),
            ExprKind::Float(x) => Value::Float(*x),
            ExprKind::Str(s) => Value::Str(s.clone()),
            ExprKind::List(items) => {
                let mut out = Vec::with_capacity(items.len());
                for it in items {
                    out.push(self.eval(it)?);
                }
                Value::List(out)
            }
            ExprKind::Var(name) => self.var(name, e.span)?,
            ExprKind::Field(base, field) => match self.eval(base)? {
                Value::Dict(d) => d.get(field).map_or(Value::Null, Value::from_json),
                // Null propagates so that `rope_parameters.rope_theta ?? 10000.0` works
                // whether or not the checkpoint has `rope_parameters`.
                Value::Null => Value::Null,
                other => {
                    return Err(self.err(
                        e.span,
                        format!("`.{field}` needs a dict, but this is {}", other.show()),
                    ))
                }
            },
            ExprKind::Index(base, idx) => {
                let b = self.eval(base)?;
                let i = self.eval(idx)?;
                match (&b, i.as_i64()) {
                    (Value::Null, _) => Value::Null,
                    (Value::List(l), Some(k)) if k >= 0 && (k as usize) < l.len() => {
                        l[k as usize].clone()
                    }
                    (Value::List(l), _) => {
                        return Err(self.err(
                            idx.span,
                            format!(
                                "index {} is out of range for a list of {}",
                                i.show(),
                                l.len()
                            ),
                        ))
                    }
                    _ => {
                        return Err(self.err(
                            base.span,
                            format!("`[…]` needs a list, but this is {}", b.show()),
                        ))
                    }
                }
            }
            ExprKind::Unary(op, x) => {
                let v = self.eval(x)?;
                match (op, v) {
                    (UnOp::Neg, Value::Int(i)) => Value::Int(-i),
                    (UnOp::Neg, Value::Float(f)) => Value::Float(-f),
                    (UnOp::Neg, Value::Tensor(t)) => {
                        Value::Tensor(self.op_node(Op::Unary(UnaryOp::Neg), &[t], e.span)?)
                    }
                    (UnOp::Not, Value::Bool(b)) => Value::Bool(!b),
                    (op, v) => {
                        let sym = if *op == UnOp::Neg { "-" } else { "not" };
                        return Err(
                            self.err(e.span, format!("`{sym}` cannot be applied to {}", v.show()))
                        );
                    }
                }
            }
            ExprKind::Binary(BinOp::And, a, b) => {
                Value::Bool(self.eval_bool(a)? && self.eval_bool(b)?)
            }
            ExprKind::Binary(BinOp::Or, a, b) => {
                Value::Bool(self.eval_bool(a)? || self.eval_bool(b)?)
            }
            ExprKind::Binary(BinOp::Coalesce, a, b) => match self.eval(a)? {
                Value::Null => self.eval(b)?,
                v => v,
            },
            ExprKind::Binary(op, a, b) => {
                let l = self.eval(a)?;
                let r = self.eval(b)?;
                self.binary(*op, l, r, e.span)?
            }
            ExprKind::Cond { then, cond, els } => {
                if self.eval_bool(cond)? {
                    self.eval(then)?
                } else {
                    self.eval(els)?
                }
            }
            ExprKind::Call {
                name,
                name_span,
                args,
                kwargs,
            } => self.call(name, *name_span, args, kwargs, e.span)?,
        })
    }

    pub(super) fn eval_bool(&mut self, e: &Expr) -> R<bool> {
        match self.eval(e)? {
            Value::Bool(b) => Ok(b),
            other => Err(self.err(
                e.span,
                format!("expected true or false here, got {}", other.show()),
            )),
        }
    }

    fn var(&self, name: &str, span: Span) -> R<Value> {
        if let Some(v) = self.env.get(name) {
            return Ok(v.clone());
        }
        let mut d = self.err(span, format!("undefined variable `{name}`"));
        if let Some(s) = suggest(name, self.env.keys().map(String::as_str)) {
            d = d.note(format!("did you mean `{s}`?"));
        }
        Err(d.note(
            "expected a config key, an input, `seq_len`, the loop variable or a name assigned earlier",
        ))
    }

    fn binary(&mut self, op: BinOp, l: Value, r: Value, span: Span) -> R<Value> {
        use Value::*;
        let bad = |b: &Self, l: &Value, r: &Value| {
            b.err(
                span,
                format!(
                    "`{}` is not defined between {} and {}",
                    op.symbol(),
                    l.type_name(),
                    r.type_name()
                ),
            )
        };
        // Tensor arithmetic becomes graph nodes.
        if matches!(l, Tensor(_)) || matches!(r, Tensor(_)) {
            let (node_op, operands) = match (&l, &r) {
                (Tensor(a), Tensor(b)) => {
                    let bop = match op {
                        BinOp::Add => BinaryOp::Add,
                        BinOp::Sub => BinaryOp::Sub,
                        BinOp::Mul => BinaryOp::Mul,
                        BinOp::Div => BinaryOp::Div,
                        _ => return Err(bad(self, &l, &r)),
                    };
                    (Op::Binary(bop), vec![*a, *b])
                }
                (Tensor(t), s) | (s, Tensor(t)) => {
                    let tensor_left = matches!(l, Tensor(_));
                    let Some(c) = s.as_f64() else {
                        return Err(bad(self, &l, &r));
                    };
                    let op = match (op, tensor_left) {
                        (BinOp::Add, _) => Op::AddScalar { value: c },
                        (BinOp::Sub, true) => Op::AddScalar { value: -c },
                        (BinOp::Mul, _) => Op::Scale { factor: c },
                        (BinOp::Div, true) => Op::Scale { factor: 1.0 / c },
                        _ => return Err(bad(self, &l, &r)),
                    };
                    (op, vec![*t])
                }
                _ => unreachable!("one side is a tensor"),
            };
            return Ok(Tensor(self.op_node(node_op, &operands, span)?));
        }
        Ok(match op {
            BinOp::Eq => Bool(scalar_eq(&l, &r)),
            BinOp::Ne => Bool(!scalar_eq(&l, &r)),
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
                let (Some(a), Some(b)) = (l.as_f64(), r.as_f64()) else {
                    return Err(bad(self, &l, &r));
                };
                Bool(match op {
                    BinOp::Lt => a < b,
                    BinOp::Le => a <= b,
                    BinOp::Gt => a > b,
                    _ => a >= b,
                })
            }
            BinOp::Add => match (&l, &r) {
                (Int(a), Int(b)) => Int(a + b),
                (Str(a), Str(b)) => Str(format!("{a}{b}")),
                _ => Float(self.nums(&l, &r, span, op)?.iter().sum()),
            },
            BinOp::Sub => match (&l, &r) {
                (Int(a), Int(b)) => Int(a - b),
                _ => {
                    let [a, b] = self.nums(&l, &r, span, op)?;
                    Float(a - b)
                }
            },
            BinOp::Mul => match (&l, &r) {
                (Int(a), Int(b)) => Int(a * b),
                _ => {
                    let [a, b] = self.nums(&l, &r, span, op)?;
                    Float(a * b)
                }
            },
            BinOp::Div => {
                let [a, b] = self.nums(&l, &r, span, op)?;
                if b == 0.0 {
                    return Err(self.err(span, "division by zero"));
                }
                Float(a / b)
            }
            BinOp::FloorDiv | BinOp::Rem => match (&l, &r) {
                (Int(_), Int(0)) => return Err(self.err(span, "division by zero")),
                (Int(a), Int(b)) if op == BinOp::FloorDiv => Int(a.div_euclid(*b)),
                (Int(a), Int(b)) => Int(a.rem_euclid(*b)),
                _ => {
                    let [a, b] = self.nums(&l, &r, span, op)?;
                    if op == BinOp::FloorDiv {
                        Float((a / b).floor())
                    } else {
                        Float(a - b * (a / b).floor())
                    }
                }
            },
            BinOp::Pow => match (&l, &r) {
                (Int(a), Int(b)) if *b >= 0 => Int(a.pow(*b as u32)),
                _ => {
                    let [a, b] = self.nums(&l, &r, span, op)?;
                    Float(a.powf(b))
                }
            },
            BinOp::And | BinOp::Or | BinOp::Coalesce => unreachable!("handled lazily"),
        })
    }

    fn nums(&self, l: &Value, r: &Value, span: Span, op: BinOp) -> R<[f64; 2]> {
        match (l.as_f64(), r.as_f64()) {
            (Some(a), Some(b)) => Ok([a, b]),
            _ => Err(self.err(
                span,
                format!(
                    "`{}` is not defined between {} and {}",
                    op.symbol(),
                    l.show(),
                    r.show()
                ),
            )),
        }
    }
}

fn scalar_eq(l: &Value, r: &Value) -> bool {
    match (l.as_f64(), r.as_f64()) {
        (Some(a), Some(b)) => a == b,
        _ => l == r,
    }
}
