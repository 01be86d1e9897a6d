use super::*;
use crate::graph::{BlockKind, Graph, NodeId, Scope};
use qplc_ops::{BinaryOp, DType, Op, TensorType, UnaryOp};

/// A toy decoder with tied embeddings: inputs → embedding → `layers` × (norm, linear,
/// silu, residual add) → norm → head reading the embedding table.
pub(crate) fn toy_model(layers: usize) -> Graph {
    let (t, h, v) = (8, 16, 32);
    let mut g = Graph::new();
    let inp = Scope::new("", BlockKind::Inputs, None);
    let ids = g
        .add(
            Op::Input {
                name: "input_ids".into(),
                ty: TensorType::new([t], DType::I32),
            },
            &[],
            &inp,
        )
        .unwrap();
    let emb = Scope::new("model.embed_tokens", BlockKind::Embedding, None);
    let table = g
        .add(
            Op::Weight {
                name: "model.embed_tokens.weight".into(),
                ty: TensorType::new([v, h], DType::BF16),
            },
            &[],
            &emb,
        )
        .unwrap();
    let mut x = g.add(Op::Embedding, &[ids, table], &emb).unwrap();
    for i in 0..layers {
        let s = Scope::new(format!("model.layers.{i}"), BlockKind::Decoder, Some(i));
        let y = rms_norm(&mut g, x, &s.child("input_layernorm"), h);
        let p = s.child("mlp").child("up_proj");
        let w = weight(&mut g, &p, [h, h]);
        let y = g.add(Op::Linear, &[y, w], &p).unwrap();
        let y = g.add(Op::Unary(UnaryOp::Silu), &[y], &s).unwrap();
        x = g.add(Op::Binary(BinaryOp::Add), &[x, y], &s).unwrap();
    }
    let norm = Scope::new("model.norm", BlockKind::Norm, None);
    let x = rms_norm(&mut g, x, &norm, h);
    let head = Scope::new("lm_head", BlockKind::Head, None);
    let logits = g.add(Op::Linear, &[x, table], &head).unwrap();
    g.set_output("hidden", x);
    g.set_output("logits", logits);
    g.verify().unwrap();
    g
}

fn weight<const N: usize>(g: &mut Graph, s: &Scope, shape: [usize; N]) -> NodeId {
    g.add(
        Op::Weight {
            name: format!("{}.weight", s.module),
            ty: TensorType::new(shape, DType::BF16),
        },
        &[],
        s,
    )
    .unwrap()
}

fn rms_norm(g: &mut Graph, x: NodeId, s: &Scope, h: usize) -> NodeId {
    let w = weight(g, s, [h]);
    g.add(
        Op::RmsNorm {
            eps: 1e-5,
            offset: 0.0,
        },
        &[x, w],
        s,
    )
    .unwrap()
}

#[test]
fn text_dump_prints_one_line_per_node_in_topo_order() {
    let g = toy_model(1);
    let text = to_text(&g);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), g.g.node_count() + g.outputs.len(), "{text}");
    assert!(
        text.contains("%0 = input{name=\"input_ids\"} : i32[8]  # [inputs]\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "%6 = linear(%4, %5) : bf16[8, 16]  # model.layers.0.mlp.up_proj [decoder 0]"
        ),
        "{text}"
    );
    assert!(
        text.contains("rms_norm{eps=0.00001, offset=0.0}(%2, %3)"),
        "{text}"
    );
    assert!(text.ends_with("output logits = %11\n"), "{text}");
}

#[test]
fn json_dump_lists_nodes_with_operands_and_outputs() {
    let g = toy_model(2);
    let j = to_json(&g);
    let nodes = j["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), g.g.node_count());
    let lin = nodes
        .iter()
        .find(|n| n["module"] == "model.layers.1.mlp.up_proj" && n["op"] == "linear")
        .unwrap();
    assert_eq!(lin["block"], "decoder");
    assert_eq!(lin["layer"], 1);
    assert_eq!(lin["type"], "bf16[8, 16]");
    assert_eq!(lin["operands"].as_array().unwrap().len(), 2);
    assert_eq!(j["outputs"][1]["name"], "logits");
}

#[test]
fn dot_dump_gives_weights_and_inputs_their_own_shapes() {
    let g = toy_model(1);
    let dot = to_dot(&g);
    assert!(dot.starts_with("digraph qplc {"));
    assert!(dot.contains("shape=invhouse"), "{dot}");
    assert!(dot.contains("shape=cylinder"), "{dot}");
    assert!(dot.contains("label=\"linear\\nbf16[8, 16]\\nmodel.layers.0.mlp.up_proj\""));
    assert!(dot.contains("subgraph cluster_2"), "{dot}");
    assert!(dot.trim_end().ends_with('}'));
}

#[test]
fn collapsed_view_has_one_box_per_pipeline_layer_with_params_and_flops() {
    let g = toy_model(3);
    let c = collapse(&g);
    let labels: Vec<&str> = c.boxes.iter().map(|b| b.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "PrepareInputs",
            "Embedding",
            "DecoderLayer 0",
            "DecoderLayer 1",
            "DecoderLayer 2",
            "Norm",
            "LmHead"
        ]
    );
    // The tied table counts on both the embedding and the head.
    assert_eq!(c.boxes[1].params, 32 * 16);
    assert_eq!(c.boxes[6].params, 32 * 16);
    assert_eq!(c.boxes[2].params, 16 + 16 * 16);
    assert_eq!(c.boxes[6].flops, 2 * 8 * 32 * 16);
    assert!(c.edges.contains(&CollapsedEdge {
        from: 2,
        to: 3,
        weights_only: false
    }));
    assert!(c.edges.contains(&CollapsedEdge {
        from: 1,
        to: 6,
        weights_only: true
    }));
    let dot = to_dot_collapsed(&g);
    assert!(
        dot.contains("l3 [label=\"DecoderLayer 1\\n272 params\\n"),
        "{dot}"
    );
    assert!(dot.contains("l1 -> l6 [style=dashed"), "{dot}");
}

#[test]
fn format_parse_accepts_the_cli_names() {
    for (s, f) in [
        ("dot", DumpFormat::Dot),
        ("svg", DumpFormat::Svg),
        ("json", DumpFormat::Json),
        ("text", DumpFormat::Text),
    ] {
        assert_eq!(s.parse::<DumpFormat>().unwrap(), f);
    }
    let e = "png".parse::<DumpFormat>().unwrap_err().to_string();
    assert!(e.contains("text, json, dot, svg"), "{e}");
}

#[test]
fn svg_is_rendered_by_graphviz_or_reports_it_missing() {
    let g = toy_model(2);
    for view in [DumpView::Full, DumpView::Collapsed] {
        match render(&g, DumpFormat::Svg, view) {
            Ok(svg) => assert!(
                svg.contains("<svg") && svg.contains("DecoderLayer 1"),
                "{svg}"
            ),
            Err(DumpError::GraphvizMissing) => {}
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn counts_are_formatted_with_si_suffixes() {
    assert_eq!(format_count(950), "950");
    assert_eq!(format_count(12_600), "12.6K");
    assert_eq!(format_count(7_240_000), "7.24M");
    assert_eq!(format_count(135_000_000), "135M");
}
