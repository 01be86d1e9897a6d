//! Flash attention for bf16 storage (flash_attn.cu; notes/CUDA.md "Flash attention"): the
//! `Attention` and `AttentionBackward` ops of `qplc_ops` on tensor cores, O(T·d) memory.
//!
//! Operands are bf16 bits (`u16`), row-major: `q [T, nh, d]`, `k`/`v [T, nkv, d]`, output
//! `[T, nh, d]`; the backward writes `dqkv [T, nh + 2·nkv, d]` (dq, dk, dv heads, as the op
//! packs them). `backward` takes the forward's O and log-sum-exp where the caller kept them,
//! else recomputes them (forward kernel into scratch); then `delta = rowsum(dO∘O)` and
//! * by default: one kernel for dQ per query block and one for dK/dV per (key block, query
//!   head of the GQA group);
//! * where `Tiles::one_pass` says so and there is no window: one pass (`flash_bwd_fused`),
//!   one CTA per (key block, query head) producing dK, dV and dQ; dQ is summed over key blocks
//!   in f32 scratch in key-block order, enforced by a counter per (head, query tile).
//!
//! On a compute capability 9.0 device (H100/H200) the module is flash_attn.cu and
//! flash_wgmma.cu compiled together for `sm_90a`, and head dims 33..=128 run the warpgroup-MMA
//! (`wgmma`) forward, dQ and dK/dV kernels instead (same grids' meaning, semantics, numerics and
//! determinism; `WgTiles`); d ≤ 32 and the one-pass backward keep the `mma.sync` kernels.
//!
//! Either way the dK/dV f32 partials of a GQA group's heads are summed by a small kernel in a
//! fixed order; no result depends on the order in which CTAs run (bitwise reproducible).
//!
//! Scratch: `backward` allocates O (bf16, T·nh·d) and lse (f32, nh·T) when it recomputes them,
//! delta (f32, nh·T), with GQA the dK/dV partials (f32, group·T·2·nkv·d = 2·T·nh·d), and on the
//! one-pass path the dQ sums (f32, T·nh·d) and counters (i32, nh·T/64), on the given stream
//! (stream-ordered allocation where the driver has it) and frees them when it returns; the
//! work stays queued on the stream, ordered after the kernels that use it.
use super::cuda_err;
use crate::backend::KernelError;
use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use std::sync::Arc;

/// CUDA C source of the flash attention kernels.
const SOURCE: &str = include_str!("flash_attn.cu");

/// The same followed by the wgmma kernels (which use its helpers), compiled for `sm_90a`:
/// `wgmma.mma_async` exists only there (not on sm_100 or later either).
const SOURCE_SM90A: &str = concat!(
    include_str!("flash_attn.cu"),
    include_str!("flash_wgmma.cu")
);

/// Padded head widths the kernels are instantiated for (`flash_fwd_d{D}` …); a head dim
/// `d ≤ D` runs in the smallest, with columns `d..D` zero-filled.
const WIDTHS: [usize; 3] = [32, 64, 128];

/// Shape and parameters of one attention call (`Op::Attention` / `Op::AttentionBackward`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct AttnDims {
    /// Sequence length (one sequence, no batch axis).
    pub t: usize,
    /// Query heads.
    pub nh: usize,
    /// Key/value heads; `nh % nkv == 0` (query head `h` reads KV head `h / (nh / nkv)`).
    pub nkv: usize,
    /// Head dim.
    pub d: usize,
    /// Score scale, usually `1/√d`.
    pub scale: f32,
    /// Query `i` sees key `j` iff `j ≤ i` and `i − j < window`.
    pub window: Option<usize>,
    /// Scores become `c·tanh(s/c)` after scaling.
    pub softcap: Option<f32>,
}

/// True where the flash kernels compute these dims; elsewhere the caller uses the naive
/// kernels. Needs: `d % 8 == 0` and `8 ≤ d ≤ 128` (16-byte rows, tile widths), `nh % nkv == 0`,
/// sizes that fit the kernels' `int` arithmetic and the grid, a positive finite scale (the forward takes
/// row maxima of unscaled scores) and a positive finite soft-cap, and a window of at least 1.
pub(crate) fn supports(dims: &AttnDims) -> bool {
    let fits = |n: usize| i32::try_from(n).is_ok();
    dims.d.is_multiple_of(8)
        && (8..=128).contains(&dims.d)
        && dims.nkv > 0
        && dims.nh.is_multiple_of(dims.nkv)
        // Index sums such as `first key + tile + window` stay below 2·T + 256 in `int`.
        && fits(2 * dims.t + 256)
        && fits(dims.nh + 2 * dims.nkv)
        // Grids are one-dimensional: (16-row blocks) × heads CTAs, and the dK/dV reduction's
        // 4-element groups of T·2·nkv·d.
        && dims.t.div_ceil(16).checked_mul(dims.nh).is_some_and(fits)
        && dims.t.checked_mul(2 * dims.nkv * dims.d).is_some_and(|n| fits(n.div_ceil(4)))
        && dims.scale.is_finite()
        && dims.scale > 0.0
        && dims.softcap.is_none_or(|c| c.is_finite() && c > 0.0)
        && dims.window != Some(0)
}

/// Launch geometry of one padded width, as the table at the end of flash_attn.cu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tiles {
    /// Padded head width `D`.
    width: usize,
    /// Warps of the forward kernel.
    fwd_warps: usize,
    /// 16-row query groups per forward warp (2: each K/V fragment serves two groups).
    fwd_rows: usize,
    /// Key tile of the forward and dQ kernels.
    bc: usize,
    /// Warps of the backward kernels (16 keys each for dK/dV).
    bwd_warps: usize,
    /// 16-row query groups per dQ warp.
    dq_rows: usize,
    /// Query tile of the dK/dV kernel.
    bq: usize,
    /// Warps of the one-pass backward, 16 keys each.
    fused_warps: usize,
    /// Whether `backward` takes the one-pass kernel where it applies (no window).
    one_pass: bool,
}

/// Query tile of the one-pass backward (its dQ counters are per tile of this many rows).
const FUSED_BQ: usize = 64;

/// Whether the backward without a window takes the one-pass kernel. Measured on an H200
/// (notes/CUDA.md, T = 4096, 32/8 heads, with saved O/lse; ms of the gradient kernels): d = 64
/// one pass 1.35 against 1.32, d = 128 2.39 against 2.39, T = 1024 0.213 against 0.186. It
/// saves two of seven tile products but pays for its ordered dQ additions (0.5 ms at d = 128)
/// and needs T·nh·d f32 more scratch, so the two kernels stay the default; the GPU test runs
/// both.
const ONE_PASS: bool = false;

