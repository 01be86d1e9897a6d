//! The CUDA backend (issue 6, first step; notes/CUDA.md): the same `Backend` contract as the
//! CPU reference, so `executor::Program` runs the same compiled graphs on a GPU.
//!
//! Built on `cudarc` with dynamic loading: the crate compiles on machines without CUDA, and
//! the driver, NVRTC and cuBLAS libraries are looked up when `CudaBackend::new` runs. All
//! kernels (`kernels.cu`) are compiled by NVRTC once at start-up; matrix products go
//! through cuBLAS with f32 accumulation.
//!
//! Storage mirrors the CPU backend on purpose: floats are f32 on the device whatever their
//! logical dtype, and every op that computes (not one that only moves data) rounds a
//! bf16/f16 result once (`round_storage`). Both backends therefore compute the same
//! function and can be compared op by op (`check`); bf16 storage and tensor-core products
//! are the next step (notes/CUDA.md).
pub mod adam;
pub mod check;
mod dispatch;
mod launch;
pub mod model;

use crate::backend::{Backend, KernelError};
use crate::tensor::{Data, HostTensor};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream};
use qplc_ops::{DType, TensorType};
use std::collections::HashMap;
use std::sync::Arc;

/// CUDA C source of every kernel.
const KERNELS: &str = include_str!("kernels.cu");

/// Kernel entry points of `kernels.cu`, loaded once.
const KERNEL_NAMES: &[&str] = &[
    "round_storage",
    "fill_f32",
    "fill_i32",
    "unary_f32",
    "unary_backward_f32",
    "scalar_map_f32",
    "binary_f32",
    "binary_i32",
    "binary_backward_f32",
    "gather_u32",
    "place_u32",
    "slice_u32",
    "cast_f32_i32",
    "cast_i32_f32",
    "bias_rows_f32",
    "embedding_f32",
    "embedding_backward_f32",
    "softmax_rows_f32",
    "reduce_f32",
    "rms_norm_f32",
    "layer_norm_f32",
    "rms_norm_backward_f32",
    "rms_norm_weight_grad_f32",
    "layer_norm_backward_f32",
    "layer_norm_weight_grad_f32",
    "rope_f32",
    "attention_f32",
    "attention_stats_f32",
    "attention_dq_f32",
    "attention_dkv_f32",
    "row_lse_f32",
    "cross_entropy_f32",
    "cross_entropy_backward_f32",
];

/// Device storage of a tensor: floats as f32, integers as i32 (as `HostTensor`).
pub enum DevData {
    F32(CudaSlice<f32>),
    I32(CudaSlice<i32>),
}

/// A tensor in GPU memory, with its logical type.
pub struct CudaTensor {
    pub ty: TensorType,
    pub data: DevData,
}

impl CudaTensor {
    fn f32(&self, op: &'static str) -> Result<&CudaSlice<f32>, KernelError> {
        match &self.data {
            DevData::F32(s) => Ok(s),
            DevData::I32(_) => Err(KernelError::new(
                op,
                format!("expects a float tensor, got {}", self.ty),
            )),
        }
    }

    fn f32_mut(&mut self, op: &'static str) -> Result<&mut CudaSlice<f32>, KernelError> {
        let ty = self.ty.clone();
        match &mut self.data {
            DevData::F32(s) => Ok(s),
            DevData::I32(_) => Err(KernelError::new(
                op,
                format!("expects a float output, got {ty}"),
            )),
        }
    }

    fn i32(&self, op: &'static str) -> Result<&CudaSlice<i32>, KernelError> {
        match &self.data {
            DevData::I32(s) => Ok(s),
            DevData::F32(_) => Err(KernelError::new(
                op,
                format!("expects an integer tensor, got {}", self.ty),
            )),
        }
    }
}

/// One GPU, one stream: every kernel and copy is ordered on it.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    /// Fill every new buffer with NaN (floats) or `i32::MIN` (integers), so that an
    /// element a kernel forgets to write shows up in a comparison (METHOD.md "poison").
    poison: bool,
}

