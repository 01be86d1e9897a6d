//! f32 products with a side no longer than a LoRA rank, on kernels of our own (skinny.cu)
//! instead of cuBLAS (notes/CUDA.md, "Skinny f32 products" and "Adapter products on tensor
//! cores").
//!
//! A LoRA step's adapter products are f32 (PEFT's fp32 adapters). cuBLAS's f32 kernels spend
//! 2–3× the time it takes to read the big operand once on them (H200). Three shapes occur,
//! and each gets a kernel that streams its big side through memory once:
//!
//! * small n (`x·Aᵀ`, `g·B`, and the weight gradient `gᵀ·h`): C[m, n≤64] read from a big
//!   A[m, k]; the k-range is split across blocks when the rows alone do not fill the GPU,
//!   and the splits' partial products are added in a fixed order by a second pass (no
//!   atomics: the same bits every run);
//! * small m (`hᵀ·x`, the A gradient): the transpose of the above, C written transposed;
//! * small k (`h·Bᵀ`, `dh·A`): an outer-product-like C[m, n] from k ≤ 64, bound by writing C.
//!
//! Arithmetic: a bf16 big operand (the LoRA step's x and gradients) and the small-k product
//! run on bf16 tensor cores, each f32 operand split into three bf16 parts (3 MMAs a term
//! with a bf16 operand, 6 with two f32 ones): f32-accurate (checked against the CPU at
//! `check_skinny::TC_TOL`), not TF32. An f32 big operand (f32 training) runs one FMA a term.
use super::gemm::Product;
use super::launch::launch;
use super::{cuda_err, CudaBackend};
use crate::backend::KernelError;
use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
use cudarc::driver::{CudaContext, CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

const SOURCE: &str = include_str!("skinny.cu");

/// Every kernel of skinny.cu.
pub const KERNEL_NAMES: &[&str] = &[
    "skinny_rows16",
    "skinny_rows32",
    "skinny_rows64",
    "skinny_cols16",
    "skinny_cols32",
    "skinny_cols64",
    "skinny_rows16_bf16",
    "skinny_rows32_bf16",
    "skinny_rows64_bf16",
    "skinny_cols16_bf16",
    "skinny_cols32_bf16",
    "skinny_cols64_bf16",
    "skinny_rows16_bf16_fma",
    "skinny_rows32_bf16_fma",
    "skinny_rows64_bf16_fma",
    "skinny_cols16_bf16_fma",
    "skinny_cols32_bf16_fma",
    "skinny_cols64_bf16_fma",
    "skinny_sum_splits",
    "skinny_outer",
    "skinny_outer_fma",
];

/// The longest side a product may have to run here (the largest LoRA rank we tile for).
pub(crate) const SMALL: usize = 64;
/// Rows of C one small-n block owns, and the k-step of its tiles (`SK_BM`, `SK_BK`).
const ROWS_PER_BLOCK: usize = 128;
const K_TILE: usize = 32;
/// A split sums at least this many k, so that its partial product (written and read back
/// once) stays small beside the slice of the big operand it reads.
const MIN_SPLIT_K: usize = 4 * K_TILE;
/// Blocks a split product aims for where the occupancy was not measured (a guess: four
/// blocks on each of an H200's 132 multiprocessors).
const DEFAULT_RESIDENT: usize = 4 * 132;
/// The small-k tile of C (`OK_BM` × `OK_BN`, 128 threads).
const OUTER_TILE: usize = 64;
/// Most blocks along a grid's y and z axes.
const MAX_GRID_YZ: usize = 65_535;

/// Compiles skinny.cu for `arch`; needs only libnvrtc, so it is tested without a GPU.
pub fn compile_skinny_kernels(arch: &'static str) -> Result<cudarc::nvrtc::Ptx, KernelError> {
    super::nvrtc_cache::compile(SOURCE, arch, "skinny.cu")
}

/// Shared memory of a small-n kernel: `stages` pipeline stages of an A tile (128 rows × 32
/// k in the big operand's element type, rows padded by 16 bytes: `Stage` in skinny.cu) and
/// an f32 B tile (32 k × `nb`, rows padded by 4 floats in the tensor-core kernels). The
/// kernel traps if a launch brings less.
fn small_n_smem_bytes(kmajor: bool, nb: usize, stages: usize, big_bf16: bool) -> usize {
    let elem = if big_bf16 { 2 } else { 4 };
    let pad = 16 / elem;
    let a_tile = if kmajor {
        K_TILE * (ROWS_PER_BLOCK + pad)
    } else {
        ROWS_PER_BLOCK * (K_TILE + pad)
    };
    let b_row = if big_bf16 { nb + 4 } else { nb };
    stages * (a_tile * elem + K_TILE * b_row * std::mem::size_of::<f32>())
}

/// A small-n kernel: its name, whether the big operand is staged k-major, tile width,
/// whether the big operand is bf16, and whether it sums with FMAs (the f32 kernels, and the
/// bf16 ones the timing checks compare the tensor-core kernels with).
struct SmallN {
    name: &'static str,
    kmajor: bool,
    nb: usize,
    big_bf16: bool,
    fma: bool,
}

const fn small_n(name: &'static str, kmajor: bool, nb: usize, big_bf16: bool, fma: bool) -> SmallN {
    SmallN {
        name,
        kmajor,
        nb,
        big_bf16,
        fma,
    }
}

const SMALL_N_KERNELS: [SmallN; 18] = [
    small_n("skinny_rows16", false, 16, false, true),
    small_n("skinny_rows32", false, 32, false, true),
    small_n("skinny_rows64", false, 64, false, true),
    small_n("skinny_cols16", true, 16, false, true),
    small_n("skinny_cols32", true, 32, false, true),
    small_n("skinny_cols64", true, 64, false, true),
    small_n("skinny_rows16_bf16", false, 16, true, false),
    small_n("skinny_rows32_bf16", false, 32, true, false),
    small_n("skinny_rows64_bf16", false, 64, true, false),
    small_n("skinny_cols16_bf16", true, 16, true, false),
    small_n("skinny_cols32_bf16", true, 32, true, false),
    small_n("skinny_cols64_bf16", true, 64, true, false),
    small_n("skinny_rows16_bf16_fma", false, 16, true, true),
    small_n("skinny_rows32_bf16_fma", false, 32, true, true),
    small_n("skinny_rows64_bf16_fma", false, 64, true, true),
    small_n("skinny_cols16_bf16_fma", true, 16, true, true),
    small_n("skinny_cols32_bf16_fma", true, 32, true, true),
    small_n("skinny_cols64_bf16_fma", true, 64, true, true),
];

/// Pipeline depths a small-n kernel runs with (`stages` in skinny.cu), and the default: on
/// the H200 a third or fourth stage gained nothing (within ±3% at [4096, 4096], up to 13%
/// slower at [4096, 14336], where it costs resident blocks; notes/CUDA.md), so the kernels
/// are not waiting on memory latency.
const STAGES: std::ops::RangeInclusive<usize> = 2..=4;
const DEFAULT_STAGES: usize = 2;

/// How many blocks of a small-n kernel (by name and stages) the GPU holds at once: the
/// k-splits fill one wave (a second, partly filled wave would double the time). Measured
/// when the first backend loads the kernels; a process drives one kind of GPU.
static RESIDENT: OnceLock<HashMap<(&'static str, usize), usize>> = OnceLock::new();

/// Loads the compiled module, sizes the small-n kernels' shared memory, and adds every
/// kernel to the backend's table (`launch!` finds them by name like kernels.cu's).
pub(crate) fn load(
    ctx: &Arc<CudaContext>,
    ptx: cudarc::nvrtc::Ptx,
    funcs: &mut HashMap<String, CudaFunction>,
) -> Result<(), KernelError> {
    let module = ctx
        .load_module(ptx)
        .map_err(|e| cuda_err("cuda", "loading skinny.cu", e))?;
    let sms = ctx
        .attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| cuda_err("cuda", "multiprocessor count", e))?
        .max(1) as usize;
    let mut resident = HashMap::new();
    for name in KERNEL_NAMES {
        let f = module
            .load_function(name)
            .map_err(|e| cuda_err("cuda", &format!("kernel `{name}`"), e))?;
        // (stages, shared memory) pairs a small-n kernel may be launched with.
        let sizes: Vec<(usize, usize)> = match SMALL_N_KERNELS.iter().find(|k| k.name == *name) {
            Some(k) => STAGES
                .map(|st| (st, small_n_smem_bytes(k.kmajor, k.nb, st, k.big_bf16)))
                .collect(),
            None => Vec::new(),
        };
        if let Some(most) = sizes.iter().map(|v| v.1).max() {
            f.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, most as i32)
                .map_err(|e| {
                    cuda_err("cuda", &format!("{name}: {most} bytes of shared memory"), e)
                })?;
        }
        for (variant, smem) in sizes {
            let per_sm = f
                .occupancy_max_active_blocks_per_multiprocessor(128, smem, None)
                .map_err(|e| cuda_err("cuda", &format!("{name}: occupancy"), e))?;
            resident.insert((*name, variant), sms * per_sm.max(1) as usize);
        }
        funcs.insert(name.to_string(), f);
    }
    let _ = RESIDENT.set(resident);
    Ok(())
}

