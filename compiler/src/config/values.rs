//! Config values that TOML can spell several ways (spec §3.2, §3.6).
use super::parse_layer_selector;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// `target_modules`: a list of module names, or the string "all-linear".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    AllLinear(AllLinear),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AllLinear {
    #[serde(rename = "all-linear")]
    AllLinear,
}

/// `layers_to_transform`: a selector string or a single layer index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerSelector {
    Index(i64),
    Text(String),
}

impl LayerSelector {
    /// The selected layers, `None` meaning all.
    pub fn layers(&self) -> Result<Option<BTreeSet<usize>>, String> {
        match self {
            LayerSelector::Index(i) if *i >= 0 => Ok(Some([*i as usize].into())),
            LayerSelector::Index(i) => Err(format!("layer index must be >= 0, got {i}")),
            LayerSelector::Text(s) => parse_layer_selector(s),
        }
    }
}

/// `sequence_prefix` / `document_prefix` / `document_suffix`: a string (tokenised), one
/// token id, or a list of ids.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenSpec {
    Id(i64),
    Ids(Vec<i64>),
    Text(String),
}

/// `mask_tokens`: true = all special tokens, an id, or a list of ids. `false` and — the
/// reference's quirk, spec §14.9 — the integer 0 mean no masking.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MaskTokens {
    All(bool),
    Id(i64),
    Ids(Vec<i64>),
}
