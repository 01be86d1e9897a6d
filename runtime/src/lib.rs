//! The runtime: backends (CPU reference), weight loading, tokenizer, scoring and generation.
pub mod tensor;

pub use tensor::{Data, HostTensor};
