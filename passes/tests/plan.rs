mod common;
use common::*;
use qplc_compiler::{BlockKind, Plan, PlanConfig, PlanError, PlanModel, Scope};
use qplc_ops::{DType, Op, UnaryOp};
use qplc_passes::{compile, render_text, PassContext, PassManager};

fn toy_plan(stages: usize) -> Plan {
    let config = PlanConfig {
        toml: "pipeline_stages = 2\npartition_method = \"uniform\"\n".into(),
        resolved: serde_json::json!({"pipeline_stages": stages, "lora_rank": 8}),
    };
    let model = PlanModel {
        arch: "llama".into(),
        num_layers: 4,
        hidden_size: H,
        vocab_size: V,
        seq_len: T,
        dtype: DType::BF16,
    };
    let mut cx = PassContext::new(T, stages, "uniform");
    cx.num_layers = Some(4);
    let (plan, _) = compile(toy_model(4), &PassManager::standard(), cx, config, model).unwrap();
    plan
}

#[test]
fn plan_json_round_trips_through_a_file() {
    let plan = toy_plan(2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.json");
    plan.write(&path).unwrap();
    let back = Plan::read(&path).unwrap();
    assert_eq!(back.to_json().unwrap(), plan.to_json().unwrap());
    assert_eq!(back.partition, plan.partition);
    assert_eq!(back.stages, plan.stages);
    assert_eq!(back.report, plan.report);
    assert_eq!(back.config, plan.config);
    assert_eq!(back.model, plan.model);
    assert_eq!(back.graph.g.node_count(), plan.graph.g.node_count());
    for id in plan.graph.g.node_indices() {
        assert_eq!(back.graph.node(id), plan.graph.node(id));
        assert_eq!(back.graph.operands(id), plan.graph.operands(id));
    }
    assert_eq!(back.graph.outputs, plan.graph.outputs);
    back.graph.verify().unwrap();
}

#[test]
fn graph_with_removed_nodes_keeps_its_indices_in_the_plan() {
    // Passes delete nodes; StableGraph indices (which the partition and schedule refer
    // to) must survive serialisation with holes.
    let mut plan = toy_plan(1);
    let mut g = toy_model(4);
    let norm = Scope::new("x", BlockKind::Norm, None);
    let stray = g
        .add(Op::Unary(UnaryOp::Exp), &[g.outputs[0].1], &norm)
        .unwrap();
    let extra = g.add(Op::Unary(UnaryOp::Exp), &[stray], &norm).unwrap();
    g.g.remove_node(stray);
    g.g.remove_node(extra);
    let removed_then_added = g
        .add(Op::Unary(UnaryOp::Exp), &[g.outputs[0].1], &norm)
        .unwrap();
    plan.graph = g;
    let back = Plan::from_json(&plan.to_json().unwrap(), "test").unwrap();
    assert_eq!(back.graph.node(removed_then_added).module, "x");
    assert_eq!(back.graph.g.node_count(), plan.graph.g.node_count());
}

#[test]
fn plan_of_another_format_version_is_refused() {
    let mut v: serde_json::Value = serde_json::from_str(&toy_plan(1).to_json().unwrap()).unwrap();
    v["format_version"] = 999.into();
    let e = Plan::from_json(&v.to_string(), "old/plan.json").unwrap_err();
    assert!(matches!(e, PlanError::Version { found: 999, .. }));
    assert!(e.to_string().contains("run `qplc compile` again"));
}

#[test]
fn report_lists_each_stage_with_layers_params_and_memory() {
    let plan = toy_plan(2);
    let r = &plan.report;
    assert_eq!(r.total_params, plan.graph.param_count());
    assert_eq!(r.flops, plan.graph.flops());
    assert_eq!(r.stages.len(), 2);
    assert_eq!(r.stages[0].layer_names, "PrepareInputs … DecoderLayer 2");
    assert_eq!(r.stages[1].layer_names, "DecoderLayer 3 … Loss");
    assert_eq!(
        r.total_activation_bytes,
        plan.stages.iter().map(|s| s.arena_bytes).sum::<u64>()
    );
    let text = render_text(r);
    assert!(text.contains("parameters: "), "{text}");
    assert!(
        text.contains("FLOPs of one forward at sequence_len 8"),
        "{text}"
    );
    assert!(
        text.contains("0..5 PrepareInputs … DecoderLayer 2"),
        "{text}"
    );
    assert!(text.contains("KiB"), "{text}");
    assert!(text.contains("predicted memory:"), "{text}");
}
