//! The caching allocator of the CUDA backend: a buffer given back (a `CudaTensor` dropped or
//! released, a scratch array going out of scope) goes to a free list keyed by its element
//! kind and count, and the next request of the same kind and count takes it instead of
//! calling `cuMemAlloc`. A training step allocates the same shapes every step, so after the
//! first one no device allocation happens (`mallocs` stops growing).
//!
//! Every live device buffer is counted, weights included: `bytes_in_use` (what tensors hold
//! now), its high-water mark `peak_bytes_in_use` (what `qplc bench` reports) and
//! `bytes_reserved` (in use plus cached). When the device runs out of memory the cache is
//! freed and the allocation retried once.
//!
//! Reuse is safe without events: the backend has one stream, so a kernel that reads a
//! buffer is queued before any kernel that overwrites it after reuse.
use super::cuda_err;
use crate::backend::KernelError;
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// The element kinds buffers are kept apart by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    F32,
    BF16,
    I32,
    F64,
}

/// An owned device buffer of any kind, as the free list holds it.
pub(crate) enum Slab {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<u16>),
    I32(CudaSlice<i32>),
    F64(CudaSlice<f64>),
}

impl Slab {
    fn kind_len(&self) -> (Kind, usize) {
        match self {
            Slab::F32(s) => (Kind::F32, s.len()),
            Slab::BF16(s) => (Kind::BF16, s.len()),
            Slab::I32(s) => (Kind::I32, s.len()),
            Slab::F64(s) => (Kind::F64, s.len()),
        }
    }
}

fn bytes(kind: Kind, len: usize) -> usize {
    len * match kind {
        Kind::BF16 => 2,
        Kind::F32 | Kind::I32 => 4,
        Kind::F64 => 8,
    }
}

/// Element types the pool hands out.
pub(crate) trait Element: DeviceRepr + Sized {
    const KIND: Kind;
    fn wrap(s: CudaSlice<Self>) -> Slab;
    fn unwrap(s: Slab) -> Option<CudaSlice<Self>>;
}

macro_rules! element {
    ($t:ty, $k:ident) => {
        impl Element for $t {
            const KIND: Kind = Kind::$k;
            fn wrap(s: CudaSlice<Self>) -> Slab {
                Slab::$k(s)
            }
            fn unwrap(s: Slab) -> Option<CudaSlice<Self>> {
                match s {
                    Slab::$k(s) => Some(s),
                    _ => None,
                }
            }
        }
    };
}
element!(f32, F32);
element!(u16, BF16);
element!(i32, I32);
element!(f64, F64);

#[derive(Default)]
struct Inner {
    free: HashMap<(Kind, usize), Vec<Slab>>,
    in_use: usize,
    peak: usize,
    reserved: usize,
    mallocs: u64,
}

/// The free lists and counters of one backend (shared by its tensors, which give their
/// buffers back when dropped).
pub(crate) struct Pool {
    stream: Arc<CudaStream>,
    inner: Mutex<Inner>,
}

impl Pool {
    pub(crate) fn new(stream: Arc<CudaStream>) -> Self {
        Pool {
            stream,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves only counters behind; they stay usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of `n` elements (one at least: a zero-byte cuMemAlloc is an error), reused
    /// from the free list when one of that kind and length is there. Contents unspecified.
    pub(crate) fn take<T: Element>(&self, n: usize) -> Result<CudaSlice<T>, KernelError> {
        let len = n.max(1);
        let key = (T::KIND, len);
        let size = bytes(T::KIND, len);
        let mut g = self.lock();
        let reused = g.free.get_mut(&key).and_then(|v| v.pop());
        let s = match reused.and_then(T::unwrap) {
            Some(s) => s,
            None => {
                // SAFETY: contents are unspecified until a kernel writes them, as the
                // Backend contract says of `alloc`.
                let fresh = match unsafe { self.stream.alloc::<T>(len) } {
                    Ok(s) => s,
                    Err(_) => {
                        // Out of memory, most likely: give the cached buffers back to the
                        // driver and try once more.
                        Self::trim_locked(&mut g);
                        unsafe { self.stream.alloc::<T>(len) }.map_err(|e| {
                            cuda_err(
                                "alloc",
                                &format!(
                                    "{n} elements of {:?} ({size} bytes; {} bytes in use)",
                                    T::KIND,
                                    g.in_use
                                ),
                                e,
                            )
                        })?
                    }
                };
                g.mallocs += 1;
                g.reserved += size;
                fresh
            }
        };
        g.in_use += size;
        g.peak = g.peak.max(g.in_use);
        Ok(s)
    }

    /// Takes a buffer back into the free list.
    pub(crate) fn give(&self, s: Slab) {
        let (kind, len) = s.kind_len();
        let mut g = self.lock();
        g.in_use = g.in_use.saturating_sub(bytes(kind, len));
        g.free.entry((kind, len)).or_default().push(s);
    }

    fn trim_locked(g: &mut Inner) {
        let cached: usize = g
            .free
            .iter()
            .map(|((k, len), v)| bytes(*k, *len) * v.len())
            .sum();
        g.free.clear();
        g.reserved = g.reserved.saturating_sub(cached);
    }

    /// Frees every cached (unused) buffer.
    pub(crate) fn trim(&self) {
        Self::trim_locked(&mut self.lock());
    }

    pub(crate) fn in_use(&self) -> usize {
        self.lock().in_use
    }

    pub(crate) fn peak(&self) -> usize {
        self.lock().peak
    }

    pub(crate) fn reserved(&self) -> usize {
        self.lock().reserved
    }

    pub(crate) fn mallocs(&self) -> u64 {
        self.lock().mallocs
    }

    pub(crate) fn reset_peak(&self) {
        let mut g = self.lock();
        g.peak = g.in_use;
    }
}

/// A scratch array of the dispatch code (attention statistics, log-sum-exps, a widened
/// product) that goes back to the pool when it goes out of scope.
pub(crate) struct Scratch<T: Element> {
    s: Option<CudaSlice<T>>,
    pool: Arc<Pool>,
}

impl<T: Element> Scratch<T> {
    pub(crate) fn new(pool: &Arc<Pool>, n: usize) -> Result<Self, KernelError> {
        Ok(Scratch {
            s: Some(pool.take::<T>(n)?),
            pool: pool.clone(),
        })
    }
}

impl<T: Element> std::ops::Deref for Scratch<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        self.s.as_ref().expect("present until drop")
    }
}

impl<T: Element> std::ops::DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        self.s.as_mut().expect("present until drop")
    }
}

impl<T: Element> Drop for Scratch<T> {
    fn drop(&mut self) {
        if let Some(s) = self.s.take() {
            self.pool.give(T::wrap(s));
        }
    }
}