impl Tiles {
    /// Measured on an H200 (notes/CUDA.md): two row groups per forward warp pay off only at
    /// `D = 128` (1.25×); the instantiations at the end of flash_attn.cu must match.
    fn for_width(width: usize) -> Tiles {
        Tiles {
            width,
            fwd_warps: 4,
            fwd_rows: if width == 128 { 2 } else { 1 },
            bc: 64,
            bwd_warps: 4,
            dq_rows: 1,
            bq: 64,
            fused_warps: if width == 128 { 8 } else { 4 },
            one_pass: ONE_PASS,
        }
    }

    /// Query rows of one forward CTA.
    fn fwd_block(&self) -> usize {
        16 * self.fwd_warps * self.fwd_rows
    }

    /// Query rows of one dQ CTA.
    fn dq_block(&self) -> usize {
        16 * self.bwd_warps * self.dq_rows
    }

    fn of(d: usize) -> Tiles {
        let width = WIDTHS.into_iter().find(|&w| d <= w).unwrap_or(128);
        Self::for_width(width)
    }

    /// Bytes of one tile row in shared memory: `D + 8` bf16 (the 16-byte pad keeps `ldmatrix`
    /// rows on distinct banks).
    fn row_bytes(&self) -> usize {
        (self.width + 8) * 2
    }

    fn fwd_smem(&self) -> usize {
        (self.fwd_block() + 4 * self.bc) * self.row_bytes()
    }

    fn dq_smem(&self) -> usize {
        (2 * self.dq_block() + 4 * self.bc) * self.row_bytes()
    }

    fn dkdv_smem(&self) -> usize {
        (32 * self.bwd_warps + 4 * self.bq) * self.row_bytes() + 16 * self.bq
    }

    /// Keys per CTA of the one-pass backward.
    fn fused_block(&self) -> usize {
        16 * self.fused_warps
    }

    /// K, V (one block each), Q and dO (two tiles each), lse and delta (two tiles each), and
    /// a dSᵀ tile `[keys][FUSED_BQ + 8]` where the dO tile cannot take it (rows too short, or
    /// more keys than queries).
    fn fused_smem(&self) -> usize {
        let bk = self.fused_block();
        let own_ds = if self.width < FUSED_BQ || bk > FUSED_BQ {
            bk * (FUSED_BQ + 8) * 2
        } else {
            0
        };
        (2 * bk + 4 * FUSED_BQ) * self.row_bytes() + 16 * FUSED_BQ + own_ds
    }
}

/// Padded head widths with wgmma kernels (`flash_*_wg_d{D}`): a 64-column tile is the
/// 128-byte swizzle's width, so d ≤ 32 stays on the `mma.sync` kernels.
const WG_WIDTHS: [usize; 2] = [64, 128];

/// Launch geometry of the wgmma kernels of one padded width, as the instantiations at the end
/// of flash_wgmma.cu (which must match). A warpgroup (128 threads) owns 64 query rows (forward,
/// dQ) or 64 keys (dK/dV). Measured on an H200 (notes/CUDA.md, T = 4096, 32/8 heads, causal):
/// more warpgroups per SM (one's softmax overlaps another's products) won wherever the
/// registers allowed — D = 128: forward 2 warpgroups × 2 CTAs/SM with 64-key tiles, 1.18× over
/// 3 warpgroups with 128-key tiles; dQ 3 warpgroups, 1.16× over 2; D = 64: forward and dK/dV
/// one warpgroup per CTA (1.3× and 1.4× over two), dQ two at 2 CTAs/SM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WgTiles {
    /// Padded head width `D`.
    width: usize,
    /// Warpgroups of the forward kernel.
    fwd_groups: usize,
    /// Key tile of the forward kernel.
    fwd_bc: usize,
    /// Warpgroups of the dQ kernel.
    dq_groups: usize,
    /// Key tile of the dQ kernel.
    dq_bc: usize,
    /// Warpgroups of the dK/dV kernel.
    dkdv_groups: usize,
    /// Query tile of the dK/dV kernel.
    bq: usize,
}

impl WgTiles {
    fn for_width(width: usize) -> WgTiles {
        let narrow = width == 64;
        WgTiles {
            width,
            fwd_groups: if narrow { 1 } else { 2 },
            fwd_bc: if narrow { 128 } else { 64 },
            dq_groups: if narrow { 2 } else { 3 },
            dq_bc: 64,
            dkdv_groups: if narrow { 1 } else { 2 },
            bq: 64,
        }
    }

    /// The width for head dim `d`, `None` where the wgmma kernels do not apply.
    fn of(d: usize) -> Option<WgTiles> {
        match d {
            33..=64 => Some(Self::for_width(64)),
            65..=128 => Some(Self::for_width(128)),
            _ => None,
        }
    }

    /// Bytes of one tile row (no padding: the swizzle keeps wgmma's reads conflict-free).
    fn row_bytes(&self) -> usize {
        self.width * 2
    }

    /// The kernels round their shared memory up to the swizzle's 1024-byte period.
    const ALIGN: usize = 1024;

    fn fwd_smem(&self) -> usize {
        Self::ALIGN + (64 * self.fwd_groups + 4 * self.fwd_bc) * self.row_bytes()
    }

    fn dq_smem(&self) -> usize {
        Self::ALIGN + (128 * self.dq_groups + 4 * self.dq_bc) * self.row_bytes()
    }

    fn dkdv_smem(&self) -> usize {
        Self::ALIGN + (128 * self.dkdv_groups + 4 * self.bq) * self.row_bytes() + 16 * self.bq
    }
}

/// The wgmma kernels of one padded width.
struct WgKernels {
    tiles: WgTiles,
    fwd: CudaFunction,
    dq: CudaFunction,
    dkdv: CudaFunction,
}

/// A kernel with its launch geometry: rows (queries or keys) per CTA, threads, shared memory.
struct Launch<'a> {
    f: &'a CudaFunction,
    rows: usize,
    threads: usize,
    smem: usize,
}

