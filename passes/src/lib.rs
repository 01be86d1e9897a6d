//! Graph passes of qplc. Each pass is a named `Graph -> Result<Graph>` step run by the
//! [`PassManager`]; analysis passes (partition, schedule) leave their results in the
//! [`PassContext`]. [`compile`] runs the passes and assembles the [`Plan`](qplc_compiler::Plan).
pub mod compile;
pub mod memory;
pub mod partition;
pub mod pass;
pub mod report;
pub mod schedule;
pub mod topology;

pub use compile::{assemble_plan, compile};
pub use memory::{assign_offsets, LiveRange, MemoryOptions};
pub use partition::{
    partition, partition_balanced, partition_uniform, PartitionError, PartitionMethod,
};
pub use pass::{PartitionPass, Pass, PassContext, PassDump, PassManager, PassRun, SchedulePass};
pub use report::{build_report, format_bytes, render_json, render_text};
pub use schedule::{schedule, schedule_text, ScheduleError};
pub use topology::{Topology, TopologyError};
pub mod full_ft;
pub mod lora;
pub mod targets;
pub use full_ft::FullFtPass;
pub use lora::{lora_weight_name, parse_lora_weight_name, LoraPass, LoraRole, DROPOUT_KEY};
pub use targets::{LoraSelection, ModuleMatch};
pub mod autodiff;
pub mod loss;
pub use autodiff::{append_backward, grad_output_name, AutodiffPass, GRAD_PREFIX};
pub use loss::{append_loss, LossPass, IGNORE_INDEX};
pub mod fuse;
pub use fuse::{cross_entropy_rules, fuse, op_symbol, FusePass, FuseRule, FuseStats};
pub mod control;
pub use control::{
    control_weight_name, parse_control_weight_name, ControlPass, ControlRole, CONTROL_CLASSES,
};
pub mod simplify;
pub use simplify::{simplify, SimplifyPass, SimplifyStats};
pub mod min_cut;
pub mod recompute;
pub use recompute::{recompute, CheckpointPolicy, RecomputePass, RecomputeStats};
pub mod accumulate;
pub use accumulate::{accumulate, AccumulatePass};
pub mod fuse_elementwise;
pub use fuse_elementwise::{fuse_elementwise, FuseElementwisePass, FuseElementwiseStats};
