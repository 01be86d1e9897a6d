//! The graph builder (DESIGN.md "The flow", step 1): binds a model file to a checkpoint's
//! config.json and builds the forward graph with the conventions of notes/CONTRACT.md —
//! inputs `input_ids`/`position_ids`, weights named by HF tensor name in the compute dtype,
//! outputs `logits` and `hidden`, every node tagged with its pipeline block, layer and HF
//! module name.
mod config;
mod eval;
mod ops;
mod value;
mod weights;

pub use value::Value;

use crate::dsl::{Diagnostic, ModelDef, Path, Segment, Span, Stmt};
use crate::graph::{BlockKind, Graph, GraphError, NodeId, Scope};
use qplc_ops::{DType, Op, Shape, TensorType};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// What the caller decides rather than the checkpoint: sequence length (static shapes,
/// micro-batch 1) and the compute dtype of weights and activations.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub seq_len: usize,
    pub dtype: DType,
}

#[derive(Clone, Debug)]
pub struct BuiltModel {
    pub graph: Graph,
    pub info: ModelInfo,
}

/// One checkpoint tensor the graph binds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightInfo {
    /// HF tensor name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    pub shape: Shape,
}

/// Facts about the built model that later passes and reports need.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The `model <name>` of the model file.
    pub arch: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub seq_len: usize,
    pub dtype: DType,
    /// Every config key the model file declares, after defaults.
    pub config: BTreeMap<String, serde_json::Value>,
    /// True when some weight is tied to another (the LM head to the embedding).
    pub tie_word_embeddings: bool,
    /// Short names of the linear modules (`q_proj`, …, `lm_head`), for `target_modules`.
    pub linear_modules: Vec<String>,
    /// The checkpoint tensors the graph reads (tied aliases excluded), in declaration order.
    pub weights: Vec<WeightInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A binding error located in the model file (config key, op, shape, …).
    #[error("{0}")]
    Model(#[from] Diagnostic),
    /// The finished graph fails `Graph::verify` (a bug in the builder or the op vocabulary).
    #[error("the built graph does not verify: {0}")]
    Graph(#[from] GraphError),
}

/// Builds the forward graph of `def` for the checkpoint whose config.json is `hf_config`.
pub fn build_forward(
    def: &ModelDef,
    hf_config: &serde_json::Value,
    opts: &BuildOptions,
) -> Result<BuiltModel, BuildError> {
    let mut b = Builder {
        def,
        opts,
        graph: Graph::new(),
        env: HashMap::new(),
        config: BTreeMap::new(),
        weights: BTreeMap::new(),
        weight_order: Vec::new(),
        weight_nodes: HashMap::new(),
        scope: Scope::new("", BlockKind::Inputs, None),
        num_layers: 0,
    };
    b.env
        .insert("seq_len".into(), Value::Int(opts.seq_len as i64));
    b.bind_config(hf_config)?;
    b.num_layers = b.layer_count()?;
    b.declare_weights()?;
    b.add_inputs()?;
    for block in &def.blocks {
        b.run_block(block)?;
    }
    b.set_outputs()?;
    b.check_all_weights_used()?;
    b.graph.verify()?;
    let info = b.info();
    Ok(BuiltModel {
        graph: b.graph,
        info,
    })
}

type R<T> = Result<T, Diagnostic>;

/// A concrete (per-layer expanded) entry of the `weights` section.
#[derive(Clone, Debug)]
struct WeightEntry {
    /// Index of the declaration in `ModelDef::weights`.
    decl: usize,
    target: WeightTarget,
    used: bool,
}

#[derive(Clone, Debug)]
enum WeightTarget {
    Tensor(Shape),
    Alias(String),
}

struct Builder<'a> {
    def: &'a ModelDef,
    opts: &'a BuildOptions,
    graph: Graph,
    /// Variables: config keys, `seq_len`, inputs, loop variables and assigned values.
    env: HashMap<String, Value>,
    config: BTreeMap<String, serde_json::Value>,
    weights: BTreeMap<String, WeightEntry>,
    weight_order: Vec<String>,
    weight_nodes: HashMap<String, NodeId>,
    scope: Scope,
    num_layers: usize,
}

