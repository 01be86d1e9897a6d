//! The `fuse` pass (DESIGN "Passes"): pattern → pattern rewrites as egg rules, not
//! hand-written graph surgery. Today's rules turn the loss pass's textbook
//! `Nll(LogSoftmax(z), y)` — and the backward the autodiff pass derives from it — into the
//! fused, vocabulary-chunked `CrossEntropy` / `CrossEntropyBackward` (spec §7), so no
//! `[T, V]` log-probability or softmax buffer exists beside the logits and their gradient.
//! Later fusions (SwiGLU, RMSNorm chains, LoRA-linear for the CUDA backend) are more
//! [`FuseRule`]s in [`FusePass::standard`].
//!
//! How a graph goes through egg (which extracts trees, DESIGN "Dependencies"):
//! * the *region* is every node whose op some rule mentions; each becomes an e-node
//!   `(symbol children…)`, its symbol derived from the `Op` value ([`op_symbol`]), so rules
//!   and graph agree by construction. Operands outside the region become opaque leaves
//!   `%<node index>`, one per graph node, so nothing outside the region is merged or moved;
//! * the rules run to saturation (they only ever shrink the region);
//! * every region node whose value leaves the region (a user outside it, or a graph output)
//!   is a *root*: the cheapest tree of its e-class (fewest ops, i.e. kernels) is rebuilt in
//!   the graph, reusing existing nodes wherever the tree is unchanged, and the root's users
//!   and outputs move to it; nodes left without users are removed.
use crate::pass::{Pass, PassContext};
use anyhow::{bail, Context, Result};
use egg::{define_language, AstSize, EGraph, Extractor, Id, Pattern, RecExpr, Rewrite, Runner};
use egg::{Language, Symbol};
use petgraph::graph::NodeIndex;
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use qplc_compiler::{Graph, NodeId, Scope};
use qplc_ops::{Op, ReduceOp};
use std::collections::{BTreeSet, HashMap, HashSet};

define_language! {
    /// Graph ops as e-nodes: a symbol naming the op (with its parameters) and its operands.
    /// A leaf `%<index>` stands for a graph node outside the rewritten region.
    pub enum FuseLang {
        Node(Symbol, Vec<Id>),
    }
}

/// The symbol of an op in rules and e-graphs: the op's name, plus its parameters for ops
/// that have any (`reduce_sum{axis:1,keepdim:true}` style, from the `Debug` form with the
/// characters the s-expression reader treats specially removed).
pub fn op_symbol(op: &Op) -> String {
    let debug = format!("{op:?}");
    match debug.find(['{', '(']) {
        None => op.name().to_string(),
        Some(i) => {
            let params: String = debug[i..]
                .chars()
                .filter(|c| !c.is_whitespace() && !matches!(c, '"' | ';'))
                .map(|c| match c {
                    '(' => '[',
                    ')' => ']',
                    c => c,
                })
                .collect();
            format!("{}{params}", op.name())
        }
    }
}

/// One rewrite: `lhs → rhs` as s-expressions over pattern variables (`?z`) and the
/// symbols of `ops` — every op either side mentions, so the pass knows which graph nodes
/// the rule can see and how to turn an e-node back into an `Op`. Write patterns with
/// [`FuseRule::sym`]-formatted names, never by hand.
#[derive(Clone, Debug)]
pub struct FuseRule {
    pub name: String,
    pub ops: Vec<Op>,
    pub lhs: String,
    pub rhs: String,
}

impl FuseRule {
    /// The symbol of `op` for use in a pattern string.
    pub fn sym(op: &Op) -> String {
        op_symbol(op)
    }

    fn rewrite(&self) -> Result<Rewrite<FuseLang, ()>> {
        let lhs: Pattern<FuseLang> = self
            .lhs
            .parse()
            .map_err(|e| anyhow::anyhow!("fuse rule `{}`: left side: {e}", self.name))?;
        let rhs: Pattern<FuseLang> = self
            .rhs
            .parse()
            .map_err(|e| anyhow::anyhow!("fuse rule `{}`: right side: {e}", self.name))?;
        Rewrite::new(self.name.clone(), lhs, rhs)
            .map_err(|e| anyhow::anyhow!("fuse rule `{}`: {e}", self.name))
    }
}

