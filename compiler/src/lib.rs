//! The compiler core: graph IR, model DSL, graph builder, plans and dumps.
pub mod graph;

pub use graph::{BlockKind, Graph, GraphError, Node, NodeId, Scope};
