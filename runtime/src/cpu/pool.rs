//! Recycled host buffers. A training step allocates and frees thousands of activations of
//! a handful of sizes; fresh large allocations come from the OS as untouched pages whose
//! first write faults and zeroes every 4 KiB page, which cost more than the elementwise
//! kernels themselves (profiled with `QPLC_PROFILE=1`). Freed buffers wait here, keyed by
//! element count, and the next allocation of that size takes one back.
use crate::tensor::Data;
use std::collections::HashMap;
use std::sync::Mutex;

/// Most bytes the pool keeps; buffers released beyond it go back to the allocator. Enough
/// for every activation size of a training step to be recycled, small next to the
/// activations themselves.
const MAX_POOLED_BYTES: usize = 2 << 30;

/// Buffers shorter than this come from the allocator directly: its size classes already
/// reuse them cheaply.
const MIN_POOLED_LEN: usize = 4096;

#[derive(Default)]
pub(crate) struct Pool {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    f32s: HashMap<usize, Vec<Vec<f32>>>,
    i32s: HashMap<usize, Vec<Vec<i32>>>,
    bytes: usize,
}

impl Pool {
    /// Storage for `len` elements. Its contents are unspecified (`Backend::alloc`): kernels
    /// write every element of their output. Debug builds fill recycled storage with NaN
    /// (and −1 for integers) so a kernel that forgets an element fails the tests.
    pub(crate) fn take(&self, float: bool, len: usize) -> Data {
        if len >= MIN_POOLED_LEN {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let taken = if float {
                inner
                    .f32s
                    .get_mut(&len)
                    .and_then(Vec::pop)
                    .map(poisoned_f32)
                    .map(Data::F32)
            } else {
                inner
                    .i32s
                    .get_mut(&len)
                    .and_then(Vec::pop)
                    .map(poisoned_i32)
                    .map(Data::I32)
            };
            if let Some(d) = taken {
                inner.bytes -= len * 4;
                return d;
            }
        }
        if float {
            Data::F32(vec![0.0; len])
        } else {
            Data::I32(vec![0; len])
        }
    }

    /// Keeps `data` for a later `take` of the same length, within `MAX_POOLED_BYTES`.
    pub(crate) fn give(&self, data: Data) {
        let len = match &data {
            Data::F32(v) => v.len(),
            Data::I32(v) => v.len(),
        };
        if len < MIN_POOLED_LEN {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.bytes + len * 4 > MAX_POOLED_BYTES {
            return;
        }
        inner.bytes += len * 4;
        match data {
            Data::F32(v) => inner.f32s.entry(len).or_default().push(v),
            Data::I32(v) => inner.i32s.entry(len).or_default().push(v),
        }
    }
}

fn poisoned_f32(mut v: Vec<f32>) -> Vec<f32> {
    if cfg!(debug_assertions) {
        v.fill(f32::NAN);
    }
    v
}

fn poisoned_i32(mut v: Vec<i32>) -> Vec<i32> {
    if cfg!(debug_assertions) {
        v.fill(-1);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_buffer_is_reused_for_the_same_length_only() {
        let pool = Pool::default();
        let Data::F32(v) = pool.take(true, 10_000) else {
            panic!()
        };
        let ptr = v.as_ptr();
        pool.give(Data::F32(v));
        let Data::F32(other) = pool.take(true, 10_001) else {
            panic!()
        };
        assert_ne!(other.as_ptr(), ptr);
        let Data::F32(again) = pool.take(true, 10_000) else {
            panic!()
        };
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(again.len(), 10_000);
        assert!(matches!(pool.take(false, 10_000), Data::I32(v) if v.len() == 10_000));
    }
}
