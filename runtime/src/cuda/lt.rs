//! Products with an accumulated operand, `d = op(a)·op(b) + c`, through cuBLASLt: the
//! `accumulate` pass turns `Add(p, MatMul(a, b))` into `MatMul(a, b, p)`, and cuBLASLt adds
//! `c` in the GEMM's epilogue (f32, before the one rounding to the output type) and reads it
//! from its own buffer — cuBLAS's `GemmEx` would need `c` copied into `d` first.
//!
//! Row-major operands are read as their column-major transposes, as in `gemm.rs`:
//! `dᵀ = op(b)ᵀ·op(a)ᵀ + cᵀ`. Descriptors, layouts and the heuristic's algorithm are built
//! once per shape (a training step repeats the same products) and kept.
use super::gemm::{Elem, Product};
use super::{cuda_err, CudaBackend};
use crate::backend::KernelError;
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// Workspace NVIDIA recommends for Hopper (32 MiB; 4 MiB before).
const WORKSPACE: usize = 32 << 20;

/// A cuBLASLt handle, its workspace, and the plans of the shapes seen so far.
pub(crate) struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<Key, Plan>>,
}

// SAFETY: the handle and the descriptors are only used on the backend's one stream, under
// the plans' lock or by `&self` calls that cuBLASLt documents as thread-safe per handle.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

/// Everything about a product that its descriptors depend on.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    ta: bool,
    tb: bool,
    m: usize,
    k: usize,
    n: usize,
    lda: usize,
    ldb: usize,
    batch: usize,
    stride_a: usize,
    stride_b: usize,
    bf16: bool,
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    /// cuBLAS's A (our `b`), B (our `a`), and C = D.
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by `Lt::plan` and destroyed once, here.
        unsafe {
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.lock().map(|mut p| p.clear()).ok();
        // SAFETY: created in `Lt::new`; no plan refers to it any more.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

impl Lt {
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<Lt, KernelError> {
        let handle = lt::create_handle().map_err(|e| cuda_err("cublasLt", "init", e))?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE)
            .map_err(|e| cuda_err("cublasLt", "workspace", e))?;
        Ok(Lt {
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
        })
    }

    fn plan(&self, name: &'static str, key: &Key) -> Result<Plan, KernelError> {
        let err = |what: &'static str| move |e| cuda_err(name, what, e);
        let ty = if key.bf16 {
            sys::cudaDataType_t::CUDA_R_16BF
        } else {
            sys::cudaDataType_t::CUDA_R_32F
        };
        let op = |t: bool| {
            if t {
                cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        // True f32 accumulation and scaling: no TF32 for f32 operands (`gemm.rs`).
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(err("cuBLASLt descriptor"))?;
        let mut plan = Plan {
            desc,
            layouts: [std::ptr::null_mut(); 3],
            algo: unsafe { std::mem::zeroed() },
        };
        let (ta, tb) = (op(key.tb), op(key.ta));
        // SAFETY: the attribute buffers are the sizes the attributes take.
        unsafe {
            for (attr, v) in [
                (
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    &ta,
                ),
                (
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                    &tb,
                ),
            ] {
                lt::set_matmul_desc_attribute(
                    desc,
                    attr,
                    v as *const _ as *const c_void,
                    std::mem::size_of::<cudarc::cublas::sys::cublasOperation_t>(),
                )
                .map_err(err("cuBLASLt transpose"))?;
            }
        }
        // Stored shapes (rows, cols, ld) column-major: our b is cuBLAS's A, our a its B.
        let (m, n, k) = (key.n as u64, key.m as u64, key.k as u64);
        let a_rc = if key.tb { (k, m) } else { (m, k) };
        let b_rc = if key.ta { (n, k) } else { (k, n) };
        let shapes = [
            (a_rc, key.ldb, key.stride_b),
            (b_rc, key.lda, key.stride_a),
            ((m, n), key.n, key.m * key.n),
        ];
        for (slot, ((rows, cols), ld, stride)) in shapes.into_iter().enumerate() {
            let l = lt::create_matrix_layout(ty, rows, cols, ld as i64)
                .map_err(err("cuBLASLt layout"))?;
            plan.layouts[slot] = l;
            if key.batch > 1 {
                let (count, stride) = (key.batch as i32, stride as i64);
                // SAFETY: i32 count and i64 stride, as the attributes take.
                unsafe {
                    lt::set_matrix_layout_attribute(
                        l,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        &count as *const i32 as *const c_void,
                        4,
                    )
                    .map_err(err("cuBLASLt batch"))?;
                    lt::set_matrix_layout_attribute(
                        l,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        &stride as *const i64 as *const c_void,
                        8,
                    )
                    .map_err(err("cuBLASLt batch"))?;
                }
            }
        }
        let pref = lt::create_matmul_pref().map_err(err("cuBLASLt preference"))?;
        let ws = WORKSPACE as u64;
        // SAFETY: the preference, descriptor and layouts were created above and are live.
        let heuristic = unsafe {
            let set = lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            );
            let h = set.and_then(|_| {
                lt::get_matmul_algo_heuristic(
                    self.handle,
                    desc,
                    plan.layouts[0],
                    plan.layouts[1],
                    plan.layouts[2],
                    plan.layouts[2],
                    pref,
                )
            });
            let _ = lt::destroy_matmul_pref(pref);
            h.map_err(err("cuBLASLt heuristic (no algorithm for this product)"))?
        };
        plan.algo = heuristic.algo;
        Ok(plan)
    }
}

impl CudaBackend {
    /// `d = op(a)·op(b) + c` (all of element type `e`, `c` and `d` of the product's shape,
    /// distinct buffers), summed in f32 and rounded once to `e`. `p.k > 0`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_accumulate<T>(
        &self,
        name: &'static str,
        p: &Product,
        e: Elem,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        c: &CudaSlice<T>,
        d: &mut CudaSlice<T>,
    ) -> Result<(), KernelError> {
        let lt = self.lt()?;
        let key = Key {
            ta: p.ta,
            tb: p.tb,
            m: p.m,
            k: p.k,
            n: p.n,
            lda: p.lda,
            ldb: p.ldb,
            batch: p.batch,
            stride_a: p.stride_a,
            stride_b: p.stride_b,
            bf16: matches!(e, Elem::BF16),
        };
        let mut plans = lt
            .plans
            .lock()
            .map_err(|_| KernelError::new(name, "cuBLASLt plan cache poisoned"))?;
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(lt.plan(name, &key)?),
        };
        let (alpha, beta) = (1.0f32, 1.0f32);
        let (pa, _ra) = a.device_ptr(&self.stream);
        let (pb, _rb) = b.device_ptr(&self.stream);
        let (pc, _rc) = c.device_ptr(&self.stream);
        let (pd, _rd) = d.device_ptr_mut(&self.stream);
        let (pw, _rw) = lt.workspace.device_ptr(&self.stream);
        // SAFETY: the plan describes these operands (the key is their shape; `Op::infer`
        // checked the buffers against it); alpha and beta are host f32 (scale type 32F).
        unsafe {
            lt::matmul(
                lt.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                pb as *const c_void,
                plan.layouts[0],
                pa as *const c_void,
                plan.layouts[1],
                pc as *const c_void,
                plan.layouts[2],
                pd as *mut c_void,
                plan.layouts[2],
                &plan.algo,
                pw as *mut c_void,
                WORKSPACE,
                self.stream.cu_stream() as *mut _,
            )
        }
        .map_err(|e| cuda_err(name, "cublasLtMatmul", e))
    }
}
