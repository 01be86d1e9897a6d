//! The runtime: backends (CPU reference), weight loading, tokenizer, scoring and generation.
pub mod backend;
pub mod chat;
pub mod checkpoint;
pub mod compile;
pub mod cpu;
pub mod data;
pub mod executor;
pub mod generate;
pub mod model;
pub mod score;
pub mod tensor;
pub mod tokenizer;
pub mod train;

pub use backend::{Backend, KernelError};
pub use cpu::CpuBackend;
pub use tensor::{Data, HostTensor};
pub mod adapter_init;
pub mod ca_files;
pub mod export;
pub mod log;
pub mod peft;
pub mod trainer;
