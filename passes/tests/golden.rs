//! Golden "filetests": the text dump and the schedule of small graphs, compared with files
//! under `tests/golden/`. Set `UPDATE_GOLDEN=1` to rewrite them after an intended change,
//! then review the diff.
mod common;
use common::*;
use qplc_compiler::dump::to_text;
use qplc_compiler::Graph;
use qplc_passes::{partition, schedule, schedule_text, MemoryOptions};
use std::path::PathBuf;

fn check(name: &str, graph: &Graph, method: &str, stages: usize) {
    let p = partition(graph, method, stages, None).unwrap();
    let s = schedule(graph, &p, &MemoryOptions::default()).unwrap();
    let actual = format!(
        "; partition_method = {method:?}, pipeline_stages = {stages}, boundaries {:?}\n{}\n{}",
        p.boundaries,
        to_text(graph),
        schedule_text(graph, &s)
    );
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    assert_eq!(
        actual,
        expected,
        "{} differs (UPDATE_GOLDEN=1 rewrites it)",
        path.display()
    );
}

#[test]
fn toy_model_two_layers_on_two_stages() {
    check("toy_model_2_layers_2_stages", &toy_model(2), "uniform", 2);
}

#[test]
fn chain_of_four_on_one_stage() {
    check("chain_4", &chain(4), "uniform", 1);
}
