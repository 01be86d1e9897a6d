//! The builtin model files, embedded so that the binary works from any directory, and the
//! choice among them by config.json's `model_type` (or a user file, TOML `model_definition`).
use crate::dsl::{DslLoadError, ModelDef};
use std::path::Path;

/// `(model_type, file name, text)` of every builtin family.
pub const BUILTIN: &[(&str, &str, &str)] = &[
    (
        "llama",
        "models/llama.qplm",
        include_str!("../../models/llama.qplm"),
    ),
    (
        "mistral",
        "models/mistral.qplm",
        include_str!("../../models/mistral.qplm"),
    ),
    (
        "qwen2",
        "models/qwen2.qplm",
        include_str!("../../models/qwen2.qplm"),
    ),
];

/// The `model_type` values with a builtin model file.
pub fn supported_model_types() -> Vec<&'static str> {
    BUILTIN.iter().map(|(t, _, _)| *t).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ModelLoadError {
    #[error("model_type `{model_type}` has no builtin model definition (supported: {}); write a .qplm file for it and set `model_definition` in the config", supported.join(", "))]
    Unsupported {
        model_type: String,
        supported: Vec<&'static str>,
    },
    #[error(transparent)]
    Dsl(#[from] DslLoadError),
}

/// The model definition for a checkpoint: the file at `override_path` if given, else the
/// builtin one for `model_type` (config.json's key; absent means `llama`, as HF assumes
/// for the oldest Llama checkpoints).
pub fn load_model_def(
    model_type: Option<&str>,
    override_path: Option<&Path>,
) -> Result<ModelDef, ModelLoadError> {
    if let Some(p) = override_path {
        return Ok(ModelDef::from_file(p)?);
    }
    let model_type = model_type.unwrap_or("llama");
    let (_, file, text) = BUILTIN
        .iter()
        .find(|(t, _, _)| *t == model_type)
        .ok_or_else(|| ModelLoadError::Unsupported {
            model_type: model_type.to_string(),
            supported: supported_model_types(),
        })?;
    ModelDef::parse(file, text).map_err(|d| ModelLoadError::Dsl(DslLoadError::Parse(d)))
}