/// CTAs that share one key block of the dK/dV kernel: one per query head of the GQA group.
/// Measured on an H200 (notes/CUDA.md, T = 4096, 32/8 heads): against one CTA for the whole
/// group, 1.33× faster at d = 64 and 2.6× at T = 1024, d = 128 (the unsplit grid is a handful
/// of long CTAs per SM), equal at T = 4096, d = 128; the price is the f32 partials scratch and
/// the reduction (≈ 1 % of the kernel there).
fn dkdv_splits(dims: &AttnDims) -> usize {
    dims.nh / dims.nkv
}

/// The kernels of one padded width.
struct WidthKernels {
    tiles: Tiles,
    fwd: CudaFunction,
    dq: CudaFunction,
    dkdv: CudaFunction,
    fused: CudaFunction,
}

/// Flash attention kernels, compiled once for one device.
pub(crate) struct Flash {
    widths: Vec<WidthKernels>,
    /// wgmma kernels (compute capability 9.0 only; else empty).
    wg: Vec<WgKernels>,
    delta: CudaFunction,
    dkdv_reduce: CudaFunction,
}

/// Compiles flash_attn.cu with NVRTC for `arch` (`sm_80`, …), or on `sm_90` flash_attn.cu with
/// flash_wgmma.cu for `sm_90a`; a compile error carries NVRTC's log. Needs only libnvrtc (no
/// GPU).
pub(crate) fn compile_flash(arch: &'static str) -> Result<cudarc::nvrtc::Ptx, KernelError> {
    if has_wgmma(arch) {
        super::nvrtc_cache::compile_with(SOURCE_SM90A, "sm_90a", "flash_wgmma.cu", true)
    } else {
        super::nvrtc_cache::compile_with(SOURCE, arch, "flash_attn.cu", true)
    }
}

/// Whether `arch` has warpgroup MMA: compute capability 9.0 exactly (`wgmma` is an `sm_90a`
/// feature, absent from later architectures).
fn has_wgmma(arch: &str) -> bool {
    arch_number(arch) == Some(90)
}

/// `sm_90` → 90; `None` for a string that is not `sm_<digits>`.
fn arch_number(arch: &str) -> Option<u32> {
    arch.strip_prefix("sm_")?
        .trim_end_matches(['a', 'f'])
        .parse()
        .ok()
}

