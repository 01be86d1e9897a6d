//! The CUDA backend (issue 6; notes/CUDA.md): the same `Backend` contract as the CPU
//! reference, so `executor::Program` runs the same compiled graphs on a GPU.
//!
//! Built on `cudarc` with dynamic loading: the crate compiles on machines without CUDA, and
//! the driver, NVRTC and cuBLAS libraries are looked up when `CudaBackend::new` runs. All
//! kernels (`kernels.cu`) are compiled by NVRTC once at start-up, for f32 and for bf16
//! storage; matrix products go through cuBLAS with f32 accumulation (tensor cores for bf16).
//!
//! bf16 tensors hold 2 bytes an element on the device; f32 and f16 tensors hold f32 (an f16
//! result is rounded once after its op, `round_storage`). Each kernel computes in f32 (f64
//! where the CPU does) and rounds its result to the storage type once, exactly as the CPU
//! backend rounds after each op, so the two backends compute the same function and can be
//! compared op by op (`check`). Buffers come from a caching allocator (`alloc`).
pub mod adam;
mod alloc;
pub mod check;
mod check_large;
pub mod check_skinny;
mod dispatch;
mod flash;
mod fused;
mod gemm;
mod launch;
mod lt;
pub mod model;
mod nvrtc_cache;
pub mod skinny;

use crate::backend::{Backend, InPlace, KernelError};
use crate::tensor::{Data, HostTensor};
use alloc::{Element, Pool, Slab};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchArgs, PushKernelArg};
use qplc_ops::{DType, TensorType};
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::Arc;

/// CUDA C source of every kernel.
const KERNELS: &str = include_str!("kernels.cu");

/// Kernels that exist for both storage kinds, as `{name}_f32` and `{name}_bf16`.
const KERNEL_NAMES: &[&str] = &[
    "fill",
    "unary",
    "unary_backward",
    "scalar_map",
    "binary",
    "binary_backward",
    "gather",
    "place",
    "slice",
    "cast_to_i32",
    "cast_from_i32",
    "bias_rows",
    "embedding",
    "embedding_backward",
    "softmax_rows",
    "reduce",
    "rms_norm",
    "layer_norm",
    "rms_norm_backward",
    "norm_weight_grad_partial",
    "layer_norm_backward",
    "norm_weight_grad_sum",
    "norm_row_stats",
    "rope",
    "attention",
    "attention_stats",
    "attention_dq",
    "attention_dkv",
    "row_lse",
    "cross_entropy",
    "cross_entropy_backward",
    "nll",
    "nll_backward",
    "dropout",
];

/// Kernels of the f32 build only (integers, f16 rounding, the in-place f32 bias).
const F32_KERNEL_NAMES: &[&str] = &[
    "round_storage",
    "fill_i32",
    "binary_i32",
    "bias_inplace_f32",
];

/// Kernels of the bf16 build only (storage conversions).
const BF16_KERNEL_NAMES: &[&str] = &["widen_bf16", "narrow_bf16"];

/// The storage kind of a float tensor, which selects a kernel build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Float {
    F32,
    BF16,
}

impl Float {
    fn define(self) -> &'static str {
        match self {
            Float::F32 => "#define STORAGE_BF16 0\n",
            Float::BF16 => "#define STORAGE_BF16 1\n",
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Float::F32 => "f32",
            Float::BF16 => "bf16",
        }
    }

    /// The storage a float dtype gets: bf16 its own 2-byte kind, f32 and f16 f32.
    pub fn of(dtype: DType) -> Float {
        if dtype == DType::BF16 {
            Float::BF16
        } else {
            Float::F32
        }
    }
}

/// Device storage of a tensor: f32 (for f32 and f16 tensors), bf16 bits, or i32.
pub enum DevData {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<u16>),
    I32(CudaSlice<i32>),
}

impl DevData {
    /// The float storage kind, `None` for integers.
    pub fn float(&self) -> Option<Float> {
        match self {
            DevData::F32(_) => Some(Float::F32),
            DevData::BF16(_) => Some(Float::BF16),
            DevData::I32(_) => None,
        }
    }
}

// A tensor of either storage kind is passed to a kernel as its device pointer; the kernel
// build chosen for the launch decides how the words are read.
unsafe impl<'a, 'b: 'a> PushKernelArg<&'b DevData> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b DevData) -> &mut Self {
        match arg {
            DevData::F32(s) => self.arg(s),
            DevData::BF16(s) => self.arg(s),
            DevData::I32(s) => self.arg(s),
        }
    }
}

