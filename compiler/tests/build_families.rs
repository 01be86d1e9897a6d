//! Family quirks of the builtin model files: tied embeddings, biases, sliding windows,
//! rope scaling, config defaults.
use qplc_compiler::{build_forward, load_model_def, BlockKind, BuildOptions, BuiltModel};
use qplc_ops::{DType, Op, RopeScaling};
use serde_json::{json, Value};

fn tiny(model_type: &str, extra: Value) -> Value {
    let mut cfg = json!({
        "model_type": model_type,
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
    });
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    cfg
}

fn build(model_type: &str, cfg: &Value) -> BuiltModel {
    let def = load_model_def(Some(model_type), None).unwrap();
    let opts = BuildOptions {
        seq_len: 16,
        dtype: DType::F32,
    };
    let m = build_forward(&def, cfg, &opts).unwrap_or_else(|e| panic!("{e}"));
    m.graph.verify().unwrap();
    m
}

fn attention_windows(m: &BuiltModel) -> Vec<Option<usize>> {
    let mut w: Vec<(usize, Option<usize>)> = m
        .graph
        .g
        .node_weights()
        .filter_map(|n| match n.op {
            Op::Attention { sliding_window, .. } => Some((n.layer.unwrap(), sliding_window)),
            _ => None,
        })
        .collect();
    w.sort();
    w.into_iter().map(|(_, s)| s).collect()
}

fn linear_operands(m: &BuiltModel, module: &str) -> usize {
    let id = m
        .graph
        .g
        .node_indices()
        .find(|&id| matches!(m.graph.node(id).op, Op::Linear) && m.graph.node(id).module == module)
        .unwrap_or_else(|| panic!("no linear {module}"));
    m.graph.operands(id).len()
}

#[test]
fn all_builtin_model_files_parse() {
    for t in qplc_compiler::models::supported_model_types() {
        let def = load_model_def(Some(t), None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(def.name, t);
    }
}

#[test]
fn missing_model_type_means_llama_and_unknown_type_lists_supported_ones() {
    assert_eq!(load_model_def(None, None).unwrap().name, "llama");
    let e = load_model_def(Some("gpt2"), None).unwrap_err().to_string();
    assert!(e.contains("`gpt2`"), "{e}");
    assert!(e.contains("llama, mistral, qwen2"), "{e}");
}

#[test]
fn user_model_file_overrides_the_builtin() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("custom.qplm");
    let text = qplc_compiler::models::BUILTIN[0]
        .2
        .replace("model llama", "model custom");
    std::fs::write(&path, text).unwrap();
    let def = load_model_def(Some("llama"), Some(&path)).unwrap();
    assert_eq!(def.name, "custom");
}

#[test]
fn tied_head_reuses_the_embedding_weight_node() {
    let m = build(
        "llama",
        &tiny("llama", json!({"tie_word_embeddings": true})),
    );
    assert!(m.info.tie_word_embeddings);
    assert!(m.info.weights.iter().all(|w| w.name != "lm_head.weight"));
    let names: Vec<String> = m.graph.weights().into_iter().map(|(n, _)| n).collect();
    assert!(!names.contains(&"lm_head.weight".to_string()));
    let logits = m.graph.output("logits").unwrap();
    let head = m.graph.node(logits);
    assert_eq!(head.module, "lm_head");
    assert_eq!(head.block, BlockKind::Head);
    let w = m.graph.operands(logits)[1];
    assert!(
        matches!(&m.graph.node(w).op, Op::Weight { name, .. } if name == "model.embed_tokens.weight")
    );
    // The same node feeds the embedding lookup.
    assert_eq!(m.graph.users(w).len(), 2);
}

#[test]
fn untied_head_has_its_own_weight() {
    let m = build("llama", &tiny("llama", json!({})));
    assert!(!m.info.tie_word_embeddings);
    assert!(m.info.weights.iter().any(|w| w.name == "lm_head.weight"));
}

#[test]
fn llama_attention_and_mlp_bias_flags_add_bias_operands() {
    let plain = build("llama", &tiny("llama", json!({})));
    assert_eq!(
        linear_operands(&plain, "model.layers.0.self_attn.o_proj"),
        2
    );
    let m = build(
        "llama",
        &tiny("llama", json!({"attention_bias": true, "mlp_bias": true})),
    );
    for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        assert_eq!(
            linear_operands(&m, &format!("model.layers.1.self_attn.{p}")),
            3
        );
    }
    assert_eq!(linear_operands(&m, "model.layers.0.mlp.down_proj"), 3);
    assert_eq!(m.info.weights.len(), 21 + 2 * 7);
}

#[test]
fn qwen2_has_qkv_biases_but_no_o_bias() {
    let m = build(
        "qwen2",
        &tiny("qwen2", json!({"tie_word_embeddings": true})),
    );
    assert_eq!(linear_operands(&m, "model.layers.0.self_attn.q_proj"), 3);
    assert_eq!(linear_operands(&m, "model.layers.0.self_attn.v_proj"), 3);
    assert_eq!(linear_operands(&m, "model.layers.0.self_attn.o_proj"), 2);
    assert_eq!(linear_operands(&m, "model.layers.0.mlp.up_proj"), 2);
    assert!(m.info.tie_word_embeddings);
}