impl Flash {
    /// Compiles and loads the kernels for `arch` (the device's `sm_XY`) and grants each the
    /// shared memory it needs (up to 105 KiB at `D = 128`). Fails, with a message saying why,
    /// before sm_80 (`mma.sync` with bf16 and `cp.async` need Ampere) or where the device
    /// cannot give that much shared memory to one block.
    pub(crate) fn new(ctx: &Arc<CudaContext>, arch: &'static str) -> Result<Self, KernelError> {
        match arch_number(arch) {
            Some(n) if n >= 80 => {}
            _ => {
                return Err(KernelError::new(
                    "attention",
                    format!(
                        "flash attention needs sm_80 or newer (bf16 tensor cores), the device is {arch}"
                    ),
                ));
            }
        }
        let module = ctx
            .load_module(compile_flash(arch)?)
            .map_err(|e| cuda_err("attention", "loading flash_attn.cu", e))?;
        let load = |name: &str, smem: usize| -> Result<CudaFunction, KernelError> {
            let f = module
                .load_function(name)
                .map_err(|e| cuda_err("attention", &format!("kernel `{name}`"), e))?;
            f.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
                .map_err(|e| {
                    cuda_err(
                        "attention",
                        &format!("kernel `{name}` needs {smem} bytes of shared memory per block"),
                        e,
                    )
                })?;
            Ok(f)
        };
        let mut widths = Vec::new();
        for w in WIDTHS {
            let tiles = Tiles::for_width(w);
            widths.push(WidthKernels {
                tiles,
                fwd: load(&format!("flash_fwd_d{w}"), tiles.fwd_smem())?,
                dq: load(&format!("flash_bwd_dq_d{w}"), tiles.dq_smem())?,
                dkdv: load(&format!("flash_bwd_dkdv_d{w}"), tiles.dkdv_smem())?,
                fused: load(&format!("flash_bwd_fused_d{w}"), tiles.fused_smem())?,
            });
        }
        let mut wg = Vec::new();
        // QPLC_NO_WGMMA=1 keeps a 9.0 device on the mma.sync kernels (A/B timing, or a way
        // around a driver that mishandles sm_90a code).
        if has_wgmma(arch) && std::env::var_os("QPLC_NO_WGMMA").is_none() {
            for w in WG_WIDTHS {
                let tiles = WgTiles::for_width(w);
                wg.push(WgKernels {
                    tiles,
                    fwd: load(&format!("flash_fwd_wg_d{w}"), tiles.fwd_smem())?,
                    dq: load(&format!("flash_bwd_dq_wg_d{w}"), tiles.dq_smem())?,
                    dkdv: load(&format!("flash_bwd_dkdv_wg_d{w}"), tiles.dkdv_smem())?,
                });
            }
        }
        let plain = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| cuda_err("attention", &format!("kernel `{name}`"), e))
        };
        Ok(Flash {
            widths,
            wg,
            delta: plain("flash_bwd_delta")?,
            dkdv_reduce: plain("flash_bwd_dkdv_reduce")?,
        })
    }

    /// The wgmma kernels for head dim `d` where the device has them and they take `d`.
    fn wg_kernels(&self, d: usize) -> Option<&WgKernels> {
        let width = WgTiles::of(d)?.width;
        self.wg.iter().find(|k| k.tiles.width == width)
    }

    /// The forward kernel for head dim `d` with its geometry.
    fn fwd_launch(&self, d: usize) -> Launch<'_> {
        match self.wg_kernels(d) {
            Some(w) => Launch {
                f: &w.fwd,
                rows: 64 * w.tiles.fwd_groups,
                threads: 128 * w.tiles.fwd_groups,
                smem: w.tiles.fwd_smem(),
            },
            None => {
                let k = self.kernels(d);
                Launch {
                    f: &k.fwd,
                    rows: k.tiles.fwd_block(),
                    threads: 32 * k.tiles.fwd_warps,
                    smem: k.tiles.fwd_smem(),
                }
            }
        }
    }

    /// The dQ and dK/dV kernels of the two-kernel backward for head dim `d`.
    fn bwd_launches(&self, d: usize) -> (Launch<'_>, Launch<'_>) {
        match self.wg_kernels(d) {
            Some(w) => (
                Launch {
                    f: &w.dq,
                    rows: 64 * w.tiles.dq_groups,
                    threads: 128 * w.tiles.dq_groups,
                    smem: w.tiles.dq_smem(),
                },
                Launch {
                    f: &w.dkdv,
                    rows: 64 * w.tiles.dkdv_groups,
                    threads: 128 * w.tiles.dkdv_groups,
                    smem: w.tiles.dkdv_smem(),
                },
            ),
            None => {
                let k = self.kernels(d);
                let t = k.tiles;
                (
                    Launch {
                        f: &k.dq,
                        rows: t.dq_block(),
                        threads: 32 * t.bwd_warps,
                        smem: t.dq_smem(),
                    },
                    Launch {
                        f: &k.dkdv,
                        rows: 16 * t.bwd_warps,
                        threads: 32 * t.bwd_warps,
                        smem: t.dkdv_smem(),
                    },
                )
            }
        }
    }

    fn kernels(&self, d: usize) -> &WidthKernels {
        let width = Tiles::of(d).width;
        self.widths
            .iter()
            .find(|k| k.tiles.width == width)
            .unwrap_or(&self.widths[self.widths.len() - 1])
    }

    /// `out = softmax(mask(cap(scale·q·kᵀ)))·v` per head, bf16 in and out, f32 inside.
    /// With `lse` (f32, `nh·T`), also the rows' log-sum-exp in the kernels' units, which
    /// `backward` takes back with `out` instead of running this forward again.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        stream: &Arc<CudaStream>,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
        v: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
        lse: Option<&mut CudaSlice<f32>>,
        dims: &AttnDims,
    ) -> Result<(), KernelError> {
        let op = "attention";
        check(
            op,
            dims,
            &[
                ("q", q.len(), dims.nh),
                ("k", k.len(), dims.nkv),
                ("v", v.len(), dims.nkv),
                ("out", out.len(), dims.nh),
            ],
        )?;
        if let Some(l) = &lse {
            if l.len() < dims.nh * dims.t {
                return Err(KernelError::new(
                    op,
                    format!(
                        "lse holds {} floats, not nh·T = {}",
                        l.len(),
                        dims.nh * dims.t
                    ),
                ));
            }
        }
        if dims.t == 0 || dims.nh == 0 {
            return Ok(());
        }
        self.launch_forward(op, stream, q, k, v, out, lse, dims)
    }

    /// Gradients of `forward` for the output gradient `g [T, nh, d]`, packed into
    /// `dqkv [T, nh + 2·nkv, d]`; every element of `dqkv` is written. `saved` is the output
    /// and log-sum-exp of `forward` on these very q, k, v (then the forward is not run again).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &self,
        stream: &Arc<CudaStream>,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
        v: &CudaSlice<u16>,
        g: &CudaSlice<u16>,
        saved: Option<(&CudaSlice<u16>, &CudaSlice<f32>)>,
        dqkv: &mut CudaSlice<u16>,
        dims: &AttnDims,
    ) -> Result<(), KernelError> {
        let one_pass = self.kernels(dims.d).tiles.one_pass;
        self.backward_path(stream, q, k, v, g, saved, dqkv, dims, one_pass)
    }

    /// `backward` by the one-pass kernel (where there is no window) or by the two kernels.
    #[allow(clippy::too_many_arguments)]
    fn backward_path(
        &self,
        stream: &Arc<CudaStream>,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
        v: &CudaSlice<u16>,
        g: &CudaSlice<u16>,
        saved: Option<(&CudaSlice<u16>, &CudaSlice<f32>)>,
        dqkv: &mut CudaSlice<u16>,
        dims: &AttnDims,
        one_pass: bool,
    ) -> Result<(), KernelError> {
        let op = "attention_backward";
        check(
            op,
            dims,
            &[
                ("q", q.len(), dims.nh),
                ("k", k.len(), dims.nkv),
                ("v", v.len(), dims.nkv),
                ("g", g.len(), dims.nh),
                ("dqkv", dqkv.len(), dims.nh + 2 * dims.nkv),
            ],
        )?;
        if dims.t == 0 || dims.nh == 0 {
            return Ok(());
        }
        let (t, nh) = (dims.t, dims.nh);
        let scratch = |what: &str, e| cuda_err(op, &format!("allocating the {what} scratch"), e);
        // SAFETY: every element of the three buffers is written by the kernels below before
        // any kernel reads it (forward: all of O and lse; delta: all of delta), in stream order.
        let mut delta = unsafe { stream.alloc::<f32>(nh * t) }.map_err(|e| scratch("delta", e))?;
        let recomputed;
        let (o, lse) = match saved {
            Some((o, lse)) => {
                if o.len() < t * nh * dims.d || lse.len() < nh * t {
                    return Err(KernelError::new(
                        op,
                        "the saved forward output or log-sum-exp is smaller than T·nh·d / nh·T",
                    ));
                }
                (o, lse)
            }
            None => {
                let mut o =
                    unsafe { stream.alloc::<u16>(t * nh * dims.d) }.map_err(|e| scratch("O", e))?;
                let mut lse =
                    unsafe { stream.alloc::<f32>(nh * t) }.map_err(|e| scratch("lse", e))?;
                self.launch_forward(op, stream, q, k, v, &mut o, Some(&mut lse), dims)?;
                recomputed = (o, lse);
                (&recomputed.0, &recomputed.1)
            }
        };

        let (ti, nhi, di) = (t as i32, nh as i32, dims.d as i32);
        let rows_per_block = 8; // one warp per (row, head), 256 threads
        let cfg = LaunchConfig {
            grid_dim: ((t * nh).div_ceil(rows_per_block) as u32, 1, 1),
            block_dim: (32 * rows_per_block as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.delta);
        b.arg(o).arg(g).arg(&mut delta).arg(&ti).arg(&nhi).arg(&di);
        // SAFETY: flash_bwd_delta(const u16* o, const u16* g, float* delta, int T, int nh,
        // int d); o and g hold T·nh·d elements, delta nh·T (checked above / allocated so).
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err(op, "flash_bwd_delta launch", e))?;

        let kern = self.kernels(dims.d);
        let a = Args::new(dims);
        if one_pass && a.window == 0 {
            return self.launch_fused(op, stream, kern, [q, k, v, g], lse, &delta, dqkv, dims, &a);
        }
        let (dq, dkdv) = self.bwd_launches(dims.d);
        let mut b = stream.launch_builder(dq.f);
        b.arg(q)
            .arg(k)
            .arg(v)
            .arg(g)
            .arg(lse)
            .arg(&delta)
            .arg(&mut *dqkv);
        a.push(&mut b);
        // SAFETY: flash_bwd_dq_d{D} / flash_bwd_dq_wg_d{D}(q, k, v, go, lse, delta, dqkv, T,
        // nh, nkv, d, scale, window, cap) (DQ in flash_attn.cu, DQ_WG in flash_wgmma.cu);
        // buffer sizes checked above; the shared memory was granted in `new`.
        let grid = t.div_ceil(dq.rows) * nh;
        unsafe { b.launch(config(grid, dq.threads, dq.smem)) }
            .map_err(|e| cuda_err(op, "flash_bwd_dq launch", e))?;

        let nsplit = dkdv_splits(dims);
        let part_len = 2 * t * nh * dims.d; // nsplit · T · 2·nkv·d
                                            // SAFETY: with nsplit > 1 the dK/dV kernel writes every (split, key, head, column < d)
                                            // element of the partials, and the reduction reads only those, in stream order.
        let mut part = match nsplit {
            1 => None,
            _ => Some(
                unsafe { stream.alloc::<f32>(part_len) }
                    .map_err(|e| scratch("dK/dV partials", e))?,
            ),
        };
        let null: u64 = 0;
        let nsplit_i = nsplit as i32;
        let mut b = stream.launch_builder(dkdv.f);
        b.arg(q)
            .arg(k)
            .arg(v)
            .arg(g)
            .arg(lse)
            .arg(&delta)
            .arg(&mut *dqkv);
        match part.as_mut() {
            Some(p) => b.arg(p),
            None => b.arg(&null),
        };
        b.arg(&nsplit_i);
        a.push(&mut b);
        let grid = t.div_ceil(dkdv.rows) * dims.nkv * nsplit;
        // SAFETY: flash_bwd_dkdv_d{D} / flash_bwd_dkdv_wg_d{D}(q, k, v, go, lse, delta, dqkv,
        // part (null when nsplit is 1, never read then), nsplit, T, nh, nkv, d, scale, window,
        // cap) (DKDV in flash_attn.cu, DKDV_WG in flash_wgmma.cu); part holds
        // nsplit·T·2·nkv·d floats; the shared memory was granted in `new`.
        unsafe { b.launch(config(grid, dkdv.threads, dkdv.smem)) }
            .map_err(|e| cuda_err(op, "flash_bwd_dkdv launch", e))?;
        match &part {
            Some(p) => self.launch_reduce(op, stream, p, dqkv, nsplit_i, &a),
            None => Ok(()),
        }
    }

    /// The one-pass backward (`flash_bwd_fused_d{D}`, causal without a window) and, with GQA,
    /// the reduction of its dK/dV partials; `lse` and `delta` are ready on the stream.
    #[allow(clippy::too_many_arguments)]
    fn launch_fused(
        &self,
        op: &'static str,
        stream: &Arc<CudaStream>,
        kern: &WidthKernels,
        [q, k, v, g]: [&CudaSlice<u16>; 4],
        lse: &CudaSlice<f32>,
        delta: &CudaSlice<f32>,
        dqkv: &mut CudaSlice<u16>,
        dims: &AttnDims,
        a: &Args,
    ) -> Result<(), KernelError> {
        let (t, nh, d) = (dims.t, dims.nh, dims.d);
        let group = nh / dims.nkv;
        let tl = kern.tiles;
        let tiles = t.div_ceil(FUSED_BQ);
        let scratch = |what: &str, e| cuda_err(op, &format!("allocating the {what} scratch"), e);
        // SAFETY (dqacc): key block 0 stores every (head, row < T, column < d) element of a
        // query tile before any other key block reads or adds to it (the counters order them).
        let mut dqacc = unsafe { stream.alloc::<f32>(nh * t * d) }.map_err(|e| scratch("dQ", e))?;
        // The counters must start at zero: key block kb waits for the count kb.
        let mut sem = stream
            .alloc_zeros::<i32>(nh * tiles)
            .map_err(|e| scratch("dQ counter", e))?;
        // SAFETY: as in `backward` for nsplit = group.
        let mut part = match group {
            1 => None,
            _ => Some(
                unsafe { stream.alloc::<f32>(2 * t * nh * d) }
                    .map_err(|e| scratch("dK/dV partials", e))?,
            ),
        };
        let null: u64 = 0;
        let mut b = stream.launch_builder(&kern.fused);
        b.arg(q)
            .arg(k)
            .arg(v)
            .arg(g)
            .arg(lse)
            .arg(delta)
            .arg(&mut *dqkv);
        match part.as_mut() {
            Some(p) => b.arg(p),
            None => b.arg(&null),
        };
        b.arg(&mut dqacc)
            .arg(&mut sem)
            .arg(&a.t)
            .arg(&a.nh)
            .arg(&a.nkv)
            .arg(&a.d)
            .arg(&a.scale)
            .arg(&a.cap);
        // SAFETY: flash_bwd_fused_d{D}(q, k, v, go, lse, delta, dqkv, part (null when the
        // group is one head, never read then), dqacc, sem, T, nh, nkv, d, scale, cap) (FUSED in
        // flash_attn.cu); part holds group·T·2·nkv·d floats, dqacc nh·T·d, sem nh·ceil(T/64)
        // ints; the shared memory was granted in `new`. The grid is block-major, so a CTA
        // waits only for CTAs of lower index (started before it): no deadlock.
        let grid = t.div_ceil(tl.fused_block()) * nh;
        unsafe { b.launch(config(grid, 32 * tl.fused_warps, tl.fused_smem())) }
            .map_err(|e| cuda_err(op, "flash_bwd_fused launch", e))?;
        match &part {
            Some(p) => self.launch_reduce(op, stream, p, dqkv, group as i32, a),
            None => Ok(()),
        }
    }

    /// dK, dV of the per-query-head partials `part [nsplit, T, 2·nkv·d]`, summed in split order.
    fn launch_reduce(
        &self,
        op: &'static str,
        stream: &Arc<CudaStream>,
        part: &CudaSlice<f32>,
        dqkv: &mut CudaSlice<u16>,
        nsplit: i32,
        a: &Args,
    ) -> Result<(), KernelError> {
        let groups = (a.t as usize * 2 * a.nkv as usize * a.d as usize).div_ceil(4);
        let mut b = stream.launch_builder(&self.dkdv_reduce);
        b.arg(part)
            .arg(dqkv)
            .arg(&a.t)
            .arg(&a.nh)
            .arg(&a.nkv)
            .arg(&a.d)
            .arg(&nsplit)
            .arg(&a.scale);
        // SAFETY: flash_bwd_dkdv_reduce(const float* part, u16* dqkv, int T, int nh,
        // int nkv, int d, int nsplit, float scale); one thread per 4 of the T·2·nkv·d
        // elements (d % 8 == 0, so they never straddle a head row).
        unsafe { b.launch(config(groups.div_ceil(256), 256, 0)) }
            .map_err(|e| cuda_err(op, "flash_bwd_dkdv_reduce launch", e))?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_forward(
        &self,
        op: &'static str,
        stream: &Arc<CudaStream>,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
        v: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
        lse: Option<&mut CudaSlice<f32>>,
        dims: &AttnDims,
    ) -> Result<(), KernelError> {
        let fwd = self.fwd_launch(dims.d);
        let a = Args::new(dims);
        let null: u64 = 0;
        let mut b = stream.launch_builder(fwd.f);
        b.arg(q).arg(k).arg(v).arg(out);
        match lse {
            Some(l) => b.arg(l),
            None => b.arg(&null),
        };
        a.push(&mut b);
        let grid = dims.t.div_ceil(fwd.rows) * dims.nh;
        // SAFETY: flash_fwd_d{D} / flash_fwd_wg_d{D}(q, k, v, o, lse (may be null), T, nh,
        // nkv, d, scale, window, cap) (FWD in flash_attn.cu, FWD_WG in flash_wgmma.cu); buffer
        // sizes checked by the caller; lse, when given, holds nh·T floats; the shared memory
        // was granted in `new`.
        unsafe { b.launch(config(grid, fwd.threads, fwd.smem)) }
            .map_err(|e| cuda_err(op, "flash_fwd launch", e))?;
        Ok(())
    }
}

