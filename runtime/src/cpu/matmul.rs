//! Matrix products: `Linear` (x·Wᵀ + b with HF's `[out, in]` weights) and batched `MatMul`.
//! The kernel is the `gemm` family's f32 sgemm (`gemm-f32`): packed BLIS-style blocking
//! with AVX-512 micro-kernels where the CPU has them (AVX2/FMA otherwise), f32
//! accumulation, any row/column strides. It is about twice as fast as `matrixmultiply`
//! (AVX2 only) on the products of a training step, which are most of the step's time.
//!
//! Threads: `gemm` splits one product over rayon's current pool by blocks of C; every
//! element is still one accumulation over k in blocks that depend on k and the caches
//! only, so results do not depend on the thread count (tested below).
use super::{f32s, f32s_mut};
use crate::backend::KernelError;
use crate::HostTensor;
use gemm_common::Parallelism;
use rayon::prelude::*;

fn max_offset(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    (rows - 1) * rs + (cols - 1) * cs
}

/// `C = A·B` through `gemm-f32`, strides in elements.
///
/// # Safety
/// The three views must lie inside their allocations, and no one else may access C's
/// elements during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    (rsa, csa): (usize, usize),
    b: *const f32,
    (rsb, csb): (usize, usize),
    c: *mut f32,
    (rsc, csc): (usize, usize),
    parallel: bool,
) {
    let par = if parallel && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the caller's promise; `read_dst = false` makes C write-only (β·A·B with
    // β = 1), so C's previous contents, NaN included, never matter.
    unsafe {
        gemm_f32::gemm::f32::get_gemm_fn()(
            m,
            n,
            k,
            c,
            csc as isize,
            rsc as isize,
            false,
            a,
            csa as isize,
            rsa as isize,
            b,
            csb as isize,
            rsb as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// `C = A·B` for `A [m, k]`, `B [k, n]`, `C [m, n]`, each given as a slice and
/// (row stride, column stride) in elements, so transposed views cost nothing. Runs on all
/// threads of rayon's current pool.
///
/// Panics if a view reaches outside its slice: callers derive strides from shapes that
/// `Op::infer` has checked, so that is a bug in the caller, not bad input.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    sa: (usize, usize),
    b: &[f32],
    sb: (usize, usize),
    c: &mut [f32],
    sc: (usize, usize),
) {
    sgemm_checked(m, k, n, a, sa, b, sb, c, sc, true)
}

/// `sgemm` on the calling thread only, for tasks that are already one of many parallel
/// tasks (attention's blocks, a batch of small products).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_serial(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    sa: (usize, usize),
    b: &[f32],
    sb: (usize, usize),
    c: &mut [f32],
    sc: (usize, usize),
) {
    sgemm_checked(m, k, n, a, sa, b, sb, c, sc, false)
}

#[allow(clippy::too_many_arguments)]
fn sgemm_checked(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    sa: (usize, usize),
    b: &[f32],
    sb: (usize, usize),
    c: &mut [f32],
    sc: (usize, usize),
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        max_offset(m, n, sc.0, sc.1) < c.len(),
        "sgemm: C view out of bounds"
    );
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                c[i * sc.0 + j * sc.1] = 0.0;
            }
        }
        return;
    }
    assert!(
        max_offset(m, k, sa.0, sa.1) < a.len(),
        "sgemm: A view out of bounds"
    );
    assert!(
        max_offset(k, n, sb.0, sb.1) < b.len(),
        "sgemm: B view out of bounds"
    );
    // SAFETY: all three views were checked against their slices; `c` is borrowed mutably.
    unsafe {
        kernel(
            m,
            k,
            n,
            a.as_ptr(),
            sa,
            b.as_ptr(),
            sb,
            c.as_mut_ptr(),
            sc,
            parallel,
        )
    }
}

/// Single-threaded `C = A·B` into a raw output, for tasks that each own a strided part of
/// one output tensor (attention writes the rows of one head).
///
/// # Safety
/// `c` must be valid for writes at every `i·rsc + j·csc` (`i < m`, `j < n`), and no other
/// thread may access those elements during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_into_raw(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    sa: (usize, usize),
    b: &[f32],
    sb: (usize, usize),
    c: *mut f32,
    sc: (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(k > 0, "sgemm_into_raw: empty inner dimension");
    assert!(
        max_offset(m, k, sa.0, sa.1) < a.len(),
        "sgemm: A view out of bounds"
    );
    assert!(
        max_offset(k, n, sb.0, sb.1) < b.len(),
        "sgemm: B view out of bounds"
    );
    // SAFETY: A and B bounds asserted; C is the caller's promise.
    unsafe { kernel(m, k, n, a.as_ptr(), sa, b.as_ptr(), sb, c, sc, false) }
}

