//! The runtime: backends (CPU reference), weight loading, tokenizer, scoring and generation.
pub mod backend;
pub mod chat;
pub mod checkpoint;
pub mod compile;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod executor;
pub mod generate;
pub mod hf_weights;
pub mod model;
pub mod score;
pub mod step_runner;
pub mod tensor;
pub mod tokenize_fast;
pub mod tokenizer;
pub mod train;

pub use backend::{Backend, KernelError};
pub use cpu::CpuBackend;
pub use tensor::{Data, HostTensor};
pub mod adapter_init;
pub mod bench;
pub mod ca_files;
pub mod export;
pub mod log;
pub mod peft;
pub mod trainer;