/// The scalar kernel arguments shared by every entry point, as the kernels take them.
struct Args {
    t: i32,
    nh: i32,
    nkv: i32,
    d: i32,
    scale: f32,
    /// 0: no window. A window at least T long hides nothing, so it is passed as none (and
    /// always fits an `int`).
    window: i32,
    /// 0: no soft-cap.
    cap: f32,
}

impl Args {
    fn new(dims: &AttnDims) -> Args {
        Args {
            t: dims.t as i32,
            nh: dims.nh as i32,
            nkv: dims.nkv as i32,
            d: dims.d as i32,
            scale: dims.scale,
            window: dims.window.filter(|&w| w < dims.t).map_or(0, |w| w as i32),
            cap: dims.softcap.unwrap_or(0.0),
        }
    }

    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        b.arg(&self.t)
            .arg(&self.nh)
            .arg(&self.nkv)
            .arg(&self.d)
            .arg(&self.scale)
            .arg(&self.window)
            .arg(&self.cap);
    }
}

/// A one-dimensional grid: the kernels decode (block, head) from `blockIdx.x` block-major, so
/// the longest blocks of every head start first (`supports` keeps `grid` within `int`).
fn config(grid: usize, threads: usize, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

/// Dims the kernels support and buffers of exactly `T·heads·d` elements, else an error
/// naming what was expected.
fn check(
    op: &'static str,
    dims: &AttnDims,
    buffers: &[(&str, usize, usize)],
) -> Result<(), KernelError> {
    if !supports(dims) {
        return Err(KernelError::new(
            op,
            format!(
                "flash attention does not support {dims:?} (needs d % 8 == 0 and 8 ≤ d ≤ 128, \
                 nh a multiple of nkv, scale > 0, softcap > 0, window ≥ 1)"
            ),
        ));
    }
    for &(name, len, heads) in buffers {
        let want = dims.t * heads * dims.d;
        if len != want {
            return Err(KernelError::new(
                op,
                format!(
                    "`{name}` holds {len} elements, expected {want} ([{}, {heads}, {}])",
                    dims.t, dims.d
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::with_libraries;

    fn dims(d: usize) -> AttnDims {
        AttnDims {
            t: 4096,
            nh: 32,
            nkv: 8,
            d,
            scale: 1.0 / (d as f32).sqrt(),
            window: None,
            softcap: None,
        }
    }

    #[test]
    fn flash_kernels_compile_with_nvrtc_for_ampere() {
        match compile_flash("sm_80") {
            Ok(ptx) => {
                let src = ptx.to_src();
                assert!(!src.contains("wgmma"), "wgmma kernels compiled for sm_80");
                for w in WIDTHS {
                    for k in [
                        "flash_fwd",
                        "flash_bwd_dq",
                        "flash_bwd_dkdv",
                        "flash_bwd_fused",
                    ] {
                        let entry = format!(".entry {k}_d{w}(");
                        assert!(src.contains(&entry), "missing {entry}");
                    }
                }
                assert!(src.contains(".entry flash_bwd_delta("));
                assert!(src.contains(".entry flash_bwd_dkdv_reduce("));
                assert!(src.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
            }
            Err(e) if e.message.contains("could not be loaded") => {
                eprintln!("SKIPPED: libnvrtc not found ({e})")
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// On sm_90 the module is compiled for sm_90a with the wgmma kernels next to every
    /// `mma.sync` one (the fallbacks for d ≤ 32 and the one-pass backward).
    #[test]
    fn flash_kernels_compile_with_nvrtc_for_hopper_with_wgmma() {
        match compile_flash("sm_90") {
            Ok(ptx) => {
                let src = ptx.to_src();
                assert!(src.contains(".target sm_90a"), "not compiled for sm_90a");
                for w in WG_WIDTHS {
                    for k in ["flash_fwd_wg", "flash_bwd_dq_wg", "flash_bwd_dkdv_wg"] {
                        let entry = format!(".entry {k}_d{w}(");
                        assert!(src.contains(&entry), "missing {entry}");
                    }
                }
                for w in WIDTHS {
                    assert!(src.contains(&format!(".entry flash_fwd_d{w}(")));
                    assert!(src.contains(&format!(".entry flash_bwd_fused_d{w}(")));
                }
                assert!(src.contains("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16"));
                assert!(src.contains("fence.proxy.async.shared::cta"));
            }
            Err(e) if e.message.contains("could not be loaded") => {
                eprintln!("SKIPPED: libnvrtc not found ({e})")
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn only_compute_capability_9_0_gets_wgmma() {
        assert!(has_wgmma("sm_90"));
        assert!(has_wgmma("sm_90a"));
        for arch in ["sm_80", "sm_86", "sm_89", "sm_100", "sm_120"] {
            assert!(!has_wgmma(arch), "{arch}");
        }
    }

    #[test]
    fn wgmma_widths_cover_head_dims_33_to_128() {
        let widths: Vec<Option<usize>> = [8, 32, 33, 64, 72, 96, 128, 136]
            .map(|d| WgTiles::of(d).map(|t| t.width))
            .into();
        assert_eq!(
            widths,
            [
                None,
                None,
                Some(64),
                Some(64),
                Some(128),
                Some(128),
                Some(128),
                None
            ]
        );
    }

    #[test]
    fn wgmma_shared_memory_fits_a_hopper_block() {
        for w in WG_WIDTHS {
            let t = WgTiles::for_width(w);
            for smem in [t.fwd_smem(), t.dq_smem(), t.dkdv_smem()] {
                assert!(smem <= 227 * 1024, "D = {w}: {smem} bytes");
            }
        }
        // Two warpgroups of 64 rows, double-buffered 64-key K and V tiles, alignment: two
        // CTAs fit an SM.
        assert_eq!(WgTiles::for_width(128).fwd_smem(), 1024 + (128 + 256) * 256);
        assert!(2 * WgTiles::for_width(128).fwd_smem() <= 227 * 1024);
    }

    #[test]
    fn llama_shapes_and_tiny_head_dims_are_supported() {
        for d in [8, 16, 32, 64, 96, 128] {
            assert!(supports(&dims(d)), "d = {d}");
        }
        let windowed = AttnDims {
            window: Some(1),
            softcap: Some(50.0),
            ..dims(128)
        };
        assert!(supports(&windowed));
    }

    #[test]
    fn unsupported_dims_are_refused_so_the_caller_can_fall_back() {
        for d in [0, 4, 12, 136, 256] {
            assert!(!supports(&dims(d)), "d = {d}");
        }
        assert!(!supports(&AttnDims { nkv: 5, ..dims(64) }));
        assert!(!supports(&AttnDims { nkv: 0, ..dims(64) }));
        assert!(!supports(&AttnDims {
            window: Some(0),
            ..dims(64)
        }));
        assert!(!supports(&AttnDims {
            scale: -1.0,
            ..dims(64)
        }));
        assert!(!supports(&AttnDims {
            softcap: Some(0.0),
            ..dims(64)
        }));
        // 2^26 tokens × 1024 heads: 2^32 CTAs of 16 rows, past the one-dimensional grid.
        assert!(!supports(&AttnDims {
            t: 1 << 26,
            nh: 1024,
            nkv: 1,
            ..dims(64)
        }));
        assert!(supports(&AttnDims {
            t: 1 << 20,
            ..dims(128)
        }));
        let err = check("attention", &dims(12), &[]).unwrap_err();
        assert!(err.message.contains("d % 8 == 0"), "{err}");
    }

    #[test]
    fn a_buffer_of_the_wrong_length_is_an_error_naming_it() {
        let d = dims(64);
        let err = check("attention", &d, &[("q", 4096 * 32 * 64, 32), ("k", 7, 8)]).unwrap_err();
        assert!(
            err.message
                .contains("`k` holds 7 elements, expected 2097152"),
            "{err}"
        );
    }

    #[test]
    fn head_dims_run_in_the_smallest_tile_that_holds_them() {
        let widths: Vec<usize> = [8, 32, 40, 64, 72, 128].map(|d| Tiles::of(d).width).into();
        assert_eq!(widths, [32, 32, 64, 64, 128, 128]);
    }

    #[test]
    fn shared_memory_fits_an_sm80_block() {
        // A100's opt-in limit (163 KiB) is the smallest of the devices the kernels target
        // (H100/H200: 227 KiB).
        for w in WIDTHS {
            let t = Tiles::for_width(w);
            for smem in [t.fwd_smem(), t.dq_smem(), t.dkdv_smem(), t.fused_smem()] {
                assert!(smem <= 163 * 1024, "D = {w}: {smem} bytes");
            }
        }
        assert_eq!(Tiles::for_width(128).fwd_smem(), (128 + 256) * 136 * 2);
    }

    #[test]
    fn dkdv_splits_the_gqa_group_into_single_heads() {
        assert_eq!(dkdv_splits(&dims(128)), 4);
        assert_eq!(
            dkdv_splits(&AttnDims {
                nkv: 32,
                ..dims(128)
            }),
            1
        );
    }

    #[test]
    fn a_window_as_long_as_the_sequence_is_no_window() {
        let a = Args::new(&AttnDims {
            window: Some(4096),
            ..dims(64)
        });
        assert_eq!(a.window, 0);
        let a = Args::new(&AttnDims {
            window: Some(100),
            ..dims(64)
        });
        assert_eq!(a.window, 100);
    }

    /// Deterministic values in [-amp, amp), rounded to bf16 (what the GPU stores).
    fn bf16_values(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x >> 40) as f32 / (1u64 << 24) as f32;
                half::bf16::from_f32((2.0 * u - 1.0) * amp).to_f32()
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u16> {
        v.iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect()
    }

    /// ||a − b|| / ||b||, with ||b|| floored at 1e-3 per element (dq and dk are exactly zero
    /// where every query sees one key; both sides are rounding noise there).
    fn rel_err(a: &[f32], b: &[f32]) -> f64 {
        let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let norm: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
        (diff / norm.max(1e-6 * b.len() as f64)).sqrt()
    }

    /// Heads `lo..hi` of a `[T, heads, d]` tensor.
    fn heads(v: &[f32], t: usize, heads: usize, d: usize, lo: usize, hi: usize) -> Vec<f32> {
        (0..t)
            .flat_map(|i| {
                v[(i * heads + lo) * d..(i * heads + hi) * d]
                    .iter()
                    .copied()
            })
            .collect()
    }

    /// The launch path of flash.rs (argument order, shared memory, scratch) against the CPU
    /// backend's attention, where a GPU is found; scripts/flash_check.py covers the kernels'
    /// numerics and speed against PyTorch in depth.
    #[test]
    fn flash_matches_the_cpu_backend_on_a_gpu() {
        let opened = with_libraries(|| {
            let ctx = CudaContext::new(0).map_err(|e| cuda_err("cuda", "GPU 0", e))?;
            let (major, minor) = ctx
                .compute_capability()
                .map_err(|e| cuda_err("cuda", "compute capability", e))?;
            Ok((ctx, format!("sm_{major}{minor}")))
        });
        let (ctx, arch) = match opened {
            Ok(c) => c,
            Err(e) => {
                eprintln!("SKIPPED: no usable GPU ({e})");
                return;
            }
        };
        let arch: &'static str = Box::leak(arch.into_boxed_str());
        let with_wg = Flash::new(&ctx, arch).unwrap();
        // On a 9.0 device the same cases through the mma.sync kernels as well.
        let mut plain = Flash::new(&ctx, arch).unwrap();
        if plain.wg.is_empty() {
            eprintln!("no wgmma kernels on {arch}: mma.sync kernels only");
        }
        plain.wg.clear();
        for flash in [&with_wg, &plain] {
            run_cases(&ctx, flash);
        }
    }

    fn run_cases(ctx: &Arc<CudaContext>, flash: &Flash) {
        use crate::tensor::{Data, HostTensor};
        use crate::CpuBackend;
        use qplc_ops::Op;
        let stream = ctx.default_stream();
        let cpu = CpuBackend::new();
        let f32s = |h: HostTensor| match h.data {
            Data::F32(v) => v,
            Data::I32(_) => panic!("attention gave an integer tensor"),
        };
        let cases = [
            (1, 2, 1, 64, None, None),
            (100, 4, 1, 16, None, None),
            (77, 4, 2, 32, Some(20), None),
            (130, 4, 2, 128, None, Some(30.0)),
            (200, 8, 2, 64, Some(50), Some(20.0)),
            (300, 4, 4, 96, None, None),
            // Nine key blocks of 64: the one-pass dQ sums through every counter value.
            (520, 8, 2, 128, None, None),
        ];
        for (seed, (t, nh, nkv, d, window, softcap)) in cases.into_iter().enumerate() {
            let dims = AttnDims {
                t,
                nh,
                nkv,
                d,
                scale: 1.0 / (d as f32).sqrt(),
                window,
                softcap,
            };
            let seed = seed as u64 * 4;
            let q = bf16_values(t * nh * d, seed + 1, 2.0);
            let k = bf16_values(t * nkv * d, seed + 2, 2.0);
            let v = bf16_values(t * nkv * d, seed + 3, 1.0);
            let g = bf16_values(t * nh * d, seed + 4, 1.0);
            let up = |x: &[f32]| stream.clone_htod(&bits(x)).unwrap();
            let (q_dev, k_dev, v_dev, g_dev) = (up(&q), up(&k), up(&v), up(&g));
            let mut out = stream.alloc_zeros::<u16>(t * nh * d).unwrap();
            let mut dqkv = stream.alloc_zeros::<u16>(t * (nh + 2 * nkv) * d).unwrap();
            let mut lse = stream.alloc_zeros::<f32>(nh * t).unwrap();
            let mut dqkv_saved = stream.alloc_zeros::<u16>(t * (nh + 2 * nkv) * d).unwrap();
            let mut dqkv_other = stream.alloc_zeros::<u16>(t * (nh + 2 * nkv) * d).unwrap();
            flash
                .forward(
                    &stream,
                    &q_dev,
                    &k_dev,
                    &v_dev,
                    &mut out,
                    Some(&mut lse),
                    &dims,
                )
                .unwrap();
            flash
                .backward(
                    &stream, &q_dev, &k_dev, &v_dev, &g_dev, None, &mut dqkv, &dims,
                )
                .unwrap();
            let saved = Some((&out, &lse));
            flash
                .backward(
                    &stream,
                    &q_dev,
                    &k_dev,
                    &v_dev,
                    &g_dev,
                    saved,
                    &mut dqkv_saved,
                    &dims,
                )
                .unwrap();
            // The path `backward` does not take (one pass or two kernels), checked as well.
            let other = !flash.kernels(d).tiles.one_pass;
            flash
                .backward_path(
                    &stream,
                    &q_dev,
                    &k_dev,
                    &v_dev,
                    &g_dev,
                    saved,
                    &mut dqkv_other,
                    &dims,
                    other,
                )
                .unwrap();
            let down = |s: &CudaSlice<u16>| -> Vec<f32> {
                let h = stream.clone_dtoh(s).unwrap();
                h.iter()
                    .map(|&b| half::bf16::from_bits(b).to_f32())
                    .collect()
            };
            let (out, dqkv, dqkv_saved) = (down(&out), down(&dqkv), down(&dqkv_saved));
            let dqkv_other = down(&dqkv_other);
            // The forward is deterministic, so its saved statistics are the recomputed ones.
            assert!(
                dqkv.iter()
                    .zip(&dqkv_saved)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dims:?}: the backward from the saved forward differs from the recomputing one"
            );

            let host = |v: &[f32], heads: usize| HostTensor::f32(vec![t, heads, d], v.to_vec());
            let (hq, hk, hv, hg) = (host(&q, nh), host(&k, nkv), host(&v, nkv), host(&g, nh));
            let (scale, softcap) = (dims.scale as f64, softcap.map(|c: f32| c as f64));
            let fwd = Op::Attention {
                scale,
                sliding_window: window,
                softcap,
            };
            let bwd = Op::AttentionBackward {
                scale,
                sliding_window: window,
                softcap,
            };
            let want_out = f32s(cpu.eval(&fwd, &[&hq, &hk, &hv]).unwrap());
            let want = f32s(cpu.eval(&bwd, &[&hq, &hk, &hv, &hg]).unwrap());
            let all = nh + 2 * nkv;
            let mut parts = vec![("out".to_string(), out.clone(), want_out)];
            for (path, res) in [("", &dqkv), ("other path: ", &dqkv_other)] {
                for (name, lo, hi) in [("dq", 0, nh), ("dk", nh, nh + nkv), ("dv", nh + nkv, all)] {
                    parts.push((
                        format!("{path}{name}"),
                        heads(res, t, all, d, lo, hi),
                        heads(&want, t, all, d, lo, hi),
                    ));
                }
            }
            for (name, got, want) in parts {
                let e = rel_err(&got, &want);
                let wg = flash.wg_kernels(d).is_some();
                assert!(
                    e <= 1e-2,
                    "{dims:?} (wgmma: {wg}): {name} relative error {e:.2e}"
                );
            }
        }
    }

    #[test]
    fn arch_strings_parse() {
        assert_eq!(arch_number("sm_90"), Some(90));
        assert_eq!(arch_number("sm_90a"), Some(90));
        assert_eq!(arch_number("sm_75"), Some(75));
        assert_eq!(arch_number("compute_90"), None);
    }
}
