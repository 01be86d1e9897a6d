//! `Program::run_buffers`: the same values as `Program::run`, left in the backend's memory,
//! including the outputs that are not fresh values of the run (a weight returned as is, one
//! node under two names), which come back as copies.
use qplc_compiler::{BlockKind, Graph, Scope};
use qplc_ops::{BinaryOp, DType, Op, TensorType, UnaryOp};
use qplc_runtime::executor::Program;
use qplc_runtime::{Backend, CpuBackend, HostTensor};
use std::collections::HashMap;

/// x·w (= `prod`, also named `prod_again`), exp(x·w) (= `exp`), and the weight itself (= `w`).
fn graph() -> Graph {
    let mut g = Graph::new();
    let s = Scope::new("model", BlockKind::Decoder, Some(0));
    let ty = TensorType::new([3], DType::F32);
    let x = g
        .add(
            Op::Input {
                name: "x".into(),
                ty: ty.clone(),
            },
            &[],
            &s,
        )
        .unwrap();
    let w = g
        .add(
            Op::Weight {
                name: "w".into(),
                ty,
            },
            &[],
            &s,
        )
        .unwrap();
    let prod = g.add(Op::Binary(BinaryOp::Mul), &[x, w], &s).unwrap();
    let exp = g.add(Op::Unary(UnaryOp::Exp), &[prod], &s).unwrap();
    g.set_output("prod", prod);
    g.set_output("prod_again", prod);
    g.set_output("exp", exp);
    g.set_output("w", w);
    g
}

#[test]
fn run_buffers_returns_what_run_downloads() {
    let g = graph();
    let prog = Program::new(&g, &[]).unwrap();
    let cpu = CpuBackend::new();
    let weights = HashMap::from([("w".to_string(), HostTensor::f32([3], vec![0.5, -1.0, 2.0]))]);
    let inputs = HashMap::from([("x".to_string(), HostTensor::f32([3], vec![1.0, 2.0, 3.0]))]);
    let host = prog
        .run(&cpu, &|n| weights.get(n), &|n| inputs.get(n))
        .unwrap();
    let (bufs, stats) = prog
        .run_buffers(&cpu, &|n| weights.get(n), &|n| inputs.get(n))
        .unwrap();
    assert_eq!(stats.nodes_executed, host.stats.nodes_executed);
    assert_eq!(bufs.len(), 4);
    for name in ["prod", "prod_again", "exp", "w"] {
        let b = cpu.download(&bufs[name]).unwrap();
        assert_eq!(&b, host.get(name).unwrap(), "{name}");
    }
    assert_eq!(bufs["prod"].as_f32(), &[0.5, -2.0, 6.0]);
    assert_eq!(bufs["w"].as_f32(), &[0.5, -1.0, 2.0]);
}
