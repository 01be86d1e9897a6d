use super::*;

const BASE: &str = r#"
model_dir = "model"
output_dir = "out"
lr = 2e-5
sequence_len = 4096
lora_rank = 16

[[datasets]]
dataset_path = "data/*.txt"
"#;

fn load(extra: &str) -> Result<LoadedConfig, ConfigError> {
    // Top-level keys must come before the [[datasets]] table.
    let text = format!("{extra}\n{BASE}");
    LoadedConfig::from_str(Path::new("cfg.toml"), &text)
}

fn err(extra: &str) -> String {
    load(extra).unwrap_err().to_string()
}

#[test]
fn sequence_len_must_be_a_positive_multiple_of_64() {
    let text = BASE.replace("4096", "4000");
    let e = LoadedConfig::from_str(Path::new("cfg.toml"), &text).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("sequence_len"));
    assert_eq!(e.line, Some(5));
    assert!(e
        .to_string()
        .starts_with("cfg.toml:5: `sequence_len`: must be a positive multiple of 64"));
    let text = BASE.replace("4096", "0");
    assert!(LoadedConfig::from_str(Path::new("c"), &text).is_err());
    assert!(load("").is_ok());
}

#[test]
fn eval_fraction_must_be_strictly_inside_zero_one() {
    assert!(err("eval_fraction = 0.0").contains("eval_fraction"));
    assert!(err("eval_fraction = 1.0").contains("strictly between 0 and 1"));
    assert!(load("eval_fraction = 0.01").is_ok());
}

#[test]
fn control_class_outside_minus_one_to_one_is_rejected() {
    let text = format!("{BASE}control_class = 2\n");
    let e = LoadedConfig::from_str(Path::new("c.toml"), &text).unwrap_err();
    assert!(e.to_string().contains("must be -1, 0 or 1, got 2"), "{e}");
}

#[test]
fn target_modules_rules_per_mode() {
    let e = err("use_control_adapters = true\ntarget_modules = [\"q_proj\"]");
    assert!(
        e.contains("must not be set with use_control_adapters"),
        "{e}"
    );
    let e = err("target_modules = []");
    assert!(e.contains("must not be empty"), "{e}");
    assert!(load("target_modules = \"all-linear\"").is_ok());
    assert!(load("target_modules = [\"q_proj\", \"v_proj\"]").is_ok());
    let e = err("full_fine_tune = true\ntarget_modules = [\"\"]");
    assert!(e.contains("non-empty strings"), "{e}");
}

#[test]
fn partition_method_forms() {
    assert!(err("partition_method = \"foo\"").contains("\"type:<regex>\""));
    assert!(err("partition_method = 3").contains("must be a string"));
    for ok in ["uniform", "parameters", "type:decoderlayer"] {
        assert!(
            load(&format!("partition_method = \"{ok}\"")).is_ok(),
            "{ok}"
        );
    }
}

#[test]
fn weight_decay_and_gamma_ranges() {
    assert!(err("lora_weight_decay = -1.0").contains("must be >= 0"));
    let e = err("lora_weight_decay = 1.0\nlora_weight_dtype = \"bfloat16\"");
    assert!(
        e.contains("must be \"float32\" when lora_weight_decay > 0"),
        "{e}"
    );
    assert!(err("use_control_adapters = true\ncontrol_adapter_gamma = 0.0").contains("(0, 0.5]"));
    assert!(err("use_control_adapters = true\ncontrol_adapter_gamma = 0.6").contains("(0, 0.5]"));
    assert!(load("use_control_adapters = true\ncontrol_adapter_gamma = 0.5").is_ok());
}

#[test]
fn lora_rank_required_except_in_full_fine_tune() {
    let text = BASE.replace("lora_rank = 16", "");
    let e = LoadedConfig::from_str(Path::new("c"), &text).unwrap_err();
    assert!(e.to_string().contains("must define 'lora_rank'"), "{e}");
    let text = format!("full_fine_tune = true\n{text}");
    assert!(LoadedConfig::from_str(Path::new("c"), &text).is_ok());
    let text = format!(
        "use_control_adapters = true\n{}",
        BASE.replace("lora_rank = 16", "")
    );
    assert!(LoadedConfig::from_str(Path::new("c"), &text).is_err());
}

