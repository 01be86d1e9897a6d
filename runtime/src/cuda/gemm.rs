//! Matrix products through cuBLAS `GemmEx`: f32 operands as true f32 (`CUBLAS_COMPUTE_32F`
//! in the default math mode, so no TF32), bf16 operands on the tensor cores with f32
//! accumulation, the result written as bf16 (rounded once by cuBLAS, to nearest even) or
//! as f32 when a bias is still to be added before the one rounding.
//!
//! Row-major operands are read as their column-major transposes: `c = op(a)·op(b)` is
//! computed as `cᵀ = op(b)ᵀ·op(a)ᵀ`.
//!
//! f32 products with a side of at most a LoRA rank (`skinny::SMALL`) run on skinny.cu's
//! kernels instead, f32-accurate (`skinny.rs` says why and how). Products with an
//! accumulated operand run through cuBLASLt (`lt.rs`).
use super::skinny::{self, Route, Tuning};
use super::{cuda_err, CudaBackend};
use crate::backend::KernelError;
use cudarc::cublas::result::{gemm_ex, gemm_strided_batched_ex};
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use std::ffi::c_void;

/// Shape of a (batched) row-major product `c[m, n] = op(a)[m, k] · op(b)[k, n]`.
pub(crate) struct Product {
    /// Whether `a` / `b` are stored transposed.
    pub ta: bool,
    pub tb: bool,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// Row lengths of `a` and `b` as stored.
    pub lda: usize,
    pub ldb: usize,
    pub batch: usize,
    /// Elements between consecutive matrices of `a` and `b`.
    pub stride_a: usize,
    pub stride_b: usize,
}

impl Product {
    /// One unbatched product of densely stored operands (`a` as [m, k], or [k, m] with `ta`;
    /// `b` as [k, n], or [n, k] with `tb`).
    pub(crate) fn dense(ta: bool, tb: bool, m: usize, k: usize, n: usize) -> Product {
        Product {
            ta,
            tb,
            m,
            k,
            n,
            lda: if ta { m } else { k },
            ldb: if tb { k } else { n },
            batch: 1,
            stride_a: m * k,
            stride_b: k * n,
        }
    }
}

/// Element type of an operand or result.
#[derive(Clone, Copy)]
pub(crate) enum Elem {
    F32,
    BF16,
}

impl Elem {
    fn cuda(self) -> cudaDataType_t {
        match self {
            Elem::F32 => cudaDataType_t::CUDA_R_32F,
            Elem::BF16 => cudaDataType_t::CUDA_R_16BF,
        }
    }
}

/// Which implementation runs a product: `Auto` picks; the others are for the timing checks,
/// which compare both on the same operands.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Engine {
    Auto,
    Cublas,
    /// skinny.cu where it applies (cuBLAS otherwise), with the small-n kernels' knobs.
    Skinny(Tuning),
}

