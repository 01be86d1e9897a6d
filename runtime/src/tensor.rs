//! Host-resident tensors: what weights load into, what the CPU backend computes on, and
//! what every other backend uploads from and downloads to.
use half::{bf16, f16};
use qplc_ops::{DType, Shape, TensorType};

/// Element storage. Floats are kept as f32 on the host whatever their logical dtype; a
/// bf16/f16 tensor holds values already rounded to that dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub ty: TensorType,
    pub data: Data,
}

impl HostTensor {
    pub fn f32(shape: impl Into<Shape>, data: Vec<f32>) -> Self {
        let shape = shape.into();
        assert_eq!(
            shape.numel(),
            data.len(),
            "data length must match shape {shape}"
        );
        HostTensor {
            ty: TensorType::new(shape, DType::F32),
            data: Data::F32(data),
        }
    }

    pub fn i32(shape: impl Into<Shape>, data: Vec<i32>) -> Self {
        let shape = shape.into();
        assert_eq!(
            shape.numel(),
            data.len(),
            "data length must match shape {shape}"
        );
        HostTensor {
            ty: TensorType::new(shape, DType::I32),
            data: Data::I32(data),
        }
    }

    pub fn zeros(ty: &TensorType) -> Self {
        let n = ty.shape.numel();
        let data = if ty.dtype.is_float() {
            Data::F32(vec![0.0; n])
        } else {
            Data::I32(vec![0; n])
        };
        HostTensor {
            ty: ty.clone(),
            data,
        }
    }

    pub fn shape(&self) -> &Shape {
        &self.ty.shape
    }

    pub fn as_f32(&self) -> &[f32] {
        match &self.data {
            Data::F32(v) => v,
            Data::I32(_) => panic!("tensor {} is not a float tensor", self.ty),
        }
    }

    pub fn as_f32_mut(&mut self) -> &mut [f32] {
        match &mut self.data {
            Data::F32(v) => v,
            Data::I32(_) => panic!("tensor is not a float tensor"),
        }
    }

    pub fn as_i32(&self) -> &[i32] {
        match &self.data {
            Data::I32(v) => v,
            Data::F32(_) => panic!("tensor {} is not an integer tensor", self.ty),
        }
    }

    /// Same values, logical dtype changed, with rounding to bf16/f16 where asked.
    pub fn cast(&self, to: DType) -> HostTensor {
        let data = match (&self.data, to.is_float()) {
            (Data::F32(v), true) => Data::F32(round_to(v, to)),
            (Data::F32(v), false) => Data::I32(v.iter().map(|&x| x as i32).collect()),
            (Data::I32(v), true) => Data::F32(round_to(
                &v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
                to,
            )),
            (Data::I32(v), false) => Data::I32(v.clone()),
        };
        HostTensor {
            ty: TensorType::new(self.ty.shape.clone(), to),
            data,
        }
    }
}

/// Rounds f32 values to the precision of `dtype` (identity for f32).
pub fn round_to(v: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::BF16 => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
        DType::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
        _ => v.to_vec(),
    }
}