unsafe impl<'a, 'b: 'a> PushKernelArg<&'b mut DevData> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b mut DevData) -> &mut Self {
        match arg {
            DevData::F32(s) => self.arg(s),
            DevData::BF16(s) => self.arg(s),
            DevData::I32(s) => self.arg(s),
        }
    }
}

/// A tensor in GPU memory, with its logical type. Dropping it hands its buffer back to the
/// backend's caching allocator.
pub struct CudaTensor {
    pub ty: TensorType,
    data: ManuallyDrop<DevData>,
    pool: Arc<Pool>,
    /// The values of an integer tensor uploaded from the host. Token ids, labels, positions
    /// and dropout keys are checked on the host; keeping them here spares a download, which
    /// would wait for the stream to drain (a rope call did, twice per layer).
    host_ints: Option<Arc<[i32]>>,
    /// Flash attention's per-row log-sum-exp of this attention output, kept so the
    /// backward need not run the forward again (see `Op::AttentionBackward`'s `o`).
    attn_lse: Option<alloc::Scratch<f32>>,
}

impl Drop for CudaTensor {
    fn drop(&mut self) {
        // SAFETY: `data` is not used again; this is its only take.
        let d = unsafe { ManuallyDrop::take(&mut self.data) };
        self.pool.give(match d {
            DevData::F32(s) => Slab::F32(s),
            DevData::BF16(s) => Slab::BF16(s),
            DevData::I32(s) => Slab::I32(s),
        });
    }
}

impl CudaTensor {
    pub fn data(&self) -> &DevData {
        &self.data
    }

    /// The buffer, to be written: what was known about its contents is dropped.
    pub fn data_mut(&mut self) -> &mut DevData {
        self.host_ints = None;
        self.attn_lse = None;
        &mut self.data
    }

    /// The host copy of an uploaded integer tensor's values, when there is one.
    pub(crate) fn host_ints(&self) -> Option<&[i32]> {
        self.host_ints.as_deref()
    }

    /// The log-sum-exp flash attention saved with this output, when it did.
    pub(crate) fn attn_lse(&self) -> Option<&CudaSlice<f32>> {
        self.attn_lse.as_deref()
    }

    /// The buffer to write and a place for its log-sum-exp (flash attention's forward).
    pub(crate) fn data_and_lse(
        &mut self,
        lse: alloc::Scratch<f32>,
    ) -> (&mut DevData, &mut CudaSlice<f32>) {
        self.host_ints = None;
        let lse = self.attn_lse.insert(lse);
        (&mut self.data, lse)
    }

    /// The f32 buffer of a tensor held in f32 storage (f32 and f16 dtypes); an error names
    /// the tensor otherwise. For code that works on f32 only (optimiser state, masters).
    pub fn f32(&self, op: &'static str) -> Result<&CudaSlice<f32>, KernelError> {
        match &*self.data {
            DevData::F32(s) => Ok(s),
            _ => Err(KernelError::new(
                op,
                format!("expects a tensor held as f32, got {}", self.ty),
            )),
        }
    }

    pub fn f32_mut(&mut self, op: &'static str) -> Result<&mut CudaSlice<f32>, KernelError> {
        match &mut *self.data {
            DevData::F32(s) => Ok(s),
            _ => Err(KernelError::new(
                op,
                format!("expects a tensor held as f32, got {}", self.ty),
            )),
        }
    }

    pub fn i32(&self, op: &'static str) -> Result<&CudaSlice<i32>, KernelError> {
        match &*self.data {
            DevData::I32(s) => Ok(s),
            _ => Err(KernelError::new(
                op,
                format!("expects an integer tensor, got {}", self.ty),
            )),
        }
    }

    /// Bytes this tensor's buffer holds on the device.
    pub fn device_bytes(&self) -> usize {
        match &*self.data {
            DevData::F32(s) => s.len() * 4,
            DevData::BF16(s) => s.len() * 2,
            DevData::I32(s) => s.len() * 4,
        }
    }
}