impl CudaBackend {
    /// Runs the product; `ab` is the operands' element type, `ce` the result's. The caller
    /// has handled empty extents (`k == 0` leaves `c` for it to zero).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm<T, U>(
        &self,
        name: &'static str,
        p: &Product,
        ab: Elem,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        ce: Elem,
        c: &mut CudaSlice<U>,
    ) -> Result<(), KernelError> {
        self.gemm_with(Engine::Auto, name, p, ab, a, b, ce, c)
    }

    /// `gemm` on the engine `engine` names.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_with<T, U>(
        &self,
        engine: Engine,
        name: &'static str,
        p: &Product,
        ab: Elem,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        ce: Elem,
        c: &mut CudaSlice<U>,
    ) -> Result<(), KernelError> {
        let skinny = match (ab, ce, engine) {
            (Elem::F32, Elem::F32, Engine::Auto) => {
                skinny::route(p).map(|r| (r, Tuning::default()))
            }
            (Elem::F32, Elem::F32, Engine::Skinny(t)) => skinny::route(p).map(|r| (r, t)),
            _ => None,
        };
        if let Some((route, tuning)) = skinny {
            return self.skinny_product(name, p, route, tuning, a, b, c);
        }
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let int = |v: usize| -> Result<i32, KernelError> {
            i32::try_from(v)
                .map_err(|_| KernelError::new(name, format!("dimension {v} exceeds i32")))
        };
        let (m, n, k) = (int(p.n)?, int(p.m)?, int(p.k)?);
        let (lda, ldb, ldc) = (int(p.ldb)?, int(p.lda)?, int(p.n)?);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let handle = *self.blas.handle();
        let (pa, _ra) = a.device_ptr(&self.stream);
        let (pb, _rb) = b.device_ptr(&self.stream);
        let (pc, _rc) = c.device_ptr_mut(&self.stream);
        let compute = cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        // SAFETY: the extents follow from the operands' shapes, which `Op::infer` has
        // checked against the buffers; alpha and beta are host f32 as COMPUTE_32F needs.
        let r = unsafe {
            if p.batch == 1 {
                gemm_ex(
                    handle,
                    op(p.tb),
                    op(p.ta),
                    m,
                    n,
                    k,
                    &alpha as *const f32 as *const c_void,
                    pb as *const c_void,
                    ab.cuda(),
                    lda,
                    pa as *const c_void,
                    ab.cuda(),
                    ldb,
                    &beta as *const f32 as *const c_void,
                    pc as *mut c_void,
                    ce.cuda(),
                    ldc,
                    compute,
                    algo,
                )
            } else {
                gemm_strided_batched_ex(
                    handle,
                    op(p.tb),
                    op(p.ta),
                    m,
                    n,
                    k,
                    &alpha as *const f32 as *const c_void,
                    pb as *const c_void,
                    ab.cuda(),
                    lda,
                    p.stride_b as i64,
                    pa as *const c_void,
                    ab.cuda(),
                    ldb,
                    p.stride_a as i64,
                    &beta as *const f32 as *const c_void,
                    pc as *mut c_void,
                    ce.cuda(),
                    ldc,
                    (p.m * p.n) as i64,
                    int(p.batch)?,
                    compute,
                    algo,
                )
            }
        };
        r.map_err(|e| cuda_err(name, "cuBLAS GemmEx", e))
    }

    /// An f32 product on skinny.cu (the buffers are f32: `gemm_with` checked the element
    /// types).
    #[allow(clippy::too_many_arguments)]
    fn skinny_product<T, U>(
        &self,
        name: &'static str,
        p: &Product,
        route: Route,
        tuning: Tuning,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        c: &mut CudaSlice<U>,
    ) -> Result<(), KernelError> {
        let (pa, _ra) = a.device_ptr(&self.stream);
        let (pb, _rb) = b.device_ptr(&self.stream);
        let (pc, _rc) = c.device_ptr_mut(&self.stream);
        self.skinny_gemm(name, p, route, pa, pb, pc, false, tuning)
    }

    /// An f32 product whose big operand is held as bf16 (`a_bf16` says which of `a`, `b`
    /// that is), on skinny.cu's bf16 kernels: the f32 operand split into three bf16 parts on
    /// the tensor cores, f32-accurate (not bit-equal to the FMA product of a widened copy),
    /// without the widened copy. `Ok(false)` where no such kernel applies (the caller widens).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_bf16_big<T, U>(
        &self,
        name: &'static str,
        p: &Product,
        a: &CudaSlice<T>,
        b: &CudaSlice<U>,
        a_bf16: bool,
        c: &mut CudaSlice<f32>,
        tuning: Tuning,
    ) -> Result<bool, KernelError> {
        let big_is_a = match skinny::route(p) {
            Some(Route::SmallN) => true,
            Some(Route::SmallM) => false,
            _ => return Ok(false),
        };
        if big_is_a != a_bf16 {
            return Ok(false);
        }
        let route = if big_is_a {
            Route::SmallN
        } else {
            Route::SmallM
        };
        let (pa, _ra) = a.device_ptr(&self.stream);
        let (pb, _rb) = b.device_ptr(&self.stream);
        let (pc, _rc) = c.device_ptr_mut(&self.stream);
        self.skinny_gemm(name, p, route, pa, pb, pc, true, tuning)?;
        Ok(true)
    }
}