/// Compiles kernels.cu with NVRTC for `arch` (`sm_90`); a compile error carries NVRTC's log.
/// Needs only libnvrtc (no GPU), so it is tested wherever that library is found.
pub fn compile_kernels(arch: &'static str) -> Result<cudarc::nvrtc::Ptx, KernelError> {
    with_libraries(|| {
        cudarc::nvrtc::compile_ptx_with_opts(
            KERNELS,
            cudarc::nvrtc::CompileOptions {
                arch: Some(arch),
                name: Some("qplc_kernels.cu".into()),
                ..Default::default()
            },
        )
        .map_err(|e| match e {
            cudarc::nvrtc::CompileError::CompileError { log, options, .. } => KernelError::new(
                "nvrtc",
                format!(
                    "kernels.cu does not compile (options {options:?}):\n{}",
                    log.to_string_lossy()
                ),
            ),
            other => cuda_err("nvrtc", "kernels.cu", other),
        })
    })
}

/// Runs `f`, turning cudarc's panic when a CUDA library cannot be loaded into an error
/// (without the panic message on stderr).
fn with_libraries<T>(
    f: impl FnOnce() -> Result<T, KernelError> + std::panic::UnwindSafe,
) -> Result<T, KernelError> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(f);
    std::panic::set_hook(hook);
    r.unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        // cudarc appends every file name it tried; the first sentence says what is missing.
        let msg = msg.split(" - searched").next().unwrap_or_default();
        Err(KernelError::new(
            "cuda",
            format!("the CUDA libraries could not be loaded ({msg}); is LD_LIBRARY_PATH set to the folders of libcuda, libnvrtc and libcublas?"),
        ))
    })
}

/// A CUDA failure as a kernel error naming what failed.
pub(crate) fn cuda_err(op: &'static str, what: &str, e: impl std::fmt::Debug) -> KernelError {
    KernelError::new(op, format!("{what}: {e:?}"))
}

impl CudaBackend {
    /// Opens GPU `ordinal`, compiles the kernels with NVRTC for its architecture and
    /// creates the cuBLAS handle. Fails with a readable error (not a panic) where the CUDA
    /// libraries are missing or the kernels do not compile (the NVRTC log is included).
    pub fn new(ordinal: usize) -> Result<Self, KernelError> {
        with_libraries(|| {
            let ctx = CudaContext::new(ordinal)
                .map_err(|e| cuda_err("cuda", &format!("cannot open GPU {ordinal}"), e))?;
            let (major, minor) = ctx
                .compute_capability()
                .map_err(|e| cuda_err("cuda", "compute capability", e))?;
            let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
            let module = ctx
                .load_module(compile_kernels(arch)?)
                .map_err(|e| cuda_err("cuda", "loading the compiled kernels", e))?;
            let mut funcs = HashMap::new();
            for &name in KERNEL_NAMES {
                let f = module
                    .load_function(name)
                    .map_err(|e| cuda_err("cuda", &format!("kernel `{name}`"), e))?;
                funcs.insert(name, f);
            }
            let stream = ctx.default_stream();
            let blas = CudaBlas::new(stream.clone()).map_err(|e| cuda_err("cublas", "init", e))?;
            Ok(CudaBackend {
                ctx,
                stream,
                blas,
                funcs,
                poison: false,
            })
        })
    }

    /// Poison every new buffer (see the field); for checks, slower.
    pub fn with_poison(mut self, on: bool) -> Self {
        self.poison = on;
        self
    }

    /// Device name and compute capability, for reports.
    pub fn device_name(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "?".into());
        let cc = self.ctx.compute_capability().unwrap_or((0, 0));
        format!("{name} (sm_{}{})", cc.0, cc.1)
    }

    /// Waits for all queued work; errors of earlier asynchronous launches surface here.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("cuda", "synchronize", e))
    }

    fn func(&self, name: &'static str) -> &CudaFunction {
        &self.funcs[name]
    }

    /// Raw device allocation of `n` elements (zero-length allocations are valid here).
    fn raw<T: cudarc::driver::DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>, KernelError> {
        // SAFETY: the contents are unspecified until a kernel writes them, as the Backend
        // contract says of `alloc`.
        // One element at least: a zero-byte cuMemAlloc is an error.
        unsafe { self.stream.alloc::<T>(n.max(1)) }
            .map_err(|e| cuda_err("alloc", &format!("{n} elements"), e))
    }
}

