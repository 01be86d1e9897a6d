mod common;
use common::*;
use qplc_compiler::dump::{DumpFormat, DumpView};
use qplc_compiler::{BlockKind, Graph, Scope};
use qplc_ops::{DType, Op, TensorType, UnaryOp};
use qplc_passes::{Pass, PassContext, PassManager};

#[test]
fn standard_passes_leave_partition_and_schedule_in_the_context() {
    let pm = PassManager::standard();
    assert_eq!(pm.names(), ["partition", "schedule"]);
    let mut cx = PassContext::new(T, 2, "uniform");
    let run = pm.run(toy_model(3), &mut cx).unwrap();
    assert!(run.dumps.is_empty());
    assert_eq!(cx.partition.as_ref().unwrap().num_stages(), 2);
    assert_eq!(cx.stages.as_ref().unwrap().len(), 2);
    assert_eq!(run.graph.g.node_count(), toy_model(3).g.node_count());
}

#[test]
fn dump_after_a_named_pass_returns_the_graph_in_that_format() {
    let mut pm = PassManager::standard();
    pm.dump_after("partition", DumpFormat::Text, DumpView::Full)
        .unwrap()
        .dump_after("build", DumpFormat::Dot, DumpView::Collapsed)
        .unwrap();
    let mut cx = PassContext::new(T, 1, "uniform");
    let run = pm.run(toy_model(1), &mut cx).unwrap();
    assert_eq!(run.dumps.len(), 2);
    assert_eq!(run.dumps[0].pass, "build");
    assert_eq!(run.dumps[0].file_name(), "after-build.collapsed.dot");
    assert!(run.dumps[0].text.starts_with("digraph"));
    assert_eq!(run.dumps[1].file_name(), "after-partition.txt");
    assert!(run.dumps[1].text.contains(" = linear("));
}

#[test]
fn dump_after_unknown_pass_lists_the_passes() {
    let mut pm = PassManager::standard();
    let e = pm
        .dump_after("autodiff", DumpFormat::Dot, DumpView::Full)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("build, partition, schedule, all"), "{e}");
}

/// A broken rewrite: retypes a node without changing its op.
struct Corrupt;

impl Pass for Corrupt {
    fn name(&self) -> &str {
        "corrupt"
    }
    fn run(&self, mut graph: Graph, _: &mut PassContext) -> anyhow::Result<Graph> {
        let id = graph
            .g
            .node_indices()
            .find(|&i| graph.node(i).op == Op::Unary(UnaryOp::Silu))
            .unwrap();
        graph.node_mut(id).ty = TensorType::new([1], DType::F32);
        Ok(graph)
    }
}

#[test]
fn verify_after_each_pass_names_the_pass_that_broke_the_graph() {
    let mut pm = PassManager::standard();
    pm.insert_before("partition", Corrupt).unwrap();
    pm.verify_each(true);
    assert_eq!(pm.names(), ["corrupt", "partition", "schedule"]);
    let mut cx = PassContext::new(T, 1, "uniform");
    let e = pm.run(toy_model(1), &mut cx).err().unwrap();
    assert!(
        format!("{e:#}").contains("does not verify after pass `corrupt`"),
        "{e:#}"
    );
}

#[test]
fn pass_errors_carry_the_pass_name() {
    let pm = PassManager::standard();
    let mut cx = PassContext::new(T, 2, "bogus");
    let e = pm.run(toy_model(1), &mut cx).err().unwrap();
    let s = format!("{e:#}");
    assert!(s.contains("pass `partition` failed"), "{s}");
    assert!(s.contains("\"bogus\" is not supported"), "{s}");
    // A node outside the layer list is refused by the partition.
    let mut g = toy_model(1);
    let s = Scope::new("stray", BlockKind::Decoder, None);
    let x = g.inputs()[0].1;
    g.add(Op::Cast { to: DType::F32 }, &[x], &s).unwrap();
    let mut cx = PassContext::new(T, 1, "uniform");
    let e = pm.run(g, &mut cx).err().unwrap();
    assert!(format!("{e:#}").contains("`stray`"), "{e:#}");
}