/// Blocks of `kernel` run with `stages` the GPU holds at once; a guess where unmeasured.
fn resident(kernel: &'static str, stages: usize) -> usize {
    RESIDENT
        .get()
        .and_then(|r| r.get(&(kernel, stages)).copied())
        .unwrap_or(DEFAULT_RESIDENT)
}

/// Knobs of the kernels, for the timing checks: blocks a split product aims for (default:
/// one wave), pipeline stages (default `DEFAULT_STAGES`), and `fma`: sum with one FMA a term
/// where the default is the tensor cores (a bf16 big operand, the small-k product).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Tuning {
    pub blocks: Option<usize>,
    pub stages: Option<usize>,
    pub fma: bool,
}

/// `struct SkinnyArgs` of skinny.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SkinnyArgs {
    m: i64,
    n: i64,
    k: i64,
    kslice: i64,
    sa_i: i64,
    sa_p: i64,
    sb_p: i64,
    sb_j: i64,
    sc_i: i64,
    sc_j: i64,
    batch_a: i64,
    batch_b: i64,
    batch_c: i64,
    split_c: i64,
    stages: i64,
}

// SAFETY: plain `#[repr(C)]` 8-byte integers, laid out as the C struct.
unsafe impl DeviceRepr for SkinnyArgs {}

