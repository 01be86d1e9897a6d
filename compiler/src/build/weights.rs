//! The `weights` section: expanded per layer into concrete HF tensor names, bound lazily to
//! `Op::Weight` nodes when the forward first uses them, and checked for leftovers.
use super::{Builder, Value, WeightEntry, WeightTarget, R};
use crate::dsl::{Expr, Span, WeightKind};
use crate::graph::{NodeId, Scope};
use qplc_ops::{Op, Shape, TensorType};

impl Builder<'_> {
    pub(super) fn declare_weights(&mut self) -> R<()> {
        let def = self.def;
        for (di, decl) in def.weights.iter().enumerate() {
            let vars: Vec<String> = decl.name.vars().map(str::to_string).collect();
            if vars.len() > 1 {
                return Err(self.err(decl.name.span, "a weight name may use one loop variable"));
            }
            let indices: Vec<Option<i64>> = match vars.first() {
                None => vec![None],
                Some(v) => {
                    if def.blocks.iter().all(|b| b.repeat.is_none()) {
                        return Err(self.err(
                            decl.name.span,
                            format!("`{{{v}}}` is used but no block repeats"),
                        ));
                    }
                    (0..self.num_layers as i64).map(Some).collect()
                }
            };
            for idx in indices {
                if let (Some(v), Some(i)) = (vars.first(), idx) {
                    self.env.insert(v.clone(), Value::Int(i));
                }
                let active = match &decl.cond {
                    Some(c) => self.eval_bool(c)?,
                    None => true,
                };
                if active {
                    let name = self.render_path(&decl.name)?;
                    let target = match &decl.kind {
                        WeightKind::Tensor(dims) => WeightTarget::Tensor(self.eval_shape(dims)?),
                        WeightKind::Alias(p) => WeightTarget::Alias(self.render_path(p)?),
                    };
                    if let Some(first) = self.weights.get(&name) {
                        let (line, _) = def.source.line_col(def.weights[first.decl].span.start);
                        return Err(self
                            .err(
                                decl.span,
                                format!("weight `{name}` is declared twice (first on line {line})"),
                            )
                            .note(
                                "give the declarations `if` conditions that exclude each other",
                            ));
                    }
                    self.weights.insert(
                        name.clone(),
                        WeightEntry {
                            decl: di,
                            target,
                            used: false,
                        },
                    );
                    self.weight_order.push(name);
                }
                if let Some(v) = vars.first() {
                    self.env.remove(v);
                }
            }
        }
        // Aliases must name a real tensor (one level: no alias of an alias).
        for name in &self.weight_order {
            let e = &self.weights[name];
            if let WeightTarget::Alias(t) = &e.target {
                if !matches!(
                    self.weights.get(t),
                    Some(WeightEntry {
                        target: WeightTarget::Tensor(_),
                        ..
                    })
                ) {
                    return Err(self.err(
                        def.weights[e.decl].span,
                        format!("`{name}` is tied to `{t}`, which is not a declared tensor"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A shape: every dimension a positive integer.
    pub(super) fn eval_shape(&mut self, dims: &[Expr]) -> R<Shape> {
        let mut out = Vec::with_capacity(dims.len());
        for d in dims {
            let v = self.eval(d)?;
            match v.as_i64() {
                Some(n) if n > 0 => out.push(n as usize),
                _ => {
                    return Err(self.err(
                        d.span,
                        format!("a dimension must be a positive integer, got {}", v.show()),
                    ))
                }
            }
        }
        Ok(Shape(out))
    }

    /// Whether the weights section declares `name` (after its conditions).
    pub(super) fn has_weight(&self, name: &str) -> bool {
        self.weights.contains_key(name)
    }

    /// The node of checkpoint tensor `name`, created on first use in the current block and
    /// layer; a tied name resolves to its target's node (CONTRACT.md: the head reuses
    /// `model.embed_tokens.weight`).
    pub(super) fn weight(&mut self, name: &str, span: Span) -> R<NodeId> {
        if let Some(&id) = self.weight_nodes.get(name) {
            if let Some(e) = self.weights.get_mut(name) {
                e.used = true;
            }
            return Ok(id);
        }
        let Some(entry) = self.weights.get_mut(name) else {
            return Err(self
                .err(span, format!("no weight `{name}` is declared"))
                .note("expected a line for it in the `weights` section (or check that line's `if` condition)"));
        };
        entry.used = true;
        let id = match entry.target.clone() {
            WeightTarget::Alias(target) => self.weight(&target, span)?,
            WeightTarget::Tensor(shape) => {
                let module = name.rsplit_once('.').map_or("", |(m, _)| m);
                let scope = Scope::new(module, self.scope.block, self.scope.layer);
                let op = Op::Weight {
                    name: name.to_string(),
                    ty: TensorType::new(shape, self.opts.dtype),
                };
                self.add_node(op, &[], &scope, span)?
            }
        };
        self.weight_nodes.insert(name.to_string(), id);
        Ok(id)
    }

    pub(super) fn check_all_weights_used(&self) -> R<()> {
        for name in &self.weight_order {
            let e = &self.weights[name];
            if !e.used {
                return Err(self
                    .err(
                        self.def.weights[e.decl].span,
                        format!("weight `{name}` is declared but the forward never uses it"),
                    )
                    .note("use it in a block, give it an `if` condition, or remove it"));
            }
        }
        Ok(())
    }
}
