//! Random initial values for `qplc bench`, drawn from a counter hash so that the device kernel
//! (`init_random` in cuda/train_kernels.cu) and this host version give element `i` the same
//! value (up to the last ulps of `logf`/`cosf`), whatever the grid or thread layout.
//!
//! What each weight gets mirrors HF's `_init_weights` for Llama (normal, std 0.02, for every
//! matrix; ones for norm weights) and PEFT's LoRA init (A kaiming-uniform = U(±1/√in), B zero),
//! which is what shared/bench/peft_baseline.py trains from.
use crate::adapter_init::name_hash;
use crate::HostTensor;
use qplc_ops::{DType, TensorType};
use qplc_passes::{parse_lora_weight_name, LoraRole};

/// HF's `initializer_range` for Llama.
pub const INIT_STD: f32 = 0.02;

/// How one tensor is filled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal { std: f32 },
    Uniform { lo: f32, hi: f32 },
    Const(f32),
}

impl Init {
    /// The initial value of weight `name` of type `ty`: LoRA A/B as PEFT, norm weights (rank 1)
    /// one, every other matrix normal(0, 0.02).
    pub fn for_weight(name: &str, ty: &TensorType) -> Init {
        match parse_lora_weight_name(name) {
            Some((_, LoraRole::A)) => {
                let fan_in = ty.shape.dims().last().copied().unwrap_or(1).max(1);
                let bound = 1.0 / (fan_in as f32).sqrt();
                Init::Uniform {
                    lo: -bound,
                    hi: bound,
                }
            }
            Some((_, LoraRole::B)) => Init::Const(0.0),
            None if ty.shape.rank() <= 1 => Init::Const(1.0),
            None => Init::Normal { std: INIT_STD },
        }
    }

    /// `(mode, a, b)` as the device kernel takes them.
    pub fn kernel_args(&self) -> (i32, f32, f32) {
        match *self {
            Init::Normal { std } => (0, std, 0.0),
            Init::Uniform { lo, hi } => (1, lo, hi),
            Init::Const(v) => (2, v, 0.0),
        }
    }
}

/// SplitMix64's finaliser (`mix64` in train_kernels.cu).
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

/// The stream of one tensor: the run seed and the tensor's name, so values do not depend on
/// the order in which weights are created.
pub fn tensor_seed(seed: u64, name: &str) -> u64 {
    mix(seed ^ name_hash(name))
}

/// Element `i` of a tensor with stream `seed` (before rounding to the dtype).
pub fn sample(init: Init, seed: u64, i: u64) -> f32 {
    let h = mix(seed ^ i.wrapping_mul(0xD1B54A32D192ED03));
    let u1 = ((h >> 40) + 1) as f32 * (1.0 / 16777216.0);
    let u2 = ((h >> 16) & 0xFF_FFFF) as f32 * (1.0 / 16777216.0);
    match init {
        Init::Normal { std } => std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos(),
        Init::Uniform { lo, hi } => lo + (hi - lo) * u2,
        Init::Const(v) => v,
    }
}

/// A host tensor of type `ty` filled by `init` from `seed`, rounded to its dtype (the CPU
/// backend's storage).
pub fn host_tensor(ty: &TensorType, init: Init, seed: u64) -> HostTensor {
    let n = ty.shape.numel() as u64;
    let v: Vec<f32> = (0..n).map(|i| sample(init, seed, i)).collect();
    let t = HostTensor::f32(ty.shape.clone(), v);
    if ty.dtype == DType::F32 {
        t
    } else {
        t.cast(ty.dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qplc_ops::Shape;

    fn ty(dims: &[usize]) -> TensorType {
        TensorType::new(Shape::new(dims.to_vec()), DType::F32)
    }

    #[test]
    fn normal_samples_have_the_requested_spread() {
        let t = host_tensor(&ty(&[256, 256]), Init::Normal { std: 0.02 }, 7);
        let v = t.as_f32();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 5e-4, "std {}", var.sqrt());
        assert!(v.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn uniform_samples_stay_in_bounds_and_fill_them() {
        let t = host_tensor(&ty(&[4096]), Init::Uniform { lo: -0.5, hi: 0.5 }, 1);
        let v = t.as_f32();
        assert!(v.iter().all(|&x| (-0.5..0.5).contains(&x)));
        let (lo, hi) = v
            .iter()
            .fold((1f32, -1f32), |(a, b), &x| (a.min(x), b.max(x)));
        assert!(lo < -0.49 && hi > 0.49, "{lo} {hi}");
    }

    #[test]
    fn streams_differ_by_name_and_repeat_by_seed() {
        let a = tensor_seed(3, "model.layers.0.mlp.up_proj.weight");
        let b = tensor_seed(3, "model.layers.1.mlp.up_proj.weight");
        assert_ne!(a, b);
        assert_eq!(a, tensor_seed(3, "model.layers.0.mlp.up_proj.weight"));
        let init = Init::Normal { std: 1.0 };
        assert_ne!(sample(init, a, 0), sample(init, b, 0));
        assert_eq!(sample(init, a, 5), sample(init, a, 5));
    }

    #[test]
    fn weights_get_the_hf_and_peft_initialisers() {
        let m = ty(&[8, 32]);
        assert_eq!(
            Init::for_weight("model.layers.0.self_attn.q_proj.weight", &m),
            Init::Normal { std: 0.02 }
        );
        assert_eq!(
            Init::for_weight("model.norm.weight", &ty(&[32])),
            Init::Const(1.0)
        );
        let a = "model.layers.0.self_attn.q_proj.lora_A.weight";
        let b = "model.layers.0.self_attn.q_proj.lora_B.weight";
        let bound = 1.0 / 32f32.sqrt();
        assert_eq!(
            Init::for_weight(a, &m),
            Init::Uniform {
                lo: -bound,
                hi: bound
            }
        );
        assert_eq!(Init::for_weight(b, &ty(&[32, 8])), Init::Const(0.0));
    }
}
