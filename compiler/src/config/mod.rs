//! The training configuration (TOML), with the keys, defaults and validation of spec §3.
//! Validation errors name the file, the key and (when the key is written in the file) its line.
mod layers;
mod values;

pub use layers::parse_layer_selector;
pub use values::{LayerSelector, MaskTokens, TargetModules, TokenSpec};

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

/// The values of `activation_checkpointing`.
pub const CHECKPOINTING_POLICIES: [&str; 3] = ["none", "layer", "auto"];

/// Training mode, by the precedence of spec §1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    FullFineTune,
    ControlAdapter,
    Lora,
}

/// One `[[datasets]]` entry (spec §3.7).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    pub dataset_path: String,
    #[serde(default = "one")]
    pub control_class: i64,
    pub max_tokens: Option<u64>,
}

fn one() -> i64 {
    1
}

/// Every key of spec §3 (TOML has no `None`: an omitted key is `None` here).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model_dir: Option<String>,
    pub output_dir: Option<String>,
    /// qplc extension: a `.qplm` file to use instead of the builtin one for `model_type`.
    pub model_definition: Option<String>,
    #[serde(default)]
    pub full_fine_tune: bool,
    #[serde(default)]
    pub use_control_adapters: bool,
    #[serde(default)]
    pub load_in_4bit: bool,

    pub lora_rank: Option<i64>,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default = "default_adapter_dtype")]
    pub lora_weight_dtype: String,
    #[serde(default)]
    pub lora_weight_decay: f64,
    #[serde(default = "default_gamma")]
    pub control_adapter_gamma: f64,
    pub target_modules: Option<TargetModules>,
    pub layers_to_transform: Option<LayerSelector>,

    pub lr: Option<f64>,
    #[serde(default = "default_epochs")]
    pub epochs: i64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default = "default_gas")]
    pub gradient_accumulation_steps: i64,
    pub eval_gradient_accumulation_steps: Option<i64>,

    #[serde(default = "default_stages")]
    pub pipeline_stages: i64,
    #[serde(default = "default_partition")]
    pub partition_method: toml::Value,
    #[serde(default)]
    pub use_column_major_topology: bool,
    /// qplc extension (spec §5.5 has no key: the reference always checkpoints each decoder
    /// layer): `"layer"` keeps only each decoder layer's input for the backward and
    /// recomputes the rest, `"auto"` also keeps the outputs of expensive ops (products,
    /// attention), `"none"` keeps everything the backward reads.
    #[serde(default = "default_checkpointing")]
    pub activation_checkpointing: String,
    /// qplc extension: plan the kept layer inputs in pinned host memory (spec §5.5's
    /// "offloaded" scheme); the reference always offloads, qplc keeps them on the device
    /// unless asked.
    #[serde(default)]
    pub activation_offload: bool,
    /// qplc extension: run chains of elementwise ops as one kernel each (the
    /// `fuse_elementwise` pass; results are bit for bit the same). `false` is for
    /// measuring what fusion buys.
    #[serde(default = "default_true")]
    pub fuse_elementwise: bool,

    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    #[serde(default = "default_evals_per_epoch")]
    pub evals_per_epoch: i64,
    #[serde(default = "default_ckpt_hours")]
    pub checkpoint_interval_hours: f64,
    #[serde(default = "default_max_ckpts")]
    pub max_checkpoints: i64,

    pub sequence_len: Option<i64>,
    pub max_sequences: Option<i64>,
    #[serde(default)]
    pub drop_tails: bool,
    #[serde(default)]
    pub mix_datasets: bool,
    pub sequence_prefix: Option<TokenSpec>,
    pub document_prefix: Option<TokenSpec>,
    pub document_suffix: Option<TokenSpec>,
    pub mask_tokens: Option<MaskTokens>,

    #[serde(default)]
    pub datasets: Vec<DatasetConfig>,
}

fn default_adapter_dtype() -> String {
    "float32".into()
}
fn default_gamma() -> f64 {
    0.5
}
fn default_epochs() -> i64 {
    1
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.99
}
fn default_eps() -> f64 {
    1e-6
}
fn default_gas() -> i64 {
    1
}
fn default_stages() -> i64 {
    1
}
fn default_partition() -> toml::Value {
    toml::Value::String("uniform".into())
}
fn default_true() -> bool {
    true
}

fn default_checkpointing() -> String {
    "layer".into()
}
fn default_eval_fraction() -> f64 {
    0.01
}
fn default_evals_per_epoch() -> i64 {
    10
}
fn default_ckpt_hours() -> f64 {
    1.0
}
fn default_max_ckpts() -> i64 {
    3
}