/// `Nll(LogSoftmax(z), y) → CrossEntropy(z, y)` and the same for the backward the autodiff
/// pass builds from the unfused form: the `NllBackward` gradient `d` pushed through
/// log-softmax's rule `d − exp(logp)·Σ_v d` is `CrossEntropyBackward(z, y, g)` (spec §7).
pub fn cross_entropy_rules() -> Vec<FuseRule> {
    let ls = FuseRule::sym(&Op::LogSoftmax);
    let nll = FuseRule::sym(&Op::Nll);
    let nllb = FuseRule::sym(&Op::NllBackward);
    let ce = FuseRule::sym(&Op::CrossEntropy);
    let ceb = FuseRule::sym(&Op::CrossEntropyBackward);
    let sub = FuseRule::sym(&Op::Binary(qplc_ops::BinaryOp::Sub));
    let mul = FuseRule::sym(&Op::Binary(qplc_ops::BinaryOp::Mul));
    let exp = FuseRule::sym(&Op::Unary(qplc_ops::UnaryOp::Exp));
    // `Nll` takes [T, V], so log-softmax's rule sums over axis 1.
    let row_sum = Op::Reduce {
        op: ReduceOp::Sum,
        axis: 1,
        keepdim: true,
    };
    let sum = FuseRule::sym(&row_sum);
    let d = format!("({nllb} ({ls} ?z) ?y ?g)");
    vec![
        FuseRule {
            name: "cross-entropy".into(),
            ops: vec![Op::LogSoftmax, Op::Nll, Op::CrossEntropy],
            lhs: format!("({nll} ({ls} ?z) ?y)"),
            rhs: format!("({ce} ?z ?y)"),
        },
        FuseRule {
            name: "cross-entropy-backward".into(),
            ops: vec![
                Op::LogSoftmax,
                Op::NllBackward,
                Op::Binary(qplc_ops::BinaryOp::Sub),
                Op::Binary(qplc_ops::BinaryOp::Mul),
                Op::Unary(qplc_ops::UnaryOp::Exp),
                row_sum,
                Op::CrossEntropyBackward,
            ],
            lhs: format!("({sub} {d} ({mul} ({exp} ({ls} ?z)) ({sum} {d})))"),
            rhs: format!("({ceb} ?z ?y ?g)"),
        },
    ]
}

/// The pass: a set of rules applied together.
pub struct FusePass {
    pub rules: Vec<FuseRule>,
}

impl FusePass {
    /// The rules the pipeline runs today.
    pub fn standard() -> Self {
        FusePass {
            rules: cross_entropy_rules(),
        }
    }
}