#[test]
fn layers_to_transform_accepts_strings_and_integers() {
    let c = load("layers_to_transform = \"0:2, 5, 7:8\"").unwrap();
    assert_eq!(c.layers().unwrap(), [0, 1, 2, 5, 7, 8].into());
    let c = load("layers_to_transform = 7").unwrap();
    assert_eq!(c.layers().unwrap(), [7].into());
    let c = load("layers_to_transform = \"\"").unwrap();
    assert_eq!(c.layers(), None);
    assert!(err("layers_to_transform = \"a:b\"").contains("layers_to_transform"));
}

#[test]
fn mode_precedence_full_fine_tune_wins_and_drops_4bit() {
    let c =
        load("full_fine_tune = true\nuse_control_adapters = true\nload_in_4bit = true").unwrap();
    assert_eq!(c.mode(), Mode::FullFineTune);
    assert!(!c.quantize_4bit());
    let c = load("use_control_adapters = true\nload_in_4bit = true").unwrap();
    assert_eq!(c.mode(), Mode::ControlAdapter);
    assert!(c.quantize_4bit());
    assert_eq!(load("").unwrap().mode(), Mode::Lora);
}

#[test]
fn required_keys_are_named() {
    for key in ["model_dir", "output_dir", "lr", "sequence_len"] {
        let text: String = BASE
            .lines()
            .filter(|l| !l.starts_with(key))
            .collect::<Vec<_>>()
            .join("\n");
        let e = LoadedConfig::from_str(Path::new("c"), &text).unwrap_err();
        assert_eq!(e.key.as_deref(), Some(key), "{e}");
    }
    let text = BASE.split("[[datasets]]").next().unwrap();
    let e = LoadedConfig::from_str(Path::new("c"), text).unwrap_err();
    assert!(e.to_string().contains("[[datasets]]"), "{e}");
}

#[test]
fn unknown_keys_and_wrong_types_are_errors_with_a_line() {
    let e = load("sequence_length = 4096").unwrap_err();
    assert!(e.message.contains("sequence_length"), "{e}");
    assert_eq!(e.line, Some(1));
    let e = load("epochs = \"two\"").unwrap_err();
    assert_eq!(e.line, Some(1), "{e}");
}

#[test]
fn defaults_match_the_reference() {
    let c = load("").unwrap().config;
    assert_eq!(c.epochs, 1);
    assert_eq!((c.beta1, c.beta2, c.eps), (0.9, 0.99, 1e-6));
    assert_eq!(c.gradient_accumulation_steps, 1);
    assert_eq!(c.eval_fraction, 0.01);
    assert_eq!(c.evals_per_epoch, 10);
    assert_eq!(c.checkpoint_interval_hours, 1.0);
    assert_eq!(c.max_checkpoints, 3);
    assert_eq!(c.lora_weight_dtype, "float32");
    assert_eq!(c.control_adapter_gamma, 0.5);
    assert_eq!(c.datasets[0].control_class, 1);
}

#[test]
fn activation_checkpointing_defaults_to_per_layer_and_rejects_other_values() {
    let c = load("").unwrap();
    assert_eq!(c.config.activation_checkpointing, "layer");
    assert!(!c.config.activation_offload);
    for ok in CHECKPOINTING_POLICIES {
        assert!(load(&format!("activation_checkpointing = \"{ok}\"")).is_ok());
    }
    let e = load("activation_checkpointing = \"every\"").unwrap_err();
    assert_eq!(e.key.as_deref(), Some("activation_checkpointing"));
    assert_eq!(e.line, Some(1));
    assert!(
        e.to_string()
            .starts_with("cfg.toml:1: `activation_checkpointing`: must be \"none\", \"layer\""),
        "{e}"
    );
    assert!(load("activation_offload = true").is_ok());
}
