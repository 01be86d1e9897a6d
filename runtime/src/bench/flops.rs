//! FLOPs of one training step, under the two definitions the benchmarks quote.
use serde::Serialize;

/// H100/H200 dense bf16 peak, the denominator of MFU in issue 6 and peft_baseline.py.
pub const PEAK_FLOPS: f64 = 989e12;

/// What a step trains: only adapters (the base gets activation gradients, no weight
/// gradients) or every weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Lora,
    Full,
}

/// Issue 6's definition: 4·N per token for adapters (forward 2N + activation gradients 2N),
/// 6·N for a full fine-tune (plus weight gradients 2N); attention and recompute not counted.
pub fn issue_flops(mode: Mode, n_params: u64, tokens: u64) -> f64 {
    let per_token = match mode {
        Mode::Lora => 4.0,
        Mode::Full => 6.0,
    };
    per_token * n_params as f64 * tokens as f64
}

/// peft_baseline.py's definition: a forward of 2N + causal attention 2·2·L·T·d/2 per token,
/// times 2 (LoRA) or 3 (full), plus one more forward with gradient checkpointing.
pub fn baseline_flops(
    mode: Mode,
    n_params: u64,
    layers: usize,
    hidden: usize,
    seq: usize,
    gc: bool,
) -> f64 {
    let attn_fwd = 2.0 * 2.0 * layers as f64 * seq as f64 * hidden as f64 / 2.0;
    let per_tok_fwd = 2.0 * n_params as f64 + attn_fwd;
    let mult = match mode {
        Mode::Lora => 2.0,
        Mode::Full => 3.0,
    } + if gc { 1.0 } else { 0.0 };
    per_tok_fwd * mult * seq as f64
}

/// Model FLOP utilisation of `flops` done in `seconds` against [`PEAK_FLOPS`].
pub fn mfu(flops: f64, seconds: f64) -> f64 {
    flops / seconds / PEAK_FLOPS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_definition_is_four_or_six_n_per_token() {
        assert_eq!(issue_flops(Mode::Lora, 1000, 10), 40_000.0);
        assert_eq!(issue_flops(Mode::Full, 1000, 10), 60_000.0);
    }

    #[test]
    fn baseline_definition_matches_the_python_script() {
        // peft_baseline.py for llama-1b, lora, seq 4096, gc: N = 1_235_814_400, L = 16, d = 2048.
        let n = 1_235_814_400u64;
        let attn = 2.0 * 2.0 * 16.0 * 4096.0 * 2048.0 / 2.0;
        let expect = (2.0 * n as f64 + attn) * 3.0 * 4096.0;
        assert_eq!(baseline_flops(Mode::Lora, n, 16, 2048, 4096, true), expect);
        let no_gc = baseline_flops(Mode::Lora, n, 16, 2048, 4096, false);
        assert_eq!(no_gc, (2.0 * n as f64 + attn) * 2.0 * 4096.0);
        assert!(baseline_flops(Mode::Full, n, 16, 2048, 4096, false) > no_gc);
    }

    #[test]
    fn mfu_is_against_the_dense_bf16_peak() {
        assert!((mfu(989e12, 1.0) - 1.0).abs() < 1e-12);
        assert!((mfu(989e12, 2.0) - 0.5).abs() < 1e-12);
    }
}