/// `out [rows, n] = x [rows, k] · wᵀ (+ bias)` with `w [n, k]` as HF stores linear weights;
/// `wᵀ` is a strided view, never a copy.
pub(crate) fn linear(
    rows: usize,
    k: usize,
    n: usize,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    sgemm(rows, k, n, x, (k, 1), w, (1, k), out, (n, 1));
    if let Some(b) = bias {
        out.par_chunks_mut(n.max(1))
            .for_each(|row| row.iter_mut().zip(b).for_each(|(o, b)| *o += b));
    }
}

/// Batched `a [.., m, k] · b [.., k, n]` with optional transposes of the last two axes.
pub(crate) fn batched(
    ta: bool,
    tb: bool,
    a: &HostTensor,
    b: &HostTensor,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    let name = "matmul";
    let ad = a.ty.shape.dims();
    let bd = b.ty.shape.dims();
    let r = ad.len();
    let (ar, ac) = (ad[r - 2], ad[r - 1]);
    let (br, bc) = (bd[r - 2], bd[r - 1]);
    let (m, k) = if ta { (ac, ar) } else { (ar, ac) };
    let n = if tb { br } else { bc };
    // Element (i, kk) of op(A) is a[i*ac + kk] untransposed, a[kk*ac + i] transposed.
    let sa = if ta { (1, ac) } else { (ac, 1) };
    let sb = if tb { (1, bc) } else { (bc, 1) };
    let batch: usize = ad[..r - 2].iter().product();
    let (asz, bsz, csz) = (ar * ac, br * bc, m * n);
    let (av, bv) = (f32s(name, a)?, f32s(name, b)?);
    let cv = f32s_mut(name, out)?;
    if csz == 0 {
        return Ok(());
    }
    let one = |i: usize, c: &mut [f32]| {
        sgemm(
            m,
            k,
            n,
            &av[i * asz..(i + 1) * asz],
            sa,
            &bv[i * bsz..(i + 1) * bsz],
            sb,
            c,
            (n, 1),
        )
    };
    let serial = |i: usize, c: &mut [f32]| {
        sgemm_serial(
            m,
            k,
            n,
            &av[i * asz..(i + 1) * asz],
            sa,
            &bv[i * bsz..(i + 1) * bsz],
            sb,
            c,
            (n, 1),
        )
    };
    if batch >= rayon::current_num_threads() {
        // Many small products (attention-like): one per task.
        cv.par_chunks_mut(csz)
            .enumerate()
            .for_each(|(i, c)| serial(i, c));
    } else {
        cv.chunks_mut(csz).enumerate().for_each(|(i, c)| one(i, c));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::sgemm;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// Training must give bitwise-identical results whatever the thread count
    /// (tests/train_resume.rs compares runs bit for bit): the split of C between threads
    /// may not change any element's sum. Shapes cover the small-matrix, transposed-operand,
    /// deep (k > the kernel's k-block) and wide (head-like) paths.
    #[test]
    fn products_are_bitwise_identical_for_any_thread_count() {
        let shapes = [
            (512, 576, 192, false, true),
            (512, 1536, 576, false, false),
            (16, 512, 576, true, false),
            (40, 3000, 48, false, true),
            (512, 64, 512, false, true),
            (7, 33, 5, true, true),
            (300, 700, 2000, false, true),
        ];
        for (m, k, n, ta, tb) in shapes {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let sa = if ta { (1, m) } else { (k, 1) };
            let sb = if tb { (1, k) } else { (n, 1) };
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut c = vec![f32::NAN; m * n];
                pool.install(|| sgemm(m, k, n, &a, sa, &b, sb, &mut c, (n, 1)));
                c
            };
            let one = run(1);
            // Against an f64 product: the kernel really multiplies.
            for i in (0..m).step_by(m.div_ceil(7)) {
                for j in (0..n).step_by(n.div_ceil(7)) {
                    let want: f64 = (0..k)
                        .map(|kk| a[i * sa.0 + kk * sa.1] as f64 * b[kk * sb.0 + j * sb.1] as f64)
                        .sum();
                    let got = one[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (k as f64).sqrt(),
                        "{got} vs {want}"
                    );
                }
            }
            for threads in [2, 3, 5] {
                let other = run(threads);
                assert!(
                    one.iter()
                        .zip(&other)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{m}x{k}x{n} differs between 1 and {threads} threads"
                );
            }
        }
    }
}
