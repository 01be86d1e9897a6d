//! Building forward graphs from the builtin model files (notes/CONTRACT.md conventions).
use qplc_compiler::{build_forward, load_model_def, BlockKind, BuildOptions, BuiltModel};
use qplc_ops::{DType, Op};
use serde_json::{json, Value};

fn tiny_llama() -> Value {
    json!({
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false
    })
}

fn build(model_type: &str, cfg: &Value) -> BuiltModel {
    let def = load_model_def(Some(model_type), None).unwrap();
    let opts = BuildOptions {
        seq_len: 16,
        dtype: DType::F32,
    };
    build_forward(&def, cfg, &opts).unwrap_or_else(|e| panic!("{e}"))
}

fn count(m: &BuiltModel, block: BlockKind, layer: Option<usize>) -> usize {
    m.graph
        .g
        .node_weights()
        .filter(|n| n.block == block && (layer.is_none() || n.layer == layer))
        .count()
}

#[test]
fn tiny_llama_graph_verifies_and_has_contract_inputs_outputs() {
    let m = build("llama", &tiny_llama());
    m.graph.verify().unwrap();
    let inputs: Vec<String> = m.graph.inputs().into_iter().map(|(n, _)| n).collect();
    assert_eq!(inputs, ["input_ids", "position_ids"]);
    let logits = m.graph.output("logits").unwrap();
    assert_eq!(m.graph.node(logits).ty.shape.dims(), [16, 128]);
    let hidden = m.graph.output("hidden").unwrap();
    assert_eq!(m.graph.node(hidden).ty.shape.dims(), [16, 64]);
    assert_eq!(m.graph.node(hidden).module, "model.norm");
    assert_eq!(m.info.num_layers, 2);
    assert_eq!(m.info.hidden_size, 64);
    assert_eq!(m.info.vocab_size, 128);
    assert!(!m.info.tie_word_embeddings);
}

#[test]
fn tiny_llama_nodes_per_block() {
    let m = build("llama", &tiny_llama());
    assert_eq!(count(&m, BlockKind::Inputs, None), 2);
    // embedding op + its table
    assert_eq!(count(&m, BlockKind::Embedding, None), 2);
    // Per layer: 2 norms (+2 weights), 7 linears (+7 weights), 3 reshapes in, 1 out,
    // 2 ropes, 1 attention, 1 act, 1 mul, 2 residual adds.
    for layer in 0..2 {
        assert_eq!(
            count(&m, BlockKind::Decoder, Some(layer)),
            29,
            "layer {layer}"
        );
    }
    assert_eq!(count(&m, BlockKind::Norm, None), 2);
    assert_eq!(count(&m, BlockKind::Head, None), 2);
}

#[test]
fn tiny_llama_modules_and_weights_follow_hf_names() {
    let m = build("llama", &tiny_llama());
    let linears: Vec<(String, Option<usize>)> = m
        .graph
        .g
        .node_weights()
        .filter(|n| matches!(n.op, Op::Linear))
        .map(|n| (n.module.clone(), n.layer))
        .collect();
    assert!(linears.contains(&("model.layers.1.self_attn.q_proj".into(), Some(1))));
    assert!(linears.contains(&("model.layers.0.mlp.down_proj".into(), Some(0))));
    assert!(linears.contains(&("lm_head".into(), None)));
    assert_eq!(
        m.info.linear_modules,
        [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "lm_head"
        ]
    );
    // Weight nodes carry their module and the compute dtype.
    for (name, id) in m.graph.weights() {
        let n = m.graph.node(id);
        assert_eq!(n.ty.dtype, DType::F32);
        assert_eq!(format!("{}.weight", n.module), name, "{name}");
    }
    let shape = |name: &str| {
        m.info
            .weights
            .iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .shape
            .dims()
            .to_vec()
    };
    assert_eq!(shape("model.embed_tokens.weight"), [128, 64]);
    assert_eq!(shape("model.layers.0.self_attn.q_proj.weight"), [64, 64]);
    assert_eq!(shape("model.layers.1.self_attn.k_proj.weight"), [32, 64]);
    assert_eq!(shape("model.layers.1.self_attn.o_proj.weight"), [64, 64]);
    assert_eq!(shape("model.layers.0.mlp.down_proj.weight"), [64, 96]);
    assert_eq!(shape("lm_head.weight"), [128, 64]);
    // 1 embed + 2 x 9 + norm + head
    assert_eq!(m.info.weights.len(), 21);
    assert_eq!(m.graph.weights().len(), 21);
}