impl Backend for CudaBackend {
    type Buffer = CudaTensor;

    fn name(&self) -> String {
        format!("cuda:{}", self.ctx.ordinal())
    }

    fn alloc(&self, ty: &TensorType) -> Result<CudaTensor, KernelError> {
        let n = ty.shape.numel();
        let data = if ty.dtype.is_float() {
            if ty.dtype == DType::NF4 {
                return Err(KernelError::new(
                    "alloc",
                    "nf4 tensors are not supported yet",
                ));
            }
            let mut s = self.raw::<f32>(n)?;
            if self.poison {
                self.fill_f32(&mut s, n, f32::NAN)?;
            }
            DevData::F32(s)
        } else if ty.dtype == DType::I32 {
            let mut s = self.raw::<i32>(n)?;
            if self.poison {
                self.fill_i32(&mut s, n, i32::MIN)?;
            }
            DevData::I32(s)
        } else {
            return Err(KernelError::new(
                "alloc",
                format!("{ty}: only f32/bf16/f16 and i32 tensors live on the GPU"),
            ));
        };
        Ok(CudaTensor {
            ty: ty.clone(),
            data,
        })
    }

    fn upload(&self, t: &HostTensor) -> Result<CudaTensor, KernelError> {
        let n = t.ty.shape.numel();
        let data = match &t.data {
            Data::F32(v) if t.ty.dtype.is_float() && v.len() == n => {
                let mut s = self.raw::<f32>(n)?;
                if n > 0 {
                    self.stream
                        .memcpy_htod(v.as_slice(), &mut s)
                        .map_err(|e| cuda_err("upload", &t.ty.to_string(), e))?;
                }
                DevData::F32(s)
            }
            Data::I32(v) if t.ty.dtype == DType::I32 && v.len() == n => {
                let mut s = self.raw::<i32>(n)?;
                if n > 0 {
                    self.stream
                        .memcpy_htod(v.as_slice(), &mut s)
                        .map_err(|e| cuda_err("upload", &t.ty.to_string(), e))?;
                }
                DevData::I32(s)
            }
            _ => {
                return Err(KernelError::new(
                    "upload",
                    format!(
                        "tensor of type {} holds the wrong kind or number of elements",
                        t.ty
                    ),
                ))
            }
        };
        Ok(CudaTensor {
            ty: t.ty.clone(),
            data,
        })
    }

    fn download(&self, buf: &CudaTensor) -> Result<HostTensor, KernelError> {
        let n = buf.ty.shape.numel();
        let data = match &buf.data {
            DevData::F32(s) => {
                let mut v = vec![0.0f32; n];
                if n > 0 {
                    self.stream
                        .memcpy_dtoh(&s.slice(..n), v.as_mut_slice())
                        .map_err(|e| cuda_err("download", &buf.ty.to_string(), e))?;
                }
                Data::F32(v)
            }
            DevData::I32(s) => {
                let mut v = vec![0i32; n];
                if n > 0 {
                    self.stream
                        .memcpy_dtoh(&s.slice(..n), v.as_mut_slice())
                        .map_err(|e| cuda_err("download", &buf.ty.to_string(), e))?;
                }
                Data::I32(v)
            }
        };
        // Pageable copies return once the data is on the host; synchronising also reports
        // any earlier asynchronous kernel failure here rather than later.
        self.synchronize()?;
        Ok(HostTensor {
            ty: buf.ty.clone(),
            data,
        })
    }

    fn buffer_type<'a>(&self, buf: &'a CudaTensor) -> &'a TensorType {
        &buf.ty
    }

    fn execute(
        &self,
        op: &qplc_ops::Op,
        operands: &[&CudaTensor],
        out: &mut CudaTensor,
    ) -> Result<(), KernelError> {
        dispatch::execute(self, op, operands, out)
    }
}
