//! Which parts of a model an adapter or a full fine-tune touches (spec §3.2, §6.1.1, §6.3,
//! check 4). Shared by the `lora` pass, the `full_ft` pass and the PEFT adapter reader, so
//! that training and loading select the same modules by the same rules as PEFT.
use anyhow::{bail, Result};
use qplc_compiler::config::TargetModules;
use qplc_compiler::{BlockKind, Graph, NodeId};
use qplc_ops::Op;
use regex::Regex;
use std::collections::BTreeSet;

/// How module names are matched (PEFT `target_modules` / `exclude_modules`).
#[derive(Clone, Debug, PartialEq)]
pub enum ModuleMatch {
    /// Every linear layer except the output head (PEFT "all-linear"; spec §6.1.1).
    AllLinear,
    /// A module matches when its path equals a name or ends with `.<name>` (PEFT's list rule).
    Names(Vec<String>),
    /// A module matches when the regular expression matches its whole path (PEFT's rule
    /// for a `target_modules` string other than "all-linear").
    Regex(String),
}

impl ModuleMatch {
    /// The config key `target_modules` (LoRA default: all-linear, spec §3.2).
    pub fn from_config(t: Option<&TargetModules>) -> ModuleMatch {
        match t {
            None | Some(TargetModules::AllLinear(_)) => ModuleMatch::AllLinear,
            Some(TargetModules::List(l)) => ModuleMatch::Names(l.clone()),
        }
    }

    /// Whether the module path is named directly (exactly) in a name list; PEFT applies
    /// `layers_to_transform` only to suffix matches, never to exact names.
    fn names_exactly(&self, module: &str) -> bool {
        matches!(self, ModuleMatch::Names(l) if l.iter().any(|n| n == module))
    }

    /// Whether `module` matches (for `AllLinear`, the caller decides what is linear).
    pub fn matches(&self, module: &str) -> Result<bool> {
        Ok(match self {
            ModuleMatch::AllLinear => true,
            ModuleMatch::Names(l) => l.iter().any(|n| {
                module == n
                    || (module.len() > n.len()
                        && module.ends_with(n.as_str())
                        && module.as_bytes()[module.len() - n.len() - 1] == b'.')
            }),
            ModuleMatch::Regex(r) => {
                let re = Regex::new(&format!("^(?:{r})$"))
                    .map_err(|e| anyhow::anyhow!("target pattern `{r}` is not a regex: {e}"))?;
                re.is_match(module)
            }
        })
    }
}

/// The LoRA target rule: which `Op::Linear` nodes get an adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSelection {
    pub modules: ModuleMatch,
    /// `layers_to_transform`; `None` = all layers. When set, only linears inside a selected
    /// decoder layer match (as PEFT, which needs a layer index in the module path).
    pub layers: Option<BTreeSet<usize>>,
    /// PEFT `exclude_modules`; checked first.
    pub exclude: Option<ModuleMatch>,
}

impl LoraSelection {
    pub fn new(modules: ModuleMatch, layers: Option<BTreeSet<usize>>) -> Self {
        LoraSelection {
            modules,
            layers,
            exclude: None,
        }
    }

    /// Whether the linear node `id` of `graph` is a target.
    pub fn selects(&self, graph: &Graph, id: NodeId) -> Result<bool> {
        let node = graph.node(id);
        if !matches!(node.op, Op::Linear) || node.block == BlockKind::Head {
            // The LM head is never a LoRA target (spec §6.1.1, check 4).
            return Ok(false);
        }
        if let Some(ex) = &self.exclude {
            if ex.matches(&node.module)? {
                return Ok(false);
            }
        }
        if !self.modules.matches(&node.module)? {
            return Ok(false);
        }
        if self.modules.names_exactly(&node.module) || matches!(self.modules, ModuleMatch::Regex(_))
        {
            return Ok(true);
        }
        Ok(match (&self.layers, node.layer) {
            (None, _) => true,
            (Some(set), Some(l)) => set.contains(&l),
            (Some(_), None) => false,
        })
    }

    /// The targeted linear nodes, in topological order, with one error when nothing
    /// matches (PEFT refuses that too) listing the model's linear modules.
    pub fn resolve(&self, graph: &Graph) -> Result<Vec<NodeId>> {
        let mut out = Vec::new();
        for id in graph.topo_order()? {
            if self.selects(graph, id)? {
                out.push(id);
            }
        }
        if out.is_empty() {
            let mut names: Vec<String> = graph
                .g
                .node_indices()
                .filter(|&id| matches!(graph.node(id).op, Op::Linear))
                .map(|id| short_name(&graph.node(id).module).to_string())
                .collect();
            names.sort();
            names.dedup();
            bail!(
                "target_modules {:?} (layers {}) matched no linear layer; this model's linear modules are: {}",
                self.modules,
                match &self.layers {
                    None => "all".to_string(),
                    Some(s) => format!("{s:?}"),
                },
                names.join(", ")
            );
        }
        Ok(out)
    }
}

/// The last segment of a module path (`q_proj` of `model.layers.0.self_attn.q_proj`).
pub fn short_name(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

/// The decoder layer index of an HF parameter name `model.layers.<i>.…` (spec §3.2 FFT rule).
pub fn layer_of_param(name: &str) -> Option<usize> {
    let rest = &name[name.find("model.layers.")? + "model.layers.".len()..];
    let (idx, _) = rest.split_once('.')?;
    idx.parse().ok()
}

/// The full fine-tuning rule (spec §3.2, §6.3): a parameter is trained iff its HF name
/// contains one of `substrings` (unset = every parameter) and, for names inside
/// `model.layers.<i>.`, `i` is selected (parameters outside the layers are unaffected).
pub fn full_ft_selects(
    name: &str,
    substrings: Option<&[String]>,
    layers: Option<&BTreeSet<usize>>,
) -> bool {
    if let Some(subs) = substrings {
        if !subs.iter().any(|s| name.contains(s.as_str())) {
            return false;
        }
    }
    match (layers, layer_of_param(name)) {
        (Some(set), Some(i)) => set.contains(&i),
        _ => true,
    }
}

/// PEFT's `rank_pattern` / `alpha_pattern` key rule: `key` matches a module path that is
/// `(.*\.)?key` in full.
pub fn pattern_matches(pattern: &str, module: &str) -> Result<bool> {
    let re = Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$"))
        .map_err(|e| anyhow::anyhow!("pattern `{pattern}` is not a regex: {e}"))?;
    Ok(re.is_match(module))
}
