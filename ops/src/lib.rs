//! The op vocabulary of qplc: element types, static shapes, the ops themselves and their
//! shape/dtype inference. Knows nothing about graphs, files or devices.
pub mod dropout;
mod dtype;
mod grad;
mod infer;
mod op;
mod shape;

pub use dtype::DType;
pub use grad::{is_differentiable, sum_to, GradExpr};
pub use infer::{broadcast, OpError};
pub use op::{BinaryOp, FusedArg, FusedStep, Op, ReduceOp, Rope, RopeScaling, UnaryOp};
pub use shape::{Shape, TensorType};

#[cfg(test)]
mod tests;
