//! The `fuse_elementwise` pass changes no bit of any result: a whole LoRA training step on the
//! tiny Llama fixture (bf16 and f32, with and without dropout) gives the same loss and the
//! same gradient bits on the CPU with and without the pass, while the fused graph has far
//! fewer nodes and a lower activation peak, and the adapters' small-k products are steps of
//! the chains that consume them.
mod lora_step_common;

use lora_step_common::{assert_same_bits, lora_graph, run, weights};
use qplc_ops::{DType, Op};
use qplc_passes::{fuse_elementwise, recompute, simplify, CheckpointPolicy};

#[test]
fn fusing_elementwise_chains_keeps_every_output_bit() {
    // alpha 8 with rank 4 keeps a Scale(2) in each branch (alpha = r would be simplified away).
    for (dtype, p, alpha) in [
        (DType::BF16, 0.0, 4.0),
        (DType::BF16, 0.25, 8.0),
        (DType::F32, 0.0, 8.0),
        (DType::F16, 0.1, 8.0),
    ] {
        let mut plain = lora_graph(dtype, p, alpha);
        simplify(&mut plain).unwrap();
        // The trainer's order: checkpointing first (bf16 rows), then fusion of the copies too.
        if dtype == DType::BF16 {
            recompute(&mut plain, CheckpointPolicy::Layer).unwrap();
        }
        let mut fused = plain.clone();
        let stats = fuse_elementwise(&mut fused).unwrap();
        fused.verify().unwrap();
        assert!(stats.groups >= 10, "{dtype}: {stats:?}");
        // Every branch's up-projection h·Bᵀ (rank 4: a small-k f32 product) is a step of the
        // chain that adds it into the base output.
        let with_product = fused
            .g
            .node_indices()
            .filter(|&id| match &fused.node(id).op {
                Op::Fused { steps } => steps.iter().any(|s| s.op.is_fusable_product()),
                _ => false,
            })
            .count();
        assert!(with_product >= 8, "{dtype}: {with_product} fused products");
        assert!(fused.g.node_count() < plain.g.node_count());
        let w = weights(&plain);
        let (a, b) = (run(&plain, &w), run(&fused, &w));
        assert_same_bits(&a, &b, &format!("{dtype} p={p}"));
        eprintln!(
            "{dtype} p={p}: {stats:?}; nodes {} → {}; peak activations {} B → {} B",
            plain.g.node_count(),
            fused.g.node_count(),
            a.stats.peak_activation_bytes,
            b.stats.peak_activation_bytes
        );
        assert!(b.stats.peak_activation_bytes <= a.stats.peak_activation_bytes);
    }
}