impl Builder<'_> {
    fn err(&self, span: Span, msg: impl Into<String>) -> Diagnostic {
        Diagnostic::new(&self.def.source, span, msg)
    }

    /// The repeat count of the (first) repeating block: the number of decoder layers.
    fn layer_count(&mut self) -> R<usize> {
        match self.def.blocks.iter().find_map(|b| b.repeat.as_ref()) {
            Some(e) => {
                let v = self.eval(e)?;
                match v.as_i64() {
                    Some(n) if n >= 0 => Ok(n as usize),
                    _ => Err(self.err(
                        e.span,
                        format!(
                            "the repeat count must be a non-negative int, got {}",
                            v.show()
                        ),
                    )),
                }
            }
            None => Ok(0),
        }
    }

    /// The loop variable of a repeating block: the `{i}` of its module path, else `i`.
    fn loop_var(path: Option<&Path>) -> String {
        path.and_then(|p| p.vars().next())
            .unwrap_or("i")
            .to_string()
    }

    /// A path with its `{var}` segments replaced by their current values.
    fn render_path(&self, p: &Path) -> R<String> {
        let mut parts = Vec::with_capacity(p.segments.len());
        for s in &p.segments {
            match s {
                Segment::Name(n) => parts.push(n.clone()),
                Segment::Var(v) => match self.env.get(v) {
                    Some(Value::Int(i)) => parts.push(i.to_string()),
                    _ => return Err(self
                        .err(p.span, format!("`{{{v}}}` is not a loop variable here"))
                        .note(
                            "`{i}` may only appear in a repeating block or in per-layer weights",
                        )),
                },
            }
        }
        Ok(parts.join("."))
    }

    fn add_inputs(&mut self) -> R<()> {
        for inp in &self.def.inputs {
            let dtype = DType::parse(&inp.dtype).ok_or_else(|| {
                self.err(
                    inp.dtype_span,
                    format!("unknown element type `{}`", inp.dtype),
                )
                .note("expected one of: f32, bf16, f16, i32, i64, u8")
            })?;
            let shape = self.eval_shape(&inp.shape)?;
            let op = Op::Input {
                name: inp.name.clone(),
                ty: TensorType::new(shape, dtype),
            };
            let scope = Scope::new("", BlockKind::Inputs, None);
            let id = self.add_node(op, &[], &scope, inp.span)?;
            self.env.insert(inp.name.clone(), Value::Tensor(id));
        }
        Ok(())
    }

    fn run_block(&mut self, block: &crate::dsl::Block) -> R<()> {
        let var = Self::loop_var(block.module.as_ref());
        let layers: Vec<Option<usize>> = match block.repeat {
            Some(_) => (0..self.num_layers).map(Some).collect(),
            None => vec![None],
        };
        for layer in layers {
            if let Some(i) = layer {
                self.env.insert(var.clone(), Value::Int(i as i64));
            }
            let module = match &block.module {
                Some(p) => self.render_path(p)?,
                None => String::new(),
            };
            self.scope = Scope::new(module, block.kind, layer);
            self.run_stmts(&block.body)?;
        }
        if block.repeat.is_some() {
            self.env.remove(&var);
        }
        Ok(())
    }

    fn run_stmts(&mut self, stmts: &[Stmt]) -> R<()> {
        for s in stmts {
            match s {
                Stmt::Assign { name, value, .. } => {
                    let v = self.eval(value)?;
                    self.env.insert(name.clone(), v);
                }
                Stmt::If { cond, then, els } => {
                    if self.eval_bool(cond)? {
                        self.run_stmts(then)?;
                    } else {
                        self.run_stmts(els)?;
                    }
                }
                Stmt::Module { path, body } => {
                    let rel = self.render_path(path)?;
                    let saved = self.scope.clone();
                    self.scope = self.scope.child(&rel);
                    let r = self.run_stmts(body);
                    self.scope = saved;
                    r?;
                }
            }
        }
        Ok(())
    }

    fn set_outputs(&mut self) -> R<()> {
        for (name, span) in &self.def.outputs {
            match self.env.get(name) {
                Some(Value::Tensor(id)) => self.graph.set_output(name, *id),
                Some(other) => {
                    return Err(self.err(
                        *span,
                        format!("output `{name}` is {}, not a tensor", other.show()),
                    ))
                }
                None => return Err(self.err(*span, format!("output `{name}` is never assigned"))),
            }
        }
        for required in ["logits", "hidden"] {
            if self.graph.output(required).is_none() {
                return Err(self
                    .err(
                        self.def.outputs_span,
                        format!("the model has no output `{required}`"),
                    )
                    .note("expected outputs `logits` [T, vocab] and `hidden` (the final norm's output) [T, hidden]"));
            }
        }
        Ok(())
    }

    /// Adds a node, turning an op's shape/dtype error into a located diagnostic.
    fn add_node(&mut self, op: Op, operands: &[NodeId], scope: &Scope, span: Span) -> R<NodeId> {
        self.graph.add(op, operands, scope).map_err(|e| match e {
            GraphError::Op { module, source } => {
                let mut d = self.err(span, format!("shape error: {source}"));
                if !module.is_empty() {
                    d = d.note(format!("in module `{module}`"));
                }
                d
            }
            other => self.err(span, other.to_string()),
        })
    }

    /// Adds a node in the current scope (module, block, layer).
    fn op_node(&mut self, op: Op, operands: &[NodeId], span: Span) -> R<NodeId> {
        let scope = self.scope.clone();
        self.add_node(op, operands, &scope, span)
    }

    fn info(&self) -> ModelInfo {
        let last = |name: &str| {
            self.graph
                .output(name)
                .map_or(0, |id| self.graph.node(id).ty.shape.last())
        };
        let mut linear_modules: Vec<String> = Vec::new();
        for id in self.graph.g.node_indices() {
            let n = self.graph.node(id);
            if matches!(n.op, Op::Linear) {
                let short = n.module.rsplit('.').next().unwrap_or("").to_string();
                if !linear_modules.contains(&short) {
                    linear_modules.push(short);
                }
            }
        }
        let mut weights = Vec::new();
        let mut tied = false;
        for name in &self.weight_order {
            match &self.weights[name].target {
                WeightTarget::Tensor(shape) => weights.push(WeightInfo {
                    name: name.clone(),
                    shape: shape.clone(),
                }),
                WeightTarget::Alias(_) => tied = true,
            }
        }
        ModelInfo {
            arch: self.def.name.clone(),
            num_layers: self.num_layers,
            hidden_size: last("hidden"),
            vocab_size: last("logits"),
            seq_len: self.opts.seq_len,
            dtype: self.opts.dtype,
            config: self.config.clone(),
            tie_word_embeddings: tied,
            linear_modules,
            weights,
        }
    }
}

/// Edit distance, for "did you mean" suggestions.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate within a small edit distance.
fn suggest<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    candidates
        .into_iter()
        .map(|c| (distance(word, c), c))
        .filter(|(d, c)| *d <= 2.max(word.len() / 3) && *d < c.len())
        .min()
        .map(|(_, c)| c)
}
