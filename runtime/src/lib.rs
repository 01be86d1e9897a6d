//! The runtime: backends (CPU reference), weight loading, tokenizer, scoring and generation.
pub mod backend;
pub mod model;
pub mod compile;
pub mod checkpoint;
pub mod cpu;
pub mod executor;
pub mod tensor;

pub use backend::{Backend, KernelError};
pub use cpu::CpuBackend;
pub use tensor::{Data, HostTensor};
