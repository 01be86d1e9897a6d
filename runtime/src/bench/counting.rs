//! A `Backend` wrapper that counts the bytes of live buffers, for the peak-memory figure of
//! `qplc bench`: every allocation the executor makes goes through `alloc`/`upload`, every
//! intermediate comes back through `release`, so the counter is an allocator's
//! bytes-in-use, exact to the buffer (no pool slack, no library workspaces).
use crate::backend::{Backend, InPlace, KernelError};
use crate::HostTensor;
use qplc_ops::{Op, TensorType};
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Counting<'b, B: Backend> {
    pub inner: &'b B,
    /// Bytes a buffer occupies in `inner`'s memory (its storage, not its logical dtype).
    bytes: fn(&B::Buffer) -> usize,
    live: AtomicUsize,
    peak: AtomicUsize,
}

impl<'b, B: Backend> Counting<'b, B> {
    pub fn new(inner: &'b B, bytes: fn(&B::Buffer) -> usize) -> Self {
        Counting {
            inner,
            bytes,
            live: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    /// Counts memory held outside the executor (weights, optimiser state).
    pub fn hold(&self, bytes: usize) {
        let now = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn drop_bytes(&self, bytes: usize) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub fn live_bytes(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    pub fn peak_bytes(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    fn counted(&self, buf: B::Buffer) -> B::Buffer {
        self.hold((self.bytes)(&buf));
        buf
    }
}

impl<B: Backend> Backend for Counting<'_, B> {
    type Buffer = B::Buffer;

    fn synchronize(&self) -> Result<(), KernelError> {
        self.inner.synchronize()
    }

    fn name(&self) -> String {
        self.inner.name()
    }

    fn alloc(&self, ty: &TensorType) -> Result<B::Buffer, KernelError> {
        self.inner.alloc(ty).map(|b| self.counted(b))
    }

    fn execute_in_place(
        &self,
        op: &Op,
        target: usize,
        buf: B::Buffer,
        others: &[&B::Buffer],
        out_ty: &TensorType,
    ) -> Result<InPlace<B::Buffer>, KernelError> {
        let before = (self.bytes)(&buf);
        let r = self.inner.execute_in_place(op, target, buf, others, out_ty);
        // An error drops the buffer inside the backend.
        match &r {
            Ok(InPlace::Done(b)) | Ok(InPlace::Declined(b)) => {
                let after = (self.bytes)(b);
                self.drop_bytes(before);
                self.hold(after);
            }
            Err(_) => self.drop_bytes(before),
        }
        r
    }

    fn release(&self, buf: B::Buffer) {
        self.drop_bytes((self.bytes)(&buf));
        self.inner.release(buf);
    }

    fn upload(&self, t: &HostTensor) -> Result<B::Buffer, KernelError> {
        self.inner.upload(t).map(|b| self.counted(b))
    }

    fn download(&self, buf: &B::Buffer) -> Result<HostTensor, KernelError> {
        self.inner.download(buf)
    }

    fn download_owned(&self, buf: B::Buffer) -> Result<HostTensor, KernelError> {
        self.drop_bytes((self.bytes)(&buf));
        self.inner.download_owned(buf)
    }

    fn buffer_type<'a>(&self, buf: &'a B::Buffer) -> &'a TensorType {
        self.inner.buffer_type(buf)
    }

    fn execute(
        &self,
        op: &Op,
        operands: &[&B::Buffer],
        out: &mut B::Buffer,
    ) -> Result<(), KernelError> {
        self.inner.execute(op, operands, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend;
    use qplc_ops::{DType, Shape};

    fn host_bytes(t: &HostTensor) -> usize {
        t.ty.shape.numel() * 4
    }

    #[test]
    fn counts_live_buffers_and_keeps_the_peak() {
        let cpu = CpuBackend::new();
        let c = Counting::new(&cpu, host_bytes);
        let ty = TensorType::new(Shape::new(vec![10]), DType::F32);
        let a = c.alloc(&ty).unwrap();
        let b = c.alloc(&ty).unwrap();
        assert_eq!(c.live_bytes(), 80);
        c.release(a);
        assert_eq!(c.live_bytes(), 40);
        let _ = c.download_owned(b).unwrap();
        assert_eq!(c.live_bytes(), 0);
        assert_eq!(c.peak_bytes(), 80);
        c.hold(100);
        assert_eq!(c.peak_bytes(), 100);
    }
}