#[test]
fn qwen2_sliding_window_follows_use_sliding_window_and_max_window_layers() {
    let off = build("qwen2", &tiny("qwen2", json!({"sliding_window": 4})));
    assert_eq!(attention_windows(&off), [None, None]);
    let on = build(
        "qwen2",
        &tiny(
            "qwen2",
            json!({"use_sliding_window": true, "sliding_window": 4, "max_window_layers": 1}),
        ),
    );
    assert_eq!(attention_windows(&on), [None, Some(4)]);
    let listed = build(
        "qwen2",
        &tiny(
            "qwen2",
            json!({"use_sliding_window": true, "sliding_window": 4,
                   "layer_types": ["sliding_attention", "full_attention"]}),
        ),
    );
    assert_eq!(attention_windows(&listed), [Some(4), None]);
}

#[test]
fn mistral_sliding_window_defaults_to_4096_and_null_turns_it_off() {
    let m = build("mistral", &tiny("mistral", json!({})));
    assert_eq!(attention_windows(&m), [Some(4096), Some(4096)]);
    let m = build("mistral", &tiny("mistral", json!({"sliding_window": 8})));
    assert_eq!(attention_windows(&m), [Some(8), Some(8)]);
    let m = build("mistral", &tiny("mistral", json!({"sliding_window": null})));
    assert_eq!(attention_windows(&m), [None, None]);
}

fn ropes(m: &BuiltModel) -> Vec<qplc_ops::Rope> {
    m.graph
        .g
        .node_weights()
        .filter_map(|n| match &n.op {
            Op::Rope(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn llama3_rope_scaling_is_read_from_rope_scaling_or_v5_rope_parameters() {
    let scaling = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let want = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    let old = build(
        "llama",
        &tiny(
            "llama",
            json!({"rope_theta": 500000.0, "rope_scaling": scaling}),
        ),
    );
    let mut params = scaling.clone();
    params["rope_theta"] = json!(500000.0);
    let v5 = build("llama", &tiny("llama", json!({"rope_parameters": params})));
    for m in [&old, &v5] {
        let r = ropes(m);
        assert_eq!(r.len(), 4);
        assert!(r
            .iter()
            .all(|r| r.theta == 500000.0 && r.scaling == want && r.rotary_dim == 16));
    }
}

#[test]
fn legacy_rope_type_key_and_linear_scaling() {
    let m = build(
        "llama",
        &tiny(
            "llama",
            json!({"rope_scaling": {"type": "linear", "factor": 2.0}}),
        ),
    );
    assert!(ropes(&m)
        .iter()
        .all(|r| r.scaling == RopeScaling::Linear { factor: 2.0 } && r.theta == 10000.0));
}

#[test]
fn v5_default_rope_parameters_mean_no_scaling() {
    let m = build(
        "qwen2",
        &tiny(
            "qwen2",
            json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
        ),
    );
    assert!(ropes(&m)
        .iter()
        .all(|r| r.scaling == RopeScaling::None && r.theta == 1e6));
}

#[test]
fn explicit_head_dim_and_attention_scale() {
    let m = build("llama", &tiny("llama", json!({"head_dim": 32})));
    let q = m
        .info
        .weights
        .iter()
        .find(|w| w.name == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q.shape.dims(), [128, 64]);
    for n in m.graph.g.node_weights() {
        if let Op::Attention { scale, .. } = n.op {
            assert_eq!(scale, 32f64.powf(-0.5));
        }
    }
    // `head_dim: null` (some HF configs) falls back to hidden_size / heads.
    let m = build("mistral", &tiny("mistral", json!({"head_dim": null})));
    assert_eq!(m.info.config["head_dim"], json!(16));
}

#[test]
fn resolved_config_records_defaults() {
    let m = build("llama", &tiny("llama", json!({})));
    assert_eq!(m.info.config["num_key_value_heads"], json!(2));
    assert_eq!(m.info.config["hidden_act"], json!("silu"));
    assert_eq!(m.info.config["rope_theta"], json!(10000.0));
    assert_eq!(m.info.config["rope_scaling"], Value::Null);
    assert_eq!(m.info.arch, "llama");
}

#[test]
fn llama_3_1_8b_config_has_8_03b_parameters() {
    let cfg = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
        "max_position_embeddings": 131072, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
        "vocab_size": 128256, "attention_bias": false, "mlp_bias": false
    });
    let m = build("llama", &cfg);
    assert_eq!(m.graph.param_count(), 8_030_261_248);
    assert_eq!(m.info.num_layers, 32);
}

#[test]
fn qwen2_5_0_5b_config_has_494m_parameters_and_no_window() {
    let cfg = json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
        "max_position_embeddings": 32768, "max_window_layers": 21,
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": true, "use_sliding_window": false, "vocab_size": 151936
    });
    let m = build("qwen2", &cfg);
    assert_eq!(m.graph.param_count(), 494_032_768);
    assert!(attention_windows(&m).iter().all(Option::is_none));
}
