//! Launch plumbing shared by the dispatch code: grid sizes, the `Strided` shape argument and
//! the `launch!` macro, which checks every launch's return code.
use super::{CudaBackend, DevData, Float};
use crate::backend::KernelError;
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use qplc_ops::Shape;

/// Threads per block of the element-wise kernels.
const BLOCK: u32 = 256;
/// Grid-stride loops cover the rest; more blocks than this only queue.
const MAX_BLOCKS: usize = 1 << 16;
/// Largest rank the kernels index (`MAXR` in kernels.cu).
pub(crate) const MAX_RANK: usize = 8;

/// One thread per element, grid-stride beyond `MAX_BLOCKS` blocks.
pub(crate) fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `struct Strided` of kernels.cu: output dims and, for up to two inputs, the input stride
/// of each output axis (0 where the input is broadcast).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Strided {
    rank: i64,
    dims: [i64; MAX_RANK],
    sa: [i64; MAX_RANK],
    sb: [i64; MAX_RANK],
}

// SAFETY: plain `#[repr(C)]` integers, laid out as the C struct (all 8-byte fields).
unsafe impl DeviceRepr for Strided {}

impl Strided {
    pub(crate) fn new(
        op: &'static str,
        dims: &[usize],
        sa: &[usize],
        sb: &[usize],
    ) -> Result<Self, KernelError> {
        if dims.len() > MAX_RANK {
            return Err(KernelError::new(
                op,
                format!(
                    "rank {} is above the GPU kernels' limit of {MAX_RANK}",
                    dims.len()
                ),
            ));
        }
        // Both inputs laid out as the output (no broadcast, no permutation): rank 0 tells the
        // kernels to index directly, skipping the per-axis 64-bit div/mod that made same-shape
        // adds run at a sixth of memory bandwidth (notes/CUDA.md, 8B profile).
        let mut contiguous = vec![1usize; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            contiguous[i] = contiguous[i + 1] * dims[i + 1];
        }
        if sa == contiguous.as_slice() && sb == contiguous.as_slice() {
            return Ok(Strided::default());
        }
        let mut s = Strided {
            rank: dims.len() as i64,
            ..Default::default()
        };
        for i in 0..dims.len() {
            s.dims[i] = dims[i] as i64;
            s.sa[i] = sa[i] as i64;
            s.sb[i] = sb[i] as i64;
        }
        Ok(s)
    }

    /// Broadcasting `a` and `b` to `out` (NumPy rules, right-aligned).
    pub(crate) fn broadcast(
        op: &'static str,
        a: &Shape,
        b: &Shape,
        out: &Shape,
    ) -> Result<Self, KernelError> {
        let rank = out.rank();
        Self::new(
            op,
            out.dims(),
            &broadcast_strides(a, rank),
            &broadcast_strides(b, rank),
        )
    }
}

/// Strides of `s` seen from an output of rank `rank`, right-aligned, with 0 on broadcast
/// (size-1 or missing) axes: the CPU backend's rule.
fn broadcast_strides(s: &Shape, rank: usize) -> Vec<usize> {
    let own = s.strides();
    let pad = rank - s.rank();
    (0..rank)
        .map(|i| {
            if i < pad || s.dims()[i - pad] == 1 {
                0
            } else {
                own[i - pad]
            }
        })
        .collect()
}

/// How many threads a launch covers: a `usize` element count (one thread per element,
/// grid-stride beyond `MAX_BLOCKS`; zero launches nothing) or an explicit configuration.
pub(crate) trait Grid {
    fn config(self) -> Option<LaunchConfig>;
}

impl Grid for usize {
    fn config(self) -> Option<LaunchConfig> {
        (self > 0).then(|| grid(self))
    }
}

impl Grid for LaunchConfig {
    fn config(self) -> Option<LaunchConfig> {
        Some(self)
    }
}

/// One block of `threads` per row, grid-stride beyond `MAX_BLOCKS` rows (zero rows launch
/// nothing).
pub(crate) fn rows(n: usize, threads: u32) -> Option<LaunchConfig> {
    (n > 0).then(|| LaunchConfig {
        grid_dim: (n.clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

impl Grid for Option<LaunchConfig> {
    fn config(self) -> Option<LaunchConfig> {
        self
    }
}

/// Launches a kernel over `$grid` (see `Grid`) with the given argument references (each
/// must outlive the statement: pass references to named locals). `"name" @ float` picks
/// the storage build's `name_f32` / `name_bf16`; a plain `"name"` is a full kernel name.
/// The launch's return code is checked; asynchronous faults surface at the next
/// synchronisation (every download synchronises).
macro_rules! launch {
    (@go $be:expr, $name:literal, $full:expr, $grid:expr; $($arg:expr),*) => {{
        match ($crate::cuda::launch::Grid::config($grid), $be.func($full)) {
            (None, _) => Ok(()),
            (Some(_), Err(e)) => Err(e),
            (Some(cfg), Ok(f)) => {
                let mut b = $be.stream.launch_builder(f);
                $( b.arg($arg); )*
                // SAFETY: argument types and order follow the kernel's C signature in
                // kernels.cu; every buffer holds the elements the kernel indexes (checked
                // by `Op::infer` against the buffers' types before dispatch), in the
                // storage kind of the build launched.
                unsafe { b.launch(cfg) }
                    .map(|_| ())
                    .map_err(|e| $crate::cuda::cuda_err($name, "kernel launch", e))
            }
        }
    }};
    ($be:expr, $name:literal @ $float:expr, $grid:expr; $($arg:expr),* $(,)?) => {{
        let full = format!("{}_{}", $name, $crate::cuda::Float::suffix($float));
        $crate::cuda::launch::launch!(@go $be, $name, &full, $grid; $($arg),*)
    }};
    ($be:expr, $name:literal, $grid:expr; $($arg:expr),* $(,)?) => {
        $crate::cuda::launch::launch!(@go $be, $name, $name, $grid; $($arg),*)
    };
}
pub(crate) use launch;

impl CudaBackend {
    /// Fills a float buffer (either storage) with `v`, rounded to the storage type.
    pub(crate) fn fill(&self, d: &mut DevData, n: usize, v: f32) -> Result<(), KernelError> {
        let nn = n as i64;
        match d.float() {
            Some(f) => launch!(self, "fill" @ f, n; d, &nn, &v),
            None => Err(KernelError::new("fill", "expects a float buffer")),
        }
    }

    pub(crate) fn fill_f32(
        &self,
        s: &mut CudaSlice<f32>,
        n: usize,
        v: f32,
    ) -> Result<(), KernelError> {
        let nn = n as i64;
        launch!(self, "fill" @ Float::F32, n; s, &nn, &v)
    }

    pub(crate) fn fill_i32(
        &self,
        s: &mut CudaSlice<i32>,
        n: usize,
        v: i32,
    ) -> Result<(), KernelError> {
        let nn = n as i64;
        launch!(self, "fill_i32", n; s, &nn, &v)
    }
}