/// A configuration problem, located in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: Option<String>,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        match &self.key {
            Some(k) => write!(f, ": `{k}`: {}", self.message),
            None => write!(f, ": {}", self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A parsed and validated configuration, with the source it came from.
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    pub path: PathBuf,
    pub text: String,
    pub config: TrainConfig,
}

impl LoadedConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            key: None,
            line: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        Self::from_str(path, &text)
    }

    pub fn from_str(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: TrainConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            key: None,
            line: e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1)),
            message: e.message().trim().to_string(),
        })?;
        let loaded = LoadedConfig {
            path: path.to_path_buf(),
            text: text.to_string(),
            config,
        };
        loaded.validate()?;
        Ok(loaded)
    }

    /// An error for `key`, with the line where the key is written (if it is).
    pub fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.path.clone(),
            key: Some(key.to_string()),
            line: locate_key(&self.text, key),
            message: message.into(),
        }
    }

    /// `model_dir`, resolved against the config file's folder when relative.
    pub fn model_dir(&self) -> Result<PathBuf, ConfigError> {
        self.required_path(self.config.model_dir.as_deref(), "model_dir")
    }

    pub fn output_dir(&self) -> Result<PathBuf, ConfigError> {
        self.required_path(self.config.output_dir.as_deref(), "output_dir")
    }

    pub fn model_definition(&self) -> Option<PathBuf> {
        self.config
            .model_definition
            .as_deref()
            .map(|p| self.resolve(p))
    }

    /// Paths in a config are relative to the config file's folder, so a config and its
    /// data can move together.
    pub fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }

    fn required_path(&self, v: Option<&str>, key: &str) -> Result<PathBuf, ConfigError> {
        v.map(|p| self.resolve(p))
            .ok_or_else(|| self.error(key, "is required"))
    }

    pub fn sequence_len(&self) -> usize {
        self.config.sequence_len.expect("validated") as usize
    }

    pub fn mode(&self) -> Mode {
        let c = &self.config;
        if c.full_fine_tune {
            Mode::FullFineTune
        } else if c.use_control_adapters {
            Mode::ControlAdapter
        } else {
            Mode::Lora
        }
    }

    /// 4-bit loading is ignored in full fine-tuning (spec §1, check 9).
    pub fn quantize_4bit(&self) -> bool {
        self.config.load_in_4bit && self.mode() != Mode::FullFineTune
    }

    pub fn partition_method(&self) -> String {
        self.config
            .partition_method
            .as_str()
            .expect("validated")
            .to_string()
    }

    /// Selected layers; `None` means all.
    pub fn layers(&self) -> Option<BTreeSet<usize>> {
        match &self.config.layers_to_transform {
            None => None,
            Some(sel) => sel.layers().expect("validated"),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.config;
        for key in ["model_dir", "output_dir"] {
            let v = if key == "model_dir" {
                &c.model_dir
            } else {
                &c.output_dir
            };
            if v.as_deref().is_none_or(|s| s.trim().is_empty()) {
                return Err(self.error(key, "is required (a folder path)"));
            }
        }
        match c.sequence_len {
            None => return Err(self.error("sequence_len", "is required")),
            Some(t) if t <= 0 || t % 64 != 0 => {
                return Err(self.error(
                    "sequence_len",
                    format!("must be a positive multiple of 64, got {t}"),
                ))
            }
            _ => {}
        }
        if c.lr.is_none() {
            return Err(self.error("lr", "is required (the base learning rate)"));
        }
        if c.datasets.is_empty() {
            return Err(self.error(
                "datasets",
                "at least one [[datasets]] entry with a `dataset_path` is required",
            ));
        }
        for d in &c.datasets {
            if ![-1, 0, 1].contains(&d.control_class) {
                return Err(self.error(
                    "control_class",
                    format!(
                        "must be -1, 0 or 1, got {} (dataset `{}`)",
                        d.control_class, d.dataset_path
                    ),
                ));
            }
        }
        if !(c.eval_fraction > 0.0 && c.eval_fraction < 1.0) {
            return Err(self.error(
                "eval_fraction",
                format!("must be strictly between 0 and 1, got {}", c.eval_fraction),
            ));
        }
        let positive = [
            ("epochs", c.epochs),
            ("gradient_accumulation_steps", c.gradient_accumulation_steps),
            ("pipeline_stages", c.pipeline_stages),
        ];
        for (k, v) in positive {
            if v < 1 {
                return Err(self.error(k, format!("must be at least 1, got {v}")));
            }
        }
        if let Some(v) = c.eval_gradient_accumulation_steps {
            if v < 1 {
                return Err(self.error(
                    "eval_gradient_accumulation_steps",
                    format!("must be at least 1, got {v}"),
                ));
            }
        }
        match &c.partition_method {
            toml::Value::String(s) => {
                let l = s.to_lowercase();
                if !(l == "uniform" || l == "parameters" || l.starts_with("type:")) {
                    return Err(self.error(
                        "partition_method",
                        format!(
                            "must be \"uniform\", \"parameters\" or \"type:<regex>\", got \"{s}\""
                        ),
                    ));
                }
            }
            other => {
                return Err(self.error(
                    "partition_method",
                    format!("must be a string, got {}", other.type_str()),
                ))
            }
        }
        if !CHECKPOINTING_POLICIES.contains(&c.activation_checkpointing.as_str()) {
            return Err(self.error(
                "activation_checkpointing",
                format!(
                    "must be \"none\", \"layer\" or \"auto\", got \"{}\"",
                    c.activation_checkpointing
                ),
            ));
        }
        if let Some(sel) = &c.layers_to_transform {
            sel.layers()
                .map_err(|e| self.error("layers_to_transform", e))?;
        }
        if c.lora_weight_decay < 0.0 {
            return Err(self.error(
                "lora_weight_decay",
                format!("must be >= 0, got {}", c.lora_weight_decay),
            ));
        }
        let dtype = c.lora_weight_dtype.as_str();
        if !["float32", "float16", "bfloat16"].contains(&dtype) {
            return Err(self.error(
                "lora_weight_dtype",
                format!("must be \"float32\", \"float16\" or \"bfloat16\", got \"{dtype}\""),
            ));
        }
        if !(0.0..1.0).contains(&c.lora_dropout) {
            return Err(self.error(
                "lora_dropout",
                format!("must be in [0, 1), got {}", c.lora_dropout),
            ));
        }
        match self.mode() {
            Mode::FullFineTune => {
                if let Some(TargetModules::AllLinear(_)) = &c.target_modules {
                    return Err(self.error(
                        "target_modules",
                        "must be a list of name substrings in full fine-tuning",
                    ));
                }
                if let Some(TargetModules::List(l)) = &c.target_modules {
                    if l.iter().any(|s| s.is_empty()) {
                        return Err(self.error(
                            "target_modules",
                            "entries must be non-empty strings in full fine-tuning",
                        ));
                    }
                }
            }
            Mode::ControlAdapter | Mode::Lora => {
                let rank = c.lora_rank.ok_or_else(|| {
                    self.error(
                        "lora_rank",
                        "must define 'lora_rank' for LoRA and Control Adapters",
                    )
                })?;
                if rank < 1 {
                    return Err(self.error("lora_rank", format!("must be at least 1, got {rank}")));
                }
                if c.lora_weight_decay > 0.0 && dtype != "float32" {
                    return Err(self.error(
                        "lora_weight_dtype",
                        format!(
                            "must be \"float32\" when lora_weight_decay > 0 (decay in {dtype} cancels out), got \"{dtype}\""
                        ),
                    ));
                }
                if self.mode() == Mode::ControlAdapter {
                    let non_empty = match &c.target_modules {
                        None => false,
                        Some(TargetModules::List(l)) => !l.is_empty(),
                        Some(TargetModules::AllLinear(_)) => true,
                    };
                    if non_empty {
                        return Err(self.error(
                            "target_modules",
                            "must not be set with use_control_adapters (a Control Adapter acts on the whole decoder layer)",
                        ));
                    }
                    if !(c.control_adapter_gamma > 0.0 && c.control_adapter_gamma <= 0.5) {
                        return Err(self.error(
                            "control_adapter_gamma",
                            format!("must be in (0, 0.5], got {}", c.control_adapter_gamma),
                        ));
                    }
                } else if let Some(TargetModules::List(l)) = &c.target_modules {
                    if l.is_empty() {
                        return Err(self.error(
                            "target_modules",
                            "must not be empty (omit it, or use \"all-linear\", to target every linear layer)",
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The 1-based line on which `key = …` is written, ignoring comments.
fn locate_key(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .map(|rest| rest.trim_start().starts_with('='))
                .unwrap_or(false)
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests;
