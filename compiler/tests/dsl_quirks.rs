//! Family quirks are expressible in a model file alone (DESIGN.md "Model DSL"): here a
//! Gemma-2-like model with embedding scale, norm offset +1, alternating sliding windows,
//! attention and final-logit soft-capping, and sandwich norms.
use qplc_compiler::{build_forward, BuildOptions, ModelDef};
use qplc_ops::{DType, Op};
use serde_json::json;

const GEMMA2_LIKE: &str = r#"
model gemma2_like
config {
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int = num_attention_heads
  head_dim: int = hidden_size // num_attention_heads
  query_pre_attn_scalar: float = head_dim
  sliding_window: int? = 4096
  attn_logit_softcapping: float? = 50.0
  final_logit_softcapping: float? = 30.0
  rms_norm_eps: float = 1e-6
}
weights {
  model.embed_tokens.weight: [vocab_size, hidden_size]
  model.layers.{i}.input_layernorm.weight: [hidden_size]
  model.layers.{i}.post_attention_layernorm.weight: [hidden_size]
  model.layers.{i}.self_attn.q_proj.weight: [num_attention_heads * head_dim, hidden_size]
  model.layers.{i}.self_attn.k_proj.weight: [num_key_value_heads * head_dim, hidden_size]
  model.layers.{i}.self_attn.v_proj.weight: [num_key_value_heads * head_dim, hidden_size]
  model.layers.{i}.self_attn.o_proj.weight: [hidden_size, num_attention_heads * head_dim]
  model.norm.weight: [hidden_size]
  lm_head.weight = model.embed_tokens.weight
}
inputs {
  input_ids: i32[seq_len]
  position_ids: i32[seq_len]
}
block embedding {
  x = embedding(input_ids, model.embed_tokens) * hidden_size ** 0.5
}
block decoder model.layers.{i} repeat num_hidden_layers {
  h = rms_norm(x, input_layernorm, eps=rms_norm_eps, offset=1.0)
  module self_attn {
    q = reshape(linear(h, q_proj), [seq_len, num_attention_heads, head_dim])
    k = reshape(linear(h, k_proj), [seq_len, num_key_value_heads, head_dim])
    v = reshape(linear(h, v_proj), [seq_len, num_key_value_heads, head_dim])
    q = rope(q, position_ids, theta=10000.0)
    k = rope(k, position_ids, theta=10000.0)
    a = attention(q, k, v, scale=query_pre_attn_scalar ** -0.5,
                  window=sliding_window if i % 2 == 0 else null,
                  softcap=attn_logit_softcapping)
    a = linear(reshape(a, [seq_len, num_attention_heads * head_dim]), o_proj)
  }
  x = x + rms_norm(a, post_attention_layernorm, eps=rms_norm_eps, offset=1.0)
}
block norm {
  hidden = rms_norm(x, model.norm, eps=rms_norm_eps, offset=1.0)
}
block head {
  logits = linear(hidden, lm_head)
  if final_logit_softcapping != null {
    logits = softcap(logits, final_logit_softcapping)
  }
}
outputs { logits, hidden }
"#;

#[test]
fn gemma2_like_quirks_build_from_the_file_alone() {
    let def = ModelDef::parse("gemma2_like.qplm", GEMMA2_LIKE).unwrap_or_else(|e| panic!("{e}"));
    let cfg = json!({"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "sliding_window": 3});
    let opts = BuildOptions {
        seq_len: 8,
        dtype: DType::BF16,
    };
    let m = build_forward(&def, &cfg, &opts).unwrap_or_else(|e| panic!("{e}"));
    m.graph.verify().unwrap();
    let ops: Vec<&Op> = m.graph.g.node_weights().map(|n| &n.op).collect();
    assert!(ops.contains(&&Op::Scale {
        factor: 32f64.powf(0.5)
    }));
    assert!(ops.contains(&&Op::Softcap { cap: 30.0 }));
    assert!(ops
        .iter()
        .any(|o| matches!(o, Op::RmsNorm { offset, .. } if *offset == 1.0)));
    let windows: Vec<(Option<usize>, Option<f64>)> = ops
        .iter()
        .filter_map(|o| match o {
            Op::Attention {
                sliding_window,
                softcap,
                ..
            } => Some((*sliding_window, *softcap)),
            _ => None,
        })
        .collect();
    assert_eq!(windows, [(Some(3), Some(50.0)), (None, Some(50.0))]);
    assert!(m.info.tie_word_embeddings);
    assert_eq!(
        m.graph.node(m.graph.output("logits").unwrap()).ty.dtype,
        DType::BF16
    );

    // Without final soft-capping the head is just the tied linear.
    let cfg = json!({"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "final_logit_softcapping": null});
    let m = build_forward(&def, &cfg, &opts).unwrap();
    let logits = m.graph.node(m.graph.output("logits").unwrap());
    assert!(matches!(logits.op, Op::Linear));
}
