//! The dropout mask of `Op::Dropout`, defined once here so that every backend (and the
//! backward, and any recomputation) draws the same mask: a counter-based generator, with no
//! state to store or restore (spec §14 item 5 — the reference's recomputed forward draws a
//! fresh mask; ours cannot).
//!
//! Element `i` of a dropout node with salt `s` under seed `k` looks at the `(i+1)`-th output
//! of a SplitMix64 stream whose state starts at `mix(k ⊕ mix(s + γ))` — i.e. at
//! `mix(stream + (i+1)·γ)` — and is kept when the top 53 bits, read as a fraction in
//! `[0, 1)`, are at least `p`. Keep probability `1 − p`, as `torch.nn.Dropout`; the masks
//! themselves differ from PyTorch's (a different generator), so there is no bitwise parity
//! with PEFT runs that use dropout — only in distribution.

/// SplitMix64's increment (the golden ratio in 64-bit fixed point).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function (Stafford's "Mix13" variant): a bijection of `u64` with
/// good avalanche, so consecutive counters give independent-looking words.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The stream of one dropout node under one seed.
pub fn stream(seed: u64, salt: u64) -> u64 {
    mix(seed ^ mix(salt.wrapping_add(GAMMA)))
}

/// Whether element `index` of a node with stream `stream` survives dropout with
/// probability `p` of being zeroed.
pub fn keeps_in(stream: u64, index: u64, p: f64) -> bool {
    let h = mix(stream.wrapping_add(index.wrapping_add(1).wrapping_mul(GAMMA)));
    // 53 random bits as a fraction in [0, 1), exactly representable in f64.
    ((h >> 11) as f64) * (1.0 / (1u64 << 53) as f64) >= p
}

/// Whether element `index` of the dropout node `salt` survives under `seed`.
pub fn keeps(seed: u64, salt: u64, index: u64, p: f64) -> bool {
    keeps_in(stream(seed, salt), index, p)
}

/// The i32 `[3]` key operand of `Op::Dropout`: the seed's low and high words and the
/// active flag (0 = identity, for evaluation and inference).
pub fn key_words(seed: u64, active: bool) -> [i32; 3] {
    [
        seed as u32 as i32,
        (seed >> 32) as u32 as i32,
        active as i32,
    ]
}

/// The inverse of [`key_words`]: `(seed, active)`.
pub fn from_key_words(w: [i32; 3]) -> (u64, bool) {
    let seed = (w[0] as u32 as u64) | ((w[1] as u32 as u64) << 32);
    (seed, w[2] != 0)
}

/// The seed of one micro-batch's dropout masks: a hash of the run seed, the optimiser step
/// and the micro-batch's index within it, so every forward gets fresh masks and a resumed
/// run (which restores the step) draws exactly the masks of an uninterrupted one.
pub fn micro_batch_seed(run_seed: u64, global_step: u64, micro_batch: u64) -> u64 {
    mix(mix(run_seed.wrapping_add(GAMMA) ^ global_step).wrapping_add(micro_batch))
}

/// A stable salt for a dropout node from a name (FNV-1a): the same graph built twice gets
/// the same salts, which resume relies on.
pub fn salt_of(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_fraction_is_one_minus_p() {
        for &p in &[0.05, 0.1, 0.5, 0.9] {
            let s = stream(7, salt_of("model.layers.0.self_attn.q_proj"));
            let n = 200_000;
            let kept = (0..n).filter(|&i| keeps_in(s, i, p)).count() as f64 / n as f64;
            // 5 standard deviations of a binomial proportion.
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!((kept - (1.0 - p)).abs() < 5.0 * sd, "p {p}: kept {kept}");
        }
    }

    #[test]
    fn p_zero_keeps_everything() {
        assert!((0..10_000).all(|i| keeps(3, 4, i, 0.0)));
    }

    #[test]
    fn masks_differ_between_seeds_and_salts_and_repeat_for_the_same_pair() {
        let mask =
            |seed, salt| -> Vec<bool> { (0..4096).map(|i| keeps(seed, salt, i, 0.5)).collect() };
        assert_eq!(mask(1, 2), mask(1, 2));
        let same = |a: &[bool], b: &[bool]| a.iter().zip(b).filter(|(x, y)| x == y).count();
        // Independent masks agree on about half the elements.
        for other in [mask(2, 2), mask(1, 3)] {
            let agree = same(&mask(1, 2), &other);
            assert!((1800..2300).contains(&agree), "{agree}");
        }
    }

    #[test]
    fn key_words_round_trip() {
        for seed in [0u64, 1, u64::MAX, 0x8000_0000_dead_beef] {
            for active in [false, true] {
                assert_eq!(from_key_words(key_words(seed, active)), (seed, active));
            }
        }
    }

    #[test]
    fn micro_batch_seeds_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for step in 0..50 {
            for mb in 0..8 {
                assert!(seen.insert(micro_batch_seed(42, step, mb)));
            }
        }
    }
}
