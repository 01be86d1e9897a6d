//! The `Backend` abstraction (DESIGN.md "Runtime"): a backend owns buffers in its own
//! memory, moves tensors between the host and those buffers, and executes one op at a time
//! given operand buffers and a preallocated output buffer. The executor
//! (`crate::executor`) is written against this trait only, so the CPU reference backend
//! and a later CUDA backend run the same graphs through the same code.
use crate::HostTensor;
use qplc_ops::{Op, TensorType};
use std::fmt;

/// A kernel refused its inputs or failed while computing: which op, and why. Never a
/// panic — bad data (an out-of-range token id, a negative position, a shape that does not
/// match the op) reaches kernels as values, so it comes back as a value too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelError {
    pub op: &'static str,
    pub message: String,
}

impl KernelError {
    pub fn new(op: &'static str, message: impl Into<String>) -> Self {
        KernelError {
            op,
            message: message.into(),
        }
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, self.message)
    }
}

impl std::error::Error for KernelError {}

/// What `Backend::execute_in_place` did with the buffer it was handed.
pub enum InPlace<B> {
    /// The buffer now holds the op's result, with the output type.
    Done(B),
    /// Not done; the buffer comes back as it was.
    Declined(B),
}

/// One device (or the host) that can hold tensors and run the op vocabulary of
/// `qplc_ops::Op` on them.
///
/// Contract every implementation keeps:
/// * `alloc(ty)` returns a buffer of exactly `ty`; `execute` writes every element of `out`
///   and checks that `out`'s type is what `op.infer` gives for the operands' types;
/// * arithmetic accumulates in f32 at least; a result whose dtype is bf16/f16 holds values
///   rounded to that dtype (the storage precision a GPU would keep);
/// * leaf ops (`Input`, `Weight`) are bound by the caller through `upload` or by passing
///   an existing buffer; `Fill` is executed like any other op, with no operands.
pub trait Backend: Sync {
    /// A tensor living in this backend's memory. Carries its own type.
    type Buffer: Send + Sync;

    /// Short name for logs and reports (`cpu`, `cuda:0`).
    fn name(&self) -> String;

    /// A buffer of type `ty`; its contents are unspecified until an op writes it.
    fn alloc(&self, ty: &TensorType) -> Result<Self::Buffer, KernelError>;

    /// Runs `op` with its result written over operand `target`, whose buffer the caller
    /// hands over because nothing reads that value afterwards; `others` are the remaining
    /// operands in order (the target's position left out) and `out_ty` the op's output
    /// type. A backend without an in-place form of `op` gives the buffer back untouched
    /// (`InPlace::Declined`) and the caller runs `execute` instead. Either way the result
    /// is the one `execute` would produce, bit for bit.
    fn execute_in_place(
        &self,
        op: &Op,
        target: usize,
        buf: Self::Buffer,
        others: &[&Self::Buffer],
        out_ty: &TensorType,
    ) -> Result<InPlace<Self::Buffer>, KernelError> {
        let _ = (op, target, others, out_ty);
        Ok(InPlace::Declined(buf))
    }

    /// Takes back a buffer its holder no longer needs, so that a later `alloc` may reuse its
    /// memory (the executor hands back every intermediate after its last use).
    fn release(&self, buf: Self::Buffer) {
        drop(buf);
    }

    /// Waits until every queued operation has finished. Asynchronous backends (CUDA) need it
    /// for per-op timings (`QPLC_PROFILE=1`); the CPU backend computes synchronously.
    fn synchronize(&self) -> Result<(), KernelError> {
        Ok(())
    }

    /// Copies a host tensor into a new buffer of the same type.
    fn upload(&self, t: &HostTensor) -> Result<Self::Buffer, KernelError>;

    /// Copies a buffer back to the host.
    fn download(&self, buf: &Self::Buffer) -> Result<HostTensor, KernelError>;

    /// Like `download`, consuming the buffer; backends whose buffers already are host
    /// tensors return them without a copy.
    fn download_owned(&self, buf: Self::Buffer) -> Result<HostTensor, KernelError> {
        self.download(&buf)
    }

    /// The type (shape and dtype) of a buffer.
    fn buffer_type<'a>(&self, buf: &'a Self::Buffer) -> &'a TensorType;

    /// Runs one op: reads `operands` (in the op's operand order) and writes `out`.
    fn execute(
        &self,
        op: &Op,
        operands: &[&Self::Buffer],
        out: &mut Self::Buffer,
    ) -> Result<(), KernelError>;
}