/// One GPU, one stream: every kernel and copy is ordered on it.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// Kernels by their full name (`unary_bf16`).
    funcs: HashMap<String, CudaFunction>,
    pool: Arc<Pool>,
    /// Flash attention for bf16 storage (`flash.rs`); `None` before sm_80, where the naive
    /// kernels run instead.
    flash: Option<flash::Flash>,
    /// `sm_XY` of the device, for kernels compiled later (`fused`).
    arch: &'static str,
    /// Generated elementwise kernels, compiled on first use (`fused.rs`).
    fused: Box<fused::FusedKernels>,
    /// cuBLASLt for products with an accumulated operand (`lt.rs`), opened on first use.
    lt: std::sync::OnceLock<lt::Lt>,
    /// Fill every new buffer (reused ones too) with NaN (floats) or `i32::MIN` (integers),
    /// so that an element a kernel forgets to write shows up in a comparison (METHOD.md
    /// "poison").
    poison: bool,
}

/// Compiles kernels.cu with NVRTC for `arch` (`sm_90`) in one storage build; a compile error
/// carries NVRTC's log. Needs only libnvrtc (no GPU), so it is tested wherever that library
/// is found.
pub fn compile_kernels(
    arch: &'static str,
    float: Float,
) -> Result<cudarc::nvrtc::Ptx, KernelError> {
    let src = format!("{}{KERNELS}", float.define());
    nvrtc_cache::compile(
        &src,
        arch,
        &format!("kernels.cu ({} storage)", float.suffix()),
    )
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
    /// Opens GPU `ordinal`, compiles the kernels with NVRTC for its architecture (both
    /// storage builds, in parallel) and creates the cuBLAS handle. Fails with a readable
    /// error (not a panic) where the CUDA libraries are missing or the kernels do not
    /// compile (the NVRTC log is included).
    pub fn new(ordinal: usize) -> Result<Self, KernelError> {
        with_libraries(|| {
            let ctx = CudaContext::new(ordinal)
                .map_err(|e| cuda_err("cuda", &format!("cannot open GPU {ordinal}"), e))?;
            let (major, minor) = ctx
                .compute_capability()
                .map_err(|e| cuda_err("cuda", "compute capability", e))?;
            let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
            let (f32_ptx, bf16_ptx, flash, skinny_ptx) = std::thread::scope(|sc| {
                let b = sc.spawn(|| compile_kernels(arch, Float::BF16));
                let sk = sc.spawn(|| skinny::compile_skinny_kernels(arch));
                let fl = sc.spawn(|| flash::Flash::new(&ctx, arch));
                let f = compile_kernels(arch, Float::F32);
                let b = b.join().unwrap_or_else(|_| {
                    Err(KernelError::new(
                        "nvrtc",
                        "the bf16 compile thread panicked",
                    ))
                });
                // An older GPU runs attention on the naive kernels; say so once.
                let fl = match fl.join() {
                    Ok(Ok(fl)) => Some(fl),
                    Ok(Err(e)) => {
                        tracing::warn!("flash attention unavailable, naive kernels used: {e}");
                        None
                    }
                    Err(_) => None,
                };
                let sk = sk.join().unwrap_or_else(|_| {
                    Err(KernelError::new(
                        "nvrtc",
                        "the skinny.cu compile thread panicked",
                    ))
                });
                (f, b, fl, sk)
            });
            let mut funcs = HashMap::new();
            for (float, ptx, only) in [
                (Float::F32, f32_ptx?, F32_KERNEL_NAMES),
                (Float::BF16, bf16_ptx?, BF16_KERNEL_NAMES),
            ] {
                let module = ctx
                    .load_module(ptx)
                    .map_err(|e| cuda_err("cuda", "loading the compiled kernels", e))?;
                let names = KERNEL_NAMES
                    .iter()
                    .map(|n| format!("{n}_{}", float.suffix()))
                    .chain(only.iter().map(|n| n.to_string()));
                for name in names {
                    let f = module
                        .load_function(&name)
                        .map_err(|e| cuda_err("cuda", &format!("kernel `{name}`"), e))?;
                    funcs.insert(name, f);
                }
            }
            skinny::load(&ctx, skinny_ptx?, &mut funcs)?;
            let stream = ctx.default_stream();
            let blas = CudaBlas::new(stream.clone()).map_err(|e| cuda_err("cublas", "init", e))?;
            let pool = Arc::new(Pool::new(stream.clone()));
            Ok(CudaBackend {
                ctx,
                stream,
                blas,
                funcs,
                pool,
                flash,
                arch,
                fused: Box::default(),
                lt: std::sync::OnceLock::new(),
                poison: false,
            })
        })
    }

    /// The cuBLASLt state, opened on the first product with an accumulated operand.
    fn lt(&self) -> Result<&lt::Lt, KernelError> {
        if let Some(l) = self.lt.get() {
            return Ok(l);
        }
        let stream = std::panic::AssertUnwindSafe(&self.stream);
        let l = with_libraries(|| lt::Lt::new(*stream))?;
        Ok(self.lt.get_or_init(|| l))
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

    /// Bytes held by live device buffers (tensors, weights included, and scratch arrays).
    pub fn bytes_in_use(&self) -> usize {
        self.pool.in_use()
    }

    /// The most `bytes_in_use` has been since the backend started or `reset_peak`.
    pub fn peak_bytes_in_use(&self) -> usize {
        self.pool.peak()
    }

    /// Bytes taken from the driver: in use plus cached for reuse.
    pub fn bytes_reserved(&self) -> usize {
        self.pool.reserved()
    }

    /// Device allocations (`cuMemAlloc`) made so far; constant once the cache is warm.
    pub fn device_allocations(&self) -> u64 {
        self.pool.mallocs()
    }

    /// Starts a new high-water mark at the current `bytes_in_use`.
    pub fn reset_peak(&self) {
        self.pool.reset_peak()
    }

    /// Generated elementwise kernels compiled (or loaded from the disk cache) so far.
    pub fn fused_kernel_count(&self) -> usize {
        self.fused.len()
    }

    /// Returns every cached buffer to the driver.
    pub fn trim_cache(&self) {
        self.pool.trim()
    }

    /// A kernel by its full name; every name is loaded at start-up, so a miss is a bug in
    /// the dispatch code, reported as an error rather than a panic.
    pub(crate) fn func(&self, name: &str) -> Result<&CudaFunction, KernelError> {
        self.funcs
            .get(name)
            .ok_or_else(|| KernelError::new("cuda", format!("no kernel named `{name}` was loaded")))
    }

    /// A scratch array from the pool, handed back when dropped.
    pub(crate) fn scratch<T: Element>(&self, n: usize) -> Result<alloc::Scratch<T>, KernelError> {
        alloc::Scratch::new(&self.pool, n)
    }

    /// A tensor of type `ty` in storage `data` taken from the pool.
    fn tensor(&self, ty: &TensorType, data: DevData) -> CudaTensor {
        CudaTensor {
            ty: ty.clone(),
            data: ManuallyDrop::new(data),
            pool: self.pool.clone(),
            host_ints: None,
            attn_lse: None,
        }
    }

    /// A buffer of `ty` held in float storage `float` (not necessarily `Float::of(ty)`: the
    /// dispatch code widens mixed-dtype operands to f32). Unpoisoned.
    pub(crate) fn alloc_in(
        &self,
        ty: &TensorType,
        float: Float,
    ) -> Result<CudaTensor, KernelError> {
        let n = ty.shape.numel();
        let data = match float {
            Float::F32 => DevData::F32(self.pool.take::<f32>(n)?),
            Float::BF16 => DevData::BF16(self.pool.take::<u16>(n)?),
        };
        Ok(self.tensor(ty, data))
    }
}

impl Backend for CudaBackend {
    type Buffer = CudaTensor;

    fn name(&self) -> String {
        format!("cuda:{}", self.ctx.ordinal())
    }

    fn synchronize(&self) -> Result<(), KernelError> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("cuda", "synchronize", e))
    }

    fn alloc(&self, ty: &TensorType) -> Result<CudaTensor, KernelError> {
        let n = ty.shape.numel();
        let mut t = if ty.dtype == DType::NF4 {
            return Err(KernelError::new(
                "alloc",
                "nf4 tensors are not supported on the GPU yet",
            ));
        } else if ty.dtype.is_float() {
            self.alloc_in(ty, Float::of(ty.dtype))?
        } else if ty.dtype == DType::I32 {
            self.tensor(ty, DevData::I32(self.pool.take::<i32>(n)?))
        } else {
            return Err(KernelError::new(
                "alloc",
                format!("{ty}: only f32/bf16/f16 and i32 tensors live on the GPU"),
            ));
        };
        if self.poison {
            match t.data_mut() {
                DevData::I32(s) => self.fill_i32(s, n, i32::MIN)?,
                d => self.fill(d, n, f32::NAN)?,
            }
        }
        Ok(t)
    }

    fn release(&self, buf: CudaTensor) {
        // Dropping hands the buffer to the pool's free list.
        drop(buf);
    }

    fn upload(&self, t: &HostTensor) -> Result<CudaTensor, KernelError> {
        let n = t.ty.shape.numel();
        let bad = || {
            KernelError::new(
                "upload",
                format!(
                    "tensor of type {} holds the wrong kind or number of elements",
                    t.ty
                ),
            )
        };
        let err = |e| cuda_err("upload", &t.ty.to_string(), e);
        let data = match &t.data {
            Data::F32(v) if t.ty.dtype == DType::BF16 && v.len() == n => {
                // Host bf16 tensors hold bf16-representable f32 values, so this is exact.
                let bits: Vec<u16> = v
                    .iter()
                    .map(|&x| half::bf16::from_f32(x).to_bits())
                    .collect();
                let mut s = self.pool.take::<u16>(n)?;
                if n > 0 {
                    self.stream
                        .memcpy_htod(bits.as_slice(), &mut s)
                        .map_err(err)?;
                }
                DevData::BF16(s)
            }
            Data::F32(v) if t.ty.dtype.is_float() && t.ty.dtype != DType::NF4 && v.len() == n => {
                let mut s = self.pool.take::<f32>(n)?;
                if n > 0 {
                    self.stream.memcpy_htod(v.as_slice(), &mut s).map_err(err)?;
                }
                DevData::F32(s)
            }
            Data::I32(v) if t.ty.dtype == DType::I32 && v.len() == n => {
                let mut s = self.pool.take::<i32>(n)?;
                if n > 0 {
                    self.stream.memcpy_htod(v.as_slice(), &mut s).map_err(err)?;
                }
                let mut tensor = self.tensor(&t.ty, DevData::I32(s));
                tensor.host_ints = Some(v.as_slice().into());
                return Ok(tensor);
            }
            _ => return Err(bad()),
        };
        Ok(self.tensor(&t.ty, data))
    }

    fn download(&self, buf: &CudaTensor) -> Result<HostTensor, KernelError> {
        let n = buf.ty.shape.numel();
        let err = |e| cuda_err("download", &buf.ty.to_string(), e);
        let data = match buf.data() {
            DevData::F32(s) => {
                let mut v = vec![0.0f32; n];
                if n > 0 {
                    self.stream
                        .memcpy_dtoh(&s.slice(..n), v.as_mut_slice())
                        .map_err(err)?;
                }
                Data::F32(v)
            }
            DevData::BF16(s) => {
                let mut bits = vec![0u16; n];
                if n > 0 {
                    self.stream
                        .memcpy_dtoh(&s.slice(..n), bits.as_mut_slice())
                        .map_err(err)?;
                }
                // The bits are converted only once the copy has surely landed.
                self.synchronize()?;
                Data::F32(
                    bits.into_iter()
                        .map(|b| half::bf16::from_bits(b).to_f32())
                        .collect(),
                )
            }
            DevData::I32(s) => {
                let mut v = vec![0i32; n];
                if n > 0 {
                    self.stream
                        .memcpy_dtoh(&s.slice(..n), v.as_mut_slice())
                        .map_err(err)?;
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

    /// A reshape of a value that dies at the reshape relabels its buffer (no copy kernel);
    /// everything else runs out of place.
    fn execute_in_place(
        &self,
        op: &qplc_ops::Op,
        target: usize,
        mut buf: CudaTensor,
        others: &[&CudaTensor],
        out_ty: &TensorType,
    ) -> Result<InPlace<CudaTensor>, KernelError> {
        let relabel = matches!(op, qplc_ops::Op::Reshape { .. })
            && target == 0
            && others.is_empty()
            && buf.ty.dtype == out_ty.dtype
            && buf.ty.shape.numel() == out_ty.shape.numel();
        if !relabel {
            return Ok(InPlace::Declined(buf));
        }
        // Same values in the same order: the host copy of integers still holds; the attention
        // statistics belong to the attention output only.
        buf.ty = out_ty.clone();
        buf.attn_lse = None;
        Ok(InPlace::Done(buf))
    }
}
