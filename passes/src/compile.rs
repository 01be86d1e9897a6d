//! Running the passes and assembling the [`Plan`].
use crate::pass::{PassContext, PassManager, PassRun};
use crate::report::build_report;
use anyhow::Context;
use qplc_compiler::{Graph, Plan, PlanConfig, PlanModel, PLAN_FORMAT_VERSION};

/// Runs `passes` (which must include partition and schedule) over `graph` and assembles
/// the plan. Returns the plan and the dumps the manager was asked for.
pub fn compile(
    graph: Graph,
    passes: &PassManager,
    mut cx: PassContext,
    config: PlanConfig,
    model: PlanModel,
) -> anyhow::Result<(Plan, Vec<crate::pass::PassDump>)> {
    let PassRun { graph, dumps } = passes.run(graph, &mut cx)?;
    let plan = assemble_plan(graph, &cx, config, model)?;
    Ok((plan, dumps))
}

/// Builds the plan from a final graph and the analysis results left in `cx`.
pub fn assemble_plan(
    graph: Graph,
    cx: &PassContext,
    config: PlanConfig,
    model: PlanModel,
) -> anyhow::Result<Plan> {
    let partition = cx
        .partition
        .clone()
        .context("no partition: the `partition` pass did not run")?;
    let stages = cx
        .stages
        .clone()
        .context("no schedule: the `schedule` pass did not run")?;
    let mut report = build_report(&graph, &partition, &stages, cx.seq_len, &cx.offloaded)?;
    report.notes.extend(cx.notes.iter().cloned());
    Ok(Plan {
        format_version: PLAN_FORMAT_VERSION,
        config,
        model,
        graph,
        partition,
        stages,
        report,
    })
}
