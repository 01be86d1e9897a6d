//! The named model shapes of `qplc bench`: shared/bench/peft_baseline.py's `CFGS` (Llama 3.2 1B
//! and Llama 3.1 8B layouts, rope_theta 500000) and a tiny Llama that the CPU backend runs in
//! a test. A shape becomes an HF config.json, so the model is built by the same model
//! definition (models/llama.qplm) as a real checkpoint.
use anyhow::{bail, Result};
use serde_json::json;

/// A Llama-architecture layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelShape {
    pub name: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub tied_embeddings: bool,
}

/// Every shape `--shape` accepts.
pub const SHAPES: &[ModelShape] = &[
    ModelShape {
        name: "llama-1b",
        hidden: 2048,
        intermediate: 8192,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        vocab: 128256,
        tied_embeddings: true,
    },
    ModelShape {
        name: "llama-8b",
        hidden: 4096,
        intermediate: 14336,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        vocab: 128256,
        tied_embeddings: false,
    },
    // tests/fixtures/llama-gqa's layout (without its rope scaling): small enough for a CPU test.
    ModelShape {
        name: "tiny",
        hidden: 64,
        intermediate: 128,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vocab: 512,
        tied_embeddings: false,
    },
];

impl ModelShape {
    pub fn by_name(name: &str) -> Result<&'static ModelShape> {
        match SHAPES.iter().find(|s| s.name == name) {
            Some(s) => Ok(s),
            None => bail!(
                "unknown shape `{name}` (expected one of: {})",
                SHAPES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// The HF config.json of this shape, as `LlamaConfig(**CFGS[name],
    /// max_position_embeddings=seq, rope_theta=500000.0)` writes it (LlamaConfig's defaults for
    /// the rest: silu, rms_norm_eps 1e-6, no biases, no rope scaling).
    pub fn config_json(&self, seq: usize) -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim(),
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied_embeddings,
            "max_position_embeddings": seq,
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": "bfloat16",
        })
    }

    /// Parameters of the base model, as `sum(p.numel() for p in model.parameters())` counts
    /// them (a tied head is the embedding, counted once).
    pub fn param_count(&self) -> u64 {
        let (h, i, v) = (
            self.hidden as u64,
            self.intermediate as u64,
            self.vocab as u64,
        );
        let kv = (self.kv_heads * self.head_dim()) as u64;
        let q = (self.heads * self.head_dim()) as u64;
        let attn = h * q + 2 * h * kv + q * h;
        let mlp = 3 * h * i;
        let norms = 2 * h;
        let layer = attn + mlp + norms;
        let embed = v * h;
        let head = if self.tied_embeddings { 0 } else { v * h };
        embed + self.layers as u64 * layer + h + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_shapes_have_the_published_parameter_counts() {
        // Llama 3.2 1B and Llama 3.1 8B as HF counts them.
        assert_eq!(
            ModelShape::by_name("llama-1b").unwrap().param_count(),
            1_235_814_400
        );
        assert_eq!(
            ModelShape::by_name("llama-8b").unwrap().param_count(),
            8_030_261_248
        );
    }

    #[test]
    fn unknown_shape_names_the_known_ones() {
        let e = ModelShape::by_name("llama-70b").unwrap_err().to_string();
        assert!(
            e.contains("llama-70b") && e.contains("llama-1b, llama-8b, tiny"),
            "{e}"
        );
    }

    #[test]
    fn config_json_carries_the_baseline_settings() {
        let c = ModelShape::by_name("llama-8b").unwrap().config_json(4096);
        assert_eq!(c["rope_theta"], 500000.0);
        assert_eq!(c["head_dim"], 128);
        assert_eq!(c["max_position_embeddings"], 4096);
        assert_eq!(c["tie_word_embeddings"], false);
    }
}
