use serde::{Deserialize, Serialize};
use std::fmt;

/// Element types a tensor can have. `NF4` is reserved for the quantise pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    BF16,
    F16,
    I32,
    I64,
    U8,
    NF4,
}

impl DType {
    /// Storage bits per element (NF4 packs two values per byte).
    pub fn bits(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 32,
            DType::BF16 | DType::F16 => 16,
            DType::I64 => 64,
            DType::U8 => 8,
            DType::NF4 => 4,
        }
    }

    /// Bytes needed for `numel` elements, rounded up to whole bytes.
    pub fn bytes_for(self, numel: usize) -> usize {
        (numel * self.bits()).div_ceil(8)
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16)
    }

    pub fn is_int(self) -> bool {
        matches!(self, DType::I32 | DType::I64 | DType::U8)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::NF4 => "nf4",
        }
    }

    /// Accepts our short names and the spellings used by PyTorch/HF configs
    /// (`float32`, `bfloat16`, `torch.float16`, …).
    pub fn parse(s: &str) -> Option<DType> {
        let s = s.trim().trim_start_matches("torch.");
        Some(match s {
            "f32" | "float32" | "float" | "fp32" => DType::F32,
            "bf16" | "bfloat16" => DType::BF16,
            "f16" | "float16" | "half" | "fp16" => DType::F16,
            "i32" | "int32" => DType::I32,
            "i64" | "int64" | "long" => DType::I64,
            "u8" | "uint8" => DType::U8,
            "nf4" => DType::NF4,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
