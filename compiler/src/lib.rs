//! The compiler core: graph IR, model DSL, graph builder, plans and dumps.
pub mod build;
pub mod config;
pub mod dsl;
pub mod dump;
pub mod graph;
pub mod models;
pub mod plan;

pub use build::{build_forward, BuildError, BuildOptions, BuiltModel, ModelInfo, WeightInfo};
pub use dsl::{Diagnostic, ModelDef};
pub use graph::{BlockKind, Graph, GraphError, Node, NodeId, Scope};
pub use models::{load_model_def, ModelLoadError};
pub use plan::{
    BufferAssignment, CompileReport, LayerEntry, LayerList, Partition, Plan, PlanConfig, PlanError,
    PlanModel, StagePlan, StageReport, PLAN_FORMAT_VERSION,
};
