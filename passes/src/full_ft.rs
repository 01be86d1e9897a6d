//! The `full_ft` pass (spec §6.3): marks the selected base weights trainable — every
//! weight by default, filtered by `target_modules` (substring of the HF name) and
//! `layers_to_transform` (names inside `model.layers.<i>.` with `i` unselected are frozen;
//! other names are unaffected). Tied embeddings are one weight node, so they are trained
//! once whichever of their uses the name rule is read for (spec §5.4).
use crate::pass::{Pass, PassContext};
use crate::targets::full_ft_selects;
use anyhow::{bail, Result};
use qplc_compiler::config::{LoadedConfig, Mode, TargetModules};
use qplc_compiler::Graph;
use std::collections::BTreeSet;

#[derive(Clone, Debug, Default)]
pub struct FullFtPass {
    /// `target_modules` as name substrings; `None` = every parameter.
    pub substrings: Option<Vec<String>>,
    /// `layers_to_transform`; `None` = all layers.
    pub layers: Option<BTreeSet<usize>>,
}

impl FullFtPass {
    pub fn from_config(cfg: &LoadedConfig) -> Result<FullFtPass> {
        if cfg.mode() != Mode::FullFineTune {
            bail!(
                "the full_ft pass needs full_fine_tune = true, the config is in {:?} mode",
                cfg.mode()
            );
        }
        let substrings = match &cfg.config.target_modules {
            None => None,
            Some(TargetModules::List(l)) => Some(l.clone()),
            // Refused by config validation (spec §3.2); kept total here.
            Some(TargetModules::AllLinear(_)) => bail!(
                "target_modules = \"all-linear\" is not a list of name substrings (full fine-tuning)"
            ),
        };
        Ok(FullFtPass {
            substrings,
            layers: cfg.layers(),
        })
    }

    /// Marks the selected weights trainable; returns their names, sorted.
    pub fn apply(&self, graph: &mut Graph) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for (name, id) in graph.weights() {
            let on = full_ft_selects(&name, self.substrings.as_deref(), self.layers.as_ref());
            graph.node_mut(id).trainable = on;
            if on {
                names.push(name);
            }
        }
        if names.is_empty() {
            bail!(
                "full fine-tuning selects no parameter (target_modules {:?}, layers {:?})",
                self.substrings,
                self.layers
            );
        }
        names.sort();
        Ok(names)
    }
}

impl Pass for FullFtPass {
    fn name(&self) -> &str {
        "full_ft"
    }
    fn run(&self, mut graph: Graph, cx: &mut PassContext) -> Result<Graph> {
        let names = self.apply(&mut graph)?;
        cx.notes.push(format!(
            "full_ft: {} trainable tensors, {} trainable parameters",
            names.len(),
            graph.trainable_param_count()
        ));
        Ok(graph)
    }
}