/// Which kernel family runs a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// k ≤ `SMALL`: `skinny_outer`.
    Outer,
    /// n ≤ `SMALL`: `skinny_rows*` / `skinny_cols*` on `a` as the big operand.
    SmallN,
    /// m ≤ `SMALL`: the same kernels on the transpose, `b` as the big operand.
    SmallM,
}

/// The kernel family for an f32 product, or `None` where cuBLAS runs it (no side small,
/// or a grid beyond the kernels' launch limits).
pub(crate) fn route(p: &Product) -> Option<Route> {
    let r = if p.k <= SMALL && p.k <= p.m.min(p.n) {
        Route::Outer
    } else if p.n <= SMALL && p.n <= p.m {
        Route::SmallN
    } else if p.m <= SMALL {
        Route::SmallM
    } else {
        return None;
    };
    let fits = p.batch <= MAX_GRID_YZ
        && match r {
            Route::Outer => p.m.div_ceil(OUTER_TILE) <= MAX_GRID_YZ,
            Route::SmallN | Route::SmallM => true,
        };
    fits.then_some(r)
}

/// One small-n product in the kernels' terms: C(i, j) = Σ_p A(i, p)·B(p, j) with element
/// strides, `m` the long side of C.
fn small_n_args(p: &Product, route: Route) -> SkinnyArgs {
    // Row-major storage: op(a)(i, p) is a[i·lda + p], or a[p·lda + i] when stored transposed.
    let (sa_i, sa_p) = if p.ta { (1, p.lda) } else { (p.lda, 1) };
    let (sb_p, sb_j) = if p.tb { (1, p.ldb) } else { (p.ldb, 1) };
    let (sa_i, sa_p, sb_p, sb_j) = (sa_i as i64, sa_p as i64, sb_p as i64, sb_j as i64);
    let (m, n, k) = (p.m as i64, p.n as i64, p.k as i64);
    let (stride_a, stride_b) = (p.stride_a as i64, p.stride_b as i64);
    let mut s = SkinnyArgs {
        k,
        batch_c: m * n,
        ..Default::default()
    };
    if route == Route::SmallM {
        // Cᵀ = op(b)ᵀ·op(a)ᵀ: op(b)ᵀ(i, p) = op(b)(p, i), and Cᵀ(i, j) = C(j, i) = c[j·n + i].
        (s.m, s.n) = (n, m);
        (s.sa_i, s.sa_p, s.sb_p, s.sb_j) = (sb_j, sb_p, sa_p, sa_i);
        (s.sc_i, s.sc_j) = (1, n);
        (s.batch_a, s.batch_b) = (stride_b, stride_a);
    } else {
        (s.m, s.n) = (m, n);
        (s.sa_i, s.sa_p, s.sb_p, s.sb_j) = (sa_i, sa_p, sb_p, sb_j);
        (s.sc_i, s.sc_j) = (n, 1);
        (s.batch_a, s.batch_b) = (stride_a, stride_b);
    }
    s
}

