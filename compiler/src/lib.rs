//! The compiler core: graph IR, model DSL, graph builder, plans and dumps.
pub mod config;
pub mod graph;

pub use graph::{BlockKind, Graph, GraphError, Node, NodeId, Scope};
