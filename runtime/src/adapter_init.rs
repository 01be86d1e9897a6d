//! Initial values of LoRA weights (spec §6.1.3): PEFT's default, `A ~ U(−1/√in, 1/√in)`
//! (`kaiming_uniform_(a=√5)`: gain √(2/(1+5)) · √(3/in) = 1/√in) and `B = 0`, so the adapted
//! model starts identical to the base (check 24).
//!
//! The generator is a PCG32 (O'Neill's XSH-RR, 64-bit state) written here rather than the
//! `rand` crates: a dozen lines, no dependency, and a stream we own, so an initialisation is
//! reproducible across qplc versions. Each tensor gets its own stream, seeded from the run
//! seed and a hash of its name, so the values do not depend on the order weights are visited
//! or on which pipeline stage initialises them.
use crate::HostTensor;
use qplc_compiler::Graph;
use qplc_ops::{Op, TensorType};
use qplc_passes::{parse_lora_weight_name, LoraRole};
use std::collections::HashMap;

/// PCG32 (XSH-RR): 64-bit LCG state, 32-bit output.
#[derive(Clone, Debug)]
pub struct Pcg32 {
    state: u64,
    inc: u64,
}

impl Pcg32 {
    const MUL: u64 = 6364136223846793005;

    pub fn new(seed: u64, stream: u64) -> Self {
        let mut r = Pcg32 {
            state: 0,
            inc: (stream << 1) | 1,
        };
        r.next_u32();
        r.state = r.state.wrapping_add(seed);
        r.next_u32();
        r
    }

    pub fn next_u32(&mut self) -> u32 {
        let old = self.state;
        self.state = old.wrapping_mul(Self::MUL).wrapping_add(self.inc);
        let xorshifted = (((old >> 18) ^ old) >> 27) as u32;
        let rot = (old >> 59) as u32;
        xorshifted.rotate_right(rot)
    }

    /// Uniform in [0, 1) with 24 random bits (every value exactly representable in f32).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.next_f32()
    }
}

/// FNV-1a of a name: the per-tensor stream id.
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// PEFT's initial value of one LoRA matrix of type `ty` (A `[r, in]` or B `[out, r]`),
/// rounded to its dtype.
pub fn init_lora_weight(name: &str, role: LoraRole, ty: &TensorType, seed: u64) -> HostTensor {
    let dims = ty.shape.dims();
    let t = match role {
        LoraRole::A => {
            let bound = 1.0 / (dims[1] as f32).sqrt();
            let mut rng = Pcg32::new(seed, name_hash(name));
            let v = (0..ty.shape.numel())
                .map(|_| rng.uniform(-bound, bound))
                .collect();
            HostTensor::f32(ty.shape.clone(), v)
        }
        LoraRole::B => HostTensor::f32(ty.shape.clone(), vec![0.0; ty.shape.numel()]),
    };
    t.cast(ty.dtype)
}

/// Initial values of every LoRA weight of `graph` (the weights the `lora` pass added).
pub fn init_lora_weights(graph: &Graph, seed: u64) -> HashMap<String, HostTensor> {
    let mut out = HashMap::new();
    for (name, id) in graph.weights() {
        let Some((_, role)) = parse_lora_weight_name(&name) else {
            continue;
        };
        if let Op::Weight { ty, .. } = &graph.node(id).op {
            let t = init_lora_weight(&name, role, ty, seed);
            out.insert(name, t);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use qplc_ops::DType;

    #[test]
    fn pcg32_matches_the_reference_stream() {
        // pcg32-global demo (pcg-c-basic): seed 42, stream 54.
        let mut r = Pcg32::new(42, 54);
        let got: Vec<u32> = (0..6).map(|_| r.next_u32()).collect();
        assert_eq!(
            got,
            [0xa15c02b7, 0x7b47f409, 0xba1d3330, 0x83d2f293, 0xbfa4784b, 0xcbed606e]
        );
    }

    #[test]
    fn lora_a_is_kaiming_uniform_and_b_is_zero() {
        let in_f = 400;
        let ty = TensorType::new(vec![8, in_f], DType::F32);
        let a = init_lora_weight("m.lora_A.weight", LoraRole::A, &ty, 7);
        let bound = 1.0 / (in_f as f32).sqrt();
        let v = a.as_f32();
        assert!(v.iter().all(|x| x.abs() <= bound));
        // U(−b, b) has variance b²/3.
        let var = v.iter().map(|x| (x * x) as f64).sum::<f64>() / v.len() as f64;
        let want = (bound * bound / 3.0) as f64;
        assert!((var / want - 1.0).abs() < 0.05, "variance {var} vs {want}");
        let bty = TensorType::new(vec![16, 8], DType::BF16);
        let b = init_lora_weight("m.lora_B.weight", LoraRole::B, &bty, 7);
        assert!(b.as_f32().iter().all(|&x| x == 0.0));
        assert_eq!(b.ty.dtype, DType::BF16);
    }

    #[test]
    fn init_depends_on_seed_and_name_not_on_order() {
        let ty = TensorType::new(vec![2, 16], DType::F32);
        let x = init_lora_weight("a.lora_A.weight", LoraRole::A, &ty, 1);
        assert_eq!(x, init_lora_weight("a.lora_A.weight", LoraRole::A, &ty, 1));
        assert_ne!(x, init_lora_weight("b.lora_A.weight", LoraRole::A, &ty, 1));
        assert_ne!(x, init_lora_weight("a.lora_A.weight", LoraRole::A, &ty, 2));
    }
}
