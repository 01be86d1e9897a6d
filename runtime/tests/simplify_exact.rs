//! The `simplify` pass changes no bit of any result: the tiny Llama fixture with LoRA on every
//! linear (α = r, so each branch has a `Scale{1.0}`), with and without dropout, in bf16 and f32, gives
//! the same loss and the same gradient bits on the CPU with and without the pass — and the
//! pass does remove the per-projection f32 casts of shared inputs, and in bf16 no adapter
//! product reads an f32 cast any more.
mod lora_step_common;

use lora_step_common::{assert_same_bits, lora_graph, run, weights};
use qplc_compiler::Graph;
use qplc_ops::{DType, Op};
use qplc_passes::simplify;

fn casts_to_f32(g: &Graph) -> usize {
    g.g.node_indices()
        .filter(|id| g.node(*id).op == Op::Cast { to: DType::F32 })
        .count()
}

fn products_reading_casts(g: &Graph) -> usize {
    g.g.node_indices()
        .filter(|id| matches!(g.node(*id).op, Op::Linear | Op::MatMul { .. }))
        .filter(|id| {
            g.operands(*id)
                .iter()
                .any(|o| g.node(*o).op == Op::Cast { to: DType::F32 })
        })
        .count()
}

#[test]
fn simplify_keeps_every_output_bit_and_drops_the_duplicate_casts() {
    // With dropout each branch drops its own copy of the input, so only the casts of the
    // dropout-free graph are duplicates.
    for (dtype, p) in [(DType::BF16, 0.0), (DType::BF16, 0.25), (DType::F32, 0.25)] {
        let plain = lora_graph(dtype, p, 4.0);
        let mut simple = plain.clone();
        let stats = simplify(&mut simple).unwrap();
        simple.verify().unwrap();
        assert!(stats.identities > 0, "{stats:?}");
        if p == 0.0 {
            assert!(stats.duplicates > 0, "{stats:?}");
            // q/k/v share one cast of the normed input, gate/up another: 7 → 4 per layer
            // in the forward pass alone.
            assert!(
                casts_to_f32(&simple) < casts_to_f32(&plain),
                "{} vs {}",
                casts_to_f32(&simple),
                casts_to_f32(&plain)
            );
        }
        if dtype == DType::BF16 && p == 0.0 {
            // Every adapter product reads the bf16 input / output gradient itself.
            let reading_casts = products_reading_casts(&simple);
            assert_eq!(reading_casts, 0, "products still reading an f32 cast");
            assert!(products_reading_casts(&plain) > 0);
        }
        let w = weights(&plain);
        let (a, b) = (run(&plain, &w), run(&simple, &w));
        assert_same_bits(&a, &b, &format!("{dtype}"));
        eprintln!(
            "{dtype}: {stats:?}; peak activations {} B → {} B",
            a.stats.peak_activation_bytes, b.stats.peak_activation_bytes
        );
        assert!(b.stats.peak_activation_bytes <= a.stats.peak_activation_bytes);
    }
}
