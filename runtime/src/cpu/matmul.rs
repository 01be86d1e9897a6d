//! Matrix products: `Linear` (x·Wᵀ + b with HF's `[out, in]` weights) and batched `MatMul`.
//! The inner kernel is `matrixmultiply`'s packed, SIMD-dispatched sgemm (AVX2/FMA where the
//! CPU has it) with f32 accumulation; we split the product across rayon threads ourselves
//! so that one thread pool (rayon's) drives every kernel of the backend.
use super::{f32s, f32s_mut};
use crate::backend::KernelError;
use crate::HostTensor;
use rayon::prelude::*;

/// A raw output pointer shared by tasks that write disjoint parts of one matrix.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks holding a SendPtr write pairwise disjoint elements (disjoint row or
// column ranges of C), and the owning `&mut [f32]` outlives the parallel scope.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Below this many multiply-adds a product runs on the calling thread: splitting costs
/// more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 18;

fn max_offset(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    (rows - 1) * rs + (cols - 1) * cs
}

/// `C = A·B` for `A [m, k]`, `B [k, n]`, `C [m, n]`, each given as a slice and
/// (row stride, column stride) in elements, so transposed views cost nothing. Splits the
/// rows of C (or its columns when there are few rows) across rayon threads.
///
/// Panics if a view reaches outside its slice: callers derive strides from shapes that
/// `Op::infer` has checked, so that is a bug in the caller, not bad input.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    c: &mut [f32],
    (rsc, csc): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        max_offset(m, n, rsc, csc) < c.len(),
        "sgemm: C view out of bounds"
    );
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                c[i * rsc + j * csc] = 0.0;
            }
        }
        return;
    }
    assert!(
        max_offset(m, k, rsa, csa) < a.len(),
        "sgemm: A view out of bounds"
    );
    assert!(
        max_offset(k, n, rsb, csb) < b.len(),
        "sgemm: B view out of bounds"
    );
    let cptr = SendPtr(c.as_mut_ptr());
    let threads = rayon::current_num_threads();
    let call = |i0: usize, i1: usize, j0: usize, j1: usize| {
        // SAFETY: bounds were asserted above for the whole views; (i0..i1, j0..j1) is a
        // sub-block, and blocks given to different tasks are disjoint.
        unsafe {
            matrixmultiply::sgemm(
                i1 - i0,
                k,
                j1 - j0,
                1.0,
                a.as_ptr().add(i0 * rsa),
                rsa as isize,
                csa as isize,
                b.as_ptr().add(j0 * csb),
                rsb as isize,
                csb as isize,
                0.0,
                cptr.get().add(i0 * rsc + j0 * csc),
                rsc as isize,
                csc as isize,
            )
        }
    };
    if threads == 1 || m * n * k < PARALLEL_MIN_MACS {
        call(0, m, 0, n);
        return;
    }
    // Rows when there are enough for every thread (multiples of 16 keep whole micro-tiles
    // per task); otherwise columns (decode-like products with a handful of rows).
    if m >= 16 * threads {
        let chunk = m.div_ceil(threads).next_multiple_of(16);
        (0..m.div_ceil(chunk))
            .into_par_iter()
            .for_each(|p| call(p * chunk, ((p + 1) * chunk).min(m), 0, n));
    } else {
        let chunk = n.div_ceil(threads).next_multiple_of(16);
        (0..n.div_ceil(chunk))
            .into_par_iter()
            .for_each(|p| call(0, m, p * chunk, ((p + 1) * chunk).min(n)));
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
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    c: *mut f32,
    (rsc, csc): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(k > 0, "sgemm_into_raw: empty inner dimension");
    assert!(
        max_offset(m, k, rsa, csa) < a.len(),
        "sgemm: A view out of bounds"
    );
    assert!(
        max_offset(k, n, rsb, csb) < b.len(),
        "sgemm: B view out of bounds"
    );
    // SAFETY: A and B bounds asserted; C is the caller's promise.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            0.0,
            c,
            rsc as isize,
            csc as isize,
        )
    }
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
    if batch >= rayon::current_num_threads() {
        // Many small products (attention-like): one per task; each sgemm then sees a
        // single-thread budget because the pool is busy.
        cv.par_chunks_mut(csz)
            .enumerate()
            .for_each(|(i, c)| one(i, c));
    } else {
        cv.chunks_mut(csz).enumerate().for_each(|(i, c)| one(i, c));
    }
    Ok(())
}