/// How many k-splits a small-n product of `rows` (times `batch`) gets, and the k-range of
/// each: as many as keep all blocks within `target` (one wave), each split at least
/// `MIN_SPLIT_K` long.
fn splits(rows: usize, batch: usize, k: usize, target: usize) -> (usize, usize) {
    let tiles = rows.div_ceil(ROWS_PER_BLOCK) * batch;
    let most = k.div_ceil(MIN_SPLIT_K).max(1);
    let want = (target / tiles).clamp(1, most);
    let kslice = k.div_ceil(want).div_ceil(K_TILE).max(1) * K_TILE;
    (k.div_ceil(kslice).max(1), kslice)
}

impl CudaBackend {
    /// Runs an f32 product `route` accepted: `a`, `b`, `c` are device pointers to f32
    /// buffers laid out as `p` describes (`c` row-major [batch, m, n]), except that with
    /// `big_bf16` the big operand (`a`, or `b` on `Route::SmallM`) holds bf16 values (the
    /// tensor-core kernels: f32-accurate, not the bits of the f32 kernels on a widened copy).
    /// `tuning` overrides the small-n kernels' defaults (the timing checks).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn skinny_gemm(
        &self,
        name: &'static str,
        p: &Product,
        route: Route,
        a: u64,
        b: u64,
        c: u64,
        big_bf16: bool,
        tuning: Tuning,
    ) -> Result<(), KernelError> {
        if route == Route::Outer {
            if big_bf16 {
                return Err(KernelError::new(
                    name,
                    "the small-k kernel takes f32 operands only",
                ));
            }
            let (s, cfg) = outer_launch(name, p)?;
            if tuning.fma {
                return launch!(self, "skinny_outer_fma", cfg; &a, &b, &c, &s);
            }
            return launch!(self, "skinny_outer", cfg; &a, &b, &c, &s);
        }
        let mut s = small_n_args(p, route);
        let (rows, cols) = (s.m as usize, s.n as usize);
        // Which axis of the big operand is contiguous decides how its tiles are staged.
        let kmajor = s.sa_p != 1;
        let nb = match cols {
            0..=16 => 16,
            17..=32 => 32,
            _ => 64,
        };
        // f32 big operands have FMA kernels only.
        let fma = tuning.fma || !big_bf16;
        let kernel = SMALL_N_KERNELS
            .iter()
            .find(|k| k.kmajor == kmajor && k.nb == nb && k.big_bf16 == big_bf16 && k.fma == fma)
            .map(|k| k.name)
            .ok_or_else(|| KernelError::new(name, "no small-n kernel for this shape"))?;
        // The tensor-core kernels too: 3 or 4 stages were no faster on the H200
        // (notes/CUDA.md, "Adapter products on tensor cores").
        let stages = tuning.stages.unwrap_or(DEFAULT_STAGES);
        if !STAGES.contains(&stages) {
            return Err(KernelError::new(
                name,
                format!("{stages} pipeline stages asked for; the kernels run {STAGES:?}"),
            ));
        }
        let target = tuning.blocks.unwrap_or_else(|| resident(kernel, stages));
        let (nsplit, kslice) = splits(rows, p.batch, p.k, target);
        s.kslice = kslice as i64;
        s.stages = stages as i64;
        let cfg = LaunchConfig {
            grid_dim: (
                grid_x(name, rows.div_ceil(ROWS_PER_BLOCK))?,
                nsplit as u32,
                p.batch as u32,
            ),
            block_dim: (ROWS_PER_BLOCK as u32, 1, 1),
            shared_mem_bytes: small_n_smem_bytes(kmajor, nb, stages, big_bf16) as u32,
        };
        // The small-m product runs as its transpose, on `b` as the big operand.
        let (big, small) = if route == Route::SmallM {
            (b, a)
        } else {
            (a, b)
        };
        let f = self.func(kernel)?;
        let run = |out: u64, s: &SkinnyArgs| {
            let mut l = self.stream.launch_builder(f);
            l.arg(&big).arg(&small).arg(&out).arg(s);
            // SAFETY: the arguments follow `skinny_body`'s signature; the strides and
            // extents come from `p`, which `Op::infer` checked against the buffers, and
            // `out` holds `nsplit` results of `batch·m·n` elements.
            unsafe { l.launch(cfg) }
                .map(|_| ())
                .map_err(|e| cuda_err(name, "skinny kernel launch", e))
        };
        if nsplit == 1 {
            return run(c, &s);
        }
        let total = p.batch * p.m * p.n;
        let mut part = self.scratch::<f32>(nsplit * total)?;
        s.split_c = total as i64;
        let part_ptr = {
            use cudarc::driver::DevicePtrMut;
            let (ptr, _rec) = part.device_ptr_mut(&self.stream);
            ptr
        };
        run(part_ptr, &s)?;
        let (tt, ns) = (total as i64, nsplit as i64);
        let part: &cudarc::driver::CudaSlice<f32> = &part;
        launch!(self, "skinny_sum_splits", total; part, &c, &tt, &ns)
    }
}

