//! Launch plumbing shared by the dispatch code: grid sizes, the `Strided` shape argument and
//! the `launch!` macro, which checks every launch's return code.
use super::CudaBackend;
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

/// Launches kernel `$name` over `$n` threads with the given argument references (each
/// must outlive the statement: pass references to named locals). Zero threads launch
/// nothing. The launch's return code is checked; asynchronous faults surface at the next
/// synchronisation (every download synchronises).
macro_rules! launch {
    ($be:expr, $name:literal, $n:expr; $($arg:expr),* $(,)?) => {{
        let n: usize = $n;
        if n == 0 {
            Ok(())
        } else {
            let mut b = $be.stream.launch_builder($be.func($name));
            $( b.arg($arg); )*
            // SAFETY: argument types and order follow the kernel's C signature in
            // kernels.cu; every buffer holds the elements the kernel indexes (checked by
            // `Op::infer` against the buffers' types before dispatch).
            unsafe { b.launch($crate::cuda::launch::grid(n)) }
                .map(|_| ())
                .map_err(|e| $crate::cuda::cuda_err($name, "kernel launch", e))
        }
    }};
}
pub(crate) use launch;

impl CudaBackend {
    pub(crate) fn fill_f32(
        &self,
        s: &mut CudaSlice<f32>,
        n: usize,
        v: f32,
    ) -> Result<(), KernelError> {
        let nn = n as i64;
        launch!(self, "fill_f32", n; s, &nn, &v)
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