impl Pass for FusePass {
    fn name(&self) -> &str {
        "fuse"
    }
    fn run(&self, mut graph: Graph, cx: &mut PassContext) -> Result<Graph> {
        let stats = fuse(&mut graph, &self.rules)?;
        if stats.rewritten > 0 {
            cx.notes.push(format!(
                "fuse: {} value(s) rewritten, {} node(s) removed ({})",
                stats.rewritten,
                stats.removed,
                stats.fired.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        Ok(graph)
    }
}

/// What one run of the rules did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FuseStats {
    /// Roots whose value is now computed by a different tree.
    pub rewritten: usize,
    /// Nodes that became unused and were removed.
    pub removed: usize,
    /// Names of the rules that matched at least once.
    pub fired: BTreeSet<String>,
}

/// Applies `rules` to `graph` in place (see the module comment).
pub fn fuse(graph: &mut Graph, rules: &[FuseRule]) -> Result<FuseStats> {
    let mut stats = FuseStats::default();
    // Symbol → op for everything the rules mention (and so may produce).
    let mut op_of: HashMap<String, Op> = HashMap::new();
    for r in rules {
        for op in &r.ops {
            op_of.insert(op_symbol(op), op.clone());
        }
    }
    let rewrites = rules
        .iter()
        .map(FuseRule::rewrite)
        .collect::<Result<Vec<_>>>()?;

    // The region and its e-graph.
    let order = graph.topo_order()?;
    let symbol_of = |graph: &Graph, id: NodeId| -> Option<String> {
        let s = op_symbol(&graph.node(id).op);
        op_of.contains_key(&s).then_some(s)
    };
    let mut egraph: EGraph<FuseLang, ()> = EGraph::default();
    let mut class: HashMap<NodeId, Id> = HashMap::new();
    let mut region: Vec<NodeId> = Vec::new();
    for &id in &order {
        let Some(sym) = symbol_of(graph, id) else {
            continue;
        };
        let mut kids = Vec::new();
        for o in graph.operands(id) {
            let c = match class.get(&o) {
                Some(&c) => c,
                None => {
                    let c = egraph.add(leaf(o));
                    class.insert(o, c);
                    c
                }
            };
            kids.push(c);
        }
        let c = egraph.add(FuseLang::Node(Symbol::from(sym.as_str()), kids));
        class.insert(id, c);
        region.push(id);
    }
    if region.is_empty() {
        return Ok(stats);
    }
    let in_region: HashSet<NodeId> = region.iter().copied().collect();
    let size = egraph.total_number_of_nodes();
    let runner = Runner::default()
        .with_egraph(egraph)
        .with_iter_limit(16)
        .with_node_limit(4 * size + 1_000)
        .run(&rewrites);
    for it in &runner.iterations {
        for (name, n) in &it.applied {
            if *n > 0 {
                stats.fired.insert(name.to_string());
            }
        }
    }
    let egraph = runner.egraph;
    let extractor = Extractor::new(&egraph, AstSize);

    // Roots: region values used outside the region or published as outputs.
    let outputs: HashSet<NodeId> = graph.outputs.iter().map(|(_, id)| *id).collect();
    let roots: Vec<NodeId> = region
        .iter()
        .copied()
        .filter(|&id| {
            outputs.contains(&id) || graph.users(id).iter().any(|u| !in_region.contains(u))
        })
        .collect();
    // Existing region nodes by (symbol, operands), so unchanged trees map back onto them.
    let mut existing: HashMap<(String, Vec<NodeId>), NodeId> = HashMap::new();
    for &id in &region {
        let sym = op_symbol(&graph.node(id).op);
        existing.insert((sym, graph.operands(id)), id);
    }
    let mut replaced = Vec::new();
    for root in roots {
        let (_, best) = extractor.find_best(egraph.find(class[&root]));
        let scope = {
            let n = graph.node(root);
            Scope::new(n.module.clone(), n.block, n.layer)
        };
        let new = materialise(graph, &best, &op_of, &mut existing, &scope)
            .with_context(|| format!("rebuilding `{best}` after the fuse rules"))?;
        if new == root {
            continue;
        }
        if graph.node(new).ty != graph.node(root).ty {
            bail!(
                "fuse rules turned a {} value of `{}` into {} ({best}); a rule is unsound",
                graph.node(root).ty,
                graph.node(root).module,
                graph.node(new).ty
            );
        }
        replace_uses(graph, root, new);
        replaced.push(root);
        stats.rewritten += 1;
    }
    stats.removed = remove_dead(graph, replaced);
    Ok(stats)
}

fn leaf(id: NodeId) -> FuseLang {
    FuseLang::Node(
        Symbol::from(format!("%{}", id.index()).as_str()),
        Vec::new(),
    )
}

/// Adds the nodes of an extracted tree (reusing identical existing ones); returns its root.
fn materialise(
    graph: &mut Graph,
    expr: &RecExpr<FuseLang>,
    op_of: &HashMap<String, Op>,
    existing: &mut HashMap<(String, Vec<NodeId>), NodeId>,
    scope: &Scope,
) -> Result<NodeId> {
    let nodes = expr.as_ref();
    let mut ids: Vec<NodeId> = Vec::with_capacity(nodes.len());
    for node in nodes {
        let FuseLang::Node(sym, _) = node;
        let kids: Vec<NodeId> = node
            .children()
            .iter()
            .map(|c| ids[usize::from(*c)])
            .collect();
        let s = sym.as_str();
        let id = if let Some(index) = s.strip_prefix('%') {
            let i: usize = index.parse().context("leaf symbol")?;
            NodeIndex::new(i)
        } else {
            let key = (s.to_string(), kids.clone());
            match existing.get(&key) {
                Some(&id) => id,
                None => {
                    let op = op_of
                        .get(s)
                        .with_context(|| format!("no op for symbol `{s}`"))?
                        .clone();
                    let id = graph.add(op, &kids, scope)?;
                    existing.insert(key, id);
                    id
                }
            }
        };
        ids.push(id);
    }
    ids.last().copied().context("empty extracted expression")
}

/// Moves every use of `old` (operand edges and graph outputs) to `new`.
pub(crate) fn replace_uses(graph: &mut Graph, old: NodeId, new: NodeId) {
    let uses: Vec<(petgraph::stable_graph::EdgeIndex, NodeId, usize)> = graph
        .g
        .edges_directed(old, Direction::Outgoing)
        .map(|e| (e.id(), e.target(), *e.weight()))
        .collect();
    for (e, user, pos) in uses {
        if user == new {
            // `new` may take `old` as an operand only if the tree kept it: leave that edge.
            continue;
        }
        graph.g.remove_edge(e);
        graph.g.add_edge(new, user, pos);
    }
    for (_, out) in graph.outputs.iter_mut() {
        if *out == old {
            *out = new;
        }
    }
}

/// Removes the replaced nodes and, transitively, the computed operands they leave unused
/// (never inputs or weights, which the runtime binds by name). Returns the count.
pub(crate) fn remove_dead(graph: &mut Graph, start: Vec<NodeId>) -> usize {
    let outputs: HashSet<NodeId> = graph.outputs.iter().map(|(_, id)| *id).collect();
    let mut work = start;
    let mut removed = 0;
    while let Some(id) = work.pop() {
        let Some(n) = graph.g.node_weight(id) else {
            continue;
        };
        if matches!(n.op, Op::Input { .. } | Op::Weight { .. })
            || outputs.contains(&id)
            || graph
                .g
                .edges_directed(id, Direction::Outgoing)
                .next()
                .is_some()
        {
            continue;
        }
        let operands = graph.operands(id);
        graph.g.remove_node(id);
        removed += 1;
        work.extend(operands);
    }
    removed
}