/// Arguments and grid of a small-k product (`skinny_outer`, or a generated kernel built on
/// skinny.cu's `outer_tile`: 128 threads, a 64 × 64 tile of C per block, row-major C).
pub(crate) fn outer_launch(
    name: &'static str,
    p: &Product,
) -> Result<(SkinnyArgs, LaunchConfig), KernelError> {
    let (sa_i, sa_p) = if p.ta { (1, p.lda) } else { (p.lda, 1) };
    let (sb_p, sb_j) = if p.tb { (1, p.ldb) } else { (p.ldb, 1) };
    let s = SkinnyArgs {
        m: p.m as i64,
        n: p.n as i64,
        k: p.k as i64,
        kslice: p.k as i64,
        sa_i: sa_i as i64,
        sa_p: sa_p as i64,
        sb_p: sb_p as i64,
        sb_j: sb_j as i64,
        sc_i: p.n as i64,
        sc_j: 1,
        batch_a: p.stride_a as i64,
        batch_b: p.stride_b as i64,
        batch_c: (p.m * p.n) as i64,
        split_c: 0,
        // skinny_outer stages all of k at once; no pipeline.
        stages: 0,
    };
    let cfg = LaunchConfig {
        grid_dim: (
            grid_x(name, p.n.div_ceil(OUTER_TILE))?,
            p.m.div_ceil(OUTER_TILE) as u32,
            p.batch as u32,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((s, cfg))
}

/// skinny.cu's `outer_tile` and what it needs, for generated kernels.
pub(crate) fn outer_tile_source() -> &'static str {
    let begin = SOURCE
        .find("// OUTER_TILE_BEGIN")
        .expect("skinny.cu has the OUTER_TILE_BEGIN mark");
    let end = SOURCE
        .find("// OUTER_TILE_END")
        .expect("skinny.cu has the OUTER_TILE_END mark");
    &SOURCE[begin..end]
}

/// A grid's x extent as the launch takes it.
fn grid_x(name: &'static str, blocks: usize) -> Result<u32, KernelError> {
    u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| KernelError::new(name, format!("{blocks} blocks exceed the grid limit")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_products_take_the_kernel_of_their_small_side() {
        // x·Aᵀ, g·B, gᵀ·h: n is the rank.
        assert_eq!(
            route(&Product::dense(false, true, 4096, 4096, 16)),
            Some(Route::SmallN)
        );
        assert_eq!(
            route(&Product::dense(false, false, 4096, 14336, 16)),
            Some(Route::SmallN)
        );
        assert_eq!(
            route(&Product::dense(true, false, 1024, 4096, 16)),
            Some(Route::SmallN)
        );
        // hᵀ·x: m is the rank.
        assert_eq!(
            route(&Product::dense(true, false, 16, 4096, 4096)),
            Some(Route::SmallM)
        );
        // h·Bᵀ and dh·A: k is the rank.
        assert_eq!(
            route(&Product::dense(false, true, 4096, 16, 14336)),
            Some(Route::Outer)
        );
        assert_eq!(
            route(&Product::dense(false, false, 4096, 16, 4096)),
            Some(Route::Outer)
        );
    }

    #[test]
    fn square_products_stay_on_cublas() {
        assert_eq!(route(&Product::dense(false, true, 4096, 4096, 4096)), None);
        assert_eq!(route(&Product::dense(false, false, 65, 65, 65)), None);
    }

    #[test]
    fn k_is_split_into_tile_multiples_that_cover_it_once() {
        for (rows, k, target) in [
            (4096, 4096, 528),
            (1024, 4096, 528),
            (16, 14336, 528),
            (4096, 70, 528),
            (128, 33, 1),
        ] {
            let (n, slice) = splits(rows, 1, k, target);
            assert_eq!(slice % K_TILE, 0);
            assert!(
                n * slice >= k && (n - 1) * slice < k,
                "{rows} {k}: {n}×{slice}"
            );
        }
        // One wave: never more blocks than the target once k is split.
        let (n, _) = splits(4096, 1, 14336, 660);
        assert!(n * 32 <= 660 && n > 1);
        // The rows alone fill the GPU: no split.
        assert_eq!(splits(4096 * 128, 1, 4096, 660).0, 1);
    }
}
